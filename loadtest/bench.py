"""mnist-bench: the bare ONNX Runtime floor, then the server end to end, on the same model.

1. Floor: an ONNX Runtime session in this process, same model and provider, timed per
   `session.run` at each batch size (median and p99 over many runs).
2. Server: an `mnist-serve` subprocess (or `--target HOST:PORT`), driven by closed-loop clients
   at each concurrency level sending `Classify` with raw MNIST test digits; latency percentiles
   and throughput per level.
Writes a table to stdout, a JSON file and a PNG plot of latency against throughput with the floor.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import platform
import shlex
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from server.config import BUNDLED_MODEL


@dataclass
class LatencyStats:
    label: str
    batch_size: int
    concurrency: int
    calls: int
    images_per_second: float
    p50_ms: float
    p95_ms: float
    p99_ms: float
    max_ms: float
    errors: int = 0


def stats(
    label: str, latencies_s: np.ndarray, batch: int, concurrency: int, wall_s: float, errors: int = 0
) -> LatencyStats:
    ms = np.asarray(latencies_s) * 1000
    p50, p95, p99 = np.percentile(ms, [50, 95, 99])
    return LatencyStats(
        label,
        batch,
        concurrency,
        len(ms),
        len(ms) * batch / wall_s,
        float(p50),
        float(p95),
        float(p99),
        float(ms.max()),
        errors,
    )


def sample_digits(count: int = 1000) -> np.ndarray:
    """Real MNIST test digits when the data is at hand, else seeded random strokes (same shapes, same cost)."""
    try:
        from training.data import load_split

        return load_split("test").images[:count]
    except Exception:  # noqa: BLE001 - the benchmark must run on a serving-only install
        rng = np.random.default_rng(0)
        return (rng.random((count, 28, 28)) > 0.8).astype(np.uint8) * 255


def measure_floor(model: Path, provider: str, batch_sizes: list[int], seconds: float) -> list[LatencyStats]:
    from server.runtime import OnnxModel

    runtime = OnnxModel(model, provider, max(batch_sizes))
    digits = sample_digits()
    x_all = ((digits.astype(np.float32) / 255 - 0.1307) / 0.3081)[:, None]
    results = []
    for batch in batch_sizes:
        x = np.ascontiguousarray(np.resize(x_all, (batch, 1, 28, 28)))
        for _ in range(5):
            runtime.session.run(["probabilities"], {"image": x})
        latencies, started = [], time.perf_counter()
        while time.perf_counter() - started < seconds:
            t0 = time.perf_counter()
            runtime.session.run(["probabilities"], {"image": x})
            latencies.append(time.perf_counter() - t0)
        results.append(stats("floor", np.array(latencies), batch, 1, time.perf_counter() - started))
    return results


def _client_process(target: str, seconds: float, start_at: float, seed: int, queue: mp.Queue) -> None:
    import grpc

    from proto.mnist.v1 import classifier_pb2 as pb
    from proto.mnist.v1 import classifier_pb2_grpc as pb_grpc

    digits = sample_digits()
    requests = [pb.ClassifyRequest(raw=d.tobytes()) for d in digits]
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(requests))
    latencies, errors = [], 0
    with grpc.insecure_channel(target) as channel:
        classify = pb_grpc.ClassifierStub(channel).Classify
        classify(requests[0], timeout=30)  # connect before the clock starts
        while time.time() < start_at:
            time.sleep(0.001)
        end = start_at + seconds
        i = 0
        while time.time() < end:
            t0 = time.perf_counter()
            try:
                classify(requests[order[i % len(order)]], timeout=10)
                latencies.append(time.perf_counter() - t0)
            except grpc.RpcError:
                errors += 1
            i += 1
    queue.put((latencies, errors))


def measure_server(target: str, concurrency_levels: list[int], seconds: float) -> list[LatencyStats]:
    """Each client is its own process (one in-flight call each), so client-side Python does not serialize them."""
    context = mp.get_context("spawn")
    results = []
    for concurrency in concurrency_levels:
        queue: mp.Queue = context.Queue()
        start_at = time.time() + 2.0 + 0.05 * concurrency
        procs = [
            context.Process(target=_client_process, args=(target, seconds, start_at, i, queue))
            for i in range(concurrency)
        ]
        for p in procs:
            p.start()
        gathered = [queue.get(timeout=seconds + 120) for _ in procs]
        for p in procs:
            p.join()
        latencies = np.concatenate([np.array(lat) for lat, _ in gathered if lat])
        errors = sum(e for _, e in gathered)
        results.append(stats("server", latencies, 1, concurrency, seconds, errors))
    return results


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(port: int, model: Path, provider: str, extra: list[str]) -> subprocess.Popen:
    from server.client import ClassifierClient

    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "server.app",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--metrics-port",
            "0",
            "--model",
            str(model),
            "--provider",
            provider,
            "--drain-seconds",
            "0",
            "--log-level",
            "WARNING",
            *extra,
        ]
    )
    with ClassifierClient(f"127.0.0.1:{port}") as client:
        if client.wait_until_serving(60):
            return process
    process.kill()
    raise SystemExit("mnist-bench: the server did not become SERVING within 60 s (see its log above)")


def summarize(floor: list[LatencyStats], server: list[LatencyStats], slo_ms: float = 10.0) -> dict:
    """The headline numbers, and each as a ratio to the floor (the bare session run)."""
    summary: dict = {}
    low = min(server, key=lambda s: s.concurrency, default=None)
    floor_1 = next((f for f in floor if f.batch_size == 1), None)
    if low is not None:
        summary["server_p50_ms_low_concurrency"] = low.p50_ms
        summary["server_p99_ms_low_concurrency"] = low.p99_ms
        summary["low_concurrency"] = low.concurrency
    if low is not None and floor_1 is not None:
        summary["server_overhead_p50_ms_at_batch_1"] = low.p50_ms - floor_1.p50_ms
        summary["p99_ratio_to_floor_batch_1"] = low.p99_ms / floor_1.p99_ms
    within = [s for s in server if s.p99_ms <= slo_ms and s.errors == 0]
    if within:
        best = max(within, key=lambda s: s.images_per_second)
        summary["best_images_per_second_within_slo"] = best.images_per_second
        summary["best_within_slo_concurrency"] = best.concurrency
        if floor:
            summary["throughput_ratio_to_floor_best"] = best.images_per_second / max(f.images_per_second for f in floor)
    return summary


def plot(floor: list[LatencyStats], server: list[LatencyStats], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    ax.plot(
        [s.images_per_second for s in floor],
        [s.p50_ms for s in floor],
        "k--o",
        label="floor: session.run p50 (batch " + ",".join(str(s.batch_size) for s in floor) + ")",
    )
    for field, style in (("p50_ms", "o-"), ("p99_ms", "s-")):
        ax.plot(
            [s.images_per_second for s in server],
            [getattr(s, field) for s in server],
            style,
            label=f"server Classify {field[:3]}",
        )
    for s in server:
        ax.annotate(
            f"c={s.concurrency}", (s.images_per_second, s.p99_ms), textcoords="offset points", xytext=(4, 4), fontsize=8
        )
    ax.axhline(10, color="tab:red", lw=1, label="10 ms SLO")
    ax.set(xscale="log", yscale="log", xlabel="throughput (images/s)", ylabel="latency (ms)", title=title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def table(rows: list[LatencyStats]) -> str:
    lines = [
        f"{'what':<7} {'batch':>5} {'conc':>5} {'calls':>7} {'images/s':>10} {'p50 ms':>8} {'p95 ms':>8} "
        f"{'p99 ms':>8} {'max ms':>8} {'errors':>6}"
    ]
    for r in rows:
        lines.append(
            f"{r.label:<7} {r.batch_size:>5} {r.concurrency:>5} {r.calls:>7} {r.images_per_second:>10,.0f} "
            f"{r.p50_ms:>8.3f} {r.p95_ms:>8.3f} {r.p99_ms:>8.3f} {r.max_ms:>8.2f} {r.errors:>6}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="mnist-bench",
        description=__doc__.split("\n\n")[0] + " See module docs.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--model", type=Path, default=BUNDLED_MODEL, help="ONNX model to benchmark")
    parser.add_argument("--provider", default="auto", choices=["auto", "cuda", "cpu"], help="ONNX Runtime provider")
    parser.add_argument("--batch-sizes", default="1,8,32", help="floor: comma-separated batch sizes")
    parser.add_argument("--concurrency", default="1,4,16", help="server: comma-separated client counts")
    parser.add_argument("--seconds", type=float, default=5.0, help="duration of each measurement")
    parser.add_argument("--target", help="benchmark a running server at HOST:PORT instead of starting one")
    parser.add_argument("--port", type=int, default=0, help="port for the server this command starts (0 = a free one)")
    parser.add_argument("--server-args", default="", help="extra mnist-serve flags, e.g. '--max-queue-delay-ms 1'")
    parser.add_argument("--out", type=Path, default=Path("reports/bench"), help="folder for bench.json and bench.png")
    parser.add_argument("--skip-floor", action="store_true", help="measure the server only")
    args = parser.parse_args(argv)
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    levels = [int(c) for c in args.concurrency.split(",")]
    args.out.mkdir(parents=True, exist_ok=True)

    floor = [] if args.skip_floor else measure_floor(args.model, args.provider, batch_sizes, args.seconds)
    if floor:
        print(table(floor), flush=True)
    port = args.port or free_port()
    process = None if args.target else start_server(port, args.model, args.provider, shlex.split(args.server_args))
    try:
        server = measure_server(args.target or f"127.0.0.1:{port}", levels, args.seconds)
    finally:
        if process is not None:
            process.terminate()
            process.wait(30)
    print(table(floor + server))
    summary = summarize(floor, server)
    if "server_overhead_p50_ms_at_batch_1" in summary:
        print(
            f"server adds {summary['server_overhead_p50_ms_at_batch_1']:.3f} ms at p50 over the bare session run "
            f"at batch 1"
        )
    for key, value in summary.items():
        print(f"{key:<44} {value:,.3f}" if isinstance(value, float) else f"{key:<44} {value}")
    import onnxruntime

    report = {
        "command": "mnist-bench " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:])),
        "model": str(args.model),
        "provider": args.provider,
        "server_args": args.server_args,
        "machine": f"{platform.machine()} {platform.processor()}".strip(),
        "cpus": mp.cpu_count(),
        "onnxruntime": onnxruntime.__version__,
        "summary": summary,
        "floor": [asdict(f) for f in floor],
        "server": [asdict(s) for s in server],
    }
    (args.out / "bench.json").write_text(json.dumps(report, indent=2) + "\n")
    plot(floor, server, args.out / "bench.png", f"{args.model.stem} on {report['machine']} ({mp.cpu_count()} cpus)")
    print(f"wrote {args.out / 'bench.json'} and {args.out / 'bench.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
