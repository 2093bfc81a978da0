"""What every check shares: the statuses, a report line (`Line`, `judge`, `inform`), `Skip` and `Fail`,
and the registry: `@check` adds a check to `CHECKS`, in the order the modules are imported (the order they run)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from loadtest.attack.context import Ctx


PASS, FAIL, SKIP = "PASS", "FAIL", "SKIP"
INFO = "INFO"  # a measurement reported for comparison, not judged


class Skip(Exception):
    """The check cannot run here (the reason is reported)."""


class Fail(Exception):
    """The check failed before it could measure anything (e.g. a flag the server does not accept)."""


@dataclass
class Line:
    name: str
    status: str
    sent: str
    measured: str
    target: str
    reason: str = ""
    seconds: float = 0.0
    data: dict = field(default_factory=dict)


def judge(name: str, ok: bool, sent: str, measured: str, target: str, reason: str = "", **data: Any) -> Line:
    return Line(name, PASS if ok else FAIL, sent, measured, target, "" if ok else reason, data=data)


def inform(name: str, sent: str, measured: str, **data: Any) -> Line:
    """A line that reports a measurement beside judged ones (e.g. for comparison) and passes or fails nothing."""
    return Line(name, INFO, sent, measured, "(information, not judged)", data=data)


@dataclass
class Check:
    name: str
    group: str
    sends: str
    target: str
    quick: bool
    timeout_s: float
    estimate_s: float
    fn: Callable[[Ctx], list[Line]]
    quick_estimate_s: float = 0.0


CHECKS: list[Check] = []


def check(
    name: str,
    group: str,
    sends: str,
    target: str,
    *,
    quick: bool,
    timeout_s: float,
    estimate_s: float,
    quick_estimate_s: float = 0.0,
):
    def register(fn: Callable[[Ctx], list[Line]]) -> Callable[[Ctx], list[Line]]:
        CHECKS.append(Check(name, group, sends, target, quick, timeout_s, estimate_s, fn, quick_estimate_s))
        return fn

    return register
