"""Where a benchmark ran: CPU, GPU and driver, and the versions of everything on the request path."""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def describe_machine() -> dict[str, Any]:
    """Facts a reader needs to compare two benchmark runs; the GPU ones are absent where there is none."""
    import grpc
    import numpy as np
    import onnxruntime as ort

    from server.engine.backends.onnxruntime_backend import gpu_description, nvidia_driver_present, runtime_description

    facts: dict[str, Any] = {
        "cpu": cpu_model(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "grpcio": grpc.__version__,
        "numpy": np.__version__,
        "onnxruntime": runtime_description(ort),
        "onnxruntime_providers": ort.get_available_providers(),
    }
    if nvidia_driver_present():
        facts["gpu"] = gpu_description()
    return facts


def headline(machine: dict[str, Any], served: dict[str, Any] | None = None) -> str:
    """One line for plot titles: what ran, on what, with which software."""
    where = machine.get("gpu") or f"{machine['cpu']} ({machine['cpus']} cpus)"
    if not served:
        return f"{where}; {machine['onnxruntime']}"
    buckets = ",".join(map(str, served.get("batch_buckets", []))) or "any"
    provider = (served.get("providers") or [served.get("backend", "?")])[0]
    graph = ", CUDA graph" if served.get("cuda_graph") else ""
    return (
        f"{served.get('name')} {served.get('precision', '')} {served.get('layout', '')} on {provider}{graph}, "
        f"buckets {buckets}\n{where}; {served.get('runtime') or machine['onnxruntime']}"
    )


def probe_cuda() -> str:
    """Start a CUDA session on the bundled model and run it once: the cheapest proof that serving on the GPU works."""
    import numpy as np

    from proto.contract import INPUT_SHAPE
    from server.config import BUNDLED_MODEL
    from server.engine.backends.onnxruntime_backend import OnnxRuntimeBackend

    backend = OnnxRuntimeBackend(BUNDLED_MODEL, provider="cuda", batch_buckets="1", cuda_graph="off")
    probabilities = backend.run(np.zeros((1, *INPUT_SHAPE), np.float32)).probabilities
    return f"CUDA session started: providers {list(backend.providers)}, one run gave {probabilities.shape}"


def probe_cuda_graph() -> str:
    """Capture and replay one CUDA graph through IO binding, as the served default does (fp16, NHWC, batch 1).

    The server quietly falls back to plain runs when a graph cannot be captured; this says so, and why, in
    seconds. Raises with the reason when the capture or the replay fails.
    """
    import numpy as np
    import onnxruntime as ort

    from proto.contract import BATCH_AXIS, INPUT_DTYPE, INPUT_NAME, INPUT_SHAPE, LOGITS, variant_path
    from server.config import BUNDLED_MODEL
    from server.engine.backends.onnxruntime_backend import BUCKET_AGREEMENT, CPU, CUDA, WARM_RUNS, BucketSession

    model = variant_path(BUNDLED_MODEL, "fp16")

    def session(graph: bool) -> Any:
        options = ort.SessionOptions()
        options.add_free_dimension_override_by_name(BATCH_AXIS, 1)  # a graph replays one shape only
        cuda = {"enable_cuda_graph": "1" if graph else "0", "prefer_nhwc": "1", "do_copy_in_default_stream": "1"}
        made = ort.InferenceSession(str(model), options, providers=[(CUDA, cuda), CPU])
        if made.get_providers()[0] != CUDA:
            raise RuntimeError(f"the CUDA provider did not start (providers in use: {made.get_providers()})")
        return made

    graphed = session(graph=True)
    bound = BucketSession(ort, graphed, 1, "cuda", graph=True, outputs=[o.name for o in graphed.get_outputs()])
    rng = np.random.default_rng(20)
    first, second = (rng.normal(size=(1, *INPUT_SHAPE)).astype(INPUT_DTYPE) for _ in range(2))
    for _ in range(WARM_RUNS):  # the provider captures the graph after its warm-up runs
        on_first = bound.run(first, LOGITS)
    replayed = bound.run(second, LOGITS)  # a replay reads the bound input buffer: new images, new answers
    reference = session(graph=False).run([LOGITS], {INPUT_NAME: second})[0]
    diff = float(np.abs(replayed - reference).max())
    if (
        not np.isfinite(replayed).all()
        or np.array_equal(on_first, replayed)
        or diff > BUCKET_AGREEMENT["fp16"] * max(1.0, float(np.abs(reference).max()))
    ):
        raise RuntimeError(f"the replay answers wrongly (max difference from a run without the graph: {diff:.3g})")
    return f"{model.name}: one CUDA graph captured and replayed through IO binding, max difference {diff:.1e}"


PROBES = {"cuda_session": probe_cuda, "cuda_graph": probe_cuda_graph}


def run_probes(report: Path | None = None, facts: dict[str, Any] | None = None) -> dict[str, dict[str, str]]:
    """Each probe's status ('passed', 'failed', or 'skipped: no CUDA' where CUDA cannot run) and what it found.

    With `report`, the facts and probes are written there before each probe too, so a probe that kills the
    process (a crash inside the CUDA provider) still leaves its name and 'failed' behind.
    """
    import json

    import onnxruntime as ort

    from server.engine.backends.onnxruntime_backend import cuda_usable

    facts = facts or describe_machine()
    results: dict[str, dict[str, str]] = {}

    def write() -> None:
        if report is not None:
            report.parent.mkdir(parents=True, exist_ok=True)
            report.write_text(json.dumps({"machine": facts, "probes": results}, indent=2) + "\n")

    usable = cuda_usable(ort, "auto")
    for name, probe in PROBES.items():
        if not usable:
            results[name] = {"status": "skipped: no CUDA", "detail": "no NVIDIA driver or no CUDA provider here"}
            continue
        results[name] = {"status": "failed", "detail": "the process died during this probe"}
        write()
        try:
            results[name] = {"status": "passed", "detail": probe()}
        except Exception as exc:  # noqa: BLE001 - the reason is the result
            reason = (str(exc).strip().splitlines() or [""])[0]
            results[name] = {"status": "failed", "detail": f"{type(exc).__name__}: {reason}"}
    write()
    return results


def main(argv: list[str] | None = None) -> int:
    """Print the facts, nvidia-smi's own view where there is a GPU, and with --probe whether CUDA and its graphs run.

    `--json PATH` (with --probe) also writes the facts and each probe's outcome there, for the suite's results.
    Exits 1 when a probe failed; probes skipped for want of CUDA are no failure.
    """
    import argparse
    import json
    import shutil
    import subprocess

    parser = argparse.ArgumentParser(prog="python -m loadtest.machine", description=main.__doc__)
    parser.add_argument("--probe", action="store_true", help="start a CUDA session and capture a CUDA graph")
    parser.add_argument("--json", type=Path, help="with --probe: write the facts and the probes' outcomes here")
    args = parser.parse_args(argv)
    facts = describe_machine()
    print(json.dumps(facts, indent=2))
    if shutil.which("nvidia-smi"):
        subprocess.run(["nvidia-smi"], check=False)
    if not args.probe:
        return 0
    results = run_probes(args.json, facts)
    for name, outcome in results.items():
        print(f"{name}: {outcome['status']}: {outcome['detail']}")
    return 1 if any(outcome["status"] == "failed" for outcome in results.values()) else 0


if __name__ == "__main__":
    raise SystemExit(main())
