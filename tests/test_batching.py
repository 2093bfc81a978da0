"""server.batching.BatchQueue with a fake model: results, coalescing, bounds, deadlines, failures, shutdown, delay."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator

import numpy as np
import pytest

from server.batching import BatchObserver, BatchQueue, DeadlineExpired, QueueClosed, QueueFull

WAIT = 5.0  # seconds a test waits for something that should happen almost at once


def image(n: float) -> np.ndarray:
    """An image that carries its number in every pixel, so the fake model's output row names it."""
    return np.full((1, 28, 28), n, np.float32)


class FakeModel:
    """Returns each image's first 10 pixels as its row and records every batch; `hold()` stops it inside a run."""

    def __init__(self, fail_first: Exception | None = None) -> None:
        self.batches: list[list[float]] = []
        self.running = threading.Event()
        self.released = threading.Event()
        self.released.set()
        self.fail_first = fail_first

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        self.batches.append(batch[:, 0, 0, 0].tolist())
        self.running.set()
        assert self.released.wait(WAIT), "test never released the model"
        if self.fail_first is not None and len(self.batches) == 1:
            raise self.fail_first
        return batch.reshape(len(batch), -1)[:, :10].copy()

    def seen(self) -> list[float]:
        return [n for batch in self.batches for n in batch]

    def sizes(self) -> list[int]:
        return [len(batch) for batch in self.batches]

    def hold(self, queue: BatchQueue) -> None:
        """Keep the worker busy inside a run of one image (number -1), so that what is submitted next has to queue."""
        self.released.clear()
        self.running.clear()
        queue.submit([image(-1)])
        assert self.running.wait(WAIT)


@pytest.fixture
def model() -> FakeModel:
    return FakeModel()


@pytest.fixture
def make_queue(model: FakeModel) -> Iterator[Callable[..., BatchQueue]]:
    queues: list[BatchQueue] = []

    def make(run_batch=None, *, max_batch_size: int = 8, max_queue_size: int = 64, **options) -> BatchQueue:
        queue = BatchQueue(run_batch or model, max_batch_size=max_batch_size, max_queue_size=max_queue_size, **options)
        queues.append(queue)
        return queue

    yield make
    model.released.set()
    for queue in queues:
        queue.close(WAIT)


def test_each_future_gets_the_output_row_of_its_own_image(model: FakeModel, make_queue) -> None:
    queue = make_queue(max_batch_size=16)
    model.hold(queue)
    requests = [queue.submit([image(10 * r + i) for i in range(3)]) for r in range(1, 4)]
    model.released.set()
    for r, futures in enumerate(requests, start=1):
        for i, future in enumerate(futures):
            np.testing.assert_array_equal(future.result(WAIT), np.full(10, 10 * r + i, np.float32))
    assert model.batches == [[-1], [10, 11, 12, 20, 21, 22, 30, 31, 32]]


def test_requests_submitted_while_a_batch_runs_are_coalesced_into_the_next_one(model: FakeModel, make_queue) -> None:
    queue = make_queue(max_batch_size=16)
    model.hold(queue)
    futures = [queue.submit([image(n)])[0] for n in range(5)]
    model.released.set()
    assert [f.result(WAIT)[0] for f in futures] == [0, 1, 2, 3, 4]
    assert model.sizes() == [1, 5]


def test_a_batch_never_holds_more_than_max_batch_size_images(model: FakeModel, make_queue) -> None:
    queue = make_queue(max_batch_size=3)
    model.hold(queue)
    futures = queue.submit([image(n) for n in range(8)])
    model.released.set()
    assert [f.result(WAIT)[0] for f in futures] == list(range(8))
    assert model.sizes() == [1, 3, 3, 2]


def test_a_full_queue_refuses_a_submission_at_once(model: FakeModel, make_queue) -> None:
    queue = make_queue(max_queue_size=4)
    model.hold(queue)  # the image being run no longer counts: the queue is empty
    for n in range(4):
        queue.submit([image(n)])
    started = time.monotonic()
    with pytest.raises(QueueFull, match="limit of 4"):
        queue.submit([image(99)])
    assert time.monotonic() - started < 0.5
    assert queue.depth() == 4
    model.released.set()
    queue.close(WAIT)
    assert 99 not in model.seen()


def test_a_multi_image_submission_that_does_not_fit_is_refused_whole(model: FakeModel, make_queue) -> None:
    queue = make_queue(max_queue_size=4)
    model.hold(queue)
    queue.submit([image(1), image(2)])
    with pytest.raises(QueueFull):
        queue.submit([image(50), image(51), image(52)])
    assert queue.depth() == 2
    fits = queue.submit([image(3), image(4)])
    model.released.set()
    assert [f.result(WAIT)[0] for f in fits] == [3, 4]
    assert model.seen() == [-1, 1, 2, 3, 4]


def test_an_image_whose_deadline_passes_while_queued_is_expired_and_never_run(model: FakeModel, make_queue) -> None:
    expired: list[int] = []
    queue = make_queue(observer=BatchObserver(on_expired=expired.append))
    model.hold(queue)
    late = queue.submit([image(7), image(8)], deadline=time.monotonic() + 0.02)
    (patient,) = queue.submit([image(9)], deadline=time.monotonic() + 60)
    time.sleep(0.05)
    model.released.set()
    for future in late:
        with pytest.raises(DeadlineExpired):
            future.result(WAIT)
    assert patient.result(WAIT)[0] == 9
    assert model.batches == [[-1], [9]]
    assert expired == [2]


