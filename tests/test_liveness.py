"""Liveness that a busy gRPC event loop cannot starve: the heartbeat (server/ops/liveness.py), /livez and /readyz on
the metrics port of a real server whose loop the tests block, and the image's probe command."""

from __future__ import annotations

import asyncio
import http.client
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from server import livez_probe
from server.app import MnistServer
from server.ops.liveness import LoopHeartbeat
from tests.support import free_port, test_config

TOKEN = "a-token-for-the-liveness-tests-0123456789"


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def get(port: int, path: str, method: str = "GET", headers: dict[str, str] | None = None) -> tuple[int, bytes, float]:
    """(status, body, seconds) of one request on a fresh connection, as a kubelet probe makes it."""
    started = time.perf_counter()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request(method, path, headers=headers or {})
        response = conn.getresponse()
        body = response.read()
    finally:
        conn.close()
    return response.status, body, time.perf_counter() - started


class Block:
    """The server's gRPC event loop blocked in a callback until `release()`: `blocking` tells whether it still is."""

    def __init__(self, server: MnistServer) -> None:
        assert server._loop is not None
        self._started, self._release, self._ended = threading.Event(), threading.Event(), threading.Event()
        server._loop.call_soon_threadsafe(self._block)
        assert self._started.wait(30), "the loop never ran the blocking callback"

    def _block(self) -> None:
        self._started.set()
        self._release.wait(60)  # a hang guard: the test releases it
        self._ended.set()

    @property
    def blocking(self) -> bool:
        return not self._ended.is_set()

    def release(self) -> None:
        self._release.set()
        assert self._ended.wait(30)


def poll(check: Callable[[], bool], what: str, seconds: float = 30) -> None:
    """Until `check()` is true: synchronisation on a state (the deadline only guards against a hang)."""
    deadline = time.monotonic() + seconds
    while not check():
        assert time.monotonic() < deadline, f"gave up waiting for {what}"
        time.sleep(0.01)


def health_check(server: MnistServer, timeout: float) -> grpc.StatusCode:
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        try:
            health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=timeout)
            return grpc.StatusCode.OK
        except grpc.RpcError as err:
            return err.code()


@pytest.fixture
def start() -> Iterator[Callable[..., MnistServer]]:
    """Servers without a model (the null backend): what is tested is the loop and the metrics thread."""
    servers: list[MnistServer] = []

    def start(**overrides) -> MnistServer:
        server = MnistServer(test_config(backend="null", digit_detector="none", **overrides)).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


# --- the heartbeat -----------------------------------------------------------------------------------


def test_the_heartbeat_names_a_stall_only_past_its_limit() -> None:
    clock, loop = FakeClock(), asyncio.new_event_loop()
    try:
        heartbeat = LoopHeartbeat(10.0, clock=clock)
        assert heartbeat.problem() == "the event loop's heartbeat is not running"
        heartbeat.start(loop)  # beats once now; the next beat waits for the loop, which never runs here
        clock.now += 9.9
        assert heartbeat.problem() is None
        clock.now += 0.2
        assert "has run no callback for 10.1 s (limit 10 s)" in heartbeat.problem()
        heartbeat.stop()
        assert heartbeat.problem() == "the event loop's heartbeat is not running"
    finally:
        loop.close()


def test_the_heartbeat_beats_several_times_per_limit() -> None:
    assert LoopHeartbeat(20.0).interval_s == 1.0
    assert LoopHeartbeat(0.4).interval_s == pytest.approx(0.1)
    with pytest.raises(ValueError):
        LoopHeartbeat(0.0)


# --- /livez on a real server ---------------------------------------------------------------------------


def test_livez_answers_at_once_while_the_grpc_loop_is_blocked(start) -> None:
    server = start()  # the default stall limit (20 s): a block shorter than that is a busy loop, not a dead one
    assert get(server.metrics_port, "/livez")[:2] == (200, b"ok\n")
    block = Block(server)
    try:
        status, body, _ = get(server.metrics_port, "/livez")
        assert (status, body) == (200, b"ok\n")
        assert block.blocking  # answered while the loop was blocked: nothing of /livez waits for it
        # The loop really was blocked: grpc health, served on it, misses a 0.5 s deadline meanwhile.
        assert health_check(server, 0.5) == grpc.StatusCode.DEADLINE_EXCEEDED
        assert block.blocking
    finally:
        block.release()


