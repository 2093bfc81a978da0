"""What the model pipeline answers for a request's images: arrays, one row per image (no transport here)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from proto.contract import Normalization


@dataclass(frozen=True)
class Predictions:
    """The answers for one request's images, as arrays: row i is image i."""

    probabilities: np.ndarray  # (N, 10) float32
    digits: np.ndarray  # (N,) int
    confidences: np.ndarray  # (N,) float32: probability of the predicted digit
    digit_scores: np.ndarray  # (N,) float32 in [0, 1]: how much each image looks like a digit (NaN: not judged)
    is_digit: np.ndarray  # (N,) bool: digit_score at or over the detector's threshold
    model_version: str
    model_name: str = ""
    # (N, 1, 28, 28): what the model was given, uint8 pixels or float32 normalized input (the feedback loop keeps it)
    inputs: np.ndarray | None = None
    normalization: Normalization | None = None  # how float32 `inputs` were normalized from pixels

    def __len__(self) -> int:
        return len(self.digits)

    def take(self, rows: slice) -> Predictions:
        return Predictions(
            self.probabilities[rows],
            self.digits[rows],
            self.confidences[rows],
            self.digit_scores[rows],
            self.is_digit[rows],
            self.model_version,
            self.model_name,
            None if self.inputs is None else self.inputs[rows],
            self.normalization,
        )
