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

    def observe(self, images: int, seconds: float) -> None:
        # A plain mean over the first 1/weight runs, then a moving average: one slow first run (a cold engine, a
        # machine busy loading another model version) cannot pass for the engine's speed.
        w = max(self.weight, 1.0 / (self.runs + 1))
        self._n += w * (images - self._n)
        self._t += w * (seconds - self._t)
        self._nn += w * (images * images - self._nn)
        self._nt += w * (images * seconds - self._nt)
        self.runs += 1

    def service_rate(self) -> float:
        """Images per second of run time over the recent batches (infinite before any run)."""
        return self._n / self._t if self.runs and self._t > 0 else math.inf

    def seconds(self, images: int) -> float:
        """Predicted run time of a batch of `images`; 0 before any run was seen."""
        if not self.runs:
            return 0.0
        spread = self._nn - self._n * self._n
        if spread > 1e-9:  # batches of several sizes seen: fit the line
            per_image = max(0.0, (self._nt - self._n * self._t) / spread)
            fixed = max(0.0, self._t - per_image * self._n)
        else:  # one size so far: assume the cost is all per image (an overestimate for larger batches)
            per_image, fixed = self._t / max(self._n, 1.0), 0.0
        return fixed + per_image * images


class OfferedLoad:
    """Images per second arriving (admitted or refused), an exponentially decaying count with time constant `tau`.

    A burst moves it by its size / tau and fades within a few tau; only a sustained excess keeps it high.
    """

    def __init__(self, tau: float = 0.05) -> None:
        self.tau = tau
        self._rate = 0.0
        self._at = time.monotonic()

    def add(self, images: int) -> float:
        now = time.monotonic()
        self._rate = self._rate * math.exp(-(now - self._at) / self.tau) + images / self.tau
        self._at = now
        return self._rate


MIN_RUNS_FOR_CAPACITY = 8  # no overload is judged before the engine's speed is known from this many runs
OVERLOAD_FACTOR = 1.5  # offered load over this times the runner's recent throughput: overloaded ...
OVERLOAD_AFTER = 0.02  # ... once that has lasted this many seconds; meanwhile the queue is held to one full batch
# Under overload a request may still wait this many single-image runs: a device whose run takes longer than
# max_queue_wait then forms batches of a few images instead of runs of one with gaps between them. Measured on a
# 1 ms + 4 ms/image emulated device at 5x its capacity: 1 run kept 69% of capacity, 1.5 runs 82%, 2 runs 87% (with
# successful p99 at 4x the idle p99 instead of 3x).
SINGLE_RUNS_OF_WAIT = 2


