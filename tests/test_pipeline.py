"""server.pipeline.model_pipeline.ModelPipeline: payloads in, prediction arrays out, in order; per-item errors
named by index."""

from __future__ import annotations

import asyncio
import dataclasses
import io
import logging
import struct
import threading
import time
import zlib
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

import server.pipeline.model_pipeline
from server.config import BUNDLED_MODEL, DIGIT_DETECTOR
from server.engine.backends.base import Backend, BackendInfo, BackendOutput
from server.engine.backends.null_backend import FIXED_ROW, FIXED_SCORE, NullBackend
from server.engine.backends.onnxruntime_backend import OnnxRuntimeBackend
from server.errors import DeadlineExpired, InvalidInput
from server.pipeline.digit_detector import DigitDetector
from server.pipeline.model_pipeline import ENCODED, RAW, ModelPipeline, PipelineSettings
from server.pipeline.preprocess import DecodeStopped
from server.pipeline.preprocess import from_opened as real_from_opened
from training.data import load_split

GOOD = bytes(range(256)) * 3 + bytes(16)  # any raw image with contrast (a blank one is refused)
BLANK = bytes(784)


def settings(max_batch_size: int = 8) -> PipelineSettings:
    return PipelineSettings(
        max_batch_size=max_batch_size, max_queue_size=64, max_queue_delay=0, max_image_pixels=10_000_000
    )


def with_pipeline(
    backend: Backend,
    body: Callable[[ModelPipeline], Awaitable[Any]],
    max_batch_size: int = 8,
    on_predictions: Callable[[np.ndarray, np.ndarray, np.ndarray], None] | None = None,
) -> Any:
    """Run `body(pipeline)` on a fresh event loop with a started pipeline, closed afterwards."""
    return run_pipeline(body, backend, on_predictions=on_predictions, max_batch_size=max_batch_size)


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
    expected = backend.run(backend.describe().normalization.apply(images[:, None])).probabilities
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
        backend,
        lambda p: p.classify(payloads),
        max_batch_size=16,
        on_predictions=lambda d, c, _is_digit: calls.append((d, c)),
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
        on_predictions=lambda d, c, _is_digit: calls.append(len(d)),
    )
    assert calls == [8, 8, 4]


# --- decode limits and the decode budget -----------------------------------------------------------------------------


def run_pipeline(
    body: Callable[[ModelPipeline], Awaitable[Any]],
    backend: Backend | None = None,
    detector: Any = None,
    on_decoding: Callable[[int], None] | None = None,
    on_predictions: Callable[[np.ndarray, np.ndarray, np.ndarray], None] | None = None,
    **overrides: Any,
) -> Any:
    """Run `body(pipeline)` with settings() changed by `overrides`, and optionally a detector and hooks."""

    async def main() -> Any:
        hooks: dict[str, Any] = {"detector": detector}
        if on_decoding is not None:
            hooks["on_decoding"] = on_decoding
        if on_predictions is not None:
            hooks["on_predictions"] = on_predictions
        pipeline = ModelPipeline(backend or NullBackend(), dataclasses.replace(settings(), **overrides), **hooks)
        pipeline.start()
        try:
            return await body(pipeline)
        finally:
            await pipeline.close()

    return asyncio.run(main())


