"""Batched, on-device data augmentation: the digit moved, and the digit as people actually send it.

Everything works on a whole (N, 1, H, W) batch of floats in [0, 1] (ink 1, paper 0) with tensor
ops and per-image random parameters, so it runs wherever the batch lives (GPU or CPU) without a
per-image Python loop, and draws only from the epoch's generator (a resumed run repeats it).

Three recipes (`AUGMENTATIONS`):
- `basic`: a small random affine warp (rotation, zoom, shift): the MNIST classic.
- `robust` (and `strong`, the same harder): a stronger warp (rotation, shear, zoom, off-centre shift)
  and an elastic wobble, then, for `corruption_probability` of the images, one or two "photo and
  scan" corruptions drawn from
  `AUGMENT_CORRUPTIONS`: stroke width, blur, low resolution, noise of three kinds, contrast and paper tone,
  fog, partial inversion, occlusion, stray pen lines, edges only. Their strengths are drawn from
  ranges, not fixed levels, so the model learns the kind of change rather than one test setting.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

Augmentation = Callable[[torch.Tensor, torch.Generator], torch.Tensor]


def _uniform(n: int, low: float, high: float, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    return torch.rand(n, generator=generator, device=generator.device).to(device) * (high - low) + low


def _per_image(values: torch.Tensor) -> torch.Tensor:
    """(N,) -> (N, 1, 1, 1), to scale each image of a batch by its own value."""
    return values.view(-1, 1, 1, 1)


def random_affine(
    images: torch.Tensor,
    generator: torch.Generator,
    max_rotation_deg: float = 10.0,
    max_scale: float = 0.1,
    max_shift_px: float = 2.0,
    max_shear: float = 0.0,
) -> torch.Tensor:
    """Rotate, zoom, shear and shift each image of an (N, 1, H, W) float batch by its own random amount."""
    n, _, h, _ = images.shape
    if max_rotation_deg == 0 and max_scale == 0 and max_shift_px == 0 and max_shear == 0:
        return images
    device = images.device

    def uniform(bound: float) -> torch.Tensor:
        return _uniform(n, -bound, bound, generator, device)

    angle = uniform(math.radians(max_rotation_deg))
    scale = 1 + uniform(max_scale)
    shear = uniform(max_shear)
    shift = torch.stack([uniform(max_shift_px), uniform(max_shift_px)], dim=1) * (2 / h)
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    # rotation·zoom, then a horizontal shear (slanted handwriting); theta maps output to input coordinates
    row0 = torch.stack([cos, -sin + cos * shear, shift[:, 0]], 1)
    row1 = torch.stack([sin, cos + sin * shear, shift[:, 1]], 1)
    theta = torch.stack([row0, row1], 1)
    grid = F.affine_grid(theta.to(images.dtype), list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def elastic(images: torch.Tensor, generator: torch.Generator, max_pixels: float = 1.5) -> torch.Tensor:
    """A smooth random displacement field (Simard et al. 2003): the wobble of a different hand."""
    n, _, h, w = images.shape
    coarse = torch.rand((n, 2, 4, 4), generator=generator, device=generator.device).to(images.device) * 2 - 1
    field = F.interpolate(coarse, size=(h, w), mode="bicubic", align_corners=False)
    strength = _per_image(_uniform(n, 0, max_pixels, generator, images.device)) * (2 / h)
    identity = F.affine_grid(
        torch.eye(2, 3, device=images.device, dtype=images.dtype).expand(n, 2, 3), list(images.shape), False
    )
    grid = identity + (field * strength).permute(0, 2, 3, 1)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


# --- corruptions: each takes and returns an (N, 1, H, W) batch in [0, 1] ---------------------------------------


def thicker(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """A broader pen: grey-level dilation."""
    return F.max_pool2d(x, 3, stride=1, padding=1)


def thinner(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """A finer pen: grey-level erosion, kept only where some ink survives."""
    eroded = -F.max_pool2d(-x, 3, stride=1, padding=1)
    keep = _per_image((eroded.flatten(1).amax(1) > 0.3).to(x.dtype))
    return keep * eroded + (1 - keep) * x


def blur(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Out of focus: a Gaussian of sigma 0.5-1.5 px (each image its own)."""
    n = x.shape[0]
    sigma = _uniform(n, 0.5, 1.5, g, x.device)
    offsets = torch.arange(-3, 4, device=x.device, dtype=x.dtype)
    kernel_1d = torch.exp(-(offsets[None, :] ** 2) / (2 * sigma[:, None] ** 2))
    kernel_1d = kernel_1d / kernel_1d.sum(1, keepdim=True)
    kernel = (kernel_1d[:, :, None] * kernel_1d[:, None, :]).unsqueeze(1)  # (N, 1, 7, 7)
    out = F.conv2d(x.transpose(0, 1), kernel, padding=3, groups=n)  # one kernel per image
    return out.transpose(0, 1)


