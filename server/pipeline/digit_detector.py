"""Is this a handwritten digit at all? An out-of-distribution score for every answer. numpy only.

The classifier must pick one of ten digits, so a blank page, a ruled line, static or a printed "A"
comes back as "1", "8" or "4" with high confidence. `DigitDetector.score` gives each image a
`digit_score` in [0, 1]: how much the model's input looks like an MNIST digit, and how sure the model
is about it.

Features, all from the normalized 28x28 input the model received and its softmax:
  - novelty in input space: energy left after projecting onto the top principal components of
    MNIST training digits (reconstruction error) and the Mahalanobis length inside that subspace,
    both for all digits together and for the predicted digit's own subspace (a letter "k" that the
    model calls 4 must also look like a 4), plus the best fit over the ten digit subspaces;
  - the same novelty measures on a map of edge orientations (horizontal, vertical and both diagonal
    differences pooled in 7x7 cells of 4 pixels): printed letters are made of straight strokes,
    corners and serifs in arrangements that handwritten digits do not have;
  - ink statistics: fraction of bright pixels, mean intensity, stroke roughness (sum of the jumps
    between neighbouring pixels per unit of mass), share of soft (anti-aliased) pixels among the lit
    ones, share of the mass in the outer frame (MNIST digits sit in the central 20x20 box);
  - model evidence: log-odds of the top probability, the entropy and the log of each probability;
  - shape coordinates: the input's coordinates on the top principal components of digits, in pixels
    and in the orientation map.
A small neural network fuses them: a logistic regression on all of them (and the squares of the
scalar features: "too little ink" and "too much ink" are both suspicious) plus one hidden layer of
tanh units (the average of a few small networks, stored as one). `python -m training.fit_digit_detector`
fitted it on MNIST training digits (clean, photographed through the server's preprocessing, slightly
moved or binarized, with specks, stray strokes, shading, ruled lines or blur added) against
synthetic non-digits (letters in many fonts among them), and set `threshold` for about 1% false
alarms on held-out real digits. Beside it, a small convolutional network on the pixels themselves
(`pixel_network.py`, fitted on the same images) gives its own log-odds; the score's log-odds are the two
weighed together (`fusion_weights`, chosen on the fitting side). The parameters live in a small .npz file with
a format version, so file and code can be upgraded independently (version 3: the pixel network and its weight;
a version 2 file, without them, scores with the fusion network alone; a version 1 file is refused with a
message to refit).

Cost on one core of the 2-core development machine: the features and the fusion network (one (N, 784) x
(784, ~165) product, an orientation map, a few small products and a few dozen vectorized steps; no per-image
Python) about 95 us for one image and 0.45 ms for 32; the pixel network in numpy about 0.7 ms for one image and
0.35 ms per image in a batch. Served models compute all of it inside their own graph
(`export/digit_score_graph.py`); this numpy code is the reference and the fallback for model files without it.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from server.pipeline import pixel_network
from server.pipeline.pixel_network import PixelNetwork

FORMAT_VERSION = 3  # written by this code: version 2 with an optional pixel network and its fusion weights
READABLE_VERSIONS = (2, 3)  # a version 2 file has no pixel network and scores exactly as before
KIND = "mnist-digit-detector"
SIDE = 28
PIXELS = SIDE * SIDE
NUM_CLASSES = 10
# The scalar features in the order `raw_features` returns them; the file records the list it was
# fitted with and `load` checks that it matches.
FEATURE_NAMES = (
    "log_residual",  # energy outside the all-digit subspace (normalized units, per pixel)
    "log_mahalanobis",  # mean z^2 / variance inside it
    "class_log_residual",  # energy outside the predicted digit's subspace
    "class_log_mahalanobis",  # mean z^2 / variance inside the predicted digit's subspace
    "class_min_log_residual",  # the smallest of the ten per-digit residuals
    "hog_log_residual",  # the same five on the edge-orientation map
    "hog_log_mahalanobis",
    "hog_class_log_residual",
    "hog_class_log_mahalanobis",
    "hog_class_min_log_residual",
    "log_ink",  # fraction of pixels brighter than half scale
    "log_mass",  # mean intensity in [0, 1]
    "log_roughness",  # sum of |horizontal and vertical jumps| between neighbours per unit of mass
    "max_prob_logit",  # log-odds of the top probability, capped at +-16
    "soft_share",  # share of lit pixels that are anti-aliased grey
    "frame_share",  # share of the intensity in the outer 4-pixel frame
    "entropy",  # softmax entropy in nats
)
NOVELTY = 5  # novelty features per space (pixels, then the orientation map)
LOG_FEATURES = 14  # the features before this one are logarithms
HOG_CHANNELS = 4  # |d/dx|, |d/dy|, |d/dx + d/dy|, |d/dx - d/dy|
HOG_CELLS = 7  # cells per side of the orientation map (4 pixels each)
HOG_SIZE = HOG_CHANNELS * HOG_CELLS * HOG_CELLS
SUBSPACE_KEYS = (
    "projection",
    "global_mean_projection",
    "global_inv_variance",
    "global_mean_sq",
    "class_mean_projection",
    "class_inv_variance",
    "class_mean_sq",
)
HOG_PREFIX = "hog_"
REQUIRED_KEYS = (
    "format_version",
    "kind",
    "threshold",
    "feature_names",
    "norm_mean",
    "norm_std",
    *SUBSPACE_KEYS,
    *(HOG_PREFIX + key for key in SUBSPACE_KEYS),
    "squared",
    "input_names",
    "input_mean",
    "input_std",
    "linear",
    "hidden_weights",
    "hidden_bias",
    "output_weights",
    "bias",
    "describe_json",
)
_EPS = 1e-4
_MAX_LOGIT = 16.0  # float32 probabilities saturate at 1 - 6e-8: cap the log-odds so 1.0 stays finite
_HALF = 0.5  # pixel value in [0, 1] above which a pixel counts as ink
_LIT = 0.1  # above which it counts as lit at all
_HOG_EPS = 1e-3  # added to an orientation map's total (in [0, 1] pixel units) before it is normalized
_MIN_PROBABILITY = 1e-7  # floor of the log probabilities
INPUT_CLIP = 30.0  # standardized fusion inputs are clipped to +-this: garbage in gives a finite score
_NAN_HALF_LOGIT = -30.0  # half log-odds given to NaN input (never from uint8 pixels): not a digit


class DigitDetectorError(ValueError):
    """The detector file is missing or not a detector this code can read; the message names the file."""


def frame_mask(width: int = 4) -> np.ndarray:
    """(784,) float32: 1 in the outer `width` pixels of the 28x28 field, 0 inside."""
    mask = np.ones((SIDE, SIDE), np.float32)
    mask[width:-width, width:-width] = 0.0
    return mask.reshape(-1)


def projection_columns(global_components: int, class_components: int, extra: int = 2) -> int:
    """Columns of a subspace projection: components (all, then class by class), 11 means, extras.

    The pixel projection has two extras (a column of ones and the frame mask), the orientation-map one none.
    """
    return global_components + NUM_CLASSES * class_components + 1 + NUM_CLASSES + extra


def orientation_cells(images: np.ndarray) -> np.ndarray:
    """(N, 28, 28) or (N, 784) normalized input -> (N, 196) float32 edge-orientation map, not normalized.

    Forward differences along x and y and their sum and difference (both diagonals), as absolute
    values, each summed over 7x7 cells of 4x4 pixels: channel by channel, row by row, cell by cell.
    Summed by two products with 0/1 matrices (4-pixel runs along rows, then down columns): fewer
    and faster steps than strided sums, for one image and for many.
    """
    x = np.asarray(images, np.float32).reshape(-1, SIDE, SIDE)
    n, last = len(x), SIDE - 1
    maps = np.zeros((n, HOG_CHANNELS, SIDE, SIDE), np.float32)  # the last row and column stay 0
    corner = x[:, :last, :last]
    gx = np.subtract(x[:, :last, 1:], corner, out=maps[:, 0, :last, :last])
    gy = np.subtract(x[:, 1:, :last], corner, out=maps[:, 1, :last, :last])
    np.add(gx, gy, out=maps[:, 2, :last, :last])
    np.subtract(gx, gy, out=maps[:, 3, :last, :last])
    np.abs(maps, out=maps)
    cells = _POOL_ROWS @ (maps.reshape(-1, SIDE) @ _POOL_COLUMNS).reshape(n * HOG_CHANNELS, SIDE, HOG_CELLS)
    return cells.reshape(n, HOG_SIZE)


def orientation_map(images: np.ndarray, norm_std: float) -> np.ndarray:
    """(N, 196) orientation map divided by its total: a distribution of edge directions, whatever the contrast."""
    cells = orientation_cells(images)
    cells /= cells.sum(1, keepdims=True) + np.float32(_HOG_EPS / norm_std)
    return cells


def input_names(squared: np.ndarray, pixel_components: int, hog_components: int) -> list[str]:
    """The fusion's inputs, column by column: the scalar features, squares, then the coordinates."""
    return [
        *FEATURE_NAMES,
        *(f"{FEATURE_NAMES[i]}^2" for i in squared),
        *(f"pixel_pc{i}" for i in range(pixel_components)),
        *(f"hog_pc{i}" for i in range(hog_components)),
        *(f"log_p{d}" for d in range(NUM_CLASSES)),
    ]


