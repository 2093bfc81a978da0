"""The corruption suite: every kind is a seeded, shape-keeping change, and each does what its name says."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from training.corruptions import HELD_OUT_CORRUPTIONS, Corruption, corrupt
from training.data import REPO_ROOT, load_split

KINDS = list(HELD_OUT_CORRUPTIONS)


@pytest.fixture(scope="module")
def test_set(mnist_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    test = load_split("test", mnist_dir)
    return test.images[:64].copy(), test.labels[:64].copy()


@pytest.fixture(scope="module")
def digits(test_set: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    return test_set[0]


def centre_of_mass(images: np.ndarray) -> np.ndarray:
    """(N, 2) ink-weighted (y, x) centres."""
    weights = images.astype(np.float64)
    yy, xx = np.mgrid[0:28, 0:28]
    total = weights.sum(axis=(1, 2))
    return np.stack([(weights * yy).sum(axis=(1, 2)) / total, (weights * xx).sum(axis=(1, 2)) / total], axis=1)


def principal_axis_degrees(images: np.ndarray) -> np.ndarray:
    """Angle of each image's ink's principal axis (second moments), in [0, 180)."""
    weights = images.astype(np.float64)
    yy, xx = np.mgrid[0:28, 0:28]
    total = weights.sum(axis=(1, 2))
    cy, cx = centre_of_mass(images).T
    dy, dx = yy[None] - cy[:, None, None], xx[None] - cx[:, None, None]
    syy = (weights * dy * dy).sum(axis=(1, 2)) / total
    sxx = (weights * dx * dx).sum(axis=(1, 2)) / total
    sxy = (weights * dx * dy).sum(axis=(1, 2)) / total
    return np.degrees(0.5 * np.arctan2(2 * sxy, sxx - syy)) % 180


def over_3x3(images: np.ndarray, reduce: np.ufunc) -> np.ndarray:
    """`reduce` (np.maximum, np.minimum) over each pixel's 3x3 neighbourhood, zero outside the frame."""
    padded = np.pad(images, ((0, 0), (1, 1), (1, 1)))
    windows = np.lib.stride_tricks.sliding_window_view(padded, (3, 3), axis=(1, 2))
    return reduce.reduce(windows.reshape(*images.shape, 9), axis=-1)


def high_frequency_share(images: np.ndarray) -> np.ndarray:
    """Fraction of each image's spectral energy above 0.3 cycles per pixel (its mean removed)."""
    centred = images.astype(np.float64) - images.mean(axis=(1, 2), keepdims=True)
    power = np.abs(np.fft.fft2(centred)) ** 2
    f = np.fft.fftfreq(28)
    high = np.hypot(f[:, None], f[None, :]) > 0.3
    return power[:, high].sum(axis=1) / power.sum(axis=(1, 2))


# --- every kind ------------------------------------------------------------------------------------


def test_the_suite_has_at_least_14_kinds_each_described_in_one_line() -> None:
    assert len(HELD_OUT_CORRUPTIONS) >= 14
    for name, corruption in HELD_OUT_CORRUPTIONS.items():
        assert isinstance(corruption, Corruption)
        assert name.isidentifier() and name != "clean"
        assert corruption.description and "\n" not in corruption.description


@pytest.mark.parametrize("kind", KINDS)
def test_each_kind_keeps_shape_and_dtype_and_changes_almost_every_image(digits: np.ndarray, kind: str) -> None:
    before = digits.copy()
    out = corrupt(digits, kind, seed=0)
    assert out.shape == digits.shape and out.dtype == np.uint8
    assert np.array_equal(digits, before), "the input must not be modified"
    changed = (out != digits).any(axis=(1, 2))
    assert changed.mean() >= 0.9, f"{kind} changed only {changed.sum()} of {len(digits)} images"


@pytest.mark.parametrize("kind", KINDS)
def test_each_kind_is_deterministic_per_seed_and_differs_across_seeds(digits: np.ndarray, kind: str) -> None:
    first = corrupt(digits, kind, seed=3)
    np.random.seed(12345)  # global numpy state and other kinds run in between must not matter
    corrupt(digits, KINDS[(KINDS.index(kind) + 1) % len(KINDS)], seed=3)
    assert np.array_equal(corrupt(digits, kind, seed=3), first)
    assert not np.array_equal(corrupt(digits, kind, seed=4), first)


