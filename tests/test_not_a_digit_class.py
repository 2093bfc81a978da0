"""A classifier with an eleventh class, "not a digit": trained with --non-digits, exported with its own digit score."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from export.onnx_export import (
    OWN_CLASS,
    ExportError,
    add_digit_score,
    check_model_file,
    export_checkpoint,
    export_fp16_variant,
    load_checkpoint_model,
    normalized_test_images,
)
from proto.contract import read_metadata, variant_path
from tests.support import smoke_training
from training.data import load_split, train_validation_split
from training.fit_digit_detector import quick_non_digits
from training.non_digits import NOT_A_DIGIT, NonDigitSet, load_non_digits, save, to_pixels
from training.train import recalibrate_batch_norm


def small_non_digit_set(path: Path) -> NonDigitSet:
    """Noise, blanks, lines, checkerboards and letters as the training set's non-digits, in a second."""
    kinds = quick_non_digits(30)
    images = np.concatenate([to_pixels(x) for x in kinds.values()])
    names = np.concatenate([np.full(len(x), kind) for kind, x in kinds.items()])
    data = NonDigitSet(images, np.full(len(images), NOT_A_DIGIT, np.uint8), names)
    save(data, path)
    return data


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, mnist_dir: Path) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("eleven")
    small_non_digit_set(out / "non-digits.npz")
    report = smoke_training(out, mnist_dir, non_digits=str(out / "non-digits.npz"))
    return out / "model.pt", report


@pytest.fixture(scope="module")
def exported(trained, mnist_dir: Path) -> tuple[Path, dict]:
    checkpoint, _ = trained
    path = checkpoint.with_name("model.onnx")
    return path, export_checkpoint(checkpoint, path, parity_images=200, accuracy_images=300, data_dir=str(mnist_dir))


def test_a_non_digit_set_reads_back_and_a_wrong_file_is_named(tmp_path: Path) -> None:
    written = small_non_digit_set(tmp_path / "set.npz")
    read = load_non_digits(tmp_path / "set.npz")
    assert np.array_equal(read.images, written.images) and np.array_equal(read.labels, written.labels)
    assert "180 not a digit" in read.summary()
    with pytest.raises(ValueError, match="not found .*python -m training.non_digits"):
        load_non_digits(tmp_path / "missing.npz")
    np.savez(tmp_path / "other.npz", something=np.zeros(3))
    with pytest.raises(ValueError, match="not a set of training.non_digits"):
        load_non_digits(tmp_path / "other.npz")
    digits_only = NonDigitSet(written.images, np.zeros(len(written.labels), np.uint8), written.kinds)
    save(digits_only, tmp_path / "digits.npz")
    with pytest.raises(ValueError, match="no image labelled 10"):
        load_non_digits(tmp_path / "digits.npz")


def test_training_with_non_digits_gives_the_model_an_eleventh_output(trained) -> None:
    checkpoint, report = trained
    for saved in (checkpoint, checkpoint.with_name("checkpoint.pt")):  # the chosen epoch, and the resumable state
        model, _, _ = load_checkpoint_model(saved)
        assert model.config.not_a_digit_class
        with torch.no_grad():
            assert model(torch.zeros(3, 1, 28, 28)).shape == (3, 11)
    # accuracy is measured on MNIST digits only, read on the ten digit outputs as the server reads them
    confusion = np.array(report["confusion_matrix"])
    assert confusion.shape == (10, 10) and confusion.sum() == 100


def test_it_keeps_the_batch_statistics_of_digits_not_of_the_mix(trained, mnist_dir: Path) -> None:
    """Noise and textures in a batch pull the running statistics away from digits; the saved model has digits'."""
    checkpoint, _ = trained
    model, _, _ = load_checkpoint_model(checkpoint)
    saved = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}
    train_idx, _ = train_validation_split(300, 30, 0)
    digits = torch.from_numpy(load_split("train", str(mnist_dir)).images[:300][train_idx].copy())
    recalibrate_batch_norm(model, digits)
    again = {k: v for k, v in model.state_dict().items() if "running" in k}
    # the same statistics, to the rounding of another memory layout (training runs channels-last)
    assert all(torch.allclose(saved[k], again[k], rtol=2e-3, atol=1e-3) for k in saved)
    recalibrate_batch_norm(model, torch.from_numpy(load_non_digits(checkpoint.with_name("non-digits.npz")).images))
    moved = {k: v for k, v in model.state_dict().items() if "running_mean" in k}
    assert not all(torch.allclose(saved[k], moved[k], rtol=1e-2, atol=1e-3) for k in moved)


def test_the_exported_score_is_one_minus_the_not_a_digit_share(trained, exported, mnist_dir: Path) -> None:
    checkpoint, _ = trained
    path, report = exported
    proto = onnx.load(str(path))
    assert [o.name for o in proto.graph.output] == ["logits", "probabilities", "digit_score"]
    assert not any(n.name.startswith("digit_score/") for n in proto.graph.node)  # no detector attached
    model, _, _ = load_checkpoint_model(checkpoint)
    x, _ = normalized_test_images(40, str(mnist_dir))
    x = np.concatenate([x, next(iter(quick_non_digits(10).values()))]).astype(np.float32)
    with torch.no_grad():
        eleven = torch.softmax(model(torch.from_numpy(x)), dim=1).numpy()
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    logits, probabilities, scores = session.run(None, {"image": x})
    assert logits.shape == probabilities.shape == (len(x), 10)
    assert np.allclose(probabilities.sum(1), 1, atol=1e-5)
    assert np.abs(scores - (1 - eleven[:, NOT_A_DIGIT])).max() <= 1e-4
    assert report["digit_score"]["passed"] and report["digit_score"]["reference"] == "PyTorch"


