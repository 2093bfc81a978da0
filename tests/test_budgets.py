"""server.pipeline.budgets: the decode pixel budget (an asyncio weighted semaphore, first come first served) and
memory trim."""

from __future__ import annotations

import asyncio
import json
import platform
import random
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from server.errors import DeadlineExpired
from server.pipeline.budgets import PixelBudget

ROOT = Path(__file__).resolve().parents[1]

WAIT = 5.0  # seconds a test waits for something that should happen almost at once


def run(scenario: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(scenario(), 20))


async def settle() -> None:
    """Let every ready callback and task step run (grants are handed over through a few loop turns)."""
    for _ in range(10):
        await asyncio.sleep(0)


class LoopTurns:
    """Counts the event loop's turns (a task that yields at every turn, so the loop never sleeps meanwhile) from
    `since` (time.monotonic()) on: "at once" measured in turns, which a busy machine does not stretch as it stretches
    seconds. Waiting on a timer instead would take as many turns as the loop can make until it fires: thousands."""

    def __init__(self, since: float = float("-inf")) -> None:
        self.since = since
        self.count = 0

    async def _tick(self) -> None:
        while True:
            await asyncio.sleep(0)
            if time.monotonic() >= self.since:
                self.count += 1

    async def __aenter__(self) -> LoopTurns:
        self._task = asyncio.ensure_future(self._tick())
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._task.cancel()  # it counts no further turn: its next step raises CancelledError


class Recorder:
    """A budget whose `on_change` hook is recorded, and helpers to take part of it in a task."""

    def __init__(self, capacity: int) -> None:
        self.changes: list[int] = []
        self.budget = PixelBudget(capacity, self.changes.append)
        self.granted: list[str] = []  # names of the acquisitions, in the order they got their pixels

    def waiter(self, name: str, pixels: int, deadline: float | None = None) -> asyncio.Task:
        async def take() -> None:
            await self.budget.acquire(pixels, deadline)
            self.granted.append(name)

        return asyncio.ensure_future(take())


# --- taking and giving back ------------------------------------------------------------------------------------------


def test_acquisitions_that_fit_are_granted_at_once_and_counted_in_in_use() -> None:
    async def scenario() -> None:
        rec = Recorder(10)
        await asyncio.wait_for(rec.budget.acquire(3), 0.5)
        await asyncio.wait_for(rec.budget.acquire(5), 0.5)
        assert rec.budget.in_use == 8
        rec.budget.release(3)
        assert rec.budget.in_use == 5
        rec.budget.release(5)
        assert rec.budget.in_use == 0

    run(scenario)


def test_an_acquisition_of_exactly_the_capacity_is_granted() -> None:
    async def scenario() -> None:
        budget = PixelBudget(1_000)
        await asyncio.wait_for(budget.acquire(1_000), 0.5)
        assert budget.in_use == budget.capacity == 1_000

    run(scenario)


def test_an_acquisition_larger_than_the_capacity_is_a_value_error_and_takes_nothing() -> None:
    async def scenario() -> None:
        rec = Recorder(1_000)
        with pytest.raises(ValueError, match=r"1001.*1000"):
            await rec.budget.acquire(1_001)
        assert rec.budget.in_use == 0 and rec.changes == []
        await asyncio.wait_for(rec.budget.acquire(1_000), 0.5)  # nobody was left waiting in the line
        assert rec.budget.in_use == 1_000

    run(scenario)


def test_the_change_hook_sees_every_change_of_in_use_in_order() -> None:
    async def scenario() -> None:
        rec = Recorder(10)
        await rec.budget.acquire(3)
        await rec.budget.acquire(5)
        rec.budget.release(3)
        waiting = rec.waiter("big", 9)  # 5 + 9 > 10: waits for the 5
        await settle()
        rec.budget.release(5)
        await asyncio.wait_for(waiting, WAIT)
        rec.budget.release(9)
        assert rec.changes == [3, 8, 5, 0, 9, 0]

    run(scenario)


# --- waiting in line ------------------------------------------------------------------------------------------------


def test_waiters_are_granted_in_arrival_order_and_a_small_one_does_not_overtake_a_large_one() -> None:
    async def scenario() -> None:
        rec = Recorder(10)
        await rec.budget.acquire(8)
        large = rec.waiter("large", 5)
        await settle()
        small = rec.waiter("small", 1)  # 8 + 1 would fit, but the large one came first
        await settle()
        assert rec.granted == [] and rec.budget.in_use == 8
        rec.budget.release(8)
        await asyncio.wait_for(asyncio.gather(large, small), WAIT)
        assert rec.granted == ["large", "small"] and rec.budget.in_use == 6

    run(scenario)


