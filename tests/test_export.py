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
    load_checkpoint_model,
    main,
    normalized_test_images,
)
from proto.contract import ModelMetadata, read_metadata
from training.data import sha256_file
from training.train import TrainConfig, train

BUNDLED = Path(__file__).resolve().parents[1] / "server" / "bundled" / "googlenet-fast.onnx"


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory, mnist_dir: Path) -> tuple[Path, Path, dict]:
    out = tmp_path_factory.mktemp("export")
    train(
        TrainConfig(
            epochs=1,
            batch_size=32,
            lr=0.05,
            train_limit=300,
            eval_limit=100,
            device="cpu",
            out_dir=str(out),
            data_dir=str(mnist_dir),
        )
    )
    checkpoint = out / "model.pt"
    report = export_checkpoint(checkpoint, out / "model.onnx", parity_images=200, accuracy_images=300)
    return checkpoint, out / "model.onnx", report


def test_exported_model_passes_the_onnx_checker_with_named_io_and_dynamic_batch(exported) -> None:
    _, path, _ = exported
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto, full_check=True)
    assert proto.opset_import[0].version >= 17
    assert [i.name for i in proto.graph.input] == ["image"]
    assert [o.name for o in proto.graph.output] == ["logits", "probabilities"]
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for batch in (1, 7, 64):
        logits, probabilities = session.run(None, {"image": np.zeros((batch, 1, 28, 28), np.float32)})
        assert logits.shape == probabilities.shape == (batch, 10)
        assert np.allclose(probabilities.sum(1), 1, atol=1e-5)


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


def test_bundled_model_files_stay_within_the_size_budget() -> None:
    total = sum(p.stat().st_size for p in BUNDLED.parent.glob("*.onnx"))
    assert 0 < total <= 12_000_000