def test_its_threshold_flags_one_percent_of_digits_it_never_trained_on(exported) -> None:
    path, _ = exported
    meta = read_metadata(onnx.load(str(path)))
    assert meta.digit_detector["kind"] == OWN_CLASS and "digit_score" in meta.output_layout
    sets = meta.digit_detector["threshold_sets"]
    assert set(sets) == {"mnist_validation", "handwriting_fonts_threshold"}
    assert sets["mnist_validation"]["n"] == 30 and sets["handwriting_fonts_threshold"]["n"] > 900
    # each set weighs alike: together about 1% flagged (one set may be flagged more than the other)
    assert np.mean([s["flagged"] for s in sets.values()]) == pytest.approx(0.01, abs=0.02)
    assert 0.0 < meta.digit_threshold < 1.0


def test_the_fp16_variant_keeps_the_score_and_check_accepts_both(exported, mnist_dir: Path) -> None:
    path, _ = exported
    fp16 = export_fp16_variant(path, parity_images=200, accuracy_images=300, data_dir=str(mnist_dir))
    assert fp16["digit_score"]["decisions_changed_off_threshold"] == 0 and fp16["digit_score"]["in_log_odds"]
    stored = read_metadata(onnx.load(str(path))).digit_threshold
    for model in (path, variant_path(path, "fp16")):
        checked = check_model_file(model, str(mnist_dir), limit=300)["digit_score"]
        assert checked["decisions_changed_off_threshold"] == 0
        assert checked["threshold_rebuilt"] == pytest.approx(stored, rel=0.05)  # the rule, run again on this file


def test_check_refuses_a_threshold_the_rule_does_not_give(exported, tmp_path, mnist_dir: Path) -> None:
    from dataclasses import replace

    path, _ = exported
    proto = onnx.load(str(path))
    meta = read_metadata(proto)
    replace(meta, digit_threshold=min(0.99, 4 * meta.digit_threshold)).write_into(proto)
    moved = tmp_path / "moved.onnx"
    onnx.save(proto, str(moved))
    with pytest.raises(ExportError, match="not where the rule puts it"):
        check_model_file(moved, str(mnist_dir), limit=100)


def test_adding_a_detector_to_a_model_with_its_own_class_is_refused(exported) -> None:
    path, _ = exported
    before = path.read_bytes()
    with pytest.raises(ExportError, match="its own 'not a digit' class"):
        add_digit_score(path)
    assert path.read_bytes() == before


def test_without_its_score_it_serves_as_a_plain_classifier_and_takes_a_detector(exported, tmp_path, mnist_dir) -> None:
    from export.digit_score_graph import without_digit_score

    path, _ = exported
    plain = tmp_path / "plain.onnx"
    onnx.save(without_digit_score(onnx.load(str(path))), str(plain))
    proto = onnx.load(str(plain))
    assert [o.name for o in proto.graph.output] == ["logits", "probabilities"]
    assert not any(n.op_type == "Sigmoid" for n in proto.graph.node)  # the score's own nodes are gone
    assert read_metadata(proto).digit_threshold is None
    x, _ = normalized_test_images(32, str(mnist_dir))
    full = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"image": x})
    bare = ort.InferenceSession(str(plain), providers=["CPUExecutionProvider"]).run(None, {"image": x})
    np.testing.assert_array_equal(bare[0], full[0])
    add_digit_score(plain, parity_images=100, data_dir=str(mnist_dir))  # the separate detector, in its graph
    assert read_metadata(onnx.load(str(plain))).digit_detector["source"] == "digit-detector.npz"


def test_blends_of_the_evidence_are_judged_at_the_served_rules_threshold(exported, mnist_dir: Path) -> None:
    from export import score_blend

    path, _ = exported
    evidence = score_blend.gather(path, per_source=12, data_dir=str(mnist_dir))
    own, detector = (score_blend.judge(evidence, w) for w in ((0, 0, 1), (0.6, 0.4, 0)))
    # the own class alone, by the same rule on the same digits, lands on the threshold the export stored
    stored = read_metadata(onnx.load(str(path))).digit_threshold
    assert own["threshold_log_odds"] == pytest.approx(np.log(stored / (1 - stored)), abs=1e-4)
    assert set(own["flagged"]) == set(detector["flagged"]) and len(own["flagged"]) >= 10
    assert 0 <= detector["held_out_catch_at_1_percent_flagged"] <= detector["held_out_catch_at_2_percent_flagged"] <= 1
    with pytest.raises(SystemExit):  # a negative weight is refused by the command line
        score_blend.main([str(path), "--blend", "1,-1,0"])