def test_results_do_not_depend_on_python_hash_randomization(digits: np.ndarray) -> None:
    """The kind's name is hashed with CRC-32, not `hash()`: another interpreter with another hash seed agrees."""
    code = (
        "import sys, hashlib, numpy as np; from training.corruptions import corrupt; "
        "x = np.frombuffer(sys.stdin.buffer.read(), np.uint8).reshape(-1, 28, 28); "
        "print(hashlib.sha256(corrupt(x, 'rotation', 7).tobytes() + corrupt(x, 'stray_lines', 7).tobytes())"
        ".hexdigest())"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        input=digits[:8].tobytes(),
        capture_output=True,
        cwd=REPO_ROOT,
        env={"PYTHONHASHSEED": "987", "PATH": ""},
        check=True,
    )
    import hashlib

    here = corrupt(digits[:8], "rotation", 7).tobytes() + corrupt(digits[:8], "stray_lines", 7).tobytes()
    assert result.stdout.decode().strip() == hashlib.sha256(here).hexdigest()


def test_unknown_kind_is_a_value_error_listing_the_known_kinds(digits: np.ndarray) -> None:
    with pytest.raises(ValueError, match="unknown corruption kind 'sepia'") as error:
        corrupt(digits, "sepia", seed=0)
    for kind in KINDS:
        assert kind in str(error.value)


@pytest.mark.parametrize(
    "bad", [np.zeros((4, 28, 28), np.float32), np.zeros((28, 28), np.uint8), np.zeros((2, 32, 32), np.uint8)]
)
def test_images_that_are_not_uint8_n_28_28_are_refused(bad: np.ndarray) -> None:
    with pytest.raises(ValueError, match="uint8"):
        corrupt(bad, "rotation", seed=0)


# --- each kind does what it says -------------------------------------------------------------------


def test_rotation_turns_the_inks_principal_axis_by_30_to_45_degrees(mnist_dir: Path) -> None:
    test = load_split("test", mnist_dir)
    ones = test.images[test.labels == 1][:40]  # elongated digits: a well-defined principal axis
    turned = np.abs(principal_axis_degrees(corrupt(ones, "rotation", seed=0)) - principal_axis_degrees(ones))
    turned = np.minimum(turned, 180 - turned)
    assert np.all((turned > 25) & (turned < 50)), np.round(turned, 1)
    assert np.abs(ones.sum() - corrupt(ones, "rotation", seed=0).astype(np.int64).sum()) / ones.sum() < 0.05


def test_thick_strokes_add_ink_and_thin_strokes_remove_it(digits: np.ndarray) -> None:
    ink = digits.astype(np.int64).sum(axis=(1, 2))
    thick = corrupt(digits, "thick_strokes", seed=0).astype(np.int64).sum(axis=(1, 2))
    thin = corrupt(digits, "thin_strokes", seed=0).astype(np.int64).sum(axis=(1, 2))
    assert np.all(thick > 1.3 * ink)
    assert np.all(thin < ink) and np.median(thin / ink) < 0.8
    assert np.all(thin > 0.25 * ink), "thinner, not erased"


def test_low_resolution_removes_high_frequencies(digits: np.ndarray) -> None:
    before = high_frequency_share(digits)
    after = high_frequency_share(corrupt(digits, "low_resolution", seed=0))
    assert np.mean(after / before) < 0.2
    assert np.all(after < 0.5 * before)


def test_translate_moves_whole_digits_by_whole_pixels_and_keeps_every_ink_pixel(digits: np.ndarray) -> None:
    moved = corrupt(digits, "translate", seed=0)
    shift = np.rint(centre_of_mass(moved) - centre_of_mass(digits)).astype(int)
    assert np.all(np.hypot(*shift.T) >= 2), "off-centre by several pixels"
    assert np.mean(np.hypot(*shift.T)) >= 3
    for original, out, (dy, dx) in zip(digits, moved, shift, strict=True):
        assert out.astype(np.int64).sum() == original.astype(np.int64).sum(), "no ink left the frame"
        assert np.array_equal(out, np.roll(original, (dy, dx), axis=(0, 1))), "the same digit, only moved"


