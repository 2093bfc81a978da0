"""server.preprocess: raw payloads, encoded images of every accepted kind, and the payloads it refuses."""

from __future__ import annotations

import io
import struct
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from proto.contract import Normalization
from server.backends.onnxruntime_backend import OnnxRuntimeBackend
from server.config import BUNDLED_MODEL
from server.preprocess import InvalidImage, decode, from_encoded, from_raw, mnist_like
from training.data import load_split

NORM = Normalization()
DIGITS = 20
MAX_PIXELS = 10_000_000
BAR = np.zeros((28, 28), np.uint8)  # a "1": the simplest digit, for tests that need any image with ink
BAR[6:22, 12:16] = 255


@pytest.fixture(scope="module")
def model() -> OnnxRuntimeBackend:
    return OnnxRuntimeBackend(BUNDLED_MODEL, provider="cpu")


@pytest.fixture(scope="module")
def digits(mnist_dir: Path) -> list[tuple[np.ndarray, int]]:
    split = load_split("test", mnist_dir)
    return [(split.images[i], int(split.labels[i])) for i in range(DIGITS)]


def encode(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def on_paper(digit: np.ndarray, paper: tuple[int, int] = (400, 300), scale: int = 10) -> np.ndarray:
    """Dark ink on white paper: the digit inverted, upscaled `scale` times and placed off-centre on the page."""
    side = 28 * scale
    ink = np.asarray(Image.fromarray(255 - digit).resize((side, side), Image.Resampling.BICUBIC))
    page = np.full((paper[1], paper[0]), 255, np.uint8)
    top, left = (paper[1] - side) // 3, (paper[0] - side) // 4
    page[top : top + side, left : left + side] = ink
    return page


def transparent_png(digit: np.ndarray) -> bytes:
    """Opaque dark-blue ink where the digit is, fully transparent elsewhere (the colour under it is black)."""
    alpha = Image.fromarray(digit).resize((400, 300), Image.Resampling.BICUBIC)
    image = Image.new("RGB", alpha.size, (20, 20, 60))
    image.putalpha(alpha)
    return encode(image, "PNG")


def noisy_photo_jpeg(digit: np.ndarray, noise: float = 4.0, gradient: float = 15.0) -> bytes:
    """1600x1200 gray paper lit unevenly from one side (+-`gradient`), sensor noise (sigma `noise`), as JPEG."""
    rng = np.random.default_rng(int(digit.sum()))
    ink = np.asarray(Image.fromarray(digit).resize((1000, 1000), Image.Resampling.BICUBIC), np.float32) / 255
    ink = np.pad(ink, ((100, 100), (350, 250)))
    photo = 190 - 140 * ink + np.linspace(-gradient, gradient, 1600)[None, :] + rng.normal(0, noise, ink.shape)
    return encode(Image.fromarray(np.clip(photo, 0, 255).astype(np.uint8)).convert("RGB"), "JPEG", quality=80)


ENCODINGS: dict[str, Callable[[np.ndarray], bytes]] = {
    "mnist-style-png": lambda d: encode(Image.fromarray(d), "PNG"),
    "paper-png-400x300": lambda d: encode(Image.fromarray(on_paper(d)), "PNG"),
    "transparent-rgba-png": transparent_png,
    "noisy-photo-jpeg-1600x1200": noisy_photo_jpeg,
    "palette-gif": lambda d: encode(Image.fromarray(on_paper(d, (200, 160), 5)).convert("RGB").convert("P"), "GIF"),
    "paper-bmp": lambda d: encode(Image.fromarray(on_paper(d, (160, 120), 4)).convert("RGB"), "BMP"),
    "paper-webp": lambda d: encode(Image.fromarray(on_paper(d, (300, 300), 8)).convert("RGB"), "WEBP", quality=85),
}


def classify(model: OnnxRuntimeBackend, data: bytes) -> int:
    tensor = from_encoded(data, model.metadata.norm, MAX_PIXELS)
    return int(model.run(tensor[None]).argmax(1)[0])


# --- raw payloads ---------------------------------------------------------------------------------------------------


def test_a_raw_784_byte_payload_is_only_normalized() -> None:
    pixels = np.random.default_rng(0).integers(0, 256, (28, 28), dtype=np.uint8)
    norm = Normalization(scale=1 / 255, mean=0.5, std=0.25)
    tensor = from_raw(pixels.tobytes(), norm)
    assert tensor.shape == (1, 28, 28) and tensor.dtype == np.float32
    np.testing.assert_allclose(tensor[0], (pixels / 255 - 0.5) / 0.25, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("length", [783, 785])
def test_a_raw_payload_of_any_other_length_is_refused_naming_both_lengths(length: int) -> None:
    with pytest.raises(InvalidImage, match=rf"\b784\b.*\b{length}\b"):
        from_raw(bytes(length), NORM)


# --- encoded images that must be understood -------------------------------------------------------------------------


def test_every_encoded_variant_is_a_real_image_of_its_format() -> None:
    formats = {name: Image.open(io.BytesIO(make(BAR))).format for name, make in ENCODINGS.items()}
    assert set(formats.values()) == {"PNG", "JPEG", "GIF", "BMP", "WEBP"}
    assert Image.open(io.BytesIO(transparent_png(BAR))).mode == "RGBA"
    assert Image.open(io.BytesIO(ENCODINGS["palette-gif"](BAR))).mode == "P"


@pytest.mark.parametrize("encoding", list(ENCODINGS))
def test_a_digit_is_classified_correctly_however_it_is_encoded(
    model: OnnxRuntimeBackend, digits, encoding: str
) -> None:
    make = ENCODINGS[encoding]
    correct = sum(classify(model, make(digit)) == label for digit, label in digits)
    assert correct >= DIGITS - 1, f"{encoding}: {correct}/{DIGITS} correct"


def test_dark_ink_on_light_paper_is_inverted_to_light_on_dark(digits) -> None:
    digit, _ = digits[0]
    light_on_dark = mnist_like(digit.astype(np.float32) / 255)
    dark_on_light = mnist_like(1 - digit.astype(np.float32) / 255)
    assert dark_on_light[0, 0] == 0 and dark_on_light.max() > 200  # the paper became the dark background
    np.testing.assert_allclose(dark_on_light, light_on_dark, atol=1.0)


def test_transparent_pixels_count_as_white_paper() -> None:
    image = Image.new("RGBA", (60, 60), (0, 0, 0, 0))  # transparent black
    image.paste((0, 0, 0, 255), (25, 10, 35, 50))  # an opaque black bar
    gray = decode(encode(image, "PNG"), MAX_PIXELS)
    assert gray[0, 0] == 1.0 and gray[30, 30] == 0.0


# --- the MNIST layout -----------------------------------------------------------------------------------------------


def test_a_digit_in_a_corner_is_scaled_to_a_20_pixel_box_and_centred_by_mass(digits) -> None:
    for digit, _ in digits[:5]:
        canvas = np.zeros((240, 320), np.float32)
        canvas[-90:-6, -90:-6] = np.asarray(Image.fromarray(digit).resize((84, 84)), np.float32) / 255
        out = mnist_like(canvas)
        assert out.shape == (28, 28)
        rows, cols = np.nonzero(out)
        assert abs(max(np.ptp(rows), np.ptp(cols)) + 1 - 20) <= 1
        cy, cx = (np.indices(out.shape) * out).reshape(2, -1).sum(1) / out.sum()
        assert abs(cy - 14) <= 1 and abs(cx - 14) <= 1


def test_the_output_is_in_the_0_to_255_range_of_mnist_pixels(digits) -> None:
    out = mnist_like(digits[3][0].astype(np.float32) / 255)
    assert out.min() == 0 and 200 < out.max() <= 255


def test_a_small_clear_digit_on_a_large_page_is_not_taken_for_blank(model: OnnxRuntimeBackend, digits) -> None:
    """Regression: contrast measured at the 99.9th percentile missed digits covering under 0.1% of the page."""
    digit, label = digits[0]
    page = np.full((1200, 1600), 255, np.uint8)
    page[500:580, 700:780] = np.asarray(Image.fromarray(255 - digit).resize((80, 80), Image.Resampling.BICUBIC))
    assert classify(model, encode(Image.fromarray(page), "PNG")) == label


def test_sensor_noise_far_from_the_digit_does_not_shrink_it(model: OnnxRuntimeBackend, digits) -> None:
    """Regression: stray noise pixels anywhere in a photo used to stretch the crop to the whole image."""
    some = digits[:10]
    correct = sum(classify(model, noisy_photo_jpeg(digit, noise=12, gradient=0)) == label for digit, label in some)
    assert correct >= len(some) - 1, f"{correct}/{len(some)} correct"


# --- what is refused ------------------------------------------------------------------------------------------------


def faint_noise() -> Image.Image:
    return Image.fromarray(np.random.default_rng(0).normal(128, 5, (80, 80)).clip(0, 255).astype(np.uint8))


@pytest.mark.parametrize(
    "image",
    [Image.new("L", (64, 64), 255), Image.new("RGB", (64, 64), "black"), Image.new("L", (64, 64), 128), faint_noise()],
    ids=["white", "black", "gray", "faint-noise"],
)
def test_a_blank_image_is_refused_as_blank(image: Image.Image) -> None:
    with pytest.raises(InvalidImage, match="blank"):
        from_encoded(encode(image, "PNG"), NORM, MAX_PIXELS)


PNG_OF_A_BAR = encode(Image.fromarray(on_paper(BAR, (64, 64), 2)), "PNG")


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "empty"),
        (b"hello", "not an image in a supported format"),
        (PNG_OF_A_BAR[:70], "damaged or truncated"),
        (PNG_OF_A_BAR[:-20], "damaged or truncated"),
    ],
    ids=["empty", "text", "png-cut-inside-pixel-data", "png-without-its-end"],
)
def test_bytes_that_are_no_whole_image_are_refused_with_the_reason(data: bytes, message: str) -> None:
    decode(PNG_OF_A_BAR, MAX_PIXELS)  # the untruncated image is fine
    with pytest.raises(InvalidImage, match=message):
        from_encoded(data, NORM, MAX_PIXELS)


