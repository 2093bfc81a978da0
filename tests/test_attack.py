"""mnist-attack: its crafted inputs are what they claim to be, and its quick checks pass against a real server.

The quick checks are the hardening contract (decode budgets, image modes, blanks, malformed messages,
shutdown codes): the tests that read the quick run's report fail until the server meets it.
"""

from __future__ import annotations

import io
import json
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps

from loadtest import attack
from loadtest.attack import client, context, craft, decode, load, wire
from loadtest.attack.runner import STRICT_ENV
from proto.mnist.v1 import classifier_pb2 as pb

ROOT = Path(__file__).resolve().parents[1]
QUICK_CHECKS = [c.name for c in attack.CHECKS if c.quick]


def opened(data: bytes) -> Image.Image:
    return Image.open(io.BytesIO(data))


@pytest.fixture(scope="module")
def modes(mnist_dir: Path) -> dict[str, craft.Case]:
    return {case.name: case for case in craft.mode_cases()}


# --- the crafted images ------------------------------------------------------------------------------


def test_the_bomb_is_6000_pixels_square_and_under_100_kb() -> None:
    bomb = craft.bomb_png()
    assert opened(bomb).size == (6000, 6000)
    assert opened(bomb).format == "PNG"
    assert len(bomb) < 100_000


def test_the_bombs_control_is_an_ordinary_digit_png_as_heavy_on_the_wire_as_the_bomb(mnist_dir: Path) -> None:
    bomb = craft.bomb_png()
    control = craft.small_png_digit(0, len(bomb))
    assert len(control) == len(bomb)
    image = opened(control)
    assert (image.format, image.size, image.mode) == ("PNG", (craft.PAPER_SIDE, craft.PAPER_SIDE), "L")
    images, _ = craft.mnist_test()
    assert np.array_equal(np.asarray(image), craft.paper(images[0]))  # the padding changes no pixel


def test_the_big_jpeg_and_png_have_the_sizes_asked_for(mnist_dir: Path) -> None:
    jpeg = craft.big_jpeg_digit(0)
    assert opened(jpeg).size == (6000, 6000) and opened(jpeg).format == "JPEG"
    png = craft.big_png_digit(0, 4_000_000)
    width, height = craft.image_size(png)
    assert width == height and 3_900_000 < width * height <= 4_000_000


def test_every_mode_case_opens_in_its_mode(modes: dict[str, craft.Case]) -> None:
    expected = {
        "png-I;16": "I;16",
        "png-I-16bit-high": "I;16",
        "png-P-alpha": "P",
        "png-LA": "LA",
        "png-RGBA": "RGBA",
        "jpeg-CMYK": "CMYK",
        "png-1bit": "1",
        "jpeg-gray": "L",
        "jpeg-progressive": "RGB",
        "jpeg-exif-rotated": "RGB",
    }
    assert {name: opened(case.data).mode for name, case in modes.items()} == expected
    assert len({case.label for case in modes.values()}) >= 8  # several digits, not one


def test_the_16_bit_pngs_use_more_than_8_bits(modes: dict[str, craft.Case]) -> None:
    full = np.asarray(opened(modes["png-I;16"].data))
    assert full.min() < 1000 and full.max() == 65535  # dark ink near 0, paper at the top of 16 bits
    high = np.asarray(opened(modes["png-I-16bit-high"].data))
    assert high.min() > 255  # an 8-bit clip turns it into a blank white page
    assert high.max() - high.min() > 30_000


def composited(data: bytes) -> np.ndarray:
    image = opened(data).convert("RGBA")
    return np.asarray(Image.alpha_composite(Image.new("RGBA", image.size, "white"), image).convert("L"))


def test_transparent_cases_show_the_digit_only_when_composited_on_white(modes: dict[str, craft.Case]) -> None:
    for name in ("png-LA", "png-RGBA"):
        data = modes[name].data
        assert np.asarray(opened(data).convert("L")).max() == 0  # dropping alpha leaves all black
        on_white = composited(data)
        assert on_white.max() == 255 and on_white.min() < 50 and np.median(on_white) == 255
    palette = opened(modes["png-P-alpha"].data)
    assert "transparency" in palette.info
    on_white = composited(modes["png-P-alpha"].data)
    assert np.median(on_white) == 255 and on_white.min() < 50


def test_the_progressive_and_exif_jpegs_are_what_they_say(modes: dict[str, craft.Case]) -> None:
    assert opened(modes["jpeg-progressive"].data).info.get("progressive")
    rotated = opened(modes["jpeg-exif-rotated"].data)
    assert rotated.getexif()[craft.EXIF_ORIENTATION] == 6
    images, _ = craft.mnist_test()
    index = craft.digit_indices(len(craft.MODE_MAKERS))[-1]
    upright = np.asarray(ImageOps.exif_transpose(rotated).convert("L"), float)
    truth = craft.paper(images[index]).astype(float)
    as_stored = np.asarray(rotated.convert("L"), float)
    assert np.corrcoef(upright.ravel(), truth.ravel())[0, 1] > 0.95
    assert np.corrcoef(as_stored.ravel(), truth.ravel())[0, 1] < 0.8  # ignoring EXIF gives a turned digit


