"""mnist-loadtest: run the Locust scenario headless against a server and judge it against an SLO.

Writes Locust's CSV and HTML report plus `verdict.json` under --report-dir, prints a verdict
table (requests/s, p50/p95/p99/max from exact client-side latencies, errors by gRPC code,
accuracy, and the server's own p99 from /metrics when --metrics-url is given), and exits 1 when
the p99 SLO or the error budget is missed (2 when the run itself could not be made).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
LOCUSTFILE = Path(__file__).resolve().parent / "locustfile.py"
LATENCY_METRIC = "mnist_request_latency_seconds"


@dataclass
class Row:
    name: str
    requests: int
    requests_per_second: float
    p50_ms: float
    p95_ms: float
    p99_ms: float
    max_ms: float


@dataclass
class Verdict:
    rows: list[Row]
    total: Row
    errors: dict[str, int]
    error_ratio: float
    accuracy: float | None
    slo_p99_ms: float
    max_error_ratio: float
    server_p99_ms: float | None = None
    failures: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.failures


def row(name: str, latencies_ms: list[float], seconds: float) -> Row:
    ms = np.asarray(latencies_ms, dtype=float)
    if ms.size == 0:
        return Row(name, 0, 0.0, float("nan"), float("nan"), float("nan"), float("nan"))
    p50, p95, p99 = np.percentile(ms, [50, 95, 99])
    return Row(name, int(ms.size), ms.size / seconds, float(p50), float(p95), float(p99), float(ms.max()))


def judge(
    results: dict,
    seconds: float,
    slo_p99_ms: float,
    max_error_ratio: float,
    min_accuracy: float | None = None,
    server_p99_ms: float | None = None,
) -> Verdict:
    """Apply the SLO (p99 over all calls, failed ones included) and the error budget to a run's results."""
    latencies = results["latencies_ms"]
    rows = [row(name, values, seconds) for name, values in sorted(latencies.items())]
    total = row("all", [v for values in latencies.values() for v in values], seconds)
    errors = dict(results["errors"])
    error_ratio = sum(errors.values()) / total.requests if total.requests else 1.0
    accuracy = results["correct"] / results["checked"] if results["checked"] else None
    verdict = Verdict(rows, total, errors, error_ratio, accuracy, slo_p99_ms, max_error_ratio, server_p99_ms)
    if total.requests == 0:
        verdict.failures.append("no request completed")
    elif total.p99_ms > slo_p99_ms:
        verdict.failures.append(f"p99 {total.p99_ms:.2f} ms is over the SLO of {slo_p99_ms:g} ms")
    if error_ratio > max_error_ratio:
        verdict.failures.append(f"error ratio {error_ratio:.4f} is over the budget of {max_error_ratio:g}")
    if min_accuracy and (accuracy is None or accuracy < min_accuracy):
        verdict.failures.append(f"accuracy {accuracy} is under the required {min_accuracy:g}")
    return verdict


def scrape_histogram(url: str, metric: str = LATENCY_METRIC) -> dict[float, float]:
    """Cumulative bucket counts summed over all label sets: {le: count}."""
    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(url, timeout=5).read().decode()
    buckets: dict[float, float] = {}
    for family in text_string_to_metric_families(text):
        if family.name != metric:
            continue
        for sample in family.samples:
            if sample.name == metric + "_bucket":
                le = float(sample.labels["le"])
                buckets[le] = buckets.get(le, 0.0) + sample.value
    return buckets


def histogram_quantile(q: float, buckets: dict[float, float]) -> float | None:
    """Prometheus' histogram_quantile: linear interpolation inside the bucket holding the q-th observation."""
    edges = sorted(buckets)
    if not edges or buckets[edges[-1]] <= 0:
        return None
    rank = q * buckets[edges[-1]]
    lower_edge, lower_count = 0.0, 0.0
    for edge in edges:
        count = buckets[edge]
        if count >= rank:
            if edge == float("inf"):
                return lower_edge
            return lower_edge + (edge - lower_edge) * (rank - lower_count) / max(count - lower_count, 1e-12)
        lower_edge, lower_count = edge, count
    return lower_edge


def format_verdict(v: Verdict) -> str:
    lines = [f"{'request':<18} {'count':>7} {'req/s':>8} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8} {'max ms':>8}"]
    for r in [*v.rows, v.total]:
        lines.append(
            f"{r.name:<18} {r.requests:>7} {r.requests_per_second:>8.1f} {r.p50_ms:>8.2f} {r.p95_ms:>8.2f} "
            f"{r.p99_ms:>8.2f} {r.max_ms:>8.2f}"
        )
    errors = ", ".join(f"{code} {n}" for code, n in sorted(v.errors.items())) or "none"
    lines.append(f"errors: {errors} (ratio {v.error_ratio:.4f}, budget {v.max_error_ratio:g})")
    lines.append("accuracy under load: " + (f"{100 * v.accuracy:.2f}%" if v.accuracy is not None else "n/a"))
    server = f"{v.server_p99_ms:.2f} ms" if v.server_p99_ms is not None else "n/a (no --metrics-url)"
    lines.append(f"p99: client {v.total.p99_ms:.2f} ms, server {server}; SLO {v.slo_p99_ms:g} ms")
    lines.append("VERDICT: " + ("PASS" if v.passed else "FAIL — " + "; ".join(v.failures)))
    return "\n".join(lines)


