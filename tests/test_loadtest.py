"""The load-test harness and the benchmark: verdict logic both ways, a real Locust smoke run, mnist-bench."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from loadtest.bench import LatencyStats, summarize
from loadtest.run import histogram_quantile, judge, parse_duration
from tests.support import start_server

ROOT = Path(__file__).resolve().parents[1]


def results(
    latencies: dict[str, list[float]], errors: dict[str, int] | None = None, correct: int = 9, checked: int = 10
) -> dict:
    return {"latencies_ms": latencies, "errors": errors or {}, "correct": correct, "checked": checked}


def test_a_run_within_slo_and_error_budget_passes() -> None:
    verdict = judge(results({"Classify raw": [1.0] * 990 + [5.0] * 10}), 10, slo_p99_ms=10, max_error_ratio=0.001)
    assert verdict.passed and verdict.total.requests == 1000 and verdict.total.requests_per_second == 100
    assert verdict.accuracy == 0.9


def test_a_slow_tail_fails_the_slo() -> None:
    verdict = judge(results({"Classify raw": [1.0] * 980 + [50.0] * 20}), 10, slo_p99_ms=10, max_error_ratio=1)
    assert not verdict.passed and "p99 50.00 ms is over the SLO of 10 ms" in verdict.failures[0]


def test_errors_over_budget_fail_even_when_fast() -> None:
    verdict = judge(results({"Classify raw": [1.0] * 100}, {"UNAVAILABLE": 2}), 10, slo_p99_ms=10, max_error_ratio=0.01)
    assert not verdict.passed and verdict.error_ratio == 0.02 and "error ratio" in verdict.failures[0]


def test_a_run_without_completed_requests_fails() -> None:
    assert not judge(results({}, checked=0), 10, 10, 1).passed


def test_histogram_quantile_interpolates_like_prometheus() -> None:
    buckets = {0.001: 50.0, 0.002: 90.0, 0.005: 100.0, float("inf"): 100.0}
    assert histogram_quantile(0.5, buckets) == pytest.approx(0.001)
    assert histogram_quantile(0.7, buckets) == pytest.approx(0.0015)
    assert histogram_quantile(0.99, buckets) == pytest.approx(0.0047)
    assert histogram_quantile(0.99, {0.001: 0.0, float("inf"): 0.0}) is None


def test_durations_read_like_locusts() -> None:
    assert (parse_duration("30s"), parse_duration("2m"), parse_duration("1h"), parse_duration("12")) == (
        30,
        120,
        3600,
        12,
    )


def test_bench_summary_relates_the_server_to_the_floor() -> None:
    """Single-image closed loops against the floor; batch and open-loop rows get their own keys."""
    floor = [
        LatencyStats("floor", 1, 1, 100, 1000, 1.0, 1.2, 2.0, 3.0),
        LatencyStats("floor", 32, 1, 100, 4000, 8.0, 9.0, 10.0, 11.0),
    ]
    server = [
        LatencyStats("server", 1, 1, 100, 500, 1.5, 2.0, 3.0, 4.0),
        LatencyStats("server", 1, 8, 100, 2000, 4.0, 6.0, 9.0, 12.0),
        LatencyStats("server", 1, 32, 100, 3000, 12.0, 15.0, 20.0, 30.0),
        LatencyStats("server", 256, 4, 100, 90_000, 7.0, 8.0, 9.5, 11.0),
        LatencyStats("open-loop", 1, 2, 100, 1000, 1.0, 2.0, 4.5, 8.0, target_rate=1000),
    ]
    summary = summarize(floor, server)
    assert summary["classify_batch_256_images_per_second_c4"] == 90_000
    assert summary["classify_batch_256_p99_ms_c4"] == 9.5 and summary["open_loop_1000_per_s_p99_ms"] == 4.5
    assert summary["server_overhead_p50_ms_at_batch_1"] == pytest.approx(0.5)
    assert summary["p99_ratio_to_floor_batch_1"] == pytest.approx(1.5)
    assert summary["best_images_per_second_within_slo"] == 2000 and summary["best_within_slo_concurrency"] == 8
    assert summary["throughput_ratio_to_floor_best"] == pytest.approx(0.5)


def run_loadtest(port: int, report_dir: Path, *flags: str) -> tuple[int, str]:
    process = subprocess.run(
        [sys.executable, "-m", "loadtest.run", "--host", f"127.0.0.1:{port}", "--report-dir", str(report_dir), *flags],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    return process.returncode, process.stdout + process.stderr


def test_locust_smoke_run_passes_a_generous_slo_and_fails_an_impossible_one(tmp_path: Path) -> None:
    server, port = start_server("--metrics-port", "0")
    try:
        code, output = run_loadtest(
            port,
            tmp_path / "generous",
            "--users",
            "2",
            "--spawn-rate",
            "2",
            "--run-time",
            "8s",
            "--slo-p99-ms",
            "5000",
            "--max-error-ratio",
            "0.001",
            "--min-accuracy",
            "0.95",
        )
        assert code == 0, output
        assert "VERDICT: PASS" in output and "Classify raw" in output and "ClassifyBatch" in output
        (run_dir,) = (tmp_path / "generous").iterdir()
        verdict = json.loads((run_dir / "verdict.json").read_text())
        assert verdict["passed"] and verdict["total"]["requests"] > 20 and verdict["accuracy"] > 0.95
        assert {"Classify raw", "Classify encoded", "ClassifyBatch"} == {r["name"] for r in verdict["rows"]}
        assert (run_dir / "report.html").stat().st_size > 0 and (run_dir / "locust_stats.csv").is_file()

        code, output = run_loadtest(
            port, tmp_path / "impossible", "--users", "1", "--run-time", "3s", "--slo-p99-ms", "0.001"
        )
        assert code == 1, output
        assert "VERDICT: FAIL" in output and "over the SLO of 0.001 ms" in output
    finally:
        server.terminate()
        server.wait(30)


def test_bench_writes_table_json_and_plot(tmp_path: Path) -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "loadtest.bench",
            "--provider",
            "cpu",
            "--seconds",
            "1",
            "--batch-sizes",
            "1,4",
            "--concurrency",
            "1,2",
            "--batch-images",
            "8",
            "--batch-clients",
            "2",
            "--open-loop-rates",
            "30",
            "--out",
            str(tmp_path),
        ],  # fmt: skip
        capture_output=True,
        text=True,
        timeout=180,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads((tmp_path / "bench.json").read_text())
    assert [f["batch_size"] for f in report["floor"]] == [1, 4]
    rows = [(s["label"], s["batch_size"], s["concurrency"], s["target_rate"]) for s in report["server"]]
    assert rows == [("server", 1, 1, 0), ("server", 1, 2, 0), ("server", 8, 2, 0), ("open-loop", 1, 2, 30)]
    assert all(s["errors"] == 0 and s["calls"] > 0 for s in report["server"])
    assert "server_overhead_p50_ms_at_batch_1" in report["summary"]
    assert (
        "classify_batch_8_images_per_second_c2" in report["summary"]
        and "open_loop_30_per_s_p99_ms" in report["summary"]
    )
    # what served, and where: the title of the plot says it too
    assert report["served"]["name"] == "googlenet-fast" and report["served"]["precision"] == "fp32"
    assert report["machine"]["cpus"] >= 1 and report["machine"]["onnxruntime"].startswith("onnxruntime")
    assert "googlenet-fast fp32 NCHW on CPUExecutionProvider" in report["title"]
    assert (tmp_path / "bench.png").stat().st_size > 10_000


def test_an_open_loop_keeps_its_rate_whatever_the_server_does() -> None:
    """The sender's schedule is fixed: a server that answers slowly gets the same calls, not fewer."""
    from loadtest.drivers import open_loop

    server, port = start_server("--metrics-port", "0", "--max-batch-size", "1")
    try:
        result = open_loop(f"127.0.0.1:{port}", rate=100, seconds=2, processes=2)
    finally:
        server.terminate()
        server.wait(30)
    assert result.sent == 200 and result.error_count == 0
    assert len(result.latencies_s) == 200 and (result.latencies_s > 0).all()


def test_wrong_answers_fail_the_run_by_default() -> None:
    from loadtest.run import build_parser

    default = build_parser().parse_args(["--host", "x:1"]).min_accuracy
    assert default == 0.98
    verdict = judge(results({"Classify raw": [1.0] * 100}, correct=10, checked=100), 10, 10, 0.001, default)
    assert not verdict.passed and "accuracy" in verdict.failures[0]


def test_a_calls_server_cpu_leaves_out_what_the_server_spent_on_other_work() -> None:
    """The refusal cost's server also runs the batches that keep its engine busy: measured beside the open loop
    (background_cores) and taken out, they are not charged to the refused calls."""
    from loadtest.cpu_cost import CpuPerCall

    measured = CpuPerCall("refusal", 800, 1000, cpu_seconds=0.6, window_seconds=1.5, codes={}, background_cores=0.1)
    assert measured.microseconds_per_call == pytest.approx(450.0)  # (0.6 s - 0.1 cores x 1.5 s) / 1000 calls
    assert CpuPerCall("echo", 800, 1000, 0.6, 1.5, {}).microseconds_per_call == pytest.approx(600.0)