def test_corrupt_cases_are_damaged_the_way_their_names_say(mnist_dir: Path) -> None:
    must, either = craft.corrupt_cases()
    cases = {case.name: case.data for case in [*must, *either]}
    assert cases["png-truncated"].startswith(b"\x89PNG") and b"IEND" not in cases["png-truncated"]
    assert cases["jpeg-truncated"].startswith(b"\xff\xd8") and not cases["jpeg-truncated"].endswith(b"\xff\xd9")
    for name, chunk in (("png-bad-idat-crc", b"IDAT"), ("png-bad-ihdr-crc", b"IHDR")):
        data = cases[name]
        offset = next(o for o, kind in craft.png_chunks(data) if kind == chunk)
        length = struct.unpack(">I", data[offset : offset + 4])[0]
        stored = struct.unpack(">I", data[offset + 8 + length : offset + 12 + length])[0]
        assert stored != zlib.crc32(data[offset + 4 : offset + 8 + length])
    garbage = cases["png-header-garbage"]
    assert garbage.startswith(b"\x89PNG\r\n\x1a\n\x00\x00\x00\x0dIHDR") and b"IDAT" not in garbage
    zeroed = cases["jpeg-zeroed-200"]
    assert bytes(200) in zeroed and zeroed.endswith(b"\xff\xd9")


def test_blanks_are_flat_and_non_digits_are_not_empty() -> None:
    for case in craft.blank_cases():
        pixels = np.frombuffer(case.data, np.uint8) if case.raw else np.asarray(opened(case.data))
        assert pixels.min() == pixels.max(), case.name
    for case in craft.nondigit_cases():
        pixels = np.frombuffer(case.data, np.uint8) if case.raw else np.asarray(opened(case.data).convert("L"))
        assert pixels.max() > pixels.min(), case.name
    assert opened(craft.line_png()).size == (10_000, 1)


def deserializers() -> dict[str, tuple[type, object]]:
    """Every method's request deserializer as the server registers it (server/transport/guards.py's generic_handler,
    with the Classifier's own parsers), by path: what a garbage payload meets first."""
    import grpc
    from grpc_health.v1 import health
    from grpc_reflection.v1alpha import reflection

    from server.app import HEALTH, REFLECTION
    from server.ops.metrics import ServiceMetrics
    from server.transport.guards import CallGate, StreamGate, generic_handler
    from server.transport.service import PARSERS, SERVICE

    class Every:
        def __getattr__(self, name: str):
            return lambda *args: None

    metrics, streams = ServiceMetrics(), StreamGate(limit=4, idle_seconds=1)
    handlers = [
        (SERVICE, generic_handler(Every(), SERVICE, metrics, CallGate(), streams, PARSERS)),
        (HEALTH, generic_handler(Every(), HEALTH, metrics, streams=streams)),
        (REFLECTION, generic_handler(Every(), REFLECTION, metrics, streams=streams)),
    ]
    assert (health.SERVICE_NAME, reflection.SERVICE_NAME) == (HEALTH.full_name, REFLECTION.full_name)
    found = {}
    for service, handler in handlers:
        for method in service.methods:
            path = f"/{service.full_name}/{method.name}"
            details = type("Details", (grpc.HandlerCallDetails,), {"method": path, "invocation_metadata": ()})()
            found[path] = (method.input_type.name, handler.service(details).request_deserializer)
    return found


DESERIALIZERS = deserializers()


@pytest.mark.parametrize("path", list(DESERIALIZERS))
@pytest.mark.parametrize("name,payload", wire.GARBAGE)
def test_every_garbage_payload_is_named_malformed_by_every_methods_deserializer(path: str, name: str, payload) -> None:
    """The server's parser never raises on it (gRPC would answer INTERNAL, uncounted): it hands the handler a
    problem naming the request type, which the guard answers INVALID_ARGUMENT and counts."""
    request_type, deserialize = DESERIALIZERS[path]
    parsed = deserialize(payload)
    assert parsed.problem is not None and parsed.problem.startswith(f"malformed request: not a valid {request_type}")


def test_the_group_requests_parse_with_raw_set_and_the_group_kept(mnist_dir: Path) -> None:
    raw = bytes(range(256)) * 3 + bytes(16)
    for overlong in (False, True):
        data = wire.group_request(raw, overlong=overlong)
        message = pb.ClassifyRequest.FromString(data)
        assert message.WhichOneof("image") == "raw" and message.raw == raw
        assert (message.ByteSize() == len(data)) is not overlong  # the overlong one forces a server's exact scan
        assert message.ByteSize() > 2 + len(raw) + 3  # the unknown group survives parsing


