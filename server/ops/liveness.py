"""Is the gRPC event loop still running? A heartbeat on it, read from another thread.

Every call is served on one asyncio loop, so a liveness check answered there waits behind the loop's
backlog: under overload grpc health Checks with a 1 s deadline failed, and a liveness probe built on
them restarts a pod that is merely busy. `LoopHeartbeat` instead has the loop stamp the time every
fraction of a second (`loop.call_later`, a few microseconds a beat); any thread can then tell a loop
that is late (milliseconds to a second under overload) from one that stopped running callbacks at all
(deadlocked, or blocked in a call that never returns). The metrics HTTP server's thread serves that
answer at /livez (server/ops/metrics_http.py), off the loop it judges.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

MAX_BEAT_INTERVAL_S = 1.0


class LoopHeartbeat:
    """A `call_later` chain on one event loop; `problem()` (any thread) names a stall over `stall_limit_s`."""

    def __init__(self, stall_limit_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        if not stall_limit_s > 0:
            raise ValueError("stall_limit_s must be > 0")
        self.stall_limit_s = stall_limit_s
        # Several beats per limit, so that a stall is seen within about a quarter of the limit of starting.
        self.interval_s = min(MAX_BEAT_INTERVAL_S, stall_limit_s / 4)
        self._clock = clock
        self._last_beat: float | None = None  # one float, written by the loop and read by any thread: no lock
        self._handle: asyncio.TimerHandle | None = None

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        """Beat from now on; call on `loop`'s own thread (e.g. from a coroutine running on it)."""
        if self._handle is not None:
            raise RuntimeError("LoopHeartbeat already started")
        self._beat(loop)

    def stop(self) -> None:
        """Stop beating (on the loop's thread); `problem()` then reports the heartbeat as stopped."""
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        self._last_beat = None

    def _beat(self, loop: asyncio.AbstractEventLoop) -> None:
        self._last_beat = self._clock()
        self._handle = loop.call_later(self.interval_s, self._beat, loop)

    def stalled_for(self) -> float | None:
        """Seconds since the loop last ran a beat, or None when the heartbeat is not running."""
        last = self._last_beat
        return None if last is None else max(0.0, self._clock() - last)

    def problem(self) -> str | None:
        """None while the loop keeps beating; otherwise what is wrong, in words (for a 503's body)."""
        stalled = self.stalled_for()
        if stalled is None:
            return "the event loop's heartbeat is not running"
        if stalled > self.stall_limit_s:
            return (
                f"the gRPC event loop has run no callback for {stalled:.1f} s (limit {self.stall_limit_s:g} s): "
                "it is blocked or deadlocked"
            )
        return None
