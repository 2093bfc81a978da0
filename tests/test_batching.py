"""server.engine.batching.Batcher with a fake model: results, coalescing, splitting, bounds, deadlines,
failures, shutdown."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Awaitable, Callable, Sequence

import numpy as np
import pytest

from server.engine import batching
from server.engine.batching import MIN_RUNS_TO_JUDGE, BatchCost, Batcher, BatchObserver, StandingQueue
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


def run(
    scenario: Callable[..., Awaitable[None]], model: FakeModel | None = None, learnt: bool = False, **options
) -> FakeModel:
    """Run `scenario(batcher, model)` on a fresh event loop with a started batcher, then close it. `learnt`: the
    batcher has already learnt that the engine answers at once (its first batches are not held small to learn)."""
    model = model or FakeModel()
    settings = {"max_batch_size": 8, "max_queue_size": 64, **options}

    async def main() -> None:
        batcher = Batcher(model, **settings)
        if learnt:
            for _ in range(MIN_RUNS_TO_JUDGE):
                batcher.cost.observe(1, 0.0)
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

    run(scenario, max_batch_size=16, learnt=True)


def test_requests_submitted_while_a_batch_runs_are_coalesced_into_the_next_one() -> None:
    async def scenario(batcher: Batcher, model: FakeModel) -> None:
        held = await model.hold(batcher)
        calls = [asyncio.ensure_future(batcher.classify(images(n))) for n in range(5)]
        await asyncio.sleep(0.01)
        model.released.set()
        assert [rows(await call) for call in calls] == [[0], [1], [2], [3], [4]]
        await held
        assert model.sizes() == [1, 5]

    run(scenario, max_batch_size=16, learnt=True)


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

    run(scenario, max_batch_size=3, learnt=True)


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
        with pytest.raises(Overloaded, match="limit of 4"):
            batcher.submit(images(99))  # raised by the call itself, while the batch that would make room still runs
        assert not held.done() and model.sizes() == [1] and batcher.depth() == 4
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


def test_the_runner_starts_the_next_batch_itself_while_the_event_loop_is_busy() -> None:
    """The engine must not sit idle waiting for a loop that is busy with other calls."""
    second_started = threading.Event()

    class Recorder(FakeModel):
        def __call__(self, parts: Sequence[np.ndarray]) -> tuple[np.ndarray]:
            if len(self.batches) == 1:
                second_started.set()
            return super().__call__(parts)

    async def scenario(batcher: Batcher, model: FakeModel) -> None:
        held = await model.hold(batcher)
        queued = asyncio.ensure_future(batcher.classify(images(1, 2)))
        await asyncio.sleep(0)
        model.released.set()
        assert second_started.wait(WAIT)  # blocks the loop: only the runner itself can have started batch 2
        assert rows(await queued) == [1, 2]
        await held

    assert run(scenario, Recorder()).batches == [[-1], [1, 2]]


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

    run(scenario, observer=observer, learnt=True)
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

    run(scenario, FakeModel(fail_first=boom), learnt=True)


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


def test_with_a_queue_delay_a_lone_request_waits_that_long_for_company() -> None:
    """Observed on the event loop's own timers, which fire in the order of their times however late the loop runs:
    one set just before the delay ends finds the request still queued, one just after finds it handed to the runner."""

    async def scenario(batcher: Batcher, model: FakeModel) -> None:
        loop = asyncio.get_running_loop()
        job = batcher.submit(images(1))
        assert batcher.depth() == 1  # not dispatched at once, although the runner is idle
        before, after = loop.create_future(), loop.create_future()
        for seen, offset in ((before, -0.02), (after, +0.02)):  # loop.time() is time.monotonic()
            loop.call_at(job.enqueued_at + 0.2 + offset, lambda seen=seen: seen.set_result(batcher.depth()))
        assert await asyncio.wait_for(asyncio.gather(before, after), 30) == [1, 0]  # (a hang guard, not the measure)
        assert rows(await job.future) == [1]
        assert job.run_started - job.enqueued_at >= 0.2

    run(scenario, max_queue_delay=0.2)


def test_requests_arriving_within_the_queue_delay_share_a_batch() -> None:
    async def scenario(batcher: Batcher, model: FakeModel) -> None:
        first = asyncio.ensure_future(batcher.classify(images(1)))
        await asyncio.sleep(0.05)
        second = asyncio.ensure_future(batcher.classify(images(2)))
        assert rows(await first) + rows(await second) == [1, 2]
        assert model.sizes() == [2]

    run(scenario, max_queue_delay=0.3, learnt=True)


def test_a_full_batch_does_not_wait_for_the_queue_delay() -> None:
    async def scenario(batcher: Batcher, model: FakeModel) -> None:
        # a full batch runs at once; waiting out the delay would take a minute (the wait_for's limit: half of it)
        assert rows(await asyncio.wait_for(batcher.classify(images(0, 1, 2, 3)), 30)) == [0, 1, 2, 3]
        assert model.sizes() == [4]

    run(scenario, max_batch_size=4, max_queue_delay=60.0, learnt=True)


def test_without_a_queue_delay_a_lone_request_runs_at_once() -> None:
    async def scenario(batcher: Batcher, model: FakeModel) -> None:
        model.released.clear()
        job = batcher.submit(images(1))
        assert batcher.depth() == 0 and job.taken == 1  # handed to the runner within the call: no timer, no loop turn
        assert await asyncio.to_thread(model.running.wait, WAIT)  # and the runner ran it meanwhile
        model.released.set()
        assert rows(await job.future) == [1]

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


# --- the batch cost model -----------------------------------------------------------------------------------------


def test_the_cost_of_a_batch_is_zero_before_any_run_was_seen() -> None:
    cost = BatchCost()
    assert cost.runs == 0 and cost.seconds(1) == 0.0 and cost.seconds(256) == 0.0


def test_with_one_batch_size_seen_the_cost_is_taken_as_proportional_to_the_images() -> None:
    cost = BatchCost()
    cost.observe(4, 0.4)
    assert cost.runs == 1
    assert cost.seconds(4) == pytest.approx(0.4)
    assert cost.seconds(8) == pytest.approx(0.8) and cost.seconds(1) == pytest.approx(0.1)
    cost.observe(4, 0.4)
    assert cost.seconds(2) == pytest.approx(0.2)  # still one size: still proportional


def test_with_several_batch_sizes_seen_the_cost_is_a_fixed_part_plus_a_part_per_image() -> None:
    cost = BatchCost()
    for n in (1, 9, 4, 16, 2) * 4:
        cost.observe(n, 0.010 + 0.002 * n)  # exactly 10 ms per batch plus 2 ms per image
    for n in (1, 8, 32, 100):
        assert cost.seconds(n) == pytest.approx(0.010 + 0.002 * n, rel=1e-6)


def test_the_cost_follows_the_recent_runs_when_the_engine_gets_faster() -> None:
    cost = BatchCost()
    cost.observe(8, 0.8)
    for _ in range(200):
        cost.observe(8, 0.08)
    assert cost.seconds(8) == pytest.approx(0.08, rel=0.01)


def test_the_predicted_cost_is_never_negative() -> None:
    cost = BatchCost()
    cost.observe(1, 1.0)
    cost.observe(100, 0.01)  # larger batch, shorter run: a negative slope must not predict negative time
    assert all(cost.seconds(n) >= 0.0 for n in (0, 1, 10, 100, 1000))


class EngineClock:
    """Stands in for the batching module's `time`: its perf_counter, with which the batcher times each run, moves only
    when a fake engine says a run took so long; everything else is the real `time`. The engine's speed as the batcher
    sees it is then exactly what the test says, however busy the machine is."""

    def __init__(self) -> None:
        self.now = 1000.0

    def perf_counter(self) -> float:
        return self.now

    def __getattr__(self, name: str):
        return getattr(time, name)


class TimedModel(FakeModel):
    """A fake engine whose every run "takes" `per_batch + per_image * images` seconds on an EngineClock."""

    def __init__(self, clock: EngineClock, per_batch: float = 0.0, per_image: float = 0.0) -> None:
        super().__init__()
        self.clock, self.per_batch, self.per_image = clock, per_batch, per_image

    def __call__(self, parts: Sequence[np.ndarray]) -> tuple[np.ndarray]:
        result = super().__call__(parts)
        self.clock.now += self.per_batch + self.per_image * sum(map(len, parts))
        return result


@pytest.fixture
def engine_clock(monkeypatch: pytest.MonkeyPatch) -> EngineClock:
    clock = EngineClock()
    monkeypatch.setattr(batching, "time", clock)
    return clock


def test_the_batcher_learns_the_cost_of_its_batches_from_the_runs(engine_clock: EngineClock) -> None:
    async def scenario(batcher: Batcher, model: FakeModel) -> None:
        assert batcher.cost.seconds(2) == 0.0
        await batcher.classify(images(1, 2))
        assert batcher.cost.runs == 1
        assert batcher.cost.seconds(2) == pytest.approx(0.05)  # the run's own time
        assert batcher.cost.seconds(4) == pytest.approx(2 * batcher.cost.seconds(2))

    run(scenario, TimedModel(engine_clock, per_batch=0.05))


def test_while_the_engines_speed_is_unknown_batches_after_the_first_are_held_to_a_short_run(
    engine_clock: EngineClock,
) -> None:
    """A flood reaching a fresh server of a slow engine: after one long batch, batches of about LEARNING_RUN_S."""

    async def scenario(batcher: Batcher, model: FakeModel) -> None:
        model.released.clear()  # the first call's run lasts until the whole flood has arrived
        calls = [asyncio.ensure_future(batcher.classify(images(n))) for n in range(30)]
        assert await asyncio.to_thread(model.running.wait, WAIT)
        await asyncio.sleep(0)
        assert batcher.depth() == 29
        model.released.set()
        await asyncio.gather(*calls)
        assert batcher.cost.runs < MIN_RUNS_TO_JUDGE and not batcher.judged()  # all of it ran while learning
        # the first call ran alone (the runner was idle); then 50 ms (5 images) each until judged, not 16
        assert model.sizes() == [1, 5, 5, 5, 5, 5, 4]

    run(scenario, TimedModel(engine_clock, per_image=0.01), max_batch_size=16, max_queue_size=64)


# --- admission control ------------------------------------------------------------------------------------------------


def teach(batcher: Batcher, seconds_per_image: float) -> None:
    """Make the batcher believe each image takes `seconds_per_image` (as if it had seen enough such runs to judge)."""
    for _ in range(MIN_RUNS_TO_JUDGE):
        batcher.cost.observe(1, seconds_per_image)


def stand(batcher: Batcher) -> None:
    """Make the queue count as standing, as if every wait for longer than an interval had been above the target."""
    target, interval, now = batcher.queue_target(), batcher.standing_interval(), time.monotonic()
    batcher.standing.observe(target * 2, now - interval - 0.01, target, interval)
    batcher.standing.observe(target * 2, now, target, interval)
    assert batcher.standing.standing


def test_a_queue_stands_once_every_wait_for_a_whole_interval_was_above_the_target() -> None:
    queue = StandingQueue()
    queue.observe(0.5, 10.0, target=0.1, interval=1.0)
    queue.observe(0.5, 10.9, target=0.1, interval=1.0)
    assert not queue.standing  # above the target for 0.9 s: could still be a burst draining
    queue.observe(0.5, 11.0, target=0.1, interval=1.0)
    assert queue.standing and queue.since == 11.0


def test_one_wait_under_the_target_restarts_the_interval() -> None:
    queue = StandingQueue()
    queue.observe(0.5, 10.0, target=0.1, interval=1.0)
    queue.observe(0.05, 10.5, target=0.1, interval=1.0)  # the queue drained below the target once
    queue.observe(0.5, 10.6, target=0.1, interval=1.0)
    queue.observe(0.5, 11.5, target=0.1, interval=1.0)
    assert not queue.standing  # above again only since 10.6
    queue.observe(0.5, 11.6, target=0.1, interval=1.0)
    assert queue.standing


def test_a_standing_queue_ends_only_at_a_wait_under_half_the_target() -> None:
    """Admission holds the waits of a standing queue just under the target: ending there would reopen the gate."""
    queue = StandingQueue()
    queue.observe(0.5, 10.0, target=0.1, interval=1.0)
    queue.observe(0.5, 11.0, target=0.1, interval=1.0)
    queue.observe(0.09, 11.1, target=0.1, interval=1.0)
    queue.observe(0.06, 11.2, target=0.1, interval=1.0)
    assert queue.standing
    queue.observe(0.04, 11.3, target=0.1, interval=1.0)
    assert not queue.standing and queue.since is None


def test_the_auto_target_is_sixteen_full_batches_of_the_engine_within_5_to_500_ms() -> None:
    async def scenario(batcher: Batcher, model: FakeModel) -> None:
        assert batcher.queue_target() == pytest.approx(0.005)  # nothing measured yet
        teach(batcher, 0.002)  # a full batch of 8 "takes 16 ms"
        assert batcher.queue_target() == pytest.approx(16 * 0.016)
        assert batcher.standing_interval() == pytest.approx(0.100)  # two full batches are shorter than 100 ms
        teach(batcher, 0.1)  # a full batch "takes 0.8 s": sixteen would be 12.8 s
        assert batcher.queue_target() == pytest.approx(0.5)

    run(scenario, max_batch_size=8)


def test_a_stall_that_lengthens_every_wait_of_a_closed_loop_is_not_a_standing_queue() -> None:
    """A machine that pauses (a slow run, a stolen CPU) makes each of a closed loop's few queued calls wait long, but
    queues no more work: only waits with work still queued behind them count towards a standing queue."""

    class StallingModel(FakeModel):
        runs = 0

        def __call__(self, parts: Sequence[np.ndarray]) -> tuple[np.ndarray]:
            self.runs += 1
            if self.runs <= 6:
                time.sleep(0.08)  # six runs stall 80 ms each, though the engine answers in 1 ms
            return super().__call__(parts)

    class Recording(StandingQueue):
        ever = False

        def observe(self, wait: float, now: float, target: float, interval: float) -> None:
            super().observe(wait, now, target, interval)
            self.ever = self.ever or self.standing

    async def scenario(batcher: Batcher, model: FakeModel) -> None:
        for _ in range(200):  # a long record of 1 ms runs: the stall moves the learnt cost little
            batcher.cost.observe(1, 0.001)
        batcher.standing = Recording()

        async def client(first: float) -> None:  # one call in flight at a time, as a closed-loop user sends
            for n in range(10):
                await batcher.classify(images(first + n))

        await asyncio.gather(client(0), client(100), client(200))  # each waits for the other two: 160 ms in the stall
        assert model.runs >= 30
        assert not batcher.standing.ever

    run(scenario, StallingModel(), max_batch_size=1, queue_target=0.1)


def test_the_auto_target_holds_eight_typical_requests_when_they_are_larger_than_full_batches() -> None:
    """Four clients each sending 256 images to a CPU (batches of 32) keep about 0.6 s queued: a closed loop, not
    overload. Batches still follow the full-batch target alone, so small calls queued between large ones wait little."""

    async def scenario(batcher: Batcher, model: FakeModel) -> None:
        teach(batcher, 0.0005)  # a full batch of 32 "takes 16 ms": sixteen of them, 256 ms
        batcher.request_images.observe(1)
        assert batcher.queue_target() == pytest.approx(16 * 0.016)  # single images: the full batches decide
        for _ in range(60):
            batcher.request_images.observe(256)  # requests of 256 images now, each eight batches
        assert batcher.request_images.mean() >= 240
        assert batcher.queue_target() >= 8 * 0.120  # eight such requests' work may stand: about 1 s
        assert batcher.batch_limit() == 32  # batch sizes follow the full batches' 256 ms / 8, not the 1 s
        for _ in range(600):
            batcher.request_images.observe(256 * 100)  # absurd requests: the target stops at 5 s
        assert batcher.queue_target() == pytest.approx(5.0)

    run(scenario, max_batch_size=32, max_queue_size=100_000)


def test_no_refusal_is_predicted_before_the_engines_speed_is_known() -> None:
    """A new model version's first runs (cold, on a machine busy loading it) once made a steady stream look like
    an overload: 117 calls were refused during a hot reload."""

    async def scenario(batcher: Batcher, model: FakeModel) -> None:
        for _ in range(MIN_RUNS_TO_JUDGE - 1):
            batcher.cost.observe(1, 0.5)
        held = await model.hold(batcher)
        queued = asyncio.ensure_future(batcher.classify(images(*range(10, 20))))  # "5 s" of work ahead
        await asyncio.sleep(0)
        patient = asyncio.ensure_future(batcher.classify(images(3), deadline=time.monotonic() + WAIT))
        await asyncio.sleep(0)
        assert batcher.depth() == 11  # admitted although "5 s" is past its deadline: the speed is not known
        model.released.set()
        await asyncio.gather(held, queued, patient)

    run(scenario, max_batch_size=8, queue_target=0.001)


def test_a_slow_first_run_is_averaged_away_not_taken_for_the_engines_speed() -> None:
    cost = BatchCost()
    cost.observe(4, 0.4)  # cold: 100 ms per image
    for _ in range(9):
        cost.observe(4, 0.04)  # warm: 10 ms per image
    assert cost.seconds(4) == pytest.approx((0.4 + 9 * 0.04) / 10)  # the mean of the first runs, not 0.4 * 0.6


def test_forgetting_the_costs_starts_learning_afresh_and_the_queue_no_longer_stands() -> None:
    async def scenario(batcher: Batcher, model: FakeModel) -> None:
        teach(batcher, 0.5)
        stand(batcher)
        batcher.forget_costs()
        assert batcher.cost.runs == 0 and not batcher.standing.standing and not batcher.judged()

    run(scenario, queue_target=1.0)


def test_an_idle_batcher_reports_no_expected_wait_and_admits_whatever_the_estimate() -> None:
    async def scenario(batcher: Batcher, model: FakeModel) -> None:
        teach(batcher, 100.0)  # a batch would take "100 s per image"
        stand(batcher)
        assert batcher.expected_wait() == 0.0
        result = await batcher.classify(images(1, 2), deadline=time.monotonic() + WAIT)
        assert rows(result) == [1, 2]

    run(scenario, queue_target=0.001)


def test_with_a_standing_queue_a_request_that_would_wait_longer_than_the_target_is_refused_at_once() -> None:
    async def scenario(batcher: Batcher, model: FakeModel) -> None:
        teach(batcher, 0.2)
        held = await model.hold(batcher)  # a 1-image batch "of 0.2 s" is running
        queued = asyncio.ensure_future(batcher.classify(images(*range(10, 20))))  # 10 images "of 2 s" ahead
        await asyncio.sleep(0)
        assert 2.0 <= batcher.expected_wait() <= 2.2
        stand(batcher)
        with pytest.raises(Overloaded, match="over the target of 1000.0 ms") as refused:
            batcher.submit(images(5))  # raised by the call itself, while the batch ahead still runs
        assert not held.done() and model.sizes() == [1]
        assert refused.value.retry_after is not None and 1.9 <= refused.value.retry_after <= 2.2
        assert batcher.depth() == 10  # nothing of the refused request was queued
        model.released.set()
        await asyncio.gather(held, queued)
        assert 5 not in model.seen()

    run(scenario, queue_target=1.0)


def test_a_queue_above_the_target_that_does_not_stand_refuses_nothing() -> None:
    """A burst: far more queued than the target allows, but it has not stood an interval."""

    async def scenario(batcher: Batcher, model: FakeModel) -> None:
        teach(batcher, 0.01)  # 100 images/s
        held = await model.hold(batcher)
        burst = [asyncio.ensure_future(batcher.classify(images(n))) for n in range(40)]  # 0.4 s of work at once
        await asyncio.sleep(0)
        assert batcher.depth() == 40 and not batcher.standing.standing
        model.released.set()
        assert sorted(rows(r)[0] for r in await asyncio.gather(*burst)) == list(range(40))
        await held

    run(scenario, max_batch_size=8, queue_target=0.005)


def test_a_load_that_keeps_the_queue_above_the_target_makes_it_stand_and_is_shed_to_the_target() -> None:
    """The real thing, timed by a real (slow) engine: 30 ms per batch of 2 and an open stream of 2 images every 10 ms,
    three times what it can run. The queue stands once the waits have stayed above the 250 ms target for 100 ms;
    from then on what would wait longer than the target is refused, and what was admitted waits about the target."""

    class SlowModel(FakeModel):
        def __call__(self, parts: Sequence[np.ndarray]) -> tuple[np.ndarray]:
            time.sleep(0.03)
            return super().__call__(parts)

    async def scenario(batcher: Batcher, model: FakeModel) -> None:
        for _ in range(MIN_RUNS_TO_JUDGE):  # learn the speed from real runs
            await batcher.classify(images(0, 0))
        calls = []
        for n in range(100):
            calls.append(asyncio.ensure_future(batcher.classify(images(n, n))))
            await asyncio.sleep(0.01)
        assert batcher.standing.standing
        results = await asyncio.gather(*calls, return_exceptions=True)
        refused = [r for r in results if isinstance(r, Overloaded)]
        assert 30 <= len(refused) <= 85, len(refused)  # most of what is beyond what the engine runs
        assert all("over the target of 250.0 ms" in str(r) and r.retry_after for r in refused), {
            str(r) for r in refused
        }
        assert not [r for r in results if isinstance(r, BaseException) and not isinstance(r, Overloaded)]
        assert not batcher.standing.standing  # drained: the last batch emptied the queue

    run(scenario, SlowModel(), max_batch_size=2, max_queue_size=512, queue_target=0.25)


def test_refused_calls_coming_straight_back_do_not_read_as_more_load() -> None:
    """Refusals add no wait: once the queue drains below the target, the next request is admitted however many
    refused calls came back meanwhile."""

    async def scenario(batcher: Batcher, model: FakeModel) -> None:
        teach(batcher, 0.2)
        held = await model.hold(batcher)
        queued = asyncio.ensure_future(batcher.classify(images(*range(10, 20))))
        await asyncio.sleep(0)
        stand(batcher)
        for _ in range(1000):  # a client that retries at once, a thousand times
            with pytest.raises(Overloaded):
                batcher.submit(images(5))
        model.released.set()
        await asyncio.gather(held, queued)  # the queue drains
        assert not batcher.standing.standing
        assert rows(await batcher.classify(images(6))) == [6]

    run(scenario, queue_target=1.0)


def test_a_busy_batcher_admits_what_will_start_within_the_target() -> None:
    async def scenario(batcher: Batcher, model: FakeModel) -> None:
        teach(batcher, 0.01)
        held = await model.hold(batcher)
        stand(batcher)
        call = asyncio.ensure_future(batcher.classify(images(5, 6)))
        await asyncio.sleep(0)
        assert batcher.depth() == 2
        model.released.set()
        assert rows(await call) == [5, 6]
        await held

    run(scenario, queue_target=5.0)


def test_before_any_run_was_timed_a_busy_batcher_admits() -> None:
    async def scenario(batcher: Batcher, model: FakeModel) -> None:
        held = await model.hold(batcher)  # the first run ever: no cost known yet
        assert batcher.expected_wait() == 0.0
        call = asyncio.ensure_future(batcher.classify(images(3), deadline=time.monotonic() + WAIT))
        await asyncio.sleep(0)
        model.released.set()
        assert rows(await call) == [3]
        await held

    run(scenario, queue_target=0.001)


def test_with_the_target_off_and_no_deadline_a_busy_batcher_admits_however_long_the_wait() -> None:
    async def scenario(batcher: Batcher, model: FakeModel) -> None:
        teach(batcher, 1000.0)
        held = await model.hold(batcher)
        batcher.standing.standing = True  # even a queue that stands refuses nothing without a target
        call = asyncio.ensure_future(batcher.classify(images(4)))
        await asyncio.sleep(0)
        assert batcher.depth() == 1
        model.released.set()
        assert rows(await call) == [4]
        await held

    run(scenario, queue_target=0.0)


def test_the_expected_wait_counts_the_running_batch_and_every_image_queued_in_full_batches() -> None:
    async def scenario(batcher: Batcher, model: FakeModel) -> None:
        teach(batcher, 0.1)  # a batch of 8 "takes 0.8 s"
        held = await model.hold(batcher)  # 1 image running: at most 0.1 s left
        queued = asyncio.ensure_future(batcher.classify(images(*range(20))))  # 2 full batches and one of 4
        await asyncio.sleep(0)
        assert 2.0 - 0.01 <= batcher.expected_wait() <= 2.1 + 0.01
        model.released.set()
        await asyncio.gather(held, queued)
        assert batcher.expected_wait() == 0.0  # idle again

    run(scenario, max_batch_size=8)


def test_a_request_that_could_not_be_answered_by_its_deadline_is_refused_at_once() -> None:
    async def scenario(batcher: Batcher, model: FakeModel) -> None:
        teach(batcher, 1.0)
        held = await model.hold(batcher)  # about 1 s left of the running batch
        with pytest.raises(Overloaded, match="deadline") as refused:
            batcher.submit(images(7), deadline=time.monotonic() + 0.5)  # raised by the call itself, not at 0.5 s
        assert not held.done() and model.sizes() == [1]
        assert refused.value.retry_after is not None and 0.5 <= refused.value.retry_after <= 1.0
        assert batcher.depth() == 0
        patient = asyncio.ensure_future(batcher.classify(images(8), deadline=time.monotonic() + 30))
        await asyncio.sleep(0)
        assert batcher.depth() == 1  # the same request with time enough is admitted
        model.released.set()
        assert rows(await patient) == [8]
        await held
        assert 7 not in model.seen()

    run(scenario, queue_target=0.0)


def test_the_deadline_check_counts_the_requests_own_run_not_only_its_wait() -> None:
    async def scenario(batcher: Batcher, model: FakeModel) -> None:
        teach(batcher, 0.1)
        held = await model.hold(batcher)  # at most 0.1 s of waiting
        with pytest.raises(Overloaded, match="deadline"):
            batcher.submit(images(*range(8)), deadline=time.monotonic() + 0.5)  # its own batch "takes 0.8 s"
        small = asyncio.ensure_future(batcher.classify(images(1), deadline=time.monotonic() + 0.5 + WAIT))
        await asyncio.sleep(0)
        assert batcher.depth() == 1
        model.released.set()
        assert rows(await small) == [1]
        await held

    run(scenario, max_batch_size=8)


def test_the_deadline_check_counts_every_batch_a_large_request_is_split_into() -> None:
    async def scenario(batcher: Batcher, model: FakeModel) -> None:
        teach(batcher, 0.1)  # a batch of 8 "takes 0.8 s"
        held = await model.hold(batcher)
        # 24 images in batches of 8 need about 0.1 + 3 * 0.8 = 2.5 s: every batch counts, not only the first
        with pytest.raises(Overloaded, match="deadline"):
            batcher.submit(images(*range(24)), deadline=time.monotonic() + 1.5)
        model.released.set()
        await held

    run(scenario, max_batch_size=8, max_queue_size=64)


def test_a_full_queue_refusal_carries_the_expected_wait_as_retry_after() -> None:
    async def scenario(batcher: Batcher, model: FakeModel) -> None:
        teach(batcher, 0.5)
        held = await model.hold(batcher)
        queued = asyncio.ensure_future(batcher.classify(images(1, 2, 3, 4)))
        await asyncio.sleep(0)
        with pytest.raises(Overloaded, match="queue full") as refused:
            batcher.submit(images(9))
        # at most 0.5 s left of the running image, then a batch of 4 "of 2 s"
        assert refused.value.retry_after is not None and 2.0 - 0.01 <= refused.value.retry_after <= 2.5 + 0.01
        model.released.set()
        await asyncio.gather(held, queued)

    run(scenario, max_queue_size=4)


def test_the_cost_of_a_full_batch_is_read_off_the_line_through_the_sizes_that_ran() -> None:
    """A light load runs small batches only; the auto target still needs what a full batch would take."""

    async def scenario(batcher: Batcher, model: FakeModel) -> None:
        for _ in range(20):  # runs of 1 image take 3 ms, runs of 4 take 6 ms: 2 ms fixed + 1 ms per image
            batcher.cost.observe(1, 0.003)
            batcher.cost.observe(4, 0.006)
        assert batcher.cost.seconds(8) == pytest.approx(0.010)
        assert batcher.queue_target() == pytest.approx(16 * 0.010)  # 160 ms, though no batch of 8 ever ran

    run(scenario, max_batch_size=8)


def test_a_batch_grows_only_while_it_still_ends_before_the_earliest_deadline_in_it() -> None:
    """On an engine whose cost is per image, images queued behind a request must not join its batch and make it late."""

    async def scenario(batcher: Batcher, model: FakeModel) -> None:
        teach(batcher, 0.1)  # "0.1 s per image"
        held = await model.hold(batcher)
        urgent = asyncio.ensure_future(batcher.classify(images(1), deadline=time.monotonic() + 0.5))
        await asyncio.sleep(0)
        behind = asyncio.ensure_future(batcher.classify(images(*range(2, 9))))
        await asyncio.sleep(0)
        model.released.set()
        await asyncio.gather(held, urgent, behind)
        assert model.batches[1:] == [[1.0], list(map(float, range(2, 9)))]  # with the 7 behind it "0.8 s": too late

    run(scenario, max_batch_size=8, max_queue_size=64, queue_target=0.0)


def test_without_deadlines_a_batch_takes_all_it_can() -> None:
    async def scenario(batcher: Batcher, model: FakeModel) -> None:
        teach(batcher, 0.1)
        held = await model.hold(batcher)
        calls = [asyncio.ensure_future(batcher.classify(images(n))) for n in range(1, 9)]
        await asyncio.sleep(0)
        model.released.set()
        await asyncio.gather(held, *calls)
        assert model.sizes() == [1, 8]

    run(scenario, max_batch_size=8, queue_target=0.0)


def test_an_engine_whose_cost_is_per_image_runs_batches_that_fit_an_eighth_of_the_target() -> None:
    """1 ms + 4 ms per image (the emulated device): 256-image batches would take a second, twice the target."""

    async def scenario(batcher: Batcher, model: FakeModel) -> None:
        for _ in range(MIN_RUNS_TO_JUDGE):
            batcher.cost.observe(1, 0.005)
            batcher.cost.observe(100, 0.401)
        assert batcher.queue_target() == pytest.approx(0.5)
        assert batcher.batch_limit() == 15  # 1 + 4 x 15 = 61 ms <= 500 / 8 ms
        held = await model.hold(batcher)
        calls = [asyncio.ensure_future(batcher.classify(images(n))) for n in range(40)]
        await asyncio.sleep(0)
        model.released.set()
        await asyncio.gather(held, *calls)
        assert model.sizes() == [1, 15, 15, 10]

    run(scenario, max_batch_size=256, max_queue_size=512)


def test_an_engine_whose_cost_is_per_batch_keeps_its_full_batches() -> None:
    """2 ms + 10 us per image (a GPU): a full batch of 256 takes 4.6 ms, well within an eighth of the target."""

    async def scenario(batcher: Batcher, model: FakeModel) -> None:
        for _ in range(MIN_RUNS_TO_JUDGE):
            batcher.cost.observe(1, 0.00201)
            batcher.cost.observe(256, 0.00456)
        assert batcher.queue_target() == pytest.approx(16 * 0.00456)
        assert batcher.batch_limit() == 256

    run(scenario, max_batch_size=256, max_queue_size=512)


def test_an_engine_whose_fixed_cost_exceeds_the_targets_share_still_runs_full_batches() -> None:
    """3 ms a batch + 10 us an image with a 20 ms target: the fixed cost is paid whatever the batch holds, so
    limiting the batch to what fits in 2.5 ms would cut throughput a hundredfold and save nothing."""

    async def mostly_fixed(batcher: Batcher, model: FakeModel) -> None:
        for _ in range(MIN_RUNS_TO_JUDGE):
            batcher.cost.observe(1, 0.00301)
            batcher.cost.observe(256, 0.00556)
        assert batcher.batch_limit() == 250  # the images' own 2.5 ms

    async def all_fixed(batcher: Batcher, model: FakeModel) -> None:
        for _ in range(MIN_RUNS_TO_JUDGE):
            batcher.cost.observe(1, 0.300)  # no image adds anything
            batcher.cost.observe(256, 0.300)
        assert batcher.batch_limit() == 256

    run(mostly_fixed, max_batch_size=256, max_queue_size=512, queue_target=0.02)
    run(all_fixed, max_batch_size=256, max_queue_size=512, queue_target=0.02)


def test_a_job_too_late_even_alone_does_not_hold_its_batch_to_itself() -> None:
    """After a run that overran, the job at the head cannot meet its deadline whatever happens: the jobs behind it
    still share its batch, instead of every batch running one doomed job."""

    async def scenario(batcher: Batcher, model: FakeModel) -> None:
        teach(batcher, 0.1)  # "100 ms an image"
        held = await model.hold(batcher)
        doomed = asyncio.ensure_future(batcher.classify(images(1), deadline=time.monotonic() + 0.35))
        await asyncio.sleep(0)
        rest = [asyncio.ensure_future(batcher.classify(images(n))) for n in range(2, 9)]
        await asyncio.sleep(0.3)  # the running batch overran: 50 ms left for the head, which needs "100 ms"
        model.released.set()
        await asyncio.gather(held, *rest)
        await asyncio.gather(doomed, return_exceptions=True)
        assert model.sizes()[1:] == [8]  # together, not the doomed one alone and then the rest

    run(scenario, max_batch_size=8, queue_target=0.0)
