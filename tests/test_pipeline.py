"""server.pipeline.ModelPipeline: payloads in, prediction arrays out, in order; per-item errors named by index."""

from __future__ import annotations

import asyncio
import io
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from server.backends.base import Backend
from server.backends.null_backend import FIXED_ROW, NullBackend
from server.backends.onnxruntime_backend import OnnxRuntimeBackend
from server.config import BUNDLED_MODEL
from server.errors import InvalidInput
from server.pipeline import ENCODED, RAW, ModelPipeline, PipelineSettings
from training.data import load_split

GOOD = bytes(784)


def settings(max_batch_size: int = 8) -> PipelineSettings:
    return PipelineSettings(
        max_batch_size=max_batch_size, max_queue_size=64, max_queue_delay=0, max_image_pixels=10_000_000
    )


def with_pipeline(
    backend: Backend,
    body: Callable[[ModelPipeline], Awaitable[Any]],
    max_batch_size: int = 8,
    on_predictions: Callable[[np.ndarray, np.ndarray], None] | None = None,
) -> Any:
    """Run `body(pipeline)` on a fresh event loop with a started pipeline, closed afterwards."""

    async def main() -> Any:
        hooks = {} if on_predictions is None else {"on_predictions": on_predictions}
        pipeline = ModelPipeline(backend, settings(max_batch_size), **hooks)
        pipeline.start()
        try:
            return await body(pipeline)
        finally:
            await pipeline.close()

    return asyncio.run(main())


