"""The second opinion: a second digit classifier the reading calls average with the served model
(server/pipeline/second_opinion.py, training/second_opinion.py, server/bundled/second-opinion.onnx)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from loadtest.layouts import compose_table
from proto.contract import NUM_CLASSES, SECOND_OPINION_INPUT, SECOND_OPINION_OUTPUT
from proto.mnist.v1 import classifier_pb2 as pb
from server.app import MnistServer
from server.config import BUNDLED_MODEL, SECOND_OPINION_MODEL, ServeConfig, validate
from server.errors import NotReady
from server.pipeline.second_opinion import SecondOpinion, SecondOpinionError, averaged
from tests.support import Harness, test_config
from tests.test_reading_layouts import digit_ink, png, written
from training.data import REPO_ROOT
from training.operators import prepared_digits
from training.strokes import render_symbol

OPERATORS = REPO_ROOT / "server" / "bundled" / "operators.onnx"


def constant_opinion(path: Path, row: list[float], batch: str | int = "batch") -> Path:
    """A second-opinion model that answers `row` whatever it is shown (0 x the input, plus the row)."""
    import onnx
    from onnx import TensorProto, helper

    one_hot = np.asarray([row], np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("ReduceSum", [SECOND_OPINION_INPUT, "axes"], ["summed"], keepdims=0),
            helper.make_node("Reshape", ["summed", "column"], ["per_image"]),
            helper.make_node("Mul", ["per_image", "zero"], ["nothing"]),
            helper.make_node("Add", ["nothing", "one_hot"], [SECOND_OPINION_OUTPUT]),
        ],
        "constant",
        [helper.make_tensor_value_info(SECOND_OPINION_INPUT, TensorProto.FLOAT, [batch, 1, 28, 28])],
        [helper.make_tensor_value_info(SECOND_OPINION_OUTPUT, TensorProto.FLOAT, [batch, NUM_CLASSES])],
        [
            helper.make_tensor("axes", TensorProto.INT64, [3], [1, 2, 3]),
            helper.make_tensor("column", TensorProto.INT64, [2], [-1, 1]),
            helper.make_tensor("zero", TensorProto.FLOAT, [], [0.0]),
            helper.make_tensor("one_hot", TensorProto.FLOAT, [1, NUM_CLASSES], one_hot.ravel().tolist()),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, path)
    return path


def png_of(image: np.ndarray, scale: int = 3) -> bytes:
    """An MNIST digit (light on dark) as a dark-on-white PNG, larger, as a photographed page would hold it."""
    picture = Image.fromarray(255 - image).resize((28 * scale, 28 * scale), Image.Resampling.BICUBIC)
    out = io.BytesIO()
    picture.save(out, "PNG")
    return out.getvalue()


def test_averaging_weighs_both_alike_and_without_a_second_opinion_is_the_model_alone() -> None:
    model = np.array([[0.6, 0.4, 0, 0, 0, 0, 0, 0, 0, 0]])
    second = np.array([[0.1, 0.9, 0, 0, 0, 0, 0, 0, 0, 0]])
    np.testing.assert_allclose(averaged(model, second), [[0.35, 0.65, 0, 0, 0, 0, 0, 0, 0, 0]])
    assert averaged(model, None) is model


def test_a_file_that_is_not_a_second_opinion_is_refused_naming_what_is_wrong(tmp_path: Path) -> None:
    with pytest.raises(SecondOpinionError, match="expected digit \\[batch, 1, 28, 28\\]"):
        SecondOpinion(OPERATORS)  # an ONNX model, but of symbols, not digits
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"not a model")
    with pytest.raises(SecondOpinionError, match="cannot be loaded"):
        SecondOpinion(broken)
    with pytest.raises(SecondOpinionError, match="takes a fixed batch of 1; expected any"):
        SecondOpinion(constant_opinion(tmp_path / "one.onnx", [0.1] * NUM_CLASSES, batch=1))
    with pytest.raises(SecondOpinionError, match="rows summing to 10; expected a softmax"):
        SecondOpinion(constant_opinion(tmp_path / "logits.onnx", [1.0] * NUM_CLASSES))
    with pytest.raises(SystemExit, match="second-opinion model .*absent.onnx does not exist"):
        validate(ServeConfig(second_opinion=str(tmp_path / "absent.onnx"), model=str(BUNDLED_MODEL)))


def test_the_bundled_second_opinion_averaged_with_the_bundled_model_misreads_fewer_mnist_test_digits(
    mnist_test_digits,
) -> None:
    from training.second_opinion import classifier_probabilities

    images, labels = mnist_test_digits
    crops = prepared_digits(images, None, "preparing MNIST test digits")  # as the server cuts them out of a page
    own = SecondOpinion(SECOND_OPINION_MODEL).probabilities(crops)
    np.testing.assert_allclose(own.sum(axis=1), 1.0, atol=1e-4)  # the softmax is in the graph
    served = classifier_probabilities(str(BUNDLED_MODEL), crops)
    served_errors = int((served.argmax(1) != labels).sum())
    averaged_errors = int((averaged(served, own).argmax(1) != labels).sum())
    assert int((own.argmax(1) == labels).sum()) >= 0.99 * len(labels), "the second opinion alone reads 99%"
    # on the served model's scale: its label smoothing (a cap near 0.955) is undone, or every reading's confidence,
    # a product over its digits, would fall (a 41-digit table's from about 0.8 to 0.3)
    assert np.median(own.max(axis=1)) >= 0.99 and np.median(averaged(served, own).max(axis=1)) >= 0.99
    assert averaged_errors < 0.9 * served_errors, (averaged_errors, served_errors)


def read_all(harness: Harness, three: np.ndarray, table: bytes, sum_of_threes: bytes) -> dict[str, object]:
    """What each reading call answers, and Classify, for the same inputs."""
    number = harness.stub.ReadDigits(pb.ReadDigitsRequest(image=png_of(three)), timeout=20)
    rows = harness.stub.ReadTable(pb.ReadTableRequest(image=table), timeout=30).rows
    expression = harness.stub.ReadExpression(pb.ReadExpressionRequest(image=sum_of_threes), timeout=20)
    answer = harness.stub.Classify(pb.ClassifyRequest(raw=three.tobytes()), timeout=20)
    return {
        "number": number.text,
        "confidence": number.digits[0].confidence,
        "cells": [cell.text for row in rows for cell in row.cells],
        "expression": (expression.text, expression.value),
        "classify": (answer.digit, answer.confidence),
    }


def test_the_reading_calls_average_the_second_opinion_in_and_classify_never_asks_it(
    tmp_path: Path, mnist_test_digits
) -> None:
    images, labels = mnist_test_digits
    three = images[int(np.flatnonzero(labels == 3)[0])]
    table = compose_table(np.random.default_rng(5), images, labels, ruled=True, photo=False).image
    plus = render_symbol("+", "B", np.random.default_rng(0), 40)
    sum_of_threes = png(written([digit_ink(mnist_test_digits, 3, 50), plus, digit_ink(mnist_test_digits, 3, 50)], 50))
    opinions = {
        "none": "none",
        "sure of 7": str(constant_opinion(tmp_path / "seven.onnx", [0.0] * 7 + [1.0, 0.0, 0.0])),
        "no idea": str(constant_opinion(tmp_path / "uniform.onnx", [0.1] * NUM_CLASSES)),
    }
    read = {}
    for name, opinion in opinions.items():
        harness = Harness(MnistServer(test_config(second_opinion=opinion, max_table_cells=80)).start())
        try:
            read[name] = read_all(harness, three, table, sum_of_threes)
        finally:
            harness.close()
    alone, seven, no_idea = read["none"], read["sure of 7"], read["no idea"]
    assert (alone["number"], alone["expression"]) == ("3", ("3+3", "6")) and set("".join(alone["cells"])) != {"7"}
    # averaged, not replaced: a sure opinion outweighs a model not itself sure, at half the weight ...
    assert (seven["number"], seven["expression"]) == ("7", ("7+7", "14")) and set("".join(seven["cells"])) == {"7"}
    assert 0.5 <= seven["confidence"] < 0.55, seven["confidence"]
    # ... and an opinion with no preference changes no reading, only halves the model's distance from it
    assert (no_idea["number"], no_idea["cells"], no_idea["expression"]) == (
        alone["number"],
        alone["cells"],
        alone["expression"],
    )
    assert no_idea["confidence"] == pytest.approx((alone["confidence"] + 0.1) / 2, abs=1e-4)
    assert alone["classify"] == seven["classify"] == no_idea["classify"], "Classify is the served model's alone"


def test_a_version_whose_second_opinion_cannot_be_loaded_does_not_start(tmp_path: Path) -> None:
    wrong = tmp_path / "wrong.onnx"
    wrong.write_bytes(OPERATORS.read_bytes())
    with pytest.raises(NotReady, match="second-opinion model .*wrong.onnx has inputs .*; expected digit"):
        MnistServer(test_config(second_opinion=str(wrong))).start()  # start() stops what it began, then raises


def test_a_quick_training_run_writes_a_second_opinion_the_server_can_load_and_reports_it(
    tmp_path: Path, mnist_dir: Path
) -> None:
    from training.second_opinion import MAX_ONNX_BYTES, SecondOpinionConfig, run

    report = run(
        SecondOpinionConfig(
            out_dir=str(tmp_path), epochs=1, train_limit=512, test_limit=300, paged=0.5, data_dir=str(mnist_dir)
        )
    )
    shipped = tmp_path / "second-opinion.onnx"
    assert 0 < shipped.stat().st_size <= MAX_ONNX_BYTES and report["weights"].startswith("stored as fp16")
    assert report["fp16_storage_max_abs_change"] <= 2e-3
    probabilities = SecondOpinion(shipped).probabilities(np.zeros((3, 28, 28), np.uint8))
    assert probabilities.shape == (3, NUM_CLASSES)
    judged = report["held_out"]["MNIST test"]
    assert judged["digits"] == 300 and report["held_out"]["MNIST test on pages"]["digits"] == 300
    assert report["fp16_storage_answers_changed"]["of"] == 300
    import onnx

    graph = onnx.load(str(shipped)).graph
    stored = {w.name: w.data_type for w in graph.initializer}
    assert any(t == onnx.TensorProto.FLOAT16 for t in stored.values()), "weights stored as fp16"
    assert all(
        n.op_type == "Cast" for n in graph.node if n.input and stored.get(n.input[0]) == onnx.TensorProto.FLOAT16
    )
    assert not (tmp_path / "second-opinion.new.onnx").exists(), "the shipped name only once every check passed"
    assert (tmp_path / "second-opinion.report.json").is_file()


def test_many_candidates_run_in_chunks_and_give_the_rows_one_by_one_runs_give(mnist_test_digits) -> None:
    from server.pipeline.side_models import CHUNK

    images = mnist_test_digits[0][: 2 * CHUNK + 2]
    opinion = SecondOpinion(SECOND_OPINION_MODEL)
    together = opinion.probabilities(images)
    one_by_one = np.concatenate([opinion.probabilities(image[None]) for image in images])
    np.testing.assert_allclose(together, one_by_one, atol=1e-6)
    assert opinion.probabilities(images[:0]).shape == (0, NUM_CLASSES)


def test_a_run_into_the_bundled_folder_keeps_the_shipped_file_unless_the_average_reads_at_least_as_well(
    tmp_path: Path,
) -> None:
    from training.second_opinion import refuse_to_replace_the_bundled_file_with_a_worse_one as guard

    worse, better = {"averaged": 0.990, "classifier": 0.995}, {"averaged": 0.996, "classifier": 0.995}
    with pytest.raises(RuntimeError, match="keeps its file"):
        guard(SECOND_OPINION_MODEL.parent, worse)
    guard(SECOND_OPINION_MODEL.parent, better)
    guard(tmp_path, worse)  # a trial run elsewhere writes what it made
