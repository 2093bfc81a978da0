"""mnist-attack: hostile clients against mnist-serve, each check judged against the server's contract.

Starts its own servers on loopback (`loadtest.servers.ServerProcess`, the bundled model, a free gRPC
port and a free metrics port each; more flags with `--server-args`), runs the checks below one by
one, and writes DIR/report.json and DIR/report.md (rewritten after every check, so a run cut short
still leaves its report): one line per check with what was sent, what was measured, the target
and PASS / FAIL / SKIP. Exit status 1 when any line FAILs. A SKIP (a check that did not run) is no pass: it is
counted apart and named in the summary, and fails the run too with `--strict` or MNIST_TEST_STRICT=1. Loopback
only: nothing leaves the machine.

Checks share one server where they cannot disturb each other (malformed messages, image modes,
non-digits); memory, overload, idle-client and shutdown checks get a fresh server each. The load
of the overload checks comes from separate processes (one Python process cannot send fast enough on
two cores), and the rate they actually reached is reported beside the rate asked for, with the CPU
the senders, the server and the whole machine used. `overload` loads the server as configured (the
CPU model: senders, server and model share the cores); `overload-device` loads a server whose
model runs off the CPU (emulated device time), where the model, not the CPU, is the limit. Every step
has a time limit; the whole run stays within `--budget-s` (a check that no longer fits is SKIPped).
A check that needs a server flag the server does not accept yet FAILs with "flag missing".
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from loadtest.attack.client import digits
from loadtest.attack.context import Ctx
from loadtest.attack.core import SKIP, Line
from loadtest.attack.load import raise_fd_limit
from loadtest.attack.runner import (
    STRICT_ENV,
    describe_checks,
    exit_status,
    run_check,
    select,
    strict_from_env,
    tally,
    verdict,
    write_report,
)

# Flags the hardened server is to accept; the report notes which it does.
EXPECTED_FLAGS = (
    "--metrics-host",
    "--max-image-pixels",
    "--max-request-pixels",
    "--max-decoding-pixels",
    "--queue-target-ms",
    "--max-concurrent-calls",
    "--max-streams",
    "--stream-idle-seconds",
)
# The checks that share one server: it is kept between them while one of them is still to run.
SHARED_CHECKS = {"malformed", "unknown-fields", "modes", "corrupt", "blank", "nondigits", "digits", "metrics-bind"}


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults shown, and the description's own line breaks kept."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mnist-attack", description=__doc__, epilog=describe_checks(), formatter_class=HelpFormatter
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("reports/attack"),
        help="folder for report.json, report.md and the servers' logs",
    )
    parser.add_argument("--quick", action="store_true", help="only the checks marked (quick), shortened: <= 60 s")
    parser.add_argument(
        "--budget-s",
        type=float,
        default=600.0,
        help="the whole run's time limit; a check that no longer fits is SKIPped",
    )
    parser.add_argument(
        "--only", metavar="NAME[,NAME]", help="run only these checks (names below, or a group number 1-6)"
    )
    parser.add_argument(
        "--server-args",
        default="",
        help="more mnist-serve flags for every server started, e.g. '--max-image-pixels 16000000'",
    )
    parser.add_argument("--senders", type=int, default=4, help="load-generator processes for the overload check")
    parser.add_argument("--list", action="store_true", help="list the checks and exit")
    parser.add_argument(
        "--strict",
        action="store_true",
        help=f"a SKIPped check fails the run (exit status 1), as {STRICT_ENV}=1 in the environment does",
    )
    return parser


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.list:
        print(describe_checks())
        return 0
    chosen = select(args.only, args.quick)
    try:
        digits(1)  # every check sends MNIST test digits: find them before starting anything
    except Exception as exc:  # noqa: BLE001
        print(f"mnist-attack: the MNIST test set is needed ({exc}); set MNIST_DIR", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    soft, hard = raise_fd_limit()
    signal.signal(signal.SIGTERM, _interrupt)  # a terminated run still stops its servers and writes its report
    ctx = Ctx(args)
    started, clock = time.strftime("%Y-%m-%d %H:%M:%S"), time.monotonic()
    budget = min(args.budget_s, 60.0) if args.quick and args.budget_s == 600.0 else args.budget_s
    strict = args.strict or strict_from_env()
    meta: dict[str, Any] = {
        "started": started,
        "quick": args.quick,
        "strict": strict,
        "budget_s": budget,
        "elapsed_s": 0.0,
        "server_args": args.server_args,
        "machine": f"{os.cpu_count()} CPUs, RLIMIT_NOFILE {soft}/{hard}, Python {sys.version.split()[0]}",
        "notes": ctx.notes,
    }
    lines: list[Line] = []

    def say(text: str) -> None:
        print(f"[{time.monotonic() - clock:6.1f}s] {text}", flush=True)

    try:
        missing = [flag for flag in EXPECTED_FLAGS if not ctx.has_flag(flag)]
        ctx.notes.append("server flags not accepted yet: " + (", ".join(missing) or "none"))
        meta["server_flags_missing"] = missing
    except (OSError, subprocess.SubprocessError) as exc:
        ctx.notes.append(f"mnist-serve --help failed: {exc}")
    say(
        f"mnist-attack: {len(chosen)} checks{' (quick)' if args.quick else ''}, budget {budget:.0f} s, report in "
        f"{args.out}"
    )
    try:
        for index, item in enumerate(chosen):
            left = budget - (time.monotonic() - clock)
            need = (item.quick_estimate_s or item.estimate_s) if args.quick else item.estimate_s
            if left < need:
                lines.append(
                    Line(
                        item.name,
                        SKIP,
                        item.sends,
                        "",
                        item.target,
                        f"budget: {left:.0f} s left, the check needs about {need:.0f} s",
                    )
                )
                say(f"{item.name}: SKIP (budget)")
                continue
            timeout = min(item.timeout_s, max(left, need))
            say(f"{item.name}: running (limit {timeout:.0f} s)")
            new = run_check(ctx, item, timeout)
            lines += new
            for line in new:
                say(
                    f"  {line.status} {line.name}: {line.measured[:150]}"
                    + (f" -- {line.reason}" if line.reason else "")
                )
            later_shared = any(c.name in SHARED_CHECKS for c in chosen[index + 1 :])
            ctx.close_servers(keep=("shared",) if later_shared else ())
            meta["elapsed_s"] = time.monotonic() - clock
            write_report(args.out, meta, lines)
    except KeyboardInterrupt:
        say("interrupted")
        ctx.notes.append("run interrupted")
    finally:
        ctx.close_servers()
        meta["elapsed_s"] = time.monotonic() - clock
        write_report(args.out, meta, lines)
    say(f"done: {tally(lines)}; {args.out / 'report.md'}")
    say(verdict(lines, strict))
    return exit_status(lines, strict)
