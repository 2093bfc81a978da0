"""Crafted images for `mnist-attack`: digits in every colour mode, damaged files, blanks, non-digits, bombs.

Everything is made here with Pillow and numpy from MNIST test digits (dark ink on white paper,
scaled up, the way a client photographs or scans a digit), so a test can check that each file
really is what its name says (`tests/test_attack.py`): the bomb is 6000x6000 and small, the 16-bit
PNG opens as I;16, the EXIF-rotated JPEG turns upright when its orientation is applied.
"""

from __future__ import annotations

import io
import struct
import zlib
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from proto.contract import IMAGE_SIDE

PAPER_SIDE = 112  # 4x MNIST, the size a client would send a scanned digit at
EXIF_ORIENTATION = 0x0112


@dataclass(frozen=True)
class Case:
    """One crafted payload: `raw` (784 bytes, MNIST layout) or an encoded file; `label` when it is a digit."""

    name: str
    what: str  # what was sent, in words (for the report)
    data: bytes
    raw: bool = False
    label: int | None = None
    index: int | None = None  # the MNIST test digit it was made from, if any


# --- MNIST digits ------------------------------------------------------------------------------------


@lru_cache(maxsize=1)
def mnist_test() -> tuple[np.ndarray, np.ndarray]:
    """(images (N, 28, 28) uint8 light-on-dark, labels (N,)) of the MNIST test split."""
    from training.data import load_split

    split = load_split("test")
    return split.images, split.labels


def digit_indices(count: int, start: int = 0) -> list[int]:
    """`count` test-set indices whose labels cycle 7, 2, 1, 0, 4, 9, 5, 6, 3, 8 (several digits, not just one)."""
    _, labels = mnist_test()
    order = [7, 2, 1, 0, 4, 9, 5, 6, 3, 8]
    chosen: list[int] = []
    position = {digit: start for digit in order}
    while len(chosen) < count:
        digit = order[len(chosen) % len(order)]
        index = int(np.flatnonzero(labels[position[digit] :] == digit)[0]) + position[digit]
        position[digit] = index + 1
        chosen.append(index)
    return chosen


def paper(image28: np.ndarray, side: int = PAPER_SIDE) -> np.ndarray:
    """An MNIST digit as dark ink on white paper, `side` x `side`, uint8 (0 = black ink, 255 = paper)."""
    big = Image.fromarray(np.asarray(image28, np.uint8)).resize((side, side), Image.Resampling.BILINEAR)
    return 255 - np.asarray(big, np.uint8)


def encode(image: Image.Image, fmt: str, **options) -> bytes:
    out = io.BytesIO()
    image.save(out, fmt, **options)
    return out.getvalue()


# --- digits in every mode ----------------------------------------------------------------------------


def png_i16(ink: np.ndarray) -> bytes:
    """16-bit grayscale PNG (opens as mode I;16): the full 0..65535 range, dark ink on white."""
    return encode(Image.fromarray(ink.astype(np.uint16) * 257), "PNG")


