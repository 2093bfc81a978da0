"""mnist-bench: the server measured against its limits, in one run, on one machine.

1. Floor: the inference backend alone, in this process, set up exactly as the server sets it up
   (same model, provider, precision, buckets, CUDA graphs): latency per run at each batch size.
2. Server, closed loop: an `mnist-serve` subprocess (or `--target`), `Classify` of raw MNIST digits
   from 1..N client processes, one call in flight each; then `ClassifyBatch` (`--batch-images`).
3. Server, open loop (`--open-loop-rates`): calls at a fixed rate whatever the server does.
4. Ceiling (`--compare-echo`): a minimal asyncio gRPC server of the same proto that answers at once
   (loadtest/echo_server.py) against `mnist-serve --backend null`, same clients: the first is the
   limit of Python gRPC on this machine, the ratio is the serving code's own efficiency.
Writes a table, bench.json (with the machine, GPU, driver, runtime versions and what the server
reported it serves) and bench.png. `--suite gpu` runs the whole GPU check instead (loadtest/suite.py);
`--check` the standing check of the hot path as a whole (loadtest/check.py, limits in loadtest/check.toml).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from loadtest.drivers import LoadResult, closed_loop, open_loop, sample_digits
from loadtest.machine import describe_machine, headline
from loadtest.servers import ServerProcess
from proto.contract import INPUT_SHAPE
from server.config import BUNDLED_MODEL

SLO_MS = 10.0


@dataclass
class LatencyStats:
    label: str  # floor, server, echo, null, open-loop
    batch_size: int  # images per call (floor: per run)
    concurrency: int  # clients (open loop: sender processes)
    calls: int
    images_per_second: float
    p50_ms: float
    p95_ms: float
    p99_ms: float
    max_ms: float
    errors: int = 0
    calls_per_second: float = 0.0
    target_rate: float = 0.0  # open loop: calls per second asked for
    late_p99_ms: float = 0.0  # open loop: the sender's own lateness at p99 (large = the client was the limit)
    error_codes: dict | None = None


def stats(label: str, latencies_s: np.ndarray, batch: int, concurrency: int, wall_s: float, errors: int = 0):
    ms = np.asarray(latencies_s, float) * 1000
    if not len(ms):
        ms = np.array([np.nan])
    p50, p95, p99 = np.percentile(ms, [50, 95, 99])
    calls = int(np.isfinite(ms).sum())
    return LatencyStats(
        label,
        batch,
        concurrency,
        calls,
        calls * batch / wall_s,
        float(p50),
        float(p95),
        float(p99),
        float(np.nanmax(ms)),
        errors,
        calls / wall_s,
    )


def from_load(label: str, result: LoadResult, concurrency: int, target_rate: float = 0.0) -> LatencyStats:
    row = stats(label, result.latencies_s, result.images_per_call, concurrency, result.seconds, result.error_count)
    row.target_rate, row.late_p99_ms, row.error_codes = target_rate, result.late_p99_ms, result.errors or None
    return row


# --- the floor ---------------------------------------------------------------------------------------


def measure_floor(server_args: list[str], batch_sizes: list[int], seconds: float) -> list[LatencyStats]:
    """The backend the server would build from `server_args`, timed per run at each batch size."""
    from server.config import load_config
    from server.engine.backends import build_backend

    backend = build_backend(load_config(server_args, environ={}))
    backend.warm_up()
    info = backend.describe()
    digits = sample_digits()
    x_all = info.normalization.apply(digits)[:, None]
    results = []
    for batch in batch_sizes:
        x = np.ascontiguousarray(np.resize(x_all, (batch, *INPUT_SHAPE)))
        for _ in range(5):
            backend.run(x)
        latencies, started = [], time.perf_counter()
        while time.perf_counter() - started < seconds:
            t0 = time.perf_counter()
            backend.run(x)
            latencies.append(time.perf_counter() - t0)
        results.append(stats("floor", np.array(latencies), batch, 1, time.perf_counter() - started))
    backend.close()
    return results


# --- measurements against a server -------------------------------------------------------------------


def measure_server(
    target: str,
    levels: list[int],
    seconds: float,
    batch_images: int = 0,
    batch_clients: int = 4,
    open_rates: list[float] | None = None,
    open_processes: int = 2,
    label: str = "server",
) -> list[LatencyStats]:
    rows = [from_load(label, closed_loop(target, c, seconds), c) for c in levels]
    if batch_images:
        rows.append(from_load(label, closed_loop(target, batch_clients, seconds, batch_images), batch_clients))
    for rate in open_rates or []:
        rows.append(from_load("open-loop", open_loop(target, rate, seconds, open_processes), open_processes, rate))
    return rows


def compare_with_echo(
    levels: list[int], seconds: float, batch_images: int, batch_clients: int, null_args: list[str]
) -> dict[str, Any]:
    """The echo server and the null-backend server under the same closed loads, one after the other."""
    rows: dict[str, list[LatencyStats]] = {}
    for label, args, echo in (("echo", [], True), ("null", ["--backend", "null", *null_args], False)):
        with ServerProcess(args, echo=echo) as server:
            rows[label] = measure_server(server.target, levels, seconds, batch_images, batch_clients, label=label)
    ratios = {}
    for echo_row, null_row in zip(rows["echo"], rows["null"], strict=True):
        key = f"c{echo_row.concurrency}" + (f"_batch{echo_row.batch_size}" if echo_row.batch_size > 1 else "")
        ratios[key] = {
            "echo_calls_per_second": echo_row.calls_per_second,
            "null_calls_per_second": null_row.calls_per_second,
            "null_images_per_second": null_row.images_per_second,
            "throughput_ratio": null_row.calls_per_second / echo_row.calls_per_second,
            "p50_added_ms": null_row.p50_ms - echo_row.p50_ms,
            "p99_added_ms": null_row.p99_ms - echo_row.p99_ms,
        }
    return {"rows": {k: [asdict(r) for r in v] for k, v in rows.items()}, "ratios": ratios}


# --- reporting ---------------------------------------------------------------------------------------


def summarize(floor: list[LatencyStats], server: list[LatencyStats], slo_ms: float = SLO_MS) -> dict:
    """The headline numbers, and each as a ratio to the floor (the bare backend run)."""
    summary: dict = {}
    singles = [s for s in server if s.label == "server" and s.batch_size == 1]
    low = min(singles, key=lambda s: s.concurrency, default=None)
    floor_1 = next((f for f in floor if f.batch_size == 1), None)
    if low is not None:
        summary["server_p50_ms_low_concurrency"] = low.p50_ms
        summary["server_p99_ms_low_concurrency"] = low.p99_ms
        summary["low_concurrency"] = low.concurrency
    if low is not None and floor_1 is not None:
        summary["server_overhead_p50_ms_at_batch_1"] = low.p50_ms - floor_1.p50_ms
        summary["p99_ratio_to_floor_batch_1"] = low.p99_ms / floor_1.p99_ms
    within = [s for s in singles if s.p99_ms <= slo_ms and s.errors == 0]
    if within:
        best = max(within, key=lambda s: s.images_per_second)
        summary["best_images_per_second_within_slo"] = best.images_per_second
        summary["best_within_slo_concurrency"] = best.concurrency
        if floor:
            summary["throughput_ratio_to_floor_best"] = best.images_per_second / max(f.images_per_second for f in floor)
    for s in server:
        if s.label == "server" and s.batch_size > 1:
            summary[f"classify_batch_{s.batch_size}_images_per_second_c{s.concurrency}"] = s.images_per_second
            summary[f"classify_batch_{s.batch_size}_p99_ms_c{s.concurrency}"] = s.p99_ms
        if s.label == "open-loop":
            summary[f"open_loop_{s.target_rate:g}_per_s_p99_ms"] = s.p99_ms
    return summary


def table(rows: list[LatencyStats]) -> str:
    lines = [
        f"{'what':<9} {'batch':>5} {'conc':>5} {'rate':>7} {'calls':>7} {'calls/s':>9} {'images/s':>10} "
        f"{'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8} {'max ms':>8} {'errors':>6}"
    ]
    for r in rows:
        rate = f"{r.target_rate:,.0f}" if r.target_rate else "-"
        lines.append(
            f"{r.label:<9} {r.batch_size:>5} {r.concurrency:>5} {rate:>7} {r.calls:>7} {r.calls_per_second:>9,.0f} "
            f"{r.images_per_second:>10,.0f} {r.p50_ms:>8.3f} {r.p95_ms:>8.3f} {r.p99_ms:>8.3f} {r.max_ms:>8.2f} "
            f"{r.errors:>6}"
        )
    return "\n".join(lines)


def plot(floor: list[LatencyStats], server: list[LatencyStats], echo: dict | None, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = 2 if echo else 1
    fig, axes = plt.subplots(1, panels, figsize=(8 * panels, 5.5), squeeze=False)
    ax = axes[0][0]
    if floor:
        ax.plot(
            [s.images_per_second for s in floor],
            [s.p50_ms for s in floor],
            "k--o",
            label="floor: backend run p50 (batch " + ",".join(str(s.batch_size) for s in floor) + ")",
        )
    ceiling = [LatencyStats(**row) for rows in (echo or {}).get("rows", {}).values() for row in rows]
    groups = {
        "Classify": [s for s in server if s.label == "server" and s.batch_size == 1],
        "ClassifyBatch": [s for s in server if s.label == "server" and s.batch_size > 1],
        "open loop": [s for s in server if s.label == "open-loop"],
        "echo server Classify": [s for s in ceiling if s.label == "echo" and s.batch_size == 1],
        "null backend Classify": [s for s in ceiling if s.label == "null" and s.batch_size == 1],
    }
    for name, rows in groups.items():
        for field, style in (("p50_ms", "o-"), ("p99_ms", "s-")):
            if rows:
                ax.plot([s.images_per_second for s in rows], [getattr(s, field) for s in rows], style,
                        label=f"{name} {field[:3]}")  # fmt: skip
        for s in rows:
            note = f"{s.target_rate:,.0f}/s" if s.target_rate else f"c={s.concurrency}"
            if s.batch_size > 1:
                note += f"x{s.batch_size}"
            ax.annotate(note, (s.images_per_second, s.p99_ms), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.axhline(SLO_MS, color="tab:red", lw=1, label=f"{SLO_MS:g} ms SLO")
    ax.set(xscale="log", yscale="log", xlabel="throughput (images/s)", ylabel="latency (ms)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    if echo:
        ax2 = axes[0][1]
        keys = list(echo["ratios"])
        x = np.arange(len(keys))
        ax2.bar(x - 0.2, [echo["ratios"][k]["echo_calls_per_second"] for k in keys], 0.4, label="echo server (limit)")
        ax2.bar(x + 0.2, [echo["ratios"][k]["null_calls_per_second"] for k in keys], 0.4, label="mnist-serve, null")
        for i, k in enumerate(keys):
            ratio = echo["ratios"][k]["throughput_ratio"]
            ax2.annotate(f"{100 * ratio:.0f}%", (i + 0.2, echo["ratios"][k]["null_calls_per_second"]),
                         ha="center", va="bottom", fontsize=9)  # fmt: skip
        ax2.set_xticks(x, keys)
        ax2.set(ylabel="calls/s", title="server ceiling: null backend against a bare echo server")
        ax2.legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --- the command -------------------------------------------------------------------------------------


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults shown, and the description's own line breaks kept."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mnist-bench",
        description=__doc__,
        epilog="Examples: `mnist-bench` (floor + Classify at 1,4,16 clients); `mnist-bench --skip-floor --skip-server "
        "--compare-echo --batch-images 256` (the server's own ceiling against an echo server); `mnist-bench --suite "
        "gpu --out gpu-check` (the whole GPU check: train, export, bench both presets, load test).",
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--model", type=Path, default=BUNDLED_MODEL, help="ONNX model to benchmark")
    parser.add_argument("--provider", default="auto", choices=["auto", "cuda", "cpu"], help="ONNX Runtime provider")
    parser.add_argument(
        "--server-args", default="", help="more mnist-serve flags, for the server and the floor alike, e.g. "
        "'--precision fp32 --cuda-graph off'"
    )  # fmt: skip
    parser.add_argument("--batch-sizes", default="1,8,32", help="floor: comma-separated batch sizes")
    parser.add_argument("--concurrency", default="1,4,16", help="closed loop: comma-separated client counts")
    parser.add_argument("--seconds", type=float, default=5.0, help="duration of each measurement")
    parser.add_argument("--floor-seconds", type=float, help="duration of each floor measurement (default: --seconds)")
    parser.add_argument(
        "--batch-images", type=int, default=0, help="also measure ClassifyBatch with this many raw images per call"
    )
    parser.add_argument("--batch-clients", type=int, default=4, help="clients for the ClassifyBatch measurement")
    parser.add_argument(
        "--open-loop-rates", default="", help="also send Classify at these fixed rates (calls/s, comma-separated)"
    )
    parser.add_argument("--open-loop-processes", type=int, default=2, help="sender processes for the open loop")
    parser.add_argument(
        "--compare-echo",
        action="store_true",
        help="also run the echo server and `mnist-serve --backend null` under the same loads (the ceiling of "
        "Python gRPC here, and the serving code's share of it)",
    )
    parser.add_argument("--skip-server", action="store_true", help="no model server measurement (floor/echo only)")
    parser.add_argument("--target", help="benchmark a running server at HOST:PORT instead of starting one")
    parser.add_argument("--out", type=Path, default=Path("reports/bench"), help="folder for bench.json and bench.png")
    parser.add_argument("--skip-floor", action="store_true", help="measure the server only")
    parser.add_argument(
        "--suite",
        choices=["gpu", "smoke"],
        help="run the whole check instead: gpu (on a GPU machine, < 8 min: train, export fp32+fp16, bench both "
        "presets, echo ceiling, 16-user load test; one folder of JSON, PNG and summary.md), smoke (the same steps "
        "tiny, on any machine)",
    )
    parser.add_argument(
        "--check",
        action="store_true",
        help="run the standing check instead (about 90 s; run it before submitting changes to server/): the null "
        "server against the echo server (1 and 16 clients, ClassifyBatch), a closed-loop load-test mix that must get "
        "no refusal, the bundled model's overhead over its bare session at 1 client, and a refusal's CPU cost; one "
        "PASS/FAIL line each, limits in loadtest/check.toml; check.json and check.md in --out; exit 1 on a FAIL",
    )
    parser.add_argument("--dry-run", action="store_true", help="with --suite: print the steps, run nothing")
    parser.add_argument("--replot", type=Path, metavar="DIR", help="only redraw DIR/bench.png from DIR/bench.json")
    parser.add_argument(
        "--results-to",
        type=Path,
        metavar="DIR",
        help="with --suite: copy summary.md and suite.json to DIR as each step starts and ends, and at the end (also "
        "on SIGTERM/SIGINT) floors.png and one .tar.gz of every other result (no models or checkpoints): e.g. a "
        "device machine's $OUT",
    )
    return parser


def replot(folder: Path) -> Path:
    """Draw bench.png again from a recorded bench.json (figures unchanged, only the picture)."""
    report = json.loads((folder / "bench.json").read_text())
    floor = [LatencyStats(**row) for row in report["floor"]]
    server = [LatencyStats(**row) for row in report["server"]]
    plot(floor, server, report.get("echo"), folder / "bench.png", report["title"])
    return folder / "bench.png"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.replot:
        print(f"redrew {replot(args.replot)}")
        return 0
    if args.check:
        from loadtest.check import run_check

        return run_check(args.out)
    if args.suite:
        from loadtest.suite import run_suite

        return run_suite(args.suite, args.out, dry_run=args.dry_run, results_to=args.results_to)
    server_args = ["--model", str(args.model), "--provider", args.provider, *shlex.split(args.server_args)]
    batch_sizes = [int(b) for b in args.batch_sizes.split(",") if b]
    levels = [int(c) for c in args.concurrency.split(",") if c]
    rates = [float(r) for r in args.open_loop_rates.split(",") if r]
    args.out.mkdir(parents=True, exist_ok=True)
    machine = describe_machine()

    floor = [] if args.skip_floor else measure_floor(server_args, batch_sizes, args.floor_seconds or args.seconds)
    if floor:
        print(table(floor), flush=True)
    server: list[LatencyStats] = []
    served: dict[str, Any] = {}
    if not args.skip_server:
        if args.target:
            from google.protobuf.json_format import MessageToDict

            from server.client import ClassifierClient

            with ClassifierClient(args.target) as client:
                served = MessageToDict(client.model_info(), preserving_proto_field_name=True)
            server = measure_server(
                args.target, levels, args.seconds, args.batch_images, args.batch_clients, rates,
                args.open_loop_processes,
            )  # fmt: skip
        else:
            with ServerProcess(server_args) as process:
                served = process.info
                server = measure_server(
                    process.target, levels, args.seconds, args.batch_images, args.batch_clients, rates,
                    args.open_loop_processes,
                )  # fmt: skip
    echo = (
        compare_with_echo(levels, args.seconds, args.batch_images, args.batch_clients, shlex.split(args.server_args))
        if args.compare_echo
        else None
    )
    if server:
        print(table(floor + server))
    if echo:
        print(table([LatencyStats(**row) for rows in echo["rows"].values() for row in rows]))
    summary = summarize(floor, server)
    if echo:
        summary["echo"] = echo["ratios"]
    if "server_overhead_p50_ms_at_batch_1" in summary:
        print(
            f"server adds {summary['server_overhead_p50_ms_at_batch_1']:.3f} ms at p50 over the bare backend run "
            f"at batch 1"
        )
    for key, value in summary.items():
        if key == "echo":
            for level, ratio in value.items():
                print(
                    f"null vs echo {level:<14} {100 * ratio['throughput_ratio']:5.1f}% of the echo server's calls/s "
                    f"({ratio['null_calls_per_second']:,.0f} vs {ratio['echo_calls_per_second']:,.0f}), "
                    f"p50 +{ratio['p50_added_ms']:.3f} ms"
                )
        else:
            print(f"{key:<44} {value:,.3f}" if isinstance(value, float) else f"{key:<44} {value}")
    report = {
        "command": "mnist-bench " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:])),
        "model": str(args.model),
        "provider": args.provider,
        "server_args": args.server_args,
        "machine": machine,
        "served": served,
        "title": headline(machine, served),
        "summary": summary,
        "floor": [asdict(f) for f in floor],
        "server": [asdict(s) for s in server],
        "echo": echo,
    }
    (args.out / "bench.json").write_text(json.dumps(report, indent=2) + "\n")
    plot(floor, server, echo, args.out / "bench.png", report["title"])
    print(f"wrote {args.out / 'bench.json'} and {args.out / 'bench.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
