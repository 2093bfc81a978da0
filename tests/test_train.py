"""Training end to end on a few hundred real MNIST images: learning, outputs, resume, CLI."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from training.non_digits import NOT_A_DIGIT, NonDigitSet, save
from training.train import TrainConfig, build_parser, main, train

# The basic recipe: 600 images and 3 epochs are too few to learn through the robust one's corruptions.
TINY = TrainConfig(epochs=3, batch_size=32, lr=0.05, train_limit=600, eval_limit=500, device="cpu", augment="basic")


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


def test_resume_of_an_older_checkpoint_with_new_settings_is_refused(tmp_path: Path, mnist_dir: Path) -> None:
    """A checkpoint written before a setting existed holds its default: turning it on now is a different config."""
    first = replace(
        TINY, epochs=2, stop_after=1, train_limit=200, eval_limit=50, data_dir=str(mnist_dir), out_dir=str(tmp_path)
    )
    train(first)
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    del state["config"]["non_digits"]  # as mnist-train wrote it before --non-digits
    torch.save(state, tmp_path / "checkpoint.pt")
    extra = tmp_path / "x.npz"
    save(NonDigitSet(np.zeros((4, 28, 28), np.uint8), np.full(4, NOT_A_DIGIT, np.uint8), np.full(4, "blank")), extra)
    with pytest.raises(SystemExit, match=f"--non-digits was '', now '{extra}'"):
        train(replace(first, non_digits=str(extra), resume=True, stop_after=0))


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


def test_the_robust_recipe_is_the_default_and_the_report_names_the_recipe(tiny_run: tuple[Path, dict]) -> None:
    assert TrainConfig().augment == "robust"
    _, report = tiny_run
    assert report["config"]["augment"] == "basic"


def test_an_unknown_augmentation_recipe_is_refused_naming_the_known_ones(capsys) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--augment", "heavy"])
    assert "basic" in capsys.readouterr().err


def test_the_report_breaks_the_time_to_checkpoint_into_phases(tiny_run: tuple[Path, dict]) -> None:
    """Where the seconds went: start-up, data, first step (autotune/compile), each epoch's training and evaluation."""
    _, report = tiny_run
    phases = report["phases_seconds"]
    for phase in ("start-up", "data to device", "first step (autotune, compile)", "epoch 1 train", "epoch 3 evaluate"):
        assert phases[phase] >= 0, phase
    assert "plots" in phases and "checkpoints" in phases
    before_plots = sum(seconds for name, seconds in phases.items() if name != "plots")
    assert before_plots == pytest.approx(report["wall_seconds_to_checkpoint"], rel=0.05, abs=0.5)
    assert report["steady_train_images_per_second"] > 0 and report["achieved_train_tflops"] > 0
    assert report["bf16_peak_fraction"] is None  # no bf16 peak is known for a CPU


def test_every_training_step_has_the_same_shape(tiny_run: tuple[Path, dict]) -> None:
    """540 training images in batches of 32: 16 full steps, the ragged 28 left out (one shape, one autotune)."""
    _, report = tiny_run
    first = report["history"][0]
    assert first["train_images_per_second"] * first["train_seconds"] == pytest.approx(16 * 32)


def test_the_bf16_peak_is_known_for_the_gpus_we_are_lent() -> None:
    from training.train import peak_bf16_tflops

    assert peak_bf16_tflops("NVIDIA H200") == peak_bf16_tflops("NVIDIA H100 80GB HBM3") == 989.0
    assert peak_bf16_tflops("NVIDIA H100 PCIe") == 756.0
    assert peak_bf16_tflops("cpu (x86_64, 2 threads)") is None
