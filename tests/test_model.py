"""GoogLeNet presets: shapes, parameter and FLOP counts, and the preset table's contract."""

from __future__ import annotations

import pytest
import torch

from training.model import INCEPTION_TABLE, PRESETS, Inception, build_model, count_flops, count_parameters


@pytest.mark.parametrize("preset", list(PRESETS))
def test_each_preset_maps_a_batch_of_digits_to_ten_logits(preset: str) -> None:
    model = build_model(preset).eval()
    with torch.no_grad():
        assert model(torch.randn(3, 1, 28, 28)).shape == (3, 10)


def test_parameter_counts_are_those_stated_in_the_readme() -> None:
    assert count_parameters(build_model("googlenet")) == 5_982_250
    assert count_parameters(build_model("googlenet-fast")) == 1_501_914


def test_fast_preset_needs_far_fewer_flops() -> None:
    full, fast = count_flops(build_model("googlenet")), count_flops(build_model("googlenet-fast"))
    assert full == pytest.approx(2.389e9, rel=1e-3)
    assert full / fast > 4


def test_the_network_has_nine_inception_modules_with_the_papers_widths() -> None:
    modules = [m for m in build_model("googlenet").modules() if isinstance(m, Inception)]
    assert len(modules) == 9
    assert [m.out_channels for m in modules] == [
        sum(INCEPTION_TABLE[k][i] for i in (0, 2, 4, 5)) for k in INCEPTION_TABLE
    ]
    assert modules[-1].out_channels == 1024


def test_stride_two_stem_halves_the_feature_maps() -> None:
    full, fast = build_model("googlenet"), build_model("googlenet-fast")
    x = torch.zeros(1, 1, 28, 28)
    assert full.stem(x).shape[-1] == 28 and fast.stem(x).shape[-1] == 14


def test_unknown_preset_names_the_choices() -> None:
    with pytest.raises(ValueError, match="googlenet-fast"):
        build_model("resnet")


@pytest.mark.parametrize("preset", list(PRESETS))
def test_flops_are_counted_on_whatever_device_holds_the_model(preset: str) -> None:
    """A model on PyTorch's `meta` device stands in for a GPU: a CPU probe tensor would fail against it."""
    on_cpu = count_flops(build_model(preset))
    assert count_flops(build_model(preset).to("meta")) == on_cpu


def test_the_training_setup_places_model_and_counts_on_a_non_cpu_device() -> None:
    from training.train import place_model

    model, params, flops = place_model("googlenet-fast", torch.device("meta"))
    assert next(model.parameters()).device.type == "meta"
    assert params == 1_501_914 and flops == count_flops(build_model("googlenet-fast"))
