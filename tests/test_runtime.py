"""The model runtime: provider choice, metadata, and batch padding for fixed GPU shapes."""

from __future__ import annotations

import numpy as np
import pytest

from server.config import BUNDLED_MODEL
from server.runtime import OnnxModel, ProviderUnavailable, batch_shapes, nvidia_driver_present


@pytest.fixture(scope="module")
def model() -> OnnxModel:
    return OnnxModel(BUNDLED_MODEL, provider="cpu", max_batch_size=32)


def test_cpu_model_reads_its_metadata_and_reports_the_provider(model: OnnxModel) -> None:
    assert model.providers == ["CPUExecutionProvider"] and not model.on_gpu
    assert model.metadata.model_name == "googlenet-fast"
    assert model.normalization.mean == pytest.approx(0.1307)


def test_padding_to_fixed_shapes_does_not_change_the_answers(model: OnnxModel) -> None:
    x = np.random.default_rng(0).normal(size=(5, 1, 28, 28)).astype(np.float32)
    unpadded = model.run(x)
    model.padded_sizes = batch_shapes(32)  # as on a GPU
    try:
        assert model.padded_size(5) == 8 and model.padded_size(32) == 32
        padded = model.run(x)
    finally:
        model.padded_sizes = []
    assert padded.shape == (5, 10)
    np.testing.assert_allclose(padded, unpadded, atol=1e-5)


needs_no_gpu = pytest.mark.skipif(nvidia_driver_present(), reason="an NVIDIA driver is present: CUDA may work here")


@needs_no_gpu
def test_asking_for_cuda_without_a_gpu_fails_clearly() -> None:
    with pytest.raises(ProviderUnavailable, match="--provider cuda asked for, but no NVIDIA driver"):
        OnnxModel(BUNDLED_MODEL, provider="cuda")


@needs_no_gpu
def test_auto_provider_falls_back_to_cpu_without_a_gpu() -> None:
    assert OnnxModel(BUNDLED_MODEL, provider="auto").providers == ["CPUExecutionProvider"]