def test_a_newcomer_waits_behind_the_line_even_when_its_pixels_would_fit() -> None:
    async def scenario() -> None:
        rec = Recorder(10)
        await rec.budget.acquire(6)
        first = rec.waiter("first", 6)
        await settle()
        late = rec.waiter("late", 2)
        await settle()
        assert not late.done() and rec.budget.in_use == 6
        rec.budget.release(6)
        await asyncio.wait_for(asyncio.gather(first, late), WAIT)
        assert rec.granted == ["first", "late"]

    run(scenario)


def test_one_release_grants_as_many_waiters_from_the_head_as_now_fit() -> None:
    async def scenario() -> None:
        rec = Recorder(10)
        await rec.budget.acquire(10)
        tasks = [rec.waiter(name, 3) for name in "abcd"]
        await settle()
        rec.budget.release(10)
        await settle()
        assert rec.granted == ["a", "b", "c"] and rec.budget.in_use == 9 and not tasks[3].done()
        rec.budget.release(3)
        await asyncio.wait_for(tasks[3], WAIT)
        assert rec.granted == ["a", "b", "c", "d"] and rec.budget.in_use == 9

    run(scenario)


def test_a_waiter_whose_deadline_passes_raises_deadline_expired_and_leaves_the_line() -> None:
    async def scenario() -> None:
        rec = Recorder(10)
        await rec.budget.acquire(10)
        deadline = time.monotonic() + 0.05
        async with LoopTurns(since=deadline) as turns:  # nothing releases: only the deadline can end the wait
            with pytest.raises(DeadlineExpired, match="deadline"):
                await rec.budget.acquire(4, deadline=deadline)
            assert time.monotonic() >= deadline  # not before it ...
        assert turns.count <= 10, turns.count  # ... and within a few turns of the loop after it
        assert rec.budget.in_use == 10
        rec.budget.release(10)
        assert rec.budget.in_use == 0 and rec.changes == [10, 0]  # the expired waiter was never granted
        await asyncio.wait_for(rec.budget.acquire(10), 0.5)  # and is no longer in the line

    run(scenario)


def test_a_waiter_with_a_deadline_already_past_is_refused_at_once() -> None:
    async def scenario() -> None:
        budget = PixelBudget(10)
        await budget.acquire(10)
        async with LoopTurns() as turns:
            with pytest.raises(DeadlineExpired):
                await budget.acquire(1, deadline=time.monotonic() - 1.0)
        assert turns.count <= 10, turns.count  # no wait: a few turns of the loop, as settle() gives a grant
        assert budget.in_use == 10

    run(scenario)


def test_a_large_waiter_expiring_at_the_head_of_the_line_lets_smaller_ones_in() -> None:
    async def scenario() -> None:
        rec = Recorder(10)
        await rec.budget.acquire(8)
        large = rec.waiter("large", 5, deadline=time.monotonic() + 0.05)
        await settle()
        small = rec.waiter("small", 2)
        await settle()
        assert not small.done()
        with pytest.raises(DeadlineExpired):
            await large
        await asyncio.wait_for(small, WAIT)  # granted when the large one left, with the 8 still held
        assert rec.granted == ["small"] and rec.budget.in_use == 10

    run(scenario)


def test_a_cancelled_waiter_leaves_the_line_and_never_holds_pixels() -> None:
    async def scenario() -> None:
        rec = Recorder(10)
        await rec.budget.acquire(10)
        gone = rec.waiter("gone", 7)
        after = rec.waiter("after", 7)
        await settle()
        gone.cancel()
        await settle()
        assert gone.cancelled() and rec.budget.in_use == 10
        rec.budget.release(10)
        await asyncio.wait_for(after, WAIT)
        assert rec.granted == ["after"] and rec.budget.in_use == 7
        assert rec.changes == [10, 0, 7]  # the cancelled waiter's 7 never showed up

    run(scenario)


def test_a_cancelled_waiter_at_the_head_of_the_line_lets_the_next_ones_in() -> None:
    async def scenario() -> None:
        rec = Recorder(10)
        await rec.budget.acquire(6)
        head = rec.waiter("head", 8)
        await settle()
        next_ = rec.waiter("next", 4)
        await settle()
        head.cancel()
        await asyncio.wait_for(next_, WAIT)
        assert rec.granted == ["next"] and rec.budget.in_use == 10

    run(scenario)


def test_an_acquisition_granted_just_as_its_caller_is_cancelled_is_handed_on() -> None:
    """The release grants B synchronously; B's caller is cancelled before B runs again: B's pixels go to C."""

    async def scenario() -> None:
        rec = Recorder(10)
        await rec.budget.acquire(10)
        b = rec.waiter("B", 6)
        await settle()
        c = rec.waiter("C", 6)
        await settle()
        rec.budget.release(10)  # grants B (6 of 10); C (6 more) must wait for B
        assert rec.budget.in_use == 6
        b.cancel()  # B's caller goes away before B learns of its grant
        await asyncio.wait_for(c, WAIT)
        await asyncio.gather(b, return_exceptions=True)
        assert b.cancelled(), "the caller's cancellation must not be swallowed by a late grant"
        assert rec.granted == ["C"] and rec.budget.in_use == 6

    run(scenario)


