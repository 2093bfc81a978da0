"""OpenTelemetry traces: a span per call, continuing the caller's W3C traceparent, with preprocess, queue wait and
inference children; off by default; exported over OTLP/gRPC when --otlp-endpoint is set.

A real server on free localhost ports, the null engine on its runner thread with 2 ms of emulated device time per
batch (so inference takes time, as a model does); spans read from an in-memory exporter installed per test.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.trace import StatusCode

from proto.mnist.v1 import classifier_pb2 as pb
from server import tracing
from server.app import MnistServer
from server.config import ServeConfig, build_parser, load_config
from server.tracing import Tracing
from tests.support import PARENT_ID, TRACE_ID, TRACEPARENT, Harness, Traces, free_port, test_config

DEVICE_MS = 2.0
IMAGE = np.random.default_rng(0).integers(0, 256, 784, dtype=np.uint8).tobytes()


@pytest.fixture(scope="module")
def served() -> Iterator[Harness]:
    config = test_config(backend="null-threaded", null_device_ms=f"{DEVICE_MS:g}+0", digit_detector="none")
    harness = Harness(MnistServer(config).start())
    yield harness
    harness.close()


@pytest.fixture
def traces() -> Iterator[Traces]:
    installed = Traces()
    yield installed
    installed.tracing.shutdown()


def classify(harness: Harness, raw: bytes = IMAGE, metadata: tuple = ()) -> pb.ClassifyResponse:
    return harness.stub.Classify(pb.ClassifyRequest(raw=raw), metadata=metadata, timeout=10)


def only(spans: list[ReadableSpan]) -> ReadableSpan:
    assert len(spans) == 1, [s.name for s in spans]
    return spans[0]


def test_a_call_with_a_traceparent_is_a_server_span_in_the_callers_trace(served: Harness, traces: Traces) -> None:
    classify(served, metadata=(("traceparent", TRACEPARENT), ("tracestate", "vendor=value")))

    call = only(traces.call_spans())
    assert call.name == "mnist.v1.Classifier/Classify"
    assert format(call.context.trace_id, "032x") == TRACE_ID
    assert format(call.parent.span_id, "016x") == PARENT_ID and call.parent.is_remote
    assert call.context.trace_state.get("vendor") == "value"
    assert call.attributes["rpc.system"] == "grpc"
    assert call.attributes["rpc.service"] == "mnist.v1.Classifier"
    assert call.attributes["rpc.method"] == "Classify"
    assert call.attributes["rpc.grpc.status_code"] == grpc.StatusCode.OK.value[0]
    assert call.attributes["mnist.images"] == 1
    assert call.status.status_code == StatusCode.UNSET
    assert call.resource.attributes["service.name"] == "mnist-serve"


def test_preprocess_queue_wait_and_inference_are_children_in_order_within_the_call(
    served: Harness, traces: Traces
) -> None:
    classify(served, metadata=(("traceparent", TRACEPARENT),))

    call = only(traces.call_spans())
    children = traces.children(call)
    assert set(children) == {"preprocess", "queue wait", "inference"}
    preprocess, queued, inference = children["preprocess"], children["queue wait"], children["inference"]
    for child in children.values():
        assert child.context.trace_id == call.context.trace_id
        assert call.start_time <= child.start_time <= child.end_time <= call.end_time, child.name
    assert preprocess.end_time <= queued.start_time  # the job is queued once its images are ready
    assert queued.end_time == inference.start_time  # the wait ends when its batch starts running
    assert inference.end_time - inference.start_time >= DEVICE_MS * 1e6  # the run, emulated device time included
    assert inference.attributes["mnist.batch.images"] >= 1
    assert preprocess.attributes["mnist.images"] == 1


def test_a_batch_call_is_named_for_its_method_and_counts_its_images(served: Harness, traces: Traces) -> None:
    request = pb.ClassifyBatchRequest(requests=[pb.ClassifyRequest(raw=IMAGE) for _ in range(3)])
    served.stub.ClassifyBatch(request, timeout=10)

    call = only(traces.call_spans())
    assert call.name == "mnist.v1.Classifier/ClassifyBatch"
    assert call.attributes["mnist.images"] == 3
    assert set(traces.children(call)) == {"preprocess", "queue wait", "inference"}


def test_a_call_without_a_traceparent_starts_a_new_trace(served: Harness, traces: Traces) -> None:
    classify(served)
    classify(served, metadata=(("traceparent", "00-not-a-valid-header-01"),))  # malformed: ignored

    first, second = traces.call_spans()
    for call in (first, second):
        assert call.parent is None
        assert format(call.context.trace_id, "032x") != TRACE_ID
    assert first.context.trace_id != second.context.trace_id


def test_a_failing_call_has_an_error_status_and_its_grpc_code(served: Harness, traces: Traces) -> None:
    with pytest.raises(grpc.RpcError) as failure:
        classify(served, raw=b"\x00" * 10, metadata=(("traceparent", TRACEPARENT),))
    assert failure.value.code() == grpc.StatusCode.INVALID_ARGUMENT

    call = only(traces.call_spans())
    assert call.status.status_code == StatusCode.ERROR
    assert call.status.description.startswith("INVALID_ARGUMENT: ")
    assert call.attributes["rpc.grpc.status_code"] == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    children = traces.children(call)
    assert set(children) == {"preprocess"}  # refused there: never queued, never run
    assert children["preprocess"].status.status_code == StatusCode.ERROR


def test_every_unary_method_of_every_service_is_traced(served: Harness, traces: Traces) -> None:
    served.stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=10)
    served.health_status()

    assert {span.name for span in traces.call_spans()} == {
        "mnist.v1.Classifier/GetModelInfo",
        "grpc.health.v1.Health/Check",
    }


def test_new_traces_follow_the_sample_ratio_and_a_callers_decision_is_kept(served: Harness) -> None:
    never = Traces(sample_ratio=0.0)
    try:
        classify(served)  # a new trace: not sampled at ratio 0
        classify(served, metadata=(("traceparent", TRACEPARENT),))  # the caller sampled it (flags 01): recorded
        classify(served, metadata=(("traceparent", f"00-{TRACE_ID}-{PARENT_ID}-00"),))  # the caller did not
        call = only(never.call_spans())
        assert format(call.context.trace_id, "032x") == TRACE_ID and call.context.trace_flags.sampled
        assert set(never.children(call)) == {"preprocess", "queue wait", "inference"}
    finally:
        never.tracing.shutdown()


def test_tracing_is_off_by_default_and_a_call_creates_no_span(served: Harness, monkeypatch: pytest.MonkeyPatch) -> None:
    assert ServeConfig().otlp_endpoint == ""
    assert Tracing.from_config(ServeConfig()) is None
    assert tracing.enabled is False

    def no_tracing(*args, **kwargs):
        raise AssertionError("an OpenTelemetry call with tracing off")

    for name in ("start_server_span", "preprocess_span", "record_job"):
        monkeypatch.setattr(tracing, name, no_tracing)
    assert classify(served).digit == 0  # the null engine's fixed answer
    served.stub.ClassifyBatch(pb.ClassifyBatchRequest(requests=[pb.ClassifyRequest(raw=IMAGE)]), timeout=10)


def test_http_headers_start_a_server_span_for_another_transport(traces: Traces) -> None:
    headers = {"Traceparent": TRACEPARENT, "Content-Type": "application/json"}  # any spelling of the name
    with tracing.server_span("POST /v2/models/mnist/infer", headers, {"http.request.method": "POST"}) as span:
        span.set_attribute("http.response.status_code", 200)
    with pytest.raises(ValueError), tracing.server_span("POST /v2/models/mnist/infer", {}) as span:
        raise ValueError("bad tensor")

    ok, failed = traces.call_spans()
    assert format(ok.context.trace_id, "032x") == TRACE_ID and format(ok.parent.span_id, "016x") == PARENT_ID
    assert ok.attributes["http.response.status_code"] == 200 and ok.status.status_code == StatusCode.UNSET
    assert failed.parent is None
    assert failed.status.status_code == StatusCode.ERROR and failed.status.description == "ValueError: bad tensor"


def test_with_tracing_off_a_server_span_block_is_a_no_op() -> None:
    with tracing.server_span("POST /v2/models/mnist/infer", {"traceparent": TRACEPARENT}) as span:
        span.set_attribute("http.response.status_code", 200)
    assert span is tracing.NO_SPAN


class Collector(trace_service_pb2_grpc.TraceServiceServicer):
    """A stand-in OTLP collector: keeps every span name and the resource's service.name it was sent."""

    def __init__(self) -> None:
        self.received: list[tuple[str, str]] = []
        self.lock = threading.Lock()

    def Export(self, request, context):  # noqa: N802 - the OTLP service's method name
        with self.lock:
            for resource_spans in request.resource_spans:
                service = next(
                    a.value.string_value for a in resource_spans.resource.attributes if a.key == "service.name"
                )
                for scope in resource_spans.scope_spans:
                    self.received += [(service, span.name) for span in scope.spans]
        return trace_service_pb2.ExportTraceServiceResponse()


