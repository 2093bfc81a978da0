"""Named, seeded sources of uploads for an honest evaluation of the "not-a-digit" detector (issue 22).

    python -m training.digit_sources --out runs/digit-sources      # contact sheets + a table of counts

Each source is a list of ENCODED images (PNG, JPEG, WebP, BMP, GIF: what a client uploads) and the 28x28 model
input the server makes of each (`server.pipeline.preprocess.from_encoded`, exactly as the server decodes an
upload). An image the server refuses (blank, no ink standing out) is kept and marked `refused`: for a non-digit a
refusal is a catch, for a digit a false alarm. Sources have a role: "fit" (the detector may be fitted on them) or
"held-out" (only ever evaluated). Held-out and fit sources share no font, no texture generator and no data set,
so a held-out figure measures generalization, not memory:

  - real digits never fitted: MNIST *test* through other encoders (the detector fits on MNIST *train*), the UCI
    8x8 scans of 43 other writers (scikit-learn), digits in handwriting fonts held out of fitting, also
    "photographed";
  - non-digits never fitted: letters in held-out handwriting fonts and in the print fonts that
    `training.fit_digit_detector` holds out, shapes and scribbles, blank paper, crops of scikit-image's photos;
  - look-alikes (O l I S Z B g q), labelled with the digit each resembles: reported apart, in neither target.

Handwriting fonts are npm's @fontsource packages under REPO_ROOT/.fonts (tests/setup.sh installs them).
Every image has its own generator seeded by (seed, source, index), so `build(name, n=10)` is the first ten
images of the full source and the same seed always gives the same bytes.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import io
import math
import sys
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont
from scipy import ndimage

from proto.contract import IMAGE_SIDE, MNIST_NORMALIZATION
from server.pipeline.preprocess import InvalidImage, from_encoded
from training.data import REPO_ROOT, load_split, resolve_data_dir

SEED = 22_002
MAX_PIXELS = 50_000_000  # the server's limit is far above anything generated here
FONTS_DIR = REPO_ROOT / ".fonts" / "node_modules" / "@fontsource"
FONT_SETUP = (
    "handwriting fonts are missing under {dir}: run tests/setup.sh (its @fontsource step: "
    "npm install --prefix .fonts @fontsource/...)"
)

# Handwriting fonts (npm @fontsource, latin 400 woff), split so that each half has thin pens, markers and
# print-like hands: a held-out figure then measures other handwriting, not a style never seen at all.
FIT_FONTS = (
    "caveat",  # thin pen, slanted
    "indie-flower",  # thin, round
    "shadows-into-light",  # thin, narrow
    "reenie-beanie",  # thin scrawl, small digits
    "kalam",  # felt pen, slanted
    "gochi-hand",  # bold marker
    "patrick-hand",  # print-like
    "architects-daughter",  # print-like, wide
    "just-another-hand",  # condensed print
)
HELD_OUT_FONTS = (
    "nothing-you-could-do",  # thin, fast, slanted
    "coming-soon",  # thin, round
    "gaegu",  # thin, wide
    "gloria-hallelujah",  # rounded felt pen
    "covered-by-your-grace",  # bold, condensed
    "permanent-marker",  # heavy marker
    "rock-salt",  # rough, large loops
    "schoolbell",  # print-like
    "nanum-pen-script",  # print-like pen
)
# Letters no digit resembles: fit_digit_detector's DIGIT_LIKE_LETTERS (OoQDUuIlijJLTtZzSsBbGgqy) and also
# C c (an unclosed 0, a 6 without its loop) and P p (a mirrored or turned 9).
DIGIT_LIKE = "OoQDUuIlijJLTtZzSsBbGgqyCcPp"
LETTERS = "".join(c for c in "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz" if c not in DIGIT_LIKE)
LOOK_ALIKES = {"O": 0, "l": 1, "I": 1, "S": 5, "Z": 2, "B": 8, "g": 9, "q": 9}
MNIST_TEST_SLICE = (9_000, 10_000)  # MNIST test digits for other encoders; the detector fits on MNIST train only
# Bundled with scikit-image (no download): photos and textures whose crops are non-digits.
SKIMAGE_FILES = (
    "brick.png",
    "grass.png",
    "gravel.png",
    "camera.png",
    "coins.png",
    "moon.png",
    "text.png",
    "page.png",
    "chelsea.png",
    "coffee.png",
    "astronaut.png",
    "rocket.jpg",
    "retina.jpg",
    "hubble_deep_field.jpg",
    "motorcycle_left.png",
    "cell.png",
)

KINDS = ("digit", "non-digit", "look-alike")
ROLES = ("fit", "held-out")
Item = tuple[bytes, int, str]  # encoded image, label (digit, -1, or the digit a look-alike resembles), tag


# --- fonts ----------------------------------------------------------------------------------------------------


def font_path(name: str) -> Path:
    """The latin 400 woff of an @fontsource package; a clear error naming the setup step where it is missing."""
    path = FONTS_DIR / name / "files" / f"{name}-latin-400-normal.woff"
    if not path.is_file():
        raise FileNotFoundError(FONT_SETUP.format(dir=FONTS_DIR) + f" ({path.name} not found)")
    return path


@functools.cache
def print_fonts() -> tuple[str, ...]:
    """The print fonts `training.fit_digit_detector` never fits on (mono, condensed, Computer Modern)."""
    from training.fit_digit_detector import find_fonts

    return tuple(find_fonts()[1])


@functools.lru_cache(maxsize=256)
def _truetype(path: str, size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(path, size)


# --- drawing --------------------------------------------------------------------------------------------------


def _np(image: Image.Image) -> np.ndarray:
    return np.asarray(image, np.float32) / 255.0


def _crop_ink(mask: np.ndarray) -> np.ndarray:
    rows, cols = np.nonzero(mask > 0.05)
    if not len(rows):
        return mask
    return mask[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]


def _smooth_noise(shape: tuple[int, int], cells: int, rng: np.random.Generator) -> np.ndarray:
    """Zero-mean noise varying over about `cells` cells per side (value noise, bicubic)."""
    grid = rng.standard_normal((max(2, cells), max(2, cells))).astype(np.float32)
    return np.asarray(Image.fromarray(grid, "F").resize(shape[::-1], Image.Resampling.BICUBIC), np.float32)


def _jitter(mask: np.ndarray, rng: np.random.Generator, hand: bool = True) -> np.ndarray:
    """A pen's variation on an ink mask: slight rotation and shear, and (hand) an elastic warp; cropped to ink."""
    image = Image.fromarray((mask * 255).astype(np.uint8))
    limit = 12 if hand else 6
    image = image.rotate(float(rng.uniform(-limit, limit)), Image.Resampling.BICUBIC, expand=True)
    shear = float(rng.uniform(-0.3, 0.3)) if hand else float(rng.uniform(-0.12, 0.12))
    width, height = image.size
    extra = int(abs(shear) * height) + 2
    image = image.transform(
        (width + extra, height),
        Image.Transform.AFFINE,
        (1, shear, -extra / 2 if shear > 0 else extra / 2 - abs(shear) * height, 0, 1, 0),
        Image.Resampling.BICUBIC,
    )
    out = _np(image)
    if hand:  # elastic warp (Simard et al.): smooth random displacement fields, from coarse noise (fast)
        alpha = max(out.shape) * float(rng.uniform(0.01, 0.035))
        dy = _smooth_noise(out.shape, 5, rng) * alpha
        dx = _smooth_noise(out.shape, 5, rng) * alpha
        ys, xs = np.indices(out.shape, dtype=np.float32)
        out = ndimage.map_coordinates(out, [ys + dy, xs + dx], order=1, mode="constant").astype(np.float32)
    return _crop_ink(np.clip(out, 0.0, 1.0))