@pytest.mark.parametrize("fmt", ["TIFF", "PPM", "ICO"])
def test_formats_other_than_png_jpeg_bmp_gif_webp_are_refused(fmt: str) -> None:
    with pytest.raises(InvalidImage, match=r"supported format \(PNG, JPEG, BMP, GIF, WEBP\)"):
        from_encoded(encode(Image.fromarray(on_paper(BAR, (64, 64), 2)), fmt), NORM, MAX_PIXELS)


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares its size, then ends in an empty pixel data chunk: decoding it would fail."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
        + chunk(b"IDAT", b"")
    )


def test_an_image_over_the_pixel_limit_is_refused_from_its_header_before_decoding() -> None:
    with pytest.raises(InvalidImage, match="damaged or truncated"):
        decode(png_header_only(20, 20), MAX_PIXELS)  # small enough to be decoded: the missing data shows
    with pytest.raises(InvalidImage, match=r"20000x20000.*400,000,000.*limit of 10,000,000"):
        decode(png_header_only(20_000, 20_000), MAX_PIXELS)


def test_a_highly_compressible_huge_png_is_refused_naming_its_size_and_the_limit() -> None:
    huge = encode(Image.new("1", (12_000, 12_000), 1), "PNG")
    assert len(huge) < 100_000
    with pytest.raises(InvalidImage, match=r"12000x12000 .*limit of 10,000,000"):
        from_encoded(huge, NORM, max_pixels=10_000_000)


def test_an_image_of_exactly_the_pixel_limit_is_accepted() -> None:
    data = encode(Image.new("L", (100, 50), 255), "PNG")
    assert decode(data, max_pixels=5_000).shape == (50, 100)
    with pytest.raises(InvalidImage, match="100x50"):
        decode(data, max_pixels=4_999)
