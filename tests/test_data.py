"""IDX parsing and validation, data-directory resolution, and the checksum-verified download."""

from __future__ import annotations

import gzip
import hashlib
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import idx_bytes, write_idx
from training import data_cli
from training.data import (
    IMAGES_MAGIC,
    LABELS_MAGIC,
    IdxFormatError,
    load_split,
    read_idx,
    resolve_data_dir,
    train_validation_split,
)


def test_reads_gzip_and_raw_files_alike(tmp_path: Path) -> None:
    images = np.arange(3 * 28 * 28, dtype=np.int64).reshape(3, 28, 28) % 256
    gz = write_idx(tmp_path / "a.gz", images, IMAGES_MAGIC, compress=True)
    raw = write_idx(tmp_path / "a", images, IMAGES_MAGIC, compress=False)
    assert np.array_equal(read_idx(gz, IMAGES_MAGIC), images)
    assert np.array_equal(read_idx(raw, IMAGES_MAGIC), images)
    assert read_idx(raw, IMAGES_MAGIC).dtype == np.uint8


@pytest.mark.parametrize(
    ("mangle", "expected_problem"),
    [
        (lambda b: b[:-5], "truncated: header promises 1568 data bytes"),
        (lambda b: b + b"\0\0\0", "3 unexpected bytes after the data"),
        (lambda b: b[:10], "header truncated"),
        (lambda b: b[:3], "too short for an IDX header"),
        (lambda b: b"\x00\x00\x08\x01" + b[4:], "magic number 2049"),
        (lambda b: b"PK\x03\x04" + b[4:], "magic number"),
    ],
    ids=["truncated-data", "trailing-bytes", "truncated-header", "tiny-file", "labels-magic", "not-idx"],
)
def test_defective_image_files_are_rejected_naming_file_and_problem(tmp_path: Path, mangle, expected_problem) -> None:
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(mangle(idx_bytes(np.zeros((2, 28, 28)), IMAGES_MAGIC)))
    with pytest.raises(IdxFormatError) as err:
        read_idx(path, IMAGES_MAGIC)
    assert str(path) in str(err.value)
    assert expected_problem in str(err.value)


def test_images_of_the_wrong_size_are_rejected(tmp_path: Path) -> None:
    path = write_idx(tmp_path / "x.gz", np.zeros((2, 32, 32)), IMAGES_MAGIC)
    with pytest.raises(IdxFormatError, match="images are 32x32, expected 28x28"):
        read_idx(path, IMAGES_MAGIC)


