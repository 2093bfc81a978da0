"""The whole GPU check in one command: `mnist-bench --suite gpu --out DIR` (under 8 minutes on an H100/H200).

Steps, each a subprocess with its own time limit and log, each run even when an earlier one failed
(unless it needs that one's output): train the README's googlenet recipe; export it to fp32 and
fp16; measure the bundled googlenet-fast's fp16 accuracy on the GPU; benchmark googlenet-fast (the
served default: fp16, NHWC, CUDA graphs, buckets 1..256) against its floor, with ClassifyBatch and
an open loop, plus floors for fp32 and for no CUDA graph; benchmark googlenet the same way; measure
the Python gRPC ceiling (echo server vs null backend); run `mnist-loadtest` with 16 users. Then one
folder: each step's JSON, PNG and log, `suite.json`, and `summary.md` with the targets judged.

A lent machine's time limit may cut the run short, so: `summary.md` and `suite.json` are rewritten (and
copied to `--results-to`) as each step starts and ends; SIGTERM, SIGINT and SIGHUP raise `Interrupted`, so
the packing in `finally` still runs; every step's process group is killed however the suite ends (a guard
process does it after a SIGKILL); and no wait outlasts the budget left.

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
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import IO, Any, NoReturn

from loadtest.servers import ServerProcess
from proto.contract import variant_path
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
    process_counts: str = "1,2,4,8"  # mnist-serve --workers N (loadtest/processes.py) ...
    process_clients: str = "64"  # ... driven by this many closed-loop clients


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
        process_counts="1,2",
        process_clients="2",
    ),
}
SERVER_PORT, METRICS_PORT = 50651, 9651
SERVER_WAIT_S = 180.0  # the longest a step's server may take to become SERVING, when the budget leaves that much


def trained_model(profile_name: str, out: Path) -> Path:
    """Where the export step writes the trained model (fp32; its fp16 variant beside it), named after its preset."""
    return out / "models" / f"{PROFILES[profile_name].train[1]}.onnx"


def workers_step(name: str, p: Profile, out: Path, server_args: list[str], limit_s: float, why: str) -> Step:
    """`mnist-serve --workers` at each of the profile's counts, measured by loadtest/processes.py into NAME.json."""
    command = [PY, "-m", "loadtest.processes", "--counts", p.process_counts, "--clients", p.process_clients]
    command += ["--seconds", p.seconds, *server_args, "--json", str(out / f"{name}.json")]
    return Step(name, command, limit_s, why=why)


def plan(profile_name: str, out: Path) -> list[Step]:
    """The steps in the order they run: training first, then what the serving targets need, then comparisons."""
    p = PROFILES[profile_name]
    model = trained_model(profile_name, out)
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
        Step(
            "environment",
            [PY, "-m", "loadtest.machine", "--probe", "--json", str(out / "environment.json")],
            60,
            why="GPU, driver, versions; does CUDA start, does a CUDA graph capture and replay through IO binding?",
        ),  # fmt: skip
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
            why="the full model: fp16 where export-fp16 wrote its variant, else fp32 (the summary names what the "
            "server said it served)",
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
        workers_step(
            "frontend-processes",
            p,
            out,
            [],
            90,
            "mnist-serve --workers 1, 2, 4, 8 on the null backend: does the frontend scale with worker processes on "
            "this host, and at what CPU per call? (issue 23: frontend workers)",
        ),
        workers_step(
            "workers-model",
            p,
            out,
            ["--server-args", f"--provider {p.provider}"],
            150,
            "mnist-serve --workers 1, 2, 4, 8 with the bundled model, one engine per worker on the one GPU: "
            "single-image calls/s and CPU per call as workers are added (issue 23: the engine-per-worker decision)",
        ),
    ]


# --- running ------------------------------------------------------------------------------------------

# Run by the guard process: it holds the read end of a pipe whose write end only the suite has, so the pipe
# closes whenever the suite ends, SIGKILL included (which runs no `finally`); then it kills each process
# group the suite registered ("+PGID") and has not yet released ("-PGID").
GUARD = """
import os, signal, sys
groups = set()
for line in sys.stdin:
    (groups.add if line[0] == "+" else groups.discard)(int(line[1:]))
for pgid in groups:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except OSError:
        pass
"""

