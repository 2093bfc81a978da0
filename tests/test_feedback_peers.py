"""With `--workers N`, a label reaches the worker that gave the answer: a worker that does not remember a request id
asks its siblings over their own Unix sockets (server/feedback/peers.py), and the owner takes the label, or refuses
it, exactly as it would have taken it itself."""

from __future__ import annotations

import asyncio
import math
from pathlib import Path

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from server.errors import AlreadyExists, InvalidInput, NotFound, Unavailable
from server.feedback.answers import AnswerMemory
from server.feedback.loop import FeedbackLoop
from server.feedback.peers import FeedbackPeers, socket_path
from server.feedback.quality import LiveQuality
from server.ops.metrics import ServiceMetrics
from server.pipeline.predictions import Predictions


def answer(digit: int) -> Predictions:
    probabilities = np.eye(10, dtype=np.float32)[[digit]]
    return Predictions(
        probabilities, np.array([digit]), np.ones(1), np.full(1, math.nan), np.ones(1, bool), "1", "m",
        np.zeros((1, 1, 28, 28), np.uint8),
    )  # fmt: skip


class Worker:
    """One worker's feedback half: its memory, its live quality, its metrics and its socket."""

    def __init__(self, folder: Path, index: int, count: int, timeout: float = 2.0) -> None:
        self.metrics = ServiceMetrics(CollectorRegistry())
        self.loop = FeedbackLoop(self.metrics, AnswerMemory(), LiveQuality(self.metrics))
        self.loop.quality.track("m", "1", None)  # version 1 of model m serves
        take = lambda *question: self.loop.take(*question, count_unknown=False)  # noqa: E731
        self.loop.peers = FeedbackPeers(folder, index, count, take, timeout)

    def refused(self, reason: str) -> float:
        return self.metrics.registry.get_sample_value("mnist_feedback_refused_total", {"reason": reason}) or 0.0


def run(scenario) -> None:
    asyncio.run(asyncio.wait_for(scenario(), 30))


def test_a_label_sent_to_another_worker_is_taken_by_the_worker_that_answered(tmp_path: Path) -> None:
    async def scenario() -> None:
        first, second = Worker(tmp_path, 0, 2), Worker(tmp_path, 1, 2)
        for worker in (first, second):
            await worker.loop.peers.start()
        second.loop.remember(answer(7), ["asked-of-the-second"])

        result = await first.loop.take_anywhere("asked-of-the-second", 7, None)

        assert (result.answer.prediction, result.answer.version, result.correct) == ("7", "1", True)
        assert second.loop.quality.live_accuracy("m", "1") == (1.0, 1)  # counted where the answer was given
        assert first.loop.quality.live_accuracy("m", "1")[1] == 0
        with pytest.raises(AlreadyExists):  # the owner keeps the answer's one label, wherever the second arrives
            await first.loop.take_anywhere("asked-of-the-second", 3, None)
        with pytest.raises(AlreadyExists):
            await second.loop.take_anywhere("asked-of-the-second", 3, None)
        second.loop.remember(answer(2), ["wrong-kind"])
        with pytest.raises(InvalidInput, match="Classify digit"):  # the owner's own refusal, word for word
            await first.loop.take_anywhere("wrong-kind", None, "2")
        with pytest.raises(NotFound, match="never-given"):
            await first.loop.take_anywhere("never-given", 1, None)
        # an unknown id is counted refused once, by the worker that was asked, not by the siblings it asked
        assert (first.refused("unknown_request"), second.refused("unknown_request")) == (1.0, 0.0)
        assert (first.refused("duplicate"), second.refused("duplicate")) == (0.0, 2.0)
        for worker in (first, second):
            await worker.loop.peers.close()
        assert not list(tmp_path.glob("*.sock"))

    run(scenario)


def test_a_worker_that_is_not_running_is_skipped_and_one_that_does_not_answer_makes_the_call_retryable(
    tmp_path: Path,
) -> None:
    async def scenario() -> None:
        first, third = Worker(tmp_path, 0, 3, timeout=0.3), Worker(tmp_path, 2, 3)
        await first.loop.peers.start()
        await third.loop.peers.start()
        socket_path(tmp_path, 1).touch()  # worker 1 died and left its socket's file: nobody listens there
        third.loop.remember(answer(4), ["the-third-has-it"])
        assert (await first.loop.take_anywhere("the-third-has-it", 4, None)).correct
        with pytest.raises(NotFound):  # the dead worker's memory went with it: NOT_FOUND, not a retry
            await first.loop.take_anywhere("nobody-has-it", 4, None)

        socket_path(tmp_path, 1).unlink()
        silent = await asyncio.start_unix_server(lambda r, w: asyncio.sleep(5), path=str(socket_path(tmp_path, 1)))
        with pytest.raises(Unavailable, match="worker\\(s\\) 1 did not answer within 0.3 s"):
            await first.loop.take_anywhere("nobody-has-it", 4, None)
        third.loop.remember(answer(5), ["found-past-the-silent-one"])
        assert (await first.loop.take_anywhere("found-past-the-silent-one", 5, None)).answer.prediction == "5"
        silent.close()
        for worker in (first, third):
            await worker.loop.peers.close()

    run(scenario)


def test_a_question_a_worker_cannot_read_is_answered_with_a_refusal_and_it_keeps_answering(tmp_path: Path) -> None:
    async def scenario() -> None:
        worker = Worker(tmp_path, 0, 2)
        await worker.loop.peers.start()
        worker.loop.remember(answer(1), ["kept"])
        for garbage in (b"not json\n", b"[1, 2]\n", b'{"label": 1}\n'):
            reader, writer = await asyncio.open_unix_connection(str(socket_path(tmp_path, 0)))
            writer.write(garbage)
            assert b'"InvalidInput"' in await reader.readline()
            writer.close()
        asker = Worker(tmp_path, 1, 2)
        assert (await asker.loop.take_anywhere("kept", 1, None)).correct
        await worker.loop.peers.close()

    run(scenario)