def png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def digits(mnist_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    test = load_split("test", mnist_dir)
    return test.images[:64], test.labels[:64]


def model() -> OnnxRuntimeBackend:
    return OnnxRuntimeBackend(BUNDLED_MODEL, provider="cpu")


# --- answers -------------------------------------------------------------------------------------------


def test_a_batch_of_raw_digits_is_classified_into_arrays_in_order(digits) -> None:
    images, labels = digits
    predictions = with_pipeline(model(), lambda p: p.classify([image.tobytes() for image in images]))
    assert predictions.probabilities.shape == (64, 10) and predictions.probabilities.dtype == np.float32
    assert predictions.digits.shape == (64,) and predictions.confidences.shape == (64,) and len(predictions) == 64
    assert (predictions.digits == labels).mean() >= 0.95
    np.testing.assert_array_equal(predictions.digits, predictions.probabilities.argmax(1))
    np.testing.assert_array_equal(predictions.confidences, predictions.probabilities.max(1))
    assert predictions.model_version == model().describe().model_version


def test_raw_digits_split_across_batches_get_the_same_answers_as_one_run(digits) -> None:
    """64 images through batches of 8 answer exactly as the backend does on the whole normalized batch."""
    images, _ = digits
    backend = model()
    expected = backend.run(backend.describe().normalization.apply(images[:, None]))
    predictions = with_pipeline(backend, lambda p: p.classify([image.tobytes() for image in images]))
    np.testing.assert_allclose(predictions.probabilities, expected, atol=1e-6)


def test_a_mixed_batch_of_raw_and_png_digits_keeps_its_order(digits) -> None:
    images, labels = digits
    payloads = [png(images[i]) if i % 3 == 0 else images[i].tobytes() for i in range(16)]
    kinds = [ENCODED if i % 3 == 0 else RAW for i in range(16)]
    predictions = with_pipeline(model(), lambda p: p.classify(payloads, kinds))
    assert predictions.probabilities.shape == (16, 10)
    assert predictions.digits.tolist() == labels[:16].tolist()


def test_the_null_backend_answers_every_image_with_its_fixed_row() -> None:
    predictions = with_pipeline(NullBackend(), lambda p: p.classify([GOOD] * 20))
    assert predictions.digits.tolist() == [0] * 20
    np.testing.assert_array_equal(predictions.probabilities, np.tile(FIXED_ROW, (20, 1)))
    assert predictions.model_version == "0"


# --- per-item errors --------------------------------------------------------------------------------------


def invalid(payloads: list[bytes], kinds: list[str | None] | None = None) -> InvalidInput:
    async def body(pipeline: ModelPipeline) -> None:
        await pipeline.classify(payloads, kinds)

    with pytest.raises(InvalidInput) as err:
        with_pipeline(NullBackend(), body)
    return err.value


@pytest.mark.parametrize("kinds", [None, [RAW] * 6], ids=["no-kinds", "all-raw"])
@pytest.mark.parametrize("index", [0, 3, 5])
def test_a_raw_item_of_the_wrong_length_is_named_by_its_index(index: int, kinds) -> None:
    payloads = [GOOD] * 6
    payloads[index] = bytes(783)
    error = invalid(payloads, kinds)
    assert error.index == index and "784" in str(error) and "783" in str(error)


def test_raw_items_all_of_one_wrong_length_name_the_first() -> None:
    error = invalid([bytes(100)] * 4)
    assert error.index == 0 and "784" in str(error)


def test_a_raw_item_of_the_wrong_length_in_a_mixed_batch_is_named_by_its_index(digits) -> None:
    error = invalid([png(digits[0][0]), GOOD, b"\1\2"], [ENCODED, RAW, RAW])
    assert error.index == 2 and "784" in str(error)


def test_an_item_without_an_image_is_named_by_its_index() -> None:
    error = invalid([GOOD, b"", GOOD], [RAW, None, RAW])
    assert error.index == 1 and "no image" in str(error)


def test_an_encoded_item_that_is_not_an_image_is_named_by_its_index() -> None:
    error = invalid([GOOD, GOOD, GOOD, b"certainly not a PNG"], [RAW, RAW, RAW, ENCODED])
    assert error.index == 3 and "not an image" in str(error)


@pytest.mark.parametrize(
    ("bad", "expected"),
    [
        ({1: (ENCODED, b"junk"), 4: (ENCODED, b"more junk")}, 1),
        ({2: (ENCODED, b"junk"), 5: (RAW, b"short")}, 2),  # the cheap raw check finds 5 first; 2 is still reported
        ({2: (RAW, b"short"), 5: (ENCODED, b"junk")}, 2),
        ({1: (None, b""), 3: (RAW, b"short")}, 1),
        ({0: (ENCODED, b""), 1: (None, b"")}, 0),
    ],
    ids=["encoded-encoded", "encoded-raw", "raw-encoded", "none-raw", "empty-encoded-none"],
)
def test_with_two_bad_items_the_lower_index_is_reported(digits, bad: dict, expected: int) -> None:
    payloads: list[bytes] = [png(digits[0][i]) if i % 2 else digits[0][i].tobytes() for i in range(6)]
    kinds: list[str | None] = [ENCODED if i % 2 else RAW for i in range(6)]
    for index, (kind, payload) in bad.items():
        kinds[index], payloads[index] = kind, payload
    assert invalid(payloads, kinds).index == expected


def test_two_bad_raw_items_report_the_lower_index() -> None:
    payloads = [GOOD] * 8
    payloads[6], payloads[3] = b"x", bytes(785)
    error = invalid(payloads)
    assert error.index == 3 and "785" in str(error)


def test_an_empty_payload_list_is_invalid_input() -> None:
    error = invalid([])
    assert "no images" in str(error)


# --- the predictions hook ------------------------------------------------------------------------------------


@pytest.mark.parametrize("engine", ["null", "onnxruntime"])
def test_the_predictions_hook_is_called_once_per_batch_not_per_image(engine: str, digits) -> None:
    calls: list[tuple[np.ndarray, np.ndarray]] = []
    backend = NullBackend() if engine == "null" else model()
    payloads = [image.tobytes() for image in digits[0][:16]]
    predictions = with_pipeline(
        backend, lambda p: p.classify(payloads), max_batch_size=16, on_predictions=lambda d, c: calls.append((d, c))
    )
    assert len(calls) == 1
    np.testing.assert_array_equal(calls[0][0], predictions.digits)
    np.testing.assert_array_equal(calls[0][1], predictions.confidences)


def test_a_request_split_over_batches_calls_the_hook_once_per_batch() -> None:
    calls: list[int] = []
    with_pipeline(
        NullBackend(),
        lambda p: p.classify([GOOD] * 20),
        max_batch_size=8,
        on_predictions=lambda d, c: calls.append(len(d)),
    )
    assert calls == [8, 8, 4]
