"""Frontend processes on one port: what 1, 2, 4, 8 `mnist-serve` processes bound to the same port answer together.

    python -m loadtest.processes --counts 1,2,4,8 --clients 64 --seconds 3 --json OUT.json [--server-args "..."]

gRPC binds with SO_REUSEPORT, so several server processes can listen on one port and the kernel spreads the
clients' connections over them: each is a whole server (its own event loop, gRPC core and engine). With the null
backend (the default here) that measures the frontend alone, the part one Python process caps (issue 23): calls/s
at a closed loop of `--clients` client processes, server CPU per call (all the servers' `/proc` time over the
loop) and each process's share of that CPU (how evenly the kernel spread the connections). Processes are added
one count after another and kept, so every count is measured on servers already warm.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from loadtest.cpu_cost import process_cpu_seconds
from loadtest.drivers import closed_loop
from loadtest.servers import ServerProcess, free_port


def measure(counts: list[int], clients: int, seconds: float, server_args: list[str]) -> dict[str, Any]:
    """One row per count of processes on one port, each from its own closed loop of new client connections."""
    port = free_port()
    running: list[ServerProcess] = []
    rows = []
    try:
        for count in sorted(counts):
            while len(running) < count:
                running.append(ServerProcess(server_args, port=port, wait_s=120).start())
            pids = [server.process.pid for server in running]
            before = [process_cpu_seconds(pid) for pid in pids]
            started = time.monotonic()
            result = closed_loop(running[0].target, clients=clients, seconds=seconds)
            elapsed = time.monotonic() - started
            used = [process_cpu_seconds(pid) - cpu for pid, cpu in zip(pids, before, strict=True)]
            calls = len(result.latencies_s)
            rows.append(
                {
                    "processes": count,
                    "clients": clients,
                    "calls": calls,
                    "calls_per_second": calls / seconds,
                    "p50_ms": float(np.percentile(result.latencies_s, 50) * 1000) if calls else None,
                    "p99_ms": float(np.percentile(result.latencies_s, 99) * 1000) if calls else None,
                    "server_cpu_us_per_call": 1e6 * sum(used) / max(calls, 1),
                    "server_cores": sum(used) / elapsed,
                    "cpu_share_per_process": [u / max(sum(used), 1e-9) for u in used],
                    "errors": dict(result.errors),
                }
            )
    finally:
        for server in running:
            server.stop(15)
    return {"server_args": server_args, "seconds": seconds, "rows": rows}


def describe(result: dict[str, Any]) -> str:
    lines = []
    for row in result["rows"]:
        shares = ", ".join(f"{share:.0%}" for share in row["cpu_share_per_process"])
        errors = f"; errors {row['errors']}" if row["errors"] else ""
        lines.append(
            f"{row['processes']} process(es): {row['calls_per_second']:,.0f} calls/s at {row['clients']} clients, "
            f"p99 {row['p99_ms'] or 0:.1f} ms, {row['server_cpu_us_per_call']:.0f} us of server CPU per call "
            f"({row['server_cores']:.2f} cores; shares {shares}){errors}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest.processes", description=__doc__.split("\n\n")[0])
    parser.add_argument("--counts", default="1,2,4,8", help="numbers of processes on the one port, in turn")
    parser.add_argument("--clients", type=int, default=64, help="closed-loop client processes, one call in flight each")
    parser.add_argument("--seconds", type=float, default=3.0, help="length of each count's closed loop")
    parser.add_argument("--server-args", default="--backend null", help="mnist-serve flags of every process")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args(argv)
    counts = [int(part) for part in args.counts.split(",") if part.strip()]
    if not counts or min(counts) < 1:
        parser.error("--counts: give whole numbers of at least 1, e.g. 1,2,4,8")
    result = measure(counts, args.clients, args.seconds, shlex.split(args.server_args))
    print(describe(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    failed = any(row["errors"] or not row["calls"] for row in result["rows"])
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