def page_png(width: int, height: int) -> bytes:
    """A white page of the size with one dark bar on it (a "1"): cheap to make and to send at any size."""
    page = np.full((height, width), 255, np.uint8)
    page[height // 4 : height * 3 // 4, width * 9 // 20 : width * 11 // 20] = 0
    return png(page)


def header_only_png(width: int, height: int) -> bytes:
    """A PNG that declares its size and has no pixel data: it can only fail if it is ever decoded."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
    return b"\x89PNG\r\n\x1a\n" + header + chunk(b"IDAT", b"")


def test_a_request_over_the_per_request_pixel_limit_is_refused_before_any_decoding() -> None:
    decoding: list[int] = []

    async def body(pipeline: ModelPipeline) -> None:
        await pipeline.classify([header_only_png(600, 600)] * 3, [ENCODED] * 3)

    with pytest.raises(InvalidInput, match=r"1,080,000 pixels, over the limit of 1,000,000 per request") as err:
        run_pipeline(body, on_decoding=decoding.append, max_request_pixels=1_000_000)
    assert err.value.index is None  # the request as a whole, not one image
    assert decoding == []  # no pixel budget was taken: nothing was decoded
    with pytest.raises(InvalidInput, match="damaged or truncated"):  # had they been decoded, they would have failed
        run_pipeline(body, max_request_pixels=10_000_000)


def test_a_request_of_exactly_the_per_request_pixel_limit_is_decoded() -> None:
    predictions = run_pipeline(
        lambda p: p.classify([page_png(1000, 500), GOOD, page_png(500, 1000)], [ENCODED, RAW, ENCODED]),
        max_request_pixels=1_000_000,
    )
    assert len(predictions) == 3


def test_a_large_jpeg_counts_its_reduced_decode_size_against_the_request_limit() -> None:
    buffer = io.BytesIO()
    big = Image.new("L", (6000, 6000), 255)
    big.paste(0, (2800, 1500, 3200, 4500))
    big.save(buffer, "JPEG", quality=80)
    predictions = run_pipeline(
        lambda p: p.classify([buffer.getvalue()], [ENCODED]), max_image_pixels=3_000_000, max_request_pixels=3_000_000
    )  # 36 MP as stored; decoded at 1/4: 2.25 MP
    assert len(predictions) == 1


def test_many_large_images_in_flight_never_decode_more_pixels_at_once_than_the_global_budget() -> None:
    image_pixels = 1000 * 1000
    capacity = image_pixels * 5 // 2  # room for two at a time, while there are four decoding threads
    decoding: list[int] = []
    large = page_png(1000, 1000)

    async def body(pipeline: ModelPipeline) -> list:
        requests = [pipeline.classify([large] * 4, [ENCODED] * 4) for _ in range(3)]
        return await asyncio.wait_for(asyncio.gather(*requests), 20)

    answers = run_pipeline(
        body, on_decoding=decoding.append, max_decoding_pixels=capacity, preprocess_workers=4, max_request_pixels=10**8
    )
    assert [len(a) for a in answers] == [4, 4, 4]
    assert max(decoding) <= capacity
    assert max(decoding) == 2 * image_pixels  # the budget was shared: two images decoded at once
    assert decoding[-1] == 0 and len(decoding) == 2 * 12  # each image taken once and given back once


# --- blank raw images -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("index", [0, 2, 5])
def test_a_blank_raw_image_is_refused_naming_its_index(index: int) -> None:
    payloads = [GOOD] * 6
    payloads[index] = BLANK
    error = invalid(payloads)
    assert error.index == index and "blank" in str(error)


@pytest.mark.parametrize("value", [0, 128, 255])
def test_raw_images_of_one_gray_level_are_blank(value: int) -> None:
    error = invalid([GOOD, bytes([value]) * 784], [RAW, RAW])
    assert error.index == 1 and "blank" in str(error)


def test_a_blank_raw_image_in_a_mixed_batch_is_refused_naming_its_index() -> None:
    error = invalid([page_png(60, 60), GOOD, page_png(80, 40), BLANK, GOOD], [ENCODED, RAW, ENCODED, RAW, RAW])
    assert error.index == 3 and "blank" in str(error)


def test_a_blank_raw_image_after_a_raw_image_of_the_wrong_length_is_not_the_one_reported() -> None:
    error = invalid([page_png(60, 60), b"short", BLANK], [ENCODED, RAW, RAW])
    assert error.index == 1 and "784" in str(error)


def test_a_blank_raw_image_after_an_undecodable_encoded_one_reports_the_lower_index() -> None:
    # the lower index wins whichever check finds it (see test_with_two_bad_items_the_lower_index_is_reported)
    error = invalid([GOOD, b"junk", GOOD, BLANK], [RAW, ENCODED, RAW, RAW])
    assert error.index == 1 and "not an image" in str(error)


def test_a_blank_raw_image_before_a_raw_image_of_the_wrong_length_reports_the_lower_index() -> None:
    # the lower index wins: the blank image at 1, not the wrong length at 3
    error = invalid([GOOD, BLANK, GOOD, b"short"])
    assert error.index == 1 and "blank" in str(error)


# --- cancelled and late requests stop decoding -----------------------------------------------------------------------


class GatedDecode:
    """Stands in for server.pipeline.model_pipeline.from_opened: each call waits at a gate (as if busy inside a long
    decode step),
    then runs the real one and records how it ended."""

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.lock = threading.Lock()
        self.calls = 0
        self.outcomes: list[str] = []

    def __call__(self, opened, norm, stop):
        with self.lock:
            self.calls += 1
        assert self.gate.wait(10), "the test never opened the gate"
        try:
            result = real_from_opened(opened, norm, stop)
        except DecodeStopped as stopped:
            self.outcomes.append(str(stopped))
            raise
        self.outcomes.append("decoded")
        return result

    async def until_calls(self, count: int) -> None:
        for _ in range(1000):
            if self.calls >= count:
                return
            await asyncio.sleep(0.005)
        raise AssertionError(f"only {self.calls} of {count} decodes started")


async def until_idle(pipeline: ModelPipeline, within: float) -> float:
    """Seconds until the decode budget is all given back (fails after `within`)."""
    started = time.monotonic()
    while pipeline.decode_budget.in_use:
        assert time.monotonic() - started < within, f"still {pipeline.decode_budget.in_use} pixels decoding"
        await asyncio.sleep(0.002)
    return time.monotonic() - started


def test_a_cancelled_request_stops_its_decoding_threads_at_their_next_step(monkeypatch) -> None:
    gated = GatedDecode()
    monkeypatch.setattr(server.pipeline.model_pipeline, "from_opened", gated)

    async def body(pipeline: ModelPipeline) -> None:
        request = asyncio.ensure_future(pipeline.classify([page_png(60, 60)] * 10, [ENCODED] * 10))
        await gated.until_calls(2)  # both decoding threads are inside a decode; the other 8 images wait
        request.cancel()
        with pytest.raises(asyncio.CancelledError):
            await request
        assert pipeline.decode_budget.in_use == 2 * 60 * 60  # the running decodes still hold their pixels
        gated.gate.set()
        await until_idle(pipeline, 5.0)
        assert gated.outcomes == ["the caller went away"] * 2  # stopped at the next checkpoint, not finished
        assert gated.calls == 2  # and none of the waiting images was started

    run_pipeline(body, preprocess_workers=2)


def test_a_request_whose_deadline_passes_while_decoding_stops_and_reports_deadline_expired(monkeypatch) -> None:
    gated = GatedDecode()
    monkeypatch.setattr(server.pipeline.model_pipeline, "from_opened", gated)

    async def body(pipeline: ModelPipeline) -> None:
        deadline = time.monotonic() + 0.2
        request = asyncio.ensure_future(pipeline.classify([page_png(60, 60)] * 4, [ENCODED] * 4, deadline))
        await gated.until_calls(2)
        while time.monotonic() <= deadline:  # both decodes are still inside their step when the deadline passes
            await asyncio.sleep(0.005)
        assert not request.done() and gated.calls == 2
        gated.gate.set()
        with pytest.raises(DeadlineExpired, match="deadline"):
            await asyncio.wait_for(request, 5)
        await until_idle(pipeline, 5.0)
        assert set(gated.outcomes) == {"deadline expired while decoding"}

    run_pipeline(body, preprocess_workers=2)


def test_the_decode_pool_goes_idle_soon_after_a_request_of_many_large_pngs_is_cancelled(monkeypatch) -> None:
    started: list[int] = []

    def counting(opened, norm, stop):
        started.append(opened.pixels)
        return real_from_opened(opened, norm, stop)

    monkeypatch.setattr(server.pipeline.model_pipeline, "from_opened", counting)
    images = 64  # 4 megapixels each: about 2 s of decoding on two threads, were it all done

    async def body(pipeline: ModelPipeline) -> float:
        request = asyncio.ensure_future(pipeline.classify([page_png(2000, 2000)] * images, [ENCODED] * images))
        for _ in range(2000):
            if pipeline.decode_budget.in_use:
                break
            await asyncio.sleep(0.001)
        request.cancel()
        with pytest.raises(asyncio.CancelledError):
            await request
        return await until_idle(pipeline, 5.0)

    idle_after = run_pipeline(body, preprocess_workers=2, max_image_pixels=4_000_000, max_request_pixels=10**9)
    assert idle_after < 1.0
    assert len(started) <= images // 4  # most images were never decoded at all


# --- digit scores -----------------------------------------------------------------------------------------------------


def raw_with_first_pixel(value: int) -> bytes:
    return bytes([value]) + GOOD[1:]


class ScorelessNull(NullBackend):
    """The null engine as a model file without a digit_score output: the separate detector scores its answers."""

    def describe(self) -> BackendInfo:
        return dataclasses.replace(super().describe(), digit_threshold=None, digit_detector={})

    def run(self, images: np.ndarray) -> BackendOutput:
        return BackendOutput(super().run(images).probabilities)


class FirstPixelDetector:
    """A fake digit detector: an image's score is its first pixel in [0, 1], read back from the model input."""

    threshold = 0.5

    def __init__(self) -> None:
        self.batches: list[tuple[np.ndarray, np.ndarray]] = []

    def score(self, images: np.ndarray, probabilities: np.ndarray) -> np.ndarray:
        self.batches.append((images.copy(), probabilities.copy()))
        norm = NullBackend().describe().normalization
        return images[:, 0, 0, 0] * norm.std + norm.mean


def test_without_a_detector_every_image_is_a_digit_with_an_unjudged_score() -> None:
    predictions = run_pipeline(lambda p: p.classify([GOOD] * 5))
    assert predictions.digit_scores.shape == (5,) and predictions.digit_scores.dtype == np.float32
    assert np.isnan(predictions.digit_scores).all()
    assert predictions.is_digit.dtype == bool and predictions.is_digit.tolist() == [True] * 5


def test_with_a_detector_is_digit_is_whether_the_score_reaches_its_threshold() -> None:
    values = [0, 100, 127, 128, 200, 255]  # scores 0, 0.39, 0.498, 0.502, 0.78, 1
    detector = FirstPixelDetector()
    predictions = run_pipeline(
        lambda p: p.classify([raw_with_first_pixel(v) for v in values]), ScorelessNull(), detector=detector
    )
    np.testing.assert_allclose(predictions.digit_scores, np.array(values) / 255, atol=1e-5)
    assert predictions.digit_scores.dtype == np.float32
    assert predictions.is_digit.tolist() == [False, False, False, True, True, True]
    images, probabilities = detector.batches[0]
    assert images.shape == (6, 1, 28, 28) and images.dtype == np.float32  # the normalized model input
    np.testing.assert_array_equal(probabilities, np.tile(FIXED_ROW, (6, 1)))  # and the model's answer for it


def test_a_score_exactly_at_the_threshold_is_a_digit() -> None:
    class AtThreshold:
        threshold = 0.625

        def score(self, images: np.ndarray, probabilities: np.ndarray) -> np.ndarray:
            return np.full(len(images), self.threshold, np.float32)

    predictions = run_pipeline(lambda p: p.classify([GOOD] * 3), ScorelessNull(), detector=AtThreshold())
    assert predictions.digit_scores.tolist() == [0.625] * 3 and predictions.is_digit.tolist() == [True] * 3


def test_digit_scores_follow_their_images_across_batches_and_reach_the_predictions_hook() -> None:
    values = [12 * i for i in range(20)]
    hooked: list[np.ndarray] = []
    detector = FirstPixelDetector()
    predictions = run_pipeline(
        lambda p: p.classify([raw_with_first_pixel(v) for v in values]),
        ScorelessNull(),
        detector=detector,
        on_predictions=lambda digits, confidences, is_digit: hooked.append(is_digit.copy()),
    )
    assert len(detector.batches) == 3  # batches of 8, 8 and 4
    np.testing.assert_allclose(predictions.digit_scores, np.array(values) / 255, atol=1e-5)
    assert predictions.is_digit.tolist() == [v / 255 >= 0.5 for v in values]
    assert np.concatenate(hooked).tolist() == predictions.is_digit.tolist()


def test_a_mixed_batch_is_scored_on_the_model_input_of_every_image() -> None:
    detector = FirstPixelDetector()
    predictions = run_pipeline(
        lambda p: p.classify([raw_with_first_pixel(255), page_png(60, 60)], [RAW, ENCODED]),
        ScorelessNull(),
        detector=detector,
    )
    assert predictions.digit_scores[0] == pytest.approx(1.0, abs=1e-5)
    assert predictions.digit_scores[1] == pytest.approx(0.0, abs=1e-5)  # the decoded page's corner is background
    assert predictions.is_digit.tolist() == [True, False]


class ModelWithScores(NullBackend):
    """An engine with its own digit_score output (a model exported with the detector inside): the given scores, in
    order across runs, judged at `threshold` (what a model's metadata holds)."""

    def __init__(self, scores: list[float], threshold: float) -> None:
        super().__init__()
        self.scores, self.threshold, self.at = np.asarray(scores, np.float32), threshold, 0

    def describe(self) -> BackendInfo:
        return dataclasses.replace(
            super().describe(), digit_threshold=self.threshold, digit_detector={"method": "test"}
        )

    def run(self, images: np.ndarray) -> BackendOutput:
        scores = self.scores[self.at : self.at + len(images)]
        self.at += len(images)
        return BackendOutput(super().run(images).probabilities, scores)


def test_is_digit_follows_the_models_own_score_and_threshold_not_the_separate_detector() -> None:
    detector = FirstPixelDetector()  # threshold 0.5, and it would score these images 0.0
    backend = ModelWithScores([0.1, 0.69, 0.7, 0.95, 0.3], threshold=0.7)
    predictions = run_pipeline(lambda p: p.classify([raw_with_first_pixel(0)] * 5), backend, detector=detector)
    np.testing.assert_array_equal(predictions.digit_scores, np.float32([0.1, 0.69, 0.7, 0.95, 0.3]))
    assert predictions.is_digit.tolist() == [False, False, True, True, False]
    assert detector.batches == []  # nothing ran after the model


def test_the_null_engine_gives_its_fixed_score_and_runs_no_detector() -> None:
    detector = FirstPixelDetector()
    predictions = run_pipeline(lambda p: p.classify([raw_with_first_pixel(0)] * 4), NullBackend(), detector=detector)
    assert predictions.digit_scores.tolist() == [FIXED_SCORE] * 4 and predictions.is_digit.all()
    assert detector.batches == []


def test_digit_detector_none_turns_off_the_models_own_score_too() -> None:
    predictions = run_pipeline(lambda p: p.classify([GOOD] * 3), ModelWithScores([0.1, 0.2, 0.3], 0.7), detector=None)
    assert np.isnan(predictions.digit_scores).all() and predictions.is_digit.all()


def test_a_model_without_the_output_is_scored_by_the_separate_detector_and_says_so(
    scoreless_model: Path, digits, caplog: pytest.LogCaptureFixture
) -> None:
    images, _ = digits
    detector = DigitDetector.load(DIGIT_DETECTOR)
    backend = OnnxRuntimeBackend(scoreless_model, provider="cpu")
    with caplog.at_level(logging.INFO, logger="mnist.digit_score"):
        predictions = run_pipeline(lambda p: p.classify([i.tobytes() for i in images[:20]]), backend, detector=detector)
    x = backend.describe().normalization.apply(images[:20, None])
    np.testing.assert_allclose(predictions.digit_scores, detector.score(x, predictions.probabilities), atol=1e-6)
    np.testing.assert_array_equal(predictions.is_digit, predictions.digit_scores >= detector.threshold)
    said = [r.getMessage() for r in caplog.records if r.name == "mnist.digit_score"]
    assert len(said) == 1  # once per model version, not per batch (20 images ran in batches of 8)
    assert "separate file digit-detector.npz" in said[0] and "no 'digit_score' output" in said[0]


def test_the_bundled_model_scores_in_its_own_graph_with_its_threshold_and_says_so(
    digits, caplog: pytest.LogCaptureFixture
) -> None:
    images, _ = digits
    detector = DigitDetector.load(DIGIT_DETECTOR)
    backend = model()
    info = backend.describe()
    assert info.digit_threshold == pytest.approx(detector.threshold)  # from the model's own metadata
    x = info.normalization.apply(images[:24, None])
    own = backend.run(x).digit_scores  # before the pipeline, which closes the backend when it is done

    async def body(pipeline: ModelPipeline):
        assert pipeline.detector is not detector and pipeline.detector.threshold == info.digit_threshold
        return await pipeline.classify([image.tobytes() for image in images[:24]])

    with caplog.at_level(logging.INFO, logger="mnist.digit_score"):
        predictions = run_pipeline(body, backend, detector=detector)
    np.testing.assert_allclose(predictions.digit_scores, own, atol=1e-6)  # batches of 8 vs one run of 24
    np.testing.assert_allclose(predictions.digit_scores, detector.score(x, predictions.probabilities), atol=1e-4)
    said = [r.getMessage() for r in caplog.records if r.name == "mnist.digit_score"]
    assert len(said) == 1 and "in-graph" in said[0] and f"threshold {detector.threshold:.4f}" in said[0]


def test_an_odd_sized_jpeg_within_the_image_limit_is_decoded_within_the_decode_budget() -> None:
    buffer = io.BytesIO()
    page = Image.new("L", (2001, 2001), 255)
    page.paste(0, (900, 500, 1100, 1500))
    page.save(buffer, "JPEG", quality=80)
    # a JPEG reduced on load must fit the decode budget it was admitted against
    predictions = run_pipeline(
        lambda p: p.classify([buffer.getvalue()], [ENCODED]),
        max_image_pixels=1_100_000,
        max_decoding_pixels=1_100_000,
        max_request_pixels=10_000_000,
    )
    assert len(predictions) == 1