# --- the bound ------------------------------------------------------------------------------------------------------


def test_in_use_never_exceeds_the_capacity_under_many_concurrent_acquisitions() -> None:
    capacity = 100
    rng = random.Random(7)
    plan = [(rng.randint(1, capacity), rng.randint(0, 5)) for _ in range(300)]  # pixels, loop turns held

    async def scenario() -> None:
        rec = Recorder(capacity)
        deltas: list[int] = []

        async def user(pixels: int, turns: int) -> None:
            await rec.budget.acquire(pixels)
            deltas.extend([pixels, -pixels])
            for _ in range(turns):
                await asyncio.sleep(0)
            rec.budget.release(pixels)

        await asyncio.wait_for(asyncio.gather(*(user(p, t) for p, t in plan)), WAIT * 2)
        assert max(rec.changes) <= capacity
        assert min(rec.changes) >= 0 and rec.changes[-1] == 0 and rec.budget.in_use == 0
        assert len(rec.changes) == 2 * len(plan)  # one call per grant and one per release
        assert max(rec.changes) > capacity // 2  # the budget was actually shared, not one at a time

    run(scenario)


def test_in_use_never_exceeds_the_capacity_with_waiters_cancelled_and_expiring_at_random() -> None:
    capacity = 50
    rng = random.Random(11)

    async def scenario() -> None:
        rec = Recorder(capacity)

        async def user(pixels: int, turns: int, deadline: float | None) -> None:
            await rec.budget.acquire(pixels, deadline)
            try:
                for _ in range(turns):
                    await asyncio.sleep(0.001)
            finally:
                rec.budget.release(pixels)

        tasks = []
        for _ in range(200):
            deadline = time.monotonic() + rng.uniform(0.0, 0.05) if rng.random() < 0.3 else None
            tasks.append(asyncio.ensure_future(user(rng.randint(1, capacity), rng.randint(0, 3), deadline)))
            if rng.random() < 0.2:
                await asyncio.sleep(0)
                rng.choice(tasks).cancel()
        results = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), WAIT * 2)
        assert all(r is None or isinstance(r, asyncio.CancelledError | DeadlineExpired) for r in results)
        assert max(rec.changes) <= capacity and min(rec.changes) >= 0
        assert rec.budget.in_use == 0 and rec.changes[-1] == 0  # nothing leaked by the cancelled or expired

    run(scenario)


# --- memory ---------------------------------------------------------------------------------------------------------


# A burst of large decodes in a worker thread, as the decoders run them: 1,600 blocks of 96 KiB (under glibc's mmap
# threshold, so from the heap), every eighth kept alive and the rest freed, so the freed memory lies between live
# blocks, where free() itself never gives it back. Run in a fresh interpreter: the heap is this scenario's alone.
BURST = """
import ctypes, json, sys, threading
from server.pipeline.budgets import return_freed_memory

libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
libc.memset.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]
BLOCK, COUNT = 96 * 1024, 1600
kept, freed = [], []


def rss():
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * 4096


def burst():
    blocks = [libc.malloc(BLOCK) for _ in range(COUNT)]
    for block in blocks:
        libc.memset(block, 1, BLOCK)  # touched: resident, as decoded pixels are
    for i, block in enumerate(blocks):
        (kept.append if i % 8 == 7 else freed.append)(block)
    for block in freed:
        libc.free(block)


start = rss()
worker = threading.Thread(target=burst)
worker.start()
worker.join()
freed_bytes = len(freed) * BLOCK
after_free = rss()
returned = return_freed_memory()
after_trim = rss()
json.dump({"start": start, "freed": freed_bytes, "after_free": after_free, "after_trim": after_trim,
           "returned": returned, "again": return_freed_memory()}, sys.stdout)
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="malloc_trim is glibc's")
def test_freed_memory_is_returned_to_the_os_on_glibc() -> None:
    result = subprocess.run(
        [sys.executable, "-c", BURST], capture_output=True, text=True, timeout=120, cwd=ROOT, check=True
    )
    m = json.loads(result.stdout)
    assert m["returned"] is True and m["again"] is True  # and again, with the library already loaded
    held = m["after_free"] - m["start"]
    assert held >= 0.9 * m["freed"], m  # free() alone kept the burst's memory: there is something to return
    assert m["after_free"] - m["after_trim"] >= 0.9 * m["freed"], m  # and the trim gave it back to the OS
