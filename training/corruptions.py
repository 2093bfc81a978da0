"""A seeded corruption suite of MNIST-test images, in the spirit of MNIST-C (Mu & Gilmer, 2019).

Clean-test accuracy says little about the digits people actually send: photos and scans of
handwriting, with noise, blur, grey paper, slanted or off-centre writing, stray pen lines.
Each kind below turns (N, 28, 28) uint8 images (light digit on dark, as MNIST) into images of
the same shape and type, drawing every image's own parameters from the generator it is given.
One fixed severity per kind, chosen to look like real photos and scans rather than to break the
model; where a photo is meant, remember MNIST's convention: paper is black and ink is white.

numpy and Pillow only. `corrupt(images, kind, seed)` is the entry point: the same (kind, seed)
gives the same images whatever ran before, because the generator is derived from the seed and a
stable hash (CRC-32) of the kind's name, never from Python's salted `hash()` or global state.
"""

from __future__ import annotations

import io
import zlib
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from proto.contract import IMAGE_SIDE

CorruptionFunction = Callable[[np.ndarray, np.random.Generator], np.ndarray]

SIDE = IMAGE_SIDE
CENTRE = (SIDE - 1) / 2  # the frame's centre in pixel coordinates: affine warps turn about it
_YY, _XX = np.mgrid[0:SIDE, 0:SIDE].astype(np.float32)


