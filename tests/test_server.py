"""The gRPC service end to end, against a real server on free localhost ports."""

from __future__ import annotations

import asyncio
import io
import json
import re
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2
from PIL import Image

from proto.mnist.v1 import classifier_pb2 as pb
from proto.mnist.v1 import classifier_pb2_grpc as pb_grpc
from server.app import MnistServer
from server.config import BUNDLED_MODEL
from server.engine.backends.onnxruntime_backend import OnnxRuntimeBackend
from server.models.repository import PARITY_SAMPLES
from server.transport.guards import RETRY_AFTER_KEY
from tests.support import Harness, test_config
from training.data import load_split, sha256_file

ROOT = Path(__file__).resolve().parents[1]

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
VERIFIED = len(PARITY_SAMPLES)  # images every model version reads before it takes traffic (server/models/repository.py)


@pytest.fixture(scope="module")
def served() -> Iterator[Harness]:
    harness = Harness(MnistServer(test_config()).start())
    yield harness
    harness.close()


@pytest.fixture(scope="module")
def digits(mnist_dir: Path):
    test = load_split("test", mnist_dir)
    return test.images[:64], test.labels[:64]


def png_bytes(image: Image.Image, fmt: str = "PNG", **save_args) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **save_args)
    return buffer.getvalue()


def dark_on_light_rgba_png(digit: np.ndarray) -> bytes:
    """Dark ink on a transparent background, as a drawing app exports it: alpha carries the strokes."""
    big = np.asarray(Image.fromarray(digit).resize((280, 280), Image.Resampling.BICUBIC))
    rgba = np.zeros((280, 280, 4), np.uint8)
    rgba[..., :3] = 20  # ink colour
    rgba[..., 3] = big  # opaque where the digit is
    return png_bytes(Image.fromarray(rgba, "RGBA"))


def large_photo_jpeg(digit: np.ndarray, seed: int) -> bytes:
    """A 3000x2400 'photo' of the digit on grey paper, with noise and uneven light."""
    rng = np.random.default_rng(seed)
    paper = Image.fromarray(255 - digit).resize((1500, 1500), Image.Resampling.BICUBIC)
    canvas = np.full((2400, 3000), 255, np.float32)
    canvas[300:1800, 700:2200] = np.asarray(paper, np.float32)
    canvas = canvas * 0.75 + 40 + np.linspace(-25, 25, 3000)[None, :] + rng.normal(0, 6, canvas.shape)
    return png_bytes(Image.fromarray(np.clip(canvas, 0, 255).astype(np.uint8)).convert("RGB"), "JPEG", quality=80)


# --- round trips ---------------------------------------------------------------------------------


def test_raw_digits_are_classified_with_probabilities_version_and_request_id(served: Harness, digits) -> None:
    images, labels = digits
    for i in range(10):
        reply = served.stub.Classify(pb.ClassifyRequest(raw=images[i].tobytes(), request_id=f"r{i}"), timeout=10)
        assert reply.digit == labels[i]
        assert len(reply.probabilities) == 10 and sum(reply.probabilities) == pytest.approx(1, abs=1e-4)
        assert reply.confidence == pytest.approx(max(reply.probabilities)) and reply.confidence > 0.5
        assert reply.request_id == f"r{i}"
        assert reply.model_version == served.server.pipeline.info.model_version


def test_an_empty_request_id_is_replaced_by_a_generated_one(served: Harness, digits) -> None:
    first = served.stub.Classify(pb.ClassifyRequest(raw=digits[0][0].tobytes()), timeout=10)
    second = served.stub.Classify(pb.ClassifyRequest(raw=digits[0][0].tobytes()), timeout=10)
    assert len(first.request_id) >= 16 and first.request_id != second.request_id


def test_a_dark_on_light_rgba_png_is_classified(served: Harness, digits) -> None:
    images, labels = digits
    for i in range(8):
        reply = served.stub.Classify(pb.ClassifyRequest(encoded=dark_on_light_rgba_png(images[i])), timeout=10)
        assert reply.digit == labels[i]


def test_a_large_photo_like_jpeg_is_classified(served: Harness, digits) -> None:
    images, labels = digits
    for i in range(3):
        reply = served.stub.Classify(pb.ClassifyRequest(encoded=large_photo_jpeg(images[i], i)), timeout=20)
        assert reply.digit == labels[i]


