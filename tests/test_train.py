"""Training end to end on a few hundred real MNIST images: learning, outputs, resume, CLI."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from training.train import TrainConfig, build_parser, main, train

TINY = TrainConfig(epochs=3, batch_size=32, lr=0.05, train_limit=600, eval_limit=500, device="cpu")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory, mnist_dir: Path) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("tiny_run")
    report = train(replace(TINY, out_dir=str(out), data_dir=str(mnist_dir)))
    return out, report


def test_a_tiny_run_beats_chance_by_a_wide_margin(tiny_run: tuple[Path, dict]) -> None:
    _, report = tiny_run
    assert report["test_accuracy"] > 0.6  # chance is 0.1


def test_a_run_writes_checkpoint_model_report_and_plots(tiny_run: tuple[Path, dict]) -> None:
    out, report = tiny_run
    for name in ("checkpoint.pt", "model.pt", "report.json", "training_curves.png", "confusion_matrix.png"):
        assert (out / name).stat().st_size > 0, name
    saved = json.loads((out / "report.json").read_text())
    assert [h["epoch"] for h in saved["history"]] == [1, 2, 3]
    assert {"train_loss", "val_accuracy", "test_accuracy", "train_images_per_second"} <= set(saved["history"][0])
    assert saved["device"].startswith("cpu") and saved["git_revision"] and saved["config"]["lr"] == 0.05
    assert sum(map(sum, saved["confusion_matrix"])) == 500
    assert saved["test_accuracy"] == report["test_accuracy"]


def test_checkpoints_load_with_weights_only(tiny_run: tuple[Path, dict]) -> None:
    out, _ = tiny_run
    state = torch.load(out / "model.pt", weights_only=True)
    assert state["preset"] == "googlenet-fast" and "stem.0.0.weight" in state["model"]


def test_resuming_continues_exactly_where_an_uninterrupted_run_would_be(tmp_path: Path, mnist_dir: Path) -> None:
    short = replace(TINY, epochs=2, train_limit=300, eval_limit=100, data_dir=str(mnist_dir))
    straight = train(replace(short, out_dir=str(tmp_path / "straight")))
    train(replace(short, stop_after=1, out_dir=str(tmp_path / "resumed")))
    resumed_dir = tmp_path / "resumed"
    state = torch.load(resumed_dir / "checkpoint.pt", weights_only=True)
    assert state["epoch"] == 1
    resumed = train(replace(short, out_dir=str(resumed_dir), resume=True))
    assert [h["epoch"] for h in resumed["history"]] == [1, 2]
    assert resumed["history"][1]["train_loss"] == pytest.approx(straight["history"][1]["train_loss"], rel=1e-4)


def test_resume_with_a_different_schedule_is_refused(tmp_path: Path, mnist_dir: Path) -> None:
    first = replace(
        TINY, epochs=2, stop_after=1, train_limit=200, eval_limit=50, data_dir=str(mnist_dir), out_dir=str(tmp_path)
    )
    train(first)
    with pytest.raises(SystemExit, match="--lr was 0.05, now 0.2"):
        train(replace(first, lr=0.2, resume=True, stop_after=0))


def test_resume_without_a_checkpoint_says_what_is_missing(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="does not exist"):
        train(replace(TINY, out_dir=str(tmp_path), resume=True))


def test_cli_help_explains_every_flag() -> None:
    text = build_parser().format_help()
    for flag in ("--preset", "--epochs", "--lr", "--resume", "--out-dir", "--data-dir", "--validation-size"):
        assert flag in text
    assert "help" not in [a.help for a in build_parser()._actions if a.help is None]


def test_cli_reports_bad_data_without_a_traceback(tmp_path: Path, capsys) -> None:
    (tmp_path / "t10k-images-idx3-ubyte").write_bytes(b"junk")
    assert main(["--data-dir", str(tmp_path), "--out-dir", str(tmp_path / "out")]) == 2
    assert "mnist-train:" in capsys.readouterr().err
