"""Every method of every service the server exposes is guarded alike: garbage is INVALID_ARGUMENT and counted,
streams are bounded and end cleanly, shutdown answers UNAVAILABLE, and deadlines are labelled as such."""

from __future__ import annotations

import asyncio
import io
import threading
import time
from collections.abc import Iterator

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2
from PIL import Image

from proto.mnist.v1 import classifier_pb2 as pb
from server.app import MnistServer
from server.transport.guards import RETRY_AFTER_KEY
from server.transport.health import HealthService
from tests.support import Harness, test_config

GARBAGE = b"\xff\xff\xff\xff"  # a truncated varint key: no protobuf parser accepts it
RAW_DIGIT = bytes(range(256)) * 3 + bytes(16)
UNARY = ("/mnist.v1.Classifier/Classify", "/mnist.v1.Classifier/ClassifyBatch", "/mnist.v1.Classifier/GetModelInfo")
HEALTH_CHECK = "/grpc.health.v1.Health/Check"
HEALTH_WATCH = "/grpc.health.v1.Health/Watch"
REFLECTION = "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"


def identity(data: bytes) -> bytes:
    return data


@pytest.fixture(scope="module")
def guarded() -> Iterator[Harness]:
    config = test_config(backend="null", digit_detector="none", max_streams=4, stream_idle_seconds=0.5)
    harness = Harness(MnistServer(config).start())
    yield harness
    harness.close()


def invalid_argument_count(harness: Harness, method: str) -> float:
    return harness.metrics().get(f'mnist_requests_total{{code="INVALID_ARGUMENT",method="{method}"}}', 0.0)


@pytest.mark.parametrize("path", [*UNARY, HEALTH_CHECK])
def test_garbage_to_a_unary_method_is_invalid_argument_and_counted(guarded: Harness, path: str) -> None:
    method = path.rsplit("/", 1)[1]
    before = invalid_argument_count(guarded, method)
    call = guarded.channel.unary_unary(path, request_serializer=identity, response_deserializer=identity)
    with pytest.raises(grpc.RpcError) as err:
        call(GARBAGE, timeout=5)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "malformed request" in err.value.details()
    assert invalid_argument_count(guarded, method) == before + 1


def test_garbage_to_health_watch_is_invalid_argument_and_counted(guarded: Harness) -> None:
    before = invalid_argument_count(guarded, "Watch")
    call = guarded.channel.unary_stream(HEALTH_WATCH, request_serializer=identity, response_deserializer=identity)
    with pytest.raises(grpc.RpcError) as err:
        list(call(GARBAGE, timeout=5))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert invalid_argument_count(guarded, "Watch") == before + 1


def test_garbage_inside_a_reflection_stream_ends_it_invalid_argument_and_counted(guarded: Harness) -> None:
    before = invalid_argument_count(guarded, "ServerReflectionInfo")
    call = guarded.channel.stream_stream(REFLECTION, request_serializer=identity, response_deserializer=identity)
    good = reflection_pb2.ServerReflectionRequest(list_services="").SerializeToString()
    responses = call(iter([good, GARBAGE]), timeout=5)
    with pytest.raises(grpc.RpcError) as err:
        first = next(responses)
        assert reflection_pb2.ServerReflectionResponse.FromString(first).list_services_response.service
        next(responses)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert invalid_argument_count(guarded, "ServerReflectionInfo") == before + 1


def test_reflection_still_lists_the_services(guarded: Harness) -> None:
    call = guarded.channel.stream_stream(
        REFLECTION,
        request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
        response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
    )
    (response,) = list(call(iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5))
    names = {service.name for service in response.list_services_response.service}
    assert {"mnist.v1.Classifier", "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"} <= names


def test_an_idle_reflection_stream_is_closed_unavailable(guarded: Harness) -> None:
    call = guarded.channel.stream_stream(REFLECTION, request_serializer=identity, response_deserializer=identity)
    silence, client_done = threading.Event(), threading.Event()

    def nothing() -> Iterator[bytes]:
        silence.wait(60)  # a hang guard: the client stays silent and open far past the server's 0.5 s idle limit
        client_done.set()
        return
        yield b""

    with pytest.raises(grpc.RpcError) as err:
        list(call(nothing(), timeout=120))
    closed_while_silent = not client_done.is_set()  # the server ended it, not the client's end of stream or deadline
    silence.set()
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "closed after 0.5 s without a request" in err.value.details()  # the fixture's idle limit, named
    assert closed_while_silent


