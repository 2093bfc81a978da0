"""training.digit_sources: seeded, named upload sources for the digit detector's held-out evaluation (issue 22).

Small sizes only: each source is built with a few images. Needs the @fontsource fonts (tests/setup.sh) and the
project's MNIST copy (the `mnist_dir` fixture); scikit-learn and scikit-image ship their data, no network.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFont

import training.digit_sources as ds

N = 12


@pytest.fixture(autouse=True)
def _mnist(mnist_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MNIST_DIR", str(mnist_dir))


def test_catalogue_kinds_roles_and_descriptions() -> None:
    assert len(ds.SOURCES) == 13
    for name, spec in ds.SOURCES.items():
        assert spec.name == name and spec.kind in ds.KINDS and spec.role in ds.ROLES
        assert spec.description and "\n" not in spec.description
    assert set(ds.names("fit")) == {"handwriting-fonts-fit", "letters-handwriting-fit", "textures-fit"}
    assert ds.names(kind="look-alike") == ["look-alike-letters"]


def test_fit_and_held_out_fonts_share_nothing() -> None:
    assert not set(ds.FIT_FONTS) & set(ds.HELD_OUT_FONTS)
    assert len(ds.FIT_FONTS) >= 8 and len(ds.HELD_OUT_FONTS) >= 8
    for name in ds.FIT_FONTS + ds.HELD_OUT_FONTS:
        assert ds.font_path(name).is_file()


def test_letters_exclude_digit_like_ones() -> None:
    assert not set(ds.LETTERS) & set("OoQDUuIlijJLTtZzSsBbGgqy")
    assert set(ds.LOOK_ALIKES) == set("OlISZBgq") and ds.LOOK_ALIKES["B"] == 8 and ds.LOOK_ALIKES["q"] == 9


def test_print_fonts_are_those_fit_digit_detector_holds_out() -> None:
    from training.fit_digit_detector import find_fonts

    fitted, held_out = find_fonts()
    assert ds.print_fonts() and set(ds.print_fonts()) == set(held_out)
    assert not set(ds.print_fonts()) & set(fitted)


def test_mnist_slice_is_test_data_which_the_detector_never_fits() -> None:
    import training.fit_digit_detector as fit

    assert "MNIST *train*" in (fit.__doc__ or "")  # the detector fits on train; these come from test
    start, stop = ds.MNIST_TEST_SLICE
    assert 0 <= start < stop <= 10_000


@pytest.mark.parametrize("name", list(ds.SOURCES))
def test_every_source_builds_with_right_labels(name: str) -> None:
    source = ds.build(name, N)
    spec = ds.SOURCES[name]
    assert (source.name, source.kind, source.role, source.description) == (
        name, spec.kind, spec.role, spec.description,
    )  # fmt: skip
    assert len(source) == N == len(source.tags) == len(source.labels) == len(source.refused)
    assert source.inputs.shape == (N, 1, 28, 28) and source.inputs.dtype == np.float32
    assert np.isnan(source.inputs[source.refused]).all() and np.isfinite(source.inputs[~source.refused]).all()
    for data in source.encoded:  # real uploads, in formats the server accepts
        assert Image.open(io.BytesIO(data)).format in ("PNG", "JPEG", "WEBP", "BMP", "GIF")
    if source.kind == "non-digit":
        assert (source.labels == -1).all()
    else:
        assert ((source.labels >= 0) & (source.labels <= 9)).all()
    if source.kind == "digit":
        assert source.refused.mean() < 0.5  # real digits are seldom refused as blank
    if source.kind == "look-alike":
        for label, tag in zip(source.labels, source.tags, strict=True):
            assert ds.LOOK_ALIKES[tag.split("|")[1]] == label


def test_same_seed_same_bytes_other_seed_other_bytes() -> None:
    for name in ("handwriting-fonts", "mnist-test-encoders", "textures-fit", "paper"):
        first = ds._build.__wrapped__(name, 6, 7, None, None)  # not memoized: really built twice
        again = ds._build.__wrapped__(name, 6, 7, None, None)
        other = ds._build.__wrapped__(name, 6, 8, None, None)
        assert first.encoded == again.encoded and first.tags == again.tags
        np.testing.assert_array_equal(first.inputs, again.inputs)
        if name != "mnist-test-encoders":  # the same digits there, other encoders
            assert first.encoded != other.encoded
        assert ds.build(name, 3, 7).encoded == first.encoded[:3]  # a smaller source is a prefix


def test_held_out_builders_never_open_fit_fonts(monkeypatch: pytest.MonkeyPatch) -> None:
    opened: list[str] = []
    real = ImageFont.truetype

    def recording(font: str, *args: object, **kwargs: object) -> ImageFont.FreeTypeFont:
        opened.append(str(font))
        return real(font, *args, **kwargs)

    monkeypatch.setattr(ImageFont, "truetype", recording)
    ds._truetype.cache_clear()
    fit = {str(ds.font_path(name)) for name in ds.FIT_FONTS}
    held = {str(ds.font_path(name)) for name in ds.HELD_OUT_FONTS}
    for name in ds.names("held-out"):
        ds._build.__wrapped__(name, 40, ds.SEED, None, None)
    assert opened and not set(opened) & fit
    assert set(opened) & held
    opened.clear()
    ds._truetype.cache_clear()
    for name in ds.names("fit"):
        ds._build.__wrapped__(name, 40, ds.SEED, None, None)
    assert not set(opened) & held


def test_missing_fonts_name_the_setup_step(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(ds, "FONTS_DIR", tmp_path)
    with pytest.raises(FileNotFoundError, match="tests/setup.sh"):
        ds.font_path("caveat")


def test_unknown_source_and_too_many_images() -> None:
    with pytest.raises(KeyError, match="known"):
        ds.build("nope")
    with pytest.raises(ValueError, match="1797"):
        ds.build("uci-scans", 5000)


def test_disk_cache_round_trips(tmp_path: Path) -> None:
    built = ds.build("shapes-scribbles", 5, 3, cache_dir=tmp_path)
    assert len(list(tmp_path.glob("shapes-scribbles-n5-s3-*.npz"))) == 1
    loaded = ds._build.__wrapped__("shapes-scribbles", 5, 3, None, str(tmp_path))
    assert loaded.encoded == built.encoded and loaded.tags == built.tags
    np.testing.assert_array_equal(loaded.inputs, built.inputs)
    np.testing.assert_array_equal(loaded.labels, built.labels)


def test_cli_writes_contact_sheets(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert ds.main(["--out", str(tmp_path), "--sources", "uci-scans", "paper", "--n", "8"]) == 0
    for name in ("uci-scans", "paper"):
        with Image.open(tmp_path / f"{name}.png") as sheet:
            assert sheet.width > 1000 and sheet.height > 300
    table = capsys.readouterr().out
    assert "| uci-scans" in table and "| paper" in table


def test_the_detectors_fitting_takes_fit_sources_and_refuses_held_out_ones() -> None:
    from training import fit_digit_detector as fitting

    fitted = fitting.fit_source("handwriting-fonts-fit", "handwriting_fonts_fit", "positive-fit", 1, n=6)
    assert fitted.x.shape == (6, 1, 28, 28) and fitted.labels is not None and fitted.group == "positive-fit"
    for held_out in ds.names(role="held-out"):
        with pytest.raises(ValueError, match="held-out source: the detector never fits or calibrates on those"):
            fitting.fit_source(held_out, "x", "fit", 1, n=2)
