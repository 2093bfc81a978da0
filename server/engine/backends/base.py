"""What the model pipeline needs of an inference engine, and how an engine describes itself."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np

from proto.contract import MNIST_NORMALIZATION, Normalization


class BackendUnavailable(RuntimeError):
    """The engine cannot be set up as configured (no CUDA, no such model file, a variant missing, ...)."""


@dataclass(frozen=True)
class BackendInfo:
    """Everything an operator or a benchmark needs to know about what answers the requests."""

    engine: str  # "onnxruntime", "null"
    model_name: str
    model_version: str
    model_sha256: str = ""
    model_path: str = ""
    test_accuracy: float = 0.0
    providers: tuple[str, ...] = ()
    precision: str = "fp32"
    layout: str = "NCHW"
    batch_buckets: tuple[int, ...] = ()  # the fixed batch sizes runs are padded to; () = any size, one session
    max_batch_size: int = 1
    cuda_graph: bool = False
    io_binding: bool = False
    device: str = "CPU"
    runtime: str = ""
    options: dict[str, str] = field(default_factory=dict)  # engine options as given to it (provider options, ...)
    normalization: Normalization = MNIST_NORMALIZATION
    # The engine's own digit_score (a model with the output, from its metadata; the null engine's fixed one): the
    # threshold and how the score is made. None: the engine gives no score; the server's separate detector does.
    digit_threshold: float | None = None
    digit_detector: dict[str, Any] = field(default_factory=dict)

    @property
    def on_gpu(self) -> bool:
        return bool(self.providers) and self.providers[0] == "CUDAExecutionProvider"

    def summary(self) -> str:
        """One line for logs and plot titles."""
        shapes = ",".join(map(str, self.batch_buckets)) if self.batch_buckets else f"any up to {self.max_batch_size}"
        extras = [name for name, on in (("CUDA graph", self.cuda_graph), ("IO binding", self.io_binding)) if on]
        return (
            f"{self.engine} {self.model_name} {self.model_version} {self.precision} {self.layout} on "
            f"{self.providers[0] if self.providers else self.device} ({self.device}); batch shapes {shapes}"
            + (f"; {', '.join(extras)}" if extras else "")
            + (f"; {self.runtime}" if self.runtime else "")
        )


@dataclass(frozen=True, slots=True)
class BackendOutput:
    """What one run gives: the probabilities, and the model's own digit scores when it computes them."""

    probabilities: np.ndarray  # (N, 10) float32
    digit_scores: np.ndarray | None = None  # (N,) float32 in [0, 1]; None: this engine has no digit_score output


@runtime_checkable
class Backend(Protocol):
    """An engine that turns normalized images into class probabilities.

    `run` is called from one thread at a time: the batch runner thread when `blocking` (a model:
    its run would hold up the event loop), else the event loop itself (an engine that answers in
    microseconds, for which a thread hand-off would cost more than the run).
    """

    blocking: bool

    def describe(self) -> BackendInfo:
        """What this engine is and how it was set up."""
        ...

    def warm_up(self) -> float:
        """Run every shape the engine will use, so no request pays for first-run costs; returns seconds."""
        ...

    def run(self, images: np.ndarray) -> BackendOutput:
        """(N, 1, 28, 28) float32 normalized images, any N >= 1 -> (N, 10) float32 probabilities, and (N,) digit
        scores when `describe().digit_threshold` is set."""
        ...

    def close(self) -> None:
        """Release sessions and device memory."""
        ...
