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
    silence = threading.Event()

    def nothing() -> Iterator[bytes]:
        silence.wait(10)
        return
        yield b""

    started = time.monotonic()
    with pytest.raises(grpc.RpcError) as err:
        list(call(nothing(), timeout=10))
    silence.set()
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE and "without a request" in err.value.details()
    assert time.monotonic() - started < 5


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
    time.sleep(0.2)
    after = {code: guarded.metrics().get(label.format(code), 0.0) for code in ("DEADLINE_EXCEEDED", "CANCELLED")}
    assert after["DEADLINE_EXCEEDED"] == before["DEADLINE_EXCEEDED"] + 1
    assert after["CANCELLED"] == before["CANCELLED"]


def test_calls_during_shutdown_are_unavailable_never_cancelled() -> None:
    server = MnistServer(test_config(backend="null", digit_detector="none", drain_seconds=0.3, grace_seconds=1)).start()
    channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
    classify = channel.unary_unary(
        "/mnist.v1.Classifier/Classify",
        request_serializer=pb.ClassifyRequest.SerializeToString,
        response_deserializer=pb.ClassifyResponse.FromString,
    )
    codes: list[grpc.StatusCode] = []
    done = threading.Event()

    def client() -> None:
        while not done.is_set():
            try:
                classify(pb.ClassifyRequest(raw=RAW_DIGIT), timeout=2)
                codes.append(grpc.StatusCode.OK)
            except grpc.RpcError as err:
                codes.append(err.code())

    threads = [threading.Thread(target=client) for _ in range(4)]
    for thread in threads:
        thread.start()
    time.sleep(0.3)
    server.stop()
    time.sleep(0.3)
    done.set()
    for thread in threads:
        thread.join(10)
    channel.close()
    assert grpc.StatusCode.OK in codes
    assert set(codes) <= {grpc.StatusCode.OK, grpc.StatusCode.UNAVAILABLE}, set(codes)
    assert grpc.StatusCode.UNAVAILABLE in codes


def test_health_check_of_an_unknown_service_is_not_found_and_counted_as_such(guarded: Harness) -> None:
    label = 'mnist_requests_total{{code="{}",method="Check"}}'
    before = {code: guarded.metrics().get(label.format(code), 0.0) for code in ("NOT_FOUND", "INTERNAL")}
    with pytest.raises(grpc.RpcError) as err:
        guarded.health.Check(health_pb2.HealthCheckRequest(service="no.such.Service"), timeout=5)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    after = {code: guarded.metrics().get(label.format(code), 0.0) for code in ("NOT_FOUND", "INTERNAL")}
    assert after == {"NOT_FOUND": before["NOT_FOUND"] + 1, "INTERNAL": before["INTERNAL"]}


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