class _Subspaces:
    """Principal subspaces of all digits and of each digit, in some feature space, for novelty measures.

    `projection` holds, as columns: the global principal components, each digit's components (digit
    by digit), the global mean, the ten digit means and `extra` more columns, so one product gives
    every dot product the measures need.
    """

    def __init__(self, params: dict[str, Any], prefix: str, dim: int, extra: int, problems: list[str]) -> None:
        self.projection = np.ascontiguousarray(params[prefix + "projection"], np.float32)
        global_mean_projection = np.asarray(params[prefix + "global_mean_projection"], np.float64)
        global_inv_variance = np.asarray(params[prefix + "global_inv_variance"], np.float64)
        class_mean_projection = np.asarray(params[prefix + "class_mean_projection"], np.float64)
        class_inv_variance = np.asarray(params[prefix + "class_inv_variance"], np.float64)
        class_mean_sq = np.asarray(params[prefix + "class_mean_sq"], np.float64)
        kg = self.global_components = len(global_mean_projection)
        kc = self.class_components = class_mean_projection.shape[-1] if class_mean_projection.ndim == 2 else 0
        columns = projection_columns(kg, kc, extra)
        before = len(problems)
        if self.projection.shape != (dim, columns):
            problems.append(f"{prefix}projection has shape {self.projection.shape}, expected ({dim}, {columns})")
        if global_inv_variance.shape != (kg,):
            problems.append(f"{prefix}global_inv_variance has shape {global_inv_variance.shape}, expected ({kg},)")
        if class_mean_projection.shape != (NUM_CLASSES, kc) or class_inv_variance.shape != (NUM_CLASSES, kc):
            problems.append(f"{prefix}class_mean_projection and {prefix}class_inv_variance must be ({NUM_CLASSES}, k)")
        if class_mean_sq.shape != (NUM_CLASSES,):
            problems.append(f"{prefix}class_mean_sq has shape {class_mean_sq.shape}, expected ({NUM_CLASSES},)")
        if len(problems) > before:
            return
        self.end = kg + NUM_CLASSES * kc  # columns [0, end) of the product are projections
        self.mean_projection = np.concatenate([global_mean_projection, class_mean_projection.reshape(-1)])
        self.mean_sq = np.concatenate([[float(params[prefix + "global_mean_sq"])], class_mean_sq])
        # squared centred projections @ blocks -> [energy inside: all, digit 0..9 | Mahalanobis: all, digit 0..9]
        blocks = np.zeros((self.end, 2 * (1 + NUM_CLASSES)), np.float64)
        blocks[:kg, 0] = 1.0
        blocks[:kg, 1 + NUM_CLASSES] = global_inv_variance / max(kg, 1)
        for digit in range(NUM_CLASSES):
            rows = slice(kg + digit * kc, kg + (digit + 1) * kc)
            blocks[rows, 1 + digit] = 1.0
            blocks[rows, 2 + NUM_CLASSES + digit] = class_inv_variance[digit] / max(kc, 1)
        self.blocks = blocks