def test_the_observer_hears_of_batches_waits_and_queue_depth(model: FakeModel, make_queue) -> None:
    batches: list[tuple[int, float]] = []
    waits: list[float] = []
    depths: list[int] = []
    observer = BatchObserver(on_batch=lambda n, s: batches.append((n, s)), on_wait=waits.append, on_depth=depths.append)
    queue = make_queue(observer=observer)
    model.hold(queue)
    futures = [queue.submit([image(n)])[0] for n in range(3)]
    time.sleep(0.05)
    model.released.set()
    for future in futures:
        future.result(WAIT)
    assert [n for n, _ in batches] == [1, 3]
    assert batches[0][1] >= 0.05  # the held run lasted at least the sleep
    assert all(0 <= seconds < WAIT for _, seconds in batches)
    assert len(waits) == 4 and all(w >= 0.05 for w in waits[1:])  # the three queued behind the held run
    assert depths == [1, 0, 1, 2, 3, 0]


def test_a_failing_run_fails_only_its_own_futures_and_the_worker_carries_on(make_queue) -> None:
    boom = RuntimeError("model crashed")
    model = FakeModel(fail_first=boom)
    queue = make_queue(model)
    model.released.clear()
    doomed = queue.submit([image(1), image(2)])
    assert model.running.wait(WAIT)
    (queued_meanwhile,) = queue.submit([image(3)])
    model.released.set()
    for future in doomed:
        assert future.exception(WAIT) is boom
    assert queued_meanwhile.result(WAIT)[0] == 3
    (later,) = queue.submit([image(4)])
    assert later.result(WAIT)[0] == 4
    assert model.batches == [[1, 2], [3], [4]]


def test_a_future_cancelled_while_queued_is_never_run(model: FakeModel, make_queue) -> None:
    queue = make_queue()
    model.hold(queue)
    cancelled, kept = queue.submit([image(5), image(6)])
    assert cancelled.cancel()
    model.released.set()
    assert kept.result(WAIT)[0] == 6
    assert cancelled.cancelled()
    assert model.batches == [[-1], [6]]


def wait_until_closed(queue: BatchQueue) -> bool:
    """Poll with empty submissions, which queue nothing, until the queue refuses them."""
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:
        try:
            queue.submit([])
        except QueueClosed:
            return True
        time.sleep(0.001)
    return False


def test_close_finishes_queued_work_then_refuses_new_work(model: FakeModel, make_queue) -> None:
    queue = make_queue()
    model.hold(queue)
    futures = queue.submit([image(n) for n in range(3)])
    closer = threading.Thread(target=queue.close)
    closer.start()
    assert wait_until_closed(queue)
    with pytest.raises(QueueClosed):
        queue.submit([image(99)])
    model.released.set()
    closer.join(WAIT)
    assert not closer.is_alive()
    assert [f.result(0)[0] for f in futures] == [0, 1, 2]
    assert 99 not in model.seen()
    with pytest.raises(QueueClosed):
        queue.submit([image(100)])


def timed_result(queue: BatchQueue, n: float) -> float:
    started = time.monotonic()
    (future,) = queue.submit([image(n)])
    assert future.result(WAIT)[0] == n
    return time.monotonic() - started


def test_with_a_queue_delay_a_lone_request_waits_that_long_for_company(model: FakeModel, make_queue) -> None:
    queue = make_queue(max_queue_delay=0.2)
    assert 0.15 <= timed_result(queue, 1) < 1.5


def test_requests_arriving_within_the_queue_delay_share_a_batch(model: FakeModel, make_queue) -> None:
    queue = make_queue(max_queue_delay=0.3)
    first = queue.submit([image(1)])
    time.sleep(0.05)
    second = queue.submit([image(2)])
    assert [f.result(WAIT)[0] for f in first + second] == [1, 2]
    assert model.sizes() == [2]


def test_a_full_batch_does_not_wait_for_the_queue_delay(model: FakeModel, make_queue) -> None:
    queue = make_queue(max_batch_size=4, max_queue_delay=2.0)
    started = time.monotonic()
    futures = queue.submit([image(n) for n in range(4)])
    assert [f.result(WAIT)[0] for f in futures] == [0, 1, 2, 3]
    assert time.monotonic() - started < 1.0


def test_without_a_queue_delay_a_lone_request_runs_at_once(model: FakeModel, make_queue) -> None:
    queue = make_queue(max_queue_delay=0.0)
    assert timed_result(queue, 1) < 0.1


def test_a_cancelled_image_counts_as_dropped(model: FakeModel, make_queue) -> None:
    dropped: list[int] = []
    queue = make_queue(observer=BatchObserver(on_expired=dropped.append))
    model.hold(queue)
    (cancelled,) = queue.submit([image(5)])
    assert cancelled.cancel()
    model.released.set()
    queue.submit([image(6)])[0].result(WAIT)
    assert dropped == [1]


def test_a_caller_giving_up_on_an_expired_image_does_not_stop_the_worker(model: FakeModel, make_queue) -> None:
    """Regression: cancel() racing the worker's expiry used to raise InvalidStateError and kill the worker."""
    queue = make_queue()
    model.hold(queue)
    (gave_up,) = queue.submit([image(3)], deadline=time.monotonic() + 0.01)
    time.sleep(0.02)
    assert gave_up.cancel()  # what the gRPC handler does when its own deadline passes first
    model.released.set()
    assert queue.submit([image(4)])[0].result(WAIT)[0] == 4
