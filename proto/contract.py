"""The model contract: what every stage agrees on about the network's input and output. numpy only.

Training normalizes with it, export names the graph's tensors and writes the metadata with it,
the server reads both back with it, and the load test builds payloads with it. A fact about the
model's interface lives here once; everything else imports it.
"""

from __future__ import annotations

import json
from dataclasses import MISSING, asdict, dataclass, fields
from typing import Any

import numpy as np

# --- the tensors -------------------------------------------------------------------------------
IMAGE_SIDE = 28
RAW_BYTES = IMAGE_SIDE * IMAGE_SIDE  # one raw image: 28x28 uint8, row-major, light digit on dark
INPUT_NAME = "image"
INPUT_SHAPE = (1, IMAGE_SIDE, IMAGE_SIDE)  # one image, NCHW without the batch axis
INPUT_DTYPE = np.float32
BATCH_AXIS = "batch"  # name of the graph's dynamic first dimension
LOGITS = "logits"
PROBABILITIES = "probabilities"
OUTPUT_NAMES = (LOGITS, PROBABILITIES)  # the classifier's outputs, in every model file
# Optional third output: the digit detector (server/pipeline/digit_detector.py) computed inside the graph, float32
# [batch]
# in [0, 1]; is_digit = digit_score >= ModelMetadata.digit_threshold. Files exported before it lack it.
DIGIT_SCORE = "digit_score"
SCORED_OUTPUT_NAMES = (*OUTPUT_NAMES, DIGIT_SCORE)
NUM_CLASSES = 10
CLASS_LABELS = tuple(str(digit) for digit in range(NUM_CLASSES))  # output index i is the digit i

# --- precisions a model file can be exported in (input and output stay float32 in all) ---------
PRECISIONS = ("fp32", "fp16")

# Confidence bins, by upper edge (then one above the last): the server's mnist_prediction_confidence histogram and a
# model version's reference (NAME.reference.json, export/reference.py) share them, so drift compares like with like.
CONFIDENCE_BINS = (0.5, 0.7, 0.8, 0.9, 0.95, 0.98, 0.99, 0.995, 0.999, 1.0)


@dataclass(frozen=True)
class Normalization:
    """input = (pixel * scale - mean) / std, pixel in 0..255: MNIST's training mean and deviation."""

    scale: float = 1 / 255
    mean: float = 0.1307
    std: float = 0.3081

    def apply(self, pixels: np.ndarray) -> np.ndarray:
        """Pixels (uint8 or float in 0..255) of any shape -> float32 model input of that shape."""
        return ((np.asarray(pixels, np.float32) * self.scale - self.mean) / self.std).astype(INPUT_DTYPE)

    def apply_into(self, pixels: np.ndarray, out: np.ndarray) -> np.ndarray:
        """`apply` written into `out` (float32, same shape): one multiply and one subtract, no temporaries."""
        np.multiply(pixels, np.float32(self.scale / self.std), out=out, casting="unsafe")
        return np.subtract(out, np.float32(self.mean / self.std), out=out)

    def invert(self, inputs: np.ndarray) -> np.ndarray:
        """Model input back to uint8 pixels (what a client would have sent): the feedback loop stores those."""
        pixels = (np.asarray(inputs, np.float32) * self.std + self.mean) / self.scale
        return np.clip(np.rint(pixels), 0, 255).astype(np.uint8)

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "formula": "(pixel / 255 - mean) / std"}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> Normalization:
        return cls(scale=float(values["scale"]), mean=float(values["mean"]), std=float(values["std"]))


MNIST_NORMALIZATION = Normalization()


def input_layout(precision: str = "fp32") -> str:
    weights = "" if precision == "fp32" else f", {precision} inside the graph"
    return (
        f"{INPUT_NAME}: float32 [{BATCH_AXIS}, 1, {IMAGE_SIDE}, {IMAGE_SIDE}] (NCHW){weights}, "
        "light digit on dark background as in MNIST"
    )


OUTPUT_LAYOUT = f"{LOGITS}, {PROBABILITIES}: float32 [{BATCH_AXIS}, {NUM_CLASSES}], index = digit"
DIGIT_SCORE_LAYOUT = f"{DIGIT_SCORE}: float32 [{BATCH_AXIS}] in [0, 1], is_digit = {DIGIT_SCORE} >= digit_threshold"


def output_layout(digit_score: bool) -> str:
    """The output_layout metadata of a model with or without the in-graph digit score."""
    return f"{OUTPUT_LAYOUT}; {DIGIT_SCORE_LAYOUT}" if digit_score else OUTPUT_LAYOUT


# --- the self-description stored in an ONNX file's metadata_props ------------------------------
METADATA_PREFIX = "mnist."


