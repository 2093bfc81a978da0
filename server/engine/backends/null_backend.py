"""The null engine: answers at once with one fixed probability row and digit score. A benchmarking aid, not a model.

With it the server does everything but inference (parsing, preprocessing, queueing, batching,
responses, metrics), so `mnist-bench --compare-echo` can hold the server's own cost against a bare
gRPC server of the same proto: how much of Python gRPC's ceiling the serving code keeps.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from proto.contract import NUM_CLASSES
from server.config import ServeConfig, parse_device_ms
from server.engine.backends.base import BackendInfo, BackendOutput

# Digit 0 with probability 0.91, the rest 0.01 each: a valid distribution that no real model would give
# for every image, so a client can tell at a glance it is talking to the null engine.
FIXED_ROW = np.full(NUM_CLASSES, 0.01, np.float32)
FIXED_ROW[0] = 1.0 - 0.01 * (NUM_CLASSES - 1)
# Every image's digit_score, at or over FIXED_THRESHOLD: a digit. Given like a model's own score, so the null engine
# costs the server no detector work (benchmarks of the serving code measure the serving code).
FIXED_SCORE = np.float32(1.0)
FIXED_THRESHOLD = 0.5


@dataclass(frozen=True)
class NullOptions:
    """This engine's options: what `mnist-serve`'s flags say of it."""

    max_batch_size: int = 256
    blocking: bool = False  # backend "null-threaded"
    device_ms: tuple[float, float] = (0.0, 0.0)

    @classmethod
    def from_config(cls, config: ServeConfig) -> NullOptions:
        return cls(
            config.max_batch_size or 256,
            blocking=config.backend == "null-threaded",
            device_ms=parse_device_ms(config.null_device_ms),
        )


class NullBackend:
    """`blocking=False` (backend "null"): runs on the event loop, the server's own cost alone.
    `blocking=True` (backend "null-threaded"): runs on the batch runner thread as a model would, so the
    difference between the two is the cost of handing batches to a thread and back.
    `device_ms=(fixed, per_image)` (threaded only): each batch sleeps that long, as a model on an accelerator
    keeps the runner waiting without using the CPU; then the model, not the CPU, limits throughput."""

    def __init__(
        self, max_batch_size: int = 256, blocking: bool = False, device_ms: tuple[float, float] = (0.0, 0.0)
    ) -> None:
        if any(device_ms) and not blocking:
            raise ValueError("emulated device time needs the threaded null backend (it would stall the event loop)")
        self.max_batch_size = max_batch_size
        self.blocking = blocking
        self.device_ms = device_ms
        self._rows = np.tile(FIXED_ROW, (max_batch_size, 1))
        self._scores = np.full(max_batch_size, FIXED_SCORE, np.float32)

    @classmethod
    def from_options(cls, options: NullOptions) -> NullBackend:
        return cls(options.max_batch_size, blocking=options.blocking, device_ms=options.device_ms)

    @classmethod
    def from_config(cls, config: ServeConfig) -> NullBackend:
        return cls.from_options(NullOptions.from_config(config))

    def describe(self) -> BackendInfo:
        return BackendInfo(
            engine="null-threaded" if self.blocking else "null",
            model_name="null",
            model_version="0",
            max_batch_size=self.max_batch_size,
            device="none (answers without a model)"
            + (" + emulated device {:g}+{:g} ms per batch".format(*self.device_ms) if any(self.device_ms) else ""),
            runtime="null backend: fixed probability row, for benchmarking the server",
            digit_threshold=FIXED_THRESHOLD,
            digit_detector={
                "method": f"null backend: every image gets digit_score {float(FIXED_SCORE):g} (no detector runs)",
                "source": "null backend",
            },
        )

    def warm_up(self) -> float:
        return 0.0

    def run(self, images: np.ndarray) -> BackendOutput:
        if any(self.device_ms):
            time.sleep((self.device_ms[0] + self.device_ms[1] * len(images)) / 1000)
        n = len(images)
        if n <= self.max_batch_size:
            return BackendOutput(self._rows[:n], self._scores[:n])
        return BackendOutput(np.broadcast_to(FIXED_ROW, (n, NUM_CLASSES)), np.full(n, FIXED_SCORE, np.float32))

    def close(self) -> None:
        pass
