"""The model runtime: an ONNX Runtime session on CUDA when usable, else CPU. Knows nothing of gRPC."""

from __future__ import annotations

import ctypes
import hashlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from export.metadata import ModelMetadata
from server.preprocess import Normalization

log = logging.getLogger("mnist.runtime")

# cuDNN's exhaustive algorithm search costs ~0.5 s per new input shape; the heuristic one ~0.1 s at
# nearly the same steady speed, so batches are padded to a few shapes, each warmed up at start.
CUDA_OPTIONS = {"cudnn_conv_algo_search": "HEURISTIC", "do_copy_in_default_stream": "1"}


class ProviderUnavailable(RuntimeError):
    pass


@dataclass(frozen=True)
class Prediction:
    digit: int
    confidence: float
    probabilities: np.ndarray  # (10,) float32


def batch_shapes(max_batch_size: int) -> list[int]:
    """Powers of two up to `max_batch_size`, and it: the padded batch sizes a GPU session sees."""
    sizes, size = [], 1
    while size < max_batch_size:
        sizes.append(size)
        size *= 2
    return sizes + [max_batch_size]


class OnnxModel:
    """One loaded model: metadata, provider choice, and `predict` over a stacked batch."""

    def __init__(
        self, path: str | Path, provider: str = "auto", max_batch_size: int = 32, intra_op_threads: int = 0
    ) -> None:
        import onnxruntime as ort

        self.path = Path(path)
        self.sha256 = hashlib.sha256(self.path.read_bytes()).hexdigest()
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if intra_op_threads:
            options.intra_op_num_threads = intra_op_threads
        self.session = ort.InferenceSession(str(self.path), options, providers=self._providers(ort, provider))
        self.providers: list[str] = self.session.get_providers()
        if provider == "cuda" and self.providers[0] != "CUDAExecutionProvider":
            raise ProviderUnavailable(
                f"--provider cuda asked for, but ONNX Runtime could not start CUDA (providers in use: {self.providers})"
            )
        self.on_gpu = self.providers[0] == "CUDAExecutionProvider"
        self.metadata = ModelMetadata.from_props(self.session.get_modelmeta().custom_metadata_map)
        n = self.metadata.normalization
        self.normalization = Normalization(scale=n["scale"], mean=n["mean"], std=n["std"])
        self.max_batch_size = max_batch_size
        # CPU kernels take any batch size at no extra cost; on the GPU each new shape costs an algorithm search.
        self.padded_sizes = batch_shapes(max_batch_size) if self.on_gpu else []
        log.info(
            "model %s version %s (%s) loaded on %s",
            self.metadata.model_name,
            self.metadata.model_version,
            self.path,
            " > ".join(self.providers),
        )

    @staticmethod
    def _providers(ort, provider: str) -> list:
        if provider == "cpu":
            return ["CPUExecutionProvider"]
        if not nvidia_driver_present():  # spares the log ONNX Runtime's own CUDA loading errors
            if provider == "cuda":
                raise ProviderUnavailable("--provider cuda asked for, but no NVIDIA driver (libcuda.so.1) is present")
            log.info("no NVIDIA driver (libcuda.so.1) found; using CPU")
            return ["CPUExecutionProvider"]
        if hasattr(ort, "preload_dlls"):  # onnxruntime-gpu >= 1.21: CUDA/cuDNN from the nvidia-* wheels if present
            try:
                ort.preload_dlls()
            except Exception as exc:  # noqa: BLE001 - a missing library only means no CUDA
                log.debug("preload_dlls: %s", exc)
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            if provider == "cuda":
                raise ProviderUnavailable(
                    "--provider cuda asked for, but this onnxruntime build has no CUDA "
                    "provider (install onnxruntime-gpu)"
                )
            log.info("CUDAExecutionProvider not in this onnxruntime build; using CPU")
            return ["CPUExecutionProvider"]
        return [("CUDAExecutionProvider", CUDA_OPTIONS), "CPUExecutionProvider"]

    def padded_size(self, n: int) -> int:
        return next((size for size in self.padded_sizes if size >= n), n)

    def run(self, batch: np.ndarray) -> np.ndarray:
        """(N, 1, 28, 28) normalized float32 -> (N, 10) probabilities."""
        n = len(batch)
        padded = self.padded_size(n)
        if padded != n:
            batch = np.concatenate([batch, np.zeros((padded - n, *batch.shape[1:]), np.float32)])
        return self.session.run(["probabilities"], {"image": batch})[0][:n]

    def warm_up(self) -> float:
        """Run every batch shape the server will use once; returns seconds spent."""
        started = time.perf_counter()
        for size in self.padded_sizes or [1, self.max_batch_size]:
            self.run(np.zeros((size, 1, 28, 28), np.float32))
        return time.perf_counter() - started


def nvidia_driver_present() -> bool:
    try:
        ctypes.CDLL("libcuda.so.1")
    except OSError:
        return False
    return True


def to_predictions(probabilities: np.ndarray) -> list[Prediction]:
    digits = probabilities.argmax(1)
    return [Prediction(int(d), float(p[d]), p) for d, p in zip(digits, probabilities, strict=True)]
