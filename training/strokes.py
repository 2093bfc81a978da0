"""Handwritten arithmetic symbols (+ - × ÷ : =) from two unrelated stroke generators, for the operator model.

    ink = render_symbol("÷", "A", np.random.default_rng(0), height=40)  # float32, ink 1 on 0, cropped to the ink

MNIST has no operators, so the operator model (`training/operators.py`) learns them from drawn strokes. A model
trained and judged on one generator would be judged on that generator's quirks (its stroke profile, its
proportions, its warp), not on whether it reads a "+" the way people write one. So there are two generators built
in different ways, and only one of them is ever trained on:

* Generator "A" (training). A writer: each stroke is a centre-line polyline with wobbly per-point jitter, drawn by
  stamping anti-aliased discs along it whose radius follows a pen-pressure profile (the stroke starts and ends
  thinner, the pressure wavers, and the pen's width differs per writer and per stroke). Proportions are drawn per
  symbol: arm lengths and where they cross, stroke angles, the gap between the bars of "=", dot sizes and their
  distance from the bar of "÷" or from each other in ":". Dots are short scribbles of the same pen. Rotation and
  slant are applied to the centre lines, and last the whole raster is bent by an elastic warp (a smoothed random
  displacement field).
* Generator "B" (held out: evaluation, tests and the load test only, never training). A drafting pen: strokes are
  quadratic or cubic Bezier curves with a curvature, drawn with PIL's ImageDraw at 4x resolution with a width that
  is constant along each stroke and round caps, then reduced 4x; dots are filled ellipses; the proportion ranges
  are its own; the finished raster goes through a random affine map (rotation up to ±15°, shear, aspect) and a
  Gaussian blur; no elastic warp.

Sizes are given as the line's digit height (`height` px): people write operators smaller than digits (a "+" or "×"
is about 0.4-0.8 of a digit's height, a minus 0.3-0.7 of it wide), so a symbol is drawn at that share of `height`,
and its ink is returned cropped to its bounding box, as ReadExpression cuts a symbol out of a page.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw, ImageFilter
from scipy import ndimage

SYMBOLS = "+-×÷:="  # ":" is the colon form of division
SYMBOL_CLASS = {"+": "+", "-": "-", "×": "×", "÷": "÷", ":": "÷", "=": "="}  # the operator class each symbol reads as
GENERATORS = ("A", "B")
MIN_HEIGHT = 8
INK_FLOOR = 0.03  # ink under this is background: the crop is tight around what a page's binarization would keep

# Generator A: the writer.
A_PEN_WIDTH = (0.06, 0.17)  # stroke width at full pressure, in digit heights (MNIST strokes are about 0.1-0.17)
A_MIN_PEN_PX = 1.4
A_JITTER = (0.004, 0.02)  # per-point wobble of the centre line, in digit heights
A_ROTATION_DEG = 9.0
A_SLANT = 0.22  # x shifted by this times -y at most: the writer's slant
A_WARP = (0.01, 0.05)  # elastic displacement at most, in digit heights
A_WARP_SMOOTHNESS = (0.08, 0.2)  # the displacement field's Gaussian sigma, in digit heights

# Generator B: the drafting pen.
B_SUPERSAMPLE = 4
B_PEN_WIDTH = (0.07, 0.15)
B_MIN_PEN_PX = 1.5
B_CURVATURE = 0.14  # a Bezier control point leaves the chord by up to this times the chord's length
B_ROTATION_DEG = 15.0
B_SHEAR = 0.25
B_ASPECT = (0.8, 1.25)
B_BLUR_PX = (0.3, 0.9)

Point = tuple[float, float]


def render_symbol(symbol: str, generator: str, rng: np.random.Generator, height: int) -> np.ndarray:
    """One handwritten `symbol` (one of SYMBOLS) by `generator` ("A" trains, "B" is held out), sized for a line whose
    digits are `height` px tall: float32 ink in [0, 1], ink 1 on background 0, cropped to the ink."""
    if symbol not in SYMBOLS:
        raise ValueError(f"symbol must be one of {' '.join(SYMBOLS)}, not {symbol!r}")
    if generator not in GENERATORS:
        raise ValueError(f"generator must be one of {', '.join(GENERATORS)}, not {generator!r}")
    if height < MIN_HEIGHT:
        raise ValueError(f"height must be at least {MIN_HEIGHT} px, not {height}")
    ink = _writer_symbol(symbol, rng, height) if generator == "A" else _drafted_symbol(symbol, rng, height)
    return crop_to_ink(ink)


def crop_to_ink(ink: np.ndarray) -> np.ndarray:
    """Ink under INK_FLOOR cleared and the rest cut to its bounding box (float32 in [0, 1])."""
    ink = np.clip(np.asarray(ink, np.float32), 0.0, 1.0)
    ink[ink < INK_FLOOR] = 0.0
    rows, cols = np.flatnonzero(ink.any(axis=1)), np.flatnonzero(ink.any(axis=0))
    if not len(rows):
        raise RuntimeError("the symbol came out without ink")  # never expected: every generator draws something
    return np.ascontiguousarray(ink[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1])


# --- generator A: polylines stamped with a pressure-varying disc, then an elastic warp ---------------------------


def _writer_symbol(symbol: str, rng: np.random.Generator, height: int) -> np.ndarray:
    """Generator A. Geometry in digit heights (x right, y down, about the origin), drawn at `height` px per unit."""
    pen = max(rng.uniform(*A_PEN_WIDTH), A_MIN_PEN_PX / height)  # the writer's pen at full pressure
    strokes, dots = _writer_layout(symbol, pen, rng)
    jitter = rng.uniform(*A_JITTER)
    lines = [_wobbly(points, jitter, rng) for points in strokes]
    radii = [pen / 2 * rng.uniform(0.85, 1.15) * _pressure(len(line), rng) for line in lines]
    for centre, size in dots:  # a dot is a short scribble of the same pen
        scribble = _dot_scribble(centre, size, pen, rng)
        lines.append(scribble)
        radii.append(np.full(len(scribble), max(pen / 2, size * 0.6)) * rng.uniform(0.9, 1.1, len(scribble)))
    pose = _rotation(rng.uniform(-A_ROTATION_DEG, A_ROTATION_DEG)) @ np.array(
        [[1.0, rng.uniform(-A_SLANT, A_SLANT)], [0.0, 1.0]]
    )
    lines = [line @ pose.T * height for line in lines]
    radii = [r * height for r in radii]
    warp = rng.uniform(*A_WARP) * height
    low = np.min([line.min(0) for line in lines], axis=0) - max(r.max() for r in radii) - warp - 2
    high = np.max([line.max(0) for line in lines], axis=0) + max(r.max() for r in radii) + warp + 2
    canvas = np.zeros((int(math.ceil(high[1] - low[1])), int(math.ceil(high[0] - low[0]))), np.float32)
    for line, r in zip(lines, radii, strict=True):
        _stamp_discs(canvas, _resampled(line - low, r), _resampled_radii(line, r))
    return _elastic_warp(canvas, warp, rng.uniform(*A_WARP_SMOOTHNESS) * height, rng)


def _writer_layout(
    symbol: str, pen: float, rng: np.random.Generator
) -> tuple[list[np.ndarray], list[tuple[Point, float]]]:
    """The symbol's strokes (centre lines through a few points) and dots ((x, y), radius), in digit heights. Parts
    that people keep apart (the bars of "=", a dot and the bar of "÷", the dots of ":") keep some paper between
    them even with a broad `pen`."""
    u = rng.uniform
    strokes: list[np.ndarray] = []
    dots: list[tuple[Point, float]] = []
    if symbol == "+":
        size = u(0.35, 0.7)
        across, down = size * u(0.75, 1.25), size * u(0.75, 1.25)
        cross_x, cross_y = u(0.3, 0.7), u(0.3, 0.7)  # where the strokes cross, along each
        strokes.append(_arm(across, cross_x, u(-10, 10), rng))
        strokes.append(_arm(down, cross_y, 90 + u(-10, 10), rng))
    elif symbol == "-":
        strokes.append(_arm(u(0.3, 0.7), 0.5, u(-7, 7), rng))
    elif symbol == "×":
        size = u(0.35, 0.7)
        strokes.append(_arm(size * u(0.85, 1.3), u(0.3, 0.7), u(28, 62), rng))
        strokes.append(_arm(size * u(0.85, 1.3), u(0.3, 0.7), 180 - u(28, 62), rng))
    elif symbol == "÷":
        width = u(0.35, 0.7)
        strokes.append(_arm(width, 0.5, u(-6, 6), rng))
        size = u(0.025, 0.075)
        for side in (-1, 1):
            dot_size = size * u(0.8, 1.2)
            clear = pen / 2 + max(dot_size, pen / 2) + u(0.3, 1.0) * pen  # bar to dot centre, at least
            dots.append(((width * u(-0.15, 0.15), side * max(u(0.09, 0.3), clear)), dot_size))
    elif symbol == ":":
        gap = u(0.14, 0.45)
        size = min(u(0.025, 0.08), gap * u(0.2, 0.32))
        gap = max(gap, 2 * max(size, pen / 2) + u(0.3, 1.0) * pen)
        lean = u(-0.2, 0.2) * gap  # the lower dot a little left or right of the upper one
        dots.append(((-lean / 2, -gap / 2), size * u(0.8, 1.2)))
        dots.append(((lean / 2, gap / 2), size * u(0.8, 1.2)))
    elif symbol == "=":
        width, tilt = u(0.35, 0.7), u(-6, 6)
        gap = max(u(0.09, 0.3), pen * u(1.3, 2.0))
        for side in (-1, 1):  # nearly parallel bars, each bowing a little
            bar = _arm(width * u(0.75, 1.25), 0.5, tilt + u(-2.5, 2.5), rng, bow=0.04)
            strokes.append(bar + (width * u(-0.12, 0.12), side * gap / 2))
    for i, stroke in enumerate(strokes):  # people draw a stroke either way
        if rng.random() < 0.25:
            strokes[i] = stroke[::-1]
    return strokes, dots


def _arm(length: float, cross: float, angle_deg: float, rng: np.random.Generator, bow: float = 0.08) -> np.ndarray:
    """A straight-ish stroke of `length` at `angle_deg` (0: left to right; 90: top to bottom) that passes the origin
    at fraction `cross` of its length, bowing by up to `bow` of its length; 9 points."""
    direction = np.array([math.cos(math.radians(angle_deg)), math.sin(math.radians(angle_deg))])
    t = np.linspace(0.0, 1.0, 9)
    points = (t - cross)[:, None] * length * direction
    bend = rng.uniform(-bow, bow) * length * 4 * t * (1 - t)
    hook = rng.uniform(-0.05, 0.05) * length * np.clip((t - 0.8) / 0.2, 0, 1) ** 2  # a flick at the end
    normal = np.array([-direction[1], direction[0]])
    return points + (bend + hook)[:, None] * normal


def _wobbly(points: np.ndarray, jitter: float, rng: np.random.Generator) -> np.ndarray:
    """The centre line with per-point jitter, smoothed along the stroke so it wavers instead of zigzagging."""
    noise = rng.normal(0.0, jitter, points.shape)
    if len(points) > 2:
        noise = ndimage.uniform_filter1d(noise, 3, axis=0, mode="nearest")
    return points + noise


def _pressure(count: int, rng: np.random.Generator) -> np.ndarray:
    """Pen pressure along a stroke of `count` points, 1 at full: lighter where the pen lands and lifts, wavering."""
    t = np.linspace(0.0, 1.0, count)
    landing, lifting = rng.uniform(0.4, 1.0), rng.uniform(0.3, 1.0)
    attack, release = rng.uniform(0.05, 0.35), rng.uniform(0.05, 0.4)
    rise = landing + (1 - landing) * np.clip(t / attack, 0, 1)
    fall = lifting + (1 - lifting) * np.clip((1 - t) / release, 0, 1)
    waver = 1 + rng.uniform(0.0, 0.2) * np.sin(2 * math.pi * (rng.uniform(0.3, 1.5) * t + rng.random()))
    return rise * fall * waver


def _dot_scribble(centre: Point, size: float, pen: float, rng: np.random.Generator) -> np.ndarray:
    """A dot as people make one: the pen put down and moved a little (a few points around `centre`)."""
    count = int(rng.integers(2, 6))
    reach = max(size - pen / 2, 0.0) * rng.uniform(0.3, 1.0)
    angles = rng.uniform(0, 2 * math.pi) + np.linspace(0, rng.uniform(0.5, 2) * math.pi, count)
    return np.asarray(centre) + reach * np.stack([np.cos(angles), np.sin(angles)], axis=1) * rng.uniform(
        0.5, 1.0, (count, 1)
    )


def _rotation(angle_deg: float) -> np.ndarray:
    c, s = math.cos(math.radians(angle_deg)), math.sin(math.radians(angle_deg))
    return np.array([[c, -s], [s, c]])


def _resampled(line: np.ndarray, radii: np.ndarray) -> np.ndarray:
    """Points every so often along the polyline: close enough (a third of the radius, at most 0.5 px) that the
    stamped discs make a smooth stroke."""
    return _along(line, radii, line)


def _resampled_radii(line: np.ndarray, radii: np.ndarray) -> np.ndarray:
    return _along(line, radii, radii[:, None])[:, 0]


def _along(line: np.ndarray, radii: np.ndarray, values: np.ndarray) -> np.ndarray:
    """`values` (one row per point of `line`) interpolated at the stamping positions along `line`."""
    if len(line) == 1:
        return values.copy()
    lengths = np.hypot(*np.diff(line, axis=0).T)
    arc = np.concatenate([[0.0], np.cumsum(lengths)])
    step = max(0.2, min(0.5, float(radii.min()) / 3))
    at = np.linspace(0.0, arc[-1], max(2, int(math.ceil(arc[-1] / step)) + 1))
    return np.stack([np.interp(at, arc, values[:, k]) for k in range(values.shape[1])], axis=1)


def _stamp_discs(canvas: np.ndarray, centres: np.ndarray, radii: np.ndarray) -> None:
    """Stamp an anti-aliased disc of radius `radii[i]` at each of `centres` (x, y) into `canvas` (kept: the max)."""
    reach = float(radii.max()) + 1.5
    x0, y0 = (np.floor(centres.min(axis=0) - reach).astype(int)).clip(0)
    x1 = min(canvas.shape[1], int(math.ceil(centres[:, 0].max() + reach)) + 1)
    y1 = min(canvas.shape[0], int(math.ceil(centres[:, 1].max() + reach)) + 1)
    ys, xs = np.mgrid[y0:y1, x0:x1].astype(np.float32) + 0.5  # pixel centres
    window = canvas[y0:y1, x0:x1]
    for chunk in range(0, len(centres), 64):
        c, r = centres[chunk : chunk + 64], radii[chunk : chunk + 64]
        distance = np.hypot(xs[..., None] - c[:, 0], ys[..., None] - c[:, 1])
        np.maximum(window, np.clip(r - distance + 0.5, 0.0, 1.0).max(axis=-1), out=window)


def _elastic_warp(canvas: np.ndarray, amplitude: float, smoothness: float, rng: np.random.Generator) -> np.ndarray:
    """The raster bent by a smooth random displacement field of at most `amplitude` px."""
    if amplitude < 0.3:
        return canvas
    field = []
    for _ in range(2):
        noise = ndimage.gaussian_filter(rng.uniform(-1.0, 1.0, canvas.shape), smoothness, mode="constant")
        field.append(noise / max(float(np.abs(noise).max()), 1e-9) * amplitude)
    rows, cols = np.indices(canvas.shape, dtype=np.float64)
    return ndimage.map_coordinates(canvas, [rows + field[0], cols + field[1]], order=1, mode="constant")


# --- generator B: Bezier strokes with a constant-width round pen (PIL at 4x), affine, blur ------------------------


def _drafted_symbol(symbol: str, rng: np.random.Generator, height: int) -> np.ndarray:
    """Generator B. Geometry in digit heights about the origin, drawn by PIL at B_SUPERSAMPLE x `height` px a unit."""
    pen = max(rng.uniform(*B_PEN_WIDTH), B_MIN_PEN_PX / height)
    curves, ellipses = _drafted_layout(symbol, pen, rng)
    scale = height * B_SUPERSAMPLE
    extent = max(
        [float(np.abs(curve).max()) for curve in curves]
        + [max(abs(x), abs(y)) + max(rx, ry) for (x, y), rx, ry in ellipses]
    )
    side = int(math.ceil((2 * extent * 1.6 + 2 * pen) * scale)) + 8 * B_SUPERSAMPLE  # room for the affine map
    origin = side / 2
    image = Image.new("L", (side, side), 0)
    draw = ImageDraw.Draw(image)
    for curve in curves:
        width = max(1, round(pen * rng.uniform(0.9, 1.1) * scale))
        points = [(origin + x * scale, origin + y * scale) for x, y in curve]
        draw.line(points, fill=255, width=width, joint="curve")
        for x, y in (points[0], points[-1]):  # round caps
            draw.ellipse((x - width / 2, y - width / 2, x + width / 2, y + width / 2), fill=255)
    for (x, y), rx, ry in ellipses:
        cx, cy = origin + x * scale, origin + y * scale
        draw.ellipse((cx - rx * scale, cy - ry * scale, cx + rx * scale, cy + ry * scale), fill=255)
    image = _random_affine(image, rng)
    image = image.reduce(B_SUPERSAMPLE)
    image = image.filter(ImageFilter.GaussianBlur(rng.uniform(*B_BLUR_PX)))
    return np.asarray(image, np.float32) / 255.0


def _drafted_layout(
    symbol: str, pen: float, rng: np.random.Generator
) -> tuple[list[np.ndarray], list[tuple[Point, float, float]]]:
    """Bezier curves (sampled) and filled ellipses ((x, y), rx, ry), in digit heights about the origin; with a broad
    `pen` the parts of "=", "÷" and ":" still keep paper between them, as a legible symbol does."""
    u = rng.uniform
    curves: list[np.ndarray] = []
    ellipses: list[tuple[Point, float, float]] = []

    def dot(x: float, y: float, radius: float) -> None:
        aspect = u(0.75, 1.3)
        ellipses.append(((x, y), radius * aspect, radius / aspect))

    if symbol == "+":
        size = u(0.4, 0.72)
        w, h = size * u(0.85, 1.2), size * u(0.85, 1.2)
        dx, dy = u(-0.15, 0.15) * w, u(-0.15, 0.15) * h  # the crossing away from the middles
        curves.append(_bezier((-w / 2 + dx, u(-0.04, 0.04) * w), (w / 2 + dx, u(-0.04, 0.04) * w), rng))
        curves.append(_bezier((u(-0.04, 0.04) * h, -h / 2 + dy), (u(-0.04, 0.04) * h, h / 2 + dy), rng))
    elif symbol == "-":
        w = u(0.35, 0.7)
        curves.append(_bezier((-w / 2, u(-0.03, 0.03) * w), (w / 2, u(-0.03, 0.03) * w), rng, curvature=0.1))
    elif symbol == "×":
        w, h = u(0.32, 0.65), u(0.32, 0.65)
        curves.append(_bezier((-w / 2, -h / 2), (w / 2 * u(0.8, 1.1), h / 2 * u(0.8, 1.1)), rng))
        curves.append(_bezier((w / 2 * u(0.8, 1.1), -h / 2 * u(0.8, 1.1)), (-w / 2, h / 2), rng))
    elif symbol == "÷":
        w, radius = u(0.4, 0.75), u(0.03, 0.07)
        distance = max(u(0.12, 0.32), pen / 2 + radius * 1.3 + u(0.4, 1.2) * pen)
        curves.append(_bezier((-w / 2, 0.0), (w / 2, u(-0.03, 0.03) * w), rng, curvature=0.08))
        dot(u(-0.1, 0.1) * w, -distance, radius)
        dot(u(-0.1, 0.1) * w, distance * u(1.0, 1.15), radius * u(0.85, 1.15))
    elif symbol == ":":
        gap = u(0.18, 0.5)
        radius = min(u(0.035, 0.08), gap * 0.3)
        dot(0.0, -gap / 2, radius)
        dot(u(-0.1, 0.1) * gap, gap / 2, radius * u(0.85, 1.15))
    elif symbol == "=":
        w = u(0.36, 0.7)
        gap = max(u(0.12, 0.35), pen * u(1.5, 2.2))
        for side in (-1, 1):
            length, shift = w * u(0.85, 1.15), u(-0.08, 0.08) * w
            start, end = (shift - length / 2, side * gap / 2), (shift + length / 2, side * gap / 2)
            curves.append(_bezier(start, end, rng, curvature=0.05))
    return curves, ellipses


def _bezier(
    start: Point, end: Point, rng: np.random.Generator, curvature: float = B_CURVATURE, samples: int = 24
) -> np.ndarray:
    """A quadratic or cubic Bezier from `start` to `end`, its control points off the chord by up to `curvature` times
    its length (a cubic may bend both ways: an S)."""
    p0, p3 = np.asarray(start, np.float64), np.asarray(end, np.float64)
    chord = p3 - p0
    length = float(np.hypot(*chord)) or 1e-6
    normal = np.array([-chord[1], chord[0]]) / length
    t = np.linspace(0.0, 1.0, samples)[:, None]
    if rng.random() < 0.5:
        control = (p0 + p3) / 2 + normal * rng.uniform(-curvature, curvature) * length
        return (1 - t) ** 2 * p0 + 2 * (1 - t) * t * control + t**2 * p3
    c1 = p0 + chord / 3 + normal * rng.uniform(-curvature, curvature) * length
    c2 = p0 + 2 * chord / 3 + normal * rng.uniform(-curvature, curvature) * length
    return (1 - t) ** 3 * p0 + 3 * (1 - t) ** 2 * t * c1 + 3 * (1 - t) * t**2 * c2 + t**3 * p3


def _random_affine(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """The raster rotated (up to B_ROTATION_DEG), sheared and stretched about its centre."""
    angle = math.radians(rng.uniform(-B_ROTATION_DEG, B_ROTATION_DEG))
    aspect = math.exp(rng.uniform(math.log(B_ASPECT[0]), math.log(B_ASPECT[1])))
    forward = (
        np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
        @ np.array([[1.0, rng.uniform(-B_SHEAR, B_SHEAR)], [0.0, 1.0]])
        @ np.diag([math.sqrt(aspect), 1 / math.sqrt(aspect)])
    )
    inverse = np.linalg.inv(forward)  # PIL maps each output pixel back to the input
    centre = np.array(image.size, np.float64) / 2
    offset = centre - inverse @ centre
    data = (inverse[0, 0], inverse[0, 1], offset[0], inverse[1, 0], inverse[1, 1], offset[1])
    return image.transform(image.size, Image.Transform.AFFINE, data, resample=Image.Resampling.BICUBIC)