def test_with_an_otlp_endpoint_spans_reach_the_collector_by_the_time_the_server_stops() -> None:
    collector, port = Collector(), free_port()
    receiver = grpc.server(ThreadPoolExecutor(2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(collector, receiver)
    receiver.add_insecure_port(f"127.0.0.1:{port}")
    receiver.start()
    try:
        server = MnistServer(test_config(backend="null", otlp_endpoint=f"http://127.0.0.1:{port}")).start()
        harness = Harness(server)
        try:
            assert tracing.enabled
            classify(harness)
        finally:
            harness.close()
        assert not tracing.enabled  # stopped: off again, the last spans flushed
        assert ("mnist-serve", "mnist.v1.Classifier/Classify") in collector.received
        assert {name for _, name in collector.received} >= {"preprocess", "queue wait", "inference"}
    finally:
        receiver.stop(0)


def test_the_tracing_flags_are_documented_and_checked() -> None:
    help_text = build_parser().format_help()
    assert "--otlp-endpoint" in help_text and "--trace-sample-ratio" in help_text
    config = load_config(["--otlp-endpoint", "http://collector:4317", "--trace-sample-ratio", "0.25"], environ={})
    assert (config.otlp_endpoint, config.trace_sample_ratio) == ("http://collector:4317", 0.25)
    for flags, problem in (
        (["--trace-sample-ratio", "1.5"], "trace_sample_ratio must be between 0 and 1"),
        (["--otlp-endpoint", "collector:4317"], "otlp_endpoint must look like http://HOST:PORT"),
    ):
        with pytest.raises(SystemExit, match=problem):
            load_config(flags, environ={})
