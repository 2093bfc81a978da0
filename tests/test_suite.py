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
from loadtest.suite import PROFILES, Step, collect, group_members, plan, summary_markdown
from server.config import BUNDLED_MODEL
from server.engine.backends.onnxruntime_backend import nvidia_driver_present

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
    processes = " ".join(steps["frontend-processes"].command)  # issue 23: mnist-serve --workers 1, 2, 4, 8
    assert "--counts 1,2,4,8" in processes and "--clients 64" in processes
    with_model = " ".join(steps["workers-model"].command)  # the same with the bundled model on the GPU
    assert "--counts 1,2,4,8" in with_model and "--provider cuda" in with_model
    assert order[-2:] == ["frontend-processes", "workers-model"]


def bench_json(
    folder: Path, server: list[dict], echo: dict | None = None, floor: list | None = None, served: dict | None = None
) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    report = {
        "server": server,
        "echo": echo,
        "floor": floor or [],
        "summary": {},
        "served": served or {},
        "machine": {},
    }
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
    bench_json(  # 20,480 images/s: fails
        tmp_path / "bench-googlenet", [row("server", 4, 80, 12.0, batch=256)], served={"precision": "fp16"}
    )
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


@pytest.mark.parametrize(
    ("served", "fp16_written", "label"),
    [
        ({"precision": "fp16"}, True, "googlenet (fp16)"),
        ({"precision": "fp32"}, False, "googlenet (fp32: no fp16 export)"),
        ({"precision": "fp32"}, True, "googlenet (fp32)"),  # the CPU serves fp32 whatever was exported
        ({}, False, "googlenet (not served)"),
    ],
)
def test_the_full_models_target_is_named_after_the_precision_its_server_served(
    tmp_path: Path, served: dict, fp16_written: bool, label: str
) -> None:
    bench_json(tmp_path / "bench-googlenet", [row("server", 4, 200, 3.0, batch=256)], served=served)
    if fp16_written:
        fp16 = suite.variant_path(suite.trained_model("gpu", tmp_path), "fp16")
        fp16.parent.mkdir(parents=True)
        fp16.write_bytes(b"onnx")
    names = [t["target"] for t in collect("gpu", tmp_path, [], 1.0)["targets"]]
    assert f"{label} ClassifyBatch of 256 >= 25,000 images/s at p99 <= 10 ms" in names
    assert not any(name.startswith("googlenet (") and name.split(" ClassifyBatch")[0] != label for name in names)


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
    quick_steps(monkeypatch, [Step("slow", python(spawner), timeout_s=2), Step("after", gone(pid_file), 10)], 600)
    assert suite.run_suite("smoke", tmp_path / "out") == 1
    steps = {s["name"]: s for s in json.loads((tmp_path / "out" / "suite.json").read_text())["steps"]}
    assert steps["slow"]["status"].startswith("timed out") and steps["after"]["status"] == "passed"
    assert not alive(int(pid_file.read_text()))  # the grandchild went with its step


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


def test_a_server_start_waits_no_longer_than_the_budget_leaves(tmp_path: Path, monkeypatch) -> None:
    waits: list[float] = []

    class NeverServing:
        def __init__(self, flags: list[str], log: object, wait_s: float) -> None:
            waits.append(wait_s)

        def start(self) -> None:
            raise RuntimeError("the server for this step did not become SERVING")

        def stop(self) -> None:
            pass

    monkeypatch.setattr(suite, "StepServer", NeverServing)
    quick_steps(monkeypatch, [Step("served", python("pass"), timeout_s=150, server=["--model", "x"])], budget=30)
    assert suite.run_suite("smoke", tmp_path / "out") == 1
    assert len(waits) == 1 and 0 < waits[0] <= 30  # not the 180 s a server may take when the budget allows
    (record,) = json.loads((tmp_path / "out" / "suite.json").read_text())["steps"]
    assert record["status"].startswith("could not run: the server for this step did not become SERVING")


def test_summary_and_suite_json_reach_results_to_before_the_next_step_starts(tmp_path: Path, monkeypatch) -> None:
    back, seen = tmp_path / "back", tmp_path / "seen.json"
    copy = f"import shutil; shutil.copyfile({str(back / 'suite.json')!r}, {str(seen)!r})"
    quick_steps(monkeypatch, [Step("first", python("pass"), 30), Step("second", python(copy), 30)], 600)
    assert suite.run_suite("smoke", tmp_path / "out", results_to=back) == 0
    steps = {s["name"]: s for s in json.loads(seen.read_text())["steps"]}  # what `second` found there
    assert steps["first"]["status"] == "passed"
    assert steps["second"]["status"] == "running" and steps["second"]["process_group"] > 0


def alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie has exited: only its parent's bookkeeping is left)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def spawner(pid_file: Path, then: str = "") -> list[str]:
    """A step that starts a child that would outlive it, writes the child's pid, then runs `then` and waits."""
    return python(
        "import os, signal, subprocess, sys, time; "
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)']); "
        f"open({str(pid_file)!r}, 'w').write(str(child.pid)); {then or 'pass'}; time.sleep(120)"
    )


def gone(pid_file: Path) -> list[str]:
    """A step that passes only if the process whose pid `pid_file` holds no longer runs (a zombie has exited)."""
    return python(
        "import pathlib, sys; "
        f"stat = pathlib.Path('/proc', pathlib.Path({str(pid_file)!r}).read_text(), 'stat'); "
        "sys.exit(stat.exists() and stat.read_text().rsplit(')', 1)[1].split()[0] not in 'ZX')"
    )


def test_an_exception_in_the_suite_while_a_step_runs_kills_the_steps_process_group(tmp_path: Path, monkeypatch) -> None:
    pid_file = tmp_path / "child.pid"
    write_results = suite.write_results

    def failing_once_a_step_runs(profile: str, out: Path, records: list[dict], seconds: float) -> None:
        if any("process_group" in r for r in records) and not pid_file.with_suffix(".failed").exists():
            deadline = time.monotonic() + 60
            while (not pid_file.is_file() or not pid_file.read_text()) and time.monotonic() < deadline:
                time.sleep(0.01)  # until the step's child is started: its pid is written
            pid_file.with_suffix(".failed").touch()
            raise OSError(28, "No space left on device")
        write_results(profile, out, records, seconds)

    monkeypatch.setattr(suite, "write_results", failing_once_a_step_runs)
    quick_steps(monkeypatch, [Step("spawns", spawner(pid_file), 60), Step("after", gone(pid_file), 10)], 600)
    assert suite.run_suite("smoke", tmp_path / "out") == 1
    steps = {s["name"]: s for s in json.loads((tmp_path / "out" / "suite.json").read_text())["steps"]}
    assert steps["spawns"]["status"] == "could not run: [Errno 28] No space left on device"
    assert steps["after"]["status"] == "passed"  # the child was gone before the next step started


def test_a_sigterm_to_the_suite_kills_the_running_step_and_still_packs_the_results(tmp_path: Path, monkeypatch) -> None:
    pid_file = tmp_path / "child.pid"
    terminate_suite = f"os.kill({os.getpid()}, signal.SIGTERM)"  # this process runs the suite
    steps = [Step("first", python("pass"), 10), Step("signalled", spawner(pid_file, terminate_suite), 60),
             Step("never", python("pass"), 10)]  # fmt: skip
    quick_steps(monkeypatch, steps, 600)
    assert suite.run_suite("smoke", tmp_path / "out", results_to=tmp_path / "back") == 128 + 15
    assert not alive(int(pid_file.read_text()))
    results = json.loads((tmp_path / "back" / "suite.json").read_text())
    assert [(s["name"], s["status"]) for s in results["steps"]] == [
        ("first", "passed"),
        ("signalled", "interrupted by SIGTERM"),
        ("never", "not run: interrupted by SIGTERM"),
    ]
    assert (tmp_path / "back" / "out.tar.gz").is_file()


def only_without_a_driver(test):
    """Only where no NVIDIA driver is: a skip on a GPU machine, allowed under MNIST_TEST_STRICT=1."""
    skip = pytest.mark.skipif(nvidia_driver_present(), reason="an NVIDIA driver is here: CUDA may well work")
    return pytest.mark.may_skip("a GPU machine")(skip(test))


@only_without_a_driver
def test_without_cuda_the_environment_step_passes_with_its_cuda_probes_skipped(smoke) -> None:
    out, _ = smoke
    results = json.loads((out / "suite.json").read_text())
    assert results["steps"][0] == results["steps"][0] | {"name": "environment", "status": "passed"}
    assert {name: p["status"] for name, p in results["probes"].items()} == {
        "cuda_session": "skipped: no CUDA",
        "cuda_graph": "skipped: no CUDA",
    }
    assert "| cuda_graph | skipped: no CUDA |" in (out / "summary.md").read_text()


@only_without_a_driver
def test_the_environment_probe_reports_why_a_cuda_graph_failed(tmp_path: Path, monkeypatch) -> None:
    import server.engine.backends.onnxruntime_backend as backend
    from loadtest import machine

    monkeypatch.setattr(backend, "cuda_usable", lambda ort, provider: True)  # as if a GPU were here: CUDA fails
    assert machine.main(["--probe", "--json", str(tmp_path / "environment.json")]) == 1
    probes = json.loads((tmp_path / "environment.json").read_text())["probes"]
    assert probes["cuda_graph"]["status"] == "failed"
    assert "the CUDA provider did not start" in probes["cuda_graph"]["detail"]


