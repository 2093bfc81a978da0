"""training.augment: batched warps and photo/scan corruptions, on whatever device the batch lives."""

from __future__ import annotations

import pytest
import torch

from training.augment import AUGMENT_CORRUPTIONS, AUGMENTATIONS, augment, corrupt_some, elastic, random_affine
from training.data import load_split


@pytest.fixture(scope="module")
def digits() -> torch.Tensor:
    """64 MNIST test digits as (N, 1, 28, 28) floats in [0, 1]."""
    images = load_split("test").images[:64].copy()
    return torch.from_numpy(images).unsqueeze(1).float() / 255


def generator(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def centre_of_mass(x: torch.Tensor) -> torch.Tensor:
    rows = torch.arange(28.0).view(1, 28, 1)
    cols = torch.arange(28.0).view(1, 1, 28)
    ink = x.squeeze(1).clamp_min(0)
    total = ink.sum((1, 2))
    return torch.stack([(ink * rows).sum((1, 2)) / total, (ink * cols).sum((1, 2)) / total], 1)


@pytest.mark.parametrize("kind", sorted(AUGMENT_CORRUPTIONS))
def test_every_corruption_changes_the_digits_and_keeps_the_batch_shape(digits: torch.Tensor, kind: str) -> None:
    out = AUGMENT_CORRUPTIONS[kind](digits, generator()).clamp(0, 1)
    assert out.shape == digits.shape and out.dtype == digits.dtype
    changed = (out - digits).abs().flatten(1).amax(1) > 0.05
    assert changed.float().mean() > 0.9, f"{kind} left most digits as they were"


def test_there_are_at_least_twelve_corruption_kinds() -> None:
    assert len(AUGMENT_CORRUPTIONS) >= 12


def test_the_same_seed_gives_the_same_augmented_batch_and_another_seed_another(digits: torch.Tensor) -> None:
    recipe = AUGMENTATIONS["robust"]
    first, again, other = (augment(digits, generator(s), recipe) for s in (7, 7, 8))
    assert torch.equal(first, again)
    assert not torch.allclose(first, other)


def test_robust_augmentation_stays_in_the_unit_range(digits: torch.Tensor) -> None:
    out = augment(digits, generator(1), AUGMENTATIONS["robust"])
    assert out.min() >= 0 and out.max() <= 1


def test_corrupt_some_touches_about_the_asked_share_of_images(digits: torch.Tensor) -> None:
    batch = digits.repeat(8, 1, 1, 1)  # 512 images
    out = corrupt_some(batch, generator(2), 0.5)
    touched = ((out - batch).abs().flatten(1).amax(1) > 1e-6).float().mean().item()
    assert 0.4 < touched < 0.65  # 50%, a few untouched by a mild draw, a few hit in the second round only
    assert torch.equal(corrupt_some(batch, generator(2), 0.0), batch)


def test_thicker_strokes_add_ink_and_thinner_ones_remove_it(digits: torch.Tensor) -> None:
    ink = digits.sum()
    assert AUGMENT_CORRUPTIONS["thicker"](digits, generator()).sum() > 1.5 * ink
    assert AUGMENT_CORRUPTIONS["thinner"](digits, generator()).sum() < 0.7 * ink


def test_partial_inversion_turns_paper_into_ink_inside_a_box(digits: torch.Tensor) -> None:
    out = AUGMENT_CORRUPTIONS["partial_inversion"](digits, generator())
    white_paper = ((out > 0.9) & (digits < 0.1)).flatten(1).sum(1)
    assert (white_paper >= 4).all() and white_paper.float().mean() > 40


def test_the_affine_warp_moves_digits_and_the_basic_recipe_moves_them_less_than_the_robust_one(
    digits: torch.Tensor,
) -> None:
    before = centre_of_mass(digits)
    basic = random_affine(digits, generator(3), 10, 0.1, 2)
    robust = random_affine(digits, generator(3), 25, 0.25, 4, 0.3)
    moved_basic = (centre_of_mass(basic) - before).norm(dim=1).mean()
    moved_robust = (centre_of_mass(robust) - before).norm(dim=1).mean()
    assert 0.3 < moved_basic < moved_robust
    assert torch.equal(random_affine(digits, generator(), 0, 0, 0), digits)


def test_elastic_wobble_keeps_the_digit_where_it_was(digits: torch.Tensor) -> None:
    out = elastic(digits, generator(4), 1.5)
    assert not torch.allclose(out, digits)
    assert (centre_of_mass(out) - centre_of_mass(digits)).norm(dim=1).max() < 2.0


def test_augmentation_runs_on_the_meta_device(digits: torch.Tensor) -> None:
    """Nothing in the recipe may mix a CPU tensor into a batch that lives elsewhere (the bug that stopped GPU runs).
    On `meta` only shapes flow, so the generator stays on the CPU and every draw must move to the batch's device."""
    batch = torch.empty((16, 1, 28, 28), device="meta")
    out = augment(batch, generator(5), AUGMENTATIONS["robust"])
    assert out.shape == batch.shape and out.device.type == "meta"
