"""Servers as subprocesses: `mnist-serve` (or the echo server) on a port of its own, started, SERVING, stopped.

The one home for "start a server process, wait until it serves, stop it": `mnist-bench`, `mnist-bench --check`,
`mnist-bench --suite`, `mnist-attack` and the tests use it.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any, NoReturn, Self

# What a server started to be measured runs with unless told otherwise: no REST port, no drain, warnings only, one
# process (`--workers` auto would start several on a larger machine: a measurement asks for them by name).
MEASURING = ("--http-port", "0", "--drain-seconds", "0", "--log-level", "WARNING", "--workers", "1")


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_serving(process: subprocess.Popen, target: str, seconds: float) -> bool:
    """Poll health until SERVING; give up at once if the process has exited (a failed start)."""
    from server.client import ClassifierClient

    deadline = time.monotonic() + seconds
    with ClassifierClient(target, timeout=10) as client:
        while process.poll() is None and time.monotonic() < deadline:
            if client.wait_until_serving(1.0):
                return process.poll() is None
    return False


class ServerProcess:
    """`mnist-serve` (or the echo server) on `host` (127.0.0.1), for the length of a `with` block or from `start()`
    to `stop()`.

    `port`, `metrics_port`: 0 for a free port (the metrics port: one the server picks). `defaults`: the flags put
    before `args` (the echo server takes none). `log`: where the server's output goes: None drops its stdout and
    leaves its stderr on ours; a path (its first line the command), an open file or `subprocess.PIPE` (text) takes
    stdout and stderr both. `env`: variables added to ours. A server that does not become SERVING within `wait_s` is
    killed and `not_serving()` raises (by default SystemExit, for the measuring commands). `host`: another loopback
    address (127.0.0.2, ...) stands for another machine in a fleet (loadtest/fleet.py).
    """

    def __init__(
        self,
        args: Sequence[str],
        echo: bool = False,
        port: int = 0,
        wait_s: float = 180.0,
        *,
        metrics_port: int = 0,
        defaults: Sequence[str] = MEASURING,
        log: Path | IO[str] | int | None = None,
        env: dict[str, str] | None = None,
        cwd: Path | None = None,
        host: str = "127.0.0.1",
    ) -> None:
        self.host = host
        self.port = port or free_port()
        module = "loadtest.echo_server" if echo else "server.app"
        common = ["--host", host, "--port", str(self.port)]
        if not echo:
            common += ["--metrics-port", str(metrics_port), *defaults]
        self.command = [sys.executable, "-m", module, *common, *args]
        self.wait_s = wait_s
        self.log = log
        self.env = None if env is None else {**os.environ, **env}
        self.cwd = cwd
        self.process: subprocess.Popen | None = None
        self.info: dict[str, Any] = {}
        self._log_file: IO[str] | None = None

    @property
    def target(self) -> str:
        return f"{self.host}:{self.port}"

    def start(self) -> Self:
        """Start the process and wait until it is SERVING (else kill it and call `not_serving`)."""
        stdout: Any = subprocess.DEVNULL
        stderr: Any = None
        if isinstance(self.log, Path):
            self._log_file = stdout = self.log.open("w")
            self._log_file.write("$ " + shlex.join(self.command) + "\n")
            self._log_file.flush()
            stderr = subprocess.STDOUT
        elif self.log is not None:
            stdout, stderr = self.log, subprocess.STDOUT
        self.process = subprocess.Popen(
            self.command, stdout=stdout, stderr=stderr, text=True, env=self.env, cwd=self.cwd
        )
        if not wait_until_serving(self.process, self.target, self.wait_s):
            exited = self.process.poll()
            self.process.kill()
            self.process.wait(10)
            self._close_log()
            self.not_serving(exited)
        return self

    def not_serving(self, exited: int | None) -> NoReturn:
        """What a failed start raises; `exited` is the exit status, None when the process was still running."""
        raise SystemExit(f"mnist-bench: {' '.join(self.command)} did not become SERVING (see its log above)")

    def model_info(self) -> dict[str, Any]:
        """GetModelInfo, as a dict."""
        from google.protobuf.json_format import MessageToDict

        from proto.mnist.v1 import classifier_pb2 as pb
        from server.client import ClassifierClient

        with ClassifierClient(self.target, timeout=10) as client:
            reply = client.stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=10)
            return MessageToDict(reply, preserving_proto_field_name=True)

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self, wait_s: float = 30.0) -> None:
        """SIGTERM, then SIGKILL if it has not exited within `wait_s`."""
        if self.alive():
            assert self.process is not None
            self.process.terminate()
            try:
                self.process.wait(wait_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        self._close_log()

    def _close_log(self) -> None:
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def __enter__(self) -> Self:
        self.start()
        try:
            self.info = self.model_info()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
