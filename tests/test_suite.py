"""The one-command GPU check (`mnist-bench --suite gpu`): its plan, its verdicts, and a full run of its smoke twin.

The GPU run happens only where a GPU is lent; everything it does runs here first, small, on the CPU,
so that the few minutes of GPU time are never lost to a Python error.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
import time
from dataclasses import replace
from pathlib import Path

import pytest

from loadtest import suite
from loadtest.suite import PROFILES, Step, collect, plan, summary_markdown

ROOT = Path(__file__).resolve().parents[1]


def test_the_dry_run_lists_every_step_and_runs_nothing(tmp_path: Path) -> None:
    out = tmp_path / "check"
    result = subprocess.run(
        [sys.executable, "-m", "loadtest.bench", "--suite", "gpu", "--dry-run", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr
    assert not out.exists()
    for step in plan("gpu", out):
        assert f"- {step.name}" in result.stdout
    # the README's GPU training recipe, the fp16 export, the CUDA provider, 16 Locust users
    assert "--preset googlenet --epochs 3 --batch-size 256 --lr 0.2" in result.stdout
    assert "--provider cuda" in result.stdout and "--fp16" in result.stdout and "--users 16" in result.stdout
    assert "--compare-echo" in result.stdout and "at most 470 s" in result.stdout


def test_the_gpu_plan_measures_what_the_targets_need() -> None:
    steps = {step.name: step for step in plan("gpu", Path("/x"))}
    bench = " ".join(steps["bench-googlenet-fast"].command)
    assert "--concurrency 1,4,16,64" in bench and "--batch-images 256" in bench and "--open-loop-rates" in bench
    assert "--batch-sizes 1,2,4,8,16,32,64,128,256" in bench  # a floor at every bucket
    assert steps["bench-googlenet"].needs == ["export"] and steps["export"].needs == ["train"]
    assert "--concurrency 1,16,64" in " ".join(steps["ceiling"].command)
    assert steps["loadtest"].server is not None
    assert PROFILES["gpu"].provider == "cuda" and PROFILES["smoke"].provider == "cpu"
    order = list(steps)
    assert order[:2] == ["environment", "train"]  # training first: its crash was the first GPU bug
    assert order.index("loadtest") < order.index("export") < order.index("floor-googlenet-fp32")  # targets first


def bench_json(folder: Path, server: list[dict], echo: dict | None = None, floor: list | None = None) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    report = {"server": server, "echo": echo, "floor": floor or [], "summary": {}, "served": {}, "machine": {}}
    (folder / "bench.json").write_text(json.dumps(report))


def row(label: str, concurrency: int, calls_per_second: float, p99_ms: float, batch: int = 1) -> dict:
    return {
        "label": label,
        "batch_size": batch,
        "concurrency": concurrency,
        "calls_per_second": calls_per_second,
        "images_per_second": calls_per_second * batch,
        "p99_ms": p99_ms,
    }


def test_targets_are_judged_against_the_echo_server_measured_in_the_same_run(tmp_path: Path) -> None:
    bench_json(
        tmp_path / "bench-googlenet-fast",
        [
            row("server", 1, 900, 1.4),
            row("server", 16, 4500, 8.0),  # 4500 / 5882 = 77%: passes
            row("server", 64, 3000, 30.0),  # 3000 / 5579 = 54%: fails
            row("server", 4, 300, 6.0, batch=256),  # 76,800 images/s at 6 ms: passes
        ],
    )
    bench_json(tmp_path / "bench-googlenet", [row("server", 4, 80, 12.0, batch=256)])  # 20,480 images/s: fails
    echo_rows = [row("echo", 1, 1800, 1.0), row("echo", 16, 5882, 4.1), row("echo", 64, 5579, 20.6)]
    bench_json(tmp_path / "ceiling", [], echo={"rows": {"echo": echo_rows, "null": []}, "ratios": {}})
    verdict_dir = tmp_path / "loadtest" / "20260101-000000"
    verdict_dir.mkdir(parents=True)
    (verdict_dir / "verdict.json").write_text(json.dumps({"passed": True, "total": {"p99_ms": 4.2}}))
    score = {size: {"median_ms": {"classifier": run, "in-graph": run * grown}} for size, run, grown in
             (("1", 0.30, 1.05), ("256", 2.40, 1.20))}  # fmt: skip
    (tmp_path / "digit-score-cost.json").write_text(json.dumps({"batches": score}))
    results = collect("gpu", tmp_path, [{"name": "train", "status": "passed"}], 400.0)
    verdicts = {t["target"]: t["passed"] for t in results["targets"]}
    assert verdicts == {
        "googlenet-fast Classify p99 <= 2 ms at 1 client": True,
        "googlenet-fast at 16 clients >= 75% of the echo server's calls/s, p99 <= 10 ms": True,
        "googlenet-fast at 64 clients >= 75% of the echo server's calls/s": False,
        "googlenet-fast ClassifyBatch of 256 >= 50,000 images/s at p99 <= 10 ms": True,
        "googlenet (fp16) ClassifyBatch of 256 >= 25,000 images/s at p99 <= 10 ms": False,
        "mnist-loadtest with 16 users passes the 10 ms SLO": True,
        "the digit score adds <= 10% to a run of 1": True,  # +5%
        "the digit score adds <= 10% to a run of 256": False,  # +20%
    }
    text = summary_markdown(results)
    assert "| googlenet-fast at 64 clients >= 75% of the echo server's calls/s | 0.538 | FAIL |" in text


def test_a_target_without_its_measurement_is_not_measured_rather_than_failed(tmp_path: Path) -> None:
    results = collect("gpu", tmp_path, [], 1.0)
    assert {t["passed"] for t in results["targets"]} == {None}
    assert "not measured" in summary_markdown(results)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory, mnist_dir: Path) -> tuple[Path, subprocess.CompletedProcess]:
    out = tmp_path_factory.mktemp("smoke")
    result = subprocess.run(
        [sys.executable, "-m", "loadtest.bench", "--suite", "smoke", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
        env={**os.environ, "MNIST_DIR": str(mnist_dir)},
    )
    return out, result


def test_the_smoke_suite_runs_every_step_of_the_gpu_check_on_the_cpu(smoke) -> None:
    out, result = smoke
    suite = json.loads((out / "suite.json").read_text())
    failed = {s["name"]: s.get("log_tail") for s in suite["steps"] if s["status"] != "passed"}
    assert not failed, failed
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert [s["name"] for s in suite["steps"]] == [step.name for step in plan("smoke", out)]
    for step in suite["steps"]:
        assert Path(step["log"]).is_file()


def test_the_smoke_suite_leaves_one_folder_of_json_pictures_and_a_summary(smoke) -> None:
    out, _ = smoke
    summary = (out / "summary.md").read_text()
    assert summary.startswith("# GPU check (smoke profile)") and "| target | value | verdict | detail |" in summary
    assert (out / "floors.png").stat().st_size > 10_000
    for name in ("bench-googlenet-fast", "bench-googlenet", "ceiling", "floor-googlenet-fast-fp32"):
        assert (out / name / "bench.json").is_file() and (out / name / "bench.png").stat().st_size > 10_000
    ceiling = json.loads((out / "ceiling" / "bench.json").read_text())
    assert set(ceiling["echo"]["ratios"]) == {"c1", "c4_batch8"}
    assert (out / "models" / "googlenet-fast.onnx").is_file() and (
        out / "models" / "googlenet-fast.fp16.onnx"
    ).is_file()
    (verdict,) = (out / "loadtest").glob("*/verdict.json")
    assert json.loads(verdict.read_text())["passed"]


def quick_steps(monkeypatch: pytest.MonkeyPatch, steps: list[Step], budget: float) -> None:
    monkeypatch.setattr(suite, "plan", lambda profile, out: steps)
    monkeypatch.setitem(suite.PROFILES, "smoke", replace(PROFILES["smoke"], budget_s=budget))


def python(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def test_a_step_over_its_time_is_killed_with_everything_it_started(tmp_path: Path, monkeypatch) -> None:
    pid_file = tmp_path / "child.pid"
    spawner = (
        "import subprocess, sys, time; "
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
        f"open({str(pid_file)!r}, 'w').write(str(child.pid)); time.sleep(60)"
    )
    quick_steps(monkeypatch, [Step("slow", python(spawner), timeout_s=2), Step("after", python("pass"), 10)], 600)
    assert suite.run_suite("smoke", tmp_path / "out") == 1
    steps = {s["name"]: s for s in json.loads((tmp_path / "out" / "suite.json").read_text())["steps"]}
    assert steps["slow"]["status"].startswith("timed out") and steps["after"]["status"] == "passed"
    status = Path(f"/proc/{int(pid_file.read_text())}/status")
    time.sleep(0.2)
    assert not status.exists() or "\tZ (zombie)" in status.read_text()  # the grandchild went with its step


def test_steps_that_no_longer_fit_the_budget_are_skipped_and_said_so(tmp_path: Path, monkeypatch) -> None:
    steps = [Step("first", python("import time; time.sleep(3)"), 30), Step("second", python("pass"), 30)]
    quick_steps(monkeypatch, steps, budget=12)
    assert suite.run_suite("smoke", tmp_path / "out") == 1
    summary = (tmp_path / "out" / "summary.md").read_text()
    assert "| first | passed |" in summary and "| second | skipped: the suite's 12 s were used up |" in summary


def test_results_travel_back_as_a_few_flat_files_without_models(tmp_path: Path, monkeypatch) -> None:
    out = tmp_path / "gpu-check"
    writer = f"import pathlib; d = pathlib.Path({str(out)!r}) / 'models'; d.mkdir(parents=True); " + (
        "(d / 'm.onnx').write_bytes(b'x' * 1000); (d / 'note.json').write_text('{}')"
    )
    quick_steps(monkeypatch, [Step("write", python(writer), 30)], 600)
    assert suite.run_suite("smoke", out, results_to=tmp_path / "back") == 0
    back = sorted(p.name for p in (tmp_path / "back").iterdir())
    assert back == ["gpu-check.tar.gz", "suite.json", "summary.md"]  # no floors.png: no floor was measured
    with tarfile.open(tmp_path / "back" / "gpu-check.tar.gz") as archive:
        names = archive.getnames()
    assert "gpu-check/models/note.json" in names and "gpu-check/logs/write.log" in names
    assert not any(name.endswith(".onnx") for name in names)
