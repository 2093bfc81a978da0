"""Dynamic batching: requests queue as whole jobs on the event loop; one runner thread runs the batches.

A job is one request's images as a single array (a 256-image `ClassifyBatch` is one job, not 256
futures). When the runner is idle, a submission is dispatched at once; while it is busy, jobs
pile up and form the next batch, taken in arrival order up to `max_batch_size` images (a large
job is split across batches when it must), so batches grow with load without delaying an idle
server. Jobs whose deadline passed or whose caller went away are dropped when their turn comes.

The runner thread does all per-batch array work (assembling, normalizing, the backend run,
postprocessing) with the GIL mostly released, and hands the batch's results back to the loop in
one callback. When a run ends, the runner takes the next batch from the queue itself (under a
lock) before handing results back: the engine never waits for a busy event loop between two
batches (measured on an emulated device under 5x overload: the loop round trip left it idle 2.6 ms
of every 19). No coroutine sits between a request and its batch: a call costs two wake-ups of the
loop (its arrival and its batch's completion) however many calls share the batch. An engine that
answers in microseconds (`inline=True`: the null backend) runs on the loop itself instead, since
handing it to a thread would cost more than it does.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import logging
import math
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from server import tracing
from server.errors import DeadlineExpired, Overloaded, ShuttingDown

log = logging.getLogger("mnist.batching")

# In the runner thread: the image slices of one batch, in order -> result arrays whose rows follow them.
RunBatch = Callable[[Sequence[np.ndarray]], tuple[np.ndarray, ...]]


@dataclass(frozen=True)
class BatchObserver:
    """Hooks for metrics, called with plain numbers once per batch, from the runner thread or the event loop
    (the batch is taken by whichever is free): they must be thread-safe, as Prometheus metrics are."""

    on_batch: Callable[[int, float], None] = lambda images, seconds: None  # images run, seconds the run took
    on_waits: Callable[[list[float]], None] = lambda seconds: None  # queue wait of each job that started
    on_depth: Callable[[int], None] = lambda depth: None  # images waiting
    on_dropped: Callable[[int, int], None] = lambda expired, cancelled: None  # images never run, and why


class Job:
    """One request's images and where their answers go. Rows are taken in order; the future gets all of them."""

    __slots__ = (
        "images", "deadline", "future", "enqueued_at", "taken", "filled", "results",
        "run_started", "run_ended", "batch_images",
    )  # fmt: skip

    def __init__(self, images: np.ndarray, deadline: float | None, future: asyncio.Future) -> None:
        self.images = images
        self.deadline = deadline  # time.monotonic() by which the answer is needed; None = no deadline
        self.future = future
        self.enqueued_at = time.monotonic()
        self.taken = 0  # rows handed to batches so far
        self.filled = 0  # rows answered so far (when split across batches)
        self.results: tuple[np.ndarray, ...] | None = None
        # Set by the runner (server/tracing.py draws queue wait and inference from them): time.monotonic() when the
        # first batch with its rows started, when the last one ended, and that batch's size.
        self.run_started: float | None = None
        self.run_ended: float | None = None
        self.batch_images = 0

    def __len__(self) -> int:
        return len(self.images)


Slice = tuple[Job, int, int]  # rows [start, stop) of a job that go into one batch


