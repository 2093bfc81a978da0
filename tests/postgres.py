"""A throwaway PostgreSQL server for tests: Debian's binaries (tests/setup.sh installs the `postgresql` package),
a cluster made by initdb in a temporary folder, listening on 127.0.0.1 at a free port and on a socket in that
folder, stopped and deleted at the end.

    with running_postgres() as url:          # postgresql://mnist:<password>@127.0.0.1:<port>/feedback
        ...

`PostgresCluster` does the same with more control: `create_database()` for a fresh database per test,
`stop()`/`start()`/`restart()` for tests of an unreachable database. The cluster is made for speed, not for
durability (fsync off). PostgreSQL refuses to run as root, so as root the server runs as the `postgres` user
that the Debian package creates.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

USER = "mnist"
PASSWORD = "feedback-s3cret"  # distinctive, so that tests can search messages for it
DATABASE = "feedback"
SERVER_OPTIONS = "-c fsync=off -c synchronous_commit=off -c full_page_writes=off"


class PostgresMissing(RuntimeError):
    """No PostgreSQL server binaries on this machine."""


def find_bin_dir() -> Path:
    """The newest /usr/lib/postgresql/<version>/bin with initdb and pg_ctl (Debian keeps them off PATH)."""
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"), key=lambda p: int(Path(p).parts[-3]))
    on_path = shutil.which("pg_ctl")
    for pg_ctl in reversed(candidates + ([on_path] if on_path else [])):
        folder = Path(pg_ctl).parent
        if (folder / "initdb").is_file():
            return folder
    raise PostgresMissing(
        "PostgreSQL's server binaries (initdb, pg_ctl) are missing: tests/setup.sh installs Debian's `postgresql` "
        "package (apt-get install postgresql)"
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PostgresCluster:
    """One initdb cluster in a temporary folder; `start()` it, `close()` stops it and deletes the folder."""

    def __init__(self) -> None:
        self.bin_dir = find_bin_dir()
        self.port = free_port()
        self.root = Path(tempfile.mkdtemp(prefix="mnist-pg-"))  # not under pytest's tmp: that is root-only
        self.data = self.root / "data"
        self.log = self.root / "server.log"
        self._as_postgres = os.geteuid() == 0
        if self._as_postgres:
            owner = pwd.getpwnam("postgres")
            os.chown(self.root, owner.pw_uid, owner.pw_gid)
        self._ready = False
        try:
            self._run("initdb", "-D", str(self.data), "-U", "postgres", "-E", "UTF8", "--locale=C", "--no-sync",
                      "--auth-local=trust", "--auth-host=scram-sha-256")  # fmt: skip
        except BaseException:
            shutil.rmtree(self.root, ignore_errors=True)
            raise

    @property
    def url(self) -> str:
        return self.url_for(DATABASE)

    def url_for(self, database: str, password: str = PASSWORD, port: int | None = None) -> str:
        return f"postgresql://{USER}:{password}@127.0.0.1:{port or self.port}/{database}"

    def _run(self, tool: str, *args: str) -> str:
        command = [str(self.bin_dir / tool), *args]
        if self._as_postgres:
            command = ["runuser", "-u", "postgres", "--", *command]
        done = subprocess.run(command, cwd=self.root, capture_output=True, text=True, timeout=60)
        if done.returncode != 0:
            log = self.log.read_text(errors="replace")[-2000:] if self.log.exists() else ""
            raise RuntimeError(f"{tool} {' '.join(args)} failed ({done.returncode}): {done.stderr.strip()}\n{log}")
        return done.stdout

    def _server(self, action: str, *extra: str) -> None:
        options = f"-k {self.root} -p {self.port} -c listen_addresses=127.0.0.1 {SERVER_OPTIONS}"
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-w", "-t", "30", "-o", options, action, *extra)

    def start(self) -> None:
        self._server("start")
        if not self._ready:
            self.admin(
                f"CREATE ROLE {USER} LOGIN PASSWORD '{PASSWORD}'",
                f"CREATE DATABASE {DATABASE} OWNER {USER}",
            )
            self._ready = True

    def stop(self) -> None:
        self._server("stop", "-m", "fast")

    def restart(self) -> None:
        """Stop (disconnecting every client) and start again on the same port."""
        self._server("restart", "-m", "fast")

    def admin(self, *statements: str) -> None:
        """Run statements as the superuser, over the socket (trusted)."""
        import psycopg

        with psycopg.connect(
            host=str(self.root), port=self.port, user="postgres", dbname="postgres", autocommit=True
        ) as c:
            for statement in statements:
                c.execute(statement)

    def create_database(self, name: str) -> str:
        """A new empty database owned by the test role; its URL."""
        self.admin(f"CREATE DATABASE {name} OWNER {USER}")
        return self.url_for(name)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._server("stop", "-m", "immediate")
        shutil.rmtree(self.root, ignore_errors=True)


@contextlib.contextmanager
def running_cluster() -> Iterator[PostgresCluster]:
    cluster = PostgresCluster()
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.close()


@contextlib.contextmanager
def running_postgres() -> Iterator[str]:
    """A running server with a database and a role that has a password: the URL to reach it."""
    with running_cluster() as cluster:
        yield cluster.url