@dataclass(frozen=True)
class ModelMetadata:
    """Written by mnist-export as `metadata_props` (string -> string); read back by the server through ONNX Runtime."""

    model_name: str
    model_version: str
    class_labels: list[str]
    normalization: dict[str, Any]  # Normalization.as_dict()
    input_layout: str
    output_layout: str
    test_accuracy: float  # measured through ONNX Runtime on the exported file itself
    test_images: int
    checkpoint_sha256: str
    opset: int
    exported_with: str
    precision: str = "fp32"  # files exported before fp16 variants existed carry no key: they are fp32
    # With the DIGIT_SCORE output only (None: no key, no output): its threshold and the detector's own description
    # (method, calibration figures, the .npz it was built from), so the server needs no other file to judge it.
    digit_threshold: float | None = None
    digit_detector: dict[str, Any] | None = None

    def to_props(self) -> dict[str, str]:
        """String -> string; an optional field that is None is left out (a file without the digit score has no key)."""
        return {
            METADATA_PREFIX + k: v if isinstance(v, str) else json.dumps(v)
            for k, v in asdict(self).items()
            if v is not None
        }

    @classmethod
    def from_props(cls, props: dict[str, str]) -> ModelMetadata:
        """Parse metadata written by `to_props`; a missing required key is named in the error."""
        values: dict[str, Any] = {}
        for field in fields(cls):
            key = METADATA_PREFIX + field.name
            if key not in props:
                if field.default is not MISSING:  # a field with a default is an optional key
                    continue
                raise ValueError(f"model metadata lacks {key!r}; was the model written by mnist-export?")
            values[field.name] = props[key] if field.type == "str" else json.loads(props[key])
        metadata = cls(**values)
        if metadata.precision not in PRECISIONS:
            raise ValueError(f"model metadata says precision {metadata.precision!r}; expected one of {PRECISIONS}")
        if metadata.digit_threshold is not None and not 0.0 <= metadata.digit_threshold <= 1.0:
            raise ValueError(f"model metadata says digit_threshold {metadata.digit_threshold}; expected 0..1")
        return metadata

    @property
    def has_digit_score(self) -> bool:
        return self.digit_threshold is not None

    @property
    def norm(self) -> Normalization:
        return Normalization.from_dict(self.normalization)

    def write_into(self, model_proto: Any) -> None:
        """Replace this metadata's keys in an `onnx.ModelProto` (an optional key now None is removed); other props are
        kept."""
        props = self.to_props()
        own = {METADATA_PREFIX + field.name for field in fields(self)}
        kept = [p for p in model_proto.metadata_props if p.key not in own]
        del model_proto.metadata_props[:]
        model_proto.metadata_props.extend(kept)
        for key, value in props.items():
            entry = model_proto.metadata_props.add()
            entry.key, entry.value = key, value
        model_proto.doc_string = (
            f"{self.model_name} {self.model_version} ({self.precision}): MNIST digit classifier (GoogLeNet)"
        )


def read_metadata(model_proto: Any) -> ModelMetadata:
    """The metadata of a loaded `onnx.ModelProto`."""
    return ModelMetadata.from_props({p.key: p.value for p in model_proto.metadata_props})


def variant_path(path: Any, precision: str) -> Any:
    """Where mnist-export puts a model's variant: `name.onnx` (fp32) and `name.fp16.onnx` beside it.

    `path` may name either variant (a `pathlib.Path`); the result is the same type.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
    stem = path.name.removesuffix(".onnx")
    for other in PRECISIONS[1:]:
        stem = stem.removesuffix(f".{other}")
    suffix = ".onnx" if precision == "fp32" else f".{precision}.onnx"
    return path.with_name(stem + suffix)


# --- the operator model: tells the symbols of handwritten arithmetic from digits (ReadExpression) -------
# A separate small network beside the digit classifier (server/bundled/operators.onnx): the same 28x28 input,
# prepared as Classify prepares a digit, light ink on dark, but scaled to [0, 1] (pixel / 255) without MNIST's
# mean and deviation. Output index 0 is "a digit" (the digit classifier then says which); the others are operators.
OPERATOR_INPUT = "symbol"
OPERATOR_OUTPUT = "symbol_probabilities"
OPERATOR_CLASSES = ("digit", "+", "-", "×", "÷", "=")  # "-": minus as a dash; "÷": an obelus or a colon (:)
OPERATORS = OPERATOR_CLASSES[1:]

# --- the second opinion: a second digit classifier the reading calls average with the served model ---------------
# server/bundled/second-opinion.onnx: the operator model's input (28x28, pixel / 255, light ink on dark), softmax
# over the ten digits, index = digit. Never used by Classify.
SECOND_OPINION_INPUT = "digit"
SECOND_OPINION_OUTPUT = "digit_probabilities"