class BatchCost:
    """What a batch of n images takes, learnt from the runs: seconds = fixed + per_image * n (moving averages).

    The admission check uses it to predict a new request's wait from the images queued ahead of it.
    """

    def __init__(self, weight: float = 0.05) -> None:
        self.weight = weight
        self.runs = 0
        self._n = self._t = self._nn = self._nt = 0.0  # moving averages of n, t, n^2, n*t
        self._line = (0.0, 0.0)

    def observe(self, images: int, seconds: float) -> None:
        # A plain mean over the first 1/weight runs, then a moving average: one slow first run (a cold engine, a
        # machine busy loading another model version) cannot pass for the engine's speed.
        w = max(self.weight, 1.0 / (self.runs + 1))
        self._n += w * (images - self._n)
        self._t += w * (seconds - self._t)
        self._nn += w * (images * images - self._nn)
        self._nt += w * (images * seconds - self._nt)
        self.runs += 1
        self._line = self._fit()

    def service_rate(self) -> float:
        """Images per second of run time over the recent batches (infinite before any run)."""
        return self._n / self._t if self.runs and self._t > 0 else math.inf

    def line(self) -> tuple[float, float]:
        """(fixed seconds, seconds per image) of a batch; (0, 0) before any run was seen. Fitted once per run, not
        per question: every admission check asks several times."""
        return self._line

    def _fit(self) -> tuple[float, float]:
        spread = self._nn - self._n * self._n
        if spread > 1e-9:  # batches of several sizes seen: fit the line
            per_image = max(0.0, (self._nt - self._n * self._t) / spread)
            return max(0.0, self._t - per_image * self._n), per_image
        return 0.0, self._t / max(self._n, 1.0)  # one size so far: all per image (an overestimate for larger batches)

    def seconds(self, images: int) -> float:
        """Predicted run time of a batch of `images`; 0 before any run was seen."""
        fixed, per_image = self.line()
        return fixed + per_image * images

    def images_within(self, seconds: float) -> int:
        """The most images whose cost per image adds up to `seconds` (at least 1). The fixed part is paid whatever
        the batch holds, so it limits nothing: an engine whose cost is mostly per batch keeps its full batches."""
        _, per_image = self.line()
        if per_image <= 0:
            return 2**31
        return max(1, math.floor(seconds / per_image + 1e-9))


class RequestSize:
    """Images per admitted request: a plain mean over the first 1/weight requests, then a moving average."""

    def __init__(self, weight: float = 0.05) -> None:
        self.weight = weight
        self.count = 0
        self._mean = 0.0

    def observe(self, images: int) -> None:
        self._mean += max(self.weight, 1.0 / (self.count + 1)) * (images - self._mean)
        self.count += 1

    def mean(self) -> int:
        return max(1, round(self._mean))


MIN_RUNS_TO_JUDGE = 8  # no refusal is predicted before the engine's speed is known from this many real runs
AUTO_TARGET_FULL_BATCHES = 16  # queue_target "auto": a standing queue may hold this many full batches of work ...
AUTO_TARGET_MIN_S = 0.005  # ... never less than this ...
AUTO_TARGET_MAX_S = 0.5  # ... nor more than this (an engine whose full batch takes a second has no use for eight)
AUTO_TARGET_REQUESTS = 8  # ... but at least this many typical requests' work (one ClassifyBatch of 256 on a CPU ...
AUTO_TARGET_REQUESTS_MAX_S = 5.0  # ... is eight batches of 32 on its own), up to this
BATCH_SHARE_OF_TARGET = 8  # a batch holds at most the images whose own cost fits in this share of the target
STANDING_INTERVAL_S = 0.1  # CoDel's interval: how long every wait must stay above the target (or two full batches)
STANDING_EXIT = 0.5  # a standing queue ends at a wait under this share of the target (or when the queue empties)
LEARNING_RUN_S = 0.05  # until the engine's speed is judged, batches after the first are held to about this long


class StandingQueue:
    """CoDel's test for a bad queue (Nichols and Jacobson, "Controlling Queue Delay", ACM Queue 2012), on the batches.

    Each request that starts running reports how long it waited. The queue is *standing* once every wait for a whole
    interval was above the target: a queue that does not drain, which only a load beyond the engine's capacity
    builds. A burst drains within the interval; a closed loop of clients cannot build more queue than it has clients,
    and refusing one of them only brings its call straight back. Refusals add nothing to any wait, so a refused
    call that returns at once does not read as more load. The queue stops standing at the first wait under half
    the target, or when a batch empties it: while it stands, admission holds the waits just under the target, and
    ending there let the queue overshoot to the callers' deadlines between two standing spells (at 5x overload on
    an emulated device, one call in three then missed its deadline)."""

    def __init__(self) -> None:
        self.standing = False
        self.since: float | None = None  # when it began to stand (time.monotonic()), while it stands
        self._above_since: float | None = None

    def observe(self, wait: float, now: float, target: float, interval: float) -> None:
        if wait >= target:
            if self._above_since is None:
                self._above_since = now
            elif not self.standing and now - self._above_since >= interval:
                self.standing, self.since = True, now
            return
        self._above_since = None
        if wait < STANDING_EXIT * target:
            self.standing, self.since = False, None

    def drained(self) -> None:
        self.standing, self.since, self._above_since = False, None, None


