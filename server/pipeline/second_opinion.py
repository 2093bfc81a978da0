"""The second opinion: a second digit classifier whose probabilities ReadDigits, ReadTable and ReadExpression
average with the served model's, because a page of figures is read whole only when every digit on it is right.

A small plain CNN (server/bundled/second-opinion.onnx, trained by `python -m training.second_opinion`), unlike the
served GoogLeNet in shape and in the views of the data it was trained on, so the two err on different digits and
their average errs less than either (the training report measures both, alone and together). Like the operator
model it runs on the CPU in the decoding thread that segmented the image, right after the segmentation, under the
call's decoding budget (a call whose deadline passed meanwhile is refused before the batch). Every model version
runs beside the same file (--second-opinion). It never touches Classify, whose answers and cost stay the served
model's alone.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from proto.contract import NUM_CLASSES, SECOND_OPINION_INPUT, SECOND_OPINION_OUTPUT
from server.pipeline.side_models import SideModel, SideModelError


class SecondOpinionError(SideModelError):
    """The file is not a second-opinion model this server can use; the message says what is wrong."""


def averaged(classifier: np.ndarray, second_opinion: np.ndarray | None) -> np.ndarray:
    """The two (N, 10) probability tables averaged with equal weights (the served model alone when there is no
    second opinion). Equal weights: nothing was fitted to choose them, so no benchmark flatters them."""
    if second_opinion is None:
        return classifier
    return (np.asarray(classifier, np.float64) + np.asarray(second_opinion, np.float64)) / 2


class SecondOpinion(SideModel):
    """`probabilities(images)`: (N, 28, 28) uint8 prepared candidates, light ink on dark -> (N, 10) over the digits."""

    what = "second-opinion model"
    error = SecondOpinionError

    def __init__(self, path: Path) -> None:
        super().__init__(path, SECOND_OPINION_INPUT, SECOND_OPINION_OUTPUT, NUM_CLASSES, "over the digits")

    def describe(self) -> str:
        return f"{self.path.name} (sha256 {self.sha256[:12]}, ten digits) on the CPU"