class Batcher:
    def __init__(
        self,
        run_batch: RunBatch,
        max_batch_size: int,
        max_queue_size: int,
        max_queue_delay: float = 0.0,
        observer: BatchObserver | None = None,
        inline: bool = False,
        max_queue_wait: float = 0.0,
    ) -> None:
        self._run_batch = run_batch
        self._inline = inline
        self.max_batch_size = max_batch_size
        self.max_queue_size = max_queue_size
        self.max_queue_delay = max_queue_delay
        self.max_queue_wait = max_queue_wait  # seconds; 0 = bounded by size (and deadlines) only
        self.cost = BatchCost()
        self.offered = OfferedLoad()
        self.overloaded = False  # offered load is beyond what the runner can do: shed to max_queue_wait
        self._over_since: float | None = None
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
            self._admit(count, deadline)
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
            self.offered = OfferedLoad(self.offered.tau)
            self._over_since = None
            self.overloaded = False

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
        full, partial = divmod(self._queued, self.max_batch_size)
        ahead = full * self.cost.seconds(self.max_batch_size) + (self.cost.seconds(partial) if partial else 0.0)
        return rest + ahead

    def capacity(self) -> float:
        """Images per second the runner gets through while busy: at the batch sizes of late, or at full batches if
        that is more (infinite before any run).

        Under a closed loop of clients the offered load is at most this; only an open stream of calls beyond it (an
        overload, not a burst) drives the offered load well over it. Full batches count because a light load runs
        small ones: two clients alternating single images and 16-image batches were taken for an overload."""
        if self.cost.runs < MIN_RUNS_FOR_CAPACITY:
            return math.inf
        full = self.max_batch_size / max(self.cost.seconds(self.max_batch_size), 1e-9)
        return max(self.cost.service_rate(), full)

    def note_offered(self, images: int) -> None:
        """Count images offered (admitted or not). Overloaded once the offered load has stayed over OVERLOAD_FACTOR
        x capacity for OVERLOAD_AFTER seconds (a burst or a stall of the machine does not count); no longer once it
        falls under the capacity."""
        offered = self.offered.add(images)
        capacity = self.capacity()
        now = time.monotonic()
        if offered > OVERLOAD_FACTOR * capacity:
            if self._over_since is None:
                self._over_since = now
            if now - self._over_since >= OVERLOAD_AFTER:
                self.overloaded = True
        elif offered < capacity:
            self._over_since = None
            self.overloaded = False

    def admit(self, count: int, deadline: float | None) -> None:
        """Raise Overloaded for a request of `count` images that `submit` would refuse now for its wait: called
        before preprocessing, so a request that will be shed costs no decoding. A request refused here counts
        as offered load; one let through is counted when it is submitted, once it has proved valid (invalid
        requests must not make the server look overloaded)."""
        with self._lock:
            try:
                self._check_wait(count, deadline)
            except Overloaded:
                self.note_offered(count)
                raise

    def _admit(self, count: int, deadline: float | None) -> None:
        """Refuse at once what could not be answered by its deadline and, while the offered load is beyond the
        runner's capacity (not a passing burst), what would wait longer than max_queue_wait."""
        self.note_offered(count)
        self._check_wait(count, deadline)

    def wait_bound(self) -> float:
        """The longest expected wait admitted under overload: max_queue_wait, but never under SINGLE_RUNS_OF_WAIT
        runs of one image (0 = no bound)."""
        if not self.max_queue_wait:
            return 0.0
        return max(self.max_queue_wait, SINGLE_RUNS_OF_WAIT * self.cost.seconds(1))

    def _check_wait(self, count: int, deadline: float | None) -> None:
        if not self._busy or (not self.max_queue_wait and deadline is None):
            return
        wait = self._expected_wait()
        bound = self.wait_bound()
        if bound and self._over_since is not None:  # overloaded, or an overload beginning (or a burst)
            if not self.overloaded:
                bound = max(bound, self.cost.seconds(self.max_batch_size))
            if wait > bound:
                raise Overloaded(
                    f"server busy: expected queue wait {wait * 1000:.1f} ms is over the limit of {bound * 1000:.1f} "
                    "ms; retry later",
                    wait,
                )
        if deadline is not None:
            full, partial = divmod(count, self.max_batch_size)
            own = full * self.cost.seconds(self.max_batch_size) + (self.cost.seconds(partial) if partial else 0.0)
            if time.monotonic() + wait + own > deadline:
                raise Overloaded(
                    f"server busy: the answer would take about {(wait + own) * 1000:.1f} ms, past the call's "
                    "deadline; retry later or with a longer deadline",
                    wait,
                )

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
        if self.max_queue_delay > 0 and not self._closed and self._jobs and self._queued < self.max_batch_size:
            return max(0.0, self._jobs[0].enqueued_at + self.max_queue_delay - time.monotonic())
        return 0.0

    def _start(self, batch: list[Slice]) -> None:
        """Under the lock: the runner has `batch` now (or nothing, and is idle)."""
        self._busy = bool(batch)
        if batch:
            self._running_rows, self._running_since = _rows(batch), time.monotonic()

    def _take(self) -> tuple[list[Slice], list[Job]]:
        """Under the lock: up to max_batch_size queued images, oldest first, and the jobs found expired (to be
        failed on the loop); expired and abandoned jobs are dropped here."""
        now = time.monotonic()
        batch: list[Slice] = []
        waits: list[float] = []
        late_jobs: list[Job] = []
        room, expired, cancelled = self.max_batch_size, 0, 0
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
            if job.taken == 0:
                waits.append(now - job.enqueued_at)
            count = min(room, left)
            batch.append((job, job.taken, job.taken + count))
            job.taken += count
            room -= count
            self._queued -= count
            if job.taken == len(job):
                self._jobs.popleft()
        self._observer.on_depth(self._queued)
        if waits:
            self._observer.on_waits(waits)
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
