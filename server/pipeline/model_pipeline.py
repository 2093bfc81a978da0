"""The model pipeline: payloads -> preprocess -> batch queue -> backend -> predictions. No transport here.

Raw payloads of a request become one uint8 array in one step (joined bytes, `np.frombuffer`) and
are normalized with the rest of their batch in the runner thread (one multiply, one subtract).
Encoded images are decoded in a thread pool sized to the cores, off the event loop, so a large
PNG cannot stall raw traffic. Decoding is budgeted: headers are read first, and a request's images
are refused before any pixel is decoded if they are over the per-image or per-request pixel
limits; then each image waits (within its deadline) for room in the global budget of pixels being
decoded, and stops between steps once its caller has gone. Argmax, the digit scores (the model's
own output, or for a model without it the separate detector: server/pipeline/digit_scores.py) and the
prediction metrics run once per batch in the runner thread. Failures are domain errors
(server/errors.py) only.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np

from proto.contract import INPUT_DTYPE, INPUT_SHAPE
from server import tracing
from server.config import TABLE_CANDIDATES_PER_CELL
from server.engine.backends.base import Backend, BackendInfo
from server.engine.batching import AUTO, Batcher, BatchObserver
from server.errors import Cancelled, DeadlineExpired, InvalidInput, Unsupported
from server.pipeline.budgets import PixelBudget, return_freed_memory
from server.pipeline.digit_scores import DigitScorer, ModelDigitScore
from server.pipeline.digit_scores import choose as choose_digit_scorer
from server.pipeline.predictions import Predictions
from server.pipeline.preprocess import (
    BLANK_RAW_SPREAD,
    RAW_BLANK,
    DecodeStopped,
    InvalidImage,
    OpenedImage,
    blank_raw_rows,
    decode_opened,
    from_opened,
    open_image,
    raw_length_problem,
)
from server.pipeline.second_opinion import SecondOpinion, averaged

if TYPE_CHECKING:
    from server.pipeline.expressions import Expression
    from server.pipeline.operators import OperatorModel
    from server.pipeline.reading import Reading
    from server.pipeline.tables import Table

_Segmented = TypeVar("_Segmented")

RAW = "raw"
ENCODED = "encoded"
NO_IMAGE = "no image: set either 'encoded' or 'raw'"
RAW_BLANK_PROBLEM = RAW_BLANK.format(spread=BLANK_RAW_SPREAD)


@dataclass(frozen=True)
class PipelineSettings:
    max_batch_size: int
    max_queue_size: int
    max_queue_delay: float  # seconds
    max_image_pixels: int
    max_request_pixels: int = 16_000_000
    max_decoding_pixels: int = 16_000_000
    queue_target: float | str = AUTO  # seconds a standing queue may hold (server/engine/batching.py); AUTO; 0 = off
    preprocess_workers: int = 0  # 0 = one per core


TRIM_AFTER_PIXELS = 4_000_000  # once this much was decoded since the last trim and decoding goes idle: return memory


class ModelPipeline:
    """One served model: `await classify(...)` from the event loop; `start` and `close` on it too."""

    def __init__(
        self,
        backend: Backend,
        settings: PipelineSettings,
        observer: BatchObserver | None = None,
        on_predictions: Callable[[np.ndarray, np.ndarray, np.ndarray], None] = lambda digits, conf, is_digit: None,
        detector: DigitScorer | None = None,
        on_decoding: Callable[[int], None] = lambda pixels: None,
        operators: OperatorModel | None = None,
        second_opinion: SecondOpinion | None = None,
    ) -> None:
        self.backend = backend
        self.info: BackendInfo = backend.describe()
        # What requests and responses call this model: its metadata, unless a model repository names it by folder.
        self.name = self.info.model_name
        self.version = self.info.model_version
        self.settings = settings
        # What scores this version's answers: the model's own digit_score, the separate detector, or None (off)
        self.detector = choose_digit_scorer(self.info, detector)
        self._scores_in_graph = isinstance(self.detector, ModelDigitScore)
        self._normalization = self.info.normalization
        self._on_predictions = on_predictions
        self.batcher = Batcher(
            self._run_batch,
            settings.max_batch_size,
            settings.max_queue_size,
            settings.max_queue_delay,
            observer,
            inline=not backend.blocking,
            queue_target=settings.queue_target,
        )
        self._decoders = ThreadPoolExecutor(
            settings.preprocess_workers or os.cpu_count() or 1, thread_name_prefix="decode"
        )
        self._on_decoding = on_decoding
        self.decode_budget = PixelBudget(settings.max_decoding_pixels, self._decoding_changed)
        # ReadDigits' report per image: digits found, seconds of decoding and segmentation (metrics, when wired)
        self.on_reading: Callable[[int, float], None] = lambda digits, seconds: None
        self.on_table: Callable[[int, float], None] = lambda cells, seconds: None  # ReadTable's, per table
        self.on_expression: Callable[[int, float], None] = lambda symbols, seconds: None  # ReadExpression's
        self.operators = operators  # tells operators from digits for ReadExpression; None: it is refused
        self.second_opinion = second_opinion  # averaged with the model by the reading calls; None: the model alone
        self._decoded_since_trim = 0

    def start(self) -> None:
        self.batcher.start()

    async def warm_up(self) -> float:
        """The backend's warm-up, on the thread that will run its batches; returns seconds."""
        seconds = await self.batcher.run_in_runner(self.backend.warm_up)
        self.info = self.backend.describe()  # warm-up may have turned CUDA graphs off for some buckets
        return seconds

    async def close(self, timeout: float | None = None) -> None:
        await self.batcher.close(timeout)
        self._decoders.shutdown(wait=False, cancel_futures=True)
        await self.batcher.stopped()  # never close the backend under a batch that is still running
        # Off the event loop: on a GPU, close waits its turn behind another version's CUDA-graph capture (seconds)
        await asyncio.get_running_loop().run_in_executor(None, self.backend.close)

    async def classify(
        self, payloads: Sequence[bytes], kinds: Sequence[str | None] | None = None, deadline: float | None = None
    ) -> Predictions:
        """Classify images given as payloads; `kinds[i]` is RAW, ENCODED or None (no image); no kinds: all raw.

        Raises InvalidInput naming the first bad image by `index`, or the batcher's errors.
        """
        self.batcher.admit(len(payloads), deadline)  # shed before any preprocessing is spent on the request
        if tracing.enabled:
            with tracing.preprocess_span(len(payloads)):
                images = await self.preprocess(payloads, kinds, deadline)
        else:
            images = await self.preprocess(payloads, kinds, deadline)
        probabilities, digits, confidences, scores, is_digit = await self.batcher.classify(images, deadline)
        return Predictions(
            probabilities, digits, confidences, scores, is_digit, self.version, self.name, images, self._normalization
        )

    async def classify_tensor(self, images: np.ndarray, deadline: float | None = None) -> Predictions:
        """Classify images sent as one array (the Open Inference Protocol's tensors, a batch of raw images read off
        the wire): (N, 1, 28, 28) uint8 pixels, normalized with their batch, or float32 model input, already
        normalized. Shape and values are the caller's to check; a blank uint8 image is refused naming its index."""
        if not len(images):
            raise InvalidInput("no images to classify")
        self.batcher.admit(len(images), deadline)
        if images.dtype == np.uint8:
            if tracing.enabled:  # the same spans as for payloads: the check is this request's preprocessing
                with tracing.preprocess_span(len(images)):
                    _refuse_blank(images, range(len(images)))
            else:
                _refuse_blank(images, range(len(images)))
        probabilities, digits, confidences, scores, is_digit = await self.batcher.classify(images, deadline)
        return Predictions(
            probabilities, digits, confidences, scores, is_digit, self.version, self.name, images, self._normalization
        )

    async def read_digits(
        self, payload: bytes, expected: int = 0, deadline: float | None = None, max_digits: int = 64
    ) -> tuple[Reading, tuple[int, int]]:
        """Every digit in one encoded image (server/pipeline/reading.py): decoded within the same budgets as Classify's
        images, segmented in a decoding thread, every candidate through the model in one batch (and through the
        second opinion, in that thread: the two averaged). Returns the reading and the image's (width, height) as
        stored. InvalidInput for no digits, too many, or a bad image."""
        reading_module = _reading_module("reading numbers")
        (segmentation, second), seconds, size = await self._segmented(
            payload,
            deadline,
            self._with_second_opinion(lambda gray, scale: reading_module.segment(gray, scale, expected, max_digits)),
        )
        probabilities, _, _, scores, _ = await self.batcher.classify(segmentation.images[:, None], deadline)
        reading = segmentation.assemble(averaged(probabilities, second), scores if self.detector is not None else None)
        self.on_reading(len(reading.digits), seconds)
        return reading, size

    async def read_table(
        self, payload: bytes, deadline: float | None = None, max_cells: int = 256
    ) -> tuple[Table, tuple[int, int]]:
        """A table of numbers in one encoded image (server/pipeline/tables.py), as `read_digits` reads a number:
        the same budgets, segmentation in a decoding thread, every candidate digit of every cell in one batch, the
        second opinion averaged in.
        InvalidInput for no table, more cells than `max_cells`, or a bad image."""
        _reading_module("reading tables")
        from server.pipeline.tables import segment_table

        # one table's candidates always fit the queue: more would be "retry later" for a call that never could be
        most = min(TABLE_CANDIDATES_PER_CELL * max_cells, self.settings.max_queue_size)
        (table_segmentation, second), seconds, size = await self._segmented(
            payload,
            deadline,
            self._with_second_opinion(lambda gray, scale: segment_table(gray, scale, max_cells, most)),
        )
        images = table_segmentation.images
        probabilities, _, _, scores, _ = await self.batcher.classify(images[:, None], deadline)
        table = table_segmentation.assemble(
            averaged(probabilities, second), scores if self.detector is not None else None
        )
        self.on_table(table.cells, seconds)
        return table, size

    async def read_expression(
        self, payload: bytes, deadline: float | None = None, max_symbols: int = 64
    ) -> tuple[Expression, tuple[int, int]]:
        """Handwritten arithmetic in one encoded image (server/pipeline/expressions.py): every candidate symbol
        through the operator model and the second opinion (in the decoding thread, right after the segmentation: a
        few milliseconds on one core) and the classifier (one batch, as ReadDigits'). InvalidInput for no ink, no
        operator, no number, more than one line or a bad image; Unsupported without the operator model. What cannot
        be evaluated (division by zero, ...) is in the answer, not an error."""
        _reading_module("reading expressions")
        from server.pipeline.expressions import read_expression, segment_expression

        operators = self.operators
        if operators is None:
            raise Unsupported("reading expressions needs the operator model, and this server runs without one")

        def segment(gray: np.ndarray, scale: float) -> tuple[Any, np.ndarray]:
            segmentation = segment_expression(gray, scale, max_symbols)
            return segmentation, operators.probabilities(segmentation.images)

        ((segmentation, operator_probabilities), second), seconds, size = await self._segmented(
            payload, deadline, self._with_second_opinion(segment, lambda segmented: segmented[0].images)
        )
        probabilities, _, _, _, _ = await self.batcher.classify(segmentation.images[:, None], deadline)
        try:
            expression = read_expression(segmentation, averaged(probabilities, second), operator_probabilities)
        except ValueError as problem:
            raise InvalidInput(str(problem)) from None
        self.on_expression(len(expression.symbols), seconds)
        return expression, size

    def _with_second_opinion(
        self,
        segment: Callable[[np.ndarray, float], _Segmented],
        images_of: Callable[[Any], np.ndarray] = lambda segmented: segmented.images,
    ) -> Callable[[np.ndarray, float], tuple[_Segmented, np.ndarray | None]]:
        """`segment`, then the second opinion on the candidates it cut out, in the same decoding thread (so within
        the call's deadline and budget); None for the opinion when this version has none."""
        second_opinion = self.second_opinion

        def segment_and_judge(gray: np.ndarray, scale: float) -> tuple[_Segmented, np.ndarray | None]:
            segmented = segment(gray, scale)
            if second_opinion is None:
                return segmented, None
            return segmented, second_opinion.probabilities(images_of(segmented))

        return segment_and_judge

    async def _segmented(
        self, payload: bytes, deadline: float | None, segment: Callable[[np.ndarray, float], _Segmented]
    ) -> tuple[_Segmented, float, tuple[int, int]]:
        """One encoded image decoded within the budgets and `segment(gray, scale)`-ed in a decoding thread (scale:
        original pixels per decoded pixel): its result, the seconds both took, and the image's size as stored.
        ValueError from `segment` is the caller's InvalidInput."""
        self.batcher.admit(1, deadline)
        (opened,) = await self._open_all([payload])
        if isinstance(opened, InvalidImage):
            raise InvalidInput(str(opened))
        await self.decode_budget.acquire(opened.pixels, deadline)
        loop = asyncio.get_running_loop()

        def decode_and_segment() -> tuple[_Segmented, float]:
            started = time.perf_counter()
            gray = decode_opened(opened, lambda: "deadline expired while decoding" if _late(deadline) else None)
            scale = max(opened.size) / max(gray.shape)
            return segment(gray, scale), time.perf_counter() - started

        work = self._decoders.submit(decode_and_segment)
        work.add_done_callback(lambda _: _call_soon(loop, self._decoded, opened.pixels))
        try:
            result, seconds = await asyncio.wrap_future(work)
        except DecodeStopped as stopped:
            raise DeadlineExpired(str(stopped)) from None
        except (InvalidImage, ValueError) as problem:
            raise InvalidInput(str(problem)) from None
        return result, seconds, opened.size

    async def preprocess(
        self, payloads: Sequence[bytes], kinds: Sequence[str | None] | None, deadline: float | None = None
    ) -> np.ndarray:
        """(N, 1, 28, 28): uint8 pixels when every image is raw (normalized later, with the batch), else float32."""
        if not payloads:
            raise InvalidInput("no images to classify")
        if kinds is None or all(kind == RAW for kind in kinds):
            lengths = set(map(len, payloads))
            if len(lengths) != 1 or raw_length_problem(payloads[0]):
                index = next(i for i, raw in enumerate(payloads) if raw_length_problem(raw))
                if index:  # a blank image before the first one of the wrong length is the first problem
                    _refuse_blank(raw_pixels(payloads[:index]), range(index))
                raise InvalidInput(raw_length_problem(payloads[index]), index)
            pixels = raw_pixels(payloads)
            _refuse_blank(pixels, range(len(payloads)))
            return pixels
        return await self._preprocess_mixed(payloads, kinds, deadline)

    async def _preprocess_mixed(
        self, payloads: Sequence[bytes], kinds: Sequence[str | None], deadline: float | None
    ) -> np.ndarray:
        images = np.empty((len(payloads), *INPUT_SHAPE), INPUT_DTYPE)
        first_problem: tuple[int, str] | None = None
        raw_rows = []
        for i, (kind, payload) in enumerate(zip(kinds, payloads, strict=True)):  # the cheap checks first
            problem = NO_IMAGE if kind is None else raw_length_problem(payload) if kind == RAW else None
            if problem:
                first_problem = (i, problem)
                break
            if kind == RAW:
                raw_rows.append(i)
        if raw_rows:
            pixels = raw_pixels([payloads[i] for i in raw_rows])
            blank = blank_raw_rows(pixels)
            if len(blank):
                first_problem = min(first_problem or (len(payloads), ""), (raw_rows[blank[0]], RAW_BLANK_PROBLEM))
            images[raw_rows] = self._normalization.apply(pixels)
        limit = first_problem[0] if first_problem else len(payloads)  # nothing after a known bad image is decoded
        encoded_rows = [i for i in range(limit) if kinds[i] == ENCODED]
        opened = await self._open_all([payloads[i] for i in encoded_rows])
        for i, header in zip(encoded_rows, opened, strict=True):
            if isinstance(header, InvalidImage):
                first_problem = min(first_problem or (i, str(header)), (i, str(header)))
        if first_problem:
            raise InvalidInput(first_problem[1], first_problem[0])
        if too_big := [h for h in opened if h.pixels > self.decode_budget.capacity]:  # only a misconfiguration
            raise InvalidInput(f"an image decodes to {too_big[0].pixels:,} pixels, over the decode budget")
        total = sum(header.pixels for header in opened)
        if total > self.settings.max_request_pixels:
            raise InvalidInput(
                f"the request's {len(opened)} encoded images would decode to {total:,} pixels, over the limit of "
                f"{self.settings.max_request_pixels:,} per request; send smaller images or fewer per request"
            )
        gone = threading.Event()  # set when the caller goes away: decoding threads stop at their next step

        def stop() -> str | None:
            if gone.is_set():
                return "the caller went away"
            if deadline is not None and time.monotonic() > deadline:
                return "deadline expired while decoding"
            return None

        try:
            decoded = await asyncio.gather(
                *(self._decode(header, deadline, stop) for header in opened), return_exceptions=True
            )
        except asyncio.CancelledError:
            gone.set()
            raise
        for i, result in zip(encoded_rows, decoded, strict=True):
            if isinstance(result, InvalidImage):
                first_problem = min(first_problem or (i, str(result)), (i, str(result)))
            elif isinstance(result, DecodeStopped):
                raise DeadlineExpired(str(result)) if "deadline" in str(result) else Cancelled(str(result))
            elif isinstance(result, BaseException):
                raise result
            else:
                images[i] = result
        if first_problem:
            raise InvalidInput(first_problem[1], first_problem[0])
        return images

    async def _open_all(self, payloads: list[bytes]) -> list[OpenedImage | InvalidImage]:
        """Every image's header, read in a decoder thread (cheap: no pixels yet); problems as values."""

        def open_each() -> list[OpenedImage | InvalidImage]:
            headers: list[OpenedImage | InvalidImage] = []
            for payload in payloads:
                try:
                    headers.append(open_image(payload, self.settings.max_image_pixels))
                except InvalidImage as problem:
                    headers.append(problem)
            return headers

        if not payloads:
            return []
        return await asyncio.get_running_loop().run_in_executor(self._decoders, open_each)

    async def _decode(self, header: OpenedImage, deadline: float | None, stop: Callable[[], str | None]) -> np.ndarray:
        """Wait for room in the decode budget, then decode in a thread; the budget is returned when the thread is
        done with the pixels (or never started), not when the caller stops waiting."""
        pixels = header.pixels
        await self.decode_budget.acquire(pixels, deadline)
        loop = asyncio.get_running_loop()
        work = self._decoders.submit(from_opened, header, self._normalization, stop)
        work.add_done_callback(lambda _: _call_soon(loop, self._decoded, pixels))
        return await asyncio.wrap_future(work)

    def _decoded(self, pixels: int) -> None:
        self.decode_budget.release(pixels)
        self._decoded_since_trim += pixels
        if self.decode_budget.in_use == 0 and self._decoded_since_trim >= TRIM_AFTER_PIXELS:
            self._decoded_since_trim = 0
            with contextlib.suppress(RuntimeError):  # shut down meanwhile
                self._decoders.submit(return_freed_memory)  # a burst of large images is over: give the memory back

    def _decoding_changed(self, pixels: int) -> None:
        self._on_decoding(pixels)

    def _run_batch(self, parts: Sequence[np.ndarray]) -> tuple[np.ndarray, ...]:
        """In the batch runner thread: assemble and normalize, run the backend, postprocess; once per batch."""
        if len(parts) == 1 and parts[0].dtype == INPUT_DTYPE:  # one job of decoded images: already normalized
            images = parts[0]
        else:
            images = np.empty((sum(map(len, parts)), *INPUT_SHAPE), INPUT_DTYPE)
            at = 0
            for part in parts:
                if part.dtype == np.uint8:
                    self._normalization.apply_into(part, images[at : at + len(part)])
                else:
                    images[at : at + len(part)] = part
                at += len(part)
        output = self.backend.run(images)
        probabilities = np.asarray(output.probabilities, np.float32)
        digits = probabilities.argmax(1)
        confidences = probabilities[np.arange(len(digits)), digits]
        if self.detector is None:
            scores = np.full(len(digits), np.nan, np.float32)
            is_digit = np.ones(len(digits), bool)
        else:
            if not self._scores_in_graph:
                scores = np.asarray(self.detector.score(images, probabilities), np.float32)
            elif output.digit_scores is not None:
                scores = np.asarray(output.digit_scores, np.float32)
            else:
                raise RuntimeError(f"{self.info.engine} declared a digit score threshold but returned no scores")
            is_digit = scores >= self.detector.threshold
        self._on_predictions(digits, confidences, is_digit)
        return probabilities, digits, confidences, scores, is_digit


