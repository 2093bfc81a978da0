"""What one encoded image costs the server to decode, by format and size: the measurement behind --max-image-pixels.

Each case is encoded here (a digit drawn on paper at the given size, as PNG or JPEG) and decoded in a
fresh process that does nothing else, so its peak resident memory is the decode's own: opened,
decoded and preprocessed exactly as the server does (`server.pipeline.preprocess`). Prints a Markdown table of
seconds and peak memory above the idle process.

    python -m loadtest.decode_cost [--sizes 1,4,16] [--formats PNG,JPEG]
"""

from __future__ import annotations

import argparse
import io
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw


def page(megapixels: float) -> Image.Image:
    """A 4:3 sheet of paper with a thick dark '7' across most of it, and some sensor noise."""
    width = int((megapixels * 1e6 * 4 / 3) ** 0.5)
    height = int(width * 3 / 4)
    image = Image.new("L", (width, height), 235)
    draw = ImageDraw.Draw(image)
    stroke = max(2, width // 40)
    draw.line([(width * 0.3, height * 0.2), (width * 0.7, height * 0.2), (width * 0.45, height * 0.85)], 30, stroke)
    noise = np.random.default_rng(0).integers(-12, 12, (height, width), dtype=np.int16)
    return Image.fromarray(np.clip(np.asarray(image, np.int16) + noise, 0, 255).astype(np.uint8))


def encode(fmt: str, megapixels: float) -> bytes:
    buffer = io.BytesIO()
    page(megapixels).save(buffer, fmt, **({"quality": 90} if fmt == "JPEG" else {"compress_level": 6}))
    return buffer.getvalue()


def _high_water_kb() -> int:
    """This process's peak resident memory (VmHWM, reset by exec: ru_maxrss would inherit the parent's)."""
    status = Path("/proc/self/status").read_text()
    return int(status.split("VmHWM:")[1].split()[0])


def measure_one(path: str, fmt: str, megapixels: float, max_pixels: int) -> dict:
    """In this fresh process, which has done nothing else: time and measure the server's decode of the file."""
    data = Path(path).read_bytes()
    from proto.contract import MNIST_NORMALIZATION
    from server.pipeline.preprocess import InvalidImage, from_encoded, open_image

    before = _high_water_kb()
    started = time.perf_counter()
    try:
        opened = open_image(data, max_pixels)
        decoded = opened.pixels
        from_encoded(data, MNIST_NORMALIZATION, max_pixels)
        outcome = "decoded"
    except InvalidImage as exc:
        decoded, outcome = 0, f"refused: {exc}"
    seconds = time.perf_counter() - started
    peak = _high_water_kb()
    return {
        "format": fmt,
        "megapixels": megapixels,
        "file_kb": len(data) / 1024,
        "decoded_megapixels": decoded / 1e6,
        "seconds": seconds,
        "peak_mb": max(0, peak - before) / 1024,
        "outcome": outcome,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="1,2,4,8,16,48", help="image sizes in megapixels")
    parser.add_argument("--formats", default="PNG,JPEG")
    parser.add_argument("--max-pixels", type=int, default=100_000_000, help="limit applied (default: high, to measure)")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: FORMAT:MEGAPIXELS, run in a child
    args = parser.parse_args(argv)
    if args.one:
        path, fmt, mp = args.one.split(":")
        print(json.dumps(measure_one(path, fmt, float(mp), args.max_pixels)))
        return 0
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for fmt in args.formats.split(","):
            for mp in args.sizes.split(","):
                path = Path(folder) / f"page.{fmt.lower()}"
                path.write_bytes(encode(fmt, float(mp)))
                child = [sys.executable, "-m", "loadtest.decode_cost", "--one", f"{path}:{fmt}:{mp}", "--max-pixels"]
                out = subprocess.run([*child, str(args.max_pixels)], capture_output=True, text=True, check=True)
                rows.append(json.loads(out.stdout))
            print(
                f"  {fmt} {mp} MP: {rows[-1]['seconds'] * 1000:.0f} ms, +{rows[-1]['peak_mb']:.0f} MB", file=sys.stderr
            )
    print("| format | image | file | decoded | time | peak memory |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(
            f"| {r['format']} | {r['megapixels']:g} MP | {r['file_kb']:,.0f} KB | {r['decoded_megapixels']:.2f} MP | "
            f"{r['seconds'] * 1000:,.0f} ms | +{r['peak_mb']:,.0f} MB |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
