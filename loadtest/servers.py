"""Servers as subprocesses for the measuring tools: `mnist-serve` (or the echo server) on a free port, SERVING.

One home for starting a server to measure: `mnist-bench`, `mnist-bench --check`, `mnist-attack` and the tests use it.
"""

from __future__ import annotations

import subprocess
import sys
import time
from typing import Any


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
    """`mnist-serve` (or the echo server) on a free port for the length of a `with` block."""

    def __init__(self, args: list[str], echo: bool = False, port: int = 0, wait_s: float = 180.0) -> None:
        self.port = port or free_port()
        module = "loadtest.echo_server" if echo else "server.app"
        common = ["--host", "127.0.0.1", "--port", str(self.port)]
        if not echo:
            common += ["--metrics-port", "0", "--http-port", "0", "--drain-seconds", "0", "--log-level", "WARNING"]
        self.command = [sys.executable, "-m", module, *common, *args]
        self.wait_s = wait_s
        self.process: subprocess.Popen | None = None
        self.info: dict[str, Any] = {}

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def __enter__(self) -> ServerProcess:
        from google.protobuf.json_format import MessageToDict

        from proto.mnist.v1 import classifier_pb2 as pb
        from server.client import ClassifierClient

        self.process = subprocess.Popen(self.command, stdout=subprocess.DEVNULL)
        if not wait_until_serving(self.process, self.target, self.wait_s):
            self.process.kill()
            raise SystemExit(f"mnist-bench: {' '.join(self.command)} did not become SERVING (see its log above)")
        with ClassifierClient(self.target, timeout=10) as client:
            reply = client.stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=10)
            self.info = MessageToDict(reply, preserving_proto_field_name=True)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.process is not None:
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
