"""Turn request payloads into model input the way MNIST itself was made.

MNIST digits are light ink on a dark background, cropped to the ink, scaled so the longer side
is 20 px (aspect kept), and placed in a 28x28 field by their centre of mass. An encoded image
(a photo or scan of a digit on paper, any size) goes through the same steps here, after the paper's
uneven light (a gradient, a vignette, a shadow) is taken away. Raw 784-byte payloads are already in
that layout and are only normalized, many at once.
"""

from __future__ import annotations

import io
import zlib
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from proto.contract import IMAGE_SIDE, INPUT_SHAPE, RAW_BYTES, Normalization

DIGIT_BOX = 20
ALLOWED_FORMATS = ("PNG", "JPEG", "BMP", "GIF", "WEBP")
# `max_pixels` (checked from the header, before decoding) replaces Pillow's process-wide bomb guard,
# so the limit is the operator's and the error message names the image's size.
# Truncated files stay errors (Pillow's default), never half-decoded images.
Image.MAX_IMAGE_PIXELS = None
INK_THRESHOLD = 0.25  # fraction of the ink's contrast above which a pixel counts as ink for the bounding box


class InvalidImage(ValueError):
    """The payload cannot be turned into a digit image; the message says why (sent to the client)."""


class DecodeStopped(Exception):
    """Decoding was abandoned between steps: the caller's deadline passed or the caller went away."""


# The checkpoint between decode steps: returns why to stop (the caller's deadline passed, the caller went
# away) or None to go on. Pillow cannot be interrupted inside one step, which is why steps are bounded in pixels.
StopCheck = Callable[[], str | None]

JPEG_SCALES = (1, 2, 4, 8)  # libjpeg decodes at 1/1, 1/2, 1/4 or 1/8 of the size for (almost) the cost of the output
WORK_PIXELS = 1_000_000  # images are reduced to about this before the float steps: a 28x28 answer needs no more
BLANK_RAW_SPREAD = 26  # raw pixels: brightest minus darkest under this (0.1 of the range) is a blank image
RAW_BLANK = "raw image is blank: no digit stands out from the background (all pixels within {spread} gray levels)"
HIGH_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")
PAPER_GRID_SIDE = 64  # the paper's light is estimated on a copy about this many pixels on its shorter side...
PAPER_CELL = 8  # ...in cells of this many pixels a side (so about 8 cells across the shorter side)
PAPER_CELL_PERCENTILE = 10  # a cell's paper level: only a cell almost filled with ink reads as ink
PAPER_TOLERANCE = 0.05  # a cell more than this above the fitted paper holds ink (paper grain and stains are less)


def raw_length_problem(raw: bytes) -> str | None:
    if len(raw) != RAW_BYTES:
        return f"raw image must be exactly {RAW_BYTES} bytes ({IMAGE_SIDE}x{IMAGE_SIDE} uint8), got {len(raw)}"
    return None


def blank_raw_rows(pixels: np.ndarray) -> np.ndarray:
    """Indices of raw (N, 1, 28, 28) uint8 images with no contrast: nothing there to classify."""
    flat = pixels.reshape(len(pixels), -1)
    return np.flatnonzero(flat.max(1) - flat.min(1) < BLANK_RAW_SPREAD)


def from_raw(raw: bytes, norm: Normalization) -> np.ndarray:
    """One raw image -> (1, 28, 28) float32."""
    if problem := raw_length_problem(raw):
        raise InvalidImage(problem)
    pixels = np.frombuffer(raw, dtype=np.uint8).reshape(1, *INPUT_SHAPE)
    if len(blank_raw_rows(pixels)):
        raise InvalidImage(RAW_BLANK.format(spread=BLANK_RAW_SPREAD))
    return norm.apply(pixels[0])


@dataclass
class OpenedImage:
    """An image whose header is read and whose decode size is fixed; no pixel decoded yet."""

    image: Image.Image
    format: str
    size: tuple[int, int]  # as stored in the file
    scale: int  # JPEG: decoded at 1/scale per side; else 1
    data: bytes = b""  # the file, for checks over all of it at decode time

    @property
    def pixels(self) -> int:
        """Pixels the decode will produce: what the decode budgets count."""
        width, height = self.image.size
        return width * height


