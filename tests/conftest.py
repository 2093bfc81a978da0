"""Shared fixtures: tiny IDX files written on the fly, and the real MNIST directory. Skips under
`MNIST_TEST_STRICT=1` fail the run: tests/strict_skips.py."""

from __future__ import annotations

import gzip
import os
import struct
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from tests.postgres import PostgresCluster, PostgresMissing, find_bin_dir, running_cluster
from training.data import IMAGES_MAGIC, LABELS_MAGIC, REPO_ROOT

# Servers started by tests (in-process through load_config, or as subprocesses, which inherit this) keep off the
# REST API's default port 8000, so that two of them never collide; tests of the REST API give it a free port.
os.environ.setdefault("MNIST_SERVE_HTTP_PORT", "0")
# One process per server unless a test asks for workers (tests/test_workers.py): `--workers auto` would start a
# supervisor and several workers on a machine of 8 cores or more, and the tests would test another server there.
os.environ.setdefault("MNIST_SERVE_WORKERS", "1")
# Servers started by tests store no labels unless a test gives them a database of its own (not ~/.local/state).
os.environ.setdefault("MNIST_SERVE_FEEDBACK_DB", "none")

SHARED_MNIST = REPO_ROOT.parent / "shared" / "data" / "mnist"
pytest_plugins = ["tests.strict_skips", "pytester"]  # pytester: tests/test_strict_skips.py runs pytest itself


def idx_bytes(array: np.ndarray, magic: int) -> bytes:
    return struct.pack(">I", magic) + struct.pack(f">{array.ndim}I", *array.shape) + array.astype(np.uint8).tobytes()


def write_idx(path: Path, array: np.ndarray, magic: int, compress: bool = True) -> Path:
    data = idx_bytes(array, magic)
    path.write_bytes(gzip.compress(data) if compress else data)
    return path


@pytest.fixture
def tiny_mnist_dir(tmp_path: Path) -> Path:
    """A valid MNIST-format directory with 20 train and 10 test images (gzip train, raw test)."""
    rng = np.random.default_rng(0)
    for split, n, compress in (("train", 20, True), ("t10k", 10, False)):
        suffix = ".gz" if compress else ""
        write_idx(
            tmp_path / f"{split}-images-idx3-ubyte{suffix}", rng.integers(0, 256, (n, 28, 28)), IMAGES_MAGIC, compress
        )
        write_idx(tmp_path / f"{split}-labels-idx1-ubyte{suffix}", rng.integers(0, 10, n), LABELS_MAGIC, compress)
    return tmp_path


@pytest.fixture(scope="session")
def mnist_dir() -> Path:
    if not (SHARED_MNIST / "t10k-images-idx3-ubyte.gz").is_file():
        pytest.fail(f"the project's MNIST copy is missing at {SHARED_MNIST} (see docs/training.md: Data)")
    return SHARED_MNIST


@pytest.fixture(scope="session")
def mnist_test_digits(mnist_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    """Every MNIST test image (uint8, light on dark) and its label: what the reading benchmarks compose."""
    from training.data import load_split

    test = load_split("test", mnist_dir)
    return test.images, test.labels


@pytest.fixture(scope="session")
def scoreless_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The bundled model as files exported before the digit score were: no digit_score output, no threshold."""
    onnx = pytest.importorskip("onnx")
    from export.digit_score_graph import without_digit_score

    path = tmp_path_factory.mktemp("scoreless") / "googlenet-fast.onnx"
    onnx.save(without_digit_score(onnx.load(str(REPO_ROOT / "server" / "bundled" / "googlenet-fast.onnx"))), str(path))
    return path


@pytest.fixture(scope="session")
def postgres_cluster() -> Iterator[PostgresCluster]:
    """A real PostgreSQL server for the session (tests/postgres.py); missing binaries fail, never skip."""
    try:
        find_bin_dir()
    except PostgresMissing as exc:
        pytest.fail(str(exc), pytrace=False)
    with running_cluster() as cluster:
        yield cluster
