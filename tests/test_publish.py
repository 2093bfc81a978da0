"""mnist-export --publish: the next version of a model, added atomically to a live model repository."""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import onnx
import pytest

import export.triton as triton
from export.triton import publish_version
from proto.contract import read_metadata
from server.config import BUNDLED_MODEL
from server.feedback.reference import Reference

BUNDLED_FP16 = BUNDLED_MODEL.with_name("googlenet-fast.fp16.onnx")
NAME = "googlenet-fast"


@pytest.fixture(scope="module")
def metadata():
    return read_metadata(onnx.load(str(BUNDLED_MODEL), load_external_data=False))


def files_under(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def test_the_first_publish_is_version_1_with_a_config_and_labels(tmp_path: Path, metadata) -> None:
    folder, number = publish_version(BUNDLED_MODEL, tmp_path, metadata, max_batch_size=64)
    assert (folder, number) == (tmp_path / NAME / "1", 1)
    assert files_under(tmp_path) == [
        f"{NAME}/1/model.onnx",
        f"{NAME}/1/model.reference.json",  # its test-set answers, beside it in server/bundled, go with it
        f"{NAME}/config.pbtxt",
        f"{NAME}/labels.txt",
    ]
    assert (folder / "model.onnx").read_bytes() == BUNDLED_MODEL.read_bytes()
    assert (folder / "model.reference.json").read_bytes() == Reference.path_for(BUNDLED_MODEL).read_bytes()
    config = (tmp_path / NAME / "config.pbtxt").read_text()
    assert re.search(rf'^name: "{NAME}"$', config, re.M) and "max_batch_size: 64" in config
    assert (tmp_path / NAME / "labels.txt").read_text().split() == [str(d) for d in range(10)]


def test_the_second_publish_is_version_2_and_keeps_the_operators_config(tmp_path: Path, metadata) -> None:
    publish_version(BUNDLED_MODEL, tmp_path, metadata)
    config = tmp_path / NAME / "config.pbtxt"
    edited = config.read_text() + "# operator: version_policy { all {} }\n"
    config.write_text(edited)
    (tmp_path / NAME / "labels.txt").write_text("zero\n")

    folder, number = publish_version(BUNDLED_MODEL, tmp_path, metadata, max_batch_size=8)
    assert (folder, number) == (tmp_path / NAME / "2", 2)
    assert config.read_text() == edited
    assert (tmp_path / NAME / "labels.txt").read_text() == "zero\n"
    assert (tmp_path / NAME / "1" / "model.onnx").is_file() and (folder / "model.onnx").is_file()


def test_only_positive_integer_folders_count_as_versions(tmp_path: Path, metadata) -> None:
    model = tmp_path / NAME
    for name in ("3", "latest", "10a", ".publishing-40-123", ".99", "0"):
        (model / name).mkdir(parents=True)
    (model / "25").write_text("a file, not a version folder")
    _, number = publish_version(BUNDLED_MODEL, tmp_path, metadata)
    assert number == 4


def test_no_staging_folder_or_temporary_file_is_left_behind(tmp_path: Path, metadata) -> None:
    publish_version(BUNDLED_MODEL, tmp_path, metadata, fp16_path=BUNDLED_FP16)
    publish_version(BUNDLED_MODEL, tmp_path, metadata)
    assert sorted(p.name for p in (tmp_path / NAME).iterdir()) == ["1", "2", "config.pbtxt", "labels.txt"]
    assert not [p for p in tmp_path.rglob(".*")]


def test_a_version_taken_by_another_publisher_meanwhile_ends_in_the_next_number(
    tmp_path: Path, metadata, monkeypatch: pytest.MonkeyPatch
) -> None:
    publish_version(BUNDLED_MODEL, tmp_path, metadata)
    # Another publisher renames its version 2 into place after this one chose 2 and before it renames.
    real_next_version = triton.next_version
    chosen: list[int] = []

    def next_version_then_someone_else_publishes(folder: Path) -> int:
        number = real_next_version(folder)
        if not chosen:
            (folder / str(number)).mkdir()
            (folder / str(number) / "model.onnx").write_bytes(b"the other publisher's model")
        chosen.append(number)
        return number

    monkeypatch.setattr(triton, "next_version", next_version_then_someone_else_publishes)
    folder, number = publish_version(BUNDLED_MODEL, tmp_path, metadata)
    assert chosen[0] == 2 and number == 3
    assert (tmp_path / NAME / "2" / "model.onnx").read_bytes() == b"the other publisher's model"
    assert (folder / "model.onnx").read_bytes() == BUNDLED_MODEL.read_bytes()
    assert not [p for p in (tmp_path / NAME).iterdir() if p.name.startswith(".")]


def test_a_version_taken_between_the_check_and_the_rename_ends_in_the_next_number(
    tmp_path: Path, metadata, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_rename = os.rename
    targets: list[str] = []

    def rename_after_someone_else(source, target) -> None:
        targets.append(Path(target).name)
        if len(targets) == 1:  # the other publisher's rename lands first
            Path(target).mkdir()
            (Path(target) / "model.onnx").write_bytes(b"the other publisher's model")
        real_rename(source, target)

    monkeypatch.setattr(triton.os, "rename", rename_after_someone_else)
    folder, number = publish_version(BUNDLED_MODEL, tmp_path, metadata)
    assert targets == ["1", "2"] and number == 2
    assert (tmp_path / NAME / "1" / "model.onnx").read_bytes() == b"the other publisher's model"
    assert (folder / "model.onnx").read_bytes() == BUNDLED_MODEL.read_bytes()
    assert not [p for p in (tmp_path / NAME).iterdir() if p.name.startswith(".")]


def test_a_config_for_another_model_is_refused(tmp_path: Path, metadata) -> None:
    (tmp_path / NAME).mkdir()
    (tmp_path / NAME / "config.pbtxt").write_text('name: "resnet"\nplatform: "onnxruntime_onnx"\n')
    with pytest.raises(ValueError, match=r"config\.pbtxt is for model 'resnet', but .* is 'googlenet-fast'"):
        publish_version(BUNDLED_MODEL, tmp_path, metadata)
    assert files_under(tmp_path) == [f"{NAME}/config.pbtxt"]


def test_a_file_where_the_model_folder_belongs_is_refused(tmp_path: Path, metadata) -> None:
    (tmp_path / NAME).write_text("not a folder")
    with pytest.raises(ValueError, match="is a file"):
        publish_version(BUNDLED_MODEL, tmp_path, metadata)


def test_the_fp16_variant_is_published_beside_model_onnx(tmp_path: Path, metadata) -> None:
    folder, _ = publish_version(BUNDLED_MODEL, tmp_path, metadata, fp16_path=BUNDLED_FP16)
    assert sorted(p.name for p in folder.iterdir()) == ["model.fp16.onnx", "model.onnx", "model.reference.json"]
    assert (folder / "model.fp16.onnx").read_bytes() == BUNDLED_FP16.read_bytes()


def test_the_fp16_variant_is_not_published_as_model_onnx(tmp_path: Path) -> None:
    fp16_metadata = read_metadata(onnx.load(str(BUNDLED_FP16), load_external_data=False))
    with pytest.raises(ValueError, match="publish the fp32 model"):
        publish_version(BUNDLED_FP16, tmp_path, fp16_metadata)


def test_the_export_cli_publishes_the_checked_model_and_its_fp16_variant(
    tmp_path: Path, mnist_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from export.onnx_export import main

    model = shutil.copyfile(BUNDLED_MODEL, tmp_path / "googlenet-fast.onnx")  # --fp16 writes beside it
    repository = tmp_path / "repository"
    common = ["--check", str(model), "--accuracy-images", "200", "--parity-images", "200"]
    common += ["--data-dir", str(mnist_dir), "--publish", str(repository)]
    assert main(common) == 0
    assert main([*common, "--fp16"]) == 0
    out = capsys.readouterr().out
    # the copy had no reference beside it: the first publish measured one, the second found it current
    assert out.count("wrote " + str(tmp_path / f"{NAME}.reference.json")) == 1
    assert f"published {NAME} version 1 to {repository / NAME / '1'}/ (model.onnx, model.reference.json)" in out
    assert (
        f"published {NAME} version 2 to {repository / NAME / '2'}/ (model.onnx, model.fp16.onnx, "
        "model.reference.json)" in out
    )
    assert files_under(repository) == [
        f"{NAME}/1/model.onnx",
        f"{NAME}/1/model.reference.json",
        f"{NAME}/2/model.fp16.onnx",
        f"{NAME}/2/model.onnx",
        f"{NAME}/2/model.reference.json",
        f"{NAME}/config.pbtxt",
        f"{NAME}/labels.txt",
    ]
