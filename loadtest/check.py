"""`mnist-bench --check`: the hot path as a whole, against its limits, in about 90 s; one PASS/FAIL line each.

Run it before every change to server/ is submitted. Each line is measured in this run, on this machine, against
its own limit measured beside it (the bare echo server, the bare model session), so a slow or noisy machine moves
both sides alike; the limits are in loadtest/check.toml.

1. **ceiling**: `mnist-serve --backend null` against the echo server (loadtest/echo_server.py), same clients:
   Classify at 1 client (p50 added) and 16 clients (share of calls/s), ClassifyBatch (share of images/s);
2. **overhead**: the bundled model at 1 client against its bare session, interleaved (p50 added);
3. **mix**: `mnist-loadtest` closed loop (raw, encoded and batch calls) against the CPU default: no refusal;
4. **refusal**: server CPU per refused call against per echo call (loadtest/cpu_cost.py).

Writes DIR/check.json and DIR/check.md (date, commit, machine, every line) and exits 1 when a line fails.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
import time
import tomllib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from loadtest.drivers import alternating_p50s, classify_p50, closed_loop, sample_digits
from loadtest.machine import describe_machine
from loadtest.servers import ServerProcess
from proto.contract import INPUT_SHAPE
from server.config import BUNDLED_MODEL

LIMITS = Path(__file__).with_name("check.toml")
REPO_ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Line:
    name: str
    passed: bool
    measured: str
    limit: str
    data: dict[str, Any] = field(default_factory=dict)

    def __str__(self) -> str:
        return f"{'PASS' if self.passed else 'FAIL'} {self.name}: {self.measured} (limit: {self.limit})"


def commit() -> str:
    """The checked-out commit, with `+dirty` when the tree has changes (what was measured, exactly); recorded
    results (loadtest/results, where a check may be writing) do not count."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=REPO_ROOT)
        status = ["git", "status", "--porcelain", "--untracked-files=no", "--", ".", ":(exclude)loadtest/results"]
        dirty = subprocess.run(status, capture_output=True, text=True, cwd=REPO_ROOT)
    except OSError:
        return "unknown"
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "") if head.returncode == 0 else "unknown"


# --- 1. the ceiling ------------------------------------------------------------------------------------------------


def _throughput(target: str, seconds: float, batch_images: int, batch_clients: int) -> dict[str, Any]:
    sixteen = closed_loop(target, 16, seconds)
    batch = closed_loop(target, batch_clients, seconds, batch_images)
    return {
        "c16_calls_per_second": len(sixteen.latencies_s) / sixteen.seconds,
        "batch_images_per_second": len(batch.latencies_s) * batch_images / batch.seconds,
        "errors": {**sixteen.errors, **batch.errors},
    }