def png_i32_high(ink: np.ndarray) -> bytes:
    """A mode-I (32-bit int) image of a digit whose every value is above 255 (ink 20000, paper 60000).

    PNG has no 32-bit grayscale and Pillow 13 refuses to write mode I as PNG, so it travels as the
    deepest PNG gray there is, 16 bits; a server that clips to 8 bits sees a blank white page."""
    values = (20000 + ink.astype(np.int32) * (40000 // 255)).astype(np.int32)
    image = Image.fromarray(values)  # mode I
    return encode(Image.fromarray(np.asarray(image, np.int32).astype(np.uint16)), "PNG")


def png_palette_alpha(ink: np.ndarray) -> bytes:
    """Palette PNG with per-entry alpha: 16 grays, the paper entry fully transparent, the ink opaque."""
    levels = ((ink.astype(np.int32) * 15 + 127) // 255).astype(np.uint8)  # 0 = black ink .. 15 = paper
    image = Image.frombytes("P", (ink.shape[1], ink.shape[0]), levels.tobytes())
    image.putpalette([c for level in range(16) for c in (level * 17,) * 3] + [0, 0, 0] * 240)
    alpha = bytes([255] * 15 + [0] + [255] * 240)
    return encode(image, "PNG", transparency=alpha)


def png_la_black(ink: np.ndarray) -> bytes:
    """LA PNG: black everywhere, the digit only in the alpha channel (transparent paper)."""
    alpha = 255 - ink
    la = np.stack([np.zeros_like(ink), alpha], axis=-1).astype(np.uint8)
    return encode(Image.fromarray(la, "LA"), "PNG")


def png_rgba_transparent(ink: np.ndarray) -> bytes:
    """RGBA PNG: black ink, fully transparent background whose hidden colour is also black."""
    alpha = 255 - ink
    rgba = np.zeros((*ink.shape, 4), np.uint8)
    rgba[..., 3] = alpha
    return encode(Image.fromarray(rgba, "RGBA"), "PNG")


def jpeg_cmyk(ink: np.ndarray) -> bytes:
    return encode(Image.fromarray(ink).convert("RGB").convert("CMYK"), "JPEG", quality=92)


def png_bilevel(ink: np.ndarray) -> bytes:
    """1-bit PNG (mode "1"): ink thresholded at half."""
    return encode(Image.fromarray(ink).point(lambda v: 255 if v >= 128 else 0).convert("1", dither=0), "PNG")


def jpeg_gray(ink: np.ndarray) -> bytes:
    return encode(Image.fromarray(ink), "JPEG", quality=90)


def jpeg_progressive(ink: np.ndarray) -> bytes:
    return encode(Image.fromarray(ink).convert("RGB"), "JPEG", quality=90, progressive=True)


def jpeg_exif_rotated(ink: np.ndarray) -> bytes:
    """A JPEG stored turned 90 degrees counter-clockwise with EXIF Orientation 6 (display: turn clockwise)."""
    stored = Image.fromarray(ink).convert("RGB").transpose(Image.Transpose.ROTATE_90)
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = 6
    return encode(stored, "JPEG", quality=92, exif=exif.tobytes())


MODE_MAKERS = (
    ("png-I;16", "16-bit grayscale PNG (I;16), full range", png_i16),
    ("png-I-16bit-high", "mode-I digit, every value > 255, as a 16-bit PNG", png_i32_high),
    ("png-P-alpha", "palette PNG, paper entry transparent", png_palette_alpha),
    ("png-LA", "LA PNG, black everywhere, digit in alpha", png_la_black),
    ("png-RGBA", "RGBA PNG, black ink, transparent black background", png_rgba_transparent),
    ("jpeg-CMYK", "CMYK JPEG", jpeg_cmyk),
    ("png-1bit", "1-bit PNG (mode 1)", png_bilevel),
    ("jpeg-gray", "grayscale JPEG", jpeg_gray),
    ("jpeg-progressive", "progressive RGB JPEG", jpeg_progressive),
    ("jpeg-exif-rotated", "JPEG stored rotated, EXIF Orientation 6", jpeg_exif_rotated),
)


def mode_cases() -> list[Case]:
    """One MNIST test digit per mode (different digits across modes), dark ink on white at 112x112."""
    images, labels = mnist_test()
    cases = []
    for (name, what, make), index in zip(MODE_MAKERS, digit_indices(len(MODE_MAKERS)), strict=True):
        label = int(labels[index])
        data = make(paper(images[index]))
        cases.append(Case(name, f"{what}, test #{index} ({label})", data, label=label, index=int(index)))
    return cases


# --- damaged files -----------------------------------------------------------------------------------


def png_chunks(data: bytes) -> list[tuple[int, bytes]]:
    """(offset, type) of every chunk of a PNG."""
    chunks, pos = [], 8
    while pos + 8 <= len(data):
        length, kind = struct.unpack(">I4s", data[pos : pos + 8])
        chunks.append((pos, kind))
        pos += 12 + length
    return chunks


def corrupt_crc(data: bytes, chunk: bytes = b"IDAT") -> bytes:
    """The PNG with the CRC of its first `chunk` chunk flipped (the chunk's data untouched)."""
    for offset, kind in png_chunks(data):
        if kind == chunk:
            length = struct.unpack(">I", data[offset : offset + 4])[0]
            crc_at = offset + 8 + length
            crc = struct.unpack(">I", data[crc_at : crc_at + 4])[0] ^ 0xFFFFFFFF
            return data[:crc_at] + struct.pack(">I", crc) + data[crc_at + 4 :]
    raise ValueError(f"no {chunk!r} chunk")


def png_header_then_garbage(width: int = PAPER_SIDE, height: int = PAPER_SIDE, garbage: int = 4000) -> bytes:
    """A valid PNG signature and IHDR, then random bytes where the image data should be."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    chunk = struct.pack(">I", len(ihdr)) + b"IHDR" + ihdr + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    return b"\x89PNG\r\n\x1a\n" + chunk + np.random.default_rng(1).integers(0, 256, garbage, np.uint8).tobytes()


def jpeg_zeroed_middle(data: bytes, count: int = 200) -> bytes:
    middle = len(data) // 2
    return data[: middle - count // 2] + bytes(count) + data[middle - count // 2 + count :]


def corrupt_cases() -> tuple[list[Case], list[Case]]:
    """(must be INVALID_ARGUMENT, INVALID_ARGUMENT or is_digit=false)."""
    images, labels = mnist_test()
    index = digit_indices(3)[2]
    ink = paper(images[index], 224)  # larger, so half a file cuts through the pixel data
    png = encode(Image.fromarray(ink), "PNG")
    jpeg = encode(Image.fromarray(ink), "JPEG", quality=95)
    must = [
        Case(
            "png-truncated",
            f"PNG of a digit cut to its first half ({len(png) // 2} of {len(png)} bytes)",
            png[: len(png) // 2],
        ),
        Case(
            "jpeg-truncated",
            f"JPEG of a digit cut to its first half ({len(jpeg) // 2} of {len(jpeg)} bytes)",
            jpeg[: len(jpeg) // 2],
        ),
        Case("png-bad-idat-crc", "PNG of a digit with its IDAT chunk's CRC flipped", corrupt_crc(png)),
        Case("png-bad-ihdr-crc", "PNG of a digit with its IHDR chunk's CRC flipped", corrupt_crc(png, b"IHDR")),
        Case("png-header-garbage", "valid PNG signature and IHDR, then 4000 random bytes", png_header_then_garbage()),
    ]
    either = [
        Case(
            "jpeg-zeroed-200",
            f"JPEG of a {int(labels[index])} with 200 bytes zeroed in the middle",
            jpeg_zeroed_middle(jpeg),
            label=int(labels[index]),
        ),
    ]
    return must, either


# --- blanks and non-digits ---------------------------------------------------------------------------


def blank_cases() -> list[Case]:
    side = IMAGE_SIDE
    cases = [Case(f"raw-all-{v}", f"raw 784 bytes, all {v}", bytes([v]) * side * side, raw=True) for v in (0, 255, 128)]
    white = Image.new("L", (PAPER_SIDE, PAPER_SIDE), 255)
    cases.append(Case("png-white", "112x112 white PNG", encode(white, "PNG")))
    cases.append(Case("jpeg-gray-128", "112x112 flat gray JPEG", encode(Image.new("L", (112, 112), 128), "JPEG")))
    return cases


def letter(text: str, side: int = PAPER_SIDE) -> np.ndarray:
    """A capital letter in the default (FreeType) font, black on white, filling most of the square."""
    image = Image.new("L", (side, side), 255)
    font = ImageFont.load_default(size=int(side * 0.8))
    draw = ImageDraw.Draw(image)
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    draw.text(((side - (right - left)) / 2 - left, (side - (bottom - top)) / 2 - top), text, fill=0, font=font)
    return np.asarray(image, np.uint8)


def checkerboard(side: int = PAPER_SIDE, square: int = 14) -> np.ndarray:
    yy, xx = np.indices((side, side)) // square
    return np.where((yy + xx) % 2 == 0, 0, 255).astype(np.uint8)


def random_lines(seed: int, side: int = PAPER_SIDE, lines: int = 7) -> np.ndarray:
    rng = np.random.default_rng(seed)
    image = Image.new("L", (side, side), 255)
    draw = ImageDraw.Draw(image)
    for _ in range(lines):
        draw.line([tuple(rng.integers(0, side, 2).tolist()), tuple(rng.integers(0, side, 2).tolist())], 0, 4)
    return np.asarray(image, np.uint8)


def to_raw(ink: np.ndarray) -> bytes:
    """Dark-on-white art -> 784 raw bytes in MNIST layout (light on dark, 28x28)."""
    small = Image.fromarray(255 - ink).resize((IMAGE_SIDE, IMAGE_SIDE), Image.Resampling.BILINEAR)
    return np.asarray(small, np.uint8).tobytes()


def line_png(width: int = 10_000) -> bytes:
    """A 10000x1 PNG: white, with a black segment across its middle fifth."""
    row = np.full((1, width), 255, np.uint8)
    row[0, 2 * width // 5 : 3 * width // 5] = 0
    return encode(Image.fromarray(row), "PNG")


def nondigit_cases() -> list[Case]:
    rng = np.random.default_rng(7)
    cases = [
        Case("raw-noise", "raw 784 uniform random bytes", rng.integers(0, 256, 784, np.uint8).tobytes(), raw=True),
        Case(
            "raw-noise-sparse",
            "raw: 20% of pixels 255 at random",
            ((rng.random(784) < 0.2) * 255).astype(np.uint8).tobytes(),
            raw=True,
        ),
        Case("png-line-10000x1", "10000x1 PNG, white with a black middle fifth", line_png()),
        Case(
            "png-checkerboard",
            "112x112 checkerboard PNG (14 px squares)",
            encode(Image.fromarray(checkerboard()), "PNG"),
        ),
        Case("raw-checkerboard", "raw checkerboard (4 px squares)", to_raw(checkerboard(112, 16)), raw=True),
        Case(
            "png-noise",
            "112x112 uniform noise PNG",
            encode(Image.fromarray(rng.integers(0, 256, (112, 112), np.uint8)), "PNG"),
        ),
    ]
    for seed in range(4):
        cases.append(
            Case(
                f"png-lines-{seed}",
                f"112x112 PNG, 7 random black lines (seed {seed})",
                encode(Image.fromarray(random_lines(seed)), "PNG"),
            )
        )
    for text in "AKWXM":
        cases.append(
            Case(f"png-letter-{text}", f"letter {text}, 112x112 PNG", encode(Image.fromarray(letter(text)), "PNG"))
        )
    for text in "AKX":
        cases.append(
            Case(f"raw-letter-{text}", f"letter {text} as a raw MNIST-layout image", to_raw(letter(text)), raw=True)
        )
    return cases


# --- large images and bombs --------------------------------------------------------------------------


def big_digit(index: int, width: int, height: int | None = None) -> Image.Image:
    """MNIST test digit `index` as dark ink on white, scaled up to width x height (mode L)."""
    images, _ = mnist_test()
    height = height or width
    small = Image.fromarray(255 - images[index])
    return small.resize((width, height), Image.Resampling.BILINEAR)


def bomb_png(side: int = 6000) -> bytes:
    """A side x side grayscale PNG of white paper with a thin black frame: about 35 KB that decode to 36 MB."""
    image = Image.new("L", (side, side), 255)
    ImageDraw.Draw(image).rectangle((side // 4, side // 4, 3 * side // 4, 3 * side // 4), outline=0, width=side // 60)
    return encode(image, "PNG", optimize=True)


def padded_png(data: bytes, size: int) -> bytes:
    """`data` (a PNG) grown to exactly `size` bytes by a private ancillary chunk after IHDR, which decoders skip."""
    ihdr_end = 8 + 12 + struct.unpack(">I", data[8:12])[0]
    length = size - len(data) - 12
    if length < 0:
        raise ValueError(f"a PNG of {len(data)} bytes cannot be padded to {size}")
    body = b"paDd" + bytes(length)
    chunk = struct.pack(">I", length) + body + struct.pack(">I", zlib.crc32(body))
    return data[:ihdr_end] + chunk + data[ihdr_end:]


def small_png_digit(index: int, size: int) -> bytes:
    """MNIST test digit `index` as an ordinary PNG scan (dark ink on white, PAPER_SIDE square), padded to `size`
    bytes: what a well-behaved client sends, as heavy on the wire as the image it is compared with."""
    images, _ = mnist_test()
    return padded_png(encode(Image.fromarray(paper(images[index])), "PNG"), size)


def big_jpeg_digit(index: int, side: int = 6000) -> bytes:
    return encode(big_digit(index, side).convert("RGB"), "JPEG", quality=80)


def big_png_digit(index: int, pixels: int) -> bytes:
    """A square PNG of a digit with at most `pixels` pixels (compressed small: it is mostly paper)."""
    side = int(pixels**0.5)
    return encode(big_digit(index, side), "PNG", compress_level=1)


def image_size(data: bytes) -> tuple[int, int]:
    return Image.open(io.BytesIO(data)).size
