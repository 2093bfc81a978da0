"""Canary promotion: a new version takes a share of the traffic, and the labels clients send decide whether it stays.

A model's config.pbtxt turns it on:

    parameters { key: "canary_share"      value: { string_value: "0.2" } }   # of requests naming no version
    parameters { key: "canary_min_labels" value: { string_value: "200" } }   # labelled answers each version needs
    parameters { key: "canary_margin"     value: { string_value: "0.0" } }   # accuracy the new one may lose

When a newer version becomes READY while an older one is the default, the older stays the default and the newer
answers `canary_share` of the requests that name no version. Every labelled answer (the Feedback call) of either
version since the canary began is counted. Once each has `canary_min_labels` of them, the new version is promoted to
default unless its accuracy is worse than the old one's by more than `canary_margin` plus what chance allows (1.645
standard errors of the difference: a one-sided test at 95%), and rolled back if it is: taken out of routing, its
verdict written into its folder (ROLLED_BACK), and not loaded again while that file is there. The decision is
logged, counted (mnist_canary_events_total) and shown in ListModels.

With `--workers N`, every worker runs the trial on its own share of the traffic and counts the labels of its own
answers (a label reaches the worker that answered: server/feedback/peers.py); the supervisor sums every worker's counts
(`pooled_trials`), decides, and sends the verdict to every worker, whose defaults then move together.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

SHARE_KEY, MIN_LABELS_KEY, MARGIN_KEY = "canary_share", "canary_min_labels", "canary_margin"
WORSE_Z = 1.645  # one-sided 95%: the new version is worse only when the gap is beyond this many standard errors
PROMOTED, ROLLED_BACK = "PROMOTED", "ROLLED_BACK"


@dataclass(frozen=True)
class CanarySettings:
    share: float
    min_labels: int = 200
    margin: float = 0.0


def canary_settings(parameters: dict[str, str]) -> CanarySettings | None:
    """From a config.pbtxt's parameters (string values); None when `canary_share` is absent or 0. ValueError naming
    the parameter when a value is not what it must be."""
    if SHARE_KEY not in parameters:
        if MIN_LABELS_KEY in parameters or MARGIN_KEY in parameters:
            raise ValueError(f"{MIN_LABELS_KEY} and {MARGIN_KEY} need {SHARE_KEY}")
        return None
    try:
        share = float(parameters[SHARE_KEY])
        min_labels = int(parameters.get(MIN_LABELS_KEY, "200"))
        margin = float(parameters.get(MARGIN_KEY, "0"))
    except ValueError:
        raise ValueError(
            f"{SHARE_KEY} must be a number in (0, 1), {MIN_LABELS_KEY} a whole number, {MARGIN_KEY} a number"
        ) from None
    if not 0 <= share < 1:
        raise ValueError(f"{SHARE_KEY} must be in [0, 1): the old version keeps some traffic to compare with")
    if min_labels < 1 or not 0 <= margin < 1:
        raise ValueError(f"{MIN_LABELS_KEY} must be at least 1 and {MARGIN_KEY} in [0, 1)")
    return CanarySettings(share, min_labels, margin) if share > 0 else None


@dataclass
class Canary:
    """One model's canary: `candidate` on trial against `stable`, the default."""

    model: str
    stable: str
    candidate: str
    settings: CanarySettings
    started: float = field(default_factory=time.time)
    labelled: dict[str, int] = field(default_factory=dict)
    right: dict[str, int] = field(default_factory=dict)
    _random: random.Random = field(default_factory=random.Random, repr=False)

    def pick(self) -> str:
        """The version a request naming none gets."""
        return self.candidate if self._random.random() < self.settings.share else self.stable

    def observe(self, version: str, correct: bool) -> None:
        if version in (self.stable, self.candidate):
            self.labelled[version] = self.labelled.get(version, 0) + 1
            self.right[version] = self.right.get(version, 0) + correct

    def accuracy(self, version: str) -> float:
        return self.right.get(version, 0) / max(self.labelled.get(version, 0), 1)

    def decision(self) -> tuple[str, str] | None:
        """(PROMOTED or ROLLED_BACK, why) once both versions have enough labelled answers, else None.

        Worse means worse beyond what chance allows: the new version is rolled back when its accuracy is under the
        old one's by more than `margin` plus 1.645 standard errors of the difference (a one-sided test at 95%), so
        an equal version is promoted 19 times in 20 and a broken one never is."""
        needed = self.settings.min_labels
        n_new, n_old = self.labelled.get(self.candidate, 0), self.labelled.get(self.stable, 0)
        if min(n_new, n_old) < needed:
            return None
        new, old = self.accuracy(self.candidate), self.accuracy(self.stable)
        error = math.sqrt(new * (1 - new) / n_new + old * (1 - old) / n_old)
        allowed = self.settings.margin + WORSE_Z * error
        verdict = PROMOTED if old - new <= allowed else ROLLED_BACK
        comparison = "not worse than" if verdict == PROMOTED else "worse than"
        return verdict, (
            f"live accuracy {new:.1%} over {n_new} labelled answers, {comparison} version {self.stable}'s {old:.1%} "
            f"over {n_old} (by {100 * (old - new):.1f} points at most {100 * allowed:.1f}: chance and margin)"
        )

    def describe(self) -> str:
        counts = ", ".join(
            f"version {v}: {self.labelled.get(v, 0)}/{self.settings.min_labels} labelled"
            + (f" ({self.accuracy(v):.1%} right)" if self.labelled.get(v) else "")
            for v in (self.candidate, self.stable)
        )
        return f"canary: {self.settings.share:.0%} of requests naming no version go to {self.candidate}; {counts}"


