"""The Open Inference Protocol (KServe v2) over gRPC and REST: same answers as mnist.v1, the protocol's conventions."""

from __future__ import annotations

import io
import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from PIL import Image

from proto.contract import MNIST_NORMALIZATION
from proto.inference import grpc_service_pb2 as oip
from proto.inference import grpc_service_pb2_grpc as oip_grpc
from proto.mnist.v1 import classifier_pb2 as pb
from server.app import MnistServer
from server.config import DIGIT_DETECTOR
from server.pipeline.digit_detector import DigitDetector
from tests.support import Harness, free_port, test_config
from training.data import load_split

MODEL = "googlenet-fast"
SAMPLES = Path(__file__).resolve().parents[1] / "server" / "samples"


@pytest.fixture(scope="module")
def served() -> Iterator[Harness]:
    harness = Harness(MnistServer(test_config(http_port=free_port())).start())
    harness.oip = oip_grpc.GRPCInferenceServiceStub(harness.channel)
    yield harness
    harness.close()


@pytest.fixture(scope="module")
def digits(mnist_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    test = load_split("test", mnist_dir)
    return test.images[:16], test.labels[:16]


def infer_request(images: np.ndarray, datatype: str = "UINT8", **fields) -> oip.ModelInferRequest:
    request = oip.ModelInferRequest(**{"model_name": MODEL, **fields})
    request.inputs.add(name="image", datatype=datatype, shape=images.shape)
    request.raw_input_contents.append(images.tobytes())
    return request


def outputs(response: oip.ModelInferResponse) -> dict[str, np.ndarray]:
    dtypes = {"FP32": "<f4", "INT64": "<i8"}
    return {
        o.name: np.frombuffer(raw, dtypes[o.datatype]).reshape(o.shape)
        for o, raw in zip(response.outputs, response.raw_output_contents, strict=True)
    }


def rest(served: Harness, path: str, body: bytes | dict | None = None, headers: dict | None = None):
    """(status, headers, body bytes) of a REST call; errors are answers too."""
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    request = urllib.request.Request(f"http://127.0.0.1:{served.server.http_port}{path}", data, headers or {})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.headers, response.read()
    except urllib.error.HTTPError as err:
        return err.code, err.headers, err.read()


def png(image: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(image).save(out, "PNG")
    return out.getvalue()


# --- gRPC: inference.GRPCInferenceService on the mnist.v1 port ---------------------------------------


def test_health_and_metadata_describe_the_served_model(served: Harness) -> None:
    assert served.oip.ServerLive(oip.ServerLiveRequest()).live
    assert served.oip.ServerReady(oip.ServerReadyRequest()).ready
    assert served.oip.ModelReady(oip.ModelReadyRequest(name=MODEL)).ready
    assert not served.oip.ModelReady(oip.ModelReadyRequest(name="resnet")).ready
    meta = served.oip.ModelMetadata(oip.ModelMetadataRequest(name=MODEL))
    assert meta.platform == "onnxruntime_onnx" and len(meta.versions) == 1
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.inputs] == [("image", "FP32", [-1, 1, 28, 28])]
    assert [(t.name, t.datatype) for t in meta.outputs] == [("probabilities", "FP32"), ("digit", "INT64")]
    server = served.oip.ServerMetadata(oip.ServerMetadataRequest())
    assert server.name == "mnist-googlenet-service" and "model_configuration" in server.extensions


def test_triton_model_config_lets_perf_analyzer_size_its_batches(served: Harness) -> None:
    config = served.oip.ModelConfig(oip.ModelConfigRequest(name=MODEL)).config
    assert config.name == MODEL and config.platform == "onnxruntime_onnx" and config.max_batch_size >= 1
    assert [(i.name, list(i.dims)) for i in config.input] == [("image", [1, 28, 28])]
    assert [(o.name, list(o.dims)) for o in config.output] == [("probabilities", [10]), ("digit", [1])]


def test_the_model_config_says_where_the_digit_score_comes_from(served: Harness) -> None:
    parameters = served.oip.ModelConfig(oip.ModelConfigRequest(name=MODEL)).config.parameters
    assert parameters["digit_score_source"].string_value == "in-graph"  # the bundled model's own output
    bundled = DigitDetector.load(DIGIT_DETECTOR)  # the model carries the bundled detector's threshold
    assert float(parameters["digit_score_threshold"].string_value) == pytest.approx(bundled.threshold, abs=1e-6)
    assert parameters["digit_score"].string_value.startswith("in-graph, output 'digit_score' of googlenet-fast.onnx")
    status, _, body = rest(served, f"/v2/models/{MODEL}/config")
    assert status == 200 and json.loads(body)["parameters"]["digit_score_source"]["string_value"] == "in-graph"


def test_raw_pixels_get_the_same_answers_as_mnist_v1(served: Harness, digits) -> None:
    images, labels = digits
    response = served.oip.ModelInfer(infer_request(images, id="req-1"), timeout=10)
    got = outputs(response)
    batch = pb.ClassifyBatchRequest(requests=[pb.ClassifyRequest(raw=image.tobytes()) for image in images])
    v1 = served.stub.ClassifyBatch(batch, timeout=10).responses
    assert response.id == "req-1" and response.model_name == MODEL and response.model_version == v1[0].model_version
    assert got["digit"].tolist() == [r.digit for r in v1]
    np.testing.assert_allclose(got["probabilities"], [list(r.probabilities) for r in v1], atol=1e-6)
    assert (got["digit"] == labels).mean() >= 0.9


def test_normalized_floats_in_typed_contents_match_raw_pixels(served: Harness, digits) -> None:
    images, _ = digits
    normalized = MNIST_NORMALIZATION.apply(images[:4].reshape(4, 1, 28, 28))
    request = oip.ModelInferRequest(model_name=MODEL)
    tensor = request.inputs.add(name="image", datatype="FP32", shape=[4, 1, 28, 28])
    tensor.contents.fp32_contents.extend(normalized.reshape(-1).tolist())
    as_floats = outputs(served.oip.ModelInfer(request, timeout=10))
    as_pixels = outputs(served.oip.ModelInfer(infer_request(images[:4]), timeout=10))
    assert as_floats["digit"].tolist() == as_pixels["digit"].tolist()
    np.testing.assert_allclose(as_floats["probabilities"], as_pixels["probabilities"], atol=1e-5)


def test_encoded_images_as_bytes_are_prepared_as_mnist_v1_does(served: Harness) -> None:
    seven = (SAMPLES / "seven.png").read_bytes()
    request = oip.ModelInferRequest(model_name=MODEL)
    request.inputs.add(name="image", datatype="BYTES", shape=[1]).contents.bytes_contents.append(seven)
    got = outputs(served.oip.ModelInfer(request, timeout=10))
    v1 = served.stub.Classify(pb.ClassifyRequest(encoded=seven), timeout=10)
    assert got["digit"].tolist() == [v1.digit] == [7]


def test_only_the_requested_outputs_come_back(served: Harness, digits) -> None:
    request = infer_request(digits[0][:2])
    request.outputs.add(name="digit")
    response = served.oip.ModelInfer(request, timeout=10)
    assert [o.name for o in response.outputs] == ["digit"] and list(response.outputs[0].shape) == [2]


@pytest.mark.parametrize(
    ("mutate", "code", "words"),
    [
        (lambda r: setattr(r, "model_name", "resnet"), grpc.StatusCode.NOT_FOUND, "serves 'googlenet-fast'"),
        (lambda r: setattr(r, "model_version", "7"), grpc.StatusCode.NOT_FOUND, "no version '7'"),
        (lambda r: r.inputs[0].ClearField("shape") or r.inputs[0].shape.extend([1, 784]), None, "shape [1, 784]"),
        (lambda r: setattr(r.inputs[0], "name", "pixels"), None, "unknown input 'pixels'"),
        (lambda r: setattr(r.inputs[0], "datatype", "INT8"), None, "not INT8"),
        (lambda r: r.outputs.add(name="logits"), None, "unknown output 'logits'"),
        (lambda r: r.raw_input_contents.__setitem__(0, b"\x01" * 100), None, "100 bytes of data"),
    ],
)
def test_bad_requests_are_refused_with_the_protocols_codes_and_say_why(served, digits, mutate, code, words) -> None:
    request = infer_request(digits[0][:1])
    mutate(request)
    with pytest.raises(grpc.RpcError) as error:
        served.oip.ModelInfer(request, timeout=10)
    assert error.value.code() == (code or grpc.StatusCode.INVALID_ARGUMENT)
    assert words in error.value.details()


def test_unnormalized_floats_are_refused_with_the_formula(served: Harness, digits) -> None:
    request = infer_request(digits[0][:1].astype(np.float32).reshape(1, 1, 28, 28), datatype="FP32")
    with pytest.raises(grpc.RpcError) as error:
        served.oip.ModelInfer(request, timeout=10)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "normalized" in error.value.details() and "UINT8" in error.value.details()


def test_what_the_server_does_not_offer_is_unimplemented_not_broken(served: Harness) -> None:
    register = oip.SystemSharedMemoryRegisterRequest(name="r", key="/k", byte_size=4)
    with pytest.raises(grpc.RpcError) as error:
        served.oip.SystemSharedMemoryRegister(register, timeout=5)
    assert error.value.code() == grpc.StatusCode.UNIMPLEMENTED and "shared-memory" in error.value.details()
    assert not served.oip.SystemSharedMemoryStatus(oip.SystemSharedMemoryStatusRequest(), timeout=5).regions
    index = served.oip.RepositoryIndex(oip.RepositoryIndexRequest(), timeout=5)
    assert [(m.name, m.state) for m in index.models] == [(MODEL, "READY")]


def test_statistics_count_requests_and_images(served: Harness, digits) -> None:
    def stats():
        return served.oip.ModelStatistics(oip.ModelStatisticsRequest(name=MODEL), timeout=5).model_stats[0]

    before = stats()
    served.oip.ModelInfer(infer_request(digits[0][:3]), timeout=10)
    after = stats()
    assert after.inference_count - before.inference_count == 3
    assert after.execution_count - before.execution_count == 1
    assert after.inference_stats.success.ns > before.inference_stats.success.ns


def test_statistics_count_every_protocols_traffic_not_only_the_inference_protocols(served: Harness, digits) -> None:
    """One data plane under every transport: mnist.v1 calls and ReadDigits show in the statistics too."""

    def stats():
        return served.oip.ModelStatistics(oip.ModelStatisticsRequest(name=MODEL), timeout=5).model_stats[0]

    images = digits[0]
    seven = (SAMPLES / "seven.png").read_bytes()
    before = stats()
    served.stub.Classify(pb.ClassifyRequest(raw=images[0].tobytes()), timeout=10)
    served.stub.Classify(pb.ClassifyRequest(encoded=seven), timeout=10)
    raw_batch = pb.ClassifyBatchRequest(requests=[pb.ClassifyRequest(raw=image.tobytes()) for image in images[:4]])
    served.stub.ClassifyBatch(raw_batch, timeout=10)
    mixed = pb.ClassifyBatchRequest(
        requests=[pb.ClassifyRequest(raw=images[0].tobytes()), pb.ClassifyRequest(encoded=seven)]
    )
    served.stub.ClassifyBatch(mixed, timeout=10)
    served.stub.ReadDigits(pb.ReadDigitsRequest(image=seven), timeout=30)
    assert rest(served, f"/v2/models/{MODEL}/read", seven)[0] == 200
    with pytest.raises(grpc.RpcError) as refused:  # decoded, then refused: a failure of this model
        served.stub.Classify(pb.ClassifyRequest(encoded=b"not an image"), timeout=10)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    after = stats()
    assert after.execution_count - before.execution_count == 6
    assert after.inference_count - before.inference_count == 1 + 1 + 4 + 2 + 1 + 1
    assert after.inference_stats.success.count - before.inference_stats.success.count == 6
    assert after.inference_stats.fail.count - before.inference_stats.fail.count == 1


def test_a_stream_answers_each_request_in_order_and_survives_a_bad_one(served: Harness, digits) -> None:
    good = infer_request(digits[0][:1], id="a")
    bad = infer_request(digits[0][:1], id="b", model_name="nope")
    answers = list(served.oip.ModelStreamInfer(iter([good, bad, good]), timeout=10))
    assert [a.infer_response.id for a in answers] == ["a", "", "a"]
    assert "no model named 'nope'" in answers[1].error_message


def test_grpc_calls_of_the_protocol_are_counted_like_every_other(served: Harness, digits) -> None:
    served.oip.ModelInfer(infer_request(digits[0][:1]), timeout=10)
    assert served.metrics()['mnist_requests_total{code="OK",method="ModelInfer"}'] >= 1


# --- REST: /v2 on its own port -------------------------------------------------------------------------


def test_rest_health_and_metadata(served: Harness) -> None:
    assert rest(served, "/v2/health/live")[0] == 200
    status, _, body = rest(served, "/v2/health/ready")
    assert status == 200 and json.loads(body) == {"ready": True}
    assert json.loads(rest(served, f"/v2/models/{MODEL}")[2])["inputs"][0]["name"] == "image"
    assert rest(served, f"/v2/models/{MODEL}/ready")[0] == 200
    assert rest(served, "/v2/models/resnet/ready")[0] == 400
    assert json.loads(rest(served, f"/v2/models/{MODEL}/config")[2])["max_batch_size"] >= 1


def test_rest_json_inference_matches_grpc(served: Harness, digits) -> None:
    images = digits[0][:2]
    tensor = {"name": "image", "datatype": "UINT8", "shape": [2, 28, 28], "data": images.tolist()}
    body = {"id": "x", "inputs": [tensor]}
    status, headers, raw = rest(served, f"/v2/models/{MODEL}/infer", body)
    assert status == 200 and headers["Content-Type"].startswith("application/json")
    answer = json.loads(raw)
    assert answer["id"] == "x" and answer["model_name"] == MODEL
    by_name = {o["name"]: o for o in answer["outputs"]}
    grpc_answer = outputs(served.oip.ModelInfer(infer_request(images), timeout=10))
    assert by_name["digit"]["data"] == grpc_answer["digit"].tolist() and by_name["digit"]["shape"] == [2]
    np.testing.assert_allclose(
        np.reshape(by_name["probabilities"]["data"], (2, 10)), grpc_answer["probabilities"], atol=1e-6
    )


def test_rest_binary_tensors_in_and_out(served: Harness, digits) -> None:
    """The binary tensor data extension, as tritonclient sends it: a JSON header, then raw bytes."""
    images = digits[0][:3]
    header = json.dumps(
        {
            "inputs": [
                {"name": "image", "datatype": "UINT8", "shape": [3, 28, 28], "parameters": {"binary_data_size": 2352}}
            ],
            "parameters": {"binary_data_output": True},
        }
    ).encode()
    headers = {"Inference-Header-Content-Length": str(len(header)), "Content-Type": "application/octet-stream"}
    status, response_headers, raw = rest(served, f"/v2/models/{MODEL}/infer", header + images.tobytes(), headers)
    assert status == 200
    length = int(response_headers["Inference-Header-Content-Length"])
    answer, blob = json.loads(raw[:length]), raw[length:]
    sizes = [o["parameters"]["binary_data_size"] for o in answer["outputs"]]
    assert sizes == [3 * 10 * 4, 3 * 8] and len(blob) == sum(sizes)
    assert (
        np.frombuffer(blob[sizes[0] :], "<i8").tolist()
        == outputs(served.oip.ModelInfer(infer_request(images), timeout=10))["digit"].tolist()
    )


def test_rest_accepts_an_encoded_image_as_the_web_page_sends_it(served: Harness) -> None:
    seven = (SAMPLES / "seven.png").read_bytes()
    element = len(seven).to_bytes(4, "little") + seven
    tensor = {"name": "image", "datatype": "BYTES", "shape": [1], "parameters": {"binary_data_size": len(element)}}
    header = json.dumps({"inputs": [tensor]}).encode()
    status, _, raw = rest(
        served, f"/v2/models/{MODEL}/infer", header + element, {"Inference-Header-Content-Length": str(len(header))}
    )
    assert status == 200
    assert {o["name"]: o["data"] for o in json.loads(raw)["outputs"]}["digit"] == [7]


@pytest.mark.parametrize(
    ("path", "body", "status", "words"),
    [
        (f"/v2/models/{MODEL}/infer", b"not json", 400, "not JSON"),
        (f"/v2/models/{MODEL}/infer", {"inputs": "x"}, 400, '"inputs" list'),
        ("/v2/models/resnet/infer", {"inputs": []}, 404, "serves 'googlenet-fast'"),
        (
            f"/v2/models/{MODEL}/infer",
            {"inputs": [{"name": "image", "datatype": "UINT8", "shape": [1, 28, 28]}]},
            400,
            "neither data nor binary_data_size",
        ),  # fmt: skip
        (
            f"/v2/models/{MODEL}/infer",
            {"inputs": [{"name": "image", "datatype": "UINT8", "shape": [1, 28, 28], "data": [0] * 784}]},
            400,
            "blank",
        ),
        ("/v2/nothing", None, 404, "no such endpoint"),
    ],
)
def test_rest_errors_are_json_with_the_right_status(served: Harness, path, body, status, words) -> None:
    got, headers, raw = rest(served, path, body)
    assert got == status and headers["Content-Type"].startswith("application/json")
    assert words in json.loads(raw)["error"]


def test_rest_calls_are_counted_by_method_and_code(served: Harness) -> None:
    rest(served, "/v2/models/resnet/infer", {"inputs": []})
    assert served.metrics()['mnist_requests_total{code="NOT_FOUND",method="http:ModelInfer"}'] >= 1


def test_the_web_page_is_served_at_the_root_and_uses_only_the_rest_api(served: Harness) -> None:
    status, headers, raw = rest(served, "/")
    page = raw.decode()
    assert status == 200 and headers["Content-Type"].startswith("text/html")
    assert "/v2/models/" in page and "/infer" in page and "canvas" in page
    assert "mnist.v1" not in page.replace("mnist.v1's", "")  # the page speaks the protocol, nothing private


# --- traces: both transports join the caller's trace ------------------------------------------------


def test_rest_and_grpc_inference_join_the_callers_trace_with_queue_and_inference_children(served, digits) -> None:
    from opentelemetry.trace import SpanKind

    from tests.support import PARENT_ID, TRACE_ID, TRACEPARENT, Traces

    traces = Traces()
    try:
        tensor = {"name": "image", "datatype": "UINT8", "shape": [1, 28, 28], "data": digits[0][:1].tolist()}
        assert rest(served, f"/v2/models/{MODEL}/infer", {"inputs": [tensor]}, {"traceparent": TRACEPARENT})[0] == 200
        served.oip.ModelInfer(infer_request(digits[0][:1]), metadata=(("traceparent", TRACEPARENT),), timeout=10)
        calls = {span.name: span for span in traces.spans() if span.kind == SpanKind.SERVER}
    finally:
        traces.tracing.shutdown()
    http_call = calls["POST /v2/models/{name}/infer"]
    grpc_call = calls["inference.GRPCInferenceService/ModelInfer"]
    for call in (http_call, grpc_call):
        assert format(call.context.trace_id, "032x") == TRACE_ID and format(call.parent.span_id, "016x") == PARENT_ID
        assert set(traces.children(call)) >= {"queue wait", "inference"}
    assert http_call.attributes["http.response.status_code"] == 200


# --- what a careless client sends over REST: always a 400 naming the problem, never a 500 ------------------


def seven_tensor(**overrides) -> dict:
    return {"name": "image", "datatype": "UINT8", "shape": [1, 28, 28], "data": [0] * 700 + [255] * 84, **overrides}


@pytest.mark.parametrize(
    ("body", "words"),
    [
        ({"inputs": [seven_tensor(parameters=[1])]}, "parameters must be an object"),
        ({"inputs": [seven_tensor()], "parameters": [1]}, '"parameters" must be an object'),
        ({"inputs": [seven_tensor()], "outputs": [{"name": "digit", "parameters": [1]}]}, "must be an object"),
        ({"inputs": [seven_tensor()], "outputs": [{"name": [1]}]}, "objects with a name"),
        ({"inputs": [seven_tensor(datatype=[1])]}, "unknown datatype"),
        ({"inputs": [seven_tensor(shape=[10**30, 28, 28])]}, "far more than any request"),
        ({"inputs": [seven_tensor(shape=[True, 28, 28])]}, "non-negative whole numbers"),
        ({"inputs": [seven_tensor()], "parameters": {"timeout": float("nan")}}, "timeout"),
        ({"inputs": [seven_tensor()], "parameters": {"binary_data_output": "false"}}, "true or false"),
        ({"inputs": [seven_tensor()], "outputs": [{"name": "digit"}, {"name": "digit"}]}, "more than once"),
        ({"inputs": [seven_tensor(data=[0.5] * 784)]}, "not a list of UINT8 numbers"),
        ({"inputs": [seven_tensor(data=[300] * 784)]}, "must lie in 0..255"),
        ({"inputs": [seven_tensor()], "id": 7}, '"id" must be a string'),
    ],
)
def test_malformed_rest_requests_are_400_naming_what_is_wrong(served: Harness, body: dict, words: str) -> None:
    text = json.dumps(body)  # NaN is written as NaN, which Python's json (the server's) reads back
    status, _, raw = rest(served, f"/v2/models/{MODEL}/infer", text.encode(), {"Content-Type": "application/json"})
    assert status == 400, raw
    assert words in json.loads(raw)["error"]


def test_grpc_uint8_contents_out_of_range_are_refused_not_wrapped(served: Harness) -> None:
    request = oip.ModelInferRequest(model_name=MODEL)
    request.inputs.add(name="image", datatype="UINT8", shape=[1, 28, 28]).contents.uint_contents.extend([300] * 784)
    with pytest.raises(grpc.RpcError) as error:
        served.oip.ModelInfer(request, timeout=10)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "0..255" in error.value.details()


def test_the_response_names_the_model_that_answered_even_when_the_request_named_none(served: Harness, digits) -> None:
    request = infer_request(digits[0][:1])
    request.model_name = ""
    assert served.oip.ModelInfer(request, timeout=10).model_name == MODEL


def test_at_shutdown_rest_answers_503_before_its_listener_closes(digits) -> None:
    """As gRPC answers UNAVAILABLE: a REST client is told to go elsewhere, not reset mid-connection."""
    import threading

    server = MnistServer(test_config(http_port=free_port(), drain_seconds=0.3, grace_seconds=2))
    harness = Harness(server.start())
    body = {"inputs": [{"name": "image", "datatype": "UINT8", "shape": [1, 28, 28], "data": digits[0][0].tolist()}]}
    seen: list[int | str] = []
    stopping = threading.Thread(target=harness.close)
    stopping.start()
    while stopping.is_alive() and len(seen) < 500:
        try:
            seen.append(rest(harness, f"/v2/models/{MODEL}/infer", body)[0])
        except OSError as err:  # the listener has closed: the server is gone
            seen.append(type(err).__name__)
            break
    stopping.join(15)
    answered = [s for s in seen if isinstance(s, int)]
    assert set(answered) <= {200, 503} and 503 in answered, seen
    assert answered == sorted(answered)  # served until shutdown began, then only 503
