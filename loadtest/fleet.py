"""A fleet that loses no call, on this machine: replicas on loopback addresses, one round-robin client, a replica
killed, one drained, one added.

    python -m loadtest.fleet --out reports/fleet      # fleet.json, fleet.md, fleet.png (calls per replica over time)

Three `mnist-serve` replicas listen on 127.0.0.2, .3 and .4 (one port: each address stands for a machine); a
fourth address, 127.0.0.5, is listed from the start but serves nothing yet. Client threads share one channel over
the four (server/balancing.py: round-robin, UNAVAILABLE retried on another replica) and send `Classify` back to
back. Every `--phase-seconds`: the first replica is killed (SIGKILL), the second drained (SIGTERM: NOT_SERVING,
then calls refused UNAVAILABLE while the ones in flight finish), the fourth started. Every replica's `/metrics` is
read every tick, so the calls each answered are known over time. The verdict: no call failed, and the added
replica took at least `ADDED_SHARE` of a tick's calls within `ADDED_WITHIN_S` of reporting SERVING.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import threading
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from loadtest.servers import ServerProcess, free_port

ADDRESSES = ("127.0.0.2", "127.0.0.3", "127.0.0.4", "127.0.0.5")  # the last one starts late
ADDED_SHARE = 0.15  # the added replica must answer at least this share of a tick's calls ...
ADDED_WITHIN_S = 5.0  # ... this soon after it reports SERVING
TICK_S = 0.5
RAW = bytes(range(200)) * 3 + bytes(184)  # 784 bytes with ink: the null engine answers any raw image
SERVER_FLAGS = ("--backend", "null", "--drain-seconds", "1", "--grace-seconds", "5")
_SERVED = re.compile(r'^mnist_requests_total\{(?=[^}]*method="Classify")(?=[^}]*code="OK")[^}]*\} (\S+)$', re.M)


@dataclass
class FleetRun:
    """What happened: the client's calls by outcome, each replica's answered calls per tick, and the events."""

    clients: int
    phase_seconds: float
    codes: dict[str, int] = field(default_factory=dict)
    ticks: list[float] = field(default_factory=list)  # seconds since the load started
    served: dict[str, list[float]] = field(default_factory=dict)  # replica -> calls answered in each tick
    events: list[tuple[float, str]] = field(default_factory=list)
    added_serving_at: float | None = None
    added_share_at: float | None = None  # first tick's end at which the added replica answered >= ADDED_SHARE

    @property
    def failed(self) -> int:
        return sum(n for code, n in self.codes.items() if code != "OK")

    @property
    def passed(self) -> bool:
        return self.failed == 0 and self.added_within() is not None and self.added_within() <= ADDED_WITHIN_S

    def added_within(self) -> float | None:
        if self.added_serving_at is None or self.added_share_at is None:
            return None
        return max(0.0, self.added_share_at - self.added_serving_at)

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "failed": self.failed, "passed": self.passed, "added_within_s": self.added_within()}


def served_calls(host: str, metrics_port: int) -> float | None:
    """Classify calls the replica answered OK so far, from its /metrics; None when it cannot be read (down)."""
    try:
        text = urllib.request.urlopen(f"http://{host}:{metrics_port}/metrics", timeout=1).read().decode()
    except OSError:
        return None
    found = _SERVED.search(text)
    return float(found.group(1)) if found else 0.0


class _Load:
    """`clients` threads sending Classify back to back over one channel to every listed replica; codes counted."""

    def __init__(self, servers: str, clients: int) -> None:
        from server.client import ClassifierClient

        self.client = ClassifierClient(servers, timeout=10)
        self.codes: dict[str, int] = {}
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._send, daemon=True) for _ in range(clients)]

    def _send(self) -> None:
        import grpc

        from proto.mnist.v1 import classifier_pb2 as pb

        request = pb.ClassifyRequest(raw=RAW)
        while not self.stop.is_set():
            try:
                self.client.stub.Classify(request, timeout=10)
                code = "OK"
            except grpc.RpcError as error:
                code = f"{error.code().name}: {error.details()}"
            with self.lock:
                self.codes[code] = self.codes.get(code, 0) + 1

    def __enter__(self) -> _Load:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(15)
        self.client.close()


def run_fleet(clients: int = 4, phase_seconds: float = 3.0, max_connection_age: float = 5.0) -> FleetRun:
    """The scenario of the module's docstring; returns what happened (raises only if a replica cannot start)."""
    port = free_port()
    flags = [*SERVER_FLAGS, "--max-connection-age", f"{max_connection_age:g}"]
    metrics_ports = {address: free_port() for address in ADDRESSES}
    replicas = {
        address: ServerProcess(flags, port=port, host=address, metrics_port=metrics_ports[address], wait_s=60)
        for address in ADDRESSES
    }
    run = FleetRun(clients, phase_seconds)
    last = {address: 0.0 for address in ADDRESSES}
    run.served = {address: [] for address in ADDRESSES}
    starters = [threading.Thread(target=replicas[address].start) for address in ADDRESSES[:3]]
    for starter in starters:
        starter.start()
    for starter in starters:
        starter.join()
    added = ADDRESSES[3]
    try:
        with _Load(",".join(f"{address}:{port}" for address in ADDRESSES), clients) as load:
            started = time.monotonic()
            plan = [
                (phase_seconds, "kill", ADDRESSES[0]),
                (2 * phase_seconds, "drain", ADDRESSES[1]),
                (3 * phase_seconds, "add", added),
            ]
            ends = 4 * phase_seconds + ADDED_WITHIN_S
            adding: threading.Thread | None = None
            while (now := time.monotonic() - started) < ends:
                if plan and now >= plan[0][0]:
                    _, action, address = plan.pop(0)
                    run.events.append((round(now, 2), f"{action} {address}"))
                    if action == "kill":
                        replicas[address].process.kill()
                    elif action == "drain":
                        replicas[address].process.terminate()
                    else:
                        adding = threading.Thread(target=replicas[address].start)
                        adding.start()
                time.sleep(TICK_S - (time.monotonic() - started) % TICK_S)
                run.ticks.append(round(time.monotonic() - started, 2))
                for address in ADDRESSES:
                    now_served = served_calls(address, metrics_ports[address])
                    if now_served is None:  # down (or not up yet): answered nothing this tick
                        run.served[address].append(0.0)
                        continue
                    run.served[address].append(now_served - last[address])
                    last[address] = now_served
                if adding is not None and not adding.is_alive() and run.added_serving_at is None:
                    run.added_serving_at = round(time.monotonic() - started, 2)
                    run.events.append((run.added_serving_at, f"{added} SERVING"))
                total = sum(run.served[address][-1] for address in ADDRESSES)
                if run.added_serving_at is not None and run.added_share_at is None and total:
                    if run.served[added][-1] / total >= ADDED_SHARE:
                        run.added_share_at = run.ticks[-1]
            run.codes = dict(load.codes)
    finally:
        for replica in replicas.values():
            replica.stop(15)
    return run


