"""Fixed batch shapes ("buckets") and how a batch of any size is cut into runs at those shapes.

On a GPU a session whose input shape changes re-runs cuDNN's algorithm search (~100-500 ms each
time), so every session sees one shape only: a batch is padded up to the smallest bucket that
holds it, and a batch larger than the largest bucket is cut into full runs of the largest one
plus a padded remainder.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import NamedTuple


class Run(NamedTuple):
    start: int  # rows [start, stop) of the batch
    stop: int
    bucket: int  # the shape they run at; bucket - (stop - start) rows are padding

    @property
    def images(self) -> int:
        return self.stop - self.start


def powers_of_two(largest: int) -> tuple[int, ...]:
    """1, 2, 4, ... up to `largest`, and `largest` itself: at most 2x padding, log2(largest) + 1 sessions."""
    if largest < 1:
        raise ValueError("the largest bucket must be at least 1")
    sizes, size = [], 1
    while size < largest:
        sizes.append(size)
        size *= 2
    return (*sizes, largest)


def plan_runs(n: int, buckets: Iterable[int]) -> list[Run]:
    """Cut a batch of `n` images into runs, each at one of `buckets`, padding only the last."""
    sizes = sorted(buckets)
    if n < 1:
        return []
    largest = sizes[-1]
    runs, start = [], 0
    while n - start > largest:
        runs.append(Run(start, start + largest, largest))
        start += largest
    rest = n - start
    runs.append(Run(start, n, next(size for size in sizes if size >= rest)))
    return runs
