"""Frontend workers: what `mnist-serve --workers N` answers for N = 1, 2, 4, 8, and at what CPU per call.

    python -m loadtest.processes --counts 1,2,4,8 --clients 64 --seconds 3 --json OUT.json [--server-args "..."]

Each count is a fresh `mnist-serve --workers N` (server/supervisor.py): N worker processes on one port (SO_REUSEPORT:
the kernel spreads the clients' connections over them), each a whole server with its own event loop, gRPC core
and engine. With the null backend (the default here) that measures the frontend alone, the part one Python process
caps (issue 23); with `--server-args "--backend onnxruntime"` the bundled model, one engine per worker. Reported:
calls/s at a closed loop of `--clients` client processes, server CPU per call (the supervisor's and every
worker's `/proc` time over the loop) and each worker's share of that CPU (how evenly the kernel spread the
connections). Counts run one after another, each `--rounds` times, never two servers at once (an idle engine
that spins would take CPU from the one measured).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np

from loadtest.cpu_cost import process_cpu_seconds
from loadtest.drivers import closed_loop
from loadtest.servers import ServerProcess, free_port

READY_WAIT_S = 180.0


def worker_pids(supervisor: int) -> list[int]:
    """The supervisor's children: its workers (a one-worker server has none: it serves itself)."""
    try:
        return [int(pid) for pid in Path(f"/proc/{supervisor}/task/{supervisor}/children").read_text().split()]
    except OSError:
        return []


def wait_until_ready(metrics_port: int, seconds: float = READY_WAIT_S) -> None:
    """Until /readyz says every worker is ready (gRPC SERVING means only that one of them is)."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/readyz", timeout=5) as reply:
                if reply.status == 200:
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise SystemExit(f"mnist-bench: the workers were not all ready within {seconds:g} s")
        time.sleep(0.2)


def measure_one(count: int, clients: int, seconds: float, server_args: list[str]) -> dict[str, Any]:
    metrics_port = free_port()
    server = ServerProcess([*server_args, "--workers", str(count)], metrics_port=metrics_port, wait_s=READY_WAIT_S)
    server.start()
    try:
        wait_until_ready(metrics_port)
        closed_loop(server.target, clients=clients, seconds=min(1.0, seconds))  # warm every connection path
        pids = [server.process.pid, *worker_pids(server.process.pid)]
        before = [process_cpu_seconds(pid) for pid in pids]
        started = time.monotonic()
        result = closed_loop(server.target, clients=clients, seconds=seconds)
        elapsed = time.monotonic() - started
        used = [process_cpu_seconds(pid) - cpu for pid, cpu in zip(pids, before, strict=True)]
    finally:
        server.stop(30)
    calls = len(result.latencies_s)
    workers = used[1:] or used  # one worker: the server process is the worker
    return {
        "workers": count,
        "clients": clients,
        "calls": calls,
        "calls_per_second": calls / seconds,
        "p50_ms": float(np.percentile(result.latencies_s, 50) * 1000) if calls else None,
        "p99_ms": float(np.percentile(result.latencies_s, 99) * 1000) if calls else None,
        "server_cpu_us_per_call": 1e6 * sum(used) / max(calls, 1),
        "supervisor_cpu_us_per_call": 1e6 * used[0] / max(calls, 1) if count > 1 else 0.0,
        "server_cores": sum(used) / elapsed,
        "cpu_share_per_worker": [u / max(sum(workers), 1e-9) for u in workers],
        "errors": dict(result.errors),
    }


def measure(counts: list[int], clients: int, seconds: float, server_args: list[str], rounds: int = 1) -> dict:
    """Every count `rounds` times, in turn; each count's row is its median round (by calls/s), all rounds kept."""
    runs: dict[int, list[dict[str, Any]]] = {count: [] for count in counts}
    for _ in range(rounds):
        for count in counts:
            runs[count].append(measure_one(count, clients, seconds, server_args))
    rows = []
    for count in counts:
        ordered = sorted(runs[count], key=lambda row: row["calls_per_second"])
        median = ordered[(len(ordered) - 1) // 2]
        rows.append({**median, "rounds_calls_per_second": [round(r["calls_per_second"]) for r in runs[count]],
                     "rounds_cpu_us_per_call": [round(r["server_cpu_us_per_call"]) for r in runs[count]]})  # fmt: skip
    return {"server_args": server_args, "seconds": seconds, "rounds": rounds, "rows": rows}


def describe(result: dict[str, Any]) -> str:
    lines = []
    for row in result["rows"]:
        shares = ", ".join(f"{share:.0%}" for share in row["cpu_share_per_worker"])
        errors = f"; errors {row['errors']}" if row["errors"] else ""
        lines.append(
            f"{row['workers']} worker(s): {row['calls_per_second']:,.0f} calls/s at {row['clients']} clients "
            f"(rounds {row['rounds_calls_per_second']}), p99 {row['p99_ms'] or 0:.1f} ms, "
            f"{row['server_cpu_us_per_call']:.0f} us of server CPU per call (rounds {row['rounds_cpu_us_per_call']}; "
            f"supervisor {row['supervisor_cpu_us_per_call']:.0f}), {row['server_cores']:.2f} cores; "
            f"worker shares {shares}{errors}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest.processes", description=__doc__.split("\n\n")[0])
    parser.add_argument("--counts", default="1,2,4,8", help="numbers of workers (mnist-serve --workers), in turn")
    parser.add_argument("--clients", type=int, default=64, help="closed-loop client processes, one call in flight each")
    parser.add_argument("--seconds", type=float, default=3.0, help="length of each count's closed loop")
    parser.add_argument("--server-args", default="--backend null", help="mnist-serve flags (besides --workers)")
    parser.add_argument("--rounds", type=int, default=1, help="measure every count this many times, in turn")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args(argv)
    counts = [int(part) for part in args.counts.split(",") if part.strip()]
    if not counts or min(counts) < 1:
        parser.error("--counts: give whole numbers of at least 1, e.g. 1,2,4,8")
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    result = measure(counts, args.clients, args.seconds, shlex.split(args.server_args), args.rounds)
    print(describe(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    failed = any(row["errors"] or not row["calls"] for row in result["rows"])
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
