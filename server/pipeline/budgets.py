"""Budgets that bound what untrusted requests can make the server spend: decode pixels, and memory after bursts.

`PixelBudget` is an asyncio weighted semaphore counted in decoded pixels (first come, first served,
waiting bounded by the caller's deadline): however many requests send large images at once, at
most `capacity` pixels are being decoded, so decode memory stays bounded. `return_freed_memory`
hands memory that a burst of large decodes left in glibc's heap back to the operating system.
"""

from __future__ import annotations

import asyncio
import collections
import ctypes
import ctypes.util
import logging
import time
from collections.abc import Callable

from server.errors import DeadlineExpired

log = logging.getLogger("mnist.budgets")


class PixelBudget:
    """At most `capacity` pixels held at once; `acquire` waits in arrival order. Used on the event loop only."""

    def __init__(self, capacity: int, on_change: Callable[[int], None] = lambda in_use: None) -> None:
        self.capacity = capacity
        self.in_use = 0
        self._waiting: collections.deque[tuple[int, asyncio.Future]] = collections.deque()
        self._on_change = on_change

    async def acquire(self, pixels: int, deadline: float | None = None) -> None:
        """Hold `pixels` (at most `capacity`), waiting for room until `deadline` (time.monotonic()) at most."""
        if pixels > self.capacity:
            raise ValueError(f"{pixels} pixels can never fit a budget of {self.capacity}")
        if not self._waiting and self.in_use + pixels <= self.capacity:
            self._take(pixels)
            return
        granted = asyncio.get_running_loop().create_future()
        entry = (pixels, granted)
        self._waiting.append(entry)
        timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
        try:
            await asyncio.wait_for(asyncio.shield(granted), timeout)
        except TimeoutError:
            self._give_up(entry)
            raise DeadlineExpired("deadline expired while waiting to decode (busy decoding other images)") from None
        except asyncio.CancelledError:
            self._give_up(entry)
            raise

    def _give_up(self, entry: tuple[int, asyncio.Future]) -> None:
        pixels, granted = entry
        if granted.done() and not granted.cancelled():
            self.release(pixels)  # granted just as the caller gave up: hand it on
        else:
            granted.cancel()
            self._waiting.remove(entry)
            self._grant()  # a large request leaving the head of the line may let smaller ones in

    def release(self, pixels: int) -> None:
        self.in_use -= pixels
        self._on_change(self.in_use)
        self._grant()

    def _take(self, pixels: int) -> None:
        self.in_use += pixels
        self._on_change(self.in_use)

    def _grant(self) -> None:
        while self._waiting and self.in_use + self._waiting[0][0] <= self.capacity:
            pixels, granted = self._waiting.popleft()
            if not granted.done():
                self._take(pixels)
                granted.set_result(None)


_libc = None


def return_freed_memory() -> bool:
    """Ask glibc to give freed heap memory back to the OS (malloc_trim); False where there is no glibc."""
    global _libc
    if _libc is None:
        try:
            _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            _libc.malloc_trim.argtypes = [ctypes.c_size_t]
        except (OSError, AttributeError):
            _libc = False
    if not _libc:
        return False
    _libc.malloc_trim(0)
    return True
