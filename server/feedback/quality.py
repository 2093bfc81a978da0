"""Live quality per model version: accuracy over its last labelled answers, and drift against its reference.

The reference is the version's own answers on the MNIST test set, stored beside the model at publish time
(`NAME.reference.json`, export/reference.py): its accuracy, its predicted-digit mix and its confidence
distribution. Drift is the population stability index (PSI) of what the version answered over the last
`drift_window_seconds` against that reference: sum((p - q) * ln(p / q)) over the bins; under 0.1 is stable,
over 0.25 a shift worth a look. Answers are tallied on the batch runner's thread (two small additions per
batch); the PSI is worked out every few seconds on the event loop, never per call.
"""

from __future__ import annotations

import bisect
import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from server.feedback.reference import CONFIDENCE_EDGES, Reference, confidence_bins, psi
from server.ops.metrics import ServiceMetrics

MIN_DRIFT_ANSWERS = 200  # fewer answers in the window: the PSI is noise, reported NaN


class AnswerTally:
    """Cumulative predicted digits and confidence bins of one version, added to on the batch runner's thread."""

    def __init__(self) -> None:
        self.digits = np.zeros(10, np.int64)
        self.confidence = np.zeros(len(CONFIDENCE_EDGES) + 1, np.int64)

    def add(self, digits: np.ndarray, confidences: np.ndarray) -> None:
        if len(digits) == 1:
            self.digits[int(digits[0])] += 1
            self.confidence[bisect.bisect_left(CONFIDENCE_EDGES, float(confidences[0]))] += 1
        elif len(digits):
            self.digits += np.bincount(digits, minlength=10)[:10]
            self.confidence += confidence_bins(confidences)

    def snapshot(self) -> tuple[np.ndarray, np.ndarray]:
        return self.digits.copy(), self.confidence.copy()


@dataclass
class _Version:
    reference: Reference | None
    tally: AnswerTally
    labelled: deque[bool]
    snapshots: deque[tuple[float, np.ndarray, np.ndarray]]


class LiveQuality:
    """Every served version's live accuracy and drift, as metrics (server/ops/metrics.py)."""

    def __init__(
        self,
        metrics: ServiceMetrics,
        accuracy_window: int = 500,
        drift_window_seconds: float = 900.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.metrics = metrics
        self.accuracy_window = accuracy_window
        self.drift_window_seconds = drift_window_seconds
        self._clock = clock
        self._versions: dict[tuple[str, str], _Version] = {}

    def track(
        self, model: str, version: str, reference: Reference | None, tally: AnswerTally | None = None
    ) -> AnswerTally:
        """Start following a version (the pipeline's `tally` of its answers, or a new one): its series exist from here
        on (NaN until there is something to say)."""
        tally = tally if tally is not None else AnswerTally()
        state = _Version(reference, tally, deque(maxlen=self.accuracy_window), deque())
        state.snapshots.append((self._clock(), *tally.snapshot()))
        self._versions[(model, version)] = state
        m = self.metrics
        m.reference_accuracy.labels(model, version).set(reference.accuracy if reference else math.nan)
        m.live_accuracy.labels(model, version).set(math.nan)
        m.live_accuracy_answers.labels(model, version).set(0)
        for gauge in (m.prediction_drift, m.confidence_drift):
            gauge.labels(model, version).set(math.nan)
        m.drift_window_answers.labels(model, version).set(0)
        for correct in ("true", "false"):
            m.feedback.labels(model, version, correct)
        return tally

    def forget(self, model: str, version: str) -> None:
        self._versions.pop((model, version), None)
        m = self.metrics
        for family in (
            m.reference_accuracy,
            m.live_accuracy,
            m.live_accuracy_answers,
            m.prediction_drift,
            m.confidence_drift,
            m.drift_window_answers,
        ):
            try:
                family.remove(model, version)
            except KeyError:
                pass

    def reference(self, model: str, version: str) -> Reference | None:
        state = self._versions.get((model, version))
        return state.reference if state else None

    def on_label(self, model: str, version: str, label: str, prediction: str) -> tuple[float, int]:
        """One labelled answer: the version's accuracy over its window, and how many answers that is over."""
        correct = label == prediction
        m = self.metrics
        m.feedback.labels(model, version, "true" if correct else "false").inc()
        if len(label) == len(prediction):
            for truth, predicted in zip(label, prediction, strict=True):
                if truth.isdigit() and predicted.isdigit():
                    m.feedback_confusion.labels(model, version, truth, predicted).inc()
        state = self._versions.get((model, version))
        if state is None:  # a version unloaded since it answered: counted, but it has no window any more
            return math.nan, 0
        state.labelled.append(correct)
        accuracy = sum(state.labelled) / len(state.labelled)
        m.live_accuracy.labels(model, version).set(accuracy)
        m.live_accuracy_answers.labels(model, version).set(len(state.labelled))
        return accuracy, len(state.labelled)

    def live_accuracy(self, model: str, version: str) -> tuple[float, int]:
        state = self._versions.get((model, version))
        if state is None or not state.labelled:
            return math.nan, 0
        return sum(state.labelled) / len(state.labelled), len(state.labelled)

    def sample(self) -> None:
        """Each version's drift over the window: what it answered since the oldest snapshot within it."""
        now = self._clock()
        m = self.metrics
        for (model, version), state in self._versions.items():
            digits, confidence = state.tally.snapshot()
            state.snapshots.append((now, digits, confidence))
            while len(state.snapshots) > 2 and state.snapshots[1][0] <= now - self.drift_window_seconds:
                state.snapshots.popleft()
            _, old_digits, old_confidence = state.snapshots[0]
            window_digits, window_confidence = digits - old_digits, confidence - old_confidence
            answers = int(window_digits.sum())
            m.drift_window_answers.labels(model, version).set(answers)
            if state.reference is None or answers < MIN_DRIFT_ANSWERS:
                m.prediction_drift.labels(model, version).set(math.nan)
                m.confidence_drift.labels(model, version).set(math.nan)
                continue
            m.prediction_drift.labels(model, version).set(psi(window_digits, state.reference.prediction_share))
            m.confidence_drift.labels(model, version).set(psi(window_confidence, state.reference.confidence_share))