def test_a_batch_is_answered_in_order_mixing_raw_and_encoded(served: Harness, digits) -> None:
    images, labels = digits
    requests = [
        pb.ClassifyRequest(raw=images[i].tobytes(), request_id=str(i))
        if i % 2
        else pb.ClassifyRequest(encoded=png_bytes(Image.fromarray(images[i])), request_id=str(i))
        for i in range(16)
    ]
    reply = served.stub.ClassifyBatch(pb.ClassifyBatchRequest(requests=requests), timeout=10)
    assert [r.request_id for r in reply.responses] == [str(i) for i in range(16)]
    assert [r.digit for r in reply.responses] == list(labels[:16])


def test_a_batch_of_raw_images_only_gets_the_answers_the_protobuf_path_gives(served: Harness, digits) -> None:
    """Raw-only batches are read off the wire as one array (server/transport/wire.py RawBatch); a request id on one item
    sends the same batch through protobuf's parser: both must answer alike, and the first with fresh ids."""
    images, labels = digits
    raw_only = [pb.ClassifyRequest(raw=images[i].tobytes()) for i in range(16)]
    fast = served.stub.ClassifyBatch(pb.ClassifyBatchRequest(requests=raw_only), timeout=10)
    with_id = [pb.ClassifyRequest(raw=images[i].tobytes(), request_id="x" if i == 3 else "") for i in range(16)]
    parsed = served.stub.ClassifyBatch(pb.ClassifyBatchRequest(requests=with_id), timeout=10)
    assert [r.digit for r in fast.responses] == [r.digit for r in parsed.responses] == list(labels[:16])
    assert [list(r.probabilities) for r in fast.responses] == [list(r.probabilities) for r in parsed.responses]
    assert [r.digit_score for r in fast.responses] == [r.digit_score for r in parsed.responses]
    ids = [r.request_id for r in fast.responses]
    assert len(set(ids)) == 16 and all(len(rid) == 32 for rid in ids)
    assert parsed.responses[3].request_id == "x"
    blank = raw_only[:5] + [pb.ClassifyRequest(raw=bytes(784))]
    with pytest.raises(grpc.RpcError) as err:
        served.stub.ClassifyBatch(pb.ClassifyBatchRequest(requests=blank), timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and err.value.details().startswith("requests[5]: ")
    too_many = pb.ClassifyBatchRequest(requests=raw_only + raw_only[:1])
    with pytest.raises(grpc.RpcError) as err:
        served.stub.ClassifyBatch(too_many, timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "17 requests, over the maximum of 16" in str(err)


def test_model_info_describes_what_is_served(served: Harness) -> None:
    info = served.stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=10)
    assert info.name == "googlenet-fast"
    assert info.sha256 == sha256_file(BUNDLED_MODEL)
    assert list(info.providers) == ["CPUExecutionProvider"]
    measured_at_export = json.loads(BUNDLED_MODEL.with_suffix(".export.json").read_text())
    assert info.max_batch_size == 32 and info.test_accuracy == pytest.approx(
        measured_at_export["metadata"]["test_accuracy"]
    )


# --- bad input -----------------------------------------------------------------------------------


def _both_fields_on_the_wire(raw: bytes) -> bytes:
    return pb.ClassifyRequest(encoded=b"x").SerializeToString() + pb.ClassifyRequest(raw=raw).SerializeToString()


BAD_CLASSIFY = {
    "raw-not-784-bytes": (pb.ClassifyRequest(raw=b"\0" * 783), "exactly 784 bytes"),
    "neither-field": (pb.ClassifyRequest(request_id="x"), "set either 'encoded' or 'raw'"),
    "not-an-image": (pb.ClassifyRequest(encoded=b"GIF89a? certainly not"), "not an image"),
    "empty-encoded": (pb.ClassifyRequest(encoded=b""), "encoded image is empty"),
    "over-pixel-limit": (pb.ClassifyRequest(encoded=png_bytes(Image.new("L", (4000, 3000), 255))), "over the limit"),
    "blank-image": (pb.ClassifyRequest(encoded=png_bytes(Image.new("RGB", (64, 64), "white"))), "blank"),
}


@pytest.mark.parametrize("case", list(BAD_CLASSIFY))
def test_bad_input_is_invalid_argument_and_the_server_keeps_serving(served: Harness, digits, case: str) -> None:
    request, message = BAD_CLASSIFY[case]
    with pytest.raises(grpc.RpcError) as err:
        served.stub.Classify(request, timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in err.value.details()
    assert served.stub.Classify(pb.ClassifyRequest(raw=digits[0][1].tobytes()), timeout=10).digit == digits[1][1]
    assert served.health_status() == SERVING


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        out.append((n & 0x7F) | (0x80 if n > 0x7F else 0))
        n >>= 7
        if not n:
            return bytes(out)


def test_both_image_fields_on_the_wire_are_refused(served: Harness, digits) -> None:
    """Protobuf would keep only the last oneof member; the server notices both and says so."""
    both = _both_fields_on_the_wire(digits[0][0].tobytes())
    classify = served.channel.unary_unary("/mnist.v1.Classifier/Classify")
    with pytest.raises(grpc.RpcError) as err:
        classify(both, timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "both 'encoded' and 'raw'" in err.value.details()

    good = pb.ClassifyRequest(raw=digits[0][0].tobytes()).SerializeToString()
    batch = b"".join(b"\x0a" + _varint(len(item)) + item for item in (good, both))
    assert len(pb.ClassifyBatchRequest.FromString(batch).requests) == 2
    with pytest.raises(grpc.RpcError) as err:
        served.channel.unary_unary("/mnist.v1.Classifier/ClassifyBatch")(batch, timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and err.value.details().startswith("requests[1]: both")


@pytest.mark.parametrize(("count", "message"), [(0, "batch is empty"), (17, "17 requests, over the maximum of 16")])
def test_empty_and_oversized_batches_are_invalid_argument(served: Harness, digits, count: int, message: str) -> None:
    requests = [pb.ClassifyRequest(raw=digits[0][0].tobytes()) for _ in range(count)]
    with pytest.raises(grpc.RpcError) as err:
        served.stub.ClassifyBatch(pb.ClassifyBatchRequest(requests=requests), timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and message in err.value.details()


def test_a_bad_item_in_a_batch_is_named_by_its_index(served: Harness, digits) -> None:
    requests = [pb.ClassifyRequest(raw=digits[0][0].tobytes()), pb.ClassifyRequest(raw=b"\1\2")]
    with pytest.raises(grpc.RpcError) as err:
        served.stub.ClassifyBatch(pb.ClassifyBatchRequest(requests=requests), timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and err.value.details().startswith("requests[1]: ")


# --- metrics and batching ----------------------------------------------------------------------


def test_metrics_are_scraped_and_move_with_traffic(served: Harness, digits) -> None:
    before = served.metrics()
    ok = 'mnist_requests_total{code="OK",method="Classify"}'
    for i in range(5):
        served.stub.Classify(pb.ClassifyRequest(raw=digits[0][i].tobytes()), timeout=10)
    with pytest.raises(grpc.RpcError):
        served.stub.Classify(pb.ClassifyRequest(raw=b""), timeout=10)
    after = served.metrics()
    assert after[ok] - before.get(ok, 0) == 5
    assert after['mnist_requests_total{code="INVALID_ARGUMENT",method="Classify"}'] >= 1
    for edge in ("0.0001", "0.001", "0.01", "0.1"):
        assert f'mnist_request_latency_seconds_bucket{{code="OK",le="{edge}",method="Classify"}}' in after
    assert after["mnist_session_run_seconds_count{}"] > before["mnist_session_run_seconds_count{}"]
    assert after["mnist_queue_wait_seconds_count{}"] > before["mnist_queue_wait_seconds_count{}"]
    version = served.server.pipeline.version
    model = f'model="googlenet-fast",version="{version}"'
    predicted = sum(after[f'mnist_predictions_total{{digit="{d}",{model}}}'] for d in range(10))
    assert predicted == after[f"mnist_prediction_confidence_count{{{model}}}"] > 0
    assert after[f'mnist_model_requests_total{{code="OK",{model}}}'] >= 5
    assert after[f"mnist_model_request_latency_seconds_count{{{model}}}"] >= 6
    assert after[f"mnist_model_load_seconds{{{model}}}"] > 0
    (info,) = [dict(re.findall(r'(\w+)="([^"]*)"', k)) for k in after if k.startswith("mnist_model_info{")]
    assert info == expected_model_info(served)
    assert "mnist_queue_depth{}" in after and "mnist_requests_in_flight{}" in after


def test_a_non_digit_upload_counts_as_flagged_for_the_version_that_answered(served: Harness, digits) -> None:
    """mnist_non_digit_images_total{model,version} over mnist_predictions_total is the flagged share (alerts.yml):
    uniform noise (flagged by the bundled detector, tests/test_digit_detector.py; a flat square is refused before
    the model as blank) adds one to the numerator, a real digit only to the denominator."""
    version = served.server.pipeline.version
    model = f'model="googlenet-fast",version="{version}"'
    flagged = f"mnist_non_digit_images_total{{{model}}}"

    def predicted(samples: dict[str, float]) -> float:
        return sum(samples.get(f'mnist_predictions_total{{digit="{d}",{model}}}', 0) for d in range(10))

    before = served.metrics()
    assert flagged in before  # at 0 from load on, not absent
    noise = np.random.default_rng(0).integers(0, 256, (28, 28)).astype(np.uint8)
    flagged_reply = served.stub.Classify(pb.ClassifyRequest(raw=noise.tobytes()), timeout=10)
    digit = served.stub.Classify(pb.ClassifyRequest(raw=digits[0][0].tobytes()), timeout=10)
    assert (flagged_reply.is_digit, digit.is_digit) == (False, True)
    after = served.metrics()
    assert after[flagged] - before[flagged] == 1
    assert predicted(after) - predicted(before) == 2


def expected_model_info(served: Harness) -> dict[str, str]:
    """mnist_model_info's labels as the spec has them: docs/serving.md's label list, the served file's own metadata
    (the contract), the provider the config asks for, and the engine's choices as GetModelInfo reports them."""
    import onnx

    from proto.contract import read_metadata

    table = (ROOT / "docs" / "serving.md").read_text()
    (labels,) = re.findall(r"^\| `mnist_model_info` \| gauge = 1 \| (.*) \|$", table, re.MULTILINE)
    metadata = read_metadata(onnx.load(str(BUNDLED_MODEL), load_external_data=False))
    reply = served.stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=10)
    expected = {
        "name": metadata.model_name,
        "version": metadata.model_version,
        "precision": metadata.precision,
        "provider": "CPUExecutionProvider",  # test_config: provider "cpu"
        "backend": reply.backend,
        "layout": reply.layout,
        "buckets": ",".join(map(str, reply.batch_buckets)) or "any",
        "cuda_graph": str(reply.cuda_graph).lower(),
        "default": "true",  # the one model served: requests naming none get it
    }
    assert set(expected) == {*labels.split(", "), "default"}
    assert (reply.name, reply.version, reply.precision, reply.providers[0]) == (
        expected["name"], expected["version"], expected["precision"], expected["provider"]
    )  # fmt: skip
    return expected


def test_a_scrape_holds_series_for_what_happened_not_for_every_code_of_every_method(served: Harness) -> None:
    """Series made up front for all 17 status codes of every method of every service (the Open Inference Protocol
    alone has 20 methods) once made each scrape ~10,000 lines and 75 ms of work holding the GIL."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{served.server.metrics_port}/metrics", timeout=5).read().decode()
    lines = [line for line in text.splitlines() if line.startswith("mnist_request")]
    assert len(lines) < 600, len(lines)
    assert not [line for line in lines if 'method="ModelStreamInfer"' in line]  # never called here: no series


def test_concurrent_requests_are_coalesced_into_batches(served: Harness, digits) -> None:
    before = served.metrics()

    def client(worker: int) -> list[int]:
        return [
            served.stub.Classify(pb.ClassifyRequest(raw=digits[0][(worker + j) % 64].tobytes()), timeout=20).digit
            for j in range(15)
        ]

    with ThreadPoolExecutor(24) as pool:
        results = list(pool.map(client, range(24)))
    assert all(r == [digits[1][(w + j) % 64] for j in range(15)] for w, r in enumerate(results))
    after = served.metrics()
    runs = after["mnist_batch_size_count{}"] - before["mnist_batch_size_count{}"]
    images = after["mnist_batch_size_sum{}"] - before["mnist_batch_size_sum{}"]
    assert images == 24 * 15
    assert runs < images  # at least one session run served several requests
    assert after['mnist_batch_size_bucket{le="1.0"}'] - before['mnist_batch_size_bucket{le="1.0"}'] < runs


def test_a_full_queue_answers_resource_exhausted_at_once(digits) -> None:
    config = test_config(max_batch_size=4, max_queue_size=8, max_request_images=8, queue_target_ms="off")
    harness = Harness(MnistServer(config).start())
    try:
        batch = pb.ClassifyBatchRequest(requests=[pb.ClassifyRequest(raw=digits[0][i].tobytes()) for i in range(8)])

        def call(_: int) -> grpc.StatusCode:
            try:
                harness.stub.ClassifyBatch(batch, timeout=30)
                return grpc.StatusCode.OK
            except grpc.RpcError as err:
                assert err.code() != grpc.StatusCode.RESOURCE_EXHAUSTED or "queue full" in err.details()
                return err.code()

        with ThreadPoolExecutor(16) as pool:
            codes = list(pool.map(call, range(48)))
        assert set(codes) == {grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED}
        assert harness.metrics()['mnist_requests_total{code="RESOURCE_EXHAUSTED",method="ClassifyBatch"}'] > 0
        assert harness.stub.ClassifyBatch(batch, timeout=30).responses[0].digit == digits[1][0]
    finally:
        harness.close()


# --- health ----------------------------------------------------------------------------------------


def test_health_is_not_serving_until_warm_and_while_draining(monkeypatch: pytest.MonkeyPatch, digits) -> None:
    warming, warm_up_may_finish = threading.Event(), threading.Event()
    original = OnnxRuntimeBackend.warm_up

    def warm_up(self) -> None:
        warming.set()
        assert warm_up_may_finish.wait(60), "the test never let the warm-up finish"
        original(self)

    monkeypatch.setattr(OnnxRuntimeBackend, "warm_up", warm_up)
    server = MnistServer(test_config(drain_seconds=1.0))
    starting = threading.Thread(target=server.start)
    starting.start()
    assert warming.wait(60), "the server never began its warm-up"
    assert server.port is not None  # listening, and warming up
    harness = Harness(server)
    try:
        assert harness.health_status() == NOT_SERVING
        assert harness.health_status("mnist.v1.Classifier") == NOT_SERVING
        with pytest.raises(grpc.RpcError) as err:
            harness.stub.Classify(pb.ClassifyRequest(raw=digits[0][0].tobytes()), timeout=5)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE and "loading" in err.value.details()
        warm_up_may_finish.set()
        starting.join(10)
        assert harness.health_status() == SERVING and harness.health_status("mnist.v1.Classifier") == SERVING
        stopping = threading.Thread(target=server.stop)
        stopping.start()
        deadline = time.monotonic() + 10
        while harness.health_status() != NOT_SERVING:  # draining: no longer advertised ...
            assert time.monotonic() < deadline, "health never said NOT_SERVING"
            time.sleep(0.005)
        assert stopping.is_alive()  # ... within the 1 s drain, still answering:
        assert harness.stub.Classify(pb.ClassifyRequest(raw=digits[0][0].tobytes()), timeout=5).digit == digits[1][0]
        stopping.join(10)
    finally:
        warm_up_may_finish.set()
        harness.close()


def test_reflection_lists_the_services(served: Harness) -> None:
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    stub = reflection_pb2_grpc.ServerReflectionStub(served.channel)
    replies = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5)
    names = {s.name for reply in replies for s in reply.list_services_response.service}
    assert {"mnist.v1.Classifier", "grpc.health.v1.Health"} <= names


def test_the_classify_cli_prints_digit_and_certainty_per_file(served: Harness, tmp_path: Path, capsys) -> None:
    from server.client import main

    samples = sorted((Path(__file__).resolve().parents[1] / "server" / "samples").iterdir())
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    code = main(["--server", f"127.0.0.1:{served.server.port}", "--wait", "5", *map(str, samples), str(broken)])
    out, err = capsys.readouterr()
    assert code == 1  # one file failed
    for sample, digit in zip(samples, ("4", "7", "2", "0"), strict=True):
        assert f"{sample}: {digit} with " in out and " certainty" in out
    assert f"{broken}: INVALID_ARGUMENT:" in err


def one_image_per_run_with_a_backlog(digits) -> tuple[Harness, grpc.Future]:
    """A server running one image per session run, busy with a 256-image batch (~256 runs ahead of any new call),
    returned once its speed is learnt from them; its queue is bounded in size only (--queue-target-ms off), so a call
    with time to wait is queued."""
    config = test_config(max_batch_size=1, max_request_images=256, max_queue_size=512, queue_target_ms="off")
    harness = Harness(MnistServer(config).start())
    busy = pb.ClassifyBatchRequest(requests=[pb.ClassifyRequest(raw=digits[0][i % 64].tobytes()) for i in range(256)])
    backlog = harness.stub.ClassifyBatch.future(busy, timeout=60)
    # the backlog runs until the batcher knows the engine's speed from real runs (it predicts no wait before)
    batcher = harness.server.pipeline.batcher
    wait_until(harness, lambda m: batcher.judged() and not backlog.done(), "the engine's speed judged")
    return harness, backlog


def wait_until(harness: Harness, condition, what: str) -> dict[str, float]:
    """/metrics, polled until `condition` holds of it: synchronisation on the server's state, not a guessed sleep."""
    deadline = time.monotonic() + 30
    while not condition(metrics := harness.metrics()):
        assert time.monotonic() < deadline, f"gave up waiting for {what}"
        time.sleep(0.005)
    return metrics


def metrics_once(harness: Harness, sample: str) -> dict[str, float]:
    """/metrics as soon as `sample` is non-zero (the batcher reaches a dropped image just after the backlog)."""
    for _ in range(100):
        metrics = harness.metrics()
        if metrics[sample]:
            return metrics
        time.sleep(0.02)
    return metrics


def test_a_request_that_cannot_be_answered_by_its_deadline_is_refused_at_once_and_never_run(digits) -> None:
    harness, backlog = one_image_per_run_with_a_backlog(digits)
    try:
        with pytest.raises(grpc.RpcError) as err:
            harness.stub.Classify(pb.ClassifyRequest(raw=digits[0][0].tobytes()), timeout=0.2)
        # refused at once by the server, not after waiting out its deadline: a wait would end in the client's own
        # DEADLINE_EXCEEDED, or the server's, with the image counted as expired in the queue
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "deadline" in err.value.details()
        metrics = harness.metrics()
        assert metrics["mnist_deadline_expired_images_total{}"] == 0
        assert metrics['mnist_requests_total{code="RESOURCE_EXHAUSTED",method="Classify"}'] == 1
        assert int(dict(err.value.trailing_metadata())[RETRY_AFTER_KEY]) > 0
        assert len(backlog.result().responses) == 256
        assert harness.metrics()["mnist_batch_size_sum{}"] == 256 + VERIFIED  # the refused image never ran
    finally:
        harness.close()


def test_a_call_without_a_deadline_is_answered(served: Harness, digits) -> None:
    """Regression: grpcio reports 'no deadline' as a huge time_remaining(), which overflowed the wait."""
    reply = served.stub.Classify(pb.ClassifyRequest(raw=digits[0][0].tobytes()))
    assert reply.digit == digits[1][0]
    batch = pb.ClassifyBatchRequest(requests=[pb.ClassifyRequest(raw=digits[0][1].tobytes())])
    assert served.stub.ClassifyBatch(batch).responses[0].digit == digits[1][1]


@pytest.mark.parametrize("method", ["Classify", "ClassifyBatch"])
def test_malformed_protobuf_bytes_are_invalid_argument_and_counted(served: Harness, method: str) -> None:
    call = served.channel.unary_unary(f"/mnist.v1.Classifier/{method}")
    before = served.metrics().get(f'mnist_requests_total{{code="INVALID_ARGUMENT",method="{method}"}}', 0)
    with pytest.raises(grpc.RpcError) as err:
        call(b"\x12\xff\xff\x03truncated", timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "malformed request" in err.value.details()
    after = served.metrics()[f'mnist_requests_total{{code="INVALID_ARGUMENT",method="{method}"}}']
    assert after == before + 1


def test_a_call_cancelled_while_queued_is_never_run_and_is_counted(digits) -> None:
    harness, backlog = one_image_per_run_with_a_backlog(digits)
    try:
        gone = harness.stub.Classify.future(pb.ClassifyRequest(raw=digits[0][0].tobytes()), timeout=60)
        wait_until(harness, lambda m: m["mnist_requests_in_flight{}"] >= 2, "the call to reach the server")
        assert not backlog.done()  # still queued behind the backlog
        assert gone.cancel()
        assert len(backlog.result().responses) == 256
        metrics = metrics_once(harness, "mnist_cancelled_images_total{}")
        assert metrics["mnist_cancelled_images_total{}"] == 1 and metrics["mnist_deadline_expired_images_total{}"] == 0
        assert metrics["mnist_batch_size_sum{}"] == 256 + VERIFIED  # the cancelled image never reached the model
        assert harness.stub.Classify(pb.ClassifyRequest(raw=digits[0][1].tobytes()), timeout=10).digit == digits[1][1]
    finally:
        harness.close()


def test_a_thousand_concurrent_calls_are_answered_without_a_thread_each(digits) -> None:
    """The event loop holds waiting calls as coroutines: the server's thread count does not grow with them."""
    server = MnistServer(test_config(backend="null", max_queue_size=2048)).start()
    threads_before = threading.active_count()
    peak = threads_before

    async def many() -> list[int]:
        nonlocal peak
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = pb_grpc.ClassifierStub(channel)
            calls = [
                stub.Classify(pb.ClassifyRequest(raw=digits[0][i % 64].tobytes()), timeout=60) for i in range(1000)
            ]
            waiting = asyncio.ensure_future(asyncio.gather(*calls))
            while not waiting.done():
                peak = max(peak, threading.active_count())
                await asyncio.sleep(0.005)
            return [reply.digit for reply in await waiting]

    try:
        assert asyncio.run(many()) == [0] * 1000  # the null backend's fixed answer
    finally:
        server.stop()
    assert peak - threads_before < 20


def test_the_backend_warms_up_on_the_thread_that_runs_its_batches(monkeypatch: pytest.MonkeyPatch, digits) -> None:
    """ONNX Runtime captures a CUDA graph per thread: the one warm-up checks must be the one requests replay."""
    threads: dict[str, set[str]] = {"warm_up": set(), "run": set()}
    original_warm_up, original_run = OnnxRuntimeBackend.warm_up, OnnxRuntimeBackend.run

    def warm_up(self) -> float:
        threads["warm_up"].add(threading.current_thread().name)
        return original_warm_up(self)

    def run(self, images):
        threads["run"].add(threading.current_thread().name)
        return original_run(self, images)

    monkeypatch.setattr(OnnxRuntimeBackend, "warm_up", warm_up)
    monkeypatch.setattr(OnnxRuntimeBackend, "run", run)
    harness = Harness(MnistServer(test_config(batch_buckets="1,4")).start())
    try:
        assert harness.stub.Classify(pb.ClassifyRequest(raw=digits[0][0].tobytes()), timeout=10).digit == digits[1][0]
    finally:
        harness.close()
    assert threads["warm_up"] == threads["run"] == {"batch-runner"}


def test_without_aiohttp_scipy_or_opentelemetry_the_server_still_classifies() -> None:
    """The lent GPU machine has none of them: the GPU check (HTTP off, no traces, no numbers) must still run there,
    and reading a number says what is missing instead of failing INTERNAL."""
    code = """
import sys
for name in ("aiohttp", "scipy", "opentelemetry"):
    sys.modules[name] = None  # import fails, as where the package is absent
import grpc
from proto.mnist.v1 import classifier_pb2 as pb
from server.app import MnistServer
from tests.support import Harness, test_config
harness = Harness(MnistServer(test_config(http_port=0)).start())
seven = open("server/samples/seven.png", "rb").read()
print(harness.stub.Classify(pb.ClassifyRequest(encoded=seven), timeout=10).digit)
try:
    harness.stub.ReadDigits(pb.ReadDigitsRequest(image=seven), timeout=10)
except grpc.RpcError as error:
    print(error.code().name, error.details())
harness.close()
"""
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    lines = result.stdout.splitlines()
    assert result.returncode == 0 and lines[0] == "7", result.stderr[-2000:]
    assert lines[1].startswith("UNIMPLEMENTED reading numbers needs scipy")
