"""Export: a checkpoint becomes a checked ONNX model whose outputs match PyTorch, with full metadata."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from export.onnx_export import (
    ExportError,
    check_model_file,
    export_checkpoint,
    export_fp16_variant,
    load_checkpoint_model,
    main,
    normalized_test_images,
)
from proto.contract import ModelMetadata, read_metadata
from server.config import DIGIT_DETECTOR
from server.pipeline.digit_detector import DigitDetector
from tests.support import smoke_training
from training.data import sha256_file

BUNDLED = Path(__file__).resolve().parents[1] / "server" / "bundled" / "googlenet-fast.onnx"


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory, mnist_dir: Path) -> tuple[Path, Path, dict]:
    out = tmp_path_factory.mktemp("export")
    smoke_training(out, mnist_dir)
    checkpoint = out / "model.pt"
    report = export_checkpoint(checkpoint, out / "model.onnx", parity_images=200, accuracy_images=300)
    return checkpoint, out / "model.onnx", report


def test_exported_model_passes_the_onnx_checker_with_named_io_and_dynamic_batch(exported) -> None:
    _, path, _ = exported
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto, full_check=True)
    assert proto.opset_import[0].version >= 17
    assert [i.name for i in proto.graph.input] == ["image"]
    assert [o.name for o in proto.graph.output] == ["logits", "probabilities", "digit_score"]
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for batch in (1, 7, 64):
        logits, probabilities, scores = session.run(None, {"image": np.zeros((batch, 1, 28, 28), np.float32)})
        assert logits.shape == probabilities.shape == (batch, 10) and scores.shape == (batch,)
        assert np.allclose(probabilities.sum(1), 1, atol=1e-5)
        assert ((scores >= 0) & (scores <= 1)).all()


def test_onnx_logits_match_pytorch_on_real_test_images(exported, mnist_dir: Path) -> None:
    checkpoint, path, report = exported
    assert report["parity"]["passed"] and report["parity"]["max_abs_logit_diff"] <= 1e-4
    assert report["parity"]["images"] == 200 and report["parity"]["argmax_mismatches"] == 0
    # an independent check here, not trusting the exporter's own report
    model, _, _ = load_checkpoint_model(checkpoint)
    x, _ = normalized_test_images(50, str(mnist_dir))
    with torch.no_grad():
        expected = model(torch.from_numpy(x)).numpy()
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    actual = session.run(["logits"], {"image": x})[0]
    assert np.abs(actual - expected).max() <= 1e-4
    assert np.array_equal(actual.argmax(1), expected.argmax(1))


def test_metadata_describes_the_model(exported, mnist_dir: Path) -> None:
    checkpoint, path, report = exported
    meta = read_metadata(onnx.load(str(path)))
    assert meta.model_name == "googlenet-fast"
    assert meta.class_labels == [str(d) for d in range(10)]
    assert meta.checkpoint_sha256 == sha256_file(checkpoint)
    assert meta.model_version == meta.checkpoint_sha256[:12]
    assert meta.normalization["mean"] == pytest.approx(0.1307) and meta.normalization["std"] == pytest.approx(0.3081)
    assert "NCHW" in meta.input_layout and meta.test_images == 300
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x, labels = normalized_test_images(300, str(mnist_dir))
    measured = float((session.run(["logits"], {"image": x})[0].argmax(1) == labels).mean())
    assert meta.test_accuracy == pytest.approx(measured) and meta.test_accuracy == report["metadata"]["test_accuracy"]
    # ONNX Runtime (what the server uses) sees the same metadata
    props = session.get_modelmeta().custom_metadata_map
    assert ModelMetadata.from_props(props) == meta
    # the digit score's threshold and the detector it was built from
    detector = DigitDetector.load(DIGIT_DETECTOR)
    assert meta.digit_threshold == detector.threshold and "digit_score" in meta.output_layout
    assert meta.digit_detector["source"] == "digit-detector.npz"
    assert meta.digit_detector["detector_sha256"] == sha256_file(DIGIT_DETECTOR)


def test_the_exported_score_is_checked_against_the_numpy_detector(exported, mnist_dir: Path) -> None:
    _, path, report = exported
    check = report["digit_score"]
    assert check["passed"] and check["max_abs_score_diff"] <= 1e-4 and check["decisions_changed_off_threshold"] == 0
    assert check["digits"] == 200 and check["non_digits"] == 240
    # an independent check here, not trusting the exporter's own report
    detector = DigitDetector.load(DIGIT_DETECTOR)
    x, _ = normalized_test_images(100, str(mnist_dir))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    probabilities, scores = session.run(["probabilities", "digit_score"], {"image": x})
    assert np.abs(scores - detector.score(x, probabilities)).max() <= 1e-4


def test_export_refuses_a_file_that_is_not_a_checkpoint(tmp_path: Path) -> None:
    bogus = tmp_path / "model.pt"
    bogus.write_bytes(b"definitely not a checkpoint")
    with pytest.raises(ExportError, match="not a loadable mnist-train checkpoint"):
        export_checkpoint(bogus, tmp_path / "out.onnx")
    assert not (tmp_path / "out.onnx").exists()


def test_export_cli_reports_a_missing_checkpoint(tmp_path: Path, capsys) -> None:
    assert main([str(tmp_path / "nope.pt"), "-o", str(tmp_path / "x.onnx")]) == 2
    assert "checkpoint not found" in capsys.readouterr().err


def test_metadata_without_a_key_names_it() -> None:
    with pytest.raises(ValueError, match="mnist.model_version"):
        ModelMetadata.from_props({"mnist.model_name": "x"})


def test_the_bundled_model_is_verified_and_accurate(mnist_dir: Path) -> None:
    result = check_model_file(BUNDLED, str(mnist_dir), limit=1000)
    assert result["metadata"]["model_name"] == "googlenet-fast"
    assert result["metadata"]["test_accuracy"] >= 0.993 and result["metadata"]["test_images"] == 10_000
    assert result["accuracy"] >= 0.99
    assert result["digit_score"]["max_abs_score_diff"] <= 1e-4 and result["digit_score"]["digits"] == 1000


def test_the_digit_score_is_added_to_an_existing_model_without_changing_its_answers(exported, tmp_path, mnist_dir):
    """--add-digit-score: a model exported before the score gets it; logits and probabilities stay bit-identical."""
    from export.digit_score_graph import without_digit_score

    _, path, _ = exported
    old = tmp_path / "old.onnx"
    onnx.save(without_digit_score(onnx.load(str(path))), str(old))
    assert read_metadata(onnx.load(str(old))).digit_threshold is None
    x, _ = normalized_test_images(64, str(mnist_dir))
    before = ort.InferenceSession(str(old), providers=["CPUExecutionProvider"]).run(None, {"image": x})
    assert main(["--add-digit-score", str(old), "--parity-images", "100", "--data-dir", str(mnist_dir)]) == 0
    after = ort.InferenceSession(str(old), providers=["CPUExecutionProvider"]).run(None, {"image": x})
    assert len(before) == 2 and len(after) == 3
    np.testing.assert_array_equal(after[0], before[0])
    np.testing.assert_array_equal(after[1], before[1])
    meta = read_metadata(onnx.load(str(old)))
    assert meta.digit_threshold == DigitDetector.load(DIGIT_DETECTOR).threshold
    # done again, the score is replaced, not added twice
    assert main(["--add-digit-score", str(old), "--parity-images", "100", "--data-dir", str(mnist_dir)]) == 0
    assert [o.name for o in onnx.load(str(old)).graph.output] == ["logits", "probabilities", "digit_score"]


def test_a_model_whose_score_drifts_from_the_numpy_detector_is_not_written(exported, tmp_path, monkeypatch, mnist_dir):
    import export.digit_score_graph as graph
    import export.onnx_export as exporter

    _, path, _ = exported
    copy = tmp_path / "drift.onnx"
    copy.write_bytes(path.read_bytes())
    original = graph.build

    def drifting(detector, *args, **kwargs):  # one hidden unit's bias off by 0.5: a wrong constant in the subgraph
        subgraph = original(detector, *args, **kwargs)
        (bias,) = [t for t in subgraph.initializers if t.name.endswith("hidden_bias")]
        array = onnx.numpy_helper.to_array(bias).copy()
        array[0] += 0.5
        bias.CopyFrom(onnx.numpy_helper.from_array(array, bias.name))
        return subgraph

    monkeypatch.setattr(graph, "build", drifting)
    with pytest.raises(ExportError, match="digit score check failed"):
        exporter.add_digit_score(copy, parity_images=100, data_dir=str(mnist_dir))
    assert copy.read_bytes() == path.read_bytes()


def test_bundled_model_files_stay_within_the_size_budget() -> None:
    models = [*BUNDLED.parent.glob("*.onnx"), *BUNDLED.parent.glob("*.npz")]  # the detector's weights are a model too
    assert len(models) >= 5, models
    assert sum(p.stat().st_size for p in models) <= 12_000_000


# --- the fp16 variant ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fp16_exported(exported, mnist_dir: Path) -> tuple[Path, dict]:
    _, fp32_path, _ = exported
    report = export_fp16_variant(fp32_path, parity_images=200, accuracy_images=300, data_dir=str(mnist_dir))
    return Path(report["model"]), report


def test_the_fp16_variant_is_written_beside_the_fp32_model_and_says_what_it_is(exported, fp16_exported) -> None:
    _, fp32_path, _ = exported
    path, report = fp16_exported
    assert path == fp32_path.with_name("model.fp16.onnx") and path.is_file()
    assert path.with_suffix(".export.json").is_file()
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto, full_check=True)
    meta, meta32 = read_metadata(proto), read_metadata(onnx.load(str(fp32_path)))
    assert meta.precision == "fp16" and meta32.precision == "fp32"
    assert (meta.model_name, meta.model_version) == (meta32.model_name, meta32.model_version)
    assert path.stat().st_size < 0.6 * fp32_path.stat().st_size  # half-size weights
    assert report["parity_against_fp32"]["max_abs_logit_diff"] <= report["parity_against_fp32"]["tolerance"]


def test_the_fp16_variant_keeps_float32_input_and_outputs_and_a_float32_softmax(fp16_exported) -> None:
    path, _ = fp16_exported
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [(i.name, i.type) for i in session.get_inputs()] == [("image", "tensor(float)")]
    assert [(o.name, o.type) for o in session.get_outputs()] == [
        ("logits", "tensor(float)"),
        ("probabilities", "tensor(float)"),
        ("digit_score", "tensor(float)"),
    ]
    graph = onnx.load(str(path)).graph
    (softmax,) = [n for n in graph.node if n.op_type == "Softmax"]
    assert list(softmax.input) == ["logits"]  # the float32 graph output, not an fp16 tensor
    assert any(t.data_type == onnx.TensorProto.FLOAT16 for t in graph.initializer)
    # the digit score stays in fp32: its fp16 initializers are those it stores losslessly (the pixel projection, the
    # pixel network's convolutions), each cast back to float32 at once, and nothing else of it reads one
    score_part = [t for t in graph.initializer if t.name.startswith("digit_score/")]
    halves = {t.name for t in score_part if t.data_type == onnx.TensorProto.FLOAT16}
    assert "digit_score/pixel_projection_fp16" in halves
    readers = [n for n in graph.node if n.name.startswith("digit_score/") and halves & set(n.input)]
    assert {name for n in readers for name in n.input} == halves
    assert all(n.op_type == "Cast" and n.attribute[0].i == onnx.TensorProto.FLOAT for n in readers)


def test_fp16_answers_match_fp32_and_its_accuracy_is_measured_on_its_own_file(exported, fp16_exported, mnist_dir):
    _, fp32_path, _ = exported
    path, report = fp16_exported
    x, labels = normalized_test_images(300, str(mnist_dir))
    s16 = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    s32 = ort.InferenceSession(str(fp32_path), providers=["CPUExecutionProvider"])
    p16, p32 = s16.run(["probabilities"], {"image": x})[0], s32.run(["probabilities"], {"image": x})[0]
    assert np.abs(p16 - p32).max() <= 0.01
    assert (p16.argmax(1) != p32.argmax(1)).mean() <= 0.01
    assert read_metadata(onnx.load(str(path))).test_accuracy == pytest.approx(float((p16.argmax(1) == labels).mean()))
    assert report["metadata"]["test_images"] == 300


def test_the_fp16_variants_score_is_checked_and_matches_the_numpy_detector(fp16_exported, mnist_dir: Path) -> None:
    path, report = fp16_exported
    assert report["digit_score"]["passed"] and report["digit_score"]["max_abs_score_diff"] <= 1e-4
    detector = DigitDetector.load(DIGIT_DETECTOR)
    x, _ = normalized_test_images(100, str(mnist_dir))
    probabilities, scores = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(
        ["probabilities", "digit_score"], {"image": x}
    )
    assert np.abs(scores - detector.score(x, probabilities)).max() <= 1e-4


def test_an_fp16_variant_that_drifts_from_fp32_is_refused_and_not_written(exported, tmp_path, monkeypatch) -> None:
    import export.onnx_export as exporter

    _, fp32_path, _ = exported
    copy = tmp_path / "drift.onnx"
    copy.write_bytes(fp32_path.read_bytes())
    original = exporter.to_fp16

    def drifting(proto):  # every weight 10% off: what a broken conversion would do
        converted = original(proto)
        for tensor in converted.graph.initializer:
            if tensor.data_type == onnx.TensorProto.FLOAT16:
                array = onnx.numpy_helper.to_array(tensor) * np.float16(1.1)
                tensor.CopyFrom(onnx.numpy_helper.from_array(array, tensor.name))
        return converted

    monkeypatch.setattr(exporter, "to_fp16", drifting)
    with pytest.raises(ExportError, match="fp16 check failed"):
        export_fp16_variant(copy, parity_images=100, accuracy_images=100)
    assert not copy.with_name("drift.fp16.onnx").exists()


def test_an_fp16_model_is_not_converted_again(fp16_exported) -> None:
    path, _ = fp16_exported
    with pytest.raises(ExportError, match="already fp16"):
        export_fp16_variant(path)


def test_the_bundled_fp16_variant_matches_its_fp32_model() -> None:
    fp16 = BUNDLED.with_name("googlenet-fast.fp16.onnx")
    meta16, meta32 = read_metadata(onnx.load(str(fp16))), read_metadata(onnx.load(str(BUNDLED)))
    assert meta16.precision == "fp16" and meta16.model_version == meta32.model_version
    assert meta16.digit_threshold == meta32.digit_threshold == DigitDetector.load(DIGIT_DETECTOR).threshold
    assert meta16.test_accuracy >= meta32.test_accuracy - 0.001 and meta16.test_images == 10_000
