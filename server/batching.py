"""Dynamic batching: concurrent requests wait in a bounded queue and run together in one session run.

One worker thread takes whatever is queued (up to `max_batch_size`), optionally waits
`max_queue_delay` for more when the queue has run dry, drops requests whose deadline has already
passed, and runs the rest as one batch. While a batch runs, new requests pile up and form the next
one, so batches grow with load without adding delay when the server is idle.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field

import numpy as np

log = logging.getLogger("mnist.batching")


class QueueFull(Exception):
    """The queue cannot take the request now (RESOURCE_EXHAUSTED)."""


class DeadlineExpired(Exception):
    """The request's deadline passed while it waited; it was never run (DEADLINE_EXCEEDED)."""


class QueueClosed(Exception):
    """The server is shutting down and takes no new work (UNAVAILABLE)."""


@dataclass
class QueuedImage:
    tensor: np.ndarray  # (1, 28, 28) float32
    deadline: float | None  # time.monotonic() by which the answer is needed; None = no deadline
    enqueued_at: float = field(default_factory=time.monotonic)
    future: Future = field(default_factory=Future)


@dataclass(frozen=True)
class BatchObserver:
    """Hooks for metrics; each gets plain numbers so the queue knows nothing of Prometheus."""

    on_batch: Callable[[int, float], None] = lambda size, seconds: None  # images, session-run seconds
    on_wait: Callable[[float], None] = lambda seconds: None  # queue wait of one image
    on_depth: Callable[[int], None] = lambda depth: None
    on_expired: Callable[[int], None] = lambda count: None


class BatchQueue:
    def __init__(
        self,
        run_batch: Callable[[np.ndarray], np.ndarray],
        max_batch_size: int,
        max_queue_size: int,
        max_queue_delay: float = 0.0,
        observer: BatchObserver | None = None,
    ) -> None:
        self._run_batch = run_batch
        self.max_batch_size = max_batch_size
        self.max_queue_size = max_queue_size
        self.max_queue_delay = max_queue_delay
        self._observer = observer or BatchObserver()
        self._pending: collections.deque[QueuedImage] = collections.deque()
        self._cond = threading.Condition()
        self._closed = False
        self._worker = threading.Thread(target=self._loop, name="batch-worker", daemon=True)
        self._worker.start()

    def submit(self, tensors: Sequence[np.ndarray], deadline: float | None = None) -> list[Future]:
        """Queue all of `tensors` or none of them; each future resolves to that image's output row."""
        items = [QueuedImage(t, deadline) for t in tensors]
        with self._cond:
            if self._closed:
                raise QueueClosed("server is shutting down")
            if len(self._pending) + len(items) > self.max_queue_size:
                raise QueueFull(
                    f"queue full: {len(self._pending)} images waiting, {len(items)} more would exceed the limit "
                    f"of {self.max_queue_size}; retry later"
                )
            self._pending.extend(items)
            self._observer.on_depth(len(self._pending))
            self._cond.notify()
        return [item.future for item in items]

    def depth(self) -> int:
        with self._cond:
            return len(self._pending)

    def close(self, timeout: float | None = None) -> None:
        """Refuse new work, finish what is queued, stop the worker."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._worker.join(timeout)

    def _take_batch(self) -> list[QueuedImage]:
        with self._cond:
            while not self._pending and not self._closed:
                self._cond.wait()
            if self.max_queue_delay > 0 and len(self._pending) < self.max_batch_size and not self._closed:
                until = time.monotonic() + self.max_queue_delay
                while len(self._pending) < self.max_batch_size and (left := until - time.monotonic()) > 0:
                    self._cond.wait(left)
            batch = [self._pending.popleft() for _ in range(min(self.max_batch_size, len(self._pending)))]
            self._observer.on_depth(len(self._pending))
            return batch

    def _loop(self) -> None:
        while True:
            batch = self._take_batch()
            if not batch:
                return  # closed and drained
            try:
                self._run(batch)
            except Exception:  # a bug here must not silence the queue for every later request
                log.exception("batch worker failed on a batch of %d; continuing", len(batch))
                for item in batch:
                    if not item.future.done():
                        item.future.set_exception(RuntimeError("internal error in the batch worker"))

    def _run(self, batch: list[QueuedImage]) -> None:
        now = time.monotonic()
        live = []
        for item in batch:
            # RUNNING first: from then on a caller's cancel() cannot race with setting the outcome.
            if not item.future.set_running_or_notify_cancel():
                continue  # cancelled by a caller whose deadline passed
            if item.deadline is not None and now >= item.deadline:
                item.future.set_exception(DeadlineExpired("deadline expired while queued; not run"))
                continue
            live.append(item)
        if len(live) < len(batch):
            self._observer.on_expired(len(batch) - len(live))
        if not live:
            return
        for item in live:
            self._observer.on_wait(now - item.enqueued_at)
        started = time.perf_counter()
        try:
            outputs = self._run_batch(np.stack([item.tensor for item in live]))
        except Exception as exc:  # noqa: BLE001 - a failed run fails its requests, never the worker
            for item in live:
                item.future.set_exception(exc)
            return
        self._observer.on_batch(len(live), time.perf_counter() - started)
        for item, row in zip(live, outputs, strict=True):
            item.future.set_result(row)
