"""server.batching.Batcher with a fake model: results, coalescing, splitting, bounds, deadlines, failures, shutdown."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Awaitable, Callable, Sequence

import numpy as np
import pytest

from server.batching import Batcher, BatchObserver
from server.errors import DeadlineExpired, Overloaded, ShuttingDown

WAIT = 5.0  # seconds a test waits for something that should happen almost at once


def images(*numbers: float) -> np.ndarray:
    """Images that carry their number in every pixel, so the fake model's output row names them."""
    return np.stack([np.full((1, 28, 28), n, np.float32) for n in numbers])


class FakeModel:
    """Returns each image's first 10 pixels as its row and records every batch; `hold()` stops it inside a run."""

    def __init__(self, fail_first: Exception | None = None) -> None:
        self.batches: list[list[float]] = []
        self.parts: list[int] = []  # how many job slices each batch was assembled from
        self.running = threading.Event()
        self.released = threading.Event()
        self.released.set()
        self.fail_first = fail_first
        self.threads: set[str] = set()

    def __call__(self, parts: Sequence[np.ndarray]) -> tuple[np.ndarray]:
        batch = np.concatenate(parts)
        self.threads.add(threading.current_thread().name)
        self.batches.append(batch[:, 0, 0, 0].tolist())
        self.parts.append(len(parts))
        self.running.set()
        assert self.released.wait(WAIT), "test never released the model"
        if self.fail_first is not None and len(self.batches) == 1:
            raise self.fail_first
        return (batch.reshape(len(batch), -1)[:, :10].copy(),)

    def seen(self) -> list[float]:
        return [n for batch in self.batches for n in batch]

    def sizes(self) -> list[int]:
        return [len(batch) for batch in self.batches]

    async def hold(self, batcher: Batcher) -> asyncio.Task:
        """Keep the runner busy inside a run of one image (number -1), so that what is submitted next has to queue."""
        self.released.clear()
        self.running.clear()
        task = asyncio.ensure_future(batcher.classify(images(-1)))
        assert await asyncio.to_thread(self.running.wait, WAIT)
        return task


def run(scenario: Callable[..., Awaitable[None]], model: FakeModel | None = None, **options) -> FakeModel:
    """Run `scenario(batcher, model)` on a fresh event loop with a started batcher, then close it."""
    model = model or FakeModel()
    settings = {"max_batch_size": 8, "max_queue_size": 64, **options}

    async def main() -> None:
        batcher = Batcher(model, **settings)
        batcher.start()
        try:
            await scenario(batcher, model)
        finally:
            model.released.set()
            await batcher.close(WAIT)

    asyncio.run(main())
    return model


def rows(result: tuple[np.ndarray, ...]) -> list[float]:
    return result[0][:, 0].tolist()


def test_each_job_gets_the_output_rows_of_its_own_images() -> None:
    async def scenario(batcher: Batcher, model: FakeModel) -> None:
        held = await model.hold(batcher)
        calls = [asyncio.ensure_future(batcher.classify(images(*(10 * r + i for i in range(3))))) for r in (1, 2, 3)]
        await asyncio.sleep(0.01)
        model.released.set()
        for r, call in enumerate(calls, start=1):
            np.testing.assert_array_equal((await call)[0], np.repeat([[10 * r], [10 * r + 1], [10 * r + 2]], 10, 1))
        await held
        assert model.batches == [[-1], [10, 11, 12, 20, 21, 22, 30, 31, 32]]
        assert model.parts == [1, 3]  # three jobs, not nine images, went into the second batch

    run(scenario, max_batch_size=16)


def test_requests_submitted_while_a_batch_runs_are_coalesced_into_the_next_one() -> None:
    async def scenario(batcher: Batcher, model: FakeModel) -> None:
        held = await model.hold(batcher)
        calls = [asyncio.ensure_future(batcher.classify(images(n))) for n in range(5)]
        await asyncio.sleep(0.01)
        model.released.set()
        assert [rows(await call) for call in calls] == [[0], [1], [2], [3], [4]]
        await held
        assert model.sizes() == [1, 5]

    run(scenario, max_batch_size=16)


