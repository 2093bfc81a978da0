"""Preprocessing like MNIST's own: raw payloads, encoded images of any kind, and what is refused."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from server.config import BUNDLED_MODEL
from server.preprocess import InvalidImage, Normalization, decode, from_encoded, from_raw, mnist_like
from server.runtime import OnnxModel, to_predictions
from training.data import load_split

NORM = Normalization()


@pytest.fixture(scope="module")
def model() -> OnnxModel:
    return OnnxModel(BUNDLED_MODEL, provider="cpu")


@pytest.fixture(scope="module")
def test_digits(mnist_dir: Path):
    split = load_split("test", mnist_dir)
    return split.images[:20], split.labels[:20]


def encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **kwargs)
    return buffer.getvalue()


def predict(model: OnnxModel, data: bytes) -> int:
    tensor = from_encoded(data, model.normalization, 50_000_000).tensor
    return to_predictions(model.run(tensor[None]))[0].digit


def test_raw_bytes_are_only_normalized() -> None:
    pixels = np.arange(784, dtype=np.uint8)
    tensor = from_raw(pixels.tobytes(), NORM).tensor
    assert tensor.shape == (1, 28, 28) and tensor.dtype == np.float32
    np.testing.assert_allclose(tensor[0], (pixels.reshape(28, 28) / 255 - NORM.mean) / NORM.std, rtol=1e-6)


@pytest.mark.parametrize("length", [0, 783, 785])
def test_raw_payloads_of_the_wrong_length_are_refused(length: int) -> None:
    with pytest.raises(InvalidImage, match=f"exactly 784 bytes .*got {length}"):
        from_raw(b"\0" * length, NORM)


def as_paper(digit: np.ndarray, size: tuple[int, int]) -> Image.Image:
    """Dark ink on light, upscaled: how a scanned or photographed digit looks."""
    return Image.fromarray(255 - digit).resize(size, Image.Resampling.BICUBIC)


VARIANTS = {
    "mnist-png": lambda d: encode(Image.fromarray(d), "PNG"),
    "paper-png-400x300": lambda d: encode(as_paper(d, (400, 300)), "PNG"),
    "paper-bmp": lambda d: encode(as_paper(d, (120, 120)).convert("RGB"), "BMP"),
    "paper-webp": lambda d: encode(as_paper(d, (200, 200)).convert("RGB"), "WEBP", quality=90),
    "palette-gif": lambda d: encode(as_paper(d, (140, 140)).convert("P"), "GIF"),
    "transparent-rgba-png": lambda d: encode(
        Image.merge("RGBA", [Image.new("L", (280, 280), 30)] * 3 + [Image.fromarray(d).resize((280, 280))]), "PNG"
    ),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_encoded_digits_of_every_kind_are_classified(model: OnnxModel, test_digits, variant: str) -> None:
    images, labels = test_digits
    correct = sum(predict(model, VARIANTS[variant](d)) == y for d, y in zip(images, labels, strict=True))
    assert correct >= 19, f"{variant}: {correct}/20"


def test_a_noisy_unevenly_lit_photo_is_classified(model: OnnxModel, test_digits) -> None:
    images, labels = test_digits
    rng = np.random.default_rng(1)
    correct = 0
    for digit, label in zip(images[:10], labels[:10], strict=True):
        paper = np.asarray(as_paper(digit, (900, 900)), np.float32) * 0.7 + 50
        paper += np.linspace(-30, 30, 900)[None, :] + rng.normal(0, 10, paper.shape)
        jpeg = encode(Image.fromarray(np.clip(paper, 0, 255).astype(np.uint8)).convert("RGB"), "JPEG", quality=75)
        correct += predict(model, jpeg) == label
    assert correct >= 9


def test_the_digit_is_scaled_to_20_pixels_and_centred_by_mass() -> None:
    canvas = np.zeros((300, 500), np.float32)
    canvas[10:110, 380:430] = 1.0  # a tall bar far off-centre
    out = mnist_like(canvas)
    rows, cols = np.nonzero(out > 0)
    assert rows.max() - rows.min() + 1 == 20 and abs((cols.max() - cols.min() + 1) - 10) <= 1
    cy, cx = (np.indices(out.shape) * out).reshape(2, -1).sum(1) / out.sum()
    assert abs(cy - 13.5) <= 1 and abs(cx - 13.5) <= 1


def test_light_ink_on_dark_and_dark_ink_on_light_give_the_same_digit() -> None:
    canvas = np.zeros((100, 100), np.float32)
    canvas[20:80, 45:55] = 1.0
    np.testing.assert_allclose(mnist_like(canvas), mnist_like(1.0 - canvas), atol=1e-3)


@pytest.mark.parametrize("colour", ["white", "black", "gray"])
def test_blank_images_are_refused(colour: str) -> None:
    with pytest.raises(InvalidImage, match="blank"):
        from_encoded(encode(Image.new("RGB", (50, 50), colour), "PNG"), NORM, 10**6)


def test_faint_noise_counts_as_blank() -> None:
    noise = (np.random.default_rng(0).random((64, 64)) * 10 + 120).astype(np.uint8)
    with pytest.raises(InvalidImage, match="blank"):
        from_encoded(encode(Image.fromarray(noise), "PNG"), NORM, 10**6)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "empty"),
        (b"hello, world", "not an image"),
        (encode(Image.new("L", (64, 64), 255), "PNG")[:60], "damaged or truncated"),
        (encode(Image.new("L", (64, 64), 255), "TIFF"), "not an image in a supported format"),
    ],
    ids=["empty", "text", "truncated-png", "tiff"],
)
def test_bytes_that_are_no_supported_image_are_refused(data: bytes, message: str) -> None:
    with pytest.raises(InvalidImage, match=message):
        decode(data, 10**6)


def test_oversized_images_are_refused_from_the_header_before_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    huge = encode(Image.new("1", (12_000, 12_000), 1), "PNG")  # 144 M pixels in a few kB
    assert len(huge) < 100_000

    def no_decoding(*args, **kwargs):
        raise AssertionError("pixels were decoded")

    monkeypatch.setattr(Image.Image, "load", no_decoding)
    with pytest.raises(InvalidImage, match=r"12000x12000 = 144,000,000 pixels, over the limit of 10,000,000"):
        decode(huge, max_pixels=10_000_000)
