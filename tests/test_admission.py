"""Admission control as a whole, against real servers: load the server can carry is never refused; overload is.

Functional, not timed: each test asserts which status codes came back, never how fast. The CPU default is the
server as `mnist-serve` starts with no flags (the bundled model on this machine's CPU).
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import grpc
import pytest

from loadtest.cpu_cost import BusyEngine
from loadtest.drivers import closed_loop, open_loop
from loadtest.servers import ServerProcess
from proto.mnist.v1 import classifier_pb2 as pb
from proto.mnist.v1 import classifier_pb2_grpc as pb_grpc
from training.data import load_split

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cpu_default(mnist_dir: Path):
    with ServerProcess([]) as server:
        yield server


def loadtest(target: str, users: int, out: Path, seconds: int = 6) -> dict:
    """`mnist-loadtest` (Locust, the 6:3:1 mix of raw, encoded and batch calls) with no latency objective to speak
    of: only the status codes are judged here."""
    command = [sys.executable, "-m", "loadtest.run", "--host", target, "--users", str(users), "--spawn-rate"]
    command += [str(users), "--run-time", f"{seconds}s", "--slo-p99-ms", "60000", "--max-error-ratio", "1"]
    command += ["--min-accuracy", "0", "--report-dir", str(out)]
    finished = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert finished.returncode == 0, finished.stdout + finished.stderr
    (run_dir,) = out.iterdir()
    return json.loads((run_dir / "verdict.json").read_text())


@pytest.mark.parametrize("users", [1, 4, 16, 64])
def test_closed_loops_of_the_load_test_mix_are_never_refused(cpu_default, users: int, tmp_path: Path) -> None:
    """Closed-loop users cannot overload a server: each waits for its answer before it sends again. 4 users once got
    3,749 of 4,991 calls refused; 64 users keep about 200 ms of work queued on this CPU and must be served too."""
    verdict = loadtest(cpu_default.target, users, tmp_path)
    assert verdict["errors"] == {}, verdict["errors"]
    assert verdict["total"]["requests"] >= 10 * users
    assert {row["name"] for row in verdict["rows"]} == {"Classify raw", "Classify encoded", "ClassifyBatch"}


def test_a_closed_loop_of_full_size_batches_is_never_refused(cpu_default) -> None:
    """4 clients sending ClassifyBatch of 256 images (the largest request) keep about 0.6 s queued on this CPU, each
    request eight batches of 32 on its own: once, 44 of about 60 calls were refused for a standing queue."""
    result = closed_loop(cpu_default.target, clients=4, seconds=4.0, images_per_call=256)
    assert result.errors == {}, result.errors
    assert len(result.latencies_s) >= 8


class Clients:
    """`count` threads, each with its own connection, sending raw Classify back to back and recording every code."""

    def __init__(self, target: str, count: int, pause_on_unavailable: float = 0.01) -> None:
        digits = load_split("test").images[:64]
        self.requests = [pb.ClassifyRequest(raw=digit.tobytes()) for digit in digits]
        self.target, self.pause = target, pause_on_unavailable
        self.codes: Counter = Counter()
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(count)]

    def _run(self, offset: int) -> None:
        options = [("grpc.use_local_subchannel_pool", 1), ("grpc.initial_reconnect_backoff_ms", 50)]
        with grpc.insecure_channel(self.target, options=options) as channel:
            stub, i = pb_grpc.ClassifierStub(channel), offset
            while not self.stop.is_set():
                try:
                    stub.Classify(self.requests[i % len(self.requests)], timeout=10)
                    code = "OK"
                except grpc.RpcError as err:
                    code = err.code().name
                with self.lock:
                    self.codes[code] += 1
                if code == "UNAVAILABLE":  # the server is going or gone: do not spin
                    time.sleep(self.pause)
                i += 1

    def __enter__(self) -> Clients:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(30)

    def snapshot(self) -> Counter:
        with self.lock:
            return Counter(self.codes)

    def wait_for(self, code: str, more_than: int, seconds: float = 60) -> None:
        """Until more than `more_than` calls were answered `code` (the deadline only guards against a hang)."""
        deadline = time.monotonic() + seconds
        while self.snapshot()[code] <= more_than:
            assert time.monotonic() < deadline, f"gave up waiting for {more_than + 1} calls answered {code}"
            time.sleep(0.01)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_draining_server_under_16_clients_refuses_nothing_for_load(mnist_dir: Path, sig: signal.Signals) -> None:
    """During the drain (health NOT_SERVING, then new calls UNAVAILABLE) nothing is refused RESOURCE_EXHAUSTED:
    79 calls once were, in the drain second."""
    with ServerProcess(["--drain-seconds", "1"]) as server, Clients(server.target, 16) as clients:
        clients.wait_for("OK", 16)
        server.process.send_signal(sig)
        assert server.process.wait(60) == 0
        clients.wait_for("UNAVAILABLE", clients.snapshot()["UNAVAILABLE"])  # the clients have seen it gone
    codes = clients.snapshot()
    assert "RESOURCE_EXHAUSTED" not in codes, codes
    assert set(codes) <= {"OK", "UNAVAILABLE"}, codes


def test_clients_reconnecting_to_a_restarted_server_are_not_refused(mnist_dir: Path) -> None:
    """16 clients hammering a server that is killed and started again on the same port: once it is SERVING, every
    call is answered (1,283 were refused while the new server learnt its speed)."""
    with ServerProcess([]) as first:
        port = first.port
        with Clients(first.target, 16, pause_on_unavailable=0.05) as clients:
            clients.wait_for("OK", 16)
            first.process.kill()
            first.process.wait(30)
            with ServerProcess([], port=port):
                before = clients.snapshot()
                time.sleep(4.0)
                after = clients.snapshot()
    answered = after - before
    assert answered["OK"] > 16
    assert "RESOURCE_EXHAUSTED" not in after, after


def test_a_5x_open_loop_is_shed(cpu_default) -> None:
    """Overload is refused (RESOURCE_EXHAUSTED, at admission) rather than queued until every call is late."""
    with Clients(cpu_default.target, 16) as clients:  # capacity: what 16 closed-loop clients get answered
        clients.wait_for("OK", 16)  # all of them under way; then a window of 3 s measured, not waited for
        before, started = clients.snapshot()["OK"], time.monotonic()
        time.sleep(3.0)
        capacity = (clients.snapshot()["OK"] - before) / (time.monotonic() - started)
    rate = 5 * capacity
    overload = open_loop(cpu_default.target, rate, 4.0, processes=2, deadline_s=1.0)
    admission = {reason: n for reason, n in overload.reasons.items() if reason.startswith("RESOURCE_EXHAUSTED: server")}
    assert admission, overload.reasons  # refused by admission: a standing queue, or a deadline out of reach
    assert len(overload.latencies_s) > 0  # and some are served


def test_calls_over_the_concurrency_bound_are_refused_by_grpc_and_the_rest_served(mnist_dir: Path) -> None:
    """`--max-concurrent-calls` is gRPC's own bound (refused before any handler: the cheapest refusal there is)."""
    slow = ["--backend", "null-threaded", "--null-device-ms", "300+0", "--max-batch-size", "1"]
    with ServerProcess([*slow, "--max-concurrent-calls", "3", "--queue-target-ms", "off"]) as server:
        request = pb.ClassifyRequest(raw=load_split("test").images[0].tobytes())
        with grpc.insecure_channel(server.target) as channel:
            stub = pb_grpc.ClassifierStub(channel)
            held = [stub.Classify.future(request, timeout=10) for _ in range(3)]
            time.sleep(0.1)
            with pytest.raises(grpc.RpcError) as refused:
                stub.Classify(request, timeout=10)
            assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "Concurrent RPC limit" in refused.value.details()
            assert [future.result().digit for future in held] == [0, 0, 0]  # the null engine's fixed answer
            assert stub.Classify(request, timeout=10).digit == 0  # slots free again: served


