"""The operator model: tells + - × ÷ = from digits, for ReadExpression. Beside the digit classifier, not in it.

A small network (server/bundled/operators.onnx, trained by `python -m training.operators` on one stroke
generator and judged on another) over the same 28x28 candidates the classifier sees. It runs on the CPU, in
the decoding thread that segmented the expression, right after the segmentation: 40k parameters, about 2 ms
for 20 symbols on one core, too little to be worth a trip to a GPU or a place in the batch queue, and it then
shares the segmentation's deadline, budget and cancellation. It never touches Classify, whose contract (0-9)
and cost stay as they are.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from proto.contract import IMAGE_SIDE, OPERATOR_CLASSES, OPERATOR_INPUT, OPERATOR_OUTPUT

OPERATOR_MODEL = Path(__file__).resolve().parents[1] / "bundled" / "operators.onnx"


class OperatorModelError(ValueError):
    """The file is not an operator model this server can use; the message says what is wrong."""


class OperatorModel:
    """`probabilities(images)`: (N, 28, 28) uint8 candidates, light ink on dark -> (N, 6) over OPERATOR_CLASSES."""

    def __init__(self, path: Path) -> None:
        import onnxruntime as ort

        self.path = Path(path)
        data = self.path.read_bytes()
        self.sha256 = hashlib.sha256(data).hexdigest()
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1  # a handful of candidates per call: threads would cost more than they save
        try:
            self._session = ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])
        except Exception as problem:  # ONNX Runtime raises its own classes for a broken or foreign file
            raise OperatorModelError(f"operator model {self.path} cannot be loaded: {problem}") from None
        inputs = {i.name: i.shape for i in self._session.get_inputs()}
        outputs = {o.name: o.shape for o in self._session.get_outputs()}
        if OPERATOR_INPUT not in inputs or list(inputs[OPERATOR_INPUT])[1:] != [1, IMAGE_SIDE, IMAGE_SIDE]:
            raise OperatorModelError(
                f"operator model {self.path} has inputs {inputs}; expected {OPERATOR_INPUT} [batch, 1, 28, 28]"
            )
        if OPERATOR_OUTPUT not in outputs or list(outputs[OPERATOR_OUTPUT])[1:] != [len(OPERATOR_CLASSES)]:
            raise OperatorModelError(
                f"operator model {self.path} has outputs {outputs}; expected {OPERATOR_OUTPUT} "
                f"[batch, {len(OPERATOR_CLASSES)}] over {', '.join(OPERATOR_CLASSES)}"
            )

    def probabilities(self, images: np.ndarray) -> np.ndarray:
        pixels = (np.asarray(images, np.float32) / 255.0).reshape(-1, 1, IMAGE_SIDE, IMAGE_SIDE)
        return np.asarray(self._session.run([OPERATOR_OUTPUT], {OPERATOR_INPUT: pixels})[0], np.float64)

    def describe(self) -> str:
        return f"{self.path.name} (sha256 {self.sha256[:12]}, {', '.join(OPERATOR_CLASSES)}) on the CPU"