def test_report_helpers() -> None:
    text = (
        "# TYPE mnist_requests_total counter\n"
        'mnist_requests_total{method="Check",code="INVALID_ARGUMENT"} 5.0\n'
        'mnist_requests_total{method="Classify",code="INVALID_ARGUMENT"} 2.0\n'
        'mnist_requests_total{method="Classify",code="OK"} 7.0\n'
    )
    assert client.metric(text, "mnist_requests_total", code="INVALID_ARGUMENT") == 7.0
    assert client.metric(text, "mnist_requests_total", method="Classify", code="OK") == 7.0
    assert client.metric(text, "mnist_decoding_pixels") is None
    assert client.top_level_fields(pb.ClassifyResponse(digit=3, request_id="x").SerializeToString()) == {1, 5}
    # busy (1 core) until t=2, then idle
    times, cpu = [0.0, 1.0, 2.0, 3.0, 4.0], [0.0, 1.0, 2.0, 2.01, 2.02]
    assert decode.busy_until(times, cpu, after=0.5, threshold=0.25) == 2.0
    help_text = "--max-image-pixels MAX_IMAGE_PIXELS largest image [env MNIST_SERVE_MAX_IMAGE_PIXELS; default 40000000]"
    assert context.flag_default(help_text, "--max-image-pixels") == "40000000"
    assert (
        context.flag_value(["--a", "1", "--max-image-pixels=7", "--max-image-pixels", "9"], "--max-image-pixels") == "9"
    )


def test_probe_summary_counts_failures_and_includes_their_time_in_the_percentiles() -> None:
    # (sent, seconds, outcome, lateness): 97 fast answers, a 503 and two timeouts
    records = [(float(i), 0.002, "200", 0.0) for i in range(97)] + [(97.0, 0.003, "503", 0.0)]
    records += [(98.0, 1.0, "TimeoutError", 0.004), (99.0, 1.0, "TimeoutError", 0.0)]
    summary = load.probe_summary(records, "200")
    assert (summary["count"], summary["failed"], summary["failures"]) == (100, 3, {"503": 1, "TimeoutError": 2})
    assert summary["p99_ms"] == summary["max_ms"] == 1000.0 and summary["p50_ms"] == 2.0
    assert "3 of 100 failed ({'503': 1, 'TimeoutError': 2}); p50 2.00 ms" in load.describe_probes(summary)


def test_only_selects_checks_and_groups_and_refuses_unknown_names() -> None:
    assert [c.name for c in attack.select("bomb,shutdown", quick=False)] == ["bomb", "shutdown"]
    assert {c.name for c in attack.select("5", quick=False)} == {"malformed", "unknown-fields"}
    with pytest.raises(SystemExit):
        attack.select("no-such-check", quick=False)
    assert {c.name for c in attack.select(None, quick=True)} == set(QUICK_CHECKS)


# --- the quick suite against a real server --------------------------------------------------------------


@pytest.fixture(scope="module")
def quick_report(tmp_path_factory: pytest.TempPathFactory, mnist_dir: Path) -> dict:
    out = tmp_path_factory.mktemp("attack")
    # Not strict: the test judges each SKIP itself (test_quick_check_passes), where strict would fail on any
    env = {name: value for name, value in os.environ.items() if name != STRICT_ENV}
    process = subprocess.Popen(
        [sys.executable, "-m", "loadtest.attack", "--quick", "--out", str(out)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        output, _ = process.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        process.terminate()  # SIGTERM: the suite stops the servers it started
        output, _ = process.communicate(timeout=60)
    assert (out / "report.json").is_file(), output
    assert (out / "report.md").read_text().count("\n| ") >= len(QUICK_CHECKS) + 1
    report = json.loads((out / "report.json").read_text())
    report["returncode"], report["stdout"] = process.returncode, output
    return report


def test_the_quick_run_writes_its_report_in_time(quick_report: dict) -> None:
    assert quick_report["quick"] is True
    assert quick_report["elapsed_s"] <= 90, quick_report["stdout"][-3000:]
    names = {line["name"].split(".")[0] for line in quick_report["lines"]}
    assert names == set(QUICK_CHECKS)
    assert quick_report["returncode"] == (1 if quick_report["summary"].get("FAIL") else 0)


@pytest.mark.parametrize("name", QUICK_CHECKS)
def test_quick_check_passes(quick_report: dict, name: str) -> None:
    lines = [line for line in quick_report["lines"] if line["name"].split(".")[0] == name]
    assert lines, f"{name} did not report"
    failed = [  # a SKIP for something not served (e.g. reflection v1) is no failure; one for lack of time is
        f"{line['name']}: {line['status']} {line['reason']} ({line['measured']})"
        for line in lines
        if line["status"] == "FAIL" or (line["status"] == "SKIP" and line["reason"].startswith("budget"))
    ]
    assert not failed, "\n".join(failed)