def test_while_the_only_version_sheds_calls_are_refused_before_their_message_is_read(mnist_dir: Path) -> None:
    """A refusal must cost the server less than an answer: while the one version served would refuse even a single
    image for a call's deadline, the call is refused before its message is received or parsed (garbage bytes are
    told to retry later, not that they are garbage). Otherwise the message is read and judged as before."""
    slow = ["--backend", "null-threaded", "--null-device-ms", "200+0", "--max-request-images", "256"]
    garbage = b"\xff\xff\xff"  # not a protobuf message
    digit = pb.ClassifyRequest(raw=load_split("test").images[0].tobytes()).SerializeToString()
    with ServerProcess(slow) as server, grpc.insecure_channel(server.target) as channel:
        classify = channel.unary_unary("/mnist.v1.Classifier/Classify")
        with pytest.raises(grpc.RpcError) as idle:
            classify(garbage, timeout=5)
        assert idle.value.code() == grpc.StatusCode.INVALID_ARGUMENT  # an idle engine: read and judged
        with BusyEngine(server.target):
            for request in (digit, garbage):
                with pytest.raises(grpc.RpcError) as shed:
                    classify(request, timeout=0.02)
                assert shed.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, shed.value.details()
                assert "past the call's deadline" in shed.value.details()
                assert dict(shed.value.trailing_metadata())["retry-after-ms"].isdigit()
            with pytest.raises(grpc.RpcError) as patient:  # a deadline the queue can meet: read, judged, refused
                classify(garbage, timeout=10)
            assert patient.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            # a message larger than the HTTP/2 window, still being sent when the refusal goes out: refused cleanly
            images = load_split("test").images[:256]
            batch = pb.ClassifyBatchRequest(requests=[pb.ClassifyRequest(raw=image.tobytes()) for image in images])
            with pytest.raises(grpc.RpcError) as large:
                pb_grpc.ClassifierStub(channel).ClassifyBatch(batch, timeout=0.05)
            assert large.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, large.value.details()


