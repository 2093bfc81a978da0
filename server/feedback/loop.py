"""The feedback loop's serving half: answers remembered, labels joined with them, records stored, quality measured.

`remember*` are called on the serving path and cost a dictionary insert; `take` answers a Feedback call: it checks
the label, finds the answer, counts it in the version's live quality and hands the record to the database writer
(server/feedback/store.py), which never makes a call wait. See docs/feedback.md.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np

from server.errors import AlreadyExists, InvalidInput, NotFound
from server.feedback.answers import CLASSIFY, MAX_REQUEST_ID_CHARS, Answer, AnswerMemory
from server.feedback.quality import AnswerTally, LiveQuality, Reference
from server.ops.metrics import ServiceMetrics
from server.pipeline.predictions import Predictions

if TYPE_CHECKING:
    from server.feedback.peers import FeedbackPeers


class ReplicaAsker(Protocol):
    """The fleet's other replicas, asked for the answer under a request id (server/transport/replicas.py)."""

    async def ask(
        self, request_id: str, label: int | None, text: str | None, model: str, authorization: str | None
    ) -> FeedbackResult | None: ...


log = logging.getLogger("mnist.feedback")

MAX_TEXT_CHARS = 64


@dataclass(frozen=True)
class FeedbackResult:
    answer: Answer
    label: str
    correct: bool
    stored: bool
    live_accuracy: float
    live_answers: int


