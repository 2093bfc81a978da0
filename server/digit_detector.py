"""Is this a handwritten digit at all? An out-of-distribution score for every answer. numpy only.

The classifier must pick one of ten digits, so a blank page, a ruled line or static comes back as
"1" or "8" with high confidence. `DigitDetector.score` gives each image a `digit_score` in [0, 1]:
how much the model's input looks like an MNIST digit, and how sure the model is about it.

Features, all from the normalized 28x28 input the model received and its softmax:
  - novelty in input space: energy left after projecting onto the top principal components of
    MNIST training digits (reconstruction error) and the Mahalanobis length inside that subspace,
    both for all digits together and for the predicted digit's own subspace (a letter "k" that the
    model calls 4 must also look like a 4), plus the best fit over the ten digit subspaces;
  - ink statistics: fraction of bright pixels, mean intensity, stroke roughness (mean jump between
    neighbouring pixels per unit of mass), share of soft (anti-aliased) pixels among the lit ones,
    share of the mass in the outer frame (MNIST digits sit in the central 20x20 box);
  - model evidence: log-odds of the top probability and the entropy of the softmax.
A logistic regression on these and their squares ("too little ink" and "too much ink" are both
suspicious) fuses them. `python -m export.digit_detector` fitted it on MNIST training digits
(clean, photographed through the server's preprocessing, slightly moved or binarized) against synthetic
non-digits, and set `threshold` for about 1% false alarms on held-out real digits. The parameters
live in a small .npz file with a format version, so file and code can be upgraded independently.

Cost: one (N, 784) x (784, ~165) product and a few dozen small vectorized steps; no per-image Python.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

FORMAT_VERSION = 1
KIND = "mnist-digit-detector"
SIDE = 28
PIXELS = SIDE * SIDE
NUM_CLASSES = 10
# The raw features in the order `raw_features` returns them (the first LOG_FEATURES are logarithms);
# the file records the list it was fitted with and `load` checks that it matches.
FEATURE_NAMES = (
    "log_residual",  # energy outside the all-digit subspace (normalized units, per pixel)
    "log_mahalanobis",  # mean z^2 / variance inside it
    "class_log_residual",  # energy outside the predicted digit's subspace
    "class_min_log_residual",  # the smallest of the ten per-digit residuals
    "class_log_mahalanobis",  # mean z^2 / variance inside the predicted digit's subspace
    "log_ink",  # fraction of pixels brighter than half scale
    "log_mass",  # mean intensity in [0, 1]
    "log_roughness",  # mean |horizontal and vertical jump| per unit of mass
    "max_prob_logit",  # log-odds of the top probability, capped at +-16
    "soft_share",  # share of lit pixels that are anti-aliased grey
    "frame_share",  # share of the intensity in the outer 4-pixel frame
    "entropy",  # softmax entropy in nats
)
LOG_FEATURES = 9
REQUIRED_KEYS = (
    "format_version",
    "kind",
    "threshold",
    "feature_names",
    "norm_mean",
    "norm_std",
    "projection",
    "global_mean_projection",
    "global_inv_variance",
    "global_mean_sq",
    "class_mean_projection",
    "class_inv_variance",
    "class_mean_sq",
    "feature_mean",
    "feature_std",
    "squared",
    "weights",
    "bias",
    "describe_json",
)
_EPS = 1e-4
_BLAS_ROWS = 2  # rows per matrix product: 2 x 784 x 165 multiply-adds stay on the calling thread
_MAX_LOGIT = 16.0  # float32 probabilities saturate at 1 - 6e-8: cap the log-odds so 1.0 stays finite
_HALF = 0.5  # pixel value in [0, 1] above which a pixel counts as ink
_LIT = 0.1  # above which it counts as lit at all


class DigitDetectorError(ValueError):
    """The detector file is missing or not a detector this code can read; the message names the file."""


def frame_mask(width: int = 4) -> np.ndarray:
    """(784,) float32: 1 in the outer `width` pixels of the 28x28 field, 0 inside."""
    mask = np.ones((SIDE, SIDE), np.float32)
    mask[width:-width, width:-width] = 0.0
    return mask.reshape(-1)


def projection_columns(global_components: int, class_components: int) -> int:
    """Columns of `projection`: components (all digits, then digit by digit), 11 means, ones, frame."""
    return global_components + NUM_CLASSES * class_components + 1 + NUM_CLASSES + 2


class DigitDetector:
    """Scores model inputs for digit-ness; built by `load` (serving) or by the exporter (fitting).

    `projection` holds, as columns: the global principal components, each digit's components (digit
    by digit), the global mean, the ten digit means, a column of ones and the frame mask, so one
    product gives every dot product the features need.
    """

    def __init__(self, params: dict[str, Any], source: str = "<memory>") -> None:
        self.source = source
        self.threshold = float(params["threshold"])
        self.feature_names = tuple(str(name) for name in np.atleast_1d(params["feature_names"]))
        self._norm_mean = float(params["norm_mean"])
        self._norm_std = float(params["norm_std"])
        self._projection = np.ascontiguousarray(params["projection"], np.float32)
        global_mean_projection = np.asarray(params["global_mean_projection"], np.float64)
        global_inv_variance = np.asarray(params["global_inv_variance"], np.float64)
        class_mean_projection = np.asarray(params["class_mean_projection"], np.float64)
        class_inv_variance = np.asarray(params["class_inv_variance"], np.float64)
        class_mean_sq = np.asarray(params["class_mean_sq"], np.float64)
        feature_mean = np.asarray(params["feature_mean"], np.float64)
        feature_std = np.asarray(params["feature_std"], np.float64)
        self._squared = np.atleast_1d(np.asarray(params["squared"], np.int64))
        weights = np.asarray(params["weights"], np.float64)
        self._describe = json.loads(str(params["describe_json"]))
        kg = self.global_components = len(global_mean_projection)
        kc = self.class_components = class_mean_projection.shape[-1] if class_mean_projection.ndim == 2 else 0
        self._check_shapes(
            global_inv_variance,
            class_mean_projection,
            class_inv_variance,
            class_mean_sq,
            feature_mean,
            feature_std,
            weights,
        )
        # Precomputed so that scoring is a handful of array operations:
        self._end = kg + NUM_CLASSES * kc  # columns [0, end) of the product are projections
        self._mean_projection = np.concatenate([global_mean_projection, class_mean_projection.reshape(-1)]).astype(
            np.float32
        )
        self._mean_sq = np.concatenate([[float(params["global_mean_sq"])], class_mean_sq]).astype(np.float32)
        # squared projections @ blocks -> [energy inside: all, digit 0..9 | Mahalanobis: all, digit 0..9]
        blocks = np.zeros((self._end, 2 * (1 + NUM_CLASSES)), np.float64)
        blocks[:kg, 0] = 1.0
        blocks[:kg, 1 + NUM_CLASSES] = global_inv_variance / max(kg, 1)
        for digit in range(NUM_CLASSES):
            rows = slice(kg + digit * kc, kg + (digit + 1) * kc)
            blocks[rows, 1 + digit] = 1.0
            blocks[rows, 2 + NUM_CLASSES + digit] = class_inv_variance[digit] / max(kc, 1)
        self._blocks = blocks.astype(np.float32)
        self._frame_total = np.float32(self._projection[:, -1].sum())
        # Thresholds in normalized units, so the input is never converted back to pixels.
        self._half = np.float32((_HALF - self._norm_mean) / self._norm_std)
        self._lit = np.float32((_LIT - self._norm_mean) / self._norm_std)
        self._black = np.float32(-self._norm_mean / self._norm_std)
        self._levels = np.array([self._half, self._lit], np.float32)[:, None, None]
        self._std = np.float32(self._norm_std)
        # The regression on standardized features and their squares, folded into one linear and one
        # quadratic weight per raw feature: logit = f @ linear + (f * f) @ quadratic + constant.
        n_features = len(FEATURE_NAMES)
        scale = 1.0 / feature_std
        linear, quadratic = weights[:n_features] * scale, np.zeros(n_features)
        constant = float(params["bias"]) - float(weights[:n_features] @ (feature_mean * scale))
        for position, index in enumerate(self._squared):
            w = weights[n_features + position] * scale[index] ** 2
            quadratic[index] += w
            linear[index] -= 2.0 * w * feature_mean[index]
            constant += w * feature_mean[index] ** 2
        self._linear, self._quadratic = linear.astype(np.float32), quadratic.astype(np.float32)
        self._constant = np.float32(constant)

    def _check_shapes(
        self,
        global_inv_variance: np.ndarray,
        class_mean_projection: np.ndarray,
        class_inv_variance: np.ndarray,
        class_mean_sq: np.ndarray,
        feature_mean: np.ndarray,
        feature_std: np.ndarray,
        weights: np.ndarray,
    ) -> None:
        kg, kc = self.global_components, self.class_components
        columns = projection_columns(kg, kc)
        n_features = len(FEATURE_NAMES)
        problems = []
        if self.feature_names != FEATURE_NAMES:
            problems.append(f"features {list(self.feature_names)}, this code computes {list(FEATURE_NAMES)}")
        if self._projection.shape != (PIXELS, columns):
            problems.append(f"projection has shape {self._projection.shape}, expected ({PIXELS}, {columns})")
        if global_inv_variance.shape != (kg,):
            problems.append(f"global_inv_variance has shape {global_inv_variance.shape}, expected ({kg},)")
        if class_mean_projection.shape != (NUM_CLASSES, kc) or class_inv_variance.shape != (NUM_CLASSES, kc):
            problems.append(f"class_mean_projection and class_inv_variance must be ({NUM_CLASSES}, k)")
        if class_mean_sq.shape != (NUM_CLASSES,):
            problems.append(f"class_mean_sq has shape {class_mean_sq.shape}, expected ({NUM_CLASSES},)")
        if feature_mean.shape != (n_features,) or feature_std.shape != (n_features,):
            problems.append("feature_mean / feature_std do not match the feature list")
        if len(self._squared) and (self._squared.min() < 0 or self._squared.max() >= n_features):
            problems.append("squared names a feature that does not exist")
        if weights.shape != (n_features + len(self._squared),):
            problems.append(f"weights has shape {weights.shape}, expected ({n_features + len(self._squared)},)")
        if not 0.0 <= self.threshold <= 1.0:
            problems.append(f"threshold {self.threshold} is outside [0, 1]")
        if not (self._norm_std > 0 and np.all(feature_std > 0)):
            problems.append("a standard deviation is not positive")
        if problems:
            raise DigitDetectorError(f"{self.source}: not a usable digit detector: " + "; ".join(problems))

    @classmethod
    def load(cls, path: str | Path) -> DigitDetector:
        """Read a detector written by `export.digit_detector`; a missing or foreign file is named in the error."""
        path = Path(path)
        try:
            with np.load(path, allow_pickle=False) as data:
                params = {key: data[key] for key in data.files}
        except FileNotFoundError:
            raise DigitDetectorError(
                f"{path}: digit detector file not found (write it with `python -m export.digit_detector`)"
            ) from None
        except IsADirectoryError:
            raise DigitDetectorError(f"{path}: is a directory, expected a digit detector .npz file") from None
        except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
            raise DigitDetectorError(f"{path}: not a readable .npz digit detector ({exc})") from None
        if "kind" in params and str(params["kind"]) != KIND:
            raise DigitDetectorError(f"{path}: holds {str(params['kind'])!r}, not a {KIND!r}")
        if "format_version" in params and int(params["format_version"]) != FORMAT_VERSION:
            raise DigitDetectorError(
                f"{path}: digit detector format version {int(params['format_version'])}; "
                f"this code reads version {FORMAT_VERSION}"
            )
        missing = [key for key in REQUIRED_KEYS if key not in params]
        if missing:
            raise DigitDetectorError(f"{path}: not a digit detector file: missing {', '.join(missing)}")
        try:
            return cls(params, source=str(path))
        except DigitDetectorError:
            raise
        except (TypeError, ValueError, KeyError, IndexError) as exc:
            raise DigitDetectorError(f"{path}: damaged digit detector ({exc})") from None

    def raw_features(self, images: np.ndarray, probabilities: np.ndarray) -> np.ndarray:
        """(N, 1, 28, 28) normalized input and (N, 10) softmax -> (N, 12) float32 features (FEATURE_NAMES)."""
        x = np.asarray(images, np.float32).reshape(-1, PIXELS)
        probabilities = np.asarray(probabilities, np.float32)
        n = len(x)
        if probabilities.shape != (n, NUM_CLASSES):
            raise ValueError(f"probabilities have shape {probabilities.shape}, expected ({n}, {NUM_CLASSES})")
        end = self._end
        product = self._project(x)  # every dot product with components, means, ones and the frame
        inside = product[:, :end] - self._mean_projection
        inside *= inside
        sums = inside @ self._blocks  # (N, 22): energy inside and Mahalanobis, all digits then each digit
        # |x - mean|^2 - energy inside = energy outside each subspace (global, then digit 0..9)
        outside = np.einsum("ij,ij->i", x, x)[:, None] - 2.0 * product[:, end : end + 1 + NUM_CLASSES]
        outside += self._mean_sq
        outside -= sums[:, : 1 + NUM_CLASSES]
        predicted = probabilities.argmax(1)
        rows = np.arange(n)
        mass = self._std * (product[:, -2] - PIXELS * self._black)  # sum of pixels in [0, 1]
        out = np.empty((n, len(FEATURE_NAMES)), np.float32)
        logs = out[:, :LOG_FEATURES]  # filled with the arguments, then one logarithm
        logs[:, 0] = outside[:, 0]
        logs[:, 1] = sums[:, 1 + NUM_CLASSES]
        logs[:, 2] = outside[rows, predicted + 1]
        logs[:, 3] = outside[:, 1:].min(1)
        logs[:, 4] = sums[rows, predicted + 2 + NUM_CLASSES]
        counts = np.count_nonzero(x[None] > self._levels, axis=2)  # (2, N): ink, lit
        logs[:, 5] = counts[0]
        logs[:, 6] = mass
        # neighbours in reading order (the 27 row ends pair with the next row's start: border pixels) and vertically
        jumps = np.abs(x[:, 1:] - x[:, :-1]).sum(1) + np.abs(x[:, SIDE:] - x[:, :-SIDE]).sum(1)
        logs[:, 7] = self._std * jumps / (mass + 1.0)
        top = np.minimum(probabilities.max(1), 1.0)
        logs[:, 8] = top / ((1.0 + 1e-7) - top)
        logs[:, :8] *= _LOG_SCALE
        np.maximum(logs, 0.0, out=logs)  # rounding can leave a residual a hair below 0
        logs += _EPS
        np.log(logs, out=logs)
        np.minimum(out[:, 8], _MAX_LOGIT, out=out[:, 8])
        out[:, 9] = (counts[1] - counts[0]) / (counts[1] + 1.0)
        out[:, 10] = self._std * (product[:, -1] - self._frame_total * self._black) / (mass + 1.0)
        clipped = np.maximum(probabilities, 1e-12)
        out[:, 11] = -np.einsum("ij,ij->i", clipped, np.log(clipped))
        return out

    def _project(self, x: np.ndarray) -> np.ndarray:
        """x @ projection, in products of _BLAS_ROWS rows: OpenBLAS runs those on this thread alone.

        One large product is handed to BLAS worker threads; on a CPU server, right after ONNX Runtime
        ran the batch, its thread pool is still spinning on the same cores and a 32-image product took
        3-20 ms instead of 0.07 ms. Row pairs stay under OpenBLAS's threading threshold.
        """
        if len(x) <= _BLAS_ROWS:
            return x @ self._projection
        product = np.empty((len(x), self._projection.shape[1]), np.float32)
        for start in range(0, len(x), _BLAS_ROWS):
            np.matmul(x[start : start + _BLAS_ROWS], self._projection, out=product[start : start + _BLAS_ROWS])
        return product

    def logits(self, features: np.ndarray) -> np.ndarray:
        """Raw features -> the logistic regression's log-odds of "digit"."""
        return features @ self._linear + (features * features) @ self._quadratic + self._constant

    def score(self, images: np.ndarray, probabilities: np.ndarray) -> np.ndarray:
        """(N, 1, 28, 28) input as the model received it (normalized), its (N, 10) softmax -> (N,) float32 in [0, 1]."""
        logit = self.logits(self.raw_features(images, probabilities))
        logit[np.isnan(logit)] = -60.0  # NaN in the input (never from uint8 pixels) is not a digit
        return (1.0 / (1.0 + np.exp(-np.maximum(logit, -60.0)))).astype(np.float32)

    def is_digit(self, scores: np.ndarray) -> np.ndarray:
        """Boolean array: score at or above the threshold."""
        return np.asarray(scores) >= self.threshold

    def describe(self) -> dict[str, Any]:
        """Threshold, method and calibration figures, for the server's model info."""
        return {
            **self._describe,
            "threshold": self.threshold,
            "format_version": FORMAT_VERSION,
            "components": {"all_digits": self.global_components, "per_digit": self.class_components},
            "source": self.source,
        }


# Per-pixel energies, Mahalanobis means (already divided by k in the blocks), ink fraction, mean intensity.
_LOG_SCALE = np.array([1 / PIXELS, 1.0, 1 / PIXELS, 1 / PIXELS, 1.0, 1 / PIXELS, 1 / PIXELS, 1.0], np.float32)