def draw_char(char: str, path: str, rng: np.random.Generator, hand: bool = True) -> np.ndarray:
    """One character as an ink mask (float [0, 1], cropped), random size and stroke width, jittered."""
    size = int(rng.integers(56, 120))
    font = _truetype(path, size)
    weight = rng.random()
    stroke = max(1, round(size * rng.uniform(0.01, 0.045))) if weight < 0.3 else 0
    measure = ImageDraw.Draw(Image.new("L", (1, 1)))
    left, top, right, bottom = measure.textbbox((0, 0), char, font=font, stroke_width=stroke)
    pad = size // 3
    image = Image.new("L", (right - left + 2 * pad, bottom - top + 2 * pad), 0)
    ImageDraw.Draw(image).text((pad - left, pad - top), char, fill=255, font=font, stroke_width=stroke)
    if weight > 0.85:  # a finer pen: erode by a pixel where most of the glyph survives
        thinner = image.filter(ImageFilter.MinFilter(3))
        if np.asarray(thinner, np.float32).sum() > 0.4 * np.asarray(image, np.float32).sum():
            image = thinner
    return _jitter(_np(image), rng, hand)


def _place(mask: np.ndarray, height: int, width: int, fill: float, rng: np.random.Generator) -> np.ndarray:
    """The mask scaled so its height is `fill` of the canvas (width within 90%), at a random position."""
    h, w = mask.shape
    scale = min(fill * height / h, 0.9 * width / w)
    gh, gw = max(1, round(h * scale)), max(1, round(w * scale))
    glyph = np.clip(_np_resize(mask, gw, gh), 0.0, 1.0)
    canvas = np.zeros((height, width), np.float32)
    top = int(rng.integers(0, height - gh + 1))
    left = int(rng.integers(0, width - gw + 1))
    canvas[top : top + gh, left : left + gw] = glyph
    return canvas


def _np_resize(array: np.ndarray, width: int, height: int) -> np.ndarray:
    return np.asarray(Image.fromarray(array.astype(np.float32), "F").resize((width, height), Image.Resampling.LANCZOS))


PENS = {"black": (0.08, 0.08, 0.1), "blue": (0.1, 0.18, 0.55), "pencil": (0.35, 0.35, 0.38), "red": (0.6, 0.1, 0.1)}


def _to_image(rgb: np.ndarray) -> Image.Image:
    array = np.clip(rgb * 255 + 0.5, 0, 255).astype(np.uint8)
    return Image.fromarray(array, "RGB" if array.ndim == 3 else "L")


def clean_page(mask: np.ndarray, rng: np.random.Generator, sides: tuple[int, int] = (28, 128)) -> Image.Image:
    """Ink on clean paper (a scan, a drawing app): mostly dark on light, some light on dark, some coloured pens."""
    side = int(rng.integers(sides[0], sides[1] + 1))
    width = max(sides[0], round(side * rng.uniform(0.8, 1.25)))
    ink = _place(mask, side, width, float(rng.uniform(0.5, 0.85)), rng)
    paper = float(rng.uniform(0.9, 1.0))
    pen = np.array(PENS[str(rng.choice(list(PENS), p=[0.55, 0.25, 0.12, 0.08]))], np.float32)
    rgb = paper * (1 - ink[..., None]) + pen * ink[..., None]
    if rng.random() < 0.15:  # chalk on a board, a dark-mode drawing app
        rgb = 1.0 - rgb
    return _to_image(rgb if rng.random() < 0.5 else rgb.mean(-1))