def check_ceiling(limits: dict[str, Any], seconds: float) -> list[Line]:
    images, clients = int(limits["batch_images"]), int(limits["batch_clients"])
    null_args = ["--backend", "null", "--max-request-images", str(max(256, images))]
    with ServerProcess([], echo=True) as echo, ServerProcess(null_args) as null:
        bare_p50s, our_p50s = alternating_p50s([echo.target, null.target], int(limits["rounds"]), seconds / 2)
        bare = _throughput(echo.target, seconds, images, clients)
        ours = _throughput(null.target, seconds, images, clients)
    bare["c1_p50_ms"], ours["c1_p50_ms"] = statistics.median(bare_p50s), statistics.median(our_p50s)
    data = {"echo": {**bare, "c1_p50_rounds_ms": bare_p50s}, "null": {**ours, "c1_p50_rounds_ms": our_p50s}}
    added = ours["c1_p50_ms"] - bare["c1_p50_ms"]
    share16 = ours["c16_calls_per_second"] / bare["c16_calls_per_second"]
    share_batch = ours["batch_images_per_second"] / bare["batch_images_per_second"]
    errors = f"; errors {ours['errors']}" if ours["errors"] else ""
    return [
        Line(
            "ceiling.one-client",
            added <= limits["one_client_p50_added_ms"],
            f"null p50 {ours['c1_p50_ms']:.3f} ms (rounds {_listed(our_p50s)}), echo {bare['c1_p50_ms']:.3f} ms "
            f"({_listed(bare_p50s)}): +{added:.3f} ms",
            f"+{limits['one_client_p50_added_ms']} ms",
            data,
        ),
        Line(
            "ceiling.sixteen-clients",
            share16 >= limits["sixteen_clients_share"] and not ours["errors"],
            f"null {ours['c16_calls_per_second']:,.0f} calls/s, echo {bare['c16_calls_per_second']:,.0f}: "
            f"{100 * share16:.1f}%{errors}",
            f">= {100 * limits['sixteen_clients_share']:.0f}%",
        ),
        Line(
            "ceiling.batch",
            share_batch >= limits["batch_share"] and not ours["errors"],
            f"ClassifyBatch {images} x {clients} clients: null {ours['batch_images_per_second']:,.0f} images/s, "
            f"echo {bare['batch_images_per_second']:,.0f}: {100 * share_batch:.1f}%",
            f">= {100 * limits['batch_share']:.0f}%",
        ),
    ]


def _listed(values: list[float]) -> str:
    return ", ".join(f"{value:.3f}" for value in values)


# --- 2. the mix, and 3. the overhead over the bare session ---------------------------------------------------------


def run_mix(target: str, users: int, seconds: float, out: Path) -> dict[str, Any]:
    command = [sys.executable, "-m", "loadtest.run", "--host", target, "--users", str(users), "--spawn-rate"]
    command += [str(users), "--run-time", f"{seconds:g}s", "--slo-p99-ms", "60000", "--max-error-ratio", "1"]
    command += ["--min-accuracy", "0", "--report-dir", str(out)]
    finished = subprocess.run(command, capture_output=True, text=True, cwd=REPO_ROOT, timeout=seconds + 120)
    runs = sorted(out.iterdir()) if out.is_dir() else []
    if finished.returncode not in (0, 1) or not runs:
        raise RuntimeError(f"mnist-loadtest failed:\n{finished.stdout}\n{finished.stderr}")
    return json.loads((runs[-1] / "verdict.json").read_text())


def check_mix(target: str, limits: dict[str, Any]) -> Line:
    """Locust's own reports go to a temporary folder: the verdict, kept in check.json, is what the line needs."""
    with tempfile.TemporaryDirectory() as reports:
        verdict = run_mix(target, int(limits["users"]), float(limits["seconds"]), Path(reports))
    refused = verdict["errors"].get("RESOURCE_EXHAUSTED", 0)
    others = {code: n for code, n in verdict["errors"].items() if code != "RESOURCE_EXHAUSTED"}
    total = verdict["total"]
    return Line(
        "mix.no-refusal",
        refused <= limits["refused"] and not others,
        f"{limits['users']} users, {total['requests']:,} calls ({total['requests_per_second']:.0f}/s, p99 "
        f"{total['p99_ms']:.0f} ms): {refused} RESOURCE_EXHAUSTED" + (f", other failures {others}" if others else ""),
        f"{limits['refused']} refused, no other failure",
        {"verdict": verdict},
    )


def _session_p50s(backend: Any, image: np.ndarray, seconds: float) -> float:
    latencies, started = [], time.perf_counter()
    while time.perf_counter() - started < seconds:
        t0 = time.perf_counter()
        backend.run(image)
        latencies.append(time.perf_counter() - t0)
    return float(np.percentile(latencies, 50) * 1000)