def test_streams_over_the_limit_are_refused_and_classify_and_health_still_answer(guarded: Harness) -> None:
    watch = guarded.channel.unary_stream(
        HEALTH_WATCH,
        request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
        response_deserializer=health_pb2.HealthCheckResponse.FromString,
    )
    streams = [watch(health_pb2.HealthCheckRequest(), timeout=30) for _ in range(6)]
    try:
        refused = 0
        for stream in streams:
            try:
                next(stream)  # an accepted watch answers its current status at once
            except grpc.RpcError as err:
                assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err
                assert dict(err.trailing_metadata() or ()).get(RETRY_AFTER_KEY)
                refused += 1
        assert refused == 2  # the limit is 4
        assert guarded.health_status() == health_pb2.HealthCheckResponse.SERVING
        assert guarded.stub.Classify(pb.ClassifyRequest(raw=RAW_DIGIT), timeout=5).digit == 0
    finally:
        for stream in streams:
            stream.cancel()


def big_png(side: int = 1800) -> bytes:
    """A large PNG with some ink: slow enough to decode that a short deadline passes meanwhile."""
    pixels = np.full((side, side), 255, np.uint8)
    pixels[side // 4 : 3 * side // 4, side // 2 - 40 : side // 2 + 40] = 0
    pixels[::7, ::5] = 128  # texture, so it neither compresses nor decodes to nothing
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG", compress_level=1)
    return buffer.getvalue()


def test_a_call_whose_deadline_passes_is_counted_deadline_exceeded_not_cancelled(guarded: Harness) -> None:
    label = 'mnist_requests_total{{code="{}",method="ClassifyBatch"}}'
    before = {code: guarded.metrics().get(label.format(code), 0.0) for code in ("DEADLINE_EXCEEDED", "CANCELLED")}
    request = pb.ClassifyBatchRequest(requests=[pb.ClassifyRequest(encoded=big_png())] * 4)
    with pytest.raises(grpc.RpcError) as err:
        guarded.stub.ClassifyBatch(request, timeout=0.05)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED

    def counted() -> dict[str, float]:
        metrics = guarded.metrics()
        return {code: metrics.get(label.format(code), 0.0) for code in ("DEADLINE_EXCEEDED", "CANCELLED")}

    wait_for(lambda: sum(counted().values()) > sum(before.values()), "the server to count the call")  # as one or other
    after = counted()
    assert after["DEADLINE_EXCEEDED"] == before["DEADLINE_EXCEEDED"] + 1
    assert after["CANCELLED"] == before["CANCELLED"]


DRAINING = "server is shutting down; retry on another replica"  # the drain's own refusal (server/transport/guards.py)


def wait_for(condition, what: str, seconds: float = 20) -> None:
    """Poll `condition` until true: synchronisation on a state, not on a guess of how long it takes."""
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"gave up waiting for {what}"
        time.sleep(0.005)


def test_calls_during_shutdown_are_unavailable_never_cancelled() -> None:
    server = MnistServer(test_config(backend="null", digit_detector="none", drain_seconds=0.3, grace_seconds=1)).start()
    channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
    classify = channel.unary_unary(
        "/mnist.v1.Classifier/Classify",
        request_serializer=pb.ClassifyRequest.SerializeToString,
        response_deserializer=pb.ClassifyResponse.FromString,
    )
    outcomes: list[list[tuple[grpc.StatusCode, str]]] = [[] for _ in range(4)]
    done = threading.Event()

    def client(mine: list[tuple[grpc.StatusCode, str]]) -> None:
        while not done.is_set():
            try:
                classify(pb.ClassifyRequest(raw=RAW_DIGIT), timeout=2)
                mine.append((grpc.StatusCode.OK, ""))
            except grpc.RpcError as err:
                mine.append((err.code(), err.details() or ""))

    threads = [threading.Thread(target=client, args=(mine,)) for mine in outcomes]
    for thread in threads:
        thread.start()
    wait_for(lambda: all(mine for mine in outcomes), "every client's first answer")
    server.stop()
    answered = [len(mine) for mine in outcomes]
    wait_for(lambda: all(len(mine) > n for mine, n in zip(outcomes, answered, strict=True)), "answers after the stop")
    done.set()
    for thread in threads:
        thread.join(10)
    channel.close()
    codes = {code for mine in outcomes for code, _ in mine}
    assert codes <= {grpc.StatusCode.OK, grpc.StatusCode.UNAVAILABLE}, codes
    assert grpc.StatusCode.OK in codes
    # refused by the drain itself while the port was still open, not only by a closed port afterwards
    assert any(details == DRAINING for mine in outcomes for _, details in mine)


def test_a_drain_finishes_calls_in_flight_and_refuses_new_ones_with_its_own_status(monkeypatch) -> None:
    """Calls running when the drain begins are answered OK; calls arriving meanwhile are refused UNAVAILABLE with the
    drain's message while the port is still open, which a closed port (after the drain) never says."""
    from server.engine.backends.null_backend import NullBackend

    hold, running, release = threading.Event(), threading.Event(), threading.Event()
    original = NullBackend.run

    def run(self, images):  # on the runner thread (null-threaded), as a model's session run
        if hold.is_set():
            running.set()
            release.wait(30)
        return original(self, images)

    monkeypatch.setattr(NullBackend, "run", run)
    config = test_config(backend="null-threaded", digit_detector="none", drain_seconds=0, grace_seconds=30)
    harness = Harness(MnistServer(config).start())
    request = pb.ClassifyRequest(raw=RAW_DIGIT)
    stopping = threading.Thread(target=harness.server.stop)
    try:
        hold.set()
        in_flight = harness.stub.Classify.future(request, timeout=60)
        assert running.wait(20), "the call never reached the model"
        stopping.start()
        refused: list[grpc.RpcError] = []

        def refused_by_the_drain() -> bool:
            try:
                harness.stub.Classify(request, timeout=5)
            except grpc.RpcError as err:
                refused.append(err)
                return True
            return False

        wait_for(refused_by_the_drain, "a new call refused by the drain")
        assert refused[0].code() == grpc.StatusCode.UNAVAILABLE and refused[0].details() == DRAINING
        assert not in_flight.done() and stopping.is_alive()  # the drain is waiting for the call in flight
        release.set()
        assert in_flight.result(timeout=30).digit == 0  # the null engine's answer: finished, not cut off
        stopping.join(30)
        assert not stopping.is_alive()
        with pytest.raises(grpc.RpcError) as closed:  # after the drain: the port is gone, and says so differently
            harness.stub.Classify(request, timeout=5)
        assert closed.value.code() == grpc.StatusCode.UNAVAILABLE and closed.value.details() != DRAINING
    finally:
        release.set()
        harness.channel.close()
        if not stopping.is_alive() and stopping.ident is None:
            harness.server.stop()


def test_health_check_of_an_unknown_service_is_not_found_and_counted_as_such(guarded: Harness) -> None:
    label = 'mnist_requests_total{{code="{}",method="Check"}}'
    before = {code: guarded.metrics().get(label.format(code), 0.0) for code in ("NOT_FOUND", "INTERNAL")}
    with pytest.raises(grpc.RpcError) as err:
        guarded.health.Check(health_pb2.HealthCheckRequest(service="no.such.Service"), timeout=5)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND

    def counted() -> dict[str, float]:
        return {code: guarded.metrics().get(label.format(code), 0.0) for code in ("NOT_FOUND", "INTERNAL")}

    # the call is counted as its handler returns, which can be a moment after the client has its status
    wait_for(lambda: counted()["NOT_FOUND"] > before["NOT_FOUND"], "the refused health check to be counted", 5)
    assert counted() == {"NOT_FOUND": before["NOT_FOUND"] + 1, "INTERNAL": before["INTERNAL"]}


def test_a_health_watcher_that_never_reads_does_not_block_status_changes() -> None:
    """grpc_health's own servicer held a lock while writing: one stalled watcher froze SERVING and the drain."""

    class StalledClient:
        written = 0

        async def write(self, response) -> None:
            self.written += 1
            await asyncio.Event().wait()  # the client's window is zero: the write never completes

    async def scenario() -> None:
        service = HealthService()
        watcher = asyncio.ensure_future(service.Watch(health_pb2.HealthCheckRequest(), StalledClient()))
        await asyncio.sleep(0.01)
        await asyncio.wait_for(service.set("", health_pb2.HealthCheckResponse.NOT_SERVING), 1)
        await asyncio.wait_for(service.enter_graceful_shutdown(), 1)
        watcher.cancel()
        with pytest.raises(asyncio.CancelledError):
            await watcher

    asyncio.run(scenario())


def test_a_health_watcher_hears_every_change_of_its_service() -> None:
    class Recorder:
        def __init__(self) -> None:
            self.statuses: list[int] = []

        async def write(self, response) -> None:
            self.statuses.append(response.status)

    async def scenario() -> list[int]:
        service = HealthService()
        client = Recorder()
        watcher = asyncio.ensure_future(service.Watch(health_pb2.HealthCheckRequest(service="svc"), client))
        await asyncio.sleep(0.01)
        for status in (health_pb2.HealthCheckResponse.NOT_SERVING, health_pb2.HealthCheckResponse.SERVING):
            await service.set("svc", status)
            await asyncio.sleep(0.01)
        await service.enter_graceful_shutdown()
        await asyncio.sleep(0.01)
        watcher.cancel()
        return client.statuses

    statuses = asyncio.run(scenario())
    response = health_pb2.HealthCheckResponse
    assert statuses == [response.SERVICE_UNKNOWN, response.NOT_SERVING, response.SERVING, response.NOT_SERVING]