def photo_page(mask: np.ndarray, rng: np.random.Generator, sides: tuple[int, int] = (48, 360)) -> Image.Image:
    """Ink photographed on paper: uneven light, stains, grain, a soft pen and a soft lens, a warm tint."""
    side = int(rng.integers(sides[0], sides[1] + 1))
    width = max(sides[0], round(side * rng.uniform(0.75, 1.35)))
    shape = (side, width)
    ink = _place(mask, side, width, float(rng.uniform(0.4, 0.8)), rng)
    ink = ndimage.gaussian_filter(ink, rng.uniform(0.1, 0.6) * side / 100)
    paper = _paper(shape, rng)
    strength = float(rng.uniform(0.6, 0.92))
    gray = paper * (1 - strength * np.clip(ink, 0, 1))
    gray = ndimage.gaussian_filter(gray, rng.uniform(0.0, 0.5) * side / 120)
    gray = gray + rng.normal(0, rng.uniform(0.005, 0.03), shape).astype(np.float32)
    tint = np.array([1.0, rng.uniform(0.94, 1.0), rng.uniform(0.82, 1.0)], np.float32)
    return _to_image(gray[..., None] * tint)


def _paper(shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """Paper as a phone sees it: a base brightness, a light gradient, a vignette, low-frequency stains."""
    height, width = shape
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    ys, xs = ys / height - 0.5, xs / width - 0.5
    angle = rng.uniform(0, 2 * math.pi)
    gradient = (xs * math.cos(angle) + ys * math.sin(angle)) * rng.uniform(0.0, 0.25)
    vignette = -(xs**2 + ys**2) * rng.uniform(0.0, 0.35)
    stains = _smooth_noise(shape, int(rng.integers(3, 9)), rng) * rng.uniform(0.0, 0.03)
    return np.clip(float(rng.uniform(0.6, 0.95)) + gradient + vignette + stains, 0.05, 1.0).astype(np.float32)


def encode(image: Image.Image, rng: np.random.Generator, formats: tuple[str, ...] = ("PNG", "JPEG", "WEBP")) -> bytes:
    """The image as a client uploads it, in a format picked from `formats` (lossy ones at a random quality)."""
    fmt = str(rng.choice(formats))
    buffer = io.BytesIO()
    if fmt == "JPEG":
        image.convert("RGB" if image.mode == "RGB" else "L").save(buffer, "JPEG", quality=int(rng.integers(45, 93)))
    elif fmt == "WEBP":
        image.save(buffer, "WEBP", quality=int(rng.integers(60, 95)), method=4)
    else:
        image.save(buffer, fmt)
    return buffer.getvalue()


def _rngs(name: str, seed: int, n: int) -> Iterator[np.random.Generator]:
    """One generator per image, from (seed, source, index): a prefix of a source is a smaller source."""
    stream = zlib.crc32(name.encode())
    for i in range(n):
        yield np.random.default_rng([seed, stream, i])


# --- real digits ----------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=2)
def _mnist_test(mnist_dir: str | None) -> tuple[np.ndarray, np.ndarray]:
    split = load_split("test", resolve_data_dir(mnist_dir))
    start, stop = MNIST_TEST_SLICE
    return split.images[start:stop], split.labels[start:stop]


def _mnist_encoders(name: str, n: int, seed: int, mnist_dir: str | None) -> Iterator[Item]:
    """MNIST test digits written by encoders a client might use; half of them upscaled 2-4x with LANCZOS."""
    images, labels = _mnist_test(mnist_dir)
    for i, rng in enumerate(_rngs(name, seed, n)):
        pixels = images[i]
        tag = []
        if rng.random() < 0.5:
            factor = int(rng.integers(2, 5))
            tag.append(f"x{factor}")
            pixels = np.asarray(
                Image.fromarray(pixels).resize((28 * factor, 28 * factor), Image.Resampling.LANCZOS), np.uint8
            )
        route = str(rng.choice(["png-rgba-alpha", "jpeg-dark-on-light", "webp", "bmp", "gif", "png-16bit", "png-p"]))
        invert = route == "jpeg-dark-on-light" or (route not in ("png-rgba-alpha", "png-16bit") and rng.random() < 0.5)
        gray = 255 - pixels if invert else pixels
        buffer = io.BytesIO()
        if route == "png-rgba-alpha":  # coloured ink whose coverage is the alpha channel, transparent paper
            pen = PENS[str(rng.choice(["black", "blue"]))]
            rgba = np.zeros((*pixels.shape, 4), np.uint8)
            rgba[..., :3] = np.round(np.array(pen) * 255).astype(np.uint8)
            rgba[..., 3] = pixels
            Image.fromarray(rgba, "RGBA").save(buffer, "PNG")
        elif route == "jpeg-dark-on-light":
            quality = int(rng.integers(50, 91))
            tag.append(f"q{quality}")
            Image.fromarray(gray).save(buffer, "JPEG", quality=quality)
        elif route == "webp":
            lossless = rng.random() < 0.3
            Image.fromarray(gray).convert("RGB").save(
                buffer, "WEBP", lossless=lossless, quality=int(rng.integers(60, 96)), method=4
            )
        elif route == "bmp":
            Image.fromarray(gray).save(buffer, "BMP")
        elif route == "gif":
            Image.fromarray(gray).save(buffer, "GIF")
        elif route == "png-16bit":
            Image.fromarray(pixels.astype(np.uint16) * 257).save(buffer, "PNG")
        else:  # a palette PNG of 8 to 64 colours
            Image.fromarray(gray).quantize(colors=int(rng.integers(8, 65))).save(buffer, "PNG")
        tag.append("inv" if invert else "light-on-dark")
        yield buffer.getvalue(), int(labels[i]), "-".join([route, *tag])


def _uci_scans(name: str, n: int, seed: int, mnist_dir: str | None) -> Iterator[Item]:
    """UCI's 8x8 digits (16 grey levels, 43 writers) upscaled as a scanner would, either polarity, some margin."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    order = np.random.default_rng([seed, zlib.crc32(name.encode())]).permutation(len(digits.images))
    resamplers = {
        "bicubic": Image.Resampling.BICUBIC,
        "lanczos": Image.Resampling.LANCZOS,
        "bilinear": Image.Resampling.BILINEAR,
        "nearest": Image.Resampling.NEAREST,
    }
    for i, rng in enumerate(_rngs(name, seed, n)):
        index = int(order[i])
        side = int(rng.integers(32, 97))
        how = str(rng.choice(list(resamplers), p=[0.35, 0.3, 0.2, 0.15]))
        ink = digits.images[index].astype(np.float32) / 16.0
        inner = max(8, round(side / (1 + 2 * rng.uniform(0.0, 0.2))))
        scaled = np.clip(np.asarray(Image.fromarray(ink, "F").resize((inner, inner), resamplers[how])), 0, 1)
        canvas = np.zeros((side, side), np.float32)
        top, left = (int(rng.integers(0, side - inner + 1)) for _ in range(2))
        canvas[top : top + inner, left : left + inner] = scaled
        dark_on_light = rng.random() < 0.5
        gray = 1.0 - 0.9 * canvas if dark_on_light else 0.05 + 0.9 * canvas
        tag = f"{how}-{side}px-{'dark-on-light' if dark_on_light else 'light-on-dark'}"
        yield encode(_to_image(gray), rng, ("PNG", "PNG", "JPEG")), int(digits.target[index]), tag


def _glyphs(
    chars: str | dict[str, int], fonts: Callable[[], list[str]], photo_share: float, hand: bool = True
) -> Callable[[str, int, int, str | None], Iterator[Item]]:
    """A builder of characters in `fonts`, clean or photographed; labels from `chars` (a dict) or -1."""

    def build(name: str, n: int, seed: int, mnist_dir: str | None) -> Iterator[Item]:
        paths = fonts()
        keys = list(chars)
        for rng in _rngs(name, seed, n):
            char, path = str(rng.choice(keys)), str(rng.choice(paths))
            mask = draw_char(char, path, rng, hand)
            photo = rng.random() < photo_share
            image = photo_page(mask, rng) if photo else clean_page(mask, rng)
            label = chars[char] if isinstance(chars, dict) else (int(char) if char.isdigit() else -1)
            tag = f"{_font_label(path)}|{char}|{'photo' if photo else 'clean'}"
            yield encode(image, rng, ("JPEG",) if photo else ("PNG", "PNG", "JPEG", "WEBP")), label, tag

    return build


def _font_label(path: str) -> str:
    return Path(path).parent.parent.name if "@fontsource" in path else Path(path).stem


def _hand_fonts(names: tuple[str, ...]) -> Callable[[], list[str]]:
    return lambda: [str(font_path(name)) for name in names]


def _look_alike_fonts() -> list[str]:
    """Held-out handwriting fonts, and the held-out print fonts at a quarter of the draws."""
    hand = _hand_fonts(HELD_OUT_FONTS)()
    return hand * 3 + list(np.random.default_rng(0).choice(print_fonts(), len(hand))) if print_fonts() else hand


# --- non-digits -----------------------------------------------------------------------------------------------


def draw_shape(kind: str, rng: np.random.Generator) -> np.ndarray:
    """A shape, scribble or hatching drawn with a pen of random width on a 128 px canvas (ink mask)."""
    side = 128
    image = Image.new("L", (side, side), 0)
    draw = ImageDraw.Draw(image)
    width = int(rng.integers(2, 10))
    c = side / 2
    r = float(rng.uniform(30, 55))
    turn = float(rng.uniform(0, 2 * math.pi))
    filled = rng.random() < 0.3

    def ring(count: int, radii: list[float]) -> list[tuple[float, float]]:
        return [
            (
                c + radii[k % len(radii)] * math.cos(turn + 2 * math.pi * k / count),
                c + radii[k % len(radii)] * math.sin(turn + 2 * math.pi * k / count),
            )
            for k in range(count)
        ]

    def polygon(points: list[tuple[float, float]]) -> None:
        if filled:
            draw.polygon(points, fill=255)
        else:
            draw.line([*points, points[0]], fill=255, width=width, joint="curve")

    if kind in ("triangle", "square"):
        polygon(ring(3 if kind == "triangle" else 4, [r]))
    elif kind == "star":
        polygon(ring(2 * int(rng.integers(5, 8)), [r, r * rng.uniform(0.35, 0.55)]))
    elif kind == "heart":
        t = np.linspace(0, 2 * math.pi, 80)
        x, y = 16 * np.sin(t) ** 3, 13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t)
        polygon([(c + r / 17 * a, c - r / 17 * b) for a, b in zip(x, y, strict=True)])
    elif kind == "arrow":
        (x0, y0), (x1, y1) = ring(2, [r])
        draw.line([(x0, y0), (x1, y1)], fill=255, width=width)
        back = math.atan2(y0 - y1, x0 - x1)
        for side_angle in (-0.5, 0.5):
            a = back + side_angle
            draw.line([(x1, y1), (x1 + 0.4 * r * math.cos(a), y1 + 0.4 * r * math.sin(a))], fill=255, width=width)
    elif kind == "cross":
        points = ring(4, [r])
        draw.line([points[0], points[2]], fill=255, width=width)
        draw.line([points[1], points[3]], fill=255, width=width)
    elif kind == "spiral":
        t = np.linspace(0, float(rng.uniform(3, 6)) * math.pi, 200)
        radius = r * t / t[-1]
        draw.line(
            list(zip(c + radius * np.cos(t + turn), c + radius * np.sin(t + turn), strict=True)), fill=255, width=width
        )
    elif kind == "scribble":  # a pen wandering with momentum
        steps = int(rng.integers(30, 120))
        angle = rng.uniform(0, 2 * math.pi) + np.cumsum(rng.normal(0, 0.6, steps))
        xy = np.cumsum(np.stack([np.cos(angle), np.sin(angle)], 1) * rng.uniform(3, 8), 0)
        xy = (xy - xy.mean(0)) / max(np.abs(xy - xy.mean(0)).max(), 1) * r + c
        draw.line([tuple(p) for p in xy], fill=255, width=max(2, width // 2), joint="curve")
    else:  # hatching: parallel strokes over a patch, sometimes crossed
        for angle in [turn] if rng.random() < 0.5 else [turn, turn + rng.uniform(0.8, 2.3)]:
            gap = float(rng.uniform(7, 16))
            dx, dy = math.cos(angle), math.sin(angle)
            for offset in np.arange(-r, r, gap):
                half = math.sqrt(max(r * r - offset * offset, 0))
                px, py = c - dy * offset, c + dx * offset
                draw.line(
                    [(px - dx * half, py - dy * half), (px + dx * half, py + dy * half)],
                    fill=255,
                    width=max(2, width // 2),
                )
    return _jitter(_np(image), rng, hand=rng.random() < 0.5)


SHAPES = ("triangle", "square", "star", "heart", "arrow", "cross", "spiral", "scribble", "hatching")


def _shapes(name: str, n: int, seed: int, mnist_dir: str | None) -> Iterator[Item]:
    for rng in _rngs(name, seed, n):
        kind = str(rng.choice(SHAPES))
        photo = rng.random() < 0.35
        mask = draw_shape(kind, rng)
        image = photo_page(mask, rng) if photo else clean_page(mask, rng, (28, 160))
        formats = ("JPEG",) if photo else ("PNG", "JPEG", "WEBP")
        yield encode(image, rng, formats), -1, f"{kind}|{'photo' if photo else 'clean'}"


def _paper_only(name: str, n: int, seed: int, mnist_dir: str | None) -> Iterator[Item]:
    """Blank sheets: a clean scan, or a photo with uneven light, stains and grain, sometimes a fold's shadow."""
    for rng in _rngs(name, seed, n):
        side = int(rng.integers(48, 361))
        shape = (side, max(48, round(side * rng.uniform(0.75, 1.35))))
        if rng.random() < 0.25:
            gray = np.full(shape, rng.uniform(0.85, 1.0), np.float32) + rng.normal(0, 0.01, shape).astype(np.float32)
            tag = "scan"
        else:
            gray = _paper(shape, rng) + rng.normal(0, rng.uniform(0.005, 0.05), shape).astype(np.float32)
            tag = "photo"
            if rng.random() < 0.3:  # a fold: a soft dark line across the sheet
                ys, xs = np.indices(shape, dtype=np.float32)
                a = rng.uniform(0, math.pi)
                distance = np.abs((xs - shape[1] / 2) * math.sin(a) - (ys - shape[0] / 2) * math.cos(a))
                gray = gray - rng.uniform(0.03, 0.12) * np.exp(-((distance / (side * 0.02)) ** 2))
                tag = "photo-fold"
        yield encode(_to_image(gray), rng, ("JPEG", "PNG")), -1, tag


@functools.cache
def _skimage_images() -> tuple[tuple[str, np.ndarray], ...]:
    """scikit-image's bundled photos (no download), greyscale float."""
    import skimage

    folder = Path(skimage.__file__).parent / "data"
    out = []
    for name in SKIMAGE_FILES:
        if (folder / name).is_file():
            with Image.open(folder / name) as image:
                out.append((name, _np(image.convert("L"))))
    if not out:
        raise FileNotFoundError(f"no bundled images in {folder}")
    return tuple(out)


def _textures(name: str, n: int, seed: int, mnist_dir: str | None) -> Iterator[Item]:
    """Random crops of scikit-image's photos (random position and scale), 64-256 px, greyscale."""
    images = _skimage_images()
    for rng in _rngs(name, seed, n):
        label, pixels = images[int(rng.integers(len(images)))]
        height, width = pixels.shape
        crop = int(rng.integers(32, min(height, width) + 1))
        top, left = int(rng.integers(0, height - crop + 1)), int(rng.integers(0, width - crop + 1))
        out = int(rng.integers(64, 257))
        patch = _np_resize(pixels[top : top + crop, left : left + crop], out, out)
        yield encode(_to_image(patch), rng), -1, f"{label}|{crop}->{out}"


def procedural_texture(kind: str, side: int, rng: np.random.Generator) -> np.ndarray:
    """Noise fields, wood- or fabric-like gratings, stone-like cellular noise: greyscale [0, 1]."""
    ys, xs = np.mgrid[0:side, 0:side].astype(np.float32) / side
    if kind == "noise":  # octaves of value noise
        field = sum(_smooth_noise((side, side), cells, rng) / (k + 1) for k, cells in enumerate((4, 8, 16, 32, 64)))
    elif kind == "wood":
        cx, cy = rng.uniform(-1, 2, 2)
        radius = np.hypot((xs - cx) * rng.uniform(0.3, 1), ys - cy) + 0.05 * _smooth_noise((side, side), 6, rng)
        field = np.sin(radius * rng.uniform(30, 90)) + 0.3 * _smooth_noise((side, side), 40, rng)
    elif kind == "fabric":
        a = rng.uniform(0, math.pi)
        u, v = xs * math.cos(a) + ys * math.sin(a), -xs * math.sin(a) + ys * math.cos(a)
        f = rng.uniform(20, 60)
        field = np.sin(u * f * 2 * math.pi) * np.sin(v * f * 2 * math.pi) + 0.4 * _smooth_noise((side, side), 50, rng)
    elif kind == "grating":
        a = rng.uniform(0, math.pi)
        field = np.sin((xs * math.cos(a) + ys * math.sin(a)) * rng.uniform(8, 40) * 2 * math.pi)
        field = field + 0.5 * _smooth_noise((side, side), 10, rng)
    else:  # cellular ("stone"): distance to the nearest of random points, cracks at the cell borders
        points = rng.random((int(rng.integers(15, 80)), 2)).astype(np.float32)
        distance = np.sort(np.hypot(xs[..., None] - points[:, 0], ys[..., None] - points[:, 1]), -1)
        field = (distance[..., 1] - distance[..., 0]) + 0.02 * _smooth_noise((side, side), 30, rng)
    field = np.asarray(field, np.float32)
    field = (field - field.min()) / max(float(np.ptp(field)), 1e-6)
    contrast = rng.uniform(0.2, 0.9)
    return np.clip(rng.uniform(0.2, 0.8) + (field - 0.5) * contrast, 0, 1)


TEXTURES = ("noise", "wood", "fabric", "grating", "cellular")


def _textures_fit(name: str, n: int, seed: int, mnist_dir: str | None) -> Iterator[Item]:
    for rng in _rngs(name, seed, n):
        kind = str(rng.choice(TEXTURES))
        side = int(rng.integers(64, 257))
        yield encode(_to_image(procedural_texture(kind, side, rng)), rng), -1, kind


# --- the catalogue --------------------------------------------------------------------------------------------


Builder = Callable[[str, int, int, str | None], Iterator[Item]]


@dataclass(frozen=True)
class SourceSpec:
    """What a source is, before it is built."""

    name: str
    kind: str  # "digit", "non-digit" or "look-alike"
    role: str  # "fit" (the detector may be fitted on it) or "held-out" (only evaluated)
    description: str
    size: int  # images by default
    builder: Builder
    max_size: int | None = None  # a fixed data set's length


def _spec(name: str, kind: str, role: str, size: int, builder: Builder, description: str, **extra: int) -> SourceSpec:
    assert kind in KINDS and role in ROLES
    return SourceSpec(name, kind, role, description, size, builder, **extra)


SOURCES: dict[str, SourceSpec] = {
    spec.name: spec
    for spec in (
        _spec(
            "mnist-test-encoders",
            "digit",
            "held-out",
            1000,
            _mnist_encoders,
            "MNIST test[9000:10000] as RGBA-alpha/16-bit/palette PNG, JPEG q50-90, WebP, BMP, GIF; half 2-4x LANCZOS",
            max_size=MNIST_TEST_SLICE[1] - MNIST_TEST_SLICE[0],
        ),
        _spec(
            "uci-scans",
            "digit",
            "held-out",
            1797,
            _uci_scans,
            "UCI 8x8 digits (scikit-learn, 43 writers, 16 levels) upscaled to 32-96 px, either polarity",
            max_size=1797,
        ),
        _spec(
            "handwriting-fonts",
            "digit",
            "held-out",
            1000,
            _glyphs({str(d): d for d in range(10)}, _hand_fonts(HELD_OUT_FONTS), 0.0),
            "digits in held-out handwriting fonts, jittered pen (width, rotation, shear, elastic), clean, 28-128 px",
        ),
        _spec(
            "photographed-handwriting",
            "digit",
            "held-out",
            400,
            _glyphs({str(d): d for d in range(10)}, _hand_fonts(HELD_OUT_FONTS), 1.0),
            "held-out handwriting-font digits photographed on paper (light, grain, blur, JPEG), 48-360 px",
        ),
        _spec(
            "handwriting-fonts-fit",
            "digit",
            "fit",
            2000,
            _glyphs({str(d): d for d in range(10)}, _hand_fonts(FIT_FONTS), 0.35),
            "digits in the fit handwriting fonts, jittered, clean (65%) or photographed (35%)",
        ),
        _spec(
            "letters-handwriting",
            "non-digit",
            "held-out",
            1000,
            _glyphs(LETTERS, _hand_fonts(HELD_OUT_FONTS), 0.3),
            f"letters no digit resembles ({LETTERS}) in held-out handwriting fonts, jittered, 30% photographed",
        ),
        _spec(
            "letters-print",
            "non-digit",
            "held-out",
            600,
            _glyphs(LETTERS, lambda: list(print_fonts()), 0.25, hand=False),
            "the same letters in the print fonts fit_digit_detector holds out (mono, condensed, Computer Modern)",
        ),
        _spec(
            "shapes-scribbles",
            "non-digit",
            "held-out",
            800,
            _shapes,
            "triangles, squares, stars, hearts, arrows, crosses, spirals, scribbles, hatching; 35% photographed",
        ),
        _spec(
            "paper",
            "non-digit",
            "held-out",
            200,
            _paper_only,
            "blank paper: clean scans and photos (uneven light, stains, grain, folds); refusals are catches",
        ),
        _spec(
            "textures",
            "non-digit",
            "held-out",
            600,
            _textures,
            "crops of scikit-image's bundled photos (brick, grass, gravel, camera, page, ...), 64-256 px",
        ),
        _spec(
            "letters-handwriting-fit",
            "non-digit",
            "fit",
            2000,
            _glyphs(LETTERS, _hand_fonts(FIT_FONTS), 0.3),
            "letters no digit resembles in the fit handwriting fonts, jittered, 30% photographed",
        ),
        _spec(
            "textures-fit",
            "non-digit",
            "fit",
            800,
            _textures_fit,
            "procedural textures: value noise, wood rings, fabric weave, gratings, cellular stone; 64-256 px",
        ),
        _spec(
            "look-alike-letters",
            "look-alike",
            "held-out",
            400,
            _glyphs(LOOK_ALIKES, _look_alike_fonts, 0.25),
            "O l I S Z B g q in held-out handwriting (and print) fonts, labelled with the digit each resembles",
        ),
    )
}


@dataclass(frozen=True)
class Source:
    """A built source: the uploads, what the server makes of each, and what each is."""

    name: str
    kind: str
    role: str
    description: str
    encoded: list[bytes]
    inputs: np.ndarray  # (N, 1, 28, 28) float32, normalized as the server does; NaN rows where refused
    refused: np.ndarray  # (N,) bool: the server's preprocessing refused the upload (blank, no ink)
    labels: np.ndarray  # (N,) int: the digit; -1 for non-digits; the resembled digit for look-alikes
    tags: list[str]  # per image, how it was made (font|char|route, encoder, texture, ...)

    def __len__(self) -> int:
        return len(self.encoded)


def preprocess(encoded: list[bytes]) -> tuple[np.ndarray, np.ndarray]:
    """Each upload through the server's decoding: (inputs with NaN rows where refused, refused)."""
    inputs = np.full((len(encoded), 1, IMAGE_SIDE, IMAGE_SIDE), np.nan, np.float32)
    refused = np.zeros(len(encoded), bool)
    for i, data in enumerate(encoded):
        try:
            inputs[i] = from_encoded(data, MNIST_NORMALIZATION, MAX_PIXELS)
        except InvalidImage:
            refused[i] = True
    return inputs, refused


def _code_version() -> str:
    """What a cached source depends on: this generator, the server's preprocessing, the fonts' names."""
    from server.pipeline import preprocess as server_preprocess

    digest = hashlib.sha256(Path(__file__).read_bytes() + Path(server_preprocess.__file__).read_bytes())
    return digest.hexdigest()[:12]


def build(
    name: str,
    n: int | None = None,
    seed: int = SEED,
    *,
    mnist_dir: str | Path | None = None,
    cache_dir: str | Path | None = None,
) -> Source:
    """Build source `name` (its default size when `n` is None); the first `n` images of the full source.

    Memoized in the process; with `cache_dir`, also kept on disk keyed by name, size, seed and code version.
    The arrays are read-only: one built source is shared by every caller.
    """
    spec = SOURCES.get(name)
    if spec is None:
        raise KeyError(f"unknown source {name!r}; known: {', '.join(SOURCES)}")
    count = spec.size if n is None else n
    if spec.max_size is not None and count > spec.max_size:
        raise ValueError(f"{name} has {spec.max_size} images, {count} asked for")
    return _build(name, count, seed, None if mnist_dir is None else str(mnist_dir), cache_dir and str(cache_dir))


@functools.lru_cache(maxsize=32)
def _build(name: str, n: int, seed: int, mnist_dir: str | None, cache_dir: str | None) -> Source:
    spec = SOURCES[name]
    path = Path(cache_dir) / f"{name}-n{n}-s{seed}-{_code_version()}.npz" if cache_dir else None
    if path is not None and path.is_file():
        with np.load(path) as saved:
            blob, ends = saved["blob"].tobytes(), saved["ends"]
            encoded = [blob[a:b] for a, b in zip(np.r_[0, ends[:-1]], ends, strict=True)]
            inputs, refused, labels, tags = saved["inputs"], saved["refused"], saved["labels"], list(saved["tags"])
    else:
        items = list(spec.builder(name, n, seed, mnist_dir))
        encoded = [item[0] for item in items]
        labels = np.array([item[1] for item in items], np.int64)
        tags = [item[2] for item in items]
        inputs, refused = preprocess(encoded)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            np.savez(
                path,
                blob=np.frombuffer(b"".join(encoded), np.uint8),
                ends=np.cumsum([len(e) for e in encoded]),
                inputs=inputs,
                refused=refused,
                labels=labels,
                tags=np.array(tags),
            )
    for array in (inputs, refused, labels):
        array.setflags(write=False)
    return Source(spec.name, spec.kind, spec.role, spec.description, encoded, inputs, refused, labels, tags)


def catch_curve(digits: list[np.ndarray], non_digits: list[np.ndarray], points: int = 400) -> dict[str, list[float]]:
    """Non-digits caught against real digits flagged (score under the threshold; -inf for a refused upload) over
    thresholds, each array (a source, a kind) weighing alike: the curve a threshold is chosen from."""
    pooled = np.concatenate(digits) if digits else np.zeros(0)
    if not (np.isfinite(pooled).any() and non_digits):  # no curve without both kinds
        return {"threshold": [], "false_alarm": [], "catch": []}
    finite = pooled[np.isfinite(pooled)]
    thresholds = np.unique(
        np.concatenate([np.linspace(0, 1, points), np.quantile(finite, np.linspace(0, 0.1, points))])
    )
    return {
        "threshold": [round(float(t), 6) for t in thresholds],
        "false_alarm": [round(float(np.mean([np.mean(s < t) for s in digits])), 5) for t in thresholds],
        "catch": [round(float(np.mean([np.mean(s < t) for s in non_digits])), 5) for t in thresholds],
    }


def names(role: str | None = None, kind: str | None = None) -> list[str]:
    """The sources of a role and/or kind, in catalogue order."""
    return [s.name for s in SOURCES.values() if role in (None, s.role) and kind in (None, s.kind)]


# --- contact sheets -------------------------------------------------------------------------------------------

TILE = 64
GAP = 4
CAPTION = 12


def _upload_tile(data: bytes) -> Image.Image:
    """An upload as a person sees it (alpha on white, as the server composites), fitted in a tile."""
    with Image.open(io.BytesIO(data)) as image:
        image.load()
        if image.mode in ("I;16", "I;16B", "I;16L", "I"):
            image = Image.fromarray((np.asarray(image, np.float32) / 257).astype(np.uint8))
        rgba = image.convert("RGBA")
    shown = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    shown.thumbnail((TILE, TILE), Image.Resampling.LANCZOS)
    tile = Image.new("RGB", (TILE, TILE), (200, 200, 200))
    tile.paste(shown, ((TILE - shown.width) // 2, (TILE - shown.height) // 2))
    return tile


def _input_tile(row: np.ndarray, refused: bool) -> Image.Image:
    """A model input as the model sees it: 28x28 MNIST-like, shown 2x; refused ones are a red tile."""
    if refused:
        tile = Image.new("RGB", (TILE, TILE), (120, 20, 20))
        ImageDraw.Draw(tile).text((6, 26), "refused", fill=(255, 255, 255))
        return tile
    pixels = np.clip((row[0] * MNIST_NORMALIZATION.std + MNIST_NORMALIZATION.mean) * 255, 0, 255).astype(np.uint8)
    return Image.fromarray(pixels).resize((TILE, TILE), Image.Resampling.NEAREST).convert("RGB")


def contact_sheet(source: Source, path: str | Path, columns: int = 10, rows: int = 6) -> Path:
    """A PNG of up to columns x rows examples spread over the source: as uploaded (left), as the model sees (right)."""
    count = min(len(source), columns * rows)
    picks = np.linspace(0, len(source) - 1, count).round().astype(int) if count else np.array([], int)
    cell = TILE + GAP
    panel = columns * cell
    header = 36
    sheet = Image.new("RGB", (2 * panel + 3 * GAP * 4, header + rows * (cell + CAPTION)), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    refused = int(source.refused.sum())
    draw.text(
        (8, 4), f"{source.name} ({source.kind}, {source.role}): {len(source)} images, {refused} refused", fill=(0, 0, 0)
    )
    draw.text((8, 18), "left: as uploaded    right: the 28x28 input the model sees", fill=(90, 90, 90))
    for slot, index in enumerate(picks):
        r, c = divmod(slot, columns)
        y = header + r * (cell + CAPTION)
        label = int(source.labels[index])
        caption = (str(label) if label >= 0 else "") + " " + source.tags[index].split("|")[0][:9]
        for x0, tile in (
            (GAP + c * cell, _upload_tile(source.encoded[index])),
            (panel + 12 * GAP + c * cell, _input_tile(source.inputs[index], bool(source.refused[index]))),
        ):
            sheet.paste(tile, (x0, y))
            draw.text((x0, y + TILE + 1), caption, fill=(0, 0, 120))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for one contact sheet PNG per source")
    parser.add_argument("--sources", nargs="*", default=None, help="names (default: all)")
    parser.add_argument("--role", choices=ROLES, default=None, help="only the sources of this role")
    parser.add_argument("--n", type=int, default=None, help="images per source (default: each source's size)")
    parser.add_argument("--seed", type=int, default=SEED)
    parser.add_argument("--mnist", default=None, help="MNIST folder (default: the project's usual places)")
    parser.add_argument("--cache", type=Path, default=None, help="keep built sources here")
    args = parser.parse_args(argv)
    chosen = args.sources or names(args.role)
    print(f"| {'source':<26} | {'kind':<10} | {'role':<8} | {'images':>6} | {'refused':>7} | {'seconds':>7} |")
    print(f"|{'-' * 28}|{'-' * 12}|{'-' * 10}|{'-' * 7}:|{'-' * 8}:|{'-' * 8}:|")
    for name in chosen:
        start = time.perf_counter()
        n = args.n if args.n is None or SOURCES[name].max_size is None else min(args.n, SOURCES[name].max_size)
        source = build(name, n, args.seed, mnist_dir=args.mnist, cache_dir=args.cache)
        seconds = time.perf_counter() - start
        contact_sheet(source, args.out / f"{name}.png")
        refused = int(source.refused.sum())
        kind, role = source.kind, source.role
        print(f"| {name:<26} | {kind:<10} | {role:<8} | {len(source):>6} | {refused:>7} | {seconds:>7.1f} |")
    print(f"contact sheets: {args.out}/<source>.png", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