class FeedbackLoop:
    """One per server process; `writer` None: labels are counted in live quality but not stored."""

    def __init__(
        self,
        metrics: ServiceMetrics,
        memory: AnswerMemory,
        quality: LiveQuality,
        writer: object | None = None,  # server.feedback.store.FeedbackWriter
    ) -> None:
        self.metrics = metrics
        self.memory = memory
        self.quality = quality
        self.writer = writer
        # Told of every labelled answer (model, version, right): the model repository's canary trials count them.
        self.on_labelled: Callable[[str, str, bool], None] = lambda model, version, correct: None
        # With `--workers N`: the other workers, asked for an answer this one does not remember (peers.py); with
        # `--feedback-peers`, the fleet's other replicas (server/transport/replicas.py: ReplicaPeers).
        self.peers: FeedbackPeers | None = None
        self.replicas: ReplicaAsker | None = None

    # --- the serving path ---------------------------------------------------------------------------------------

    def remember(self, predictions: Predictions, request_ids: Sequence[str]) -> None:
        self.memory.remember(predictions, request_ids)

    def remember_batch(self, predictions: Predictions, prefix: str) -> None:
        self.memory.remember_batch(predictions, prefix)

    def remember_reading(
        self, model: str, version: str, request_id: str, text: str, confidence: float, images: np.ndarray | None
    ) -> None:
        self.memory.remember_reading(model, version, request_id, text, confidence, images)

    # --- versions -----------------------------------------------------------------------------------------------

    def track(
        self,
        model: str,
        version: str,
        model_path: Path | None,
        model_sha256: str = "",
        tally: AnswerTally | None = None,
    ) -> AnswerTally:
        """A version starts serving: its reference (beside its model file) is read, its quality followed (`tally`: its
        pipeline's count of answers). A reference measured on another file (its model_sha256 differs) is stale and not
        used."""
        reference = None
        if model_path is not None:
            try:
                reference = Reference.load(Reference.path_for(model_path))
            except ValueError as problem:
                log.warning("%s %s: %s; drift and the reference accuracy are not reported", model, version, problem)
        if reference is not None and reference.model_sha256 and model_sha256 and reference.model_sha256 != model_sha256:
            log.warning(
                "%s %s: the reference beside %s was measured on another file: not used (python -m export.reference)",
                model,
                version,
                model_path,
            )
            reference = None
        if reference is None:
            log.info(
                "%s %s: no reference beside its model file: drift is not reported (export/reference.py)", model, version
            )
        return self.quality.track(model, version, reference, tally)

    def forget(self, model: str, version: str) -> None:
        self.quality.forget(model, version)

    # --- Feedback calls -----------------------------------------------------------------------------------------

    async def take_anywhere(
        self,
        request_id: str,
        label: int | None,
        text: str | None,
        model: str = "",
        forwarded: bool = False,
        authorization: str | None = None,
    ) -> FeedbackResult:
        """`take` here, or by the process that gave the answer when this one does not remember it: another worker
        (`--workers N`, peers.py), then another replica (`--feedback-peers`, server/transport/replicas.py) with the
        caller's `authorization`, unless the call was `forwarded` by a replica already (it is asked once, by the
        replica that received it, which alone counts an unknown id)."""
        replicas = None if forwarded else self.replicas
        if text is not None and len(text) > 4 * MAX_TEXT_CHARS:  # refused before it travels to another process
            raise self._refused("bad_label", InvalidInput(f"text is over {4 * MAX_TEXT_CHARS} characters"))
        others = self.peers is not None or replicas is not None
        if not (others or forwarded) or not 0 < len(request_id) <= MAX_REQUEST_ID_CHARS:
            return self.take(request_id, label, text, model)
        try:
            return self.take(request_id, label, text, model, count_unknown=False)
        except NotFound as not_here:
            missing = not_here
        if self.peers is not None and (result := await self.peers.ask(request_id, label, text, model)) is not None:
            return result
        if replicas is not None:
            result = await replicas.ask(request_id, label, text, model, authorization)
            if result is not None:
                return result
        raise missing if forwarded else self._refused("unknown_request", missing)

    def take(
        self, request_id: str, label: int | None, text: str | None, model: str = "", count_unknown: bool = True
    ) -> FeedbackResult:
        """A true label for the answer given under `request_id`. InvalidInput for a malformed label, NotFound for an
        answer this server does not remember (unknown, forgotten, or another model's), AlreadyExists for a second
        label. `count_unknown` False: an unknown id is not counted as refused (another worker may have it)."""
        if not request_id:
            raise self._refused("unknown_request", InvalidInput("request_id is empty: send the id of an answer"))
        shown = request_id if len(request_id) <= 64 else request_id[:64] + "..."
        if len(request_id) > MAX_REQUEST_ID_CHARS:
            raise self._refused(
                "unknown_request",
                NotFound(f"request_id {shown!r} is over {MAX_REQUEST_ID_CHARS} characters: such answers are not kept"),
            )
        answer = self.memory.recall(request_id)
        if answer is None or (model and answer.model != model):
            raise (self._refused if count_unknown else _uncounted)(
                "unknown_request",
                NotFound(
                    f"no answer with request_id {shown!r}{f' from model {model!r}' if model else ''} is "
                    f"remembered: it is unknown, older than {self.memory.max_age_seconds:g} s, or beyond the last "
                    f"{self.memory.max_answers} answers (--feedback-memory), or another server process answered it"
                ),
            )
        truth = self._truth(answer, label, text)
        if (taken := self.memory.labelled(answer)) is not None:
            same = "the same as this one" if taken == truth else "a different one"
            raise self._refused(
                "duplicate",
                AlreadyExists(
                    f"the answer {shown!r} already has a label ({same}): a second one is refused (a retry of a call "
                    "that timed out finds its own label taken)"
                ),
            )
        self.memory.mark_labelled(answer, truth)
        # A number is right when its digits are: where ReadDigits put group and line breaks is not judged
        label, predicted = (
            (truth, answer.prediction) if answer.kind == CLASSIFY else map(_digits, (truth, answer.prediction))
        )
        accuracy, window = self.quality.on_label(answer.model, answer.version, label, predicted)
        self.on_labelled(answer.model, answer.version, label == predicted)
        stored = self._store(answer, truth)
        return FeedbackResult(answer, truth, label == predicted, stored, accuracy, window)

    def _truth(self, answer: Answer, label: int | None, text: str | None) -> str:
        if answer.kind == CLASSIFY:
            if label is None:
                raise self._refused(
                    "bad_label",
                    InvalidInput("this answer is a Classify digit: send its true `label` (0-9), not `text`"),
                )
            if not 0 <= label <= 9:
                raise self._refused("bad_label", InvalidInput(f"label {label} is out of range: a digit is 0-9"))
            return str(label)
        if text is None:
            if label is None:
                raise self._refused("bad_label", InvalidInput("send the true `text` of this ReadDigits answer"))
            text = str(label)
        truth = text.strip()
        if not truth or len(truth) > MAX_TEXT_CHARS or not all(c.isdigit() or c in " \n" for c in truth):
            raise self._refused(
                "bad_label",
                InvalidInput(
                    f"text {text[:MAX_TEXT_CHARS]!r} is not a number as ReadDigits writes it: digits, spaces "
                    f"between groups and newlines between lines, 1-{MAX_TEXT_CHARS} characters"
                ),
            )
        if not all(c.isascii() for c in truth):
            raise self._refused("bad_label", InvalidInput("text holds non-ASCII digits: write 0-9"))
        return truth

    def _store(self, answer: Answer, truth: str) -> bool:
        if self.writer is None:
            return False
        from server.feedback.store import FeedbackRecord

        record = FeedbackRecord(
            request_id=answer.request_id,
            model=answer.model,
            version=answer.version,
            kind=answer.kind,
            prediction=answer.prediction,
            confidence=answer.confidence,
            digit_score=answer.digit_score,
            label=truth,
            answered_at=answer.answered_at,
            received_at=time.time(),
            image=answer.image,
        )
        return bool(self.writer.submit(record))  # type: ignore[attr-defined]

    def _refused(self, reason: str, error: Exception) -> Exception:
        self.metrics.feedback_refused.labels(reason).inc()
        return error

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()  # type: ignore[attr-defined]


def _uncounted(reason: str, error: Exception) -> Exception:
    return error


def _digits(text: str) -> str:
    return "".join(text.split())
