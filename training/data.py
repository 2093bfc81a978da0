"""MNIST in IDX format: locate the files, parse and validate them, hand out uint8 arrays.

IDX is a big-endian header (two zero bytes, a type code, the number of dimensions, one uint32
per dimension) followed by the data. We only accept what MNIST uses: unsigned bytes, 3-D images
of 28x28 (magic 2051) and 1-D labels (magic 2049). Every defect is reported with the file's name.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from proto.contract import IMAGE_SIDE, NUM_CLASSES

IMAGES_MAGIC = 2051
LABELS_MAGIC = 2049

SPLIT_FILES: dict[str, tuple[str, str]] = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
EXPECTED_COUNTS = {"train": 60_000, "test": 10_000}
REPO_ROOT = Path(__file__).resolve().parents[1]


class IdxFormatError(ValueError):
    """An IDX file is missing, truncated, corrupt or does not match its partner."""

    def __init__(self, path: Path | str, problem: str) -> None:
        super().__init__(f"{path}: {problem}")
        self.path = Path(path)
        self.problem = problem


@dataclass(frozen=True)
class MnistSplit:
    """One split of MNIST: `images` (N, 28, 28) uint8, light digit on dark; `labels` (N,) uint8 in 0..9."""

    name: str
    images: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)


def _read_bytes(path: Path) -> bytes:
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise IdxFormatError(path, "file not found") from None
    if raw[:2] != b"\x1f\x8b":
        return raw
    try:
        return gzip.decompress(raw)
    except (EOFError, OSError, zlib.error) as exc:
        raise IdxFormatError(path, f"corrupt or truncated gzip stream ({exc})") from None


def read_idx(path: Path | str, expected_magic: int) -> np.ndarray:
    """Parse one IDX file (gzip or raw) into a uint8 array, validating header and length."""
    path = Path(path)
    data = _read_bytes(path)
    if len(data) < 4:
        raise IdxFormatError(path, f"only {len(data)} bytes, too short for an IDX header")
    (magic,) = struct.unpack(">I", data[:4])
    if magic != expected_magic:
        kind = {IMAGES_MAGIC: "images", LABELS_MAGIC: "labels"}.get(expected_magic, "?")
        raise IdxFormatError(
            path, f"magic number {magic} (0x{magic:08x}), expected {expected_magic} for an MNIST {kind} file"
        )
    ndim = magic & 0xFF
    header_len = 4 + 4 * ndim
    if len(data) < header_len:
        raise IdxFormatError(path, f"header truncated: {ndim} dimensions need {header_len} bytes, file has {len(data)}")
    dims = struct.unpack(f">{ndim}I", data[4:header_len])
    expected_len = int(np.prod(dims, dtype=np.int64))
    actual_len = len(data) - header_len
    if actual_len < expected_len:
        raise IdxFormatError(
            path, f"truncated: header promises {expected_len} data bytes for shape {dims}, file has {actual_len}"
        )
    if actual_len > expected_len:
        raise IdxFormatError(path, f"{actual_len - expected_len} unexpected bytes after the data of shape {dims}")
    if magic == IMAGES_MAGIC and tuple(dims[1:]) != (IMAGE_SIDE, IMAGE_SIDE):
        raise IdxFormatError(path, f"images are {dims[1]}x{dims[2]}, expected {IMAGE_SIDE}x{IMAGE_SIDE}")
    return np.frombuffer(data, dtype=np.uint8, offset=header_len).reshape(dims)


def find_idx_file(data_dir: Path, stem: str) -> Path:
    """`stem` with `.gz` if present, else the raw file; the error lists what was looked for."""
    for candidate in (data_dir / f"{stem}.gz", data_dir / stem):
        if candidate.is_file():
            return candidate
    raise IdxFormatError(data_dir / f"{stem}.gz", f"not found (nor {stem}) in {data_dir}; run `mnist-data download`")


def load_split(split: str, data_dir: Path | str | None = None) -> MnistSplit:
    """Load and cross-check the images and labels of `split` ('train' or 'test')."""
    if split not in SPLIT_FILES:
        raise ValueError(f"unknown split {split!r}; expected one of {', '.join(SPLIT_FILES)}")
    directory = resolve_data_dir(data_dir)
    images_path, labels_path = (find_idx_file(directory, stem) for stem in SPLIT_FILES[split])
    images = read_idx(images_path, IMAGES_MAGIC)
    labels = read_idx(labels_path, LABELS_MAGIC)
    if len(images) != len(labels):
        raise IdxFormatError(labels_path, f"{len(labels)} labels but {images_path.name} holds {len(images)} images")
    if len(labels) and labels.max() >= NUM_CLASSES:
        raise IdxFormatError(labels_path, f"label {int(labels.max())} out of range 0..{NUM_CLASSES - 1}")
    return MnistSplit(split, images, labels)


def default_data_dirs() -> list[Path]:
    """Where MNIST is looked for when no directory is given, in order."""
    dirs: list[Path] = []
    if os.environ.get("MNIST_DIR"):
        dirs.append(Path(os.environ["MNIST_DIR"]))
    dirs.append(REPO_ROOT.parent / "shared" / "data" / "mnist")
    dirs.append(Path.cwd().parent / "shared" / "data" / "mnist")
    dirs.append(user_cache_dir())
    return dirs


def user_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "mnist-googlenet" / "mnist"


def resolve_data_dir(data_dir: Path | str | None = None) -> Path:
    """The flag's directory if given, else $MNIST_DIR, else ../shared/data/mnist, else the user cache.

    An explicit choice (flag or $MNIST_DIR) is returned even if empty, so errors name what the user asked for.
    """
    if data_dir is not None:
        return Path(data_dir)
    if os.environ.get("MNIST_DIR"):
        return Path(os.environ["MNIST_DIR"])
    for candidate in default_data_dirs():
        if any(candidate.glob("t10k-images-idx3-ubyte*")):
            return candidate
    return user_cache_dir()


def train_validation_split(n: int, validation_size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices of a seeded random hold-out carved from the training set for model selection."""
    if not 0 <= validation_size < n:
        raise ValueError(f"validation size {validation_size} must be in [0, {n})")
    order = np.random.default_rng(seed).permutation(n)
    return np.sort(order[validation_size:]), np.sort(order[:validation_size])


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