def motion_blur(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """A shaken camera: the average of the image shifted along a random direction, 2-5 px long."""
    n = x.shape[0]
    angle = _uniform(n, 0, math.pi, g, x.device)
    length = _uniform(n, 2, 5, g, x.device)
    total = torch.zeros_like(x)
    steps = 5
    for k in range(steps):
        t = (k / (steps - 1) - 0.5) * length * (2 / x.shape[-1])
        theta = torch.zeros((n, 2, 3), device=x.device, dtype=x.dtype)
        theta[:, 0, 0] = theta[:, 1, 1] = 1
        theta[:, 0, 2], theta[:, 1, 2] = t * torch.cos(angle), t * torch.sin(angle)
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        total = total + F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return total / steps


def low_resolution(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """A small or distant digit: down to 9, 12 or 15 px (each image its own), then back up."""
    which = torch.randint(3, (x.shape[0],), generator=g, device=g.device).to(x.device)
    out = x
    for k, size in enumerate((9, 12, 15)):
        small = F.interpolate(x, size=(size, size), mode="area")
        up = F.interpolate(small, size=x.shape[-2:], mode="bilinear", align_corners=False)
        out = torch.where(_per_image(which == k), up, out)
    return out


def gaussian_noise(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Sensor noise: sigma 0.05-0.35."""
    sigma = _per_image(_uniform(x.shape[0], 0.05, 0.35, g, x.device))
    return x + sigma * torch.randn(x.shape, generator=g, device=g.device).to(x.device)


def shot_noise(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Photon (Poisson-like) noise: variance proportional to the level, 5-60 photons for full ink."""
    photons = _per_image(_uniform(x.shape[0], 5, 60, g, x.device))
    noise = torch.randn(x.shape, generator=g, device=g.device).to(x.device)
    return x + noise * torch.sqrt((x + 0.02) / photons)


def salt_and_pepper(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Dust and dead pixels: 2-15% of pixels set to 0 or 1."""
    amount = _per_image(_uniform(x.shape[0], 0.02, 0.15, g, x.device))
    draw = torch.rand(x.shape, generator=g, device=g.device).to(x.device)
    salt = torch.rand(x.shape, generator=g, device=g.device).to(x.device) < 0.5
    hit = draw < amount
    return torch.where(hit, salt.to(x.dtype), x)


def contrast_and_paper(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Grey paper and faded ink: background 0-0.45, ink reaching 0.35-1 above it."""
    n = x.shape[0]
    paper = _per_image(_uniform(n, 0.0, 0.45, g, x.device))
    ink = _per_image(_uniform(n, 0.35, 1.0, g, x.device))
    return paper + x * ink * (1 - paper)


def fog(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Uneven light or haze: a smooth random field of 0.2-0.6 added."""
    n, _, h, w = x.shape
    coarse = torch.rand((n, 1, 3, 3), generator=g, device=g.device).to(x.device)
    field = F.interpolate(coarse, size=(h, w), mode="bicubic", align_corners=False).clamp(0, 1)
    return x + field * _per_image(_uniform(n, 0.2, 0.6, g, x.device))


def _random_boxes(
    x: torch.Tensor, g: torch.Generator, min_frac: float, max_frac: float, central: bool = False
) -> torch.Tensor:
    """A random axis-aligned box per image, as a (N, 1, H, W) 0/1 mask; `central`: within the middle 60%, where
    MNIST's ink is."""
    n, _, h, w = x.shape
    bh = (_uniform(n, min_frac, max_frac, g, x.device) * h).round()
    bw = (_uniform(n, min_frac, max_frac, g, x.device) * w).round()
    margin = 0.2 if central else 0.0
    top = (margin * h + _uniform(n, 0, 1, g, x.device) * ((1 - 2 * margin) * h - bh).clamp_min(0)).floor()
    left = (margin * w + _uniform(n, 0, 1, g, x.device) * ((1 - 2 * margin) * w - bw).clamp_min(0)).floor()
    rows = torch.arange(h, device=x.device, dtype=x.dtype)[None, :, None]
    cols = torch.arange(w, device=x.device, dtype=x.dtype)[None, None, :]
    inside = (
        (rows >= top[:, None, None])
        & (rows < (top + bh)[:, None, None])
        & (cols >= left[:, None, None])
        & (cols < (left + bw)[:, None, None])
    )
    return inside.unsqueeze(1).to(x.dtype)


def partial_inversion(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """A shadow or a highlighter stripe: ink and paper swapped inside a box covering 20-60% of a side."""
    box = _random_boxes(x, g, 0.2, 0.6)
    return box * (1 - x) + (1 - box) * x


def occlusion(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """A finger, a sticker or a fold: a box of 15-35% of a side painted paper or ink grey."""
    box = _random_boxes(x, g, 0.15, 0.35, central=True)
    n = x.shape[0]
    grey = _uniform(n, 0, 1, g, x.device)
    paper = _uniform(n, 0, 1, g, x.device) < 0.7
    paint = _per_image(torch.where(paper, torch.zeros_like(grey), grey))
    return box * paint + (1 - box) * x


def stray_lines(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Ruled paper, a crossing stroke or a scribble: one to three pen lines 1-2 px wide anywhere."""
    n, _, h, w = x.shape
    rows = torch.arange(h, device=x.device, dtype=x.dtype).view(1, h, 1)
    cols = torch.arange(w, device=x.device, dtype=x.dtype).view(1, 1, w)
    out = x
    start = torch.stack([_uniform(n, 0, h - 1, g, x.device), _uniform(n, 0, w - 1, g, x.device)], 1)
    for segment in range(3):  # a zigzag: each segment starts where the last ended; the 2nd and 3rd are optional
        end = torch.stack([_uniform(n, 0, h - 1, g, x.device), _uniform(n, 0, w - 1, g, x.device)], 1)
        d = end - start
        length2 = (d**2).sum(1).clamp_min(1e-6)
        t = (
            ((rows - start[:, 0, None, None]) * d[:, 0, None, None])
            + (cols - start[:, 1, None, None]) * d[:, 1, None, None]
        ) / length2[:, None, None]
        t = t.clamp(0, 1)
        dist = torch.sqrt(
            (rows - start[:, 0, None, None] - t * d[:, 0, None, None]) ** 2
            + (cols - start[:, 1, None, None] - t * d[:, 1, None, None]) ** 2
        )
        width = _uniform(n, 0.5, 1.2, g, x.device)[:, None, None]
        intensity = _uniform(n, 0.5, 1.0, g, x.device)[:, None, None]
        if segment:
            intensity = intensity * (_uniform(n, 0, 1, g, x.device) < 0.5)[:, None, None]
        line = (intensity * (1 - dist / width).clamp(0, 1)).unsqueeze(1)
        out = torch.maximum(out, line)
        start = end
    return out


def edges_only(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """An outlined or embossed digit: the Sobel gradient magnitude, rescaled to full ink."""
    sobel = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]], device=x.device, dtype=x.dtype)
    kernels = torch.stack([sobel, sobel.t()]).unsqueeze(1)
    grad = F.conv2d(x, kernels, padding=1)
    magnitude = torch.sqrt((grad**2).sum(1, keepdim=True) + 1e-12)
    return magnitude / magnitude.flatten(1).amax(1).clamp_min(1e-6).view(-1, 1, 1, 1)


# Training augmentation (torch, on batches): damage mixed into training so the model learns to read it. Not the
# held-out suite (training/corruptions.py HELD_OUT_CORRUPTIONS), whose kinds and settings differ on purpose.
AUGMENT_CORRUPTIONS: dict[str, Augmentation] = {
    "thicker": thicker,
    "thinner": thinner,
    "blur": blur,
    "motion_blur": motion_blur,
    "low_resolution": low_resolution,
    "gaussian_noise": gaussian_noise,
    "shot_noise": shot_noise,
    "salt_and_pepper": salt_and_pepper,
    "contrast_and_paper": contrast_and_paper,
    "fog": fog,
    "partial_inversion": partial_inversion,
    "occlusion": occlusion,
    "stray_lines": stray_lines,
    "edges_only": edges_only,
}


@dataclass(frozen=True)
class Recipe:
    """How hard a recipe warps every image, and how often it corrupts one."""

    max_rotation_deg: float
    max_scale: float
    max_shift_px: float
    max_shear: float = 0.0
    elastic_pixels: float = 0.0
    corruption_probability: float = 0.0


AUGMENTATIONS: dict[str, Recipe] = {
    "basic": Recipe(max_rotation_deg=10.0, max_scale=0.1, max_shift_px=2.0),
    "robust": Recipe(
        max_rotation_deg=15.0,
        max_scale=0.15,
        max_shift_px=3.0,
        max_shear=0.2,
        elastic_pixels=1.0,
        corruption_probability=0.3,
    ),
    # Measured on the 2-core CPU, googlenet-fast, 6 epochs: 99.24% clean test accuracy (robust: see docs/training.md).
    "strong": Recipe(
        max_rotation_deg=25.0,
        max_scale=0.25,
        max_shift_px=4.0,
        max_shear=0.3,
        elastic_pixels=1.5,
        corruption_probability=0.5,
    ),
}


def corrupt_some(x: torch.Tensor, generator: torch.Generator, probability: float) -> torch.Tensor:
    """Give `probability` of the images one corruption each (a quarter of those a second one), every kind an equal
    share. Every kind runs on the whole batch and is kept where drawn: no data-dependent shapes, so no host sync
    on a GPU and nothing that a CUDA graph or the `meta` device cannot follow."""
    if probability <= 0:
        return x
    n = x.shape[0]
    kinds = list(AUGMENT_CORRUPTIONS.values())
    for round_probability in (probability, probability / 4):
        chosen = torch.rand(n, generator=generator, device=generator.device).to(x.device) < round_probability
        which = torch.randint(len(kinds), (n,), generator=generator, device=generator.device).to(x.device)
        out = x
        for k, function in enumerate(kinds):
            picked = _per_image(chosen & (which == k))
            out = torch.where(picked, function(x, generator).clamp(0, 1), out)
        x = out
    return x


def augment(x: torch.Tensor, generator: torch.Generator, recipe: Recipe) -> torch.Tensor:
    """The recipe on a batch of (N, 1, H, W) floats in [0, 1]: warp, wobble, then corrupt some images."""
    x = random_affine(x, generator, recipe.max_rotation_deg, recipe.max_scale, recipe.max_shift_px, recipe.max_shear)
    if recipe.elastic_pixels:
        x = elastic(x, generator, recipe.elastic_pixels)
    return corrupt_some(x, generator, recipe.corruption_probability)
