"""Recent answers by request id, so that a label sent later can be joined with what the server answered.

Bounded by answers held and by age: the oldest go first. A call is remembered as one entry whatever its size (a
`ClassifyBatch` of 256 raw images is one entry keyed by its ids' shared prefix, server/transport/wire.py), and
nothing is copied on the serving path: an entry holds the call's own prediction arrays and model input, and the
28x28 image is made only when a label arrives. All on the event loop's thread.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from server.pipeline.predictions import Predictions

CLASSIFY = "classify"
READ_DIGITS = "read_digits"
BATCH_PREFIX_CHARS = 24  # generated batch ids: 24 hex digits shared by the batch, then the item's index in 8
BATCH_INDEX_CHARS = 8
MAX_REQUEST_ID_CHARS = 128  # longer ids are answered, not remembered: a label for them is NOT_FOUND


@dataclass(frozen=True)
class Answer:
    """One answer as the server gave it."""

    request_id: str
    model: str
    version: str
    kind: str  # CLASSIFY (a digit) or READ_DIGITS (a number's text)
    prediction: str
    confidence: float
    digit_score: float | None
    answered_at: float  # unix seconds
    image: bytes | None  # the 28x28 uint8 input the model saw (READ_DIGITS: each digit's, one after another)


@dataclass
class _Entry:
    answered_at: float
    size: int
    predictions: Predictions | None = None  # CLASSIFY
    rows: dict[str, int] | None = None  # request id -> row; None: a generated batch, the row is in the id
    reading: Answer | None = None  # READ_DIGITS


# Keys: ("id", request id) for an answer under its own id (a batch's items with the client's ids too, all pointing at
# the batch's entry), ("batch", n) for such a batch as a whole, ("prefix", p) for a batch under generated ids.
_Key = tuple[str, str | int]


class AnswerMemory:
    """The last `max_answers` answers given within `max_age_seconds`; `keep_images` False forgets the inputs at once.
    Ids over MAX_REQUEST_ID_CHARS characters are not remembered."""

    def __init__(
        self,
        max_answers: int = 20_000,
        max_age_seconds: float = 3600.0,
        keep_images: bool = True,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.max_answers = max_answers
        self.max_age_seconds = max_age_seconds
        self.keep_images = keep_images
        self._clock = clock
        self._entries: OrderedDict[_Key, _Entry] = OrderedDict()
        self._held = 0
        self._batches = 0
        # (model, request id, when answered): a label was taken for that answer. A new answer under the same id (a
        # client that reuses its ids) is another answer, labelled afresh.
        self._labelled: OrderedDict[tuple[str, str, float], str] = OrderedDict()  # -> the label taken

    def __len__(self) -> int:
        """Answers held."""
        return self._held

    def remember(self, predictions: Predictions, request_ids: Sequence[str]) -> None:
        """A Classify or ClassifyBatch call's answers, row i under request_ids[i]."""
        if not self.max_answers:
            return
        kept = [(row, rid) for row, rid in enumerate(request_ids) if len(rid) <= MAX_REQUEST_ID_CHARS]
        entry = _Entry(self._clock(), len(request_ids), self._kept(predictions), {rid: row for row, rid in kept})
        if len(request_ids) == 1:
            if kept:
                self._add(("id", request_ids[0]), entry)
            return
        self._batches += 1
        self._add(("batch", self._batches), entry)  # the batch's own key counts its answers
        for _, request_id in kept:  # each id finds its batch's entry
            self._unlink(("id", request_id))
            self._entries[("id", request_id)] = entry

    def remember_batch(self, predictions: Predictions, prefix: str) -> None:
        """A raw batch's answers under generated ids: `prefix` then each row's index as 8 hex digits."""
        if self.max_answers:
            self._add(("prefix", prefix), _Entry(self._clock(), len(predictions), self._kept(predictions)))

    def remember_reading(
        self, model: str, version: str, request_id: str, text: str, confidence: float, images: np.ndarray | None
    ) -> None:
        """A ReadDigits answer: its text, and the 28x28 uint8 images of the digits read, in order."""
        if not self.max_answers or len(request_id) > MAX_REQUEST_ID_CHARS:
            return
        now = self._clock()
        image = images.astype(np.uint8).tobytes() if images is not None and self.keep_images else None
        answer = Answer(request_id, model, version, READ_DIGITS, text, confidence, None, now, image)
        self._add(("id", request_id), _Entry(now, 1, reading=answer))

    def recall(self, request_id: str) -> Answer | None:
        """The answer given under `request_id`, or None when it is unknown or has been forgotten."""
        self._forget_old()
        entry = self._entries.get(("id", request_id))
        row = None
        if entry is not None and entry.rows is not None:
            row = entry.rows.get(request_id)
        elif entry is None and len(request_id) == BATCH_PREFIX_CHARS + BATCH_INDEX_CHARS:
            entry = self._entries.get(("prefix", request_id[:BATCH_PREFIX_CHARS]))
            if entry is not None:
                try:
                    row = int(request_id[BATCH_PREFIX_CHARS:], 16)
                except ValueError:
                    return None
        if entry is None:
            return None
        if entry.reading is not None:
            return entry.reading
        predictions = entry.predictions
        if predictions is None or row is None or not 0 <= row < len(predictions):
            return None
        score = float(predictions.digit_scores[row])
        return Answer(
            request_id,
            predictions.model_name,
            predictions.model_version,
            CLASSIFY,
            str(int(predictions.digits[row])),
            float(predictions.confidences[row]),
            None if np.isnan(score) else score,
            entry.answered_at,
            _pixels(predictions, row),
        )

    def labelled(self, answer: Answer) -> str | None:
        """The label taken for this answer, or None."""
        return self._labelled.get((answer.model, answer.request_id, answer.answered_at))

    def mark_labelled(self, answer: Answer, label: str) -> None:
        """A label was taken for this answer: a second one is a duplicate."""
        self._labelled[(answer.model, answer.request_id, answer.answered_at)] = label
        while len(self._labelled) > max(self.max_answers, 1):
            self._labelled.popitem(last=False)

    def _kept(self, predictions: Predictions) -> Predictions:
        if self.keep_images or predictions.inputs is None:
            return predictions
        return Predictions(
            predictions.probabilities,
            predictions.digits,
            predictions.confidences,
            predictions.digit_scores,
            predictions.is_digit,
            predictions.model_version,
            predictions.model_name,
        )

    def _unlink(self, key: _Key) -> None:
        old = self._entries.pop(key, None)
        if old is not None and not _an_item_of_a_batch(key, old):
            self._held -= old.size

    def _add(self, key: _Key, entry: _Entry) -> None:
        self._unlink(key)
        self._entries[key] = entry
        self._held += entry.size
        self._forget_old()

    def _forget_old(self) -> None:
        """The oldest entries go while too many answers are held or they are too old."""
        oldest = self._clock() - self.max_age_seconds
        while self._entries:
            key, entry = next(iter(self._entries.items()))
            if self._held <= self.max_answers and entry.answered_at >= oldest:
                return
            self._entries.popitem(last=False)
            if _an_item_of_a_batch(key, entry):
                continue
            self._held -= entry.size
            if key[0] == "batch" and entry.rows is not None:
                for request_id in entry.rows:
                    if self._entries.get(("id", request_id)) is entry:
                        del self._entries[("id", request_id)]


def _an_item_of_a_batch(key: _Key, entry: _Entry) -> bool:
    """An item of a ClassifyBatch sent with the client's ids: the batch's own key counts the answers."""
    return key[0] == "id" and entry.size > 1


def _pixels(predictions: Predictions, row: int) -> bytes | None:
    """Row `row`'s model input as 28x28 uint8 pixels."""
    if predictions.inputs is None:
        return None
    image = predictions.inputs[row]
    if image.dtype == np.uint8:
        return image.tobytes()
    if predictions.normalization is None:
        return None
    return predictions.normalization.invert(image).tobytes()
