"""Batched, on-device data augmentation: small random affine warps of whole batches.

Done with `affine_grid` + `grid_sample` so it runs wherever the batch lives (GPU or CPU)
without a per-image Python loop.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def random_affine(
    images: torch.Tensor,
    generator: torch.Generator,
    max_rotation_deg: float = 10.0,
    max_scale: float = 0.1,
    max_shift_px: float = 2.0,
) -> torch.Tensor:
    """Rotate, scale and shift each image of an (N, 1, H, W) float batch by its own random amount."""
    n, _, h, _ = images.shape
    if max_rotation_deg == 0 and max_scale == 0 and max_shift_px == 0:
        return images

    def uniform(bound: float) -> torch.Tensor:
        return (torch.rand(n, generator=generator, device=generator.device) * 2 - 1) * bound

    angle = uniform(math.radians(max_rotation_deg)).to(images.device)
    scale = (1 + uniform(max_scale)).to(images.device)
    shift = torch.stack([uniform(max_shift_px), uniform(max_shift_px)], dim=1).to(images.device) * (2 / h)
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta.to(images.dtype), list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
