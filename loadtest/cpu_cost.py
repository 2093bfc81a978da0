"""Server CPU seconds per call, read from /proc: what a refused call costs the server against an echo server's call.

A server that sheds load must shed it cheaply, or refusing becomes the new overload. Both figures come from the
same open loop (a fixed rate, so neither server sets its own pace) and the server process's own CPU time
(`/proc/PID/stat`: user + system, every thread) over the seconds the calls were sent, less what the process spent
over the same time on other work (measured for a second just before, with no call in flight: the holders' batches
below, about 17 us per refused call at 800 calls/s):

- **echo**: `loadtest/echo_server.py` answers every call at once: one ordinary call of Python gRPC here;
- **grpc.aio's refusal**: the echo server with `--refuse-all`: grpc.aio's own concurrency limit refuses every call
  before any handler runs, the cheapest refusal grpc.aio has (the floor for the next line);
- **refusal**: `mnist-serve` whose engine is kept busy by two clients of slow batches (the null engine with
  `--null-device-ms 200+0`: 200 ms per batch, no CPU), so that every call of the open loop, sent with a 20 ms
  deadline, is refused RESOURCE_EXHAUSTED at admission (it could not be answered before its deadline), before its
  message is read (server/transport/guards.py `UnreadRefusal`): where a standing queue's refusals happen too.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from loadtest.drivers import open_loop

DEVICE_MS = "200+0"  # the engine's batches while refusals are measured: slow, and no CPU
REFUSED_DEADLINE_S = 0.02  # shorter than any batch of DEVICE_MS: every call is refused at admission
HOLDERS = 2  # clients that keep one batch running and one queued, so the engine is never idle
BACKGROUND_S = 1.0  # before each open loop: the server's CPU without it (the holders' batches: about 17 us a call)


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process `pid` so far, all its threads (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def background_cores(pid: int, seconds: float = BACKGROUND_S) -> float:
    """Cores process `pid` uses with no call of the open loop in flight (the engine holders' batches, timers)."""
    cpu0, t0 = process_cpu_seconds(pid), time.monotonic()
    time.sleep(seconds)
    return (process_cpu_seconds(pid) - cpu0) / (time.monotonic() - t0)


@dataclass
class CpuPerCall:
    label: str
    rate: float  # calls per second sent
    calls: int  # calls sent within the measured window
    cpu_seconds: float  # the server's, over the window
    window_seconds: float
    codes: dict[str, int]  # how the whole run's calls ended
    background_cores: float = 0.0  # the server's CPU without the open loop, measured just before: not the calls'

    @property
    def microseconds_per_call(self) -> float:
        own = self.cpu_seconds - self.background_cores * self.window_seconds
        return 1e6 * max(own, 0.0) / max(self.calls, 1)

    @property
    def cores(self) -> float:
        return self.cpu_seconds / self.window_seconds

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "microseconds_per_call": self.microseconds_per_call, "cores": self.cores}


def cpu_per_call(
    label: str, target: str, pid: int, rate: float, seconds: float, deadline_s: float, processes: int = 2
) -> CpuPerCall:
    """An open loop at `rate` for `seconds`; the server's CPU over its middle (the first and last 0.5 s left out),
    less what it spent on other work over the same time (`background_cores`, measured first)."""
    background = background_cores(pid)
    window: dict[str, float] = {}
    samplers: list[threading.Thread] = []

    def sample(start_at: float) -> None:
        time.sleep(max(0.0, start_at + 0.5 - time.time()))
        window["cpu0"], window["t0"] = process_cpu_seconds(pid), time.monotonic()
        time.sleep(max(0.0, start_at + seconds - 0.5 - time.time()))
        window["cpu1"], window["t1"] = process_cpu_seconds(pid), time.monotonic()

    def on_start(start_at: float) -> None:
        samplers.append(threading.Thread(target=sample, args=(start_at,), daemon=True))
        samplers[0].start()

    result = open_loop(target, rate, seconds, processes, deadline_s=deadline_s, on_start=on_start)
    samplers[0].join()
    codes = dict(result.errors)
    codes["OK"] = len(result.latencies_s)
    span = window["t1"] - window["t0"]
    return CpuPerCall(label, rate, round(rate * span), window["cpu1"] - window["cpu0"], span, codes, background)


class BusyEngine:
    """Clients that keep a slow engine busy (one batch running, one queued) for the length of a `with` block, once
    the server has seen enough of its runs to judge its speed."""

    def __init__(self, target: str, count: int = HOLDERS) -> None:
        self.target, self.count = target, count
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._hold, daemon=True) for _ in range(count)]
        self.runs = 0

    def _hold(self) -> None:
        import grpc

        from proto.mnist.v1 import classifier_pb2 as pb
        from proto.mnist.v1 import classifier_pb2_grpc as pb_grpc

        request = pb.ClassifyRequest(raw=bytes(range(200)) * 3 + bytes(184))
        with grpc.insecure_channel(self.target, options=[("grpc.use_local_subchannel_pool", 1)]) as channel:
            stub = pb_grpc.ClassifierStub(channel)
            while not self.stop.is_set():
                stub.Classify(request, timeout=30)
                self.runs += 1

    def __enter__(self) -> BusyEngine:
        for thread in self.threads:
            thread.start()
        deadline = time.monotonic() + 30
        while self.runs < 12 and time.monotonic() < deadline:  # the engine's speed is known after 8 runs
            time.sleep(0.05)
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(5)