@dataclass(frozen=True)
class Corruption:
    """One kind of corruption: what it does to a batch, and a line saying so for reports."""

    function: CorruptionFunction
    description: str

    def __call__(self, images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        return self.function(images, rng)


# --- helpers -----------------------------------------------------------------------------------


def _to_uint8(values: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(values), 0, 255).astype(np.uint8)


def _per_image(values: np.ndarray) -> np.ndarray:
    """(N,) parameters shaped (N, 1, 1) to broadcast over each image's pixels."""
    return np.asarray(values, np.float32)[:, None, None]


def _signed(rng: np.random.Generator, n: int, low: float, high: float) -> np.ndarray:
    """Magnitudes in [low, high] with a random sign: 'either way' parameters such as rotation angles."""
    return rng.uniform(low, high, n) * rng.choice((-1.0, 1.0), n)


def _sample(images: np.ndarray, ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
    """Bilinear sampling of every image at its own (N, 28, 28) source coordinates; outside the frame is black.

    One vectorized gather for the whole batch: every geometric kind (affine, elastic, motion) is a warp.
    """
    n = len(images)
    side = SIDE + 2  # one black pixel of padding all round, so sampling off the frame reads zeros
    padded = np.zeros((n, side, side), np.float32)
    padded[:, 1:-1, 1:-1] = images
    ys = np.clip(np.asarray(ys, np.float32) + 1, 0, side - 1)
    xs = np.clip(np.asarray(xs, np.float32) + 1, 0, side - 1)
    y0 = np.minimum(np.floor(ys).astype(np.intp), side - 2)
    x0 = np.minimum(np.floor(xs).astype(np.intp), side - 2)
    wy, wx = ys - y0, xs - x0
    flat = padded.ravel()
    index = np.arange(n, dtype=np.intp)[:, None, None] * side * side + y0 * side + x0
    top = flat[index] * (1 - wx) + flat[index + 1] * wx
    bottom = flat[index + side] * (1 - wx) + flat[index + side + 1] * wx
    return top * (1 - wy) + bottom * wy


def _affine(images: np.ndarray, matrices: np.ndarray, shifts: np.ndarray | None = None) -> np.ndarray:
    """Warp each image: output pixel p reads source `matrices[i] @ (p - centre) + centre - shifts[i]`.

    `matrices` (N, 2, 2) act on (y, x) and are the inverse of the visible transform; `shifts` (N, 2) in pixels.
    """
    dy, dx = _YY - CENTRE, _XX - CENTRE
    m = matrices.astype(np.float32)
    ys = _per_image(m[:, 0, 0]) * dy + _per_image(m[:, 0, 1]) * dx + CENTRE
    xs = _per_image(m[:, 1, 0]) * dy + _per_image(m[:, 1, 1]) * dx + CENTRE
    if shifts is not None:
        ys = ys - _per_image(shifts[:, 0])
        xs = xs - _per_image(shifts[:, 1])
    return _sample(images.astype(np.float32), ys, xs)


def _upsampling_matrix(grid: int) -> np.ndarray:
    """(28, grid) weights interpolating a coarse grid to the full frame (pixel centres aligned).

    Smoothstep rather than linear weights: the field has no creases at the coarse grid's lines.
    """
    position = np.clip((np.arange(SIDE) + 0.5) * grid / SIDE - 0.5, 0, grid - 1)
    low = np.minimum(np.floor(position).astype(int), grid - 2)
    weight = position - low
    weight = weight * weight * (3 - 2 * weight)
    matrix = np.zeros((SIDE, grid), np.float32)
    matrix[np.arange(SIDE), low] = 1 - weight
    matrix[np.arange(SIDE), low + 1] = weight
    return matrix


def _smooth_field(rng: np.random.Generator, n: int, grid: int) -> np.ndarray:
    """(N, 28, 28) smooth random fields: standard normal values on a coarse grid, interpolated to the frame."""
    up = _upsampling_matrix(grid)
    coarse = rng.standard_normal((n, grid, grid)).astype(np.float32)
    return np.einsum("ij,njk,lk->nil", up, coarse, up, optimize=True)


def _shift(images: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """Whole-pixel shift of a batch, zero-filled: the building block of the morphological kinds."""
    out = np.zeros_like(images)
    ys, yd = (slice(0, SIDE - dy), slice(dy, SIDE)) if dy >= 0 else (slice(-dy, SIDE), slice(0, SIDE + dy))
    xs, xd = (slice(0, SIDE - dx), slice(dx, SIDE)) if dx >= 0 else (slice(-dx, SIDE), slice(0, SIDE + dx))
    out[:, yd, xd] = images[:, ys, xs]
    return out


def _morphology(images: np.ndarray, offsets: list[tuple[int, int]], operation: Callable) -> np.ndarray:
    """Grey-level dilation (`np.maximum`) or erosion (`np.minimum`) with the structuring element `offsets`."""
    result = _shift(images, *offsets[0])
    for dy, dx in offsets[1:]:
        result = operation(result, _shift(images, dy, dx))
    return result


def _per_image_choice(rng: np.random.Generator, variants: list[np.ndarray]) -> np.ndarray:
    """Pick one of several whole-batch results for each image independently."""
    pick = rng.integers(0, len(variants), len(variants[0]))
    return np.choose(pick[:, None, None], variants)


def _with_pillow(images: np.ndarray, transform: Callable[[Image.Image, int], Image.Image]) -> np.ndarray:
    """Run a Pillow operation image by image (`transform(image, index)`): for what numpy cannot batch."""
    out = np.empty_like(images)
    for i, pixels in enumerate(images):
        out[i] = np.asarray(transform(Image.fromarray(pixels, mode="L"), i), np.uint8)
    return out


def _ink_bounds(images: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """First and last row (axis=2) or column (axis=1) holding any ink, per image; (0, 27) for a blank one."""
    occupied = images.any(axis=axis)
    first = np.argmax(occupied, axis=1)
    last = SIDE - 1 - np.argmax(occupied[:, ::-1], axis=1)
    blank = ~occupied.any(axis=1)
    return np.where(blank, 0, first), np.where(blank, SIDE - 1, last)


# --- noise ---------------------------------------------------------------------------------------


def gaussian_noise(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Sensor noise of a dim photo: additive, sigma 30..50 grey levels per image."""
    sigma = _per_image(rng.uniform(30, 50, len(images)))
    return _to_uint8(images + sigma * rng.standard_normal(images.shape, np.float32))


def shot_noise(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Photon noise of the photo before inversion: bright paper collects the photons, so the background is noisy."""
    photons = _per_image(rng.uniform(15, 40, len(images)))  # photons a white paper pixel collects
    paper = (255 - images.astype(np.float32)) / 255
    counted = rng.poisson(paper * photons) / photons
    return _to_uint8(255 - counted * 255)


def impulse_noise(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Salt and pepper: 3..8% of the pixels of each image stuck at black or white (dust, dead pixels)."""
    fraction = _per_image(rng.uniform(0.03, 0.08, len(images)))
    hit = rng.random(images.shape, np.float32) < fraction
    salt = rng.random(images.shape, np.float32) < 0.5
    return np.where(hit, np.where(salt, 255, 0), images).astype(np.uint8)


# --- blur and resolution -------------------------------------------------------------------------


def gaussian_blur(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Out of focus: Gaussian blur of radius 1.0..1.6 px."""
    radius = rng.uniform(1.0, 1.6, len(images))
    return _with_pillow(images, lambda image, i: image.filter(ImageFilter.GaussianBlur(float(radius[i]))))


def motion_blur(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Camera shake: a straight streak 4..8 px long in any direction (nine samples along it)."""
    n = len(images)
    length = _per_image(rng.uniform(4, 8, n))
    angle = rng.uniform(0, np.pi, n)
    step_y, step_x = _per_image(np.sin(angle)) * length, _per_image(np.cos(angle)) * length
    pixels = images.astype(np.float32)
    total = np.zeros(images.shape, np.float32)
    for t in np.linspace(-0.5, 0.5, 9, dtype=np.float32):
        total += _sample(pixels, _YY + t * step_y, _XX + t * step_x)
    return _to_uint8(total / 9)


def low_resolution(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A small, far-away digit: area-averaged down to 10..14 px square, then bilinearly back up to 28."""
    size = rng.integers(10, 15, len(images))
    return _with_pillow(
        images,
        lambda image, i: image.resize((int(size[i]),) * 2, Image.Resampling.BOX).resize(
            (SIDE, SIDE), Image.Resampling.BILINEAR
        ),
    )


def jpeg(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Chat-app compression: JPEG at quality 6..15 (8x8 blocks, ringing around the strokes)."""
    quality = rng.integers(6, 16, len(images))

    def compress(image: Image.Image, i: int) -> Image.Image:
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=int(quality[i]))
        buffer.seek(0)
        return Image.open(buffer).convert("L")

    return _with_pillow(images, compress)


# --- lighting and paper --------------------------------------------------------------------------


def contrast(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Faint pencil: contrast cut to 25..45% about each image's mean grey level."""
    factor = _per_image(rng.uniform(0.25, 0.45, len(images)))
    pixels = images.astype(np.float32)
    mean = pixels.mean(axis=(1, 2), keepdims=True)
    return _to_uint8(mean + (pixels - mean) * factor)


def fog(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Glare and haze: a smooth random veil, up to 35..60% of the way to white, that fades the strokes unevenly."""
    n = len(images)
    veil = _smooth_field(rng, n, 3) + 0.5 * _smooth_field(rng, n, 6)
    low, high = veil.min(axis=(1, 2), keepdims=True), veil.max(axis=(1, 2), keepdims=True)
    veil = (veil - low) / np.maximum(high - low, 1e-6) * _per_image(rng.uniform(0.35, 0.6, n))
    pixels = images.astype(np.float32)
    return _to_uint8(pixels + (255 - pixels) * veil)


def background(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Grey paper under uneven light: background level 50..110 with a +-0..30 gradient across the frame."""
    n = len(images)
    level = _per_image(rng.uniform(50, 110, n))
    direction = rng.uniform(0, 2 * np.pi, n)
    slope = _per_image(rng.uniform(0, 30, n)) / CENTRE
    paper = level + slope * (
        _per_image(np.cos(direction)) * (_XX - CENTRE) + _per_image(np.sin(direction)) * (_YY - CENTRE)
    )
    paper = np.clip(paper, 0, 255)
    return _to_uint8(paper + images * (1 - paper / 255))


def inverted_stripe(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Partial inversion: a band 7..12 px wide across the digit (a shadow edge, a highlighter) in negative."""
    n = len(images)
    width = _per_image(rng.integers(7, 13, n))
    start = _per_image(rng.integers(4, 25 - width[:, 0, 0].astype(int)))
    vertical = _per_image(rng.random(n) < 0.5).astype(bool)
    coordinate = np.where(vertical, _XX, _YY)
    inside = (coordinate >= start) & (coordinate < start + width)
    return np.where(inside, 255 - images, images).astype(np.uint8)


# --- things in the way ---------------------------------------------------------------------------


def occlusion(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A 7..11 px rectangle over part of the digit: paper (black) or a finger or pen cap (grey to white)."""
    n = len(images)
    flat = images.reshape(n, -1) > 64
    counts = flat.sum(axis=1)
    chosen = np.floor(rng.random(n) * counts).astype(int)  # a random inked pixel is the rectangle's centre
    centre = np.argmax(np.cumsum(flat, axis=1) > chosen[:, None], axis=1)
    cy, cx = _per_image(centre // SIDE), _per_image(centre % SIDE)
    height, width = _per_image(rng.integers(7, 12, n)), _per_image(rng.integers(7, 12, n))
    top, left = cy - height // 2, cx - width // 2
    inside = (_YY >= top) & (_YY < top + height) & (_XX >= left) & (_XX < left + width)
    fill = np.where(rng.random(n) < 0.5, 0, rng.integers(128, 256, n))
    return np.where(inside, _per_image(fill), images).astype(np.uint8)


def _zigzag(rng: np.random.Generator) -> list[tuple[float, float]]:
    """A pen scribble across the frame: 4..6 corners alternating about a random line."""
    corners = int(rng.integers(4, 7))
    along = np.linspace(rng.uniform(0, 6), rng.uniform(21, 27), corners)
    base = rng.uniform(6, 21)
    amplitude = rng.uniform(3, 6)
    across = base + amplitude * np.where(np.arange(corners) % 2 == 0, -1, 1) + rng.normal(0, 1, corners)
    points = list(zip(along.tolist(), across.tolist(), strict=True))
    return points if rng.random() < 0.5 else [(y, x) for x, y in points]


def _straight(rng: np.random.Generator) -> list[tuple[float, float]]:
    """A straight stroke at least half the frame long, such as a ruled line or a crossing-out."""
    while True:
        start, end = rng.uniform(0, SIDE - 1, 2), rng.uniform(0, SIDE - 1, 2)
        if np.hypot(*(end - start)) >= SIDE / 2:
            return [tuple(start.tolist()), tuple(end.tolist())]


def stray_lines(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One or two pen lines drawn through the frame, straight or zigzag, 1..2 px wide."""

    def draw(image: Image.Image, _: int) -> Image.Image:
        layer = Image.new("L", (SIDE, SIDE), 0)
        pen = ImageDraw.Draw(layer)
        for _line in range(int(rng.integers(1, 3))):
            points = _zigzag(rng) if rng.random() < 0.5 else _straight(rng)
            pen.line(points, fill=int(rng.integers(160, 256)), width=int(rng.integers(1, 3)), joint="curve")
        return Image.fromarray(np.maximum(np.asarray(image), np.asarray(layer)), mode="L")

    return _with_pillow(images, draw)


# --- geometry ------------------------------------------------------------------------------------


def elastic(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Wobbly handwriting: a smooth random displacement field (4x4 control grid), typically 1..1.6 px."""
    n = len(images)
    strength = _per_image(rng.uniform(1.2, 2.0, n))  # the interpolated field's own deviation is about 0.8
    dy, dx = _smooth_field(rng, n, 4) * strength, _smooth_field(rng, n, 4) * strength
    return _to_uint8(_sample(images.astype(np.float32), _YY + dy, _XX + dx))


def rotation(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A tilted page or camera: rotated 30..45 degrees either way about the frame's centre."""
    angle = np.radians(_signed(rng, len(images), 30, 45))
    cos, sin = np.cos(angle), np.sin(angle)
    return _to_uint8(_affine(images, np.stack([np.stack([cos, -sin], 1), np.stack([sin, cos], 1)], 1)))


def shear(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Slanted handwriting: horizontal shear of 0.3..0.5 either way (x moves by factor * height)."""
    factor = _signed(rng, len(images), 0.3, 0.5)
    matrices = np.zeros((len(images), 2, 2))
    matrices[:, 0, 0] = matrices[:, 1, 1] = 1
    matrices[:, 1, 0] = -factor
    return _to_uint8(_affine(images, matrices))


def scale(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A small digit in a big box: shrunk to 50..70% about the frame's centre."""
    factor = rng.uniform(0.5, 0.7, len(images))
    return _to_uint8(_affine(images, np.eye(2)[None] / factor[:, None, None]))


def translate(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Off-centre writing: moved by whole pixels, 60..100% of the room there is, every ink pixel kept in frame."""
    shifts = np.zeros((len(images), 2))
    for axis, along in ((0, 2), (1, 1)):
        first, last = _ink_bounds(images, along)
        room_back, room_forward = first, SIDE - 1 - last
        total = np.maximum(room_back + room_forward, 1)
        forward = rng.random(len(images)) < room_forward / total  # lean to the side with more room
        room = np.where(forward, room_forward, room_back)
        distance = np.minimum(np.rint(rng.uniform(0.6, 1.0, len(images)) * room), room)
        shifts[:, axis] = np.where(forward, distance, -distance)
    return _to_uint8(_affine(images, np.broadcast_to(np.eye(2), (len(images), 2, 2)), shifts))


# --- strokes -------------------------------------------------------------------------------------

_SQUARE = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1)]
_PLUS = [(0, 0), (-1, 0), (1, 0), (0, -1), (0, 1)]
_PAIRS = [[(0, 0), (0, 1)], [(0, 0), (1, 0)], [(0, 0), (0, -1)], [(0, 0), (-1, 0)]]


def thick_strokes(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A felt-tip pen: grey-level dilation by a 3x3 square or a plus."""
    variants = [_morphology(images, element, np.maximum) for element in (_SQUARE, _PLUS)]
    return _per_image_choice(rng, variants)


def thin_strokes(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A fine pen: grey-level erosion by a plus, or by two adjacent pixels where a plus would erase the digit."""
    plus = _morphology(images, _PLUS, np.minimum)
    pairs = [_morphology(images, element, np.minimum) for element in _PAIRS]
    ink = np.maximum(images.sum(axis=(1, 2), dtype=np.int64), 1)
    plus_keeps = plus.sum(axis=(1, 2), dtype=np.int64) / ink
    use_plus = (rng.random(len(images)) < 0.5) & (plus_keeps >= 0.4)  # an already thin digit only loses a pixel
    pair = _per_image_choice(rng, pairs)
    return np.where(use_plus[:, None, None], plus, pair)


def edges_only(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """An outline: Sobel edges thresholded at 20..40% of each image's strongest edge, drawn white."""
    pixels = images.astype(np.float32)

    def at(dy: int, dx: int) -> np.ndarray:
        return _shift(pixels, dy, dx)

    gy = at(-1, -1) + 2 * at(-1, 0) + at(-1, 1) - at(1, -1) - 2 * at(1, 0) - at(1, 1)
    gx = at(-1, -1) + 2 * at(0, -1) + at(1, -1) - at(-1, 1) - 2 * at(0, 1) - at(1, 1)
    magnitude = np.hypot(gy, gx)
    strongest = magnitude.max(axis=(1, 2), keepdims=True)
    threshold = _per_image(rng.uniform(0.2, 0.4, len(images))) * strongest
    return np.where((magnitude > threshold) & (strongest > 0), 255, 0).astype(np.uint8)


# The held-out evaluation suite (mnist-eval): never used in training, so its scores measure robustness, not memory.
HELD_OUT_CORRUPTIONS: dict[str, Corruption] = {
    function.__name__: Corruption(function, (function.__doc__ or "").strip().splitlines()[0])
    for function in (
        gaussian_noise,
        shot_noise,
        impulse_noise,
        gaussian_blur,
        motion_blur,
        low_resolution,
        jpeg,
        contrast,
        fog,
        background,
        inverted_stripe,
        occlusion,
        stray_lines,
        elastic,
        rotation,
        shear,
        scale,
        translate,
        thick_strokes,
        thin_strokes,
        edges_only,
    )
}


def kind_rng(kind: str, seed: int) -> np.random.Generator:
    """The generator for (kind, seed): independent of other kinds, of call order and of PYTHONHASHSEED."""
    return np.random.default_rng([seed, zlib.crc32(kind.encode("utf-8"))])


def corrupt(images: np.ndarray, kind: str, seed: int = 0) -> np.ndarray:
    """`images` (N, 28, 28) uint8 corrupted by `kind`, deterministically for (kind, seed); the input is not changed."""
    if kind not in HELD_OUT_CORRUPTIONS:
        raise ValueError(f"unknown corruption kind {kind!r}; known kinds: {', '.join(HELD_OUT_CORRUPTIONS)}")
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 3 or images.shape[1:] != (SIDE, SIDE):
        raise ValueError(f"images must be uint8 (N, {SIDE}, {SIDE}), not {images.dtype} {images.shape}")
    if seed < 0:
        raise ValueError(f"seed must be a non-negative integer, not {seed}")
    out = HELD_OUT_CORRUPTIONS[kind](images, kind_rng(kind, seed))
    assert out.shape == images.shape and out.dtype == np.uint8, f"{kind} returned {out.dtype} {out.shape}"
    return out
