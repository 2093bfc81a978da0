"""Turn request payloads into model input the way MNIST itself was made.

MNIST digits are light ink on a dark background, cropped to the ink, scaled so the longer side
is 20 px (aspect kept), and placed in a 28x28 field by their centre of mass. An encoded image
(a photo or scan of a digit on paper, any size) goes through the same steps here. Raw 784-byte
payloads are already in that layout and are only normalized, many at once.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from proto.contract import IMAGE_SIDE, INPUT_SHAPE, RAW_BYTES, Normalization

DIGIT_BOX = 20
ALLOWED_FORMATS = ("PNG", "JPEG", "BMP", "GIF", "WEBP")
# `max_pixels` (checked from the header, before decoding) replaces Pillow's process-wide bomb guard,
# so the limit is the operator's and the error message names the image's size.
Image.MAX_IMAGE_PIXELS = None
INK_THRESHOLD = 0.25  # fraction of the ink's contrast above which a pixel counts as ink for the bounding box


class InvalidImage(ValueError):
    """The payload cannot be turned into a digit image; the message says why (sent to the client)."""


def raw_length_problem(raw: bytes) -> str | None:
    if len(raw) != RAW_BYTES:
        return f"raw image must be exactly {RAW_BYTES} bytes ({IMAGE_SIDE}x{IMAGE_SIDE} uint8), got {len(raw)}"
    return None


def from_raw(raw: bytes, norm: Normalization) -> np.ndarray:
    """One raw image -> (1, 28, 28) float32."""
    if problem := raw_length_problem(raw):
        raise InvalidImage(problem)
    return norm.apply(np.frombuffer(raw, dtype=np.uint8).reshape(INPUT_SHAPE))


def from_encoded(data: bytes, norm: Normalization, max_pixels: int) -> np.ndarray:
    """One image file (PNG, JPEG, ...) of a digit on paper -> (1, 28, 28) float32 in MNIST's layout."""
    return norm.apply(mnist_like(decode(data, max_pixels))[None])


def decode(data: bytes, max_pixels: int) -> np.ndarray:
    """Decode an image file to grayscale float32 in [0, 1] with alpha composited on white."""
    if not data:
        raise InvalidImage("encoded image is empty")
    try:
        image = Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
        width, height = image.size  # known from the header, before any pixel is decoded
        if width * height > max_pixels:
            raise InvalidImage(
                f"image is {width}x{height} = {width * height:,} pixels, over the limit of {max_pixels:,}"
            )
        image = ImageOps.exif_transpose(image)
        if image.mode in ("P", "PA", "LA", "RGBA", "La") or "transparency" in image.info:
            rgba = image.convert("RGBA")
            white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            image = Image.alpha_composite(white, rgba)
        gray = np.asarray(image.convert("L"), dtype=np.float32) / 255.0
    except InvalidImage:
        raise
    except UnidentifiedImageError:
        raise InvalidImage(f"bytes are not an image in a supported format ({', '.join(ALLOWED_FORMATS)})") from None
    except Exception as exc:  # Pillow raises many types for damaged files (OSError, SyntaxError, ...)
        raise InvalidImage(f"image data is damaged or truncated ({exc})") from None
    if gray.size == 0:
        raise InvalidImage("image has no pixels")
    return gray


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


def mnist_like(gray: np.ndarray) -> np.ndarray:
    """Grayscale [0, 1] of any size -> 28x28 float in [0, 255], light digit centred by mass on dark."""
    border = np.concatenate([gray[0], gray[-1], gray[:, 0], gray[:, -1]])
    ink = 1.0 - gray if np.median(border) > 0.5 else gray.copy()  # dark ink on light paper: invert
    background = float(np.median(ink))
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
    crop = ink[top:bottom, left:right] - background
    crop = np.clip(crop / max(float(np.percentile(crop, 99)), contrast), 0.0, 1.0)
    crop[crop < INK_THRESHOLD / 2] = 0.0  # paper texture and noise inside the box
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
