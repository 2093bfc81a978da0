"""The whole GPU check in one command: `mnist-bench --suite gpu --out DIR` (under 8 minutes on an H100/H200).

Steps, each a subprocess with its own time limit and log, each run even when an earlier one failed
(unless it needs that one's output): train the README's googlenet recipe; export it to fp32 and
fp16; measure the bundled googlenet-fast's fp16 accuracy on the GPU; benchmark googlenet-fast (the
served default: fp16, NHWC, CUDA graphs, buckets 1..256) against its floor, with ClassifyBatch and
an open loop, plus floors for fp32 and for no CUDA graph; benchmark googlenet the same way; measure
the Python gRPC ceiling (echo server vs null backend); run `mnist-loadtest` with 16 users. Then one
folder: each step's JSON, PNG and log, `suite.json`, and `summary.md` with the targets judged.

`--suite smoke` runs the same steps tiny, on the CPU, in about a minute: the tests run it, so the
GPU run cannot fail on a Python error. `--dry-run` prints the steps and runs nothing.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, NoReturn

from loadtest.servers import ServerProcess
from server.config import BUNDLED_MODEL

PY = sys.executable
SLO_MS = 10.0


@dataclass
class Step:
    name: str
    command: list[str]
    timeout_s: float
    needs: list[str] = field(default_factory=list)  # steps whose success this one depends on
    server: list[str] | None = None  # mnist-serve flags: a server runs (on SERVER_PORT) while the step does
    why: str = ""


@dataclass
class Profile:
    """The sizes of everything; `gpu` is the real check, `smoke` the same shape on any CPU."""

    provider: str
    train: list[str]
    export_images: list[str]
    seconds: str
    concurrency: str
    floor_batches: str
    batch_images: str
    open_loop_rates: str
    ceiling_concurrency: str
    loadtest: list[str]
    budget_s: float  # the whole suite; steps that no longer fit are skipped (the summary says so)
    slo_ms: float = SLO_MS


PROFILES = {
    "gpu": Profile(
        provider="cuda",
        train=["--preset", "googlenet", "--epochs", "3", "--batch-size", "256", "--lr", "0.2", "--augment", "basic"],
        export_images=["--parity-images", "500", "--accuracy-images", "0"],
        seconds="3",
        concurrency="1,4,16,64",
        floor_batches="1,2,4,8,16,32,64,128,256",
        batch_images="256",
        open_loop_rates="1000,4000",
        ceiling_concurrency="1,16,64",
        loadtest=["--users", "16", "--spawn-rate", "16", "--run-time", "20s"],
        budget_s=470,  # under 8 minutes, and a device call of 10 minutes keeps room for the install
    ),
    "smoke": Profile(
        provider="cpu",
        train=[
            "--preset",
            "googlenet-fast",
            "--epochs",
            "1",
            "--batch-size",
            "64",
            "--train-limit",
            "640",
            "--eval-limit",
            "200",
        ],  # fmt: skip
        export_images=["--parity-images", "50", "--accuracy-images", "200"],
        seconds="0.5",
        concurrency="1,2",
        floor_batches="1,4",
        batch_images="8",
        open_loop_rates="40",
        ceiling_concurrency="1",
        loadtest=["--users", "2", "--spawn-rate", "2", "--run-time", "3s", "--batch-images", "4"],
        budget_s=600,
        slo_ms=5000.0,
    ),
}
SERVER_PORT, METRICS_PORT = 50651, 9651


def plan(profile_name: str, out: Path) -> list[Step]:
    """The steps in the order they run: training first, then what the serving targets need, then comparisons."""
    p = PROFILES[profile_name]
    model = out / "models" / f"{p.train[1]}.onnx"  # named after the trained preset
    fp16_bundled = BUNDLED_MODEL.with_name("googlenet-fast.fp16.onnx")
    export = [PY, "-m", "export.onnx_export", "--provider", p.provider, *p.export_images]
    bench = [PY, "-m", "loadtest.bench", "--provider", p.provider, "--seconds", p.seconds, "--floor-seconds", "1"]
    full = [*bench, "--batch-sizes", p.floor_batches, "--concurrency", p.concurrency, "--batch-images", p.batch_images]

    def floors(name: str, model_path: Path, flags: str) -> list[str]:  # three buckets: the sizes compared
        sizes = p.floor_batches.split(",")
        sizes = ",".join(dict.fromkeys([sizes[0], sizes[len(sizes) // 2], sizes[-1]]))
        return [*bench, "--skip-server", "--batch-sizes", sizes, "--model", str(model_path),
                f"--server-args={flags} --batch-buckets {sizes}", "--out", str(out / name)]  # fmt: skip

    return [
        Step("environment", [PY, "-m", "loadtest.machine", "--probe"], 60, why="GPU, driver, versions; CUDA starts?"),
        Step(
            "train",
            [PY, "-m", "training.train", *p.train, "--out-dir", str(out / "train")],
            240,
            why="the README's GPU recipe, timed from start to saved checkpoint",
        ),  # fmt: skip
        Step(
            "bench-googlenet-fast",
            [
                *full,
                "--open-loop-rates",
                p.open_loop_rates,
                "--model",
                str(BUNDLED_MODEL),
                "--out",
                str(out / "bench-googlenet-fast"),
            ],
            150,
            why="the served default (precision, layout, buckets, graph: auto) against its floor",
        ),  # fmt: skip
        Step(
            "ceiling",
            [
                *bench,
                "--skip-floor",
                "--skip-server",
                "--compare-echo",
                "--concurrency",
                p.ceiling_concurrency,
                "--batch-images",
                p.batch_images,
                "--out",
                str(out / "ceiling"),
            ],
            120,
            why="Python gRPC's limit on this host (echo server) and the null-backend server's share of it",
        ),  # fmt: skip
        Step(
            "loadtest",
            [
                PY,
                "-m",
                "loadtest.run",
                "--host",
                f"127.0.0.1:{SERVER_PORT}",
                *p.loadtest,
                "--slo-p99-ms",
                f"{p.slo_ms:g}",
                "--metrics-url",
                f"http://127.0.0.1:{METRICS_PORT}/metrics",
                "--report-dir",
                str(out / "loadtest"),
            ],
            90,
            server=["--model", str(BUNDLED_MODEL), "--provider", p.provider],
            why="Locust, 6:3:1 raw/encoded/batch mix, answers checked, against the served default",
        ),  # fmt: skip
        Step(
            "export",
            [*export, str(out / "train" / "model.pt"), "-o", str(model)],
            150,
            needs=["train"],
            why="fp32, checked against PyTorch; accuracy through ONNX Runtime on the serving provider",
        ),  # fmt: skip
        Step(
            "export-fp16",
            [*export, "--check", str(model), "--fp16"],
            120,
            needs=["export"],
            why="the fp16 variant, checked against fp32",
        ),  # fmt: skip
        Step(
            "bench-googlenet",
            # a benchmark of the freshly trained model: its accuracy is the export step's to report (the smoke
            # profile's model is barely trained), so the server's check on stored digits is off here
            [*full, "--model", str(model), "--server-args=--verify-model off", "--out", str(out / "bench-googlenet")],
            150,
            needs=["export"],
            why="the full model, fp16 where its variant was written",
        ),  # fmt: skip
        Step(
            "floor-googlenet-fast-fp32",
            floors("floor-googlenet-fast-fp32", BUNDLED_MODEL, "--precision fp32"),
            60,
            why="is fp16 the faster default?",
        ),  # fmt: skip
        Step(
            "floor-googlenet-fast-no-graph",
            floors("floor-googlenet-fast-no-graph", BUNDLED_MODEL, "--cuda-graph off"),
            60,
            why="do CUDA graphs pay?",
        ),  # fmt: skip
        Step(
            "floor-googlenet-fp32",
            floors("floor-googlenet-fp32", model, "--precision fp32"),
            60,
            needs=["export"],
            why="fp16 against fp32 for the full model",
        ),  # fmt: skip
        Step(
            "digit-score-cost",
            [
                PY,
                "-m",
                "loadtest.digit_score_cost",
                "--batches",
                f"1,{p.batch_images}",
                "--rounds",
                "5",
                "--round-seconds",
                p.seconds,
                "--json",
                str(out / "digit-score-cost.json"),
                "--",
                "--provider",
                p.provider,
            ],
            90,
            why="the not-a-digit score inside the model's graph: what it adds to a run (target: <= 10%)",
        ),  # fmt: skip
        Step(
            "bundled-fp16-accuracy",
            [*export, "--check", str(fp16_bundled)],
            60,
            why="the served default's accuracy computed by the GPU itself",
        ),  # fmt: skip
    ]


def run_step(step: Step, out: Path, seconds_left: float) -> dict[str, Any]:
    """Run one step in a process group of its own (a timeout kills its servers and clients too); log to a file."""
    log_path = out / "logs" / f"{step.name}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    record: dict[str, Any] = {"name": step.name, "command": " ".join(step.command), "log": str(log_path)}
    timeout = min(step.timeout_s, seconds_left)
    server = None
    with log_path.open("w") as log:
        try:
            if step.server is not None:
                server = StepServer(step.server, log)
                server.start()
            process = subprocess.Popen(step.command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
            try:
                record["exit_code"] = process.wait(timeout=max(1.0, timeout - (time.monotonic() - started)))
                record["status"] = "passed" if record["exit_code"] == 0 else "failed"
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
                record["status"], record["exit_code"] = f"timed out after {timeout:.0f} s", None
        except (OSError, RuntimeError) as exc:
            record["status"], record["exit_code"] = f"could not run: {exc}", None
        finally:
            if server is not None:
                server.stop()
    record["seconds"] = round(time.monotonic() - started, 1)
    record["log_tail"] = log_path.read_text(errors="replace").splitlines()[-12:]
    return record


class StepServer(ServerProcess):
    """A step's server: mnist-serve on the fixed ports the step's command names, its output in the step's log."""

    def __init__(self, flags: list[str], log: IO[str]) -> None:
        super().__init__(flags, port=SERVER_PORT, metrics_port=METRICS_PORT, log=log)

    def not_serving(self, exited: int | None) -> NoReturn:
        raise RuntimeError("the server for this step did not become SERVING")


