"""ReadDigits: several handwritten digits in one image, found, read in order, with where each one is."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from PIL import Image

from loadtest.reading import KINDS, benchmark_set, compose, draw_examples, run
from proto.mnist.v1 import classifier_pb2 as pb
from server.app import MnistServer
from server.pipeline.reading import NO_DIGITS, segment
from tests.support import Harness, free_port, test_config

ROOT = Path(__file__).resolve().parents[1]
REPORT = ROOT / "reports" / "read-bench"


@pytest.fixture(scope="module")
def served() -> Iterator[Harness]:
    harness = Harness(MnistServer(test_config(http_port=free_port(), max_read_digits=12)).start())
    yield harness
    harness.close()


def png(gray: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(gray).save(out, "PNG")
    return out.getvalue()


def read(served: Harness, image: bytes, **fields) -> pb.ReadDigitsResponse:
    return served.stub.ReadDigits(pb.ReadDigitsRequest(image=image, **fields), timeout=20)


# --- the benchmark: MNIST test digits composed into numbers -----------------------------------------------


PER_KIND = 300


@pytest.fixture(scope="module")
def benchmark(served: Harness, mnist_test_digits) -> tuple[dict, list]:
    def reader(image: bytes) -> tuple[str, list]:
        try:
            reply = read(served, image)
        except grpc.RpcError as err:
            return f"<{err.code().name}>", []
        return reply.text, [(d.x, d.y, d.width, d.height, d.digit) for d in reply.digits]

    # 300 of each kind: at 100, one string is a point, and the four-digit rate (about 95.5-97% over seeds) sat on
    # its 95% bar, passing or failing on a single image
    scores, answers = run(reader, *mnist_test_digits, per_kind=PER_KIND, seed=0)
    REPORT.mkdir(parents=True, exist_ok=True)
    (REPORT / "report.json").write_text(json.dumps(scores, indent=2) + "\n")
    draw_examples(answers, REPORT / "examples.png")
    return scores, answers


def test_four_digit_numbers_read_at_98_percent_of_digits_and_95_percent_of_strings(benchmark) -> None:
    scores, _ = benchmark
    four = scores["four-digits"]
    assert four["images"] == PER_KIND
    assert four["digit_accuracy"] >= 0.98, four
    assert four["string_accuracy"] >= 0.95, four


@pytest.mark.parametrize(
    ("kind", "floor"),
    [("one-to-ten", 0.85), ("two-lines", 0.8), ("touching-pair", 0.75), ("touching-in-four", 0.7)],
)
def test_longer_numbers_lines_and_touching_digits_read_above_their_floors(benchmark, kind: str, floor: float) -> None:
    """Regression floors, under what the recorded benchmark reaches (see the README); text includes the layout."""
    scores, _ = benchmark
    assert scores[kind]["string_accuracy"] >= floor, scores[kind]


def test_the_benchmark_is_the_same_set_for_the_same_seed(mnist_test_digits) -> None:
    first = [c.text for c in benchmark_set(*mnist_test_digits, per_kind=3, seed=5)]
    again = [c.text for c in benchmark_set(*mnist_test_digits, per_kind=3, seed=5)]
    assert first == again and len(first) == 3 * len(KINDS)
    assert any("\n" in text for text in first) and any(" " in text for text in first)


def test_boxes_are_in_the_original_images_pixels_and_in_reading_order(served: Harness, mnist_test_digits) -> None:
    composed = compose(np.random.default_rng(11), *mnist_test_digits, "four-digits", photo=False)
    reply = read(served, composed.image)
    width, height = Image.open(io.BytesIO(composed.image)).size
    assert (reply.image_width, reply.image_height) == (width, height)
    xs = [d.x for d in reply.digits]
    assert xs == sorted(xs) and all(d.x + d.width <= width and d.y + d.height <= height for d in reply.digits)
    assert reply.text == composed.text and len(reply.digits) == 4
    for d in reply.digits:
        assert [a.digit for a in d.alternatives][0] == d.digit and len(d.alternatives) == 3
        assert d.alternatives[0].probability >= d.alternatives[1].probability >= d.alternatives[2].probability
    assert reply.confidence == pytest.approx(np.prod([d.confidence for d in reply.digits]), rel=1e-5)


def test_a_large_photo_is_read_in_its_own_pixels(served: Harness, mnist_test_digits) -> None:
    composed = compose(np.random.default_rng(12), *mnist_test_digits, "four-digits", photo=False)
    small = Image.open(io.BytesIO(composed.image)).convert("L")
    big = small.resize(
        (small.width * 8, small.height * 8), Image.Resampling.BICUBIC
    )  # decoded reduced, read, scaled back
    reply = read(served, png(np.asarray(big)))
    assert reply.text == composed.text
    first = reply.digits[0]
    assert first.width > 8 * 10 and first.x + first.width <= big.width


def test_the_expected_count_splits_a_touching_pair_into_its_two_digits(served: Harness, mnist_test_digits) -> None:
    """Pairs read at the wrong count without help (seeded: 25 of 300) are read as two digits with it, many of them
    whole and most of their digits in place, and no pair read right without the count is lost with it. The floor
    on whole pairs was half until the reading calls got their second opinion: then 12 of the 25 hardest pairs were
    read whole (15 of 26 without it), while over all 300 pairs 275 were read right with the count (273 without)."""
    rng = np.random.default_rng(0)
    helped: list[tuple[str, str]] = []
    lost: list[tuple[str, str]] = []
    for _ in range(300):
        composed = compose(rng, *mnist_test_digits, "touching-pair", photo=False)
        alone = read(served, composed.image).text
        with_count = read(served, composed.image, expected_digits=2).text
        if alone == composed.text and with_count != alone:
            lost.append((composed.text, with_count))
        if len(alone) != 2:
            helped.append((composed.text, with_count))
    assert len(helped) >= 20, "too few pairs read at the wrong count: nothing to test"
    assert all(len(text) == 2 for _, text in helped), helped
    assert not lost, lost
    whole = sum(drawn == text for drawn, text in helped)
    in_place = sum(a == b for drawn, text in helped for a, b in zip(drawn, text, strict=True))
    assert whole >= 0.4 * len(helped), helped  # none of them was right unaided: the count was wrong
    assert in_place >= 0.6 * 2 * len(helped), helped


# --- what people send that is not a number ------------------------------------------------------------------


def test_an_image_without_ink_is_no_digits_found(served: Harness) -> None:
    with pytest.raises(grpc.RpcError) as error:
        read(served, png(np.full((60, 200), 250, np.uint8)))
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT and error.value.details() == NO_DIGITS


def test_more_candidates_than_the_limit_are_refused_naming_the_count(served: Harness, mnist_test_digits) -> None:
    rng = np.random.default_rng(3)
    composed = next(
        c for c in (compose(rng, *mnist_test_digits, "one-to-ten", photo=False) for _ in range(50)) if len(c.text) >= 14
    )  # ten digits in groups: over the limit of 12 this server was started with only if read whole
    wide = Image.open(io.BytesIO(composed.image)).convert("L")
    doubled = Image.new("L", (wide.width * 2, wide.height), 255)
    doubled.paste(wide, (0, 0))
    doubled.paste(wide, (wide.width, 0))
    with pytest.raises(grpc.RpcError) as error:
        read(served, png(np.asarray(doubled)))
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "candidate digits, over the limit of 12" in error.value.details()


def test_the_pixel_limit_applies(served: Harness) -> None:
    huge = png(np.full((4000, 3000), 255, np.uint8))  # 12 MP PNG, over the 10 MP test limit
    with pytest.raises(grpc.RpcError) as error:
        read(served, huge)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "over the limit" in error.value.details()


def test_garbage_and_an_empty_request_say_what_is_wrong(served: Harness) -> None:
    for image, words in ((b"", "no image"), (b"not an image", "not an image")):
        with pytest.raises(grpc.RpcError) as error:
            read(served, image)
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT and words in error.value.details()


def test_segmentation_alone_refuses_blank_and_finds_lines(mnist_test_digits) -> None:
    with pytest.raises(ValueError, match="no digits found"):
        segment(np.ones((50, 80), np.float32))
    composed = compose(np.random.default_rng(2), *mnist_test_digits, "two-lines", photo=False)
    gray = np.asarray(Image.open(io.BytesIO(composed.image)).convert("L"), np.float32) / 255
    found = segment(gray)
    assert {c.line for c in found.components} == {0, 1}
    assert found.images.dtype == np.uint8 and found.images.shape[1:] == (28, 28)


# --- the same over REST, the metrics, and the command line ---------------------------------------------------


def test_rest_reads_the_same_and_metrics_count_digits_and_time(served: Harness, mnist_test_digits) -> None:
    import urllib.request

    composed = compose(np.random.default_rng(21), *mnist_test_digits, "two-lines", photo=True)
    url = f"http://127.0.0.1:{served.server.http_port}/v2/models/googlenet-fast/read?expected_digits=0"
    answer = json.loads(urllib.request.urlopen(urllib.request.Request(url, composed.image), timeout=20).read())
    assert answer["text"] == read(served, composed.image).text
    assert {"x", "y", "width", "height"} == set(answer["digits"][0]["box"])
    metrics = served.metrics()
    assert metrics["mnist_read_digits_per_image_count{}"] >= 2
    assert metrics["mnist_read_segmentation_seconds_count{}"] >= 2
    assert metrics['mnist_request_latency_seconds_count{code="OK",method="ReadDigits"}'] >= 1
    assert metrics['mnist_request_latency_seconds_count{code="OK",method="http:ReadDigits"}'] >= 1


def test_mnist_classify_reads_and_annotates(served: Harness, mnist_test_digits, tmp_path: Path, capsys) -> None:
    from server.client import main

    composed = compose(np.random.default_rng(5), *mnist_test_digits, "four-digits", photo=True)
    image = tmp_path / "number.jpg"
    image.write_bytes(composed.image)
    out = tmp_path / "annotated.png"
    target = f"127.0.0.1:{served.server.port}"
    assert main(["--server", target, "--read", str(image), "--annotate", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"{image}: '{composed.text}'" in printed and "(4 digits)" in printed and "at x=" in printed
    annotated = Image.open(out)
    original = Image.open(image)
    assert annotated.width == original.width and annotated.height > original.height


def test_a_page_of_speckle_is_refused_at_once_naming_the_count() -> None:
    """Thousands of marks once took 172 s of a decoding thread to merge (quadratic, restarting at every merge):
    now they are counted and refused before any costly step."""
    from scipy import ndimage

    rng = np.random.default_rng(0)
    page = np.ones((1000, 1000), np.float32)
    page[rng.random(page.shape) < 0.01] = 0.0
    page = 1.0 - ndimage.grey_dilation(1.0 - page, size=(3, 3))  # specks big enough to pass for pieces of ink
    with pytest.raises(ValueError, match=r"found \d{4} separate marks, over the limit of 256"):
        segment(page, max_digits=64)
