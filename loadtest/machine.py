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


def main(argv: list[str] | None = None) -> int:
    """Print the facts, nvidia-smi's own view where there is a GPU, and with --probe whether CUDA starts."""
    import json
    import shutil
    import subprocess
    import sys

    print(json.dumps(describe_machine(), indent=2))
    if not shutil.which("nvidia-smi"):
        return 0
    subprocess.run(["nvidia-smi"], check=False)
    if "--probe" in (sys.argv[1:] if argv is None else argv):
        try:
            print(probe_cuda())
        except Exception as exc:  # noqa: BLE001 - reported, and the suite's step fails on the exit status
            print(f"CUDA does not start here: {type(exc).__name__}: {exc}")
            return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