def run_suite(profile: str, out: Path, dry_run: bool = False, results_to: Path | None = None) -> int:
    """Run every step (within the profile's time budget), then write suite.json, summary.md and floors.png.

    The summary is rewritten after every step, so a run cut short still leaves one. With `results_to`,
    a few flat files land there: summary.md, suite.json, floors.png and a .tar.gz of everything else
    except models and checkpoints (what a machine that returns few, small files can carry back).
    """
    steps = plan(profile, out)
    budget = PROFILES[profile].budget_s
    if dry_run:
        print(f"mnist-bench --suite {profile}: {len(steps)} steps into {out}/, at most {budget:g} s (dry run)")
        for step in steps:
            needs = f" (needs {', '.join(step.needs)})" if step.needs else ""
            print(f"- {step.name}{needs}, at most {step.timeout_s:g} s: {step.why}")
            if step.server is not None:
                print(f"    with a server: mnist-serve {' '.join(step.server)}")
            print(f"    {' '.join(step.command)}")
        return 0
    out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    records: list[dict[str, Any]] = []
    for step in steps:
        failed_needs = [r["name"] for r in records if r["name"] in step.needs and r["status"] != "passed"]
        left = budget - (time.monotonic() - started)
        if failed_needs:
            records.append({"name": step.name, "status": f"skipped: {', '.join(failed_needs)} did not pass"})
        elif left < 10:
            records.append({"name": step.name, "status": f"skipped: the suite's {budget:g} s were used up"})
        else:
            print(f"[{time.monotonic() - started:6.1f} s] {step.name} ...", flush=True)
            records.append(run_step(step, out, left))
        print(f"[{time.monotonic() - started:6.1f} s] {step.name}: {records[-1]['status']}", flush=True)
        write_results(profile, out, records, time.monotonic() - started)
    plot_floors(out)
    print((out / "summary.md").read_text())
    if results_to is not None:
        pack_results(out, results_to)
    return 0 if all(r["status"] == "passed" for r in records) else 1


