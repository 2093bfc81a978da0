"""Small ONNX models that run beside the served model, on the CPU, in the decoding thread of a reading call: the
operator model (operators.py) and the second opinion (second_opinion.py). What they share lives here: loading a
file with its input and output checked against the contract, and running candidates in bounded chunks.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from proto.contract import IMAGE_SIDE

CHUNK = 64  # candidates per session run: a table's hundreds at once would grow ONNX Runtime's arena for good


class SideModelError(ValueError):
    """The file is not the side model this server needs; the message says what is wrong."""


class SideModel:
    """`probabilities(images)`: (N, 28, 28) uint8 prepared candidates, light ink on dark, scaled to pixel / 255 ->
    (N, classes) float64 softmax rows. Checked at load: the contract's input and output names and shapes, a
    dynamic batch, and rows that sum to 1 (a softmax in the graph, not logits)."""

    what = "side model"  # how messages name it
    error: type[SideModelError] = SideModelError

    def __init__(self, path: Path, input_name: str, output_name: str, classes: int, meaning: str) -> None:
        import onnxruntime as ort

        self.path = Path(path)
        self._input, self._output, self.classes = input_name, output_name, classes
        data = self.path.read_bytes()
        self.sha256 = hashlib.sha256(data).hexdigest()
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1  # a handful of candidates per call, in a decoding thread beside others
        try:
            self._session = ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])
        except Exception as problem:  # ONNX Runtime raises its own classes for a broken or foreign file
            raise self.error(f"{self.what} {self.path} cannot be loaded: {problem}") from None
        inputs = {i.name: i.shape for i in self._session.get_inputs()}
        outputs = {o.name: o.shape for o in self._session.get_outputs()}
        if input_name not in inputs or list(inputs[input_name])[1:] != [1, IMAGE_SIDE, IMAGE_SIDE]:
            raise self.error(
                f"{self.what} {self.path} has inputs {inputs}; expected {input_name} [batch, 1, {IMAGE_SIDE}, "
                f"{IMAGE_SIDE}]"
            )
        if output_name not in outputs or list(outputs[output_name])[1:] != [classes]:
            raise self.error(
                f"{self.what} {self.path} has outputs {outputs}; expected {output_name} [batch, {classes}] {meaning}"
            )
        if isinstance(inputs[input_name][0], int):
            raise self.error(f"{self.what} {self.path} takes a fixed batch of {inputs[input_name][0]}; expected any")
        try:
            sums = self.probabilities(np.zeros((2, IMAGE_SIDE, IMAGE_SIDE), np.uint8)).sum(axis=1)
        except Exception as problem:  # e.g. a float16 input: ONNX Runtime's own classes again
            raise self.error(f"{self.what} {self.path} cannot run a batch of two blank images: {problem}") from None
        if not np.allclose(sums, 1.0, atol=1e-3):
            raise self.error(f"{self.what} {self.path} gives rows summing to {sums[0]:.3g}; expected a softmax (1)")

    def probabilities(self, images: np.ndarray) -> np.ndarray:
        pixels = (np.asarray(images, np.float32) / 255.0).reshape(-1, 1, IMAGE_SIDE, IMAGE_SIDE)
        parts = [
            self._session.run([self._output], {self._input: pixels[start : start + CHUNK]})[0]
            for start in range(0, len(pixels), CHUNK)
        ]
        return np.concatenate(parts).astype(np.float64) if parts else np.zeros((0, self.classes), np.float64)

    def describe(self) -> str:
        return f"{self.path.name} (sha256 {self.sha256[:12]}) on the CPU"