def check_overhead(target: str, limits: dict[str, Any], seconds: float) -> Line:
    """The bare session and the server at 1 client, in alternating rounds: what the server adds to one call."""
    import grpc

    from proto.mnist.v1 import classifier_pb2 as pb
    from proto.mnist.v1 import classifier_pb2_grpc as pb_grpc
    from server.config import load_config
    from server.engine.backends import build_backend

    backend = build_backend(load_config(["--model", str(BUNDLED_MODEL)], environ={}))
    backend.warm_up()
    digits = sample_digits(64)
    image = np.ascontiguousarray(backend.describe().normalization.apply(digits[:1]).reshape(1, *INPUT_SHAPE))
    requests = [pb.ClassifyRequest(raw=digit.tobytes()) for digit in digits]
    session, served = [], []
    with grpc.insecure_channel(target) as channel:
        stub = pb_grpc.ClassifierStub(channel)
        classify_p50(stub, requests, 0.3)  # connected and warm
        for _ in range(int(limits["rounds"])):
            session.append(_session_p50s(backend, image, seconds))
            served.append(classify_p50(stub, requests, seconds))
    backend.close()
    added = statistics.median(served) - statistics.median(session)
    return Line(
        "overhead.one-client",
        added <= limits["p50_added_ms"],
        f"bundled model: server p50 {statistics.median(served):.3f} ms (rounds {_listed(served)}), bare session "
        f"{statistics.median(session):.3f} ms ({_listed(session)}): +{added:.3f} ms",
        f"+{limits['p50_added_ms']} ms",
        {"server_p50_ms": served, "session_p50_ms": session},
    )


# --- 4. what a refusal costs ---------------------------------------------------------------------------------------


def check_refusal(limits: dict[str, Any]) -> Line:
    from loadtest.cpu_cost import describe, refusal_cost

    result = refusal_cost(float(limits["rate"]), float(limits["seconds"]), int(limits["rounds"]))
    return Line(
        "refusal.cpu",
        result["ratio"] <= limits["max_ratio"] and result["refused_share"] >= 0.99,
        describe(result),
        f"<= {limits['max_ratio']}x an echo call, >= 99% of the flood refused",
        result,
    )


# --- the command ---------------------------------------------------------------------------------------------------


def run_check(out: Path, seconds: float = 3.0, limits_path: Path = LIMITS) -> int:
    limits = tomllib.loads(limits_path.read_text())
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    lines: list[Line] = []

    def report(new: list[Line]) -> None:
        for line in new:
            print(line, flush=True)
        lines.extend(new)

    report(check_ceiling(limits["ceiling"], seconds))
    with ServerProcess([]) as cpu_default:  # the overhead first: one call at a time to a server fresh from start-up
        report([check_overhead(cpu_default.target, limits["overhead"], seconds / 2)])
        report([check_mix(cpu_default.target, limits["mix"])])
    report([check_refusal(limits["refusal"])])
    result = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "commit": commit(),
        "seconds": time.time() - started,
        "machine": describe_machine(),
        "limits": limits,
        "passed": all(line.passed for line in lines),
        "lines": [asdict(line) for line in lines],
    }
    (out / "check.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    (out / "check.md").write_text(markdown(result))
    failed = [line.name for line in lines if not line.passed]
    print(
        f"check: {len(lines) - len(failed)} PASS, {len(failed)} FAIL in {result['seconds']:.0f} s at {result['commit']}"
        f"; {out / 'check.md'}"
    )
    return 1 if failed else 0


def markdown(result: dict[str, Any]) -> str:
    machine = result["machine"]
    rows = "\n".join(
        f"| {'PASS' if line['passed'] else '**FAIL**'} | {line['name']} | {line['measured']} | {line['limit']} |"
        for line in result["lines"]
    )
    return (
        f"`mnist-bench --check` on {result['date']}, commit {result['commit']}, {machine['cpu']} "
        f"({machine['cpus']} CPUs), {result['seconds']:.0f} s\n\n"
        f"| | line | measured | limit |\n| --- | --- | --- | --- |\n{rows}\n"
    )