def write_results(profile: str, out: Path, records: list[dict], seconds: float) -> None:
    results = collect(profile, out, records, seconds)
    (out / "suite.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    (out / "summary.md").write_text(summary_markdown(results))


def pack_results(out: Path, destination: Path) -> None:
    """summary.md, suite.json, floors.png and one archive of the JSON, PNG, logs and reports (no models)."""
    destination.mkdir(parents=True, exist_ok=True)
    for name in ("summary.md", "suite.json", "floors.png"):
        if (out / name).is_file():
            shutil.copyfile(out / name, destination / name)
    with tarfile.open(destination / f"{out.name}.tar.gz", "w:gz") as archive:
        for path in sorted(out.rglob("*")):
            if path.is_file() and path.suffix not in (".pt", ".onnx", ".tmp"):
                archive.add(path, arcname=str(Path(out.name) / path.relative_to(out)))
    print(f"results for the trip back: {', '.join(sorted(p.name for p in destination.iterdir()))} in {destination}/")


# --- results ------------------------------------------------------------------------------------------


def _load(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _row(bench: dict | None, label: str, concurrency: int, batch: int = 1) -> dict | None:
    rows = (bench or {}).get("server", []) + [r for rows in ((bench or {}).get("echo") or {}).get("rows", {}).values()
                                              for r in rows]  # fmt: skip
    return next((r for r in rows if r["label"] == label and r["concurrency"] == concurrency
                 and r["batch_size"] == batch), None)  # fmt: skip


def collect(profile: str, out: Path, records: list[dict], seconds: float) -> dict[str, Any]:
    """Every step's outcome and the figures the targets are judged on."""
    p = PROFILES[profile]
    benches = {name: _load(out / name / "bench.json") for name in (
        "bench-googlenet-fast", "bench-googlenet", "floor-googlenet-fast-fp32", "floor-googlenet-fast-no-graph",
        "floor-googlenet-fp32", "ceiling")}  # fmt: skip
    train = _load(out / "train" / "report.json")
    verdicts = sorted((out / "loadtest").glob("*/verdict.json")) if (out / "loadtest").is_dir() else []
    loadtest = _load(verdicts[-1]) if verdicts else None
    fast, full, ceiling = benches["bench-googlenet-fast"], benches["bench-googlenet"], benches["ceiling"]
    batch = int(p.batch_images)
    levels = [int(c) for c in p.concurrency.split(",")]
    echo_at = {c: _row(ceiling, "echo", c) for c in levels}
    targets = []

    def target(name: str, value: float | None, passed: bool | None, detail: str) -> None:
        targets.append({"target": name, "value": value, "passed": passed, "detail": detail})

    one = _row(fast, "server", levels[0])
    target("googlenet-fast Classify p99 <= 2 ms at 1 client", one and one["p99_ms"],
           one and one["p99_ms"] <= 2.0, "closed loop, raw digits")  # fmt: skip
    for c in (16, 64):
        row, echo = _row(fast, "server", c), echo_at.get(c)
        ratio = row["calls_per_second"] / echo["calls_per_second"] if row and echo else None
        ok = ratio is not None and ratio >= 0.75 and (c == 64 or row["p99_ms"] <= p.slo_ms)
        target(f"googlenet-fast at {c} clients >= 75% of the echo server's calls/s" + (
            ", p99 <= 10 ms" if c == 16 else ""), ratio, ok if ratio is not None else None,
            f"{row['calls_per_second']:,.0f} vs {echo['calls_per_second']:,.0f} calls/s, p99 {row['p99_ms']:.2f} ms"
            if row and echo else "not measured")  # fmt: skip
    for name, bench, floor_ips in (("googlenet-fast", fast, 50_000), ("googlenet (fp16)", full, 25_000)):
        row = _row(bench, "server", 4, batch)
        ok = row is not None and row["images_per_second"] >= floor_ips and row["p99_ms"] <= p.slo_ms
        target(f"{name} ClassifyBatch of {batch} >= {floor_ips:,} images/s at p99 <= 10 ms",
               row and row["images_per_second"], ok if row else None,
               f"4 clients, p99 {row['p99_ms']:.2f} ms" if row else "not measured")  # fmt: skip
    total = (loadtest or {}).get("total") or {}
    target(f"mnist-loadtest with {p.loadtest[1]} users passes the {p.slo_ms:g} ms SLO", total.get("p99_ms"),
           loadtest.get("passed") if loadtest else None,
           f"{total.get('requests_per_second', 0):,.0f} requests/s, Locust mix, answers checked"
           if loadtest else "not run")  # fmt: skip
    score = _load(out / "digit-score-cost.json")
    for size in (1, batch):
        row = (score or {}).get("batches", {}).get(str(size))
        added = row and row["median_ms"]["in-graph"] / row["median_ms"]["classifier"] - 1
        target(f"the digit score adds <= 10% to a run of {size}", added, None if row is None else added <= 0.10,
               f"{row['median_ms']['in-graph']:.3f} vs {row['median_ms']['classifier']:.3f} ms (medians of rounds)"
               if row else "not measured")  # fmt: skip
    if train:
        seconds_taken = f"{train['wall_seconds_to_checkpoint']:.1f} s to checkpoint"
        target("googlenet >= 99.6% test accuracy (the README recipe)", train["test_accuracy"],
               train["test_accuracy"] >= 0.996, seconds_taken)  # fmt: skip
    return {
        "profile": profile,
        "seconds": round(seconds, 1),
        "steps": records,
        "targets": targets,
        "training": train and {k: train[k] for k in ("device", "test_accuracy", "wall_seconds_to_checkpoint")},
        "loadtest": loadtest,
        "summaries": {name: bench and bench.get("summary") for name, bench in benches.items()},
        "served": {name: bench and bench.get("served") for name, bench in benches.items()},
        "machine": next((b["machine"] for b in benches.values() if b), None),
    }


def _fmt(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:,.3f}" if value < 100 else f"{value:,.0f}"
    return str(value)


def summary_markdown(results: dict[str, Any]) -> str:
    machine = results.get("machine") or {}
    lines = [
        f"# GPU check ({results['profile']} profile): {results['seconds']:.0f} s",
        "",
        *(
            [
                "The smoke profile runs every step tiny on the CPU so the GPU run cannot fail on a Python error; its "
                "verdicts hold the GPU targets against CPU figures and mean nothing.",
                "",
            ]
            if results["profile"] == "smoke"
            else []
        ),  # fmt: skip
        f"Machine: {machine.get('gpu', 'no GPU')}; {machine.get('cpu', '?')} ({machine.get('cpus', '?')} cpus); "
        f"{machine.get('onnxruntime', '?')}; Python {machine.get('python', '?')}, grpcio {machine.get('grpcio', '?')}",
        "",
        "| target | value | verdict | detail |",
        "| --- | --- | --- | --- |",
    ]
    for t in results["targets"]:
        verdict = {True: "PASS", False: "FAIL", None: "not measured"}[t["passed"] if t["passed"] is not None else None]
        lines.append(f"| {t['target']} | {_fmt(t['value'])} | {verdict} | {t['detail']} |")
    lines += ["", "| step | status | seconds |", "| --- | --- | --- |"]
    for r in results["steps"]:
        lines.append(f"| {r['name']} | {r['status']} | {r.get('seconds', '—')} |")
    for name, served in results["served"].items():
        if served:
            lines.append(f"\n`{name}` served: " + ", ".join(f"{k}={v}" for k, v in served.items()
                                                           if k not in ("sha256",)))  # fmt: skip
    lines.append("")
    for name, summary in results["summaries"].items():
        if summary:
            lines.append(f"\n## {name}\n")
            for key, value in summary.items():
                lines.append(f"- {key}: {json.dumps(value) if isinstance(value, dict) else _fmt(value)}")
    return "\n".join(lines) + "\n"


def plot_floors(out: Path) -> None:
    """One picture of every floor: latency per run against batch size, fp16/fp32, graph/no graph."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    drawn = 0
    for name in ("bench-googlenet-fast", "floor-googlenet-fast-fp32", "floor-googlenet-fast-no-graph",
                 "bench-googlenet", "floor-googlenet-fp32"):  # fmt: skip
        bench = _load(out / name / "bench.json")
        if bench and bench.get("floor"):
            floor = bench["floor"]
            ax.plot([f["batch_size"] for f in floor], [f["p50_ms"] for f in floor], "o-", label=name)
            drawn += 1
    if drawn:
        ax.set(xscale="log", yscale="log", xlabel="batch size", ylabel="backend run p50 (ms)",
               title="floors: the backend alone, per configuration")  # fmt: skip
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / "floors.png", dpi=110)
    plt.close(fig)
