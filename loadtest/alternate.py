"""One client against several servers in alternating rounds: which is faster at one call, in the same minutes.

    python -m loadtest.alternate --rounds 6 --seconds 1.5 \\
        --server "now=python -m server.app --port {port} --metrics-port 0 --http-port 0" \\
        --server "430fc00=cd /tmp/old && python -m server.app --port {port} --metrics-port 0"

Each `--server` is NAME=COMMAND, run by the shell with `{port}` replaced by a free port; every server is started
and SERVING before the first round, then each round sends raw MNIST `Classify` calls back to back from one
client in this process to each server in turn (no process start-up in the measurement) and records its p50.
A noisy machine slows the rounds of all servers alike; the medians of the rounds are compared. To compare with an
older commit, check it out beside this one (`git worktree add /tmp/old COMMIT`) and run its server from there.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

from loadtest.drivers import alternating_p50s
from loadtest.servers import free_port, wait_until_serving


def start(command: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    process = subprocess.Popen(
        command.replace("{port}", str(port)), shell=True, start_new_session=True, stdout=subprocess.DEVNULL
    )
    target = f"127.0.0.1:{port}"
    if not wait_until_serving(process, target, 180):
        stop(process)
        raise SystemExit(f"alternate: {command!r} did not become SERVING")
    return process, target


def stop(process: subprocess.Popen) -> None:
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(30)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        os.killpg(process.pid, signal.SIGKILL)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m loadtest.alternate",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--server", action="append", required=True, metavar="NAME=COMMAND", help="a server to time")
    parser.add_argument("--rounds", type=int, default=6, help="rounds per server")
    parser.add_argument("--seconds", type=float, default=1.5, help="length of one round")
    parser.add_argument("--json", type=Path, help="also write the rounds here")
    args = parser.parse_args(argv)
    named = [spec.split("=", 1) for spec in args.server]
    if any(len(pair) != 2 for pair in named):
        parser.error("--server takes NAME=COMMAND")
    started: list[tuple[str, subprocess.Popen, str]] = []
    try:
        for name, command in named:
            process, target = start(command)
            started.append((name, process, target))
        time.sleep(1.0)
        p50s = alternating_p50s([target for _, _, target in started], args.rounds, args.seconds)
    finally:
        for _, process, _ in started:
            stop(process)
    result = {name: {"p50_ms_rounds": rounds, "median_p50_ms": statistics.median(rounds)}
              for (name, _), rounds in zip(named, p50s, strict=True)}  # fmt: skip
    for name, values in result.items():
        rounds = ", ".join(f"{v:.3f}" for v in values["p50_ms_rounds"])
        print(f"{name:<16} median p50 {values['median_p50_ms']:.3f} ms  (rounds {rounds})")
    if args.json:
        args.json.write_text(json.dumps({"command": sys.argv, **result}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
