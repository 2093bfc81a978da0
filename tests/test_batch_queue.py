"""BatchQueue: coalescing, bounds, deadlines and failure isolation, with a fake model."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from server.batching import BatchObserver, BatchQueue, DeadlineExpired, QueueClosed, QueueFull


class FakeModel:
    """Echoes each image's first pixel as its output row; can hold the worker inside a run."""

    def __init__(self) -> None:
        self.batches: list[list[float]] = []
        self.release = threading.Event()
        self.release.set()
        self.entered = threading.Event()

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        self.batches.append([float(v) for v in batch[:, 0, 0, 0]])
        self.entered.set()
        self.release.wait(10)
        return np.repeat(batch[:, 0, 0, :1], 10, axis=1)


def image(value: float) -> np.ndarray:
    return np.full((1, 28, 28), value, np.float32)


@pytest.fixture
def model() -> FakeModel:
    return FakeModel()


def hold_worker(queue: BatchQueue, model: FakeModel) -> None:
    """Occupy the worker with one image (value -1) so later submissions have to queue."""
    model.release.clear()
    model.entered.clear()
    queue.submit([image(-1)])
    assert model.entered.wait(5)


def test_each_caller_gets_the_row_of_its_own_image(model: FakeModel) -> None:
    queue = BatchQueue(model, max_batch_size=8, max_queue_size=64)
    futures = queue.submit([image(v) for v in range(5)])
    assert [f.result(5)[0] for f in futures] == [0, 1, 2, 3, 4]
    queue.close()


def test_requests_arriving_during_a_run_form_the_next_batch_up_to_the_maximum(model: FakeModel) -> None:
    queue = BatchQueue(model, max_batch_size=4, max_queue_size=64)
    hold_worker(queue, model)
    futures = [f for v in range(6) for f in queue.submit([image(v)])]
    model.release.set()
    assert [f.result(5)[0] for f in futures] == list(range(6))
    assert model.batches == [[-1], [0, 1, 2, 3], [4, 5]]
    queue.close()


def test_a_full_queue_refuses_at_once_and_a_batch_is_queued_whole_or_not_at_all(model: FakeModel) -> None:
    queue = BatchQueue(model, max_batch_size=4, max_queue_size=5)
    hold_worker(queue, model)
    queue.submit([image(v) for v in range(4)])
    with pytest.raises(QueueFull, match="4 images waiting, 2 more would exceed the limit of 5"):
        queue.submit([image(10), image(11)])
    assert queue.depth() == 4  # nothing of the refused batch was queued
    queue.submit([image(12)])
    with pytest.raises(QueueFull):
        queue.submit([image(13)])
    model.release.set()
    queue.close()
    assert 10 not in sum(model.batches, []) and 12 in sum(model.batches, [])


def test_an_image_whose_deadline_passes_in_the_queue_is_never_run(model: FakeModel) -> None:
    expired: list[int] = []
    queue = BatchQueue(model, max_batch_size=8, max_queue_size=64, observer=BatchObserver(on_expired=expired.append))
    hold_worker(queue, model)
    (late,) = queue.submit([image(7)], deadline=time.monotonic() + 0.02)
    (patient,) = queue.submit([image(8)], deadline=time.monotonic() + 30)
    time.sleep(0.05)
    model.release.set()
    with pytest.raises(DeadlineExpired):
        late.result(5)
    assert patient.result(5)[0] == 8
    assert 7 not in sum(model.batches, []) and expired == [1]
    queue.close()


def test_a_cancelled_request_is_never_run_and_counts_as_dropped(model: FakeModel) -> None:
    dropped: list[int] = []
    queue = BatchQueue(model, max_batch_size=8, max_queue_size=64, observer=BatchObserver(on_expired=dropped.append))
    hold_worker(queue, model)
    (cancelled,) = queue.submit([image(5)])
    assert cancelled.cancel()
    model.release.set()
    queue.close()
    assert 5 not in sum(model.batches, []) and dropped == [1]


def test_a_failing_run_fails_only_its_own_requests(model: FakeModel) -> None:
    calls = []

    def flaky(batch: np.ndarray) -> np.ndarray:
        calls.append(len(batch))
        if len(calls) == 1:
            raise RuntimeError("boom")
        return model(batch)

    queue = BatchQueue(flaky, max_batch_size=8, max_queue_size=64)
    (first,) = queue.submit([image(1)])
    with pytest.raises(RuntimeError, match="boom"):
        first.result(5)
    (second,) = queue.submit([image(2)])
    assert second.result(5)[0] == 2
    queue.close()


def test_observer_hooks_report_batches_waits_and_depth(model: FakeModel) -> None:
    batches, waits, depths = [], [], []
    observer = BatchObserver(on_batch=lambda n, s: batches.append((n, s)), on_wait=waits.append, on_depth=depths.append)
    queue = BatchQueue(model, max_batch_size=8, max_queue_size=64, observer=observer)
    for f in queue.submit([image(v) for v in range(3)]):
        f.result(5)
    queue.close()
    assert sum(n for n, _ in batches) == 3 and all(s >= 0 for _, s in batches)
    assert len(waits) == 3 and all(w >= 0 for w in waits)
    assert 3 in depths and depths[-1] == 0


def test_close_finishes_queued_work_then_refuses_new_work(model: FakeModel) -> None:
    queue = BatchQueue(model, max_batch_size=2, max_queue_size=64)
    hold_worker(queue, model)
    futures = queue.submit([image(v) for v in range(5)])
    closer = threading.Thread(target=queue.close)
    closer.start()
    time.sleep(0.02)
    with pytest.raises(QueueClosed):
        queue.submit([image(9)])
    model.release.set()
    closer.join(5)
    assert [f.result(0)[0] for f in futures] == [0, 1, 2, 3, 4]


def test_queue_delay_waits_for_company_only_when_configured(model: FakeModel) -> None:
    for delay, low, high in ((0.0, 0.0, 0.015), (0.05, 0.04, 0.5)):
        queue = BatchQueue(model, max_batch_size=8, max_queue_size=64, max_queue_delay=delay)
        started = time.perf_counter()
        queue.submit([image(1)])[0].result(5)
        assert low <= time.perf_counter() - started <= high, delay
        queue.close()


def test_a_caller_giving_up_on_an_expired_request_does_not_stop_the_worker(model: FakeModel) -> None:
    queue = BatchQueue(model, max_batch_size=8, max_queue_size=64)
    hold_worker(queue, model)
    (gave_up,) = queue.submit([image(3)], deadline=time.monotonic() + 0.01)
    time.sleep(0.02)
    assert gave_up.cancel()  # what the gRPC handler does when its deadline passes first
    model.release.set()
    (later,) = queue.submit([image(4)])
    assert later.result(5)[0] == 4
    queue.close()
