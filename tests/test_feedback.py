"""Feedback: the true label of an earlier answer is joined with what the server answered, counted in that version's
live accuracy and stored with the image the model saw; drift against the version's reference is measured; bad
feedback is refused saying why, and a database that is down never slows or fails an answer."""

from __future__ import annotations

import io
import json
import math
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from PIL import Image

from proto.mnist.v1 import classifier_pb2 as pb
from server.app import MnistServer
from server.feedback.answers import AnswerMemory
from server.feedback.store import open_store
from server.pipeline.predictions import Predictions
from tests.support import Harness, free_port, test_config


@pytest.fixture(scope="module")
def database(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("feedback") / "feedback.db"


@pytest.fixture(scope="module")
def served(database: Path) -> Iterator[Harness]:
    config = test_config(feedback_db=str(database), live_accuracy_window=8, http_port=free_port())
    harness = Harness(MnistServer(config).start())
    yield harness
    harness.close()


def stored(harness: Harness, database: Path, request_id: str):
    assert harness.server.feedback.writer.flush(10)
    store = open_store(str(database))
    try:
        return next(r for r in store.records(with_images=True) if r.request_id == request_id)
    finally:
        store.close()


def refused(call) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        call()
    return caught.value


def png(pixels: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(255 - pixels).save(out, "PNG")  # dark ink on white paper, as a photo or a scan has it
    return out.getvalue()


def test_a_label_is_joined_with_the_answer_and_stored_with_the_image_the_model_saw(
    served: Harness, database: Path, mnist_test_digits
) -> None:
    images, labels = mnist_test_digits
    answer = served.stub.Classify(pb.ClassifyRequest(raw=images[0].tobytes()), timeout=10)
    wrong_label = (answer.digit + 1) % 10
    reply = served.stub.Feedback(pb.FeedbackRequest(request_id=answer.request_id, label=wrong_label), timeout=10)
    assert (reply.prediction, reply.correct, reply.stored) == (str(answer.digit), False, True)
    assert reply.model_version == answer.model_version
    record = stored(served, database, answer.request_id)
    assert (record.label, record.prediction, record.kind) == (str(wrong_label), str(answer.digit), "classify")
    assert record.confidence == pytest.approx(answer.confidence, abs=1e-6)
    assert np.array_equal(np.frombuffer(record.image, np.uint8).reshape(28, 28), images[0])


def test_an_encoded_image_is_stored_as_the_28x28_digit_the_model_was_given(
    served: Harness, database: Path, mnist_test_digits
) -> None:
    images, labels = mnist_test_digits
    big = np.asarray(Image.fromarray(images[3]).resize((112, 112)))
    answer = served.stub.Classify(pb.ClassifyRequest(encoded=png(big)), timeout=10)
    served.stub.Feedback(pb.FeedbackRequest(request_id=answer.request_id, label=int(labels[3])), timeout=10)
    image = np.frombuffer(stored(served, database, answer.request_id).image, np.uint8).reshape(28, 28)
    # light ink on dark, fitted into MNIST's 20-pixel box: the picture the model classified, not the PNG
    assert image[0].max() == 0 and image[:, 0].max() == 0 and image.max() > 200
    again = served.stub.Classify(pb.ClassifyRequest(raw=image.tobytes()), timeout=10)
    assert np.allclose(again.probabilities, answer.probabilities, atol=2e-3)


def test_every_item_of_a_batch_is_labelled_by_its_own_id(served: Harness, mnist_test_digits) -> None:
    images, labels = mnist_test_digits
    raw = [pb.ClassifyRequest(raw=image.tobytes()) for image in images[10:16]]  # ids generated for the batch
    mixed = [pb.ClassifyRequest(encoded=png(images[16]), request_id="client-a"), *raw[:2]]  # some of the client's
    for requests in (raw, mixed):
        batch = served.stub.ClassifyBatch(pb.ClassifyBatchRequest(requests=requests), timeout=10)
        ids = [response.request_id for response in batch.responses]
        assert len(set(ids)) == len(ids)
        for response in reversed(batch.responses):
            reply = served.stub.Feedback(pb.FeedbackRequest(request_id=response.request_id, label=response.digit))
            assert reply.correct and reply.prediction == str(response.digit)


def test_a_reading_takes_its_true_text_and_its_digits_are_counted_one_by_one(
    served: Harness, mnist_test_digits
) -> None:
    images, labels = mnist_test_digits
    page = np.zeros((40, 130), np.uint8)
    for n, index in enumerate((0, 1, 2, 3)):
        page[6:34, 4 + 31 * n : 32 + 31 * n] = images[index]
    reading = served.stub.ReadDigits(pb.ReadDigitsRequest(image=png(page), request_id="page-1"), timeout=20)
    truth = "".join(str(int(labels[i])) for i in (0, 1, 2, 3))
    before = served.metrics()
    reply = served.stub.Feedback(pb.FeedbackRequest(request_id="page-1", text=truth), timeout=10)
    # right when its digits are: the groups ReadDigits saw ("7 2 1 0" for digits this far apart) are not judged
    assert reply.prediction == reading.text and reply.correct == ("".join(reading.text.split()) == truth)
    after = served.metrics()
    confusions = sum(
        value - before.get(key, 0.0)
        for key, value in after.items()
        if key.startswith("mnist_feedback_confusion_total") and f'version="{reply.model_version}"' in key
    )
    assert confusions == len(truth)
    wrong = refused(lambda: served.stub.Feedback(pb.FeedbackRequest(request_id="page-1", label=3), timeout=10))
    assert wrong.code() == grpc.StatusCode.ALREADY_EXISTS


def test_bad_feedback_is_refused_saying_why_and_the_server_keeps_answering(served: Harness, mnist_test_digits) -> None:
    images, _ = mnist_test_digits
    answer = served.stub.Classify(pb.ClassifyRequest(raw=images[5].tobytes()), timeout=10)
    cases = [
        (pb.FeedbackRequest(request_id="never-answered", label=1), grpc.StatusCode.NOT_FOUND, "never-answered"),
        (pb.FeedbackRequest(request_id=answer.request_id, label=10), grpc.StatusCode.INVALID_ARGUMENT, "0-9"),
        (pb.FeedbackRequest(request_id=answer.request_id, text="12"), grpc.StatusCode.INVALID_ARGUMENT, "label"),
        (pb.FeedbackRequest(request_id=answer.request_id), grpc.StatusCode.INVALID_ARGUMENT, "no truth"),
        (pb.FeedbackRequest(label=1), grpc.StatusCode.INVALID_ARGUMENT, "request_id"),
        (
            pb.FeedbackRequest(request_id=answer.request_id, label=1, model_name="another"),
            grpc.StatusCode.NOT_FOUND,
            "another",
        ),
    ]
    for request, code, named in cases:
        error = refused(lambda request=request: served.stub.Feedback(request, timeout=10))
        assert error.code() == code and named in error.details(), (request, error.details())
    served.stub.Feedback(pb.FeedbackRequest(request_id=answer.request_id, label=answer.digit), timeout=10)
    duplicate = refused(
        lambda: served.stub.Feedback(pb.FeedbackRequest(request_id=answer.request_id, label=answer.digit))
    )
    assert duplicate.code() == grpc.StatusCode.ALREADY_EXISTS
    refusals = served.metrics()
    for reason in ("unknown_request", "bad_label", "duplicate"):
        assert refusals[f'mnist_feedback_refused_total{{reason="{reason}"}}'] >= 1
    assert served.stub.Classify(pb.ClassifyRequest(raw=images[6].tobytes()), timeout=10).confidence > 0


def test_live_accuracy_is_over_the_versions_last_labelled_answers(served: Harness, mnist_test_digits) -> None:
    images, _ = mnist_test_digits
    window = served.server.config.live_accuracy_window  # 8 here
    replies = []
    for n in range(window):  # a full window of answers labelled wrong, then right ones push them out one by one
        answer = served.stub.Classify(pb.ClassifyRequest(raw=images[100 + n].tobytes()), timeout=10)
        label = answer.digit if n >= window // 2 else (answer.digit + 1) % 10
        replies.append(served.stub.Feedback(pb.FeedbackRequest(request_id=answer.request_id, label=label)))
    assert (replies[-1].live_accuracy, replies[-1].live_answers) == (0.5, window)
    version = f'model="{replies[-1].model_name}",version="{replies[-1].model_version}"'
    metrics = served.metrics()
    assert metrics[f"mnist_live_accuracy{{{version}}}"] == 0.5
    assert metrics[f"mnist_live_accuracy_answers{{{version}}}"] == window
    assert metrics[f"mnist_reference_accuracy{{{version}}}"] == pytest.approx(0.9951)  # googlenet-fast.reference.json


def test_drift_is_small_for_test_digits_and_large_when_one_digit_floods_in(mnist_test_digits) -> None:
    """The version's answers over the window against its reference: the model's own answers on the test set."""
    import onnxruntime as ort
    from prometheus_client import CollectorRegistry

    from proto.contract import MNIST_NORMALIZATION
    from server.config import BUNDLED_MODEL
    from server.feedback.quality import LiveQuality
    from server.feedback.reference import Reference
    from server.ops.metrics import ServiceMetrics

    images, labels = mnist_test_digits
    session = ort.InferenceSession(str(BUNDLED_MODEL), providers=["CPUExecutionProvider"])
    now = [0.0]
    metrics = ServiceMetrics(CollectorRegistry())
    quality = LiveQuality(metrics, drift_window_seconds=60, clock=lambda: now[0])
    tally = quality.track("m", "1", Reference.load(Reference.path_for(BUNDLED_MODEL)))

    def drift_after(batch: np.ndarray) -> tuple[float, float]:
        probabilities = session.run(["probabilities"], {"image": MNIST_NORMALIZATION.apply(batch)[:, None]})[0]
        tally.add(probabilities.argmax(1), probabilities.max(1))
        now[0] += 61  # the window holds this batch only
        quality.sample()
        value = metrics.registry.get_sample_value
        return (
            value("mnist_prediction_drift_psi", {"model": "m", "version": "1"}),
            value("mnist_confidence_drift_psi", {"model": "m", "version": "1"}),
        )

    stable = drift_after(images[2000:2400])
    ones = drift_after(images[labels == 1][:400])
    assert stable[0] < 0.1 and stable[1] < 0.1, stable
    assert ones[0] > 0.25, ones
    assert math.isnan(drift_after(images[:10])[0])  # too few answers to say


def test_rest_feedback_answers_as_grpc_does(served: Harness, mnist_test_digits) -> None:
    images, labels = mnist_test_digits
    answer = served.stub.Classify(pb.ClassifyRequest(raw=images[7].tobytes()), timeout=10)
    url = f"http://127.0.0.1:{served.server.http_port}/v2/models/{answer_model(served)}/feedback"

    def post(body: bytes) -> tuple[int, dict]:
        request = urllib.request.Request(url, body, {"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as error:
            return error.code, json.loads(error.read())

    status, reply = post(json.dumps({"request_id": answer.request_id, "label": int(labels[7])}).encode())
    assert status == 200 and reply["prediction"] == str(answer.digit) and reply["label"] == str(labels[7])
    assert post(json.dumps({"request_id": answer.request_id, "label": int(labels[7])}).encode())[0] == 409
    assert post(json.dumps({"request_id": "unheard-of", "label": 1}).encode())[0] == 404
    status, reply = post(b"not json")
    assert status == 400 and "JSON" in reply["error"]
    assert post(json.dumps({"request_id": answer.request_id, "label": "7"}).encode())[0] == 400


def answer_model(served: Harness) -> str:
    return served.stub.ListModels(pb.ListModelsRequest(), timeout=5).default_model


def test_a_database_that_is_down_never_fails_an_answer_and_what_is_lost_is_counted(mnist_test_digits) -> None:
    images, labels = mnist_test_digits
    config = test_config(feedback_db=f"postgresql://nobody:secret@127.0.0.1:{free_port()}/none")
    harness = Harness(MnistServer(config).start())
    registry = harness.server.metrics.registry
    try:
        for n in range(5):
            answer = harness.stub.Classify(pb.ClassifyRequest(raw=images[n].tobytes()), timeout=10)
            reply = harness.stub.Feedback(pb.FeedbackRequest(request_id=answer.request_id, label=int(labels[n])))
            assert reply.correct == (answer.digit == labels[n]) and reply.stored  # queued, waiting for the database
        assert harness.server.feedback.writer.pending == 5
        assert not harness.server.feedback.writer.healthy
    finally:
        harness.close()  # what still waits for the database is dropped, and counted
    lost = registry.get_sample_value("mnist_feedback_dropped_total", {"reason": "database_unavailable"})
    assert lost == 5 and registry.get_sample_value("mnist_feedback_stored_total") == 0


def test_a_fleet_stores_its_labels_in_postgresql(postgres_cluster, mnist_test_digits) -> None:
    images, labels = mnist_test_digits
    url = postgres_cluster.create_database("serving_feedback")
    servers = [Harness(MnistServer(test_config(feedback_db=url)).start()) for _ in range(2)]  # two replicas
    try:
        ids = []
        for n, harness in enumerate(servers):
            answer = harness.stub.Classify(pb.ClassifyRequest(raw=images[n].tobytes()), timeout=10)
            harness.stub.Feedback(pb.FeedbackRequest(request_id=answer.request_id, label=int(labels[n])), timeout=10)
            assert harness.server.feedback.writer.flush(10)
            ids.append(answer.request_id)
    finally:
        for harness in servers:
            harness.close()
    store = open_store(url)
    try:
        records = {r.request_id: r for r in store.records(with_images=True)}
        assert store.schema_version() >= 1
    finally:
        store.close()
    assert set(records) == set(ids)
    for n, request_id in enumerate(ids):
        assert np.array_equal(np.frombuffer(records[request_id].image, np.uint8).reshape(28, 28), images[n])


def test_with_images_off_no_image_is_kept_in_memory_or_stored(tmp_path: Path, mnist_test_digits) -> None:
    images, labels = mnist_test_digits
    config = test_config(feedback_db=str(tmp_path / "f.db"), feedback_images="off")
    harness = Harness(MnistServer(config).start())
    try:
        answer = harness.stub.Classify(pb.ClassifyRequest(raw=images[0].tobytes()), timeout=10)
        harness.stub.Feedback(pb.FeedbackRequest(request_id=answer.request_id, label=int(labels[0])), timeout=10)
        assert harness.server.feedback.memory.recall(answer.request_id).image is None
        record = stored(harness, tmp_path / "f.db", answer.request_id)
        assert record.image is None and record.label == str(labels[0])
    finally:
        harness.close()


# --- the memory of answers ---------------------------------------------------------------------------------------


def predictions(count: int, version: str = "1") -> Predictions:
    probabilities = np.eye(10, dtype=np.float32)[np.arange(count) % 10]
    return Predictions(
        probabilities,
        probabilities.argmax(1),
        probabilities.max(1),
        np.full(count, math.nan, np.float32),
        np.ones(count, bool),
        version,
        "m",
        np.zeros((count, 1, 28, 28), np.uint8),
    )


def test_the_memory_forgets_the_oldest_answers_beyond_its_bound_and_its_age() -> None:
    now = [0.0]
    memory = AnswerMemory(max_answers=10, max_age_seconds=60, clock=lambda: now[0])
    memory.remember(predictions(1), ["first"])
    memory.remember_batch(predictions(8), "b" * 24)
    assert memory.recall("first") is not None and memory.recall("b" * 24 + "00000007").prediction == "7"
    assert memory.recall("b" * 24 + "00000008") is None  # beyond the batch
    memory.remember(predictions(2), ["x", "y"])  # 11 answers: the oldest call goes
    assert memory.recall("first") is None and memory.recall("y").prediction == "1" and len(memory) == 10
    now[0] = 61.0
    assert memory.recall("y") is None and len(memory) == 0


def test_an_id_used_again_finds_its_newest_answer() -> None:
    memory = AnswerMemory(max_answers=100)
    memory.remember(predictions(3), ["a", "b", "c"])
    memory.remember(predictions(1, version="2"), ["b"])
    assert memory.recall("b").version == "2" and memory.recall("c").version == "1"
    assert len(memory) == 4


def test_a_client_id_cannot_unhook_a_batch_from_the_count_and_long_ids_are_not_kept() -> None:
    memory = AnswerMemory(max_answers=6)
    memory.remember(predictions(3), ["a", "b", "c"])
    memory.remember(predictions(1), ["batch:a"])  # once the key of a batch; now just an id
    assert len(memory) == 4 and memory.recall("a").prediction == "0"
    memory.remember(predictions(3), ["x", "y", "z"])  # 7 answers: the oldest call, the first batch, goes whole
    assert memory.recall("a") is None and memory.recall("c") is None and len(memory) == 4
    memory.remember(predictions(1), ["i" * 129])
    assert memory.recall("i" * 129) is None and len(memory) == 4


def test_a_reused_id_is_a_new_answer_to_label() -> None:
    now = [0.0]
    memory = AnswerMemory(max_answers=100, clock=lambda: now[0])
    memory.remember(predictions(1), ["same"])
    first = memory.recall("same")
    memory.mark_labelled(first, "7")
    now[0] = 1.0
    memory.remember(predictions(1), ["same"])
    assert memory.labelled(first) == "7" and memory.labelled(memory.recall("same")) is None