# Prefixed to a step server's command: it dies with the suite (PR_SET_PDEATHSIG survives exec), even when the
# suite is killed while still waiting for it to serve, before its pid could be registered anywhere.
DIE_WITH_PARENT = (
    "import ctypes, os, signal, sys; prctl = getattr(ctypes.CDLL(None), 'prctl', None); "
    "prctl and prctl(1, signal.SIGKILL); "
    "os.getppid() == int(sys.argv[1]) or os._exit(1); os.execv(sys.executable, [sys.executable, *sys.argv[2:]])"
)


def group_members(pgid: int) -> list[int]:
    """The live (not zombie) processes in process group `pgid`, from /proc: empty once the group is gone."""
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # exited while we looked
        if int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
            members.append(int(stat.parent.name))
    return members


class ProcessGroups:
    """The process groups of the running steps: killed on every way out of the suite, and by a guard process
    if the suite itself is killed, so no step's servers and clients outlive it."""

    def __init__(self) -> None:
        self.live: set[int] = set()
        self.guard = subprocess.Popen(
            [PY, "-c", GUARD], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            text=True, start_new_session=True,  # a Ctrl-C or a signal to the suite's group leaves it to its work
        )  # fmt: skip

    def _tell(self, line: str) -> None:
        if self.guard.stdin is not None and not self.guard.stdin.closed:
            with suppress(OSError):
                self.guard.stdin.write(line + "\n")
                self.guard.stdin.flush()

    def add(self, pgid: int) -> None:
        self.live.add(pgid)
        self._tell(f"+{pgid}")

    def kill(self, pgid: int, wait_s: float = 10.0) -> None:
        """SIGKILL the whole group and wait (at most `wait_s`) until none of it is left alive."""
        with suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGKILL)
        deadline = time.monotonic() + wait_s
        while group_members(pgid) and time.monotonic() < deadline:
            time.sleep(0.05)
        self.release(pgid)

    def release(self, pgid: int) -> None:
        self.live.discard(pgid)
        self._tell(f"-{pgid}")

    def close(self) -> None:
        """Kill what is left, then let the guard go: its pipe closes and it finds nothing to kill."""
        for pgid in list(self.live):
            self.kill(pgid)
        if self.guard.stdin is not None:
            with suppress(OSError):
                self.guard.stdin.close()
        with suppress(subprocess.TimeoutExpired):
            self.guard.wait(10)


class Interrupted(BaseException):
    """SIGTERM, SIGINT or SIGHUP, raised where the suite is so every `finally` runs: groups killed, results packed."""


class Signals:
    """While installed, the first SIGTERM/SIGINT/SIGHUP raises `Interrupted` (later ones are noted, not raised, so
    the cleanup they would interrupt finishes); inside `held()` the raise waits until the block is left."""

    NAMES = ("SIGTERM", "SIGINT", "SIGHUP")

    def __init__(self) -> None:
        self.received: str | None = None
        self._raised = False
        self._held = 0
        self._previous: dict[int, Any] = {}

    def install(self) -> None:
        if threading.current_thread() is threading.main_thread():  # Python runs handlers there only
            for name in self.NAMES:
                number = getattr(signal, name)
                self._previous[number] = signal.signal(number, self._on_signal)

    def restore(self) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)
        self._previous.clear()

    def stop_raising(self) -> None:
        """From here on (the cleanup) a signal is only noted."""
        self._raised = True

    def _on_signal(self, number: int, frame: FrameType | None) -> None:
        self.received = self.received or signal.Signals(number).name
        if not self._held and not self._raised:
            self._raised = True
            raise Interrupted(self.received)

    @contextmanager
    def held(self) -> Iterator[None]:
        """A block no signal may cut in two (a process started but not yet registered for killing)."""
        self._held += 1
        try:
            yield
        finally:
            self._held -= 1
        if not self._held and self.received and not self._raised:
            self._raised = True
            raise Interrupted(self.received)