def test_a_large_job_is_split_across_batches_and_answered_whole() -> None:
    async def scenario(batcher: Batcher, model: FakeModel) -> None:
        held = await model.hold(batcher)
        small = asyncio.ensure_future(batcher.classify(images(100)))
        large = asyncio.ensure_future(batcher.classify(images(*range(8))))
        await asyncio.sleep(0.01)
        model.released.set()
        assert rows(await small) == [100] and rows(await large) == list(range(8))
        await held
        assert model.sizes() == [1, 3, 3, 3] and model.seen() == [-1, 100, 0, 1, 2, 3, 4, 5, 6, 7]

    run(scenario, max_batch_size=3)


def test_the_model_runs_on_the_runner_thread_not_the_event_loop() -> None:
    model = run(lambda batcher, model: batcher.classify(images(1)))
    assert model.threads == {"batch-runner"}


def test_an_inline_engine_runs_on_the_event_loop() -> None:
    model = run(lambda batcher, model: batcher.classify(images(1)), inline=True)
    assert model.threads == {threading.main_thread().name}


def test_a_full_queue_refuses_a_submission_at_once() -> None:
    async def scenario(batcher: Batcher, model: FakeModel) -> None:
        held = await model.hold(batcher)  # the image being run no longer counts: the queue is empty
        queued = [asyncio.ensure_future(batcher.classify(images(n))) for n in range(4)]
        await asyncio.sleep(0)
        started = time.monotonic()
        with pytest.raises(Overloaded, match="limit of 4"):
            batcher.submit(images(99))
        assert time.monotonic() - started < 0.5 and batcher.depth() == 4
        model.released.set()
        await asyncio.gather(held, *queued)
        assert 99 not in model.seen()

    run(scenario, max_queue_size=4)


def test_a_multi_image_submission_that_does_not_fit_is_refused_whole() -> None:
    async def scenario(batcher: Batcher, model: FakeModel) -> None:
        held = await model.hold(batcher)
        first = asyncio.ensure_future(batcher.classify(images(1, 2)))
        await asyncio.sleep(0)
        with pytest.raises(Overloaded):
            batcher.submit(images(50, 51, 52))
        assert batcher.depth() == 2
        fits = asyncio.ensure_future(batcher.classify(images(3, 4)))
        model.released.set()
        assert rows(await fits) == [3, 4]
        await asyncio.gather(held, first)
        assert model.seen() == [-1, 1, 2, 3, 4]

    run(scenario, max_queue_size=4)


def test_a_job_whose_deadline_passes_while_queued_is_expired_and_never_run() -> None:
    dropped: list[tuple[int, int]] = []

    async def scenario(batcher: Batcher, model: FakeModel) -> None:
        held = await model.hold(batcher)
        late = asyncio.ensure_future(batcher.classify(images(7, 8), deadline=time.monotonic() + 0.02))
        patient = asyncio.ensure_future(batcher.classify(images(9), deadline=time.monotonic() + 60))
        with pytest.raises(DeadlineExpired):
            await late  # answered at its deadline, while the model is still busy
        model.released.set()
        assert rows(await patient) == [9]
        await held
        assert model.batches == [[-1], [9]]
        assert dropped == [(2, 0)]

    run(scenario, observer=BatchObserver(on_dropped=lambda expired, cancelled: dropped.append((expired, cancelled))))


def test_a_caller_cancelled_while_queued_has_its_images_dropped_unrun() -> None:
    dropped: list[tuple[int, int]] = []

    async def scenario(batcher: Batcher, model: FakeModel) -> None:
        held = await model.hold(batcher)
        gone = asyncio.ensure_future(batcher.classify(images(5, 6)))
        kept = asyncio.ensure_future(batcher.classify(images(7)))
        await asyncio.sleep(0)
        gone.cancel()
        model.released.set()
        assert rows(await kept) == [7]
        await held
        assert gone.cancelled() and model.batches == [[-1], [7]]
        assert dropped == [(0, 2)]

    run(scenario, observer=BatchObserver(on_dropped=lambda expired, cancelled: dropped.append((expired, cancelled))))


def test_the_observer_hears_of_batches_waits_and_queue_depth() -> None:
    batches: list[tuple[int, float]] = []
    waits: list[float] = []
    depths: list[int] = []
    observer = BatchObserver(
        on_batch=lambda n, s: batches.append((n, s)), on_waits=lambda w: waits.extend(w), on_depth=depths.append
    )

    async def scenario(batcher: Batcher, model: FakeModel) -> None:
        held = await model.hold(batcher)
        calls = [asyncio.ensure_future(batcher.classify(images(n))) for n in range(3)]
        await asyncio.sleep(0.05)
        model.released.set()
        await asyncio.gather(held, *calls)

    run(scenario, observer=observer)
    assert [n for n, _ in batches] == [1, 3]
    assert batches[0][1] >= 0.05  # the held run lasted at least the sleep
    assert len(waits) == 4 and all(w >= 0.05 for w in waits[1:])  # the three queued behind the held run
    assert depths == [1, 0, 1, 2, 3, 0]