def markdown(run: FleetRun) -> str:
    from loadtest.check import commit

    lines = [
        f"`python -m loadtest.fleet` on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, commit {commit()}: "
        f"{run.clients} client threads, one round-robin channel over {', '.join(ADDRESSES)}; phases of "
        f"{run.phase_seconds:g} s",
        "",
        f"- calls: {sum(run.codes.values()):,}, failed: **{run.failed}** ({run.codes})",
        f"- events: {'; '.join(f'{t:g} s {what}' for t, what in run.events)}",
        f"- the added replica answered >= {ADDED_SHARE:.0%} of a tick's calls "
        + (f"{run.added_within():.1f} s after SERVING" if run.added_within() is not None else "never"),
        f"- verdict: **{'PASS' if run.passed else 'FAIL'}**",
    ]
    return "\n".join(lines) + "\n"


def plot(run: FleetRun, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(9, 4))
    for address in ADDRESSES:
        axis.plot(run.ticks, [n / TICK_S for n in run.served[address]], label=address)
    for at, what in run.events:
        axis.axvline(at, color="grey", linestyle=":", linewidth=1)
        axis.text(at, axis.get_ylim()[1] * 0.95, what, rotation=90, fontsize=7, va="top", ha="right")
    axis.set_xlabel("seconds since the load started")
    axis.set_ylabel("calls answered per second")
    axis.set_title(f"calls per replica; {sum(run.codes.values()):,} calls, {run.failed} failed")
    axis.legend(loc="upper left", fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest.fleet", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for fleet.json, fleet.md and fleet.png")
    parser.add_argument("--clients", type=int, default=4, help="client threads sharing the round-robin channel")
    parser.add_argument("--phase-seconds", type=float, default=4.0, help="time between kill, drain and add")
    parser.add_argument("--max-connection-age", type=float, default=5.0, help="the replicas' --max-connection-age")
    args = parser.parse_args(argv)
    run = run_fleet(args.clients, args.phase_seconds, args.max_connection_age)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "fleet.json").write_text(json.dumps(run.as_dict(), indent=2) + "\n")
    (args.out / "fleet.md").write_text(markdown(run))
    plot(run, args.out / "fleet.png")
    print(markdown(run), end="")
    return 0 if run.passed else 1


if __name__ == "__main__":
    sys.exit(main())
