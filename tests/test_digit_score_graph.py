"""export.digit_score_graph: the digit detector inside the model graph computes what the numpy detector computes.

The numpy detector (server/pipeline/digit_detector.py) stays the reference and the fallback for model files
without the output; these tests hold the bundled models' `digit_score` to it on real MNIST test
digits and on non-digits (letters, blanks, noise, lines, checkerboards), fp32 and fp16.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from PIL import Image, ImageDraw, ImageFont

from export.digit_score_graph import PREFIX, attach, build, detach, has_digit_score, with_digit_score
from export.onnx_export import SCORE_TOLERANCE
from proto.contract import DIGIT_SCORE, INPUT_NAME, MNIST_NORMALIZATION, OUTPUT_NAMES, read_metadata, variant_path
from server.config import BUNDLED_MODEL, DIGIT_DETECTOR
from server.pipeline.digit_detector import DigitDetector
from training.data import load_split
from training.fit_digit_detector import quick_non_digits

FP16_MODEL = variant_path(BUNDLED_MODEL, "fp16")


@pytest.fixture(scope="module")
def detector() -> DigitDetector:
    return DigitDetector.load(DIGIT_DETECTOR)


def session(model: Path | bytes) -> ort.InferenceSession:
    source = str(model) if isinstance(model, Path) else model
    return ort.InferenceSession(source, providers=["CPUExecutionProvider"])


def printed_letters() -> np.ndarray:
    """Capitals in Pillow's default font, shrunk to raw 28x28 fields: what the model calls 4 or 8 with confidence."""
    fields = []
    for char in "AEFHKMNPRVWXY":
        image = Image.new("L", (140, 140), 0)
        font = ImageFont.load_default(size=105)
        draw = ImageDraw.Draw(image)
        left, top, right, bottom = draw.textbbox((0, 0), char, font=font)
        draw.text(((140 - (right - left)) / 2 - left, (140 - (bottom - top)) / 2 - top), char, fill=255, font=font)
        fields.append(np.asarray(image.resize((28, 28), Image.Resampling.BILINEAR)))
    return MNIST_NORMALIZATION.apply(np.stack(fields))[:, None]


@pytest.fixture(scope="module")
def inputs(mnist_dir: Path) -> dict[str, np.ndarray]:
    """Model inputs by kind: 2,000 real test digits, then non-digits of eight kinds."""
    test = load_split("test", mnist_dir)
    kinds = {"mnist_test": MNIST_NORMALIZATION.apply(test.images[:2000])[:, None]}
    kinds.update(quick_non_digits(30))
    kinds["printed_letters"] = printed_letters()
    kinds["constant_fields"] = MNIST_NORMALIZATION.apply(np.repeat(np.arange(0, 256, 15, dtype=np.uint8), 784))
    kinds["constant_fields"] = kinds["constant_fields"].reshape(-1, 1, 28, 28)
    return kinds


@pytest.mark.parametrize("model", [BUNDLED_MODEL, FP16_MODEL, "built now"], ids=["fp32", "fp16", "built-now"])
def test_the_in_graph_score_is_the_numpy_detectors(model: Path | str, detector: DigitDetector, inputs) -> None:
    """Same score to float32 rounding, same is_digit except for a score within a hair of the threshold: the shipped
    models, and the subgraph as this code builds it now."""
    if model == "built now":
        run = session(with_digit_score(onnx.load(str(BUNDLED_MODEL)), detector).SerializeToString())
    else:
        run = session(model)
    for kind, x in inputs.items():
        probabilities, scores = run.run(["probabilities", DIGIT_SCORE], {INPUT_NAME: x})
        reference = detector.score(x, probabilities)  # the model's own probabilities, as the server passes them
        assert scores.shape == (len(x),) and scores.dtype == np.float32
        assert np.abs(scores - reference).max() <= SCORE_TOLERANCE, kind
        changed = (scores >= detector.threshold) != (reference >= detector.threshold)
        assert not (changed & (np.abs(reference - detector.threshold) > SCORE_TOLERANCE)).any(), kind
    digits = run.run([DIGIT_SCORE], {INPUT_NAME: inputs["mnist_test"]})[0]
    assert (digits >= detector.threshold).mean() >= 0.97  # what the score is for, as a sanity check of the data
    letters = run.run([DIGIT_SCORE], {INPUT_NAME: inputs["letters"]})[0]
    assert (letters < detector.threshold).mean() >= 0.9


def test_one_image_alone_scores_as_in_a_batch(detector: DigitDetector, inputs) -> None:
    run = session(BUNDLED_MODEL)
    x = np.concatenate([inputs["mnist_test"][:6], inputs["lines"][:3], inputs["uniform_noise"][:3]])
    batch = run.run([DIGIT_SCORE], {INPUT_NAME: x})[0]
    alone = np.concatenate([run.run([DIGIT_SCORE], {INPUT_NAME: x[i : i + 1]})[0] for i in range(len(x))])
    np.testing.assert_allclose(alone, batch, atol=1e-5)


def test_extreme_and_undefined_inputs_score_like_the_numpy_detector(detector: DigitDetector) -> None:
    """Far outside the normalized range, and NaN (never from pixels): finite, and NaN is not a digit."""
    x = np.stack([np.full((1, 28, 28), v, np.float32) for v in (-1e6, 0.0, 1e6, np.nan)])
    probabilities, scores = session(BUNDLED_MODEL).run(["probabilities", DIGIT_SCORE], {INPUT_NAME: x})
    assert np.all((scores >= 0) & (scores <= 1)), scores
    np.testing.assert_allclose(scores, detector.score(x, probabilities), atol=SCORE_TOLERANCE)
    assert scores[3] < detector.threshold


def test_the_bundled_models_carry_the_detectors_threshold_and_description(detector: DigitDetector) -> None:
    for model in (BUNDLED_MODEL, FP16_MODEL):
        proto = onnx.load(str(model))
        meta = read_metadata(proto)
        assert has_digit_score(proto) and [o.name for o in proto.graph.output] == [*OUTPUT_NAMES, DIGIT_SCORE]
        assert meta.digit_threshold == detector.threshold
        assert meta.digit_detector["false_alarm_mnist_test"] == detector.describe()["false_alarm_mnist_test"]


def test_detach_gives_the_classifier_back_and_attach_puts_the_same_score_on_it(detector, inputs) -> None:
    proto = onnx.load(str(BUNDLED_MODEL))
    classifier, subgraph = detach(proto)
    assert subgraph is not None and not has_digit_score(classifier)
    assert not any(n.name.startswith(PREFIX) for n in classifier.graph.node)
    assert not any(t.name.startswith(PREFIX) for t in classifier.graph.initializer)
    assert detach(classifier)[1] is None
    x = inputs["mnist_test"][:64]
    alone = session(classifier.SerializeToString()).run(None, {INPUT_NAME: x})
    again = session(attach(classifier, subgraph).SerializeToString()).run(None, {INPUT_NAME: x})
    full = session(BUNDLED_MODEL).run(None, {INPUT_NAME: x})
    for i in range(len(OUTPUT_NAMES)):  # the classifier's answers do not depend on the score being there
        np.testing.assert_array_equal(alone[i], full[i])
    np.testing.assert_array_equal(again[2], full[2])
    with pytest.raises(ValueError, match="already has"):
        attach(proto, build(detector))
    rebuilt = with_digit_score(proto, detector)  # replaces, never doubles
    assert [o.name for o in rebuilt.graph.output].count(DIGIT_SCORE) == 1
