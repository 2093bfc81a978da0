"""The run's servers and context: `AttackServer` (a `loadtest.servers.ServerProcess` with its log in the report
folder and a metrics port of its own), the server's flags and defaults read from `mnist-serve --help`, and `Ctx`,
what the checks share (options, servers started on demand, the report folder)."""

from __future__ import annotations

import argparse
import re
import shlex
import subprocess
import sys
import threading
from pathlib import Path
from typing import NoReturn

from loadtest.attack.client import Client
from loadtest.attack.core import Fail
from loadtest.servers import ServerProcess, free_port

# loadtest.servers.MEASURING with the server's INFO log: a server's log in the report folder says what it did.
DEFAULTS = ("--http-port", "0", "--drain-seconds", "0", "--log-level", "INFO")


def log_tail(path: Path, lines: int = 6) -> str:
    try:
        text = path.read_text(errors="replace").strip().splitlines()[1:]  # the first line is the command
    except OSError:
        return ""
    return " | ".join(text[-lines:])


class AttackServer(ServerProcess):
    """mnist-serve on free gRPC and metrics ports, its log in the report folder, its process watched with psutil."""

    def __init__(self, name: str, args: list[str], log_dir: Path, wait_s: float = 90.0) -> None:
        self.name = name
        self.log_path = log_dir / f"server-{name}.log"
        self.metrics_port = free_port()
        super().__init__(args, wait_s=wait_s, metrics_port=self.metrics_port, defaults=DEFAULTS, log=self.log_path)

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    @property
    def livez_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/livez"

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def not_serving(self, exited: int | None) -> NoReturn:
        """A failed start, as a FAIL line that says why: a flag the server does not accept, its exit, or the time."""
        tail = log_tail(self.log_path, 3)
        missing = re.search(r"unrecognized arguments: ([^|]*)", tail)
        if missing:
            raise Fail(f"flag missing: the server does not accept {missing.group(1).strip()}")
        if exited is not None:
            raise Fail(f"the server exited with status {exited} at start: {tail}")
        raise Fail(f"server did not become SERVING within {self.wait_s:.0f} s: {tail}")

    def stop(self, wait_s: float = 15.0) -> None:
        super().stop(wait_s)


def server_help() -> str:
    done = subprocess.run([sys.executable, "-m", "server.app", "--help"], capture_output=True, text=True, timeout=120)
    return " ".join(done.stdout.split())


def flag_default(help_text: str, flag: str) -> str | None:
    """The default `mnist-serve --help` prints for `flag` ("... default 40000000]")."""
    match = re.search(re.escape(flag) + r" [A-Z_]+ [^\[]*\[env [A-Z_]+; default ([^\]]*)\]", help_text)
    return match.group(1).strip() or None if match else None


def flag_value(args: list[str], flag: str) -> str | None:
    """The last value given to `flag` in a list of arguments (`--flag V` or `--flag=V`)."""
    value = None
    for i, arg in enumerate(args):
        if arg == flag and i + 1 < len(args):
            value = args[i + 1]
        elif arg.startswith(flag + "="):
            value = arg.split("=", 1)[1]
    return value


# --- the run's context -------------------------------------------------------------------------------


class Ctx:
    """What checks share: options, the report folder, servers, the server's flags and limits, the clock."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.quick: bool = args.quick
        self.out: Path = args.out
        self.server_args: list[str] = shlex.split(args.server_args)
        self.senders: int = args.senders
        self.servers: dict[str, AttackServer] = {}
        self._help: str | None = None
        self.notes: list[str] = []
        self.check_thread: threading.Thread | None = None

    # flags and limits the server was started with
    @property
    def help(self) -> str:
        if self._help is None:
            self._help = server_help()
        return self._help

    def has_flag(self, flag: str) -> bool:
        return re.search(re.escape(flag) + r"\b", self.help) is not None

    def setting(self, flag: str, extra: list[str] | None = None) -> float | None:
        """The value `flag` has in a server started with our arguments: given, else the server's default."""
        text = flag_value([*self.server_args, *(extra or [])], flag) or flag_default(self.help, flag)
        try:
            return float(text) if text is not None else None
        except ValueError:
            return None

    def max_image_pixels(self) -> int:
        return int(self.setting("--max-image-pixels") or 40_000_000)

    # servers
    def server(self, key: str, extra: list[str] | None = None) -> AttackServer:
        """The server named `key`, started with `extra` flags the first time (or again if it died)."""
        if threading.current_thread() is not self.check_thread:
            raise Fail("check abandoned (it ran out of time)")  # a timed-out check must not start servers
        current = self.servers.get(key)
        if current is not None and current.alive():
            with Client(current.target) as client:
                if client.health(timeout=5).code == "OK":
                    return current
            self.notes.append(f"server {key} stopped answering health checks; started again")
        if current is not None:
            current.stop()
        server = AttackServer(key, [*self.server_args, *(extra or [])], self.out)
        server.start()
        self.servers[key] = server
        return server

    def close_servers(self, keep: tuple[str, ...] = ()) -> None:
        for key in list(self.servers):
            if key not in keep:
                self.servers.pop(key).stop()

    def short(self, quick: float, full: float) -> float:
        return quick if self.quick else full