def test_livez_is_503_naming_the_stall_once_the_loop_is_blocked_past_the_limit(start) -> None:
    server = start(liveness_stall_seconds=0.5)
    assert get(server.metrics_port, "/livez")[0] == 200
    block = Block(server)
    try:
        poll(lambda: get(server.metrics_port, "/livez")[0] == 503, "/livez to say 503")
        status, body, _ = get(server.metrics_port, "/livez")
        assert status == 503
        assert b"gRPC event loop has run no callback for" in body and b"blocked or deadlocked" in body
        assert get(server.metrics_port, "/livez", "HEAD")[:2] == (503, b"")
        assert block.blocking  # all of it answered while the loop was blocked
    finally:
        block.release()
    poll(lambda: get(server.metrics_port, "/livez")[:2] == (200, b"ok\n"), "/livez to say ok again")  # it beats again


def test_livez_and_readyz_need_no_token_while_metrics_do(start, tmp_path: Path) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text(TOKEN + "\n")
    tokens.chmod(0o600)
    server = start(auth_tokens_file=str(tokens), metrics_auth="on")
    assert get(server.metrics_port, "/metrics")[0] == 401
    assert get(server.metrics_port, "/metrics", headers={"Authorization": f"Bearer {TOKEN}"})[0] == 200
    assert get(server.metrics_port, "/livez")[:2] == (200, b"ok\n")
    assert get(server.metrics_port, "/readyz")[:2] == (200, b"ok\n")
    assert get(server.metrics_port, "/livez/x")[0] == 404
    assert get(server.metrics_port, "/healthz")[0] == 404


def test_readyz_mirrors_grpc_health_and_says_not_ready_while_draining(start) -> None:
    server = start(drain_seconds=5.0)
    assert get(server.metrics_port, "/readyz")[:2] == (200, b"ok\n")
    stopping = threading.Thread(target=server.stop)
    stopping.start()
    try:
        poll(lambda: get(server.metrics_port, "/readyz")[0] == 503, "/readyz to say not ready")
        assert stopping.is_alive()  # within the drain: grpc health says NOT_SERVING, the metrics port still answers
        assert get(server.metrics_port, "/readyz")[:2] == (503, b"shutting down\n")
        assert get(server.metrics_port, "/livez")[:2] == (200, b"ok\n")  # draining is alive
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=2)
        assert reply.status == health_pb2.HealthCheckResponse.NOT_SERVING
    finally:
        stopping.join(30)


# --- the image's HEALTHCHECK command ---------------------------------------------------------------------


def test_the_probe_command_tells_a_live_server_from_none(start, capsys: pytest.CaptureFixture[str]) -> None:
    server = start()
    environ = {"MNIST_SERVE_HOST": "127.0.0.1"}
    assert livez_probe.main([], {**environ, "MNIST_SERVE_METRICS_PORT": str(server.metrics_port)}) == 0
    assert "200 ok" in capsys.readouterr().out
    assert livez_probe.main(["--timeout", "1"], {**environ, "MNIST_SERVE_METRICS_PORT": str(free_port())}) == 1
    assert livez_probe.main([], {**environ, "MNIST_SERVE_METRICS_PORT": "0"}) == 1
    assert "there is no /livez" in capsys.readouterr().err


def test_the_probe_command_finds_the_port_and_scheme_from_the_servers_variables() -> None:
    assert livez_probe.livez_url({}) == "http://localhost:9464/livez"
    assert livez_probe.livez_url({"MNIST_SERVE_METRICS_HOST": "::1"}) == "http://[::1]:9464/livez"
    tls = {"MNIST_SERVE_TLS_CERT": "/etc/mnist/tls/tls.crt", "MNIST_SERVE_METRICS_PORT": "9600"}
    assert livez_probe.livez_url(tls) == "https://localhost:9600/livez"