def test_a_failing_run_fails_only_its_own_jobs_and_the_runner_carries_on() -> None:
    boom = RuntimeError("model crashed")

    async def scenario(batcher: Batcher, model: FakeModel) -> None:
        model.released.clear()
        doomed = asyncio.ensure_future(batcher.classify(images(1, 2)))
        assert await asyncio.to_thread(model.running.wait, WAIT)
        meanwhile = asyncio.ensure_future(batcher.classify(images(3)))
        await asyncio.sleep(0)
        model.released.set()
        with pytest.raises(RuntimeError, match="model crashed"):
            await doomed
        assert rows(await meanwhile) == [3]
        assert rows(await batcher.classify(images(4))) == [4]
        assert model.batches == [[1, 2], [3], [4]]

    run(scenario, FakeModel(fail_first=boom))


def test_close_finishes_queued_work_then_refuses_new_work() -> None:
    async def scenario(batcher: Batcher, model: FakeModel) -> None:
        held = await model.hold(batcher)
        queued = asyncio.ensure_future(batcher.classify(images(0, 1, 2)))
        await asyncio.sleep(0)
        closing = asyncio.ensure_future(batcher.close(WAIT))
        await asyncio.sleep(0.01)
        with pytest.raises(ShuttingDown):
            batcher.submit(images(99))
        assert not closing.done()  # still draining
        model.released.set()
        await closing
        assert rows(await queued) == [0, 1, 2]
        await held
        assert 99 not in model.seen()

    run(scenario)


async def timed(batcher: Batcher, n: float) -> float:
    started = time.monotonic()
    assert rows(await batcher.classify(images(n))) == [n]
    return time.monotonic() - started


def test_with_a_queue_delay_a_lone_request_waits_that_long_for_company() -> None:
    async def scenario(batcher: Batcher, model: FakeModel) -> None:
        assert 0.15 <= await timed(batcher, 1) < 1.5

    run(scenario, max_queue_delay=0.2)


def test_requests_arriving_within_the_queue_delay_share_a_batch() -> None:
    async def scenario(batcher: Batcher, model: FakeModel) -> None:
        first = asyncio.ensure_future(batcher.classify(images(1)))
        await asyncio.sleep(0.05)
        second = asyncio.ensure_future(batcher.classify(images(2)))
        assert rows(await first) + rows(await second) == [1, 2]
        assert model.sizes() == [2]

    run(scenario, max_queue_delay=0.3)


def test_a_full_batch_does_not_wait_for_the_queue_delay() -> None:
    async def scenario(batcher: Batcher, model: FakeModel) -> None:
        started = time.monotonic()
        assert rows(await batcher.classify(images(0, 1, 2, 3))) == [0, 1, 2, 3]
        assert time.monotonic() - started < 1.0

    run(scenario, max_batch_size=4, max_queue_delay=2.0)


def test_without_a_queue_delay_a_lone_request_runs_at_once() -> None:
    async def scenario(batcher: Batcher, model: FakeModel) -> None:
        assert await timed(batcher, 1) < 0.1

    run(scenario, max_queue_delay=0.0)


def test_a_caller_whose_deadline_passes_first_does_not_stop_the_batcher() -> None:
    async def scenario(batcher: Batcher, model: FakeModel) -> None:
        held = await model.hold(batcher)
        with pytest.raises(DeadlineExpired):
            await batcher.classify(images(3), deadline=time.monotonic() + 0.01)
        model.released.set()
        await held
        assert rows(await batcher.classify(images(4))) == [4]
        assert 3 not in model.seen()

    run(scenario)


def test_a_function_runs_on_the_runner_thread_between_batches_and_its_errors_come_back() -> None:
    """The backend's warm-up goes this way: ONNX Runtime keeps a CUDA graph per thread."""

    async def scenario(batcher: Batcher, model: FakeModel) -> None:
        assert await batcher.run_in_runner(lambda: threading.current_thread().name) == "batch-runner"
        with pytest.raises(ZeroDivisionError):
            await batcher.run_in_runner(lambda: 1 / 0)
        assert rows(await batcher.classify(images(1))) == [1]

    run(scenario)