def open_image(data: bytes, max_pixels: int) -> OpenedImage:
    """Read the header only and fix how the image will be decoded, within `max_pixels`.

    A JPEG is decoded at the smallest libjpeg scale that keeps about WORK_PIXELS (never more than
    `max_pixels`), so a 48-megapixel photo costs what a 0.75-megapixel one does. Other formats
    cannot be decoded smaller, so one over `max_pixels` is refused here, before it costs anything.
    """
    if not data:
        raise InvalidImage("encoded image is empty")
    try:
        image = Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
    except UnidentifiedImageError:
        raise InvalidImage(f"bytes are not an image in a supported format ({', '.join(ALLOWED_FORMATS)})") from None
    except Exception as exc:  # noqa: BLE001 - Pillow raises many types for damaged headers
        raise InvalidImage(f"image header is damaged ({exc})") from None
    width, height = image.size
    if width < 1 or height < 1:
        raise InvalidImage(f"image is {width}x{height}: it has no pixels")
    scale = 1
    if image.format == "JPEG":
        fits = [s for s in JPEG_SCALES if _ceil_div(width, s) * _ceil_div(height, s) <= max_pixels]
        if not fits:
            raise InvalidImage(
                f"JPEG is {width}x{height} = {width * height:,} pixels: even decoded at 1/8 scale it is over the "
                f"limit of {max_pixels:,} pixels"
            )
        enough = [s for s in fits if _ceil_div(width, s) * _ceil_div(height, s) >= WORK_PIXELS]
        scale = enough[-1] if enough else fits[0]
        if scale > 1:
            # Pillow picks the largest libjpeg scale with size // requested >= scale: ask for the floor
            image.draft(image.mode, (max(1, width // scale), max(1, height // scale)))
        decoded = image.size[0] * image.size[1]
        if decoded > max_pixels:  # never trust the arithmetic above with the memory limit
            raise InvalidImage(
                f"JPEG is {width}x{height}: decoded at {image.size[0]}x{image.size[1]} it is over the limit of "
                f"{max_pixels:,} pixels"
            )
    elif width * height > max_pixels:
        raise InvalidImage(
            f"{image.format} image is {width}x{height} = {width * height:,} pixels, over the limit of "
            f"{max_pixels:,} (only JPEG can be decoded at a reduced size; send a smaller image)"
        )
    return OpenedImage(image, image.format or "?", (width, height), scale, data)


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def png_chunk_problem(data: bytes) -> str | None:
    """What is wrong with a PNG's chunk structure, or None: every chunk's CRC is checked (Pillow checks only
    some), so a corrupted file is refused instead of decoded into a wrong picture. Costs one crc32 pass."""
    at = len(PNG_SIGNATURE)
    while at + 12 <= len(data):
        length = int.from_bytes(data[at : at + 4], "big")
        kind = data[at + 4 : at + 8]
        end = at + 12 + length
        if end > len(data):
            return f"chunk {kind.decode('latin-1')!r} needs {length:,} bytes, the file ends first"
        if zlib.crc32(data[at + 4 : end - 4]) != int.from_bytes(data[end - 4 : end], "big"):
            return f"chunk {kind.decode('latin-1')!r} fails its CRC check"
        if kind == b"IEND":
            return None
        at = end
    return "the file ends before its IEND chunk"


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def from_encoded(data: bytes, norm: Normalization, max_pixels: int) -> np.ndarray:
    """One image file (PNG, JPEG, ...) of a digit on paper -> (1, 28, 28) float32 in MNIST's layout."""
    return from_opened(open_image(data, max_pixels), norm)


def from_opened(opened: OpenedImage, norm: Normalization, stop: StopCheck = lambda: None) -> np.ndarray:
    """The rest of `from_encoded` once the header is read and the decode budget granted; checks `stop` between steps."""
    gray = decode_opened(opened, stop)
    _checkpoint(stop)
    return norm.apply(mnist_like(gray)[None])


def _checkpoint(stop: StopCheck) -> None:
    if reason := stop():
        raise DecodeStopped(reason)


def decode(data: bytes, max_pixels: int) -> np.ndarray:
    """An image file -> grayscale float32 in [0, 1], alpha composited on white, reduced to about WORK_PIXELS."""
    return decode_opened(open_image(data, max_pixels))


def decode_opened(opened: OpenedImage, stop: StopCheck = lambda: None) -> np.ndarray:
    """`decode` once the header is read: the pixels, with `stop` checked before and after the expensive step."""
    image = opened.image
    _checkpoint(stop)
    if opened.format == "PNG" and (problem := png_chunk_problem(opened.data)):
        raise InvalidImage(f"PNG image data is damaged or truncated ({problem})")
    try:
        image.load()  # the one expensive step; Pillow refuses truncated data here
        _checkpoint(stop)
        image = ImageOps.exif_transpose(image)
        gray = _to_gray(image)
    except (InvalidImage, DecodeStopped):
        raise
    except Exception as exc:  # noqa: BLE001 - Pillow raises many types for damaged files (OSError, SyntaxError, ...)
        raise InvalidImage(f"{opened.format} image data is damaged or truncated ({exc})") from None
    if gray.size == 0:
        raise InvalidImage("image has no pixels")
    return gray


def _to_gray(image: Image.Image) -> np.ndarray:
    """Any Pillow mode -> float32 [0, 1]: high bit depths scaled by their range, alpha on white, colour to luma."""
    if image.mode in HIGH_BIT_MODES:
        values = np.asarray(image, dtype=np.float32)
        top = 65535.0 if image.mode.startswith("I;16") else _value_range(values)
        gray = np.clip(values / top, 0.0, 1.0)
        if gray.size > WORK_PIXELS:
            gray = np.asarray(_reduced(Image.fromarray(gray, "F")), np.float32)
        return gray
    if image.mode in ("P", "PA", "LA", "La", "RGBA", "RGBa") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        image = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    if image.mode not in ("L", "1", "RGB", "RGBA"):
        image = image.convert("RGB")  # CMYK, YCbCr, LAB, HSV, ...: through RGB, as Pillow knows each
    return np.asarray(_reduced(image.convert("L")), dtype=np.float32) / 255.0


def _value_range(values: np.ndarray) -> float:
    """The full scale of a 32-bit integer or float image, from its contents: 1, 255, 65535 or its maximum."""
    top = float(values.max()) if values.size else 1.0
    for scale in (1.0, 255.0, 65535.0):
        if top <= scale:
            return scale
    return top


def _reduced(image: Image.Image) -> Image.Image:
    """An image of more than WORK_PIXELS made about that size (box filter: every pixel counts, cheaply)."""
    width, height = image.size
    if width * height <= WORK_PIXELS:
        return image
    factor = (width * height / WORK_PIXELS) ** 0.5
    return image.resize((max(1, round(width / factor)), max(1, round(height / factor))), Image.Resampling.BOX)


def box_blur(image: np.ndarray, k: int) -> np.ndarray:
    """Mean over k x k neighbourhoods (edges replicated), via an integral image."""
    if k <= 1:
        return image
    pad = k // 2
    padded = np.pad(image, ((pad + 1, k - pad - 1), (pad + 1, k - pad - 1)), mode="edge")
    padded[0, :] = 0
    padded[:, 0] = 0
    integral = padded.cumsum(0).cumsum(1)
    return (integral[k:, k:] - integral[:-k, k:] - integral[k:, :-k] + integral[:-k, :-k]) / (k * k)


def paper_light(ink: np.ndarray) -> np.ndarray:
    """The paper's own level under the ink (same shape as `ink`, light ink on dark): a smooth surface, so a photo
    lit from one side, a vignette or a soft shadow is not taken for ink.

    Each cell of a coarse grid gives a low percentile (the paper between strokes). A quadratic surface is fitted to
    the cells from below (`_fit_from_below`); where under half of the cells end up as paper, ink fills much of the
    frame and a plane is fitted instead, which cannot bend around strokes. The surface is clipped between the
    lowest cell and the highest paper cell (plus the tolerance). On a scan or a drawing it is flat; an image too
    small for the grid gets one level, its median.
    """
    height, width = ink.shape
    factor = max(1.0, min(height, width) / PAPER_GRID_SIDE)  # reduced, never enlarged
    rows = round(height / factor) // PAPER_CELL
    cols = round(width / factor) // PAPER_CELL
    if rows * cols < 9:
        return np.full(ink.shape, float(np.median(ink)), np.float32)
    grid = np.asarray(
        Image.fromarray(ink).resize((cols * PAPER_CELL, rows * PAPER_CELL), Image.Resampling.BOX), np.float32
    )
    cells = grid.reshape(rows, PAPER_CELL, cols, PAPER_CELL).transpose(0, 2, 1, 3).reshape(rows * cols, -1)
    low = PAPER_CELL * PAPER_CELL * PAPER_CELL_PERCENTILE // 100
    level = np.partition(cells, low, axis=1)[:, low]
    y, x = (np.indices((rows, cols)).reshape(2, -1) + 0.5) / np.array([[rows], [cols]]) - 0.5
    quadratic = np.stack([np.ones_like(x), x, y, x * x, x * y, y * y], axis=1)
    coefficients, paper = _fit_from_below(quadratic, level)
    if paper.mean() < 0.5:  # ink fills much of the frame: a quadratic could bend around it, a plane cannot
        plane, paper = _fit_from_below(quadratic[:, :3], level)
        coefficients = np.r_[plane, 0.0, 0.0, 0.0]
    c, cx, cy, cxx, cxy, cyy = coefficients.astype(np.float32)
    ys = (np.arange(height, dtype=np.float32) + 0.5) / height - 0.5
    xs = (np.arange(width, dtype=np.float32) + 0.5) / width - 0.5
    surface = np.multiply.outer(cxy * ys, xs)  # one image-sized array, filled in place
    surface += (c + cy * ys + cyy * ys * ys)[:, None]
    surface += (cx * xs + cxx * xs * xs)[None, :]
    # a quadratic fitted on some cells can overshoot between and beyond them (the frame's corners)
    return np.clip(surface, level.min(), level[paper].max() + PAPER_TOLERANCE, out=surface)


def _fit_from_below(terms: np.ndarray, level: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Least squares of `level` on `terms` over the cells that are paper: first the lower half, then every cell
    not above the last fit by more than PAPER_TOLERANCE, until that set stops changing (at most 8 passes; a set of
    under twice as many cells as terms is not fitted, the last fit stands). -> (coefficients, paper)."""
    paper = level <= _middle(level)
    for _ in range(8):
        chosen = terms[paper]
        coefficients = np.linalg.solve(chosen.T @ chosen + 1e-9 * np.eye(terms.shape[1]), chosen.T @ level[paper])
        refit = level - terms @ coefficients <= PAPER_TOLERANCE
        if refit.sum() < 2 * terms.shape[1] or (refit == paper).all():
            break
        paper = refit
    return coefficients, paper


def _middle(values: np.ndarray) -> float:
    """The median of a few values (the upper one of an even count), without np.median's overhead."""
    half = len(values) // 2
    return float(np.partition(values, half)[half])


def mnist_like(gray: np.ndarray) -> np.ndarray:
    """Grayscale [0, 1] of any size -> 28x28 float in [0, 255], light digit centred by mass on dark."""
    border = np.concatenate([gray[0], gray[-1], gray[:, 0], gray[:, -1]])
    on_paper = bool(np.median(border) > 0.5)  # dark ink on light paper: inverted, and lit
    ink = 1.0 - gray if on_paper else gray.copy()
    background = paper_light(ink)
    # Strokes are found on a blurred copy (about 1/64 of the image wide): sensor noise and paper texture
    # average out there, while a digit of any size on any page keeps its peak.
    blur = max(1, round(min(ink.shape) / 64))
    smooth = box_blur(ink, blur) - background
    contrast = float(smooth.max())
    if contrast < 0.1:
        raise InvalidImage("image is blank: no digit stands out from the background")
    rows, cols = np.nonzero(smooth > INK_THRESHOLD * contrast)
    top, bottom = max(rows.min() - blur, 0), rows.max() + 1 + blur
    left, right = max(cols.min() - blur, 0), cols.max() + 1 + blur
    crop = ink[top:bottom, left:right] - background[top:bottom, left:right]
    if on_paper:  # ink darkens the light falling on it: where the paper is dimmer, its strokes are fainter
        crop /= np.maximum(1.0 - background[top:bottom, left:right], 0.05)
    crop = np.clip(crop / max(float(np.percentile(crop, 99)), contrast), 0.0, 1.0)
    crop[crop < INK_THRESHOLD / 2] = 0.0  # paper texture and noise inside the box
    return fit_to_mnist_box(crop)


def fit_to_mnist_box(crop: np.ndarray) -> np.ndarray:
    """A digit's ink, cropped to its box (float, ink 1 on background 0) -> 28x28 float in [0, 255] as in MNIST:
    longest side scaled to 20 px, centred by mass. ReadDigits prepares each digit it finds with it too."""
    height, width = crop.shape
    scale = DIGIT_BOX / max(height, width)
    new_size = (max(1, round(width * scale)), max(1, round(height * scale)))
    digit = np.asarray(Image.fromarray(crop * 255.0).resize(new_size, Image.Resampling.LANCZOS), dtype=np.float32)
    digit = np.clip(digit, 0.0, 255.0)
    canvas = np.zeros((IMAGE_SIDE, IMAGE_SIDE), dtype=np.float32)
    total = digit.sum()
    cy, cx = ((np.indices(digit.shape) * digit).reshape(2, -1).sum(1) / total) if total > 0 else (0.0, 0.0)
    top = int(round(IMAGE_SIDE / 2 - cy))
    left = int(round(IMAGE_SIDE / 2 - cx))
    top = min(max(top, 0), IMAGE_SIDE - digit.shape[0])
    left = min(max(left, 0), IMAGE_SIDE - digit.shape[1])
    canvas[top : top + digit.shape[0], left : left + digit.shape[1]] = digit
    return canvas
