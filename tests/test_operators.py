"""The operator model of ReadExpression and the stroke generators it is trained and judged on (training/strokes.py,
training/operators.py, server/bundled/operators.onnx)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from proto.contract import OPERATOR_CLASSES, OPERATOR_INPUT, OPERATOR_OUTPUT
from server.pipeline.reading import _prepared
from training.data import REPO_ROOT, load_split
from training.strokes import GENERATORS, SYMBOL_CLASS, SYMBOLS, render_symbol

BUNDLED_OPERATORS = REPO_ROOT / "server" / "bundled" / "operators.onnx"


@pytest.mark.parametrize("generator", GENERATORS)
@pytest.mark.parametrize("height", [24, 90])
def test_every_symbol_renders_as_ink_cropped_to_its_box(generator: str, height: int) -> None:
    rng = np.random.default_rng(height)
    for symbol in SYMBOLS:
        for _ in range(3):
            ink = render_symbol(symbol, generator, rng, height)
            assert ink.dtype == np.float32 and ink.ndim == 2
            assert 0.0 <= ink.min() and ink.max() <= 1.0 and ink.max() > 0.5, symbol
            for edge in (ink[0], ink[-1], ink[:, 0], ink[:, -1]):  # cropped: ink touches every side of the box
                assert edge.max() > 0, f"{symbol!r} by {generator} is not cropped to its ink"
            assert max(ink.shape) <= 1.2 * height, f"{symbol!r} by {generator} is larger than a digit: {ink.shape}"


def test_operators_are_drawn_smaller_than_the_digits_of_their_line() -> None:
    rng = np.random.default_rng(0)
    for generator in GENERATORS:
        widths = [render_symbol("-", generator, rng, 60).shape[1] for _ in range(30)]
        assert 0.25 * 60 <= np.median(widths) <= 0.8 * 60, generator


def test_generators_a_and_b_draw_differently_from_the_same_seed() -> None:
    for symbol in SYMBOLS:
        a = _prepared(render_symbol(symbol, "A", np.random.default_rng(7), 40))
        b = _prepared(render_symbol(symbol, "B", np.random.default_rng(7), 40))
        assert np.abs(a.astype(int) - b.astype(int)).mean() > 2, symbol


def test_unknown_symbols_and_generators_are_refused() -> None:
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="symbol"):
        render_symbol("/", "A", rng, 40)
    with pytest.raises(ValueError, match="generator"):
        render_symbol("+", "C", rng, 40)


@pytest.fixture(scope="module")
def operator_session() -> Any:  # an onnxruntime.InferenceSession
    if not BUNDLED_OPERATORS.is_file():
        pytest.skip(f"{BUNDLED_OPERATORS} is absent: `python -m training.operators --out-dir server/bundled` makes it")
    ort = pytest.importorskip("onnxruntime")
    return ort.InferenceSession(str(BUNDLED_OPERATORS), providers=["CPUExecutionProvider"])


def _classify(session: Any, images: np.ndarray) -> np.ndarray:
    x = images[:, None].astype(np.float32) / 255.0  # the contract: pixel / 255, no MNIST mean or deviation
    probabilities = session.run([OPERATOR_OUTPUT], {OPERATOR_INPUT: x})[0]
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-4)  # the softmax is in the graph
    return probabilities.argmax(axis=1)


def test_bundled_model_has_the_contracts_input_and_output(operator_session: Any) -> None:
    (given,) = operator_session.get_inputs()
    (answer,) = operator_session.get_outputs()
    assert given.name == OPERATOR_INPUT and given.shape[1:] == [1, 28, 28] and given.type == "tensor(float)"
    assert answer.name == OPERATOR_OUTPUT and answer.shape[1:] == [len(OPERATOR_CLASSES)]
    assert isinstance(given.shape[0], str), "the batch dimension is dynamic"


def test_bundled_model_reads_held_out_generator_b_operators(operator_session: Any) -> None:
    rng = np.random.default_rng(12345)  # not a seed the training run's report lists
    for symbol in SYMBOLS:
        images = np.stack([_prepared(render_symbol(symbol, "B", rng, int(rng.integers(24, 91)))) for _ in range(50)])
        right = (_classify(operator_session, images) == OPERATOR_CLASSES.index(SYMBOL_CLASS[symbol])).mean()
        assert right >= 0.96, f"{symbol!r}: {right:.0%} read right"  # held-out accuracy is 98.5-100%


def test_bundled_model_leaves_mnist_test_digits_to_the_digit_classifier(operator_session: Any, mnist_dir: Path) -> None:
    test = load_split("test", mnist_dir)
    images = []
    for image in test.images[:200]:
        rows, cols = np.flatnonzero(image.any(axis=1)), np.flatnonzero(image.any(axis=0))
        images.append(_prepared(image[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1].astype(np.float32) / 255.0))
    digits = (_classify(operator_session, np.stack(images)) == OPERATOR_CLASSES.index("digit")).mean()
    assert digits >= 0.99, f"only {digits:.1%} of MNIST test digits called a digit"
