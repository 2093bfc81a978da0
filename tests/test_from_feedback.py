"""mnist-train --from-feedback: the served ONNX model made trainable again exactly, the stored labels read back as
digits (from SQLite and PostgreSQL), and a fine-tune that writes what mnist-export reads."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from proto.contract import MNIST_NORMALIZATION
from server.config import BUNDLED_MODEL
from server.feedback.store import FeedbackRecord, open_store
from training.from_feedback import FeedbackTuneConfig, feedback_digits, fine_tune, network_from_onnx


def record(request_id: str, label: str, image: np.ndarray | None, kind: str = "classify") -> FeedbackRecord:
    prediction = label if kind == "classify" else label[::-1]
    return FeedbackRecord(
        request_id=request_id,
        model="googlenet-fast",
        version="1",
        kind=kind,
        prediction=prediction,
        confidence=0.9,
        digit_score=None,
        label=label,
        answered_at=time.time(),
        received_at=time.time(),
        image=None if image is None else image.astype(np.uint8).tobytes(),
    )


def test_the_served_onnx_model_becomes_a_network_that_answers_exactly_as_the_file(mnist_test_digits) -> None:
    images, _ = mnist_test_digits
    network, preset, metadata = network_from_onnx(BUNDLED_MODEL)
    x = MNIST_NORMALIZATION.apply(images[:200])[:, None]
    with torch.no_grad():
        logits = network(torch.from_numpy(x)).numpy()
    session = ort.InferenceSession(str(BUNDLED_MODEL), providers=["CPUExecutionProvider"])
    expected = session.run(["logits"], {"image": x})[0]
    assert preset == metadata.model_name == "googlenet-fast"
    assert np.abs(logits - expected).max() < 1e-4 and (logits.argmax(1) == expected.argmax(1)).all()
    trainable = [p for p in network.parameters() if p.requires_grad]
    assert len(trainable) == len(list(network.parameters())) > 0


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_stored_labels_come_back_as_digits_readings_split_into_theirs(
    backend: str, tmp_path: Path, mnist_test_digits, request: pytest.FixtureRequest
) -> None:
    images, labels = mnist_test_digits
    if backend == "sqlite":
        url = str(tmp_path / "feedback.db")
    else:
        url = request.getfixturevalue("postgres_cluster").create_database("from_feedback")
    store = open_store(url)
    store.write(
        [
            record("a", str(labels[0]), images[0]),
            record("b", str(labels[1]), None),  # kept without its image (--feedback-images off): nothing to learn
            record("c", f"{labels[2]}{labels[3]}", np.stack([images[2], images[3]]), "read_digits"),
            record("d", "123", np.stack([images[4], images[5]]), "read_digits"),  # three digits, two images
        ]
    )
    store.close()
    digits, truth, counts = feedback_digits(url, "googlenet-fast")
    assert np.array_equal(digits, images[[0, 2, 3]]) and truth.tolist() == labels[[0, 2, 3]].tolist()
    assert counts == {"records": 4, "without_image": 1, "unmatched_reading": 1, "digits": 3}
    assert feedback_digits(url, "another-model")[2]["records"] == 0


def test_a_fine_tune_writes_a_checkpoint_mnist_export_reads_and_a_report(tmp_path: Path, mnist_test_digits) -> None:
    from export.onnx_export import load_checkpoint_model

    images, labels = mnist_test_digits
    url = str(tmp_path / "feedback.db")
    store = open_store(url)
    store.write([record(f"r{n}", str(labels[n]), images[n]) for n in range(40)])
    store.close()
    config = FeedbackTuneConfig(feedback_db=url, steps=3, batch_size=8, test_limit=500, out_dir=str(tmp_path / "tuned"))
    report = fine_tune(config)
    model, preset, accuracy = load_checkpoint_model(tmp_path / "tuned" / "model.pt")
    assert preset == "googlenet-fast" and accuracy == report["after"]["mnist_test"]
    assert report["feedback"]["learned_from"] == 32 and report["feedback"]["held_out"] == 8
    assert (tmp_path / "tuned" / "report.json").is_file()
    assert report["before"]["mnist_test"] >= 0.99  # the bundled model as served, on the first 500 test digits


def test_too_few_labelled_digits_stop_the_fine_tune_saying_so(tmp_path: Path) -> None:
    url = str(tmp_path / "feedback.db")
    open_store(url).close()
    with pytest.raises(SystemExit, match="too few to learn from"):
        fine_tune(FeedbackTuneConfig(feedback_db=url, steps=1, out_dir=str(tmp_path / "tuned")))