def test_scale_shrinks_the_ink_to_about_half_or_two_thirds(digits: np.ndarray) -> None:
    def height(images: np.ndarray) -> np.ndarray:
        rows = (images > 64).any(axis=2)
        return 28 - np.argmax(rows[:, ::-1], axis=1) - np.argmax(rows, axis=1)

    ratio = height(corrupt(digits, "scale", seed=0)) / height(digits)
    assert np.all((ratio > 0.4) & (ratio < 0.8)), np.round(ratio, 2)


def test_impulse_noise_sets_a_few_percent_of_pixels_to_black_or_white(digits: np.ndarray) -> None:
    out = corrupt(digits, "impulse_noise", seed=0)
    changed = out != digits
    assert set(np.unique(out[changed])) <= {0, 255}
    assert 0.01 < changed.mean() < 0.08


def test_background_turns_the_black_paper_grey_and_keeps_the_digit_brightest(digits: np.ndarray) -> None:
    out = corrupt(digits, "background", seed=0)
    paper = digits == 0
    for image, blank in zip(out, paper, strict=True):
        assert 20 <= np.median(image[blank]) <= 140
    assert np.all(out >= digits), "grey paper lightens, it never darkens the ink"
    assert np.all(out[digits == 255] == 255)


def test_inverted_stripe_negates_one_band_and_leaves_the_rest(digits: np.ndarray) -> None:
    out = corrupt(digits, "inverted_stripe", seed=0)
    for original, image in zip(digits, out, strict=True):
        negated = image.astype(int) == 255 - original.astype(int)
        kept = image == original
        assert np.all(negated | kept)
        rows, columns = negated.all(axis=1), negated.all(axis=0)
        band = rows if rows.sum() >= columns.sum() else columns
        assert 7 <= band.sum() <= 12, "a full-width band, 7 to 12 px"
        assert np.array_equal(np.flatnonzero(band), np.arange(band.argmax(), band.argmax() + band.sum()))


def test_occlusion_covers_one_rectangle_over_the_digit(digits: np.ndarray) -> None:
    out = corrupt(digits, "occlusion", seed=0)
    for original, image in zip(digits, out, strict=True):
        ys, xs = np.nonzero(image != original)
        assert ys.max() - ys.min() < 11 and xs.max() - xs.min() < 11
        box = image[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]
        assert len(np.unique(box)) == 1, "a filled rectangle"


def test_stray_lines_only_add_ink(digits: np.ndarray) -> None:
    out = corrupt(digits, "stray_lines", seed=0)
    assert np.all(out >= digits)
    added = (out > digits).sum(axis=(1, 2))
    assert np.all(added >= 8) and np.mean(added) >= 25, "lines at least half the frame long (some over the digit)"


def test_edges_only_draws_a_binary_outline_around_the_strokes(digits: np.ndarray) -> None:
    bold = corrupt(digits, "thick_strokes", seed=0)  # strokes with an inside
    out = corrupt(bold, "edges_only", seed=0)
    assert set(np.unique(out)) <= {0, 255}
    edge = out == 255
    near_ink = over_3x3(bold, np.maximum) > 0
    inside = over_3x3(bold, np.minimum) == 255  # saturated, and so are all 8 neighbours
    assert not edge[~near_ink].any(), "nothing drawn away from the strokes"
    assert inside.sum() > 100 and not edge[inside].any(), "the inside of the strokes is hollow"
    assert (edge & (bold == 0)).sum() > 0.15 * edge.sum(), "the outline runs along the outside of the strokes too"


def test_noise_kinds_leave_the_digit_recognisable(digits: np.ndarray) -> None:
    for kind in ("gaussian_noise", "shot_noise", "jpeg"):
        out = corrupt(digits, kind, seed=0).astype(np.float64)
        for original, image in zip(digits.astype(np.float64), out, strict=True):
            assert np.corrcoef(original.ravel(), image.ravel())[0, 1] > 0.6, kind