def test_truncated_and_corrupt_gzip_streams_are_reported(tmp_path: Path) -> None:
    good = gzip.compress(idx_bytes(np.zeros((50, 28, 28)), IMAGES_MAGIC))
    truncated = tmp_path / "truncated.gz"
    truncated.write_bytes(good[: len(good) // 2])
    corrupt = tmp_path / "corrupt.gz"
    corrupt.write_bytes(good[:20] + bytes(b ^ 0xFF for b in good[20:40]) + good[40:])
    for path in (truncated, corrupt):
        with pytest.raises(IdxFormatError, match="corrupt or truncated gzip") as err:
            read_idx(path, IMAGES_MAGIC)
        assert path.name in str(err.value)


def test_a_split_loads_with_matching_counts(tiny_mnist_dir: Path) -> None:
    train = load_split("train", tiny_mnist_dir)
    assert train.images.shape == (20, 28, 28) and train.labels.shape == (20,)
    assert len(load_split("test", tiny_mnist_dir)) == 10


def test_images_and_labels_with_different_counts_are_rejected(tiny_mnist_dir: Path) -> None:
    write_idx(tiny_mnist_dir / "train-labels-idx1-ubyte.gz", np.zeros(19), LABELS_MAGIC)
    with pytest.raises(IdxFormatError, match="19 labels but train-images-idx3-ubyte.gz holds 20 images"):
        load_split("train", tiny_mnist_dir)


def test_labels_outside_0_to_9_are_rejected(tiny_mnist_dir: Path) -> None:
    write_idx(tiny_mnist_dir / "train-labels-idx1-ubyte.gz", np.full(20, 12), LABELS_MAGIC)
    with pytest.raises(IdxFormatError, match="label 12 out of range"):
        load_split("train", tiny_mnist_dir)


def test_missing_files_name_the_directory_and_the_fix(tmp_path: Path) -> None:
    with pytest.raises(IdxFormatError, match="mnist-data download") as err:
        load_split("test", tmp_path)
    assert str(tmp_path) in str(err.value)


def test_data_dir_comes_from_flag_then_environment(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, mnist_dir: Path
) -> None:
    monkeypatch.setenv("MNIST_DIR", str(tmp_path / "env"))
    assert resolve_data_dir(tmp_path / "flag") == tmp_path / "flag"
    assert resolve_data_dir() == tmp_path / "env"
    monkeypatch.delenv("MNIST_DIR")
    assert resolve_data_dir() == mnist_dir


def test_the_project_copy_of_mnist_is_accepted_including_the_reconstructed_train_images(mnist_dir: Path) -> None:
    lines = data_cli.verify_dir(mnist_dir)
    assert len(lines) == 4 and all(line.startswith("ok") for line in lines)
    assert "60,000" in lines[0] and "checksum differs" in lines[0]
    assert all("canonical checksum" in line for line in lines[1:])


def test_validation_split_is_seeded_and_disjoint() -> None:
    train_a, val_a = train_validation_split(1000, 100, seed=3)
    train_b, val_b = train_validation_split(1000, 100, seed=3)
    assert np.array_equal(val_a, val_b) and len(val_a) == 100 and len(train_a) == 900
    assert not set(train_a) & set(val_a)
    assert not np.array_equal(val_a, train_validation_split(1000, 100, seed=4)[1])


def test_download_verifies_checksum_falls_back_to_next_mirror_and_writes_atomically(
    tmp_path: Path, mnist_dir: Path
) -> None:
    name = "t10k-labels-idx1-ubyte.gz"
    bad_mirror, good_mirror, target = tmp_path / "bad", tmp_path / "good", tmp_path / "target"
    bad_mirror.mkdir(), good_mirror.mkdir()
    real = (mnist_dir / name).read_bytes()
    (bad_mirror / name).write_bytes(real[:-1] + b"\0")
    (good_mirror / name).write_bytes(real)
    mirrors = (f"file://{bad_mirror}/", f"file://{good_mirror}/")
    path = data_cli.download_file(name, target, mirrors=mirrors)
    assert hashlib.sha256(path.read_bytes()).hexdigest() == data_cli.CANONICAL_SHA256[name]
    assert sorted(p.name for p in target.iterdir()) == [name]  # no temporary files left


def test_download_with_only_wrong_bytes_fails_and_leaves_nothing(tmp_path: Path) -> None:
    mirror, target = tmp_path / "mirror", tmp_path / "target"
    mirror.mkdir()
    (mirror / "t10k-labels-idx1-ubyte.gz").write_bytes(b"not mnist")
    with pytest.raises(data_cli.DownloadError, match="checksum"):
        data_cli.download_file("t10k-labels-idx1-ubyte.gz", target, mirrors=(f"file://{mirror}/",))
    assert list(target.iterdir()) == []


def test_data_cli_reports_a_corrupt_directory_without_traceback(tiny_mnist_dir: Path, capsys) -> None:
    (tiny_mnist_dir / "t10k-images-idx3-ubyte").write_bytes(b"\0\0\x08\x03" + b"\0" * 8)
    assert data_cli.main(["verify", "--dir", str(tiny_mnist_dir)]) == 1
    err = capsys.readouterr().err
    assert "t10k-images-idx3-ubyte" in err and "header truncated" in err


def test_inspect_writes_a_sample_grid(tiny_mnist_dir: Path, tmp_path: Path, capsys) -> None:
    grid = tmp_path / "grid.png"
    assert (
        data_cli.main(
            ["inspect", "--dir", str(tiny_mnist_dir), "--split", "train", "--grid", str(grid), "--count", "20"]
        )
        == 0
    )
    from PIL import Image

    assert Image.open(grid).size == (600, 120)
    assert "20 images" in capsys.readouterr().out
