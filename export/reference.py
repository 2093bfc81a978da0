"""`python -m export.reference MODEL`: a model's answers on the MNIST test set, written beside it as its reference.

The server compares what a version answers live with this (server/feedback/): its live accuracy with the
reference accuracy, its predicted-digit mix and confidences with the reference's, as a population stability
index. `mnist-export --publish` copies the reference into the version folder with the model.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np

from server.feedback.reference import Reference
from training.data import sha256_file


def compute_reference(model_path: Path, data_dir: str | None = None, batch_size: int = 500) -> Reference:
    """Run `model_path` over the 10,000 MNIST test digits as the server would feed them."""
    from export.evaluate import open_model
    from training.data import load_split, resolve_data_dir

    test = load_split("test", resolve_data_dir(data_dir))
    probabilities = open_model(model_path).probabilities(test.images, batch_size)
    digits = probabilities.argmax(1)
    reference = Reference.of(digits, probabilities[np.arange(len(digits)), digits], test.labels)
    return replace(reference, model_sha256=sha256_file(model_path))


def reference_is_current(model_path: Path) -> bool:
    """Whether the reference beside `model_path` was measured on this very file."""
    try:
        reference = Reference.load(Reference.path_for(model_path))
    except ValueError:
        return False
    return reference is not None and reference.model_sha256 == sha256_file(model_path)


def write_reference(model_path: Path, data_dir: str | None = None) -> Path:
    path = Reference.path_for(model_path)
    compute_reference(model_path, data_dir).save(path)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m export.reference", description=__doc__.split("\n\n")[0])
    parser.add_argument("model", type=Path, help="an ONNX model written by mnist-export")
    parser.add_argument("--data-dir", help="MNIST directory (default: $MNIST_DIR, else ../shared/data/mnist)")
    args = parser.parse_args(argv)
    try:
        path = write_reference(args.model, args.data_dir)
    except (OSError, ValueError) as problem:
        print(f"export.reference: {problem}", file=sys.stderr)
        return 1
    reference = Reference.load(path)
    assert reference is not None
    print(f"wrote {path}: test accuracy {reference.accuracy:.2%} over {reference.images} digits")
    return 0


if __name__ == "__main__":
    sys.exit(main())
