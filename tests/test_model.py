"""GoogLeNet presets: shapes, parameter and FLOP counts, and the preset table's contract."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from training.model import INCEPTION_TABLE, PRESETS, Inception, build_model, count_flops, count_parameters


@pytest.mark.parametrize("preset", list(PRESETS))
def test_each_preset_maps_a_batch_of_digits_to_ten_logits(preset: str) -> None:
    model = build_model(preset).eval()
    with torch.no_grad():
        assert model(torch.randn(3, 1, 28, 28)).shape == (3, 10)


# Szegedy et al. (2014), "Going deeper with convolutions", table 1: the nine inception modules' branch widths
# (#1x1, #3x3 reduce, #3x3, #5x5 reduce, #5x5, pool proj), written out here from the paper, not imported.
PAPER_TABLE = [
    (64, 96, 128, 16, 32, 32),
    (128, 128, 192, 32, 96, 64),
    (192, 96, 208, 16, 48, 64),
    (160, 112, 224, 24, 64, 64),
    (128, 128, 256, 24, 64, 64),
    (112, 144, 288, 32, 64, 64),
    (256, 160, 320, 32, 128, 128),
    (256, 160, 320, 32, 128, 128),
    (384, 192, 384, 48, 128, 128),
]
STEM = (64, 192)  # the paper's stem widths (conv 64, conv 192), here on 3x3/1x1/3x3 convolutions


def documented_presets() -> dict[str, tuple[int, float, int, float]]:
    """docs/training.md's preset table: stem stride, width, parameters, MFLOPs per 28x28 image."""
    text = (Path(__file__).resolve().parents[1] / "docs" / "training.md").read_text()
    rows = re.findall(r"^(googlenet\S*) +(\d) +([\d.]+) +([\d,]+) +([\d,.]+)$", text, re.MULTILINE)
    return {name: (int(s), float(w), int(p.replace(",", "")), float(f.replace(",", ""))) for name, s, w, p, f in rows}


DOCUMENTED = documented_presets()


def conv_bn(cin: int, cout: int, k: int) -> int:
    """A k x k convolution without bias (BatchNorm follows) and the BatchNorm's scale and shift."""
    return cin * cout * k * k + 2 * cout


def by_hand(width: float) -> int:
    """The architecture's parameters from the paper's table: stem, nine inception modules, the 10-way classifier."""

    def w(c: int) -> int:
        assert (c * width).is_integer()
        return int(c * width)

    s1, s2 = (w(c) for c in STEM)
    total = conv_bn(1, s1, 3) + conv_bn(s1, s1, 1) + conv_bn(s1, s2, 3)
    cin = s2
    for row in PAPER_TABLE:
        c1, c3r, c3, c5r, c5, pool = (w(c) for c in row)
        total += conv_bn(cin, c1, 1) + conv_bn(cin, c3r, 1) + conv_bn(c3r, c3, 3)
        total += conv_bn(cin, c5r, 1) + conv_bn(c5r, c5, 5) + conv_bn(cin, pool, 1)
        cin = c1 + c3 + c5 + pool
    return total + cin * 10 + 10  # linear: weights and biases


@pytest.mark.parametrize("preset", list(DOCUMENTED))
def test_parameter_counts_are_those_of_the_papers_architecture_and_of_the_docs(preset: str) -> None:
    assert set(DOCUMENTED) == set(PRESETS)
    stride, width, documented, _ = DOCUMENTED[preset]
    assert (PRESETS[preset].stem_stride, PRESETS[preset].width) == (stride, width)
    assert by_hand(width) == documented
    assert count_parameters(build_model(preset)) == documented


@pytest.mark.parametrize("preset", list(DOCUMENTED))
def test_flop_counts_agree_with_pytorchs_own_counter_and_the_docs(preset: str) -> None:
    from torch.utils.flop_counter import FlopCounterMode

    model = build_model(preset).eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:  # convolutions and matmuls, 2 per MAC
        model(torch.zeros(1, 1, 28, 28))
    assert count_flops(model) == counter.get_total_flops()
    assert round(counter.get_total_flops() / 1e6, 1) == DOCUMENTED[preset][3]


def test_fast_preset_needs_far_fewer_flops() -> None:
    full, fast = count_flops(build_model("googlenet")), count_flops(build_model("googlenet-fast"))
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
    assert params == DOCUMENTED["googlenet-fast"][2] and flops == count_flops(build_model("googlenet-fast"))