def parse_duration(text: str) -> float:
    units = {"s": 1, "m": 60, "h": 3600}
    try:
        return float(text[:-1]) * units[text[-1]] if text[-1] in units else float(text)
    except (ValueError, IndexError):
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration like 30s, 2m or 1h") from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mnist-loadtest",
        description="Load-test a running mnist-serve with Locust (headless): a 6:3:1 mix of Classify with raw "
        "digits, Classify with PNG-encoded digits and ClassifyBatch, drawn from the MNIST test set and checked "
        "against their labels. Prints a verdict and exits 1 if the p99 SLO or the error budget is missed.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--host",
        required=True,
        help="server as HOST:PORT; or several, comma-separated, or dns:///NAME:PORT: each user then spreads its calls "
        "round-robin over the replicas, retried on another when one is unavailable",
    )
    parser.add_argument("--users", type=int, default=8, help="concurrent Locust users (one call in flight each)")
    parser.add_argument("--spawn-rate", type=float, default=8, help="users started per second")
    parser.add_argument("--run-time", type=parse_duration, default=30.0, help="duration, e.g. 30s or 2m")
    parser.add_argument("--slo-p99-ms", type=float, default=10.0, help="p99 latency objective over all calls")
    parser.add_argument("--max-error-ratio", type=float, default=0.001, help="largest tolerated share of failures")
    parser.add_argument(
        "--min-accuracy",
        type=float,
        default=0.98,
        help="fail if the share of answers matching their labels is below this (0 = don't judge)",
    )
    parser.add_argument("--metrics-url", help="the server's /metrics URL, read before and after for its own p99")
    parser.add_argument(
        "--report-dir",
        type=Path,
        default=Path("reports/loadtest"),
        help="Locust CSV and HTML reports and verdict.json go to a timestamped folder in here",
    )
    parser.add_argument("--batch-images", type=int, default=16, help="images per ClassifyBatch call")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    out = args.report_dir / time.strftime("%Y%m%d-%H%M%S")
    out.mkdir(parents=True, exist_ok=True)
    exact = out / "exact_latencies.json"
    try:
        before = scrape_histogram(args.metrics_url) if args.metrics_url else None
    except (urllib.error.URLError, OSError) as exc:
        print(f"mnist-loadtest: cannot read {args.metrics_url}: {exc}", file=sys.stderr)
        return 2
    env = {
        **os.environ,
        "MNIST_LOADTEST_RESULTS": str(exact),
        "MNIST_LOADTEST_BATCH_IMAGES": str(args.batch_images),
        "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    command = [
        sys.executable,
        "-m",
        "locust",
        "-f",
        str(LOCUSTFILE),
        "--headless",
        "--host",
        args.host,
        "--users",
        str(args.users),
        "--spawn-rate",
        str(args.spawn_rate),
        "--run-time",
        f"{args.run_time:g}s",
        "--csv",
        str(out / "locust"),
        "--html",
        str(out / "report.html"),
        "--only-summary",
        "--loglevel",
        "WARNING",
        "--exit-code-on-error",
        "0",
        "--stop-timeout",
        "10",
    ]
    print(
        f"mnist-loadtest: {args.users} users against {args.host} for {args.run_time:g}s; reports in {out}/", flush=True
    )
    locust = subprocess.run(command, env=env)
    if locust.returncode != 0 or not exact.is_file():
        print(f"mnist-loadtest: locust failed (exit {locust.returncode}); see the output above", file=sys.stderr)
        return 2
    results = json.loads(exact.read_text())
    server_p99 = None
    if before is not None:
        try:
            after = scrape_histogram(args.metrics_url)
        except (urllib.error.URLError, OSError) as exc:
            print(f"mnist-loadtest: cannot read {args.metrics_url} after the run: {exc}", file=sys.stderr)
            after = {}
        delta = {le: after[le] - before.get(le, 0.0) for le in after}
        if delta and min(delta.values()) >= 0:  # a restarted server resets its counters: no server p99 then
            quantile = histogram_quantile(0.99, delta)
            server_p99 = quantile * 1000 if quantile is not None else None
    verdict = judge(results, args.run_time, args.slo_p99_ms, args.max_error_ratio, args.min_accuracy, server_p99)
    (out / "verdict.json").write_text(
        json.dumps({**asdict(verdict), "passed": verdict.passed, "command": sys.argv}, indent=2, default=str) + "\n"
    )
    print(format_verdict(verdict))
    return 0 if verdict.passed else 1


if __name__ == "__main__":
    sys.exit(main())
