"""Regenerate every committed protobuf/gRPC stub with the pinned generator: `python -m proto.generate`.

The generator's version is stamped into the stubs and becomes the oldest grpcio and protobuf they
import under, so it is pinned here and in pyproject.toml's `dev` extra, and tests/test_proto.py
checks that pyproject.toml's floors match the stamps.
"""

from __future__ import annotations

import re
import sys
from importlib import metadata
from pathlib import Path

GENERATOR = "grpcio-tools"
GENERATOR_VERSION = "1.85.1"  # stamps grpcio>=1.85.1 and protobuf>=7.35.1 into the stubs
ROOT = Path(__file__).resolve().parents[1]
# Ours: imported as proto.mnist.v1.*, so generated from the repository root.
OURS = ("proto/mnist/v1/classifier.proto",)
# The Open Inference Protocol as Triton publishes it (proto/inference/LICENSE): its files import each other by bare
# name ("model_config.proto"), so they are generated from their own folder and the imports made package-relative.
INFERENCE_DIR = "proto/inference"
INFERENCE = ("model_config.proto", "grpc_service.proto")


def _protoc(include: Path, out: Path, files: tuple[str, ...]) -> None:
    from grpc_tools import protoc

    args = ["protoc", f"-I{include}", f"--python_out={out}", f"--grpc_python_out={out}", f"--pyi_out={out}"]
    if protoc.main([*args, *files]) != 0:
        raise SystemExit(f"protoc failed for {', '.join(files)}")


def _package_imports(folder: Path) -> None:
    """`import model_config_pb2 as ...` -> `from proto.inference import model_config_pb2 as ...`."""
    package = INFERENCE_DIR.replace("/", ".")
    for path in folder.glob("*_pb2*.py*"):
        text = path.read_text()
        fixed = re.sub(r"^import (\w+_pb2)\b", rf"from {package} import \1", text, flags=re.MULTILINE)
        if fixed != text:
            path.write_text(fixed)


def main() -> int:
    found = metadata.version(GENERATOR)
    if found != GENERATOR_VERSION:
        print(f"need {GENERATOR}=={GENERATOR_VERSION} (found {found}): pip install '{GENERATOR}=={GENERATOR_VERSION}'")
        return 2
    _protoc(ROOT, ROOT, OURS)
    _protoc(ROOT / INFERENCE_DIR, ROOT / INFERENCE_DIR, INFERENCE)
    _package_imports(ROOT / INFERENCE_DIR)
    print(f"regenerated with {GENERATOR} {found}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
