"""Running the checks and reporting them: `select` (--only, --quick), `run_check` (a thread with a time limit,
exceptions and timeouts turned into FAIL lines), report.json and report.md, the run's verdict and exit status
(`exit_status`), and the list of checks for --help.

A SKIP is a check that did not run (no time left, something not served): never a pass. It is counted apart in every
summary and listed by name; it leaves the exit status alone unless the run is strict (`--strict`, or the environment
variable MNIST_TEST_STRICT=1), when one SKIP fails the run as a FAIL does."""

from __future__ import annotations

import json
import os
import threading
import time
import traceback
from collections import Counter
from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

from loadtest.attack.context import Ctx
from loadtest.attack.core import CHECKS, FAIL, INFO, PASS, SKIP, Check, Fail, Line, Skip

STRICT_ENV = "MNIST_TEST_STRICT"  # "1": a SKIP fails the run, as --strict


def select(only: str | None, quick: bool) -> list[Check]:
    if only:
        wanted = [name.strip() for name in only.split(",") if name.strip()]
        known = {c.name for c in CHECKS} | {c.group.split()[0] for c in CHECKS}
        unknown = [name for name in wanted if name not in known]
        if unknown:
            raise SystemExit(
                f"mnist-attack: unknown check(s) {', '.join(unknown)}; known: {', '.join(c.name for c in CHECKS)}"
            )
        return [c for c in CHECKS if c.name in wanted or c.group.split()[0] in wanted]
    return [c for c in CHECKS if c.quick or not quick]


def strict_from_env(environ: Mapping[str, str] | None = None) -> bool:
    """Whether the environment asks for a strict run (MNIST_TEST_STRICT=1)."""
    return (os.environ if environ is None else environ).get(STRICT_ENV, "").strip() == "1"


def tally(lines: list[Line]) -> str:
    """The run's counts, each status apart: "3 PASS, 0 FAIL, 1 SKIP (not run, not passed), 2 INFO"."""
    counts = Counter(line.status for line in lines)
    text = f"{counts.get(PASS, 0)} PASS, {counts.get(FAIL, 0)} FAIL, {counts.get(SKIP, 0)} SKIP"
    if counts.get(SKIP):
        text += " (not run, not passed)"
    if counts.get(INFO):
        text += f", {counts[INFO]} INFO"
    return text


def exit_status(lines: list[Line], strict: bool) -> int:
    """1 when a line FAILed, or when the run is strict and a line was SKIPped; else 0."""
    statuses = {line.status for line in lines}
    return 1 if FAIL in statuses or (strict and SKIP in statuses) else 0


def verdict(lines: list[Line], strict: bool) -> str:
    """One line on the run's outcome, naming what was skipped."""
    skipped = [line.name for line in lines if line.status == SKIP]
    failed = sum(line.status == FAIL for line in lines)
    if failed:
        text = f"FAILED: {failed} line(s) failed"
    elif skipped and strict:
        text = f"FAILED (strict): {len(skipped)} check(s) skipped"
    elif not any(line.status == PASS for line in lines):
        text = "nothing passed"
    else:
        text = "passed"
    if skipped:
        text += f"; skipped, not passed: {', '.join(skipped)}"
        if not strict:
            text += f" (--strict or {STRICT_ENV}=1 fails the run on a skip)"
    return text


def run_check(ctx: Ctx, item: Check, timeout: float) -> list[Line]:
    """Run one check in a thread with a time limit; exceptions and timeouts become FAIL lines."""
    outcome: dict[str, Any] = {}

    def target() -> None:
        try:
            outcome["lines"] = item.fn(ctx)
        except Skip as exc:
            outcome["lines"] = [Line(item.name, SKIP, item.sends, "", item.target, str(exc))]
        except Fail as exc:
            outcome["lines"] = [Line(item.name, FAIL, item.sends, "", item.target, str(exc))]
        except Exception as exc:  # noqa: BLE001 - a broken check is reported, the run goes on
            outcome["lines"] = [
                Line(item.name, FAIL, item.sends, "", item.target, f"error: {type(exc).__name__}: {exc}")
            ]
            outcome["traceback"] = traceback.format_exc()

    started = time.monotonic()
    thread = threading.Thread(target=target, name=f"check-{item.name}", daemon=True)
    ctx.check_thread = thread
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        ctx.close_servers(keep=("shared",))
        thread.join(10)
        outcome["lines"] = [Line(item.name, FAIL, item.sends, "", item.target, f"timed out after {timeout:.0f} s")]
    elapsed = time.monotonic() - started
    lines = outcome.get("lines") or [Line(item.name, FAIL, item.sends, "", item.target, "no result")]
    for line in lines:
        line.seconds = round(elapsed, 2)
    if "traceback" in outcome:
        (ctx.out / f"traceback-{item.name}.txt").write_text(outcome["traceback"])
    return lines


def cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def write_report(out: Path, meta: dict, lines: list[Line]) -> None:
    counts = Counter(line.status for line in lines)
    strict = bool(meta.get("strict"))
    report = {
        **meta,
        "summary": dict(counts),
        "skipped": [line.name for line in lines if line.status == SKIP],
        "verdict": verdict(lines, strict),
        "exit_status": exit_status(lines, strict),
        "lines": [asdict(line) for line in lines],
    }
    (out / "report.json").write_text(json.dumps(report, indent=2, default=str))
    md = [
        f"# mnist-attack {'--quick ' if meta['quick'] else ''}report",
        "",
        f"{meta['started']}, {meta['elapsed_s']:.0f} s of a {meta['budget_s']:.0f} s budget; server flags: "
        f"`{meta['server_args'] or '(defaults)'}`; {meta['machine']}",
        "",
        f"**{tally(lines)}**{' (strict: a SKIP fails the run)' if strict else ''}",
        "",
        f"Verdict: {report['verdict']}",
        "",
        "| check | sent | measured | target | result |",
        "| --- | --- | --- | --- | --- |",
    ]
    for line in lines:
        result = f"**{line.status}**" + (f": {line.reason}" if line.reason else "")
        md.append(
            f"| {cell(line.name)} | {cell(line.sent)} | {cell(line.measured)} | {cell(line.target)} | {cell(result)} |"
        )
    if meta.get("notes"):
        md += ["", *[f"- {note}" for note in meta["notes"]]]
    (out / "report.md").write_text("\n".join(md) + "\n")


def describe_checks() -> str:
    import textwrap

    rows = []
    for item in CHECKS:
        rows.append(f"  {item.name}{' (quick)' if item.quick else ''}  [group {item.group}]")
        for label, text in (("sends: ", item.sends), ("target:", item.target)):
            rows.append(
                textwrap.fill(
                    text, 100, initial_indent=f"      {label} ", subsequent_indent=" " * 14, break_on_hyphens=False
                )
            )
    return "checks, in the order they run (--only takes their names or group numbers):\n" + "\n".join(rows)