def test_cuda_libraries_are_loaded_by_the_servers_loader_in_every_step(monkeypatch) -> None:
    import onnxruntime

    import server.engine.backends.onnxruntime_backend as backend
    from export import evaluate, onnx_export

    class Loaded(Exception):
        pass

    def loader(ort: object) -> None:
        raise Loaded

    monkeypatch.setattr(backend, "preload_cuda_libraries", loader)
    with pytest.raises(Loaded):
        onnx_export.ort_session(BUNDLED_MODEL, provider="cuda")  # export and export --check
    monkeypatch.setattr(
        onnxruntime, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"]
    )
    with pytest.raises(Loaded):
        evaluate.open_model(BUNDLED_MODEL)
    sources = [p for p in ROOT.glob("[!.]*/**/*.py") if p.parts[len(ROOT.parts)] != "tests"]
    others = [p for p in sources if "preload_dlls" in p.read_text() and p != Path(backend.__file__)]
    assert not others  # one home for loading CUDA: server/engine/backends/onnxruntime_backend.py


# --- a suite cut short, as a lent machine's time limit cuts it -----------------------------------------


def start_smoke(tmp_path: Path, mnist_dir: Path) -> subprocess.Popen:
    command = [sys.executable, "-m", "loadtest.bench", "--suite", "smoke", "--out", str(tmp_path / "out"),
               "--results-to", str(tmp_path / "back")]  # fmt: skip
    with (tmp_path / "suite.log").open("w") as log:
        return subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, "MNIST_DIR": str(mnist_dir)})  # fmt: skip


def running_after_the_first_step(tmp_path: Path, process: subprocess.Popen) -> dict:
    """Poll the copy in --results-to until the first step is recorded done and the next one runs: its record."""
    deadline = time.monotonic() + 300
    while process.poll() is None and time.monotonic() < deadline:
        results = suite._load(tmp_path / "back" / "suite.json")
        steps = (results or {}).get("steps", [])
        running = [s for s in steps if s["status"] == "running" and "process_group" in s]
        if running and steps[0]["name"] == "environment" and steps[0]["status"] == "passed":
            assert running[0]["name"] == "train"  # a step that runs for a while: a kill finds it running
            return running[0]
        time.sleep(0.05)
    pytest.fail(f"the smoke suite never got past its first step: {(tmp_path / 'suite.log').read_text()[-3000:]}")


@pytest.fixture
def cut_short(tmp_path: Path, mnist_dir: Path):
    """The smoke suite as a subprocess, running its second step; whatever a failed test leaves is killed."""
    process = start_smoke(tmp_path, mnist_dir)
    running = running_after_the_first_step(tmp_path, process)
    yield process, running
    for pgid in (process.pid, running["process_group"]):
        try:
            os.killpg(pgid, 9)
        except ProcessLookupError:
            pass
    process.wait()


def test_a_suite_terminated_mid_step_leaves_its_results_packed_and_no_step_process(tmp_path: Path, cut_short) -> None:
    process, running = cut_short
    process.terminate()  # what `timeout` sends
    assert process.wait(120) == 128 + 15
    steps = {s["name"]: s["status"] for s in json.loads((tmp_path / "back" / "suite.json").read_text())["steps"]}
    assert steps["environment"] == "passed" and steps[running["name"]] == "interrupted by SIGTERM"
    assert f"| {running['name']} | interrupted by SIGTERM |" in (tmp_path / "back" / "summary.md").read_text()
    assert (tmp_path / "back" / "out.tar.gz").is_file()
    assert group_members(running["process_group"]) == [] and group_members(process.pid) == []
    assert not (tmp_path / "out" / running["name"] / "report.json").exists()  # cut short, not waited for


def test_a_suite_killed_mid_step_leaves_the_copies_of_its_last_step_and_no_step_process(
    tmp_path: Path, cut_short
) -> None:
    process, running = cut_short
    process.kill()  # SIGKILL: no handler, no finally; only what was copied after each step survives
    assert process.wait(60) == -9
    steps = {s["name"]: s["status"] for s in json.loads((tmp_path / "back" / "suite.json").read_text())["steps"]}
    assert steps["environment"] == "passed" and steps[running["name"]] == "running"
    assert (tmp_path / "back" / "summary.md").is_file() and not (tmp_path / "back" / "out.tar.gz").exists()
    deadline = time.monotonic() + 60  # the guard process kills the step's group once the suite is gone
    while group_members(running["process_group"]) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert group_members(running["process_group"]) == []
    assert not (tmp_path / "out" / running["name"] / "report.json").exists()  # killed, not left to finish