def _reading_module(what: str) -> Any:
    """server.pipeline.reading, which needs scipy: only the calls that read whole pages import it."""
    try:
        from server.pipeline import reading
    except ImportError as missing:  # an installation without the serve extras' scipy (a bare GPU machine)
        raise Unsupported(f"{what} needs scipy, which this installation lacks ({missing})") from None
    return reading


def _late(deadline: float | None) -> bool:
    return deadline is not None and time.monotonic() > deadline


def _call_soon(loop: asyncio.AbstractEventLoop, callback: Callable[..., None], *args: Any) -> None:
    """From a decoding thread, on the loop; nothing when the loop has closed (the server is gone)."""
    with contextlib.suppress(RuntimeError):
        loop.call_soon_threadsafe(callback, *args)


def _refuse_blank(pixels: np.ndarray, rows: Sequence[int]) -> None:
    """InvalidInput naming the first blank raw image (`rows[k]` is the request index of `pixels[k]`)."""
    blank = blank_raw_rows(pixels)
    if len(blank):
        raise InvalidInput(RAW_BLANK_PROBLEM, rows[blank[0]])


def raw_pixels(raws: Sequence[bytes]) -> np.ndarray:
    """Raw images, each exactly RAW_BYTES (checked before) -> one (N, 1, 28, 28) uint8 array, one copy."""
    return np.frombuffer(b"".join(raws), dtype=np.uint8).reshape(len(raws), *INPUT_SHAPE)