def run_step(
    step: Step,
    out: Path,
    seconds_left: float,
    groups: ProcessGroups,
    signals: Signals,
    on_start: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Run one step in a process group of its own, killed with all it started on a timeout, an exception or a
    signal; log to a file. `on_start` gets the running step's record (its process group) as soon as it runs."""
    log_path = out / "logs" / f"{step.name}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    record: dict[str, Any] = {"name": step.name, "command": " ".join(step.command), "log": str(log_path)}
    timeout = min(step.timeout_s, seconds_left)
    server = None
    process = None
    with log_path.open("w") as log:
        try:
            if step.server is not None:
                # wait no longer than the step may run: a server that never serves must not eat the budget
                server = StepServer(step.server, log, wait_s=min(SERVER_WAIT_S, max(1.0, timeout)))
                server.start()
            with signals.held():
                process = subprocess.Popen(step.command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
                groups.add(process.pid)
            if on_start is not None:
                on_start({**record, "status": "running", "process_group": process.pid})
            try:
                record["exit_code"] = process.wait(timeout=max(1.0, timeout - (time.monotonic() - started)))
                record["status"] = "passed" if record["exit_code"] == 0 else "failed"
            except subprocess.TimeoutExpired:
                record["status"], record["exit_code"] = f"timed out after {timeout:.0f} s", None
        except Exception as exc:  # noqa: BLE001 - said in the record; the suite goes on with the next step
            reason = exc if isinstance(exc, (OSError, RuntimeError)) else f"{type(exc).__name__}: {exc}"
            record["status"], record["exit_code"] = f"could not run: {reason}", None
        finally:
            if process is not None:
                groups.kill(process.pid)  # whatever the step left running, or all of it on a timeout or signal
                process.wait()
            if server is not None:
                server.stop()
    record["seconds"] = round(time.monotonic() - started, 1)
    record["log_tail"] = log_path.read_text(errors="replace").splitlines()[-12:]
    return record


class StepServer(ServerProcess):
    """A step's server: mnist-serve on the fixed ports the step's command names, its output in the step's log;
    it dies with the suite, however the suite ends."""

    def __init__(self, flags: list[str], log: IO[str], wait_s: float = SERVER_WAIT_S) -> None:
        super().__init__(flags, port=SERVER_PORT, metrics_port=METRICS_PORT, log=log, wait_s=wait_s)
        self.command = [PY, "-c", DIE_WITH_PARENT, str(os.getpid()), *self.command[1:]]

    def not_serving(self, exited: int | None) -> NoReturn:
        raise RuntimeError(f"the server for this step did not become SERVING within {self.wait_s:.0f} s")


def run_suite(profile: str, out: Path, dry_run: bool = False, results_to: Path | None = None) -> int:
    """Run every step (within the profile's time budget), then write suite.json, summary.md and floors.png.

    The summary is rewritten when each step starts and ends, so a run cut short still leaves one. With
    `results_to`, summary.md and suite.json are copied there at the same moments (all that survives a
    SIGKILL), and at the end, however the suite ends short of SIGKILL (a SIGTERM from `timeout`, Ctrl-C, an
    exception), floors.png and a .tar.gz of everything else except models and checkpoints join them: what a
    machine that returns few, small files can carry back. Returns 1 if a step did not pass, 128 + the signal
    number if a signal ended the run.
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
    signals = Signals()
    groups = ProcessGroups()

    def save(*extra: dict[str, Any]) -> None:  # the results so far, with the running step's record if given
        write_results(profile, out, [*records, *extra], time.monotonic() - started)
        if results_to is not None:
            copy_flat(out, results_to, ("summary.md", "suite.json"))

    try:
        signals.install()
        for step in steps:
            failed_needs = [r["name"] for r in records if r["name"] in step.needs and r["status"] != "passed"]
            left = budget - (time.monotonic() - started)
            if failed_needs:
                records.append({"name": step.name, "status": f"skipped: {', '.join(failed_needs)} did not pass"})
            elif left < 10:
                records.append({"name": step.name, "status": f"skipped: the suite's {budget:g} s were used up"})
            else:
                print(f"[{time.monotonic() - started:6.1f} s] {step.name} ...", flush=True)
                save({"name": step.name, "status": "running"})
                step_started = time.monotonic()
                try:
                    records.append(run_step(step, out, left, groups, signals, on_start=save))
                except Interrupted as exc:
                    seconds = round(time.monotonic() - step_started, 1)
                    records.append({"name": step.name, "status": f"interrupted by {exc}", "seconds": seconds})
                    raise
            print(f"[{time.monotonic() - started:6.1f} s] {step.name}: {records[-1]['status']}", flush=True)
            save()
    except Interrupted as exc:
        print(f"[{time.monotonic() - started:6.1f} s] interrupted by {exc}: packing what was done", flush=True)
        done = {r["name"] for r in records}
        records += [{"name": s.name, "status": f"not run: interrupted by {exc}"} for s in steps if s.name not in done]
    finally:
        signals.stop_raising()
        groups.close()
        finish(profile, out, records, time.monotonic() - started, results_to)
        signals.restore()
    if signals.received:
        return 128 + getattr(signal, signals.received)
    return 0 if all(r["status"] == "passed" for r in records) else 1


def finish(profile: str, out: Path, records: list[dict], seconds: float, results_to: Path | None) -> None:
    """The last results, the floors' picture and the pack for the trip back; each part tried even if one fails."""
    for part in (
        lambda: write_results(profile, out, records, seconds),
        lambda: plot_floors(out),
        lambda: print((out / "summary.md").read_text()),
        lambda: results_to is not None and pack_results(out, results_to),
    ):
        try:
            part()
        except Exception as exc:  # noqa: BLE001 - the parts after this one still run
            print(f"mnist-bench --suite: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)


def write_results(profile: str, out: Path, records: list[dict], seconds: float) -> None:
    results = collect(profile, out, records, seconds)
    (out / "suite.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    (out / "summary.md").write_text(summary_markdown(results))


def copy_flat(out: Path, destination: Path, names: tuple[str, ...]) -> None:
    """Copy each named file that exists, through a temporary name, so a kill mid-copy leaves the last whole copy."""
    destination.mkdir(parents=True, exist_ok=True)
    for name in names:
        if (out / name).is_file():
            shutil.copyfile(out / name, destination / f".{name}.tmp")
            os.replace(destination / f".{name}.tmp", destination / name)


def pack_results(out: Path, destination: Path) -> None:
    """summary.md, suite.json, floors.png and one archive of the JSON, PNG, logs and reports (no models)."""
    copy_flat(out, destination, ("summary.md", "suite.json", "floors.png"))
    archive_path = destination / f"{out.name}.tar.gz"
    with tarfile.open(archive_path.with_name(f".{archive_path.name}.tmp"), "w:gz") as archive:
        for path in sorted(out.rglob("*")):
            if path.is_file() and path.suffix not in (".pt", ".onnx", ".tmp"):
                archive.add(path, arcname=str(Path(out.name) / path.relative_to(out)))
    os.replace(archive_path.with_name(f".{archive_path.name}.tmp"), archive_path)
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
    full_name = served_label("googlenet", full, variant_path(trained_model(profile, out), "fp16"))
    for name, bench, floor_ips in (("googlenet-fast", fast, 50_000), (full_name, full, 25_000)):
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
    environment = _load(out / "environment.json") or {}
    return {
        "profile": profile,
        "seconds": round(seconds, 1),
        "steps": records,
        "targets": targets,
        "probes": environment.get("probes") or {},
        "training": train and {k: train[k] for k in ("device", "test_accuracy", "wall_seconds_to_checkpoint")},
        "loadtest": loadtest,
        "summaries": {name: bench and bench.get("summary") for name, bench in benches.items()},
        "served": {name: bench and bench.get("served") for name, bench in benches.items()},
        "machine": next((b["machine"] for b in benches.values() if b), environment.get("machine")),
    }


def served_label(name: str, bench: dict | None, fp16_file: Path) -> str:
    """The model's name with the precision its server reported serving: the target is fp16, and an fp32 run
    (no fp16 export, or the CPU) must not be reported under the fp16 name."""
    precision = ((bench or {}).get("served") or {}).get("precision")
    if not precision:
        return f"{name} (not served)"
    if precision == "fp32" and not fp16_file.is_file():
        return f"{name} (fp32: no fp16 export)"
    return f"{name} ({precision})"


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
    probes = results.get("probes") or {}
    if probes:
        lines += ["", "| probe | status | detail |", "| --- | --- | --- |"]
        lines += [f"| {name} | {p['status']} | {p['detail']} |" for name, p in probes.items()]
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
