"""A small convolutional network on the 28x28 input: the digit detector's pixel part, in numpy.

The detector's hand-made features (`digit_detector.py`) see novelty in principal subspaces and in edge
directions; they miss what a few learned strokes see (a handwritten letter's loops and joins, the grain of a
photographed texture). This network looks at the pixels themselves: three 3x3 convolutions (batch
normalization folded into them at fitting time), each followed by ReLU, the first two by 2x2 max pooling,
then the average of each channel over the field and one linear output, the log-odds of "digit".
`training/pixel_network.py` fits it; the detector adds its log-odds to the fusion network's with a weight
chosen on the fitting side; `export/digit_score_graph.py` builds the same layers as ONNX nodes.

Layout here is channels-last (N, H, W, C), so each convolution is one product of a window view:
38k parameters, about 3.6 M multiply-adds per image.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

SIDE = 28
KERNEL = 3
PREFIX = "pixel_net_"  # keys of the detector file
LAYERS = 3
KEYS = (
    *(f"{PREFIX}conv{i}_{part}" for i in range(LAYERS) for part in ("weight", "bias")),
    f"{PREFIX}head_weight",
    f"{PREFIX}head_bias",
)
_ROWS_PER_PRODUCT = 16  # images per im2col product: bounds the window copy (16 x 196 x 216 floats = 2.7 MB)
# OpenBLAS hands a product of this many multiply-adds or more to its worker threads.
_SINGLE_THREAD_MACS = 262_144


def single_threaded_product(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """a @ b in blocks of rows small enough that OpenBLAS computes each on the calling thread.

    Right after ONNX Runtime ran a batch on the CPU, its thread pool still spins on the same cores: a product
    handed to BLAS worker threads then took 3-20 ms instead of 0.07 ms (the detector's 32-image projection), and
    this network 3 ms more per image.
    """
    rows = max(1, (_SINGLE_THREAD_MACS - 1) // (b.shape[0] * b.shape[1]))
    if len(a) <= rows:
        return a @ b
    out = np.empty((len(a), b.shape[1]), np.float32)
    for start in range(0, len(a), rows):
        np.matmul(a[start : start + rows], b, out=out[start : start + rows])
    return out


class PixelNetwork:
    """Log-odds of "digit" from the normalized input, with weights in PyTorch's (out, in, kh, kw) layout."""

    def __init__(self, params: dict[str, Any], problems: list[str]) -> None:
        self.conv_weights = [np.asarray(params[f"{PREFIX}conv{i}_weight"], np.float32) for i in range(LAYERS)]
        self.conv_biases = [np.asarray(params[f"{PREFIX}conv{i}_bias"], np.float32) for i in range(LAYERS)]
        self.head_weight = np.asarray(params[f"{PREFIX}head_weight"], np.float32).reshape(-1)
        self.head_bias = np.float32(np.asarray(params[f"{PREFIX}head_bias"], np.float32).reshape(-1)[0])
        channels = 1
        for i, (weight, bias) in enumerate(zip(self.conv_weights, self.conv_biases, strict=True)):
            if weight.ndim != 4 or weight.shape[1:] != (channels, KERNEL, KERNEL) or bias.shape != weight.shape[:1]:
                problems.append(
                    f"{PREFIX}conv{i}_weight has shape {weight.shape} and its bias {bias.shape}, expected "
                    f"(c, {channels}, {KERNEL}, {KERNEL}) and (c,)"
                )
                return
            channels = weight.shape[0]
        if self.head_weight.shape != (channels,):
            problems.append(f"{PREFIX}head_weight has shape {self.head_weight.shape}, expected ({channels},)")
        # (in x kh x kw, out): the window view's last three axes are (channel, row, column)
        self._matrices = [
            np.ascontiguousarray(w.transpose(1, 2, 3, 0).reshape(-1, w.shape[0])) for w in self.conv_weights
        ]

    @property
    def parameters(self) -> int:
        return (
            sum(w.size + b.size for w, b in zip(self.conv_weights, self.conv_biases, strict=True))
            + len(self.head_weight)
            + 1
        )

    def logits(self, images: np.ndarray) -> np.ndarray:
        """(N, 1, 28, 28) or (N, 784) normalized input -> (N,) float32 log-odds of "digit"."""
        x = np.asarray(images, np.float32).reshape(-1, SIDE, SIDE, 1)
        out = np.empty(len(x), np.float32)
        for start in range(0, len(x), _ROWS_PER_PRODUCT):
            out[start : start + _ROWS_PER_PRODUCT] = self._logits(x[start : start + _ROWS_PER_PRODUCT])
        return out

    def _logits(self, x: np.ndarray) -> np.ndarray:
        for i, (matrix, bias) in enumerate(zip(self._matrices, self.conv_biases, strict=True)):
            n, h, w, c = x.shape
            padded = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
            windows = sliding_window_view(padded, (KERNEL, KERNEL), axis=(1, 2))  # (N, H, W, C, 3, 3)
            x = single_threaded_product(windows.reshape(n * h * w, c * KERNEL * KERNEL), matrix).reshape(n, h, w, -1)
            x += bias
            np.maximum(x, 0.0, out=x)
            if i < LAYERS - 1:
                x = x.reshape(n, h // 2, 2, w // 2, 2, -1).max(axis=(2, 4))
        pooled = x.mean(axis=(1, 2), dtype=np.float32)
        return pooled @ self.head_weight + self.head_bias

    def graph_constants(self) -> dict[str, Any]:
        """The layers' numbers, as the ONNX builder takes them (NCHW weights, as ONNX Conv)."""
        return {
            "conv_weights": self.conv_weights,
            "conv_biases": self.conv_biases,
            "head_weight": self.head_weight,
            "head_bias": self.head_bias,
        }