class DigitDetector:
    """Scores model inputs for digit-ness; built by `load` (serving) or by the exporter (fitting)."""

    def __init__(self, params: dict[str, Any], source: str = "<memory>") -> None:
        self.source = source
        self.threshold = float(params["threshold"])
        self.format_version = int(params.get("format_version", FORMAT_VERSION))
        self.feature_names = tuple(str(name) for name in np.atleast_1d(params["feature_names"]))
        self._norm_mean = float(params["norm_mean"])
        self._norm_std = float(params["norm_std"])
        self._describe = json.loads(str(params["describe_json"]))
        problems: list[str] = []
        self._pixels = _Subspaces(params, "", PIXELS, 2, problems)
        self._hog = _Subspaces(params, HOG_PREFIX, HOG_SIZE, 0, problems)
        self._squared = np.atleast_1d(np.asarray(params["squared"], np.int64))
        self._squared_all = np.array_equal(self._squared, np.arange(len(FEATURE_NAMES)))
        self.input_names = tuple(str(name) for name in np.atleast_1d(params["input_names"]))
        self._input_mean = np.asarray(params["input_mean"], np.float32)
        input_std = np.asarray(params["input_std"], np.float64)
        linear = np.asarray(params["linear"], np.float64)
        hidden = np.asarray(params["hidden_weights"], np.float64)
        hidden_bias = np.asarray(params["hidden_bias"], np.float64)
        output = np.asarray(params["output_weights"], np.float64)
        self.global_components = self._pixels.global_components
        self.class_components = self._pixels.class_components
        self._check(problems, input_std, linear, hidden, hidden_bias, output)
        # Precomputed so that scoring is a handful of array operations:
        self._frame_total = np.float32(self._pixels.projection[:, -1].sum())
        self._novelty_setup()
        # Thresholds in normalized units, so the input is never converted back to pixels.
        self._half = np.float32((_HALF - self._norm_mean) / self._norm_std)
        self._lit = np.float32((_LIT - self._norm_mean) / self._norm_std)
        self._black = np.float32(-self._norm_mean / self._norm_std)
        self._levels = np.array([self._half, self._lit], np.float32)[:, None, None]
        self._std = np.float32(self._norm_std)
        self._hog_eps = np.float32(_HOG_EPS / self._norm_std)  # orientation cells are in normalized units
        self._input_scale = (1.0 / input_std).astype(np.float32)
        # One product gives the linear term (column 0) and the hidden units' inputs (the rest); the
        # linear term, output weights and bias are stored halved (`_half_logits`).
        self._weights = np.concatenate([0.5 * linear[:, None], hidden], axis=1).astype(np.float32)
        self._hidden_bias = hidden_bias.astype(np.float32)
        self._output = (0.5 * output).astype(np.float32)
        self._bias = np.float32(0.5 * float(params["bias"]))
        # The pixel network's log-odds join the fusion network's: logit = feature_weight x fusion + pixel_weight x
        # pixel network (both stored halved, like the fusion's output layer).
        self.pixel_network: PixelNetwork | None = None
        self._feature_weight, self._pixel_weight = np.float32(0.5), np.float32(0.0)
        if all(key in params for key in pixel_network.KEYS):
            self.pixel_network = PixelNetwork(params, problems)
            weights = np.asarray(params.get("fusion_weights", []), np.float32).reshape(-1)
            if weights.shape != (2,) or not np.all(np.isfinite(weights)) or np.any(weights < 0):
                problems.append(
                    f"fusion_weights must be two finite numbers >= 0 beside a pixel network, not {weights.tolist()}"
                )
            else:
                self._feature_weight, self._pixel_weight = np.float32(0.5 * weights[0]), np.float32(0.5 * weights[1])
        elif any(key in params for key in pixel_network.KEYS):
            problems.append(
                "a partial pixel network: " + ", ".join(k for k in pixel_network.KEYS if k not in params) + " missing"
            )
        if problems:
            raise DigitDetectorError(f"{self.source}: not a usable digit detector: " + "; ".join(problems))

    def _novelty_setup(self) -> None:
        """Both spaces' novelty measures from one product: `_novelty` fills a row per image with

        [pixel projections - their means, squared | orientation-map projections - means, squared |
         x . the 11 pixel means | map . the 11 map means | x . x | map . map]
        and `@ _novelty_matrix + _novelty_constant` gives, per space, the energy outside each of the 11
        subspaces (|x - mean|^2 - energy inside) and the 11 Mahalanobis lengths inside them.
        """
        spaces = (self._pixels, self._hog)
        ends = [space.end for space in spaces]
        means = 1 + NUM_CLASSES
        rows = sum(ends) + 2 * means + 2
        matrix = np.zeros((rows, 2, 2, means), np.float64)  # (row, space, outside | Mahalanobis, subspace)
        constant = np.zeros((2, 2, means), np.float64)
        at = 0
        for s, space in enumerate(spaces):
            matrix[at : at + space.end, s, 0] = -space.blocks[:, :means]
            matrix[at : at + space.end, s, 1] = space.blocks[:, means:]
            at += space.end
        for s, space in enumerate(spaces):
            matrix[at + s * means + np.arange(means), s, 0, np.arange(means)] = -2.0
            matrix[rows - 2 + s, s, 0] = 1.0
            constant[s, 0] = space.mean_sq
        self._novelty_ends = ends
        self._novelty_mean = np.concatenate([space.mean_projection for space in spaces]).astype(np.float32)
        self._novelty_matrix = matrix.reshape(rows, -1).astype(np.float32)
        self._novelty_constant = constant.reshape(-1).astype(np.float32)
        # gathered per image: residual, Mahalanobis, the predicted digit's residual and Mahalanobis, per space
        self._novelty_base = np.array([0, means, 1, means + 1, 2 * means, 3 * means, 2 * means + 1, 3 * means + 1])
        self._novelty_step = np.array([0, 0, 1, 1, 0, 0, 1, 1])

    def _check(
        self,
        problems: list[str],
        input_std: np.ndarray,
        linear: np.ndarray,
        hidden: np.ndarray,
        hidden_bias: np.ndarray,
        output: np.ndarray,
    ) -> None:
        n_features = len(FEATURE_NAMES)
        if self.feature_names != FEATURE_NAMES:
            problems.append(f"features {list(self.feature_names)}, this code computes {list(FEATURE_NAMES)}")
        if len(self._squared) and (self._squared.min() < 0 or self._squared.max() >= n_features):
            problems.append("squared names a feature that does not exist")
        if not problems:
            expected = input_names(self._squared, self._pixels.global_components, self._hog.global_components)
            if list(self.input_names) != expected:
                problems.append(f"input_names do not match the {len(expected)} inputs this code builds")
            d = len(expected)
            if self._input_mean.shape != (d,) or input_std.shape != (d,) or linear.shape != (d,):
                problems.append(f"input_mean, input_std and linear must have shape ({d},)")
            if hidden.ndim != 2 or hidden.shape[0] != d or hidden_bias.shape != (hidden.shape[1],):
                problems.append(f"hidden_weights must be ({d}, h) and hidden_bias (h,)")
            elif output.shape != (hidden.shape[1],):
                problems.append(f"output_weights has shape {output.shape}, expected ({hidden.shape[1]},)")
        if not 0.0 <= self.threshold <= 1.0:
            problems.append(f"threshold {self.threshold} is outside [0, 1]")
        if not (self._norm_std > 0 and np.all(input_std > 0)):
            problems.append("a standard deviation is not positive")
        if problems:
            raise DigitDetectorError(f"{self.source}: not a usable digit detector: " + "; ".join(problems))

    @classmethod
    def load(cls, path: str | Path) -> DigitDetector:
        """Read a detector written by `training.fit_digit_detector`; a missing or foreign file is named in the error."""
        path = Path(path)
        try:
            with np.load(path, allow_pickle=False) as data:
                params = {key: data[key] for key in data.files}
        except FileNotFoundError:
            raise DigitDetectorError(
                f"{path}: digit detector file not found (write it with `python -m training.fit_digit_detector`)"
            ) from None
        except IsADirectoryError:
            raise DigitDetectorError(f"{path}: is a directory, expected a digit detector .npz file") from None
        except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
            raise DigitDetectorError(f"{path}: not a readable .npz digit detector ({exc})") from None
        if "kind" in params and str(params["kind"]) != KIND:
            raise DigitDetectorError(f"{path}: holds {str(params['kind'])!r}, not a {KIND!r}")
        if "format_version" in params and int(params["format_version"]) not in READABLE_VERSIONS:
            raise DigitDetectorError(
                f"{path}: digit detector format version {int(params['format_version'])}; this code reads versions "
                f"{' and '.join(map(str, READABLE_VERSIONS))} (refit with `python -m training.fit_digit_detector`)"
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
        """(N, 1, 28, 28) normalized input and (N, 10) softmax -> (N, 17) float32 scalar features (FEATURE_NAMES)."""
        return self.raw_inputs(images, probabilities)[:, : len(FEATURE_NAMES)]

    def raw_inputs(self, images: np.ndarray, probabilities: np.ndarray) -> np.ndarray:
        """(N, 1, 28, 28) normalized input and (N, 10) softmax -> (N, D) float32 fusion inputs (input_names)."""
        x = np.asarray(images, np.float32).reshape(-1, PIXELS)
        probabilities = np.asarray(probabilities, np.float32)
        n = len(x)
        if probabilities.shape != (n, NUM_CLASSES):
            raise ValueError(f"probabilities have shape {probabilities.shape}, expected ({n}, {NUM_CLASSES})")
        out = np.empty((n, len(self.input_names)), np.float32)
        logs = out[:, :LOG_FEATURES]  # filled with the arguments, then one logarithm
        product = self._project(x)  # every dot product with components, means, ones and the frame
        cells = orientation_cells(x)
        mass = self._std * (product[:, -2] - PIXELS * self._black)  # sum of pixels in [0, 1]
        counts = np.count_nonzero(x[None] > self._levels, axis=2)  # (2, N): ink, lit
        logs[:, 10] = counts[0]
        logs[:, 11] = mass
        per_mass = self._std / (mass + 1.0)
        logs[:, 12] = cells[:, : HOG_SIZE // 2].sum(1) * per_mass  # the |d/dx| and |d/dy| cells
        top = np.minimum(probabilities.max(1), 1.0)
        logs[:, 13] = top / ((1.0 + 1e-7) - top)
        total = cells.sum(1)
        total += self._hog_eps
        cells /= total[:, None]  # the orientation map as a distribution of edge directions
        hog_product = cells @ self._hog.projection
        self._novelty(x, product, cells, hog_product, probabilities.argmax(1), logs)
        logs *= _LOG_SCALE
        np.maximum(logs, 0.0, out=logs)  # rounding can leave a residual a hair below 0
        logs += _EPS
        np.log(logs, out=logs)
        np.minimum(out[:, 13], _MAX_LOGIT, out=out[:, 13])
        out[:, 14] = (counts[1] - counts[0]) / (counts[1] + 1.0)
        out[:, 15] = (product[:, -1] - self._frame_total * self._black) * per_mass
        clipped = np.maximum(probabilities, _MIN_PROBABILITY)
        log_p = out[:, -NUM_CLASSES:]
        np.log(clipped, out=log_p)
        out[:, 16] = -_dot_rows(clipped, log_p)
        # the squares of the chosen scalar features, then the coordinates on the top components
        n_features = len(FEATURE_NAMES)
        at = n_features + len(self._squared)
        squares = out[:, n_features:at]
        if self._squared_all:
            np.square(out[:, :n_features], out=squares)
        else:
            np.square(out[:, self._squared], out=squares)
        kg, kh = self._pixels.global_components, self._hog.global_components
        out[:, at : at + kg] = product[:, :kg]
        out[:, at + kg : at + kg + kh] = hog_product[:, :kh]
        return out

    def _novelty(
        self,
        x: np.ndarray,
        product: np.ndarray,
        cells: np.ndarray,
        hog_product: np.ndarray,
        predicted: np.ndarray,
        out: np.ndarray,
    ) -> None:
        """Fill out[:, :10] with the arguments of the novelty logarithms, pixels then orientation map."""
        n, (end, hog_end) = len(x), self._novelty_ends
        both, means = end + hog_end, 1 + NUM_CLASSES
        row = np.empty((n, len(self._novelty_matrix)), np.float32)
        np.subtract(product[:, :end], self._novelty_mean[:end], out=row[:, :end])
        np.subtract(hog_product[:, :hog_end], self._novelty_mean[end:], out=row[:, end:both])
        np.square(row[:, :both], out=row[:, :both])
        row[:, both : both + means] = product[:, end : end + means]
        row[:, both + means : both + 2 * means] = hog_product[:, hog_end:]
        row[:, -2] = _dot_rows(x, x)
        row[:, -1] = _dot_rows(cells, cells)
        measures = row @ self._novelty_matrix  # (N, 44): per space, outside 0..10 then Mahalanobis 0..10
        measures += self._novelty_constant
        novelty = out[:, : 2 * NOVELTY].reshape(n, 2, NOVELTY)
        pick = self._novelty_base + self._novelty_step * predicted[:, None]
        novelty[:, :, :4] = measures[np.arange(n)[:, None], pick].reshape(n, 2, 4)
        novelty[:, :, 4] = measures.reshape(n, 2, 2 * means)[:, :, 1:means].min(2)

    def _project(self, x: np.ndarray) -> np.ndarray:
        """x @ projection, in products small enough to stay on this thread (`pixel_network.single_threaded_product`:
        2 rows of 784 x 165)."""
        return pixel_network.single_threaded_product(x, self._pixels.projection)

    def standardize(self, inputs: np.ndarray) -> np.ndarray:
        """Raw fusion inputs -> standardized on the fitting digits and clipped to +-INPUT_CLIP (in place)."""
        inputs -= self._input_mean
        inputs *= self._input_scale
        np.clip(inputs, -INPUT_CLIP, INPUT_CLIP, out=inputs)
        return inputs

    def logits(self, inputs: np.ndarray) -> np.ndarray:
        """Raw fusion inputs (N, D) -> the fusion network's log-odds of "digit" (N,), without the pixel network's;
        changes `inputs`."""
        return 2.0 * self._half_logits(inputs)

    def _half_logits(self, inputs: np.ndarray) -> np.ndarray:
        """Half the log-odds: the output layer is stored halved, for the logistic function below."""
        z = self.standardize(inputs)
        both = z @ self._weights  # (N, 1 + hidden): the linear term, the hidden units' inputs
        hidden = both[:, 1:]
        hidden += self._hidden_bias
        np.tanh(hidden, out=hidden)
        half = hidden @ self._output
        half += both[:, 0]
        half += self._bias
        return half

    def fused_half_logits(self, fusion_half: np.ndarray, pixel_logits: np.ndarray | None) -> np.ndarray:
        """Half the detector's log-odds from the fusion network's half log-odds (changed in place and returned) and
        the pixel network's log-odds."""
        if pixel_logits is None:
            return fusion_half
        fusion_half *= 2.0 * self._feature_weight
        fusion_half += self._pixel_weight * pixel_logits
        return fusion_half

    def score(self, images: np.ndarray, probabilities: np.ndarray) -> np.ndarray:
        """(N, 1, 28, 28) input as the model received it (normalized), its (N, 10) softmax -> (N,) float32 in [0, 1]."""
        half = self._half_logits(self.raw_inputs(images, probabilities))
        if self.pixel_network is not None:
            half = self.fused_half_logits(half, self.pixel_network.logits(images))
        half[np.isnan(half)] = _NAN_HALF_LOGIT
        np.tanh(half, out=half)  # the logistic function: 1 / (1 + e^-t) = (1 + tanh(t / 2)) / 2, never overflows
        half *= 0.5
        half += 0.5
        return half

    def graph_constants(self) -> dict[str, Any]:
        """Every number `score` computes with, by name: export/digit_score_graph.py builds the same computation as
        ONNX nodes from these, so the parameters and their preparation have one home (tests hold the two equal)."""
        return {
            "pixel_projection": self._pixels.projection,  # (784, C): components, means, ones, frame mask
            "pixel_end": self._pixels.end,  # columns [0, end) are projections, then the 11 means
            "pixel_components": self._pixels.global_components,
            "hog_projection": self._hog.projection,  # (196, C'): components, then the 11 means
            "hog_end": self._hog.end,
            "hog_components": self._hog.global_components,
            "novelty_mean": self._novelty_mean,
            "novelty_matrix": self._novelty_matrix,
            "novelty_constant": self._novelty_constant,
            "novelty_base": self._novelty_base,
            "novelty_step": self._novelty_step,
            "half": self._half,
            "lit": self._lit,
            "black": self._black,
            "std": self._std,
            "hog_eps": self._hog_eps,
            "frame_total": self._frame_total,
            "log_scale": _LOG_SCALE,
            "log_eps": np.float32(_EPS),
            "max_logit": np.float32(_MAX_LOGIT),
            "min_probability": np.float32(_MIN_PROBABILITY),
            "squared": self._squared,
            "input_mean": self._input_mean,
            "input_scale": self._input_scale,
            "input_clip": np.float32(INPUT_CLIP),
            "weights": self._weights,  # (D, 1 + hidden): the halved linear term, then the hidden units' inputs
            "hidden_bias": self._hidden_bias,
            "output": self._output,  # halved
            "bias": self._bias,  # halved
            "nan_half_logit": np.float32(_NAN_HALF_LOGIT),
            "pixel_network": None if self.pixel_network is None else self.pixel_network.graph_constants(),
            "feature_weight": 2 * self._feature_weight,  # the fusion's log-odds weigh this much in the score's
            "pixel_weight": 2 * self._pixel_weight,  # ... and the pixel network's this much
        }

    def is_digit(self, scores: np.ndarray) -> np.ndarray:
        """Boolean array: score at or above the threshold."""
        return np.asarray(scores) >= self.threshold

    def describe(self) -> dict[str, Any]:
        """Threshold, method and calibration figures, for the server's model info."""
        return {
            **self._describe,
            "threshold": self.threshold,
            "format_version": self.format_version,
            "components": {
                "all_digits": self.global_components,
                "per_digit": self.class_components,
                "orientation_map": {"all_digits": self._hog.global_components, "per_digit": self._hog.class_components},
            },
            "hidden_units": int(self._output.shape[0]),
            "pixel_network": None
            if self.pixel_network is None
            else {
                "parameters": self.pixel_network.parameters,
                "channels": [int(w.shape[0]) for w in self.pixel_network.conv_weights],
                "weight_in_score": float(2 * self._pixel_weight),
                "fusion_weight_in_score": float(2 * self._feature_weight),
            },
            "source": self.source,
        }


# Row-wise dot products: numpy 2's vecdot ufunc is twice as fast as einsum on one image.
_dot_rows = getattr(np, "vecdot", None) or (lambda a, b: np.einsum("ij,ij->i", a, b))
# Sum 4-pixel runs: (..., 28) @ _POOL_COLUMNS -> (..., 7), and _POOL_ROWS @ (..., 28, 7) -> (..., 7, 7).
_POOL_COLUMNS = np.kron(np.eye(HOG_CELLS, dtype=np.float32), np.ones((SIDE // HOG_CELLS, 1), np.float32))
_POOL_ROWS = np.ascontiguousarray(_POOL_COLUMNS.T)
# Logarithms' arguments, scaled to about 1 for a digit: energies per pixel (per cell of the orientation
# map, whose cells sum to 1: x 196), Mahalanobis means (already divided by k in the blocks), ink fraction
# and mean intensity per pixel, roughness, odds.
_LOG_SCALE = np.array(
    [1 / PIXELS, 1.0, 1 / PIXELS, 1.0, 1 / PIXELS]
    + [HOG_SIZE, 1.0, HOG_SIZE, 1.0, HOG_SIZE]
    + [1 / PIXELS, 1 / PIXELS, 1.0, 1.0],
    np.float32,
)
