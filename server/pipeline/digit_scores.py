"""Where a model version's digit_score comes from: the model itself, or the separate numpy detector. Chosen once.

A model exported with the detector inside its graph (export/digit_score_graph.py) returns the score
with its probabilities from the same run, and its metadata holds the threshold: nothing runs after
the model. An older model file without that output is scored, as before, by the separate detector
(`--digit-detector`, server/pipeline/digit_detector.py) on the batch runner thread. `--digit-detector none`
turns scores off for every model (digit_score NaN, is_digit true), in-graph ones included. The
null engine gives a fixed score like a model, so it costs no detector work.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from proto.contract import DIGIT_SCORE
from server.engine.backends.base import BackendInfo

log = logging.getLogger("mnist.digit_score")

IN_GRAPH = "in-graph"
SEPARATE_FILE = "separate file"


class DigitScorer(Protocol):
    """Scores how much each model input looks like a digit (server/pipeline/digit_detector.py)."""

    threshold: float

    def score(self, images: np.ndarray, probabilities: np.ndarray) -> np.ndarray: ...


class ModelDigitScore:
    """The engine's own digit_score: its threshold and description come from the model file (or the null engine)."""

    computed = IN_GRAPH

    def __init__(self, info: BackendInfo) -> None:
        if info.digit_threshold is None:
            raise ValueError(f"{info.model_name} {info.model_version} gives no {DIGIT_SCORE}")
        self.threshold = float(info.digit_threshold)
        self._description = dict(info.digit_detector)
        self._model = Path(info.model_path).name if info.model_path else info.engine

    def describe(self) -> dict[str, Any]:
        """The detector's description as stored in the model, saying that the model computes the score."""
        return {
            **self._description,
            "threshold": self.threshold,
            "computed": self.computed,
            "detector_file": self._description.get("source", "?"),
            "source": f"output {DIGIT_SCORE!r} of {self._model}",
        }


def choose(info: BackendInfo, detector: DigitScorer | None) -> ModelDigitScore | DigitScorer | None:
    """The scorer for one model version, logged: None (scores off), the engine's own score, or `detector`."""
    label = f"{info.model_name} {info.model_version}"
    if detector is None:
        log.info("%s: digit scores off (--digit-detector none): digit_score NaN, is_digit true", label)
        return None
    if info.digit_threshold is not None:
        scorer = ModelDigitScore(info)
        log.info(
            "%s: digit_score %s, from the model's own %r output (threshold %.4f from its metadata)",
            label,
            IN_GRAPH,
            DIGIT_SCORE,
            scorer.threshold,
        )
        return scorer
    log.info(
        "%s: digit_score from the %s %s (the model has no %r output)",
        label,
        SEPARATE_FILE,
        Path(str(getattr(detector, "source", "?"))).name,
        DIGIT_SCORE,
    )
    return detector


def source(scorer: object | None) -> str:
    """'in-graph', 'separate file' or 'none': where the answers' digit_score comes from."""
    if scorer is None:
        return "none"
    return IN_GRAPH if isinstance(scorer, ModelDigitScore) else SEPARATE_FILE


def summary(scorer: Any) -> str:
    """One line for GetModelInfo and the Open Inference Protocol's model config: where digit_score comes from, its
    threshold and the detector's own figures."""
    if scorer is None:
        return "none (digit_score NaN, is_digit true)"
    about = scorer.describe()
    if isinstance(scorer, ModelDigitScore):
        where = f"{IN_GRAPH}, {about['source']}"
        if "format_version" in about:
            where += f" (built from {about['detector_file']} v{about['format_version']})"
    else:
        where = f"{SEPARATE_FILE} {Path(str(about.get('source', '?'))).name} v{about.get('format_version', '?')}"
    if "false_alarm_mnist_test" not in about:
        return f"{where}: threshold {about['threshold']:.4f}; {about.get('method', 'no figures')}"
    return (
        f"{where}: threshold {about['threshold']:.4f}, "
        f"false alarms on MNIST test {about['false_alarm_mnist_test']:.2%}, "
        f"non-digits caught {about.get('hit_rate_held_out_non_digits', float('nan')):.1%} (held-out kinds)"
    )


def config_parameters(scorer: Any) -> dict[str, dict[str, str]]:
    """Triton ModelConfig `parameters` (the Open Inference Protocol's model configuration, on both transports):
    where digit_score comes from, its threshold, and the one-line summary."""
    return {
        "digit_score_source": {"string_value": source(scorer)},
        "digit_score_threshold": {"string_value": "none" if scorer is None else f"{scorer.threshold:.6f}"},
        "digit_score": {"string_value": summary(scorer)},
    }