def test_a_model_call_sent_as_a_stream_without_a_message_is_told_so(mnist_dir: Path) -> None:
    """The model's calls are registered as request streams of one message (refusals decided before the read): a
    client that ends the stream without sending one gets INVALID_ARGUMENT naming that, and the server goes on."""
    with ServerProcess(["--backend", "null"]) as server, grpc.insecure_channel(server.target) as channel:
        empty = channel.stream_unary("/mnist.v1.Classifier/Classify")
        with pytest.raises(grpc.RpcError) as refused:
            empty(iter(()), timeout=5)
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "no request message" in refused.value.details()
        request = pb.ClassifyRequest(raw=load_split("test").images[0].tobytes())
        assert pb_grpc.ClassifierStub(channel).Classify(request, timeout=5).digit == 0  # the null engine's answer


def test_a_refused_call_leaves_no_exception_for_the_garbage_collector(mnist_dir: Path) -> None:
    """A refusal's exception is freed when the call ends, by reference counting: kept in a frame that its own
    traceback holds, it would be a reference cycle per refused call, freed only by the collector (pauses of 20-30 ms
    once measured in the refusal tail). Counted in the server's own process, with the collector off."""
    import gc

    from server.app import MnistServer
    from server.errors import Overloaded
    from tests.support import test_config

    server = MnistServer(test_config(backend="null-threaded", null_device_ms="200+0", digit_detector="none")).start()
    digit = pb.ClassifyRequest(raw=load_split("test").images[0].tobytes()).SerializeToString()
    try:
        target = f"127.0.0.1:{server.port}"
        with BusyEngine(target), grpc.insecure_channel(target) as channel:
            classify = channel.unary_unary("/mnist.v1.Classifier/Classify")
            gc.collect()
            gc.disable()
            try:
                before = sum(isinstance(o, Overloaded) for o in gc.get_objects())
                codes = Counter()
                for _ in range(40):
                    try:
                        classify(digit, timeout=0.05)
                        codes["OK"] += 1
                    except grpc.RpcError as error:
                        codes[error.code().name] += 1
                left = sum(isinstance(o, Overloaded) for o in gc.get_objects()) - before
            finally:
                gc.enable()
    finally:
        server.stop()
    assert codes["RESOURCE_EXHAUSTED"] >= 30, codes
    assert left <= 2, f"{left} refusals still alive after {codes['RESOURCE_EXHAUSTED']} refused calls"
