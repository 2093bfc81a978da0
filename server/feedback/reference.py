"""A model version's reference: its answers on the MNIST test set, stored beside the model when it is published.

`NAME.reference.json` beside `NAME.onnx` (`model.reference.json` in a repository's version folder): its accuracy,
the share of each predicted digit, and the share of answers in each confidence bin. The server compares what a
version answers live with it (server/feedback/quality.py); `python -m export.reference MODEL` writes it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from proto.contract import CONFIDENCE_BINS

CONFIDENCE_EDGES = CONFIDENCE_BINS  # upper edges, then one bin above the last (proto/contract.py)
REFERENCE_SUFFIX = ".reference.json"
PSI_FLOOR = 1e-4  # a bin empty on one side counts as this share: PSI stays finite


@dataclass(frozen=True)
class Reference:
    """A version's answers on the MNIST test set: what its live answers are compared with."""

    accuracy: float
    prediction_share: tuple[float, ...]  # (10,) share of answers per predicted digit
    confidence_share: tuple[float, ...]  # share per confidence bin: <= each of CONFIDENCE_EDGES, then above
    images: int
    model_sha256: str = ""  # of the model file it was measured on: a reference beside a changed file is stale

    @staticmethod
    def path_for(model: Path) -> Path:
        """NAME.onnx -> NAME.reference.json (an fp16 variant, NAME.fp16.onnx, shares NAME's)."""
        stem = model.name.removesuffix(".onnx").removesuffix(".fp16")
        return model.with_name(stem + REFERENCE_SUFFIX)

    @classmethod
    def of(cls, digits: np.ndarray, confidences: np.ndarray, labels: np.ndarray) -> Reference:
        """From a model's answers on a labelled set."""
        counts = np.bincount(digits, minlength=10)[:10]
        bins = confidence_bins(confidences)
        return cls(
            float((digits == labels).mean()),
            tuple((counts / max(len(digits), 1)).tolist()),
            tuple((bins / max(len(digits), 1)).tolist()),
            len(digits),
        )

    @classmethod
    def load(cls, path: Path) -> Reference | None:
        """The reference at `path`, or None when there is none; ValueError naming the file when it is malformed."""
        if not path.is_file():
            return None
        try:
            data = json.loads(path.read_text())
            reference = cls(
                float(data["accuracy"]),
                tuple(float(x) for x in data["prediction_share"]),
                tuple(float(x) for x in data["confidence_share"]),
                int(data["images"]),
                str(data.get("model_sha256", "")),
            )
        except (OSError, ValueError, KeyError, TypeError) as problem:
            raise ValueError(f"model reference {path}: {problem}") from None
        if len(reference.prediction_share) != 10 or len(reference.confidence_share) != len(CONFIDENCE_EDGES) + 1:
            raise ValueError(f"model reference {path}: expected 10 digit shares and {len(CONFIDENCE_EDGES) + 1} bins")
        return reference

    def save(self, path: Path) -> None:
        data = {
            "accuracy": self.accuracy,
            "images": self.images,
            "model_sha256": self.model_sha256,
            "prediction_share": list(self.prediction_share),
            "confidence_bins": [*CONFIDENCE_EDGES, "+Inf"],
            "confidence_share": list(self.confidence_share),
        }
        path.write_text(json.dumps(data, indent=2) + "\n")


def confidence_bins(confidences: np.ndarray) -> np.ndarray:
    """Counts per bin: at or under each of CONFIDENCE_EDGES (as Prometheus's `le`), then above the last."""
    index = np.searchsorted(np.asarray(CONFIDENCE_EDGES), np.asarray(confidences, np.float64), side="left")
    return np.bincount(index, minlength=len(CONFIDENCE_EDGES) + 1)


def psi(counts: np.ndarray, reference_share: tuple[float, ...] | np.ndarray) -> float:
    """Population stability index of observed `counts` against a reference distribution."""
    observed = np.maximum(np.asarray(counts, np.float64) / max(float(np.sum(counts)), 1.0), PSI_FLOOR)
    expected = np.maximum(np.asarray(reference_share, np.float64), PSI_FLOOR)
    return float(np.sum((observed - expected) * np.log(observed / expected)))
