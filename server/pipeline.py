"""The model pipeline: payloads -> preprocess -> batch queue -> backend -> predictions. No transport here.

Raw payloads of a request become one uint8 array in one step (joined bytes, `np.frombuffer`) and
are normalized with the rest of their batch in the runner thread (one multiply, one subtract).
Encoded images are decoded in a thread pool sized to the cores, off the event loop, so a large
PNG cannot stall raw traffic. Argmax and the prediction metrics run once per batch in the runner
thread too. Failures are domain errors (server/errors.py) only.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from proto.contract import INPUT_DTYPE, INPUT_SHAPE
from server.backends.base import Backend, BackendInfo
from server.batching import Batcher, BatchObserver
from server.errors import InvalidInput
from server.preprocess import InvalidImage, from_encoded, raw_length_problem

RAW = "raw"
ENCODED = "encoded"
NO_IMAGE = "no image: set either 'encoded' or 'raw'"


@dataclass(frozen=True)
class Predictions:
    """The answers for one request's images, as arrays: row i is image i."""

    probabilities: np.ndarray  # (N, 10) float32
    digits: np.ndarray  # (N,) int
    confidences: np.ndarray  # (N,) float32: probability of the predicted digit
    model_version: str

    def __len__(self) -> int:
        return len(self.digits)


@dataclass(frozen=True)
class PipelineSettings:
    max_batch_size: int
    max_queue_size: int
    max_queue_delay: float  # seconds
    max_image_pixels: int
    preprocess_workers: int = 0  # 0 = one per core


class ModelPipeline:
    """One served model: `await classify(...)` from the event loop; `start` and `close` on it too."""

    def __init__(
        self,
        backend: Backend,
        settings: PipelineSettings,
        observer: BatchObserver | None = None,
        on_predictions: Callable[[np.ndarray, np.ndarray], None] = lambda digits, confidences: None,
    ) -> None:
        self.backend = backend
        self.info: BackendInfo = backend.describe()
        self.settings = settings
        self._normalization = self.info.normalization
        self._on_predictions = on_predictions
        self.batcher = Batcher(
            self._run_batch,
            settings.max_batch_size,
            settings.max_queue_size,
            settings.max_queue_delay,
            observer,
            inline=not backend.blocking,
        )
        self._decoders = ThreadPoolExecutor(
            settings.preprocess_workers or os.cpu_count() or 1, thread_name_prefix="decode"
        )

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
        self.backend.close()

    async def classify(
        self, payloads: Sequence[bytes], kinds: Sequence[str | None] | None = None, deadline: float | None = None
    ) -> Predictions:
        """Classify images given as payloads; `kinds[i]` is RAW, ENCODED or None (no image); no kinds: all raw.

        Raises InvalidInput naming the first bad image by `index`, or the batcher's errors.
        """
        images = await self.preprocess(payloads, kinds)
        probabilities, digits, confidences = await self.batcher.classify(images, deadline)
        return Predictions(probabilities, digits, confidences, self.info.model_version)

    async def preprocess(self, payloads: Sequence[bytes], kinds: Sequence[str | None] | None) -> np.ndarray:
        """(N, 1, 28, 28): uint8 pixels when every image is raw (normalized later, with the batch), else float32."""
        if not payloads:
            raise InvalidInput("no images to classify")
        if kinds is None or all(kind == RAW for kind in kinds):
            lengths = set(map(len, payloads))
            if len(lengths) != 1 or raw_length_problem(payloads[0]):
                index = next(i for i, raw in enumerate(payloads) if raw_length_problem(raw))
                raise InvalidInput(raw_length_problem(payloads[index]), index)
            return raw_pixels(payloads)
        return await self._preprocess_mixed(payloads, kinds)

    async def _preprocess_mixed(self, payloads: Sequence[bytes], kinds: Sequence[str | None]) -> np.ndarray:
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
            images[raw_rows] = self._normalization.apply(raw_pixels([payloads[i] for i in raw_rows]))
        limit = first_problem[0] if first_problem else len(payloads)  # nothing after a known bad image is decoded
        encoded_rows = [i for i in range(limit) if kinds[i] == ENCODED]
        loop = asyncio.get_running_loop()
        decoded = await asyncio.gather(
            *(
                loop.run_in_executor(
                    self._decoders, from_encoded, payloads[i], self.info.normalization, self.settings.max_image_pixels
                )
                for i in encoded_rows
            ),
            return_exceptions=True,
        )
        for i, result in zip(encoded_rows, decoded, strict=True):
            if isinstance(result, InvalidImage):
                first_problem = min(first_problem or (i, str(result)), (i, str(result)))
            elif isinstance(result, BaseException):
                raise result
            else:
                images[i] = result
        if first_problem:
            raise InvalidInput(first_problem[1], first_problem[0])
        return images

    def _run_batch(self, parts: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
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
        probabilities = np.asarray(self.backend.run(images), np.float32)
        digits = probabilities.argmax(1)
        confidences = probabilities[np.arange(len(digits)), digits]
        self._on_predictions(digits, confidences)
        return probabilities, digits, confidences


def raw_pixels(raws: Sequence[bytes]) -> np.ndarray:
    """Raw images, each exactly RAW_BYTES (checked before) -> one (N, 1, 28, 28) uint8 array, one copy."""
    return np.frombuffer(b"".join(raws), dtype=np.uint8).reshape(len(raws), *INPUT_SHAPE)