def pooled_trials(reports: Iterable[dict[str, Any]]) -> list[Canary]:
    """The trials of several workers (`mnist-serve --workers N`), each report a worker's ModelRepository.trials_now,
    as one Canary per trial (model, stable, candidate) with every worker's labelled counts summed: the supervisor
    decides on these, so a trial needs `canary_min_labels` labels in all, not in each worker. A report it cannot read
    is left out."""
    trials: dict[tuple[str, str, str], Canary] = {}
    for report in reports:
        for model, trial in report.items():
            try:
                key = (model, str(trial["stable"]), str(trial["candidate"]))
                settings = CanarySettings(float(trial["share"]), int(trial["min_labels"]), float(trial["margin"]))
                right = trial["right"]
                counts = [(version, int(n), int(right.get(version, 0))) for version, n in trial["labelled"].items()]
            except (KeyError, TypeError, ValueError, AttributeError):
                continue
            canary = trials.setdefault(key, Canary(*key, settings))
            for version, labelled, correct in counts:
                canary.labelled[version] = canary.labelled.get(version, 0) + labelled
                canary.right[version] = canary.right.get(version, 0) + correct
    return list(trials.values())


TrialKey = tuple[str, str, str]  # model, stable version, candidate version
Event = tuple[str, str, str, str]  # model, version on trial, STARTED / PROMOTED / ROLLED_BACK / ENDED, why
Verdict = list[str]  # model, candidate, PROMOTED or ROLLED_BACK, why: what a worker is sent


@dataclass
class TrialJudge:
    """The supervisor's side of canary trials with `--workers N`: from every running worker's last report of its
    trials, the events to count (each once, whichever workers see it) and the verdicts to send (to each worker still
    running the trial, every round until it has taken it). A verdict is forgotten once no worker runs its trial, so
    the same versions can be tried again (a ROLLED_BACK marker deleted, a new file under the same number)."""

    verdicts: dict[TrialKey, tuple[str, str]] = field(default_factory=dict)
    running: set[TrialKey] = field(default_factory=set)

    def update(self, reports: dict[Any, dict[str, Any]]) -> tuple[list[Event], dict[Any, list[Verdict]]]:
        events: list[Event] = []
        pooled = {(c.model, c.stable, c.candidate): c for c in pooled_trials(reports.values())}
        holders: dict[TrialKey, list[Any]] = {}
        for worker, report in reports.items():
            for model, trial in report.items():
                key = (
                    (model, str(trial.get("stable")), str(trial.get("candidate"))) if isinstance(trial, dict) else None
                )
                if key in pooled:
                    holders.setdefault(key, []).append(worker)
        for key, canary in pooled.items():
            if key not in self.running:
                self.running.add(key)
                events.append((canary.model, canary.candidate, "STARTED", canary.describe()))
            if key not in self.verdicts and (decided := canary.decision()) is not None:
                self.verdicts[key] = decided
                events.append((canary.model, canary.candidate, *decided))
        for key in [key for key in self.running if key not in pooled]:
            self.running.discard(key)
            if self.verdicts.pop(key, None) is None:
                events.append((key[0], key[2], "ENDED", "no worker runs the trial any more"))
        verdicts: dict[Any, list[Verdict]] = {}
        for key, workers in holders.items():
            if key in self.verdicts:
                for worker in workers:
                    verdicts.setdefault(worker, []).append([key[0], key[2], *self.verdicts[key]])
        return events, verdicts
