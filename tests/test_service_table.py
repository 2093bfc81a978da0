"""server.transport.service: the handler table follows the proto, each domain error has one status; the wire end
to end."""

from __future__ import annotations

import inspect
import re
from collections.abc import Iterator

import grpc
import pytest

import server.errors
from proto.mnist.v1 import classifier_pb2 as pb
from server.app import MnistServer
from server.config import DIGIT_DETECTOR
from server.errors import (
    AlreadyExists,
    AuthRefused,
    Cancelled,
    DeadlineExpired,
    InvalidInput,
    NotFound,
    NotReady,
    Overloaded,
    PermissionDenied,
    ServiceError,
    ShuttingDown,
    Unauthenticated,
    Unavailable,
    Unsupported,
)
from server.ops.metrics import ServiceMetrics
from server.pipeline.digit_detector import DigitDetector
from server.transport.service import SERVICE, ClassifierServicer, generic_handler, status_of
from tests.support import Harness, test_config

DOCUMENTED = {
    InvalidInput: grpc.StatusCode.INVALID_ARGUMENT,
    Overloaded: grpc.StatusCode.RESOURCE_EXHAUSTED,
    NotReady: grpc.StatusCode.UNAVAILABLE,
    ShuttingDown: grpc.StatusCode.UNAVAILABLE,
    Unavailable: grpc.StatusCode.UNAVAILABLE,  # another worker or replica that may hold the answer did not reply
    DeadlineExpired: grpc.StatusCode.DEADLINE_EXCEEDED,
    Cancelled: grpc.StatusCode.CANCELLED,
    AuthRefused: grpc.StatusCode.PERMISSION_DENIED,  # the base of the two below; raised only as one of them
    Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
    NotFound: grpc.StatusCode.NOT_FOUND,
    Unsupported: grpc.StatusCode.UNIMPLEMENTED,
    AlreadyExists: grpc.StatusCode.ALREADY_EXISTS,
}
HEX32 = re.compile(r"[0-9a-f]{32}")


# --- the handler table ------------------------------------------------------------------------------------

RAW_DIGIT = bytes(range(256)) * 3 + bytes(16)  # any raw image with contrast (a blank one is refused)


class WithoutModelInfo:
    async def Classify(self, request, context):  # noqa: N802 - named by the proto
        raise NotImplementedError

    async def ClassifyBatch(self, request, context):  # noqa: N802
        raise NotImplementedError


def test_a_servicer_lacking_a_method_the_proto_declares_is_refused_by_name() -> None:
    with pytest.raises(TypeError) as err:
        generic_handler(WithoutModelInfo(), SERVICE, ServiceMetrics())
    assert "mnist.v1.Classifier.GetModelInfo" in str(err.value) and "WithoutModelInfo" in str(err.value)


def test_a_method_attribute_that_is_not_callable_is_refused_too() -> None:
    servicer = WithoutModelInfo()
    servicer.GetModelInfo = "not a handler"
    with pytest.raises(TypeError, match="mnist.v1.Classifier.GetModelInfo"):
        generic_handler(servicer, SERVICE, ServiceMetrics())


def test_the_real_servicer_implements_every_method_of_the_proto() -> None:
    handler = generic_handler(ClassifierServicer(test_config()), SERVICE, ServiceMetrics())
    assert handler.service_name() == "mnist.v1.Classifier"
    assert {m.name for m in SERVICE.methods} == {
        "Classify",
        "ClassifyBatch",
        "GetModelInfo",
        "ListModels",
        "ReadDigits",
        "ReadTable",
        "ReadExpression",
        "Feedback",
    }


# --- statuses ---------------------------------------------------------------------------------------------------


def test_every_error_class_maps_to_its_documented_status() -> None:
    classes = {
        cls
        for _, cls in inspect.getmembers(server.errors, inspect.isclass)
        if issubclass(cls, ServiceError) and cls is not ServiceError
    }
    assert classes == set(DOCUMENTED)  # a new error class needs a documented status here
    for cls, code in DOCUMENTED.items():
        error = cls("message") if cls is not InvalidInput else cls("message", 3)
        assert status_of(error) == code, cls.__name__


def test_a_subclass_maps_like_its_parent_and_an_unmapped_error_is_internal() -> None:
    class BadPixel(InvalidInput):
        pass

    class QueueQuota(Overloaded):
        pass

    assert status_of(BadPixel("no")) == grpc.StatusCode.INVALID_ARGUMENT
    assert status_of(QueueQuota("no")) == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert status_of(ServiceError("unclassified")) == grpc.StatusCode.INTERNAL


# --- end to end -------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def onnx_served() -> Iterator[Harness]:
    harness = Harness(MnistServer(test_config()).start())
    yield harness
    harness.close()


