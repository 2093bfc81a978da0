"""GoogLeNet (Inception v1) adapted to 28x28x1 MNIST digits.

The network is composed from three small blocks (`ConvBNReLU`, `Inception`, the stem)
and configured by a preset table, so a new variant is a new row, not a new class.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import nn

from proto.contract import INPUT_SHAPE, NUM_CLASSES

# Branch widths of the nine inception modules, as in Szegedy et al. (2014), table 1:
# (1x1, 3x3 reduce, 3x3, 5x5 reduce, 5x5, pool projection).
INCEPTION_TABLE: dict[str, tuple[int, int, int, int, int, int]] = {
    "3a": (64, 96, 128, 16, 32, 32),
    "3b": (128, 128, 192, 32, 96, 64),
    "4a": (192, 96, 208, 16, 48, 64),
    "4b": (160, 112, 224, 24, 64, 64),
    "4c": (128, 128, 256, 24, 64, 64),
    "4d": (112, 144, 288, 32, 64, 64),
    "4e": (256, 160, 320, 32, 128, 128),
    "5a": (256, 160, 320, 32, 128, 128),
    "5b": (384, 192, 384, 48, 128, 128),
}
STAGES: tuple[tuple[str, ...], ...] = (("3a", "3b"), ("4a", "4b", "4c", "4d", "4e"), ("5a", "5b"))


@dataclass(frozen=True)
class GoogLeNetConfig:
    """Everything that distinguishes one preset from another."""

    name: str
    stem_stride: int  # 1 keeps 28x28 into stage 3; 2 halves every later feature map (~4x fewer FLOPs)
    width: float = 1.0  # multiplies every channel count of the paper's table
    dropout: float = 0.4
    stem_channels: tuple[int, int] = (64, 192)
    not_a_digit_class: bool = False  # an eleventh output, "not a digit", trained on non-digits (--non-digits)


PRESETS: dict[str, GoogLeNetConfig] = {
    "googlenet": GoogLeNetConfig("googlenet", stem_stride=1, width=1.0),
    "googlenet-fast": GoogLeNetConfig("googlenet-fast", stem_stride=2, width=0.5),
}


def scaled(channels: int, width: float) -> int:
    return max(8, int(round(channels * width)))


class ConvBNReLU(nn.Sequential):
    def __init__(self, cin: int, cout: int, kernel: int, stride: int = 1) -> None:
        super().__init__(
            nn.Conv2d(cin, cout, kernel, stride=stride, padding=kernel // 2, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU(inplace=True),
        )


class Inception(nn.Module):
    """Four parallel branches (1x1, 1x1->3x3, 1x1->5x5, pool->1x1) concatenated on channels."""

    def __init__(self, cin: int, c1: int, c3r: int, c3: int, c5r: int, c5: int, pool_proj: int) -> None:
        super().__init__()
        self.branch1 = ConvBNReLU(cin, c1, 1)
        self.branch3 = nn.Sequential(ConvBNReLU(cin, c3r, 1), ConvBNReLU(c3r, c3, 3))
        self.branch5 = nn.Sequential(ConvBNReLU(cin, c5r, 1), ConvBNReLU(c5r, c5, 5))
        self.branch_pool = nn.Sequential(nn.MaxPool2d(3, stride=1, padding=1), ConvBNReLU(cin, pool_proj, 1))
        self.out_channels = c1 + c3 + c5 + pool_proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.branch1(x), self.branch3(x), self.branch5(x), self.branch_pool(x)], dim=1)


class GoogLeNet(nn.Module):
    """Stem -> stage 3 -> pool -> stage 4 -> pool -> stage 5 -> global average pool -> dropout -> linear.

    Input: (N, 1, 28, 28) float, normalized as `proto.contract.MNIST_NORMALIZATION` says. Output: (N, 10) logits,
    or (N, 11) with `not_a_digit_class` (the last is "not a digit").
    """

    def __init__(self, config: GoogLeNetConfig) -> None:
        super().__init__()
        self.config = config
        w = config.width
        s1, s2 = (scaled(c, w) for c in config.stem_channels)
        # The ImageNet stem (7x7/2 conv, pools) would shrink 28x28 to nothing; a 3x3 stem keeps the
        # paper's 28x28 -> 14x14 -> 7x7 progression for the three inception stages.
        self.stem = nn.Sequential(
            ConvBNReLU(1, s1, 3),
            ConvBNReLU(s1, s1, 1),
            ConvBNReLU(s1, s2, 3, stride=config.stem_stride),
        )
        stages: list[nn.Module] = []
        cin = s2
        for i, stage in enumerate(STAGES):
            if i > 0:
                stages.append(nn.MaxPool2d(3, stride=2, padding=1))
            for key in stage:
                block = Inception(cin, *(scaled(c, w) for c in INCEPTION_TABLE[key]))
                stages.append(block)
                cin = block.out_channels
        self.features = nn.Sequential(*stages)
        self.head = nn.Sequential(
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(config.dropout), nn.Linear(cin, output_classes(config))
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(self.stem(x)))


def output_classes(config: GoogLeNetConfig) -> int:
    """The ten digits, and the "not a digit" class where the config has one (it is always the last)."""
    return NUM_CLASSES + int(config.not_a_digit_class)


def build_model(preset: str, **overrides: object) -> GoogLeNet:
    """Build a model from a preset name; `overrides` replace fields of its config (e.g. dropout=0)."""
    if preset not in PRESETS:
        raise ValueError(f"unknown model preset {preset!r}; choose one of {', '.join(PRESETS)}")
    return GoogLeNet(replace(PRESETS[preset], **overrides))  # type: ignore[arg-type]


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count_flops(model: nn.Module, batch: int = 1) -> int:
    """Multiply-accumulates x2 of the convolutions and linear layers for one forward pass.

    The probe input is made on the model's own device (CPU, CUDA, or `meta`, where nothing is computed).
    """
    total = 0

    def conv_hook(module: nn.Conv2d, _inputs: tuple, output: torch.Tensor) -> None:
        nonlocal total
        kh, kw = module.kernel_size
        total += 2 * output.numel() * (module.in_channels // module.groups) * kh * kw

    def linear_hook(module: nn.Linear, _inputs: tuple, output: torch.Tensor) -> None:
        nonlocal total
        total += 2 * output.numel() * module.in_features

    handles = []
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            handles.append(m.register_forward_hook(conv_hook))
        elif isinstance(m, nn.Linear):
            handles.append(m.register_forward_hook(linear_hook))
    was_training = model.training
    model.eval()
    with torch.no_grad():
        device = next(model.parameters()).device
        model(torch.zeros(batch, *INPUT_SHAPE, device=device))
    model.train(was_training)
    for h in handles:
        h.remove()
    return total // batch


class WithProbabilities(nn.Module):
    """Adds the softmax as a second output, so a server needs no softmax of its own (used for export)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.model(x)
        return logits, torch.softmax(logits, dim=1)


class WithDigitScore(nn.Module):
    """A model with a "not a digit" class, as the server reads it (used for export): the ten digits' logits and their
    softmax (the answer, as if the image is a digit), and `digit_score`, the probability that it is one at all
    (1 - the eleventh class's share of the full softmax, computed as log-odds so it keeps its digits near 0 and 1)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        logits = self.model(x)
        digits = logits[:, :NUM_CLASSES]
        digit_log_odds = torch.logsumexp(digits, dim=1) - logits[:, NUM_CLASSES]
        return digits, torch.softmax(digits, dim=1), torch.sigmoid(digit_log_odds)
