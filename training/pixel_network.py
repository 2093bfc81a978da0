"""Fit the digit detector's pixel network: a small CNN telling digits from non-digits, for `fit_digit_detector`.

The same fitting images and weights as the detector's fusion network (positives and each non-digit kind
weighing as `fit_digit_detector.fit` says), weighted cross-entropy, AdamW with a one-cycle step (warm-up, then
cosine), small random shifts of a pixel or two so it does not learn where a digit sits to the pixel. Batch
normalization is folded into the convolutions before the weights leave: the served network
(`server/pipeline/pixel_network.py`, numpy; `export/digit_score_graph.py`, ONNX) has convolutions, ReLU, pooling
and one linear output only.
Deterministic for a seed on one machine (CPU threads may reorder float sums elsewhere).
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from server.pipeline.pixel_network import KERNEL, LAYERS, PREFIX, SIDE

CHANNELS = (24, 48, 64)  # per convolution
BATCH = 256
LEARNING_RATE = 3e-3
WEIGHT_DECAY = 1e-4
MAX_SHIFT = 2  # pixels, each way, of the random shift applied while fitting


class PixelCNN(nn.Sequential):
    """conv-BN-ReLU (-maxpool) x 3, global average pooling, one linear output (the log-odds of "digit")."""

    def __init__(self, channels: tuple[int, ...] = CHANNELS) -> None:
        layers: list[nn.Module] = []
        cin = 1
        for i, cout in enumerate(channels):
            layers += [nn.Conv2d(cin, cout, KERNEL, padding=KERNEL // 2, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]
            if i < len(channels) - 1:
                layers.append(nn.MaxPool2d(2))
            cin = cout
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, 1)]
        super().__init__(*layers)


@dataclass
class FitResult:
    params: dict[str, np.ndarray]  # PREFIX keys, batch normalization folded in, convolutions in float16
    seconds: float
    final_loss: float


def fold(model: PixelCNN) -> dict[str, np.ndarray]:
    """The network's weights with each batch normalization folded into the convolution before it."""
    convs = [m for m in model if isinstance(m, nn.Conv2d)]
    norms = [m for m in model if isinstance(m, nn.BatchNorm2d)]
    head = next(m for m in model if isinstance(m, nn.Linear))
    if len(convs) != LAYERS:
        raise ValueError(f"the served network has {LAYERS} convolutions, this one {len(convs)}")
    params: dict[str, np.ndarray] = {}
    with torch.no_grad():
        for i, (conv, norm) in enumerate(zip(convs, norms, strict=True)):
            scale = norm.weight / torch.sqrt(norm.running_var + norm.eps)
            # stored as float16 (half the file; the fitted network's log-odds move by ~1e-3), scored as float32
            params[f"{PREFIX}conv{i}_weight"] = (conv.weight * scale[:, None, None, None]).numpy().astype(np.float16)
            params[f"{PREFIX}conv{i}_bias"] = (norm.bias - norm.running_mean * scale).numpy().astype(np.float32)
        params[f"{PREFIX}head_weight"] = head.weight.reshape(-1).numpy().astype(np.float32)
        params[f"{PREFIX}head_bias"] = head.bias.reshape(1).numpy().astype(np.float32)
    return params


def _shift(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Each image moved by up to MAX_SHIFT pixels each way, the field filled by repeating its edge pixels."""
    n = len(x)
    padded = nn.functional.pad(x, (MAX_SHIFT,) * 4, mode="replicate")
    dy, dx = (torch.randint(0, 2 * MAX_SHIFT + 1, (n,), generator=generator) for _ in range(2))
    rows = (dy[:, None] + torch.arange(SIDE)[None]).view(n, 1, SIDE, 1).expand(n, 1, SIDE, SIDE + 2 * MAX_SHIFT)
    picked = torch.gather(padded, 2, rows)
    cols = (dx[:, None] + torch.arange(SIDE)[None]).view(n, 1, 1, SIDE).expand(n, 1, SIDE, SIDE)
    return torch.gather(picked, 3, cols)


def fit(
    x: np.ndarray,
    y: np.ndarray,
    w: np.ndarray,
    seed: int,
    epochs: int,
    log: Callable[[str], None] = lambda message: print(message, file=sys.stderr),
) -> FitResult:
    """x (N, 784) or (N, 1, 28, 28) normalized inputs, y 1 for digit and 0 for not, w per-sample weights."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    images = torch.from_numpy(np.ascontiguousarray(x, np.float32).reshape(-1, 1, SIDE, SIDE))
    labels = torch.from_numpy(np.asarray(y, np.float32))
    weights = torch.from_numpy(np.asarray(w, np.float32) / float(np.mean(w)))
    model = PixelCNN()
    optimizer = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE, weight_decay=WEIGHT_DECAY)
    steps = epochs * math.ceil(len(images) / BATCH)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, LEARNING_RATE, total_steps=max(steps, 1))
    start, loss_value = time.perf_counter(), float("nan")
    for epoch in range(epochs):
        model.train()
        order = torch.randperm(len(images), generator=generator)
        total, seen = 0.0, 0
        for at in range(0, len(images), BATCH):
            rows = order[at : at + BATCH]
            logits = model(_shift(images[rows], generator)).reshape(-1)
            loss = (
                nn.functional.binary_cross_entropy_with_logits(logits, labels[rows], reduction="none") * weights[rows]
            ).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            total += loss.item() * len(rows)
            seen += len(rows)
        loss_value = total / max(seen, 1)
        elapsed = time.perf_counter() - start
        log(f"  pixel network epoch {epoch + 1}/{epochs}: weighted loss {loss_value:.4f} ({elapsed:.0f} s)")
    model.eval()
    return FitResult(fold(model), time.perf_counter() - start, loss_value)