AUTO = "auto"


class Batcher:
    def __init__(
        self,
        run_batch: RunBatch,
        max_batch_size: int,
        max_queue_size: int,
        max_queue_delay: float = 0.0,
        observer: BatchObserver | None = None,
        inline: bool = False,
        queue_target: float | str = AUTO,
    ) -> None:
        self._run_batch = run_batch
        self._inline = inline
        self.max_batch_size = max_batch_size
        self.max_queue_size = max_queue_size
        self.max_queue_delay = max_queue_delay
        # Seconds a standing queue may hold before what would wait longer is refused; AUTO (from the engine's measured
        # speed: AUTO_TARGET_FULL_BATCHES full batches) or 0 (never: bounded by size and deadlines only).
        self.queue_target_setting = queue_target
        self.cost = BatchCost()
        self._limit_for: tuple[tuple, int] = ((), 0)  # batch_limit(), and the state it was worked out for
        self.request_images = RequestSize()
        self.standing = StandingQueue()
        self._running_rows = 0  # images in the batch the runner has now
        self._running_since = 0.0
        self._last_run_seconds = 0.0
        self._observer = observer or BatchObserver()
        self._lock = threading.Lock()  # the queue and the busy flag: the loop adds jobs, the runner takes batches
        self._jobs: collections.deque[Job] = collections.deque()
        self._queued = 0  # images queued and not yet taken into a batch
        self._busy = False  # a batch is with the runner
        self._closed = False
        self._timer: asyncio.TimerHandle | None = None  # the queue delay's wake-up
        self._loop: asyncio.AbstractEventLoop | None = None
        self._idle: asyncio.Event | None = None
        self._work: queue.SimpleQueue[list[Slice] | _Call | None] = queue.SimpleQueue()
        self._runner = threading.Thread(target=self._runner_loop, name="batch-runner", daemon=True)

    # --- on the event loop ---------------------------------------------------------------------------

    def start(self) -> None:
        """Bind to the running event loop and start the runner thread."""
        self._loop = asyncio.get_running_loop()
        self._idle = asyncio.Event()
        self._idle.set()
        if not self._inline:
            self._runner.start()

    def submit(self, images: np.ndarray, deadline: float | None = None) -> Job:
        """Queue all of `images` or none of them (Overloaded, ShuttingDown); the job's future gets its result rows."""
        if self._closed or self._loop is None:
            raise ShuttingDown("server is shutting down; retry on another replica")
        count = len(images)
        job = Job(images, deadline, self._loop.create_future())
        with self._lock:
            if self._queued + count > self.max_queue_size:
                raise Overloaded(
                    f"queue full: {self._queued} images waiting, {count} more would exceed the limit of "
                    f"{self.max_queue_size}; retry later",
                    self._expected_wait(),
                )
            self._check_wait(count, deadline)
            self.request_images.observe(count)
            self._jobs.append(job)
            self._queued += count
            depth = self._queued
            idle = not self._busy
        self._idle.clear()
        self._observer.on_depth(depth)
        if idle:
            self._dispatch()
        return job

    async def classify(self, images: np.ndarray, deadline: float | None = None) -> tuple[np.ndarray, ...]:
        """Queue `images` and wait for their result rows, at most until `deadline` (time.monotonic()).

        A caller cancelled while waiting cancels its job: rows not yet running are never run.
        """
        job = self.submit(images, deadline)
        timer = None if deadline is None else self._loop.call_later(max(0.0, deadline - time.monotonic()), _expire, job)
        try:
            return await job.future
        finally:
            if timer is not None:
                timer.cancel()
            if tracing.enabled:
                tracing.record_job(job)

    def forget_costs(self) -> None:
        """Start learning the engine's speed afresh: after warm-up and verification, whose runs are no guide."""
        with self._lock:
            self.cost = BatchCost(self.cost.weight)
            self.standing.drained()

    def depth(self) -> int:
        return self._queued

    def expected_wait(self) -> float:
        """Seconds a request arriving now would wait before its batch starts: the running batch's rest,
        then every image queued ahead of it, in batches of max_batch_size."""
        with self._lock:
            return self._expected_wait()

    def _expected_wait(self) -> float:
        if not self._busy:
            return 0.0
        rest = max(0.0, self._running_since + self.cost.seconds(self._running_rows) - time.monotonic())
        return rest + self._run_time(self._queued)

    def _run_time(self, images: int) -> float:
        """Predicted seconds to run `images` in batches as large as batches get."""
        limit = self.batch_limit()
        full, partial = divmod(images, limit)
        return full * self.cost.seconds(limit) + (self.cost.seconds(partial) if partial else 0.0)

    def batch_limit(self) -> int:
        """Images per batch: max_batch_size, unless the images' own cost would take longer than the queue target allows
        a batch (an eighth of it: BATCH_SHARE_OF_TARGET): then as many as fit in that. An engine whose cost is
        all per image gains nothing from large batches, only latency: with 256-image batches of a 1+4 ms/image
        device, every call waited half a second for the batch ahead and half a second in its own. Until the speed is
        known, batches after the first hold what the runs so far predict to take LEARNING_RUN_S: a flood arriving at
        a fresh server of that device once ran eight 1-second batches before anything could be judged. Worked out
        once per run of the engine (the cost it follows changes only then), not at every admission check."""
        key = (self.cost, self.cost.runs, self.max_batch_size, self.queue_target_setting)
        if self._limit_for[0] != key:
            self._limit_for = (key, self._batch_limit())
        return self._limit_for[1]

    def _batch_limit(self) -> int:
        if not self.cost.runs:
            return self.max_batch_size
        if not self.judged():  # learning the engine's speed: no run much longer than LEARNING_RUN_S after the first
            return min(self.max_batch_size, self.cost.images_within(LEARNING_RUN_S))
        target = self._batches_target()
        if not target:
            return self.max_batch_size
        return min(self.max_batch_size, self.cost.images_within(target / BATCH_SHARE_OF_TARGET))

    def judged(self) -> bool:
        """Whether the engine's speed is known well enough to refuse anything for its predicted wait."""
        return self.cost.runs >= MIN_RUNS_TO_JUDGE

    def queue_target(self) -> float:
        """Seconds of standing queue allowed (0: no standing-queue refusals). `auto`: AUTO_TARGET_FULL_BATCHES full
        batches of this engine, within AUTO_TARGET_MIN_S..AUTO_TARGET_MAX_S, and at least AUTO_TARGET_REQUESTS
        typical requests' work (up to AUTO_TARGET_REQUESTS_MAX_S). A batching engine needs a batch or two queued to
        stay busy, and a closed loop of clients builds a queue as long as it has clients without asking for more
        than the engine does. 64 clients sending the load test's mix keep 100-250 ms queued on the 2-core CPU, where
        a full batch of 32 takes about 40 ms: eight full batches (320 ms) left so little room that one CI run in
        several refused some of them; sixteen (clamped to 500 ms) leave twice that. 4 clients sending ClassifyBatch
        of 256 images keep 0.6 s queued (each request alone eight batches of 32). None of these may be refused."""
        if self.queue_target_setting != AUTO:
            return float(self.queue_target_setting)
        requests = min(AUTO_TARGET_REQUESTS_MAX_S, AUTO_TARGET_REQUESTS * self._run_time(self.request_images.mean()))
        return max(self._batches_target(), requests)

    def _batches_target(self) -> float:
        """The target's share that batch sizes follow: full batches of the engine (or the setting)."""
        if self.queue_target_setting != AUTO:
            return float(self.queue_target_setting)
        full_batches = AUTO_TARGET_FULL_BATCHES * self.cost.seconds(self.max_batch_size)
        return min(AUTO_TARGET_MAX_S, max(AUTO_TARGET_MIN_S, full_batches))

    def standing_interval(self) -> float:
        """How long every wait must stay above the target before the queue counts as standing."""
        return max(STANDING_INTERVAL_S, 2 * self.cost.seconds(self.batch_limit()))

    def admit(self, count: int, deadline: float | None) -> None:
        """Raise Overloaded for a request of `count` images that `submit` would refuse now for its wait: called
        before preprocessing, so a request that will be shed costs no decoding."""
        with self._lock:
            self._check_wait(count, deadline)

    def refusal(self, count: int, deadline: float | None) -> Overloaded | None:
        """What `admit` would raise for a request of `count` images now, or None: returned, not raised, for the
        refusals decided before a call's message is read (DataPlane.refusal_before_reading)."""
        with self._lock:
            return self._wait_refusal(count, deadline)

    def _check_wait(self, count: int, deadline: float | None) -> None:
        refused = self._wait_refusal(count, deadline)
        if refused is not None:
            try:
                raise refused
            finally:
                refused = None  # not kept by this frame, which the exception's traceback holds: no reference cycle

    def _wait_refusal(self, count: int, deadline: float | None) -> Overloaded | None:
        """Refuse at once what could not be answered by its deadline and, while the queue stands above its target,
        what would wait longer than the target. Nothing is refused before the engine's speed is known."""
        if not self._busy or not self.judged():
            return None
        wait = self._expected_wait()
        if self.standing.standing:
            target = self.queue_target()
            if target and wait > target:
                stood = time.monotonic() - (self.standing.since or time.monotonic()) + self.standing_interval()
                return Overloaded(
                    f"server overloaded: expected queue wait {wait * 1000:.1f} ms is over the target of "
                    f"{target * 1000:.1f} ms, and the queue has stood above it for {stood:.2f} s; retry later",
                    wait,
                )
        if deadline is not None:
            own = self._run_time(count)
            if time.monotonic() + wait + own > deadline:
                return Overloaded(
                    f"server busy: the answer would take about {(wait + own) * 1000:.1f} ms, past the call's "
                    "deadline; retry later or with a longer deadline",
                    wait,
                )
        return None

    async def run_in_runner(self, function: Callable[[], Any]) -> Any:
        """`function()` on the thread that runs the batches (the loop itself for an inline engine).

        The backend's warm-up goes through here: ONNX Runtime keeps a session's CUDA graph per thread,
        so the graph must be captured and checked on the thread that will replay it.
        """
        if self._inline:
            return function()
        call = _Call(function)
        self._work.put(call)
        return await asyncio.wrap_future(call.future)

    async def close(self, timeout: float | None = None) -> None:
        """Refuse new work, finish what is queued (within `timeout`), stop the runner."""
        self._closed = True
        if self._idle is not None:
            with self._lock:
                idle = not self._busy and self._jobs
            if idle:
                self._dispatch()
            try:
                if not self._idle.is_set():
                    await asyncio.wait_for(self._idle.wait(), timeout)
            except TimeoutError:
                log.warning("batcher did not drain within %.1f s; failing what is left", timeout)
                self._fail_all(ShuttingDown("server shut down before the image was classified"))
        self._work.put(None)

    async def stopped(self, timeout: float = 10.0) -> None:
        """After close: wait (off the loop) until the runner thread has finished its last batch."""
        if self._runner.is_alive():
            await asyncio.get_running_loop().run_in_executor(None, self._runner.join, timeout)

    def _dispatch(self) -> None:
        """On the loop, with the runner idle: hand it the next batch, or wait (queue delay) for it to fill, or go
        idle."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        with self._lock:
            if self._busy:  # the runner took the next batch itself
                return
            wait = self._fill_wait()
            if wait > 0:
                self._timer = self._loop.call_later(wait, self._dispatch)
                return
            batch, late = self._take()
            self._start(batch)
            empty = not self._jobs
        _expire_all(late)
        if batch:
            if self._inline:
                self._loop.call_soon(self._finish, batch, self._run(batch), [])
            else:
                self._work.put(batch)
        elif empty:
            self._idle.set()

    def _fill_wait(self) -> float:
        """Seconds the next batch should still wait for more images (max_queue_delay), 0 to take it now."""
        if self.max_queue_delay > 0 and not self._closed and self._jobs and self._queued < self.batch_limit():
            return max(0.0, self._jobs[0].enqueued_at + self.max_queue_delay - time.monotonic())
        return 0.0

    def _start(self, batch: list[Slice]) -> None:
        """Under the lock: the runner has `batch` now (or nothing, and is idle)."""
        self._busy = bool(batch)
        if batch:
            self._running_rows, self._running_since = _rows(batch), time.monotonic()

    def _take(self) -> tuple[list[Slice], list[Job]]:
        """Under the lock: up to batch_limit() queued images, oldest first, and the jobs found expired (to be
        failed on the loop); expired and abandoned jobs are dropped here.

        Once the engine's speed is known, a batch grows only while its predicted run still ends before the earliest
        deadline among the jobs in it: on an engine whose cost is mostly per image, the images queued behind a
        request would otherwise join its batch and make it late (at 5x overload on a 1+4 ms/image device, nearly
        every admitted call was)."""
        now = time.monotonic()
        batch: list[Slice] = []
        waits: list[float] = []
        late_jobs: list[Job] = []
        room, expired, cancelled = self.batch_limit(), 0, 0
        judged, rows, ends_by = self.judged(), 0, math.inf  # ends_by: the earliest deadline in the batch
        while self._jobs and room:
            job = self._jobs[0]
            left = len(job) - job.taken
            late = job.deadline is not None and now >= job.deadline
            if job.future.done() or (late and job.taken == 0):
                self._jobs.popleft()
                self._queued -= left
                if late:
                    expired += left
                    late_jobs.append(job)
                else:
                    cancelled += left
                continue
            count = min(room, left)
            deadline = math.inf if job.deadline is None else job.deadline
            if judged and now + self.cost.seconds(count) > deadline:
                deadline = math.inf  # too late even alone (a run overran): it must not hold its batch to itself
            if batch and judged and now + self.cost.seconds(rows + count) > min(ends_by, deadline):
                break  # the batch as it is ends in time for all of its jobs; this one waits for the next
            if job.taken == 0:
                waits.append(now - job.enqueued_at)
            batch.append((job, job.taken, job.taken + count))
            job.taken += count
            room -= count
            rows += count
            ends_by = min(ends_by, deadline)
            self._queued -= count
            if job.taken == len(job):
                self._jobs.popleft()
        self._observer.on_depth(self._queued)
        if waits:
            self._observer.on_waits(waits)
            target = self.queue_target()
            if target and self.judged():
                interval = self.standing_interval()
                # A wait counts only as far as work is still queued behind it: a stall (a paused machine, a slow run)
                # lengthens every wait of a closed loop without queueing more, and must not read as a standing queue.
                backlog = self.cost.seconds(rows) + self._run_time(self._queued)
                for wait in waits:
                    self.standing.observe(min(wait, backlog), now, target, interval)
        if not self._jobs:
            self.standing.drained()
        if expired or cancelled:
            self._observer.on_dropped(expired, cancelled)
        return batch, late_jobs

    def _finish(self, batch: list[Slice], results: tuple[np.ndarray, ...] | BaseException, late: list[Job]) -> None:
        """On the loop, once the runner is done with `batch` (and has taken the next one, if it could): give each
        job its rows; fail the jobs the runner found expired; dispatch if the runner went idle."""
        _expire_all(late)
        if self._inline:
            with self._lock:
                self._busy = False
                if not isinstance(results, BaseException):
                    self.cost.observe(self._running_rows, self._last_run_seconds)
        with self._lock:
            idle_with_work = not self._busy and bool(self._jobs)
        if idle_with_work:
            self._dispatch()  # the next batch waits for the queue delay, or came after the runner looked
        try:
            if isinstance(results, BaseException):
                log.error("a batch of %d images failed: %s: %s", _rows(batch), type(results).__name__, results)
                for job, _, _ in batch:
                    if not job.future.done():
                        job.future.set_exception(results)
            else:
                _distribute(batch, results)
        finally:
            with self._lock:
                idle = not self._busy and not self._jobs
            if idle:
                self._idle.set()

    def _fail_all(self, error: Exception) -> None:
        with self._lock:
            jobs, self._jobs, self._queued = list(self._jobs), collections.deque(), 0
        for job in jobs:
            if not job.future.done():
                job.future.set_exception(error)
        self._idle.set()

    # --- in the runner thread ------------------------------------------------------------------------

    def _runner_loop(self) -> None:
        while (work := self._work.get()) is not None:
            if isinstance(work, _Call):
                work.run()
                continue
            batch: list[Slice] = work
            while batch:
                results = self._run(batch)
                with self._lock:  # the next batch, taken here: the engine does not wait for the loop
                    if not isinstance(results, BaseException):
                        self.cost.observe(self._running_rows, self._last_run_seconds)
                    following, late = self._take() if self._jobs and not self._fill_wait() else ([], [])
                    self._start(following)
                try:
                    self._loop.call_soon_threadsafe(self._finish, batch, results, late)
                except RuntimeError:  # the loop is closed: nobody is waiting any more
                    return
                batch = following

    def _run(self, batch: list[Slice]) -> tuple[np.ndarray, ...] | BaseException:
        parts = [job.images[start:stop] for job, start, stop in batch]
        started, began = time.perf_counter(), time.monotonic()
        try:
            results = self._run_batch(parts)
        except Exception as exc:  # noqa: BLE001 - a failed run fails its own jobs, never the runner
            return exc
        finally:
            _stamp_run(batch, began, time.monotonic())
        self._last_run_seconds = time.perf_counter() - started  # read by _finish, which this run schedules
        self._observer.on_batch(_rows(batch), self._last_run_seconds)
        return results


class _Call:
    """A function for the runner thread to run between batches, and the future of its result."""

    def __init__(self, function: Callable[[], Any]) -> None:
        self.function = function
        self.future: concurrent.futures.Future = concurrent.futures.Future()

    def run(self) -> None:
        try:
            self.future.set_result(self.function())
        except BaseException as exc:  # noqa: BLE001 - handed to the awaiting caller
            self.future.set_exception(exc)


def _rows(batch: list[Slice]) -> int:
    return sum(stop - start for _, start, stop in batch)


def _stamp_run(batch: list[Slice], began: float, ended: float) -> None:
    """In the runner, before the results are handed back: when each job's rows ran, for its trace spans."""
    images = _rows(batch)
    for job, _, _ in batch:
        if job.run_started is None:
            job.run_started = began
        job.run_ended, job.batch_images = ended, images


def _distribute(batch: list[Slice], results: tuple[np.ndarray, ...]) -> None:
    row = 0
    for job, start, stop in batch:
        count = stop - start
        if not job.future.done():
            if count == len(job):
                job.future.set_result(tuple(r[row : row + count] for r in results))
            else:  # a job split across batches collects its rows until it has them all
                if job.results is None:
                    job.results = tuple(np.empty((len(job), *r.shape[1:]), r.dtype) for r in results)
                for whole, part in zip(job.results, results, strict=True):
                    whole[start:stop] = part[row : row + count]
                job.filled += count
                if job.filled == len(job):
                    job.future.set_result(job.results)
        row += count


def _expire_all(jobs: list[Job]) -> None:
    """On the loop: fail the jobs whose deadline passed while they were queued."""
    for job in jobs:
        if not job.future.done():
            job.future.set_exception(DeadlineExpired("deadline expired while queued; not run"))


def _expire(job: Job) -> None:
    if not job.future.done():
        job.future.set_exception(DeadlineExpired("deadline expired before the image was classified"))