@pytest.fixture(scope="module")
def null_served() -> Iterator[Harness]:
    harness = Harness(MnistServer(test_config(backend="null", max_request_images=256)).start())
    yield harness
    harness.close()


def test_model_info_of_the_cpu_server_reports_the_engine_and_its_setup(onnx_served: Harness) -> None:
    info = onnx_served.stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=10)
    assert info.backend == "onnxruntime" and info.name == "googlenet-fast"
    assert (info.precision, info.layout) == ("fp32", "NCHW")
    assert list(info.batch_buckets) == [] and info.cuda_graph is False
    assert info.device == "CPU" and info.runtime.startswith("onnxruntime")
    assert list(info.providers) == ["CPUExecutionProvider"]
    assert list(info.engine_options) == ["intra_op_spinning=on"]  # CPU threads spin as ONNX Runtime does by default


def test_model_info_says_where_the_digit_score_comes_from(onnx_served, null_served, scoreless_model) -> None:
    """The bundled model scores in its own graph, the null engine gives a fixed score, an older model file is scored
    by the separate detector file: GetModelInfo names which, with the threshold in use."""
    bundled = DigitDetector.load(DIGIT_DETECTOR)
    threshold, version = bundled.threshold, bundled.format_version
    info = onnx_served.stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=10)
    assert info.digit_detector.startswith(
        f"in-graph, output 'digit_score' of googlenet-fast.onnx (built from digit-detector.npz v{version}): "
        f"threshold {threshold:.4f}"
    )
    assert info.digit_threshold == pytest.approx(threshold, abs=1e-6)
    null_info = null_served.stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=10)
    assert null_info.digit_detector.startswith("in-graph, output 'digit_score' of null: threshold 0.5000")
    older = Harness(MnistServer(test_config(model=str(scoreless_model))).start())
    try:
        old_info = older.stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=10)
    finally:
        older.close()
    assert old_info.digit_detector.startswith(f"separate file digit-detector.npz v{version}: threshold {threshold:.4f}")
    assert old_info.digit_threshold == pytest.approx(threshold, abs=1e-6)


def test_the_null_server_answers_digit_0_with_confidence_091_for_any_image(null_served: Harness) -> None:
    for raw in (bytes(783) + b"\xff", bytes(range(256)) * 3 + bytes(16), b"\xff" * 783 + b"\x00"):
        reply = null_served.stub.Classify(pb.ClassifyRequest(raw=raw, request_id="n"), timeout=10)
        assert reply.digit == 0 and reply.confidence == pytest.approx(0.91)
        assert reply.probabilities[0] == pytest.approx(0.91) and reply.probabilities[9] == pytest.approx(0.01)
        assert reply.request_id == "n" and reply.model_version == "0"
    info = null_served.stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=10)
    assert info.name == "null" and info.backend == "null" and list(info.providers) == []


def test_a_batch_of_256_on_the_null_server_gets_256_answers_with_distinct_generated_ids(null_served: Harness) -> None:
    requests = [pb.ClassifyRequest(raw=b"\x00" + bytes([i]) * 782 + b"\xff") for i in range(256)]
    reply = null_served.stub.ClassifyBatch(pb.ClassifyBatchRequest(requests=requests), timeout=20)
    assert len(reply.responses) == 256
    ids = [r.request_id for r in reply.responses]
    assert len(set(ids)) == 256 and all(HEX32.fullmatch(rid) for rid in ids)
    assert {(r.digit, round(r.confidence, 6)) for r in reply.responses} == {(0, 0.91)}


def test_a_batch_keeps_the_ids_clients_gave_and_fills_the_rest(null_served: Harness) -> None:
    requests = [pb.ClassifyRequest(raw=RAW_DIGIT, request_id="zähler-1" if i % 3 else "") for i in range(9)]
    reply = null_served.stub.ClassifyBatch(pb.ClassifyBatchRequest(requests=requests), timeout=10)
    ids = [r.request_id for r in reply.responses]
    assert [rid for i, rid in enumerate(ids) if i % 3] == ["zähler-1"] * 6
    assert all(HEX32.fullmatch(rid) for i, rid in enumerate(ids) if i % 3 == 0) and len(set(ids)) == 4


def test_garbage_sent_to_get_model_info_is_invalid_argument_not_internal(null_served: Harness) -> None:
    call = null_served.channel.unary_unary("/mnist.v1.Classifier/GetModelInfo")
    with pytest.raises(grpc.RpcError) as err:
        call(b"\x12\xff\xff\x03truncated", timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "malformed request" in err.value.details() and "GetModelInfoRequest" in err.value.details()
    assert null_served.stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=10).name == "null"  # still serving