class _RefusingEcho:
    """`loadtest.echo_server --refuse-all` on a free port (no health check can tell it is up: it refuses those too)."""

    def __enter__(self) -> _RefusingEcho:
        from loadtest.servers import free_port

        self.port = free_port()
        command = [sys.executable, "-m", "loadtest.echo_server", "--port", str(self.port), "--refuse-all"]
        self.process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
        line = self.process.stdout.readline()  # printed once the slot is held
        if "refusing every call" not in line:
            self.process.kill()
            raise RuntimeError(f"echo server --refuse-all did not start: {line!r}")
        return self

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def __exit__(self, *exc: object) -> None:
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()


def refusal_cost(rate: float = 800.0, seconds: float = 3.0, rounds: int = 3) -> dict[str, Any]:
    """Server CPU per refused call against per echo call: the three servers run side by side and take the same open
    loop in turn, `rounds` times, so that all see the same minutes of a noisy machine; medians compared. The ratios
    are the refusals' relative costs: grpc.aio's own (its floor) and the server's."""
    from loadtest.servers import ServerProcess

    with (
        ServerProcess([], echo=True) as echo,
        _RefusingEcho() as floor,
        ServerProcess(["--backend", "null-threaded", "--null-device-ms", DEVICE_MS]) as server,
        BusyEngine(server.target),
    ):
        measured: dict[str, list[CpuPerCall]] = {"echo": [], "grpc_refusal": [], "refusal": []}
        for _ in range(rounds):
            measured["echo"].append(cpu_per_call("echo", echo.target, echo.process.pid, rate, seconds, 1.0))
            measured["grpc_refusal"].append(
                cpu_per_call("grpc.aio refusal", floor.target, floor.process.pid, rate, seconds, 1.0)
            )
            measured["refusal"].append(
                cpu_per_call("refusal", server.target, server.process.pid, rate, seconds, REFUSED_DEADLINE_S)
            )
    median = {name: statistics.median(m.microseconds_per_call for m in runs) for name, runs in measured.items()}
    refused = sum(m.codes.get("RESOURCE_EXHAUSTED", 0) for m in measured["refusal"])
    return {
        "rate": rate,
        "rounds": {name: [m.as_dict() for m in runs] for name, runs in measured.items()},
        "microseconds_per_call": median,
        "ratio": median["refusal"] / median["echo"],
        "grpc_ratio": median["grpc_refusal"] / median["echo"],
        "refused_share": refused / max(sum(sum(m.codes.values()) for m in measured["refusal"]), 1),
    }


def describe(result: dict[str, Any]) -> str:
    us = result["microseconds_per_call"]
    rounds = ", ".join(f"{m['microseconds_per_call']:.0f}" for m in result["rounds"]["refusal"])
    echo_rounds = ", ".join(f"{m['microseconds_per_call']:.0f}" for m in result["rounds"]["echo"])
    return (
        f"{us['refusal']:.0f} us of server CPU per refused call (rounds {rounds}) = {result['ratio']:.2f}x the "
        f"{us['echo']:.0f} us per echo call ({echo_rounds}); grpc.aio's own refusal {us['grpc_refusal']:.0f} us = "
        f"{result['grpc_ratio']:.2f}x; at {result['rate']:.0f} calls/s; {100 * result['refused_share']:.1f}% refused"
    )


def answered_cost(rate: float = 300.0, seconds: float = 3.0, rounds: int = 3) -> dict[str, Any]:
    """Server CPU per answered single-image Classify: the echo server, `mnist-serve --backend null` (every step but
    inference) and the CPU default (the bundled model), side by side, the same open loop in turn, `rounds` times;
    medians. The figures the capacity model in docs/performance.md starts from."""
    from loadtest.servers import ServerProcess

    with (
        ServerProcess([], echo=True) as echo,
        ServerProcess(["--backend", "null"]) as null,
        ServerProcess([]) as model,
    ):
        servers = {"echo": echo, "null": null, "bundled model": model}
        measured: dict[str, list[CpuPerCall]] = {name: [] for name in servers}
        for _ in range(rounds):
            for name, server in servers.items():
                measured[name].append(cpu_per_call(name, server.target, server.process.pid, rate, seconds, 1.0))
    return {
        "rate": rate,
        "rounds": {name: [m.as_dict() for m in runs] for name, runs in measured.items()},
        "microseconds_per_call": {
            name: statistics.median(m.microseconds_per_call for m in runs) for name, runs in measured.items()
        },
    }


def main(argv: list[str] | None = None) -> int:
    import argparse
    import json

    parser = argparse.ArgumentParser(prog="python -m loadtest.cpu_cost", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--answered",
        action="store_true",
        help="CPU per answered call (echo, null, bundled model) instead of per refused call",
    )
    parser.add_argument("--rate", type=float, help="calls per second of the open loop (default 800, answered: 300)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds per server")
    parser.add_argument("--json", type=Path, help="also write the result here")
    args = parser.parse_args(argv)
    if args.answered:
        result = answered_cost(args.rate or 300.0, rounds=args.rounds)
        line = ", ".join(f"{name} {us:.0f} us" for name, us in result["microseconds_per_call"].items())
        print(f"server CPU per answered call at {result['rate']:.0f} calls/s: {line}")
    else:
        result = refusal_cost(args.rate or 800.0, rounds=args.rounds)
        print(describe(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
