"""The operator model: tells + - × ÷ = from digits, for ReadExpression. Beside the digit classifier, not in it.

A small network (server/bundled/operators.onnx, trained by `python -m training.operators` on one stroke
generator and judged on another) over the same 28x28 candidates the classifier sees. It runs on the CPU, in
the decoding thread that segmented the expression, right after the segmentation: 40k parameters, about 2 ms
for 20 symbols on one core, too little to be worth a trip to a GPU or a place in the batch queue, and it then
shares the segmentation's deadline, budget and cancellation. It never touches Classify, whose contract (0-9)
and cost stay as they are.
"""

from __future__ import annotations

from pathlib import Path

from proto.contract import OPERATOR_CLASSES, OPERATOR_INPUT, OPERATOR_OUTPUT
from server.pipeline.side_models import SideModel, SideModelError

OPERATOR_MODEL = Path(__file__).resolve().parents[1] / "bundled" / "operators.onnx"


class OperatorModelError(SideModelError):
    """The file is not an operator model this server can use; the message says what is wrong."""


class OperatorModel(SideModel):
    """`probabilities(images)`: (N, 28, 28) uint8 candidates, light ink on dark -> (N, 6) over OPERATOR_CLASSES."""

    what = "operator model"
    error = OperatorModelError

    def __init__(self, path: Path) -> None:
        super().__init__(
            path, OPERATOR_INPUT, OPERATOR_OUTPUT, len(OPERATOR_CLASSES), f"over {', '.join(OPERATOR_CLASSES)}"
        )

    def describe(self) -> str:
        return f"{self.path.name} (sha256 {self.sha256[:12]}, {', '.join(OPERATOR_CLASSES)}) on the CPU"
