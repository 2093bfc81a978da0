"""mnist-data: download MNIST (checksums verified, atomic writes), verify a directory, inspect samples."""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np

from training.data import (
    EXPECTED_COUNTS,
    SPLIT_FILES,
    IdxFormatError,
    default_data_dirs,
    find_idx_file,
    load_split,
    resolve_data_dir,
    sha256_file,
    user_cache_dir,
)

# SHA-256 of the canonical gzip files as distributed since 1998.
CANONICAL_SHA256: dict[str, str] = {
    "train-images-idx3-ubyte.gz": "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
    "train-labels-idx1-ubyte.gz": "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",
    "t10k-images-idx3-ubyte.gz": "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
    "t10k-labels-idx1-ubyte.gz": "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6",
}
# Public mirrors, tried in order (the original host often refuses automated downloads).
MIRRORS: tuple[str, ...] = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
    "http://yann.lecun.com/exdb/mnist/",
)


class DownloadError(RuntimeError):
    pass


def download_file(name: str, target_dir: Path, mirrors: tuple[str, ...] = MIRRORS, timeout: float = 60) -> Path:
    """Fetch `name` from the first mirror that serves the canonical bytes; the target appears only when verified."""
    from tqdm import tqdm

    expected = CANONICAL_SHA256[name]
    target = target_dir / name
    if target.is_file() and sha256_file(target) == expected:
        print(f"{target}: present, checksum ok")
        return target
    target_dir.mkdir(parents=True, exist_ok=True)
    failures = []
    for mirror in mirrors:
        url = mirror + name
        fd, tmp_name = tempfile.mkstemp(prefix=f".{name}.", dir=target_dir)
        tmp = Path(tmp_name)
        try:
            digest = hashlib.sha256()
            with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as response:
                total = int(response.headers.get("Content-Length") or 0) or None
                with tqdm(total=total, unit="B", unit_scale=True, desc=name, leave=False, disable=None) as bar:
                    for chunk in iter(lambda: response.read(1 << 16), b""):
                        out.write(chunk)
                        digest.update(chunk)
                        bar.update(len(chunk))
            if digest.hexdigest() != expected:
                failures.append(f"{url}: checksum {digest.hexdigest()[:16]}… is not the canonical {expected[:16]}…")
                continue
            os.replace(tmp, target)  # atomic: readers never see a partial file
            print(f"{target}: downloaded from {mirror}, checksum ok")
            return target
        except (urllib.error.URLError, OSError, ValueError) as exc:
            failures.append(f"{url}: {exc}")
        finally:
            tmp.unlink(missing_ok=True)
    raise DownloadError(f"could not download {name}:\n  " + "\n  ".join(failures))


def verify_dir(data_dir: Path) -> list[str]:
    """Validate both splits' format; describe each file's checksum relative to the canonical one."""
    lines = []
    for split, stems in SPLIT_FILES.items():
        data = load_split(split, data_dir)  # raises IdxFormatError naming the file
        expected = EXPECTED_COUNTS[split]
        count_note = "" if len(data) == expected else f" (canonical MNIST has {expected:,})"
        for stem in stems:
            path = find_idx_file(data_dir, stem)
            canonical = CANONICAL_SHA256.get(path.name)
            if canonical is None:
                checksum = "uncompressed file, checksum not compared"
            elif sha256_file(path) == canonical:
                checksum = "canonical checksum"
            else:
                checksum = "valid format, checksum differs from the canonical file (accepted: e.g. a reconstruction)"
            lines.append(f"ok  {path.name:<28} {split:<5} {len(data):>6,} items{count_note}  {checksum}")
    return lines


def inspect_split(data_dir: Path, split: str, grid_path: Path | None, count: int) -> list[str]:
    data = load_split(split, data_dir)
    histogram = np.bincount(data.labels, minlength=10)
    lines = [
        f"{split}: {len(data):,} images of 28x28 from {data_dir}",
        f"pixel mean {data.images.mean() / 255:.4f}, std {data.images.std() / 255:.4f} (scaled to [0, 1])",
        "labels: " + "  ".join(f"{d}:{n}" for d, n in enumerate(histogram)),
    ]
    if grid_path is not None:
        from PIL import Image

        rows = (count + 9) // 10
        canvas = np.zeros((rows * 30, 10 * 30), dtype=np.uint8)
        for i in range(min(count, len(data))):
            r, c = divmod(i, 10)
            canvas[r * 30 + 1 : r * 30 + 29, c * 30 + 1 : c * 30 + 29] = data.images[i]
        Image.fromarray(canvas).resize((canvas.shape[1] * 2, canvas.shape[0] * 2), Image.NEAREST).save(grid_path)
        lines.append(
            f"wrote {grid_path}: the first {min(count, len(data))} images, labels "
            + "".join(str(v) for v in data.labels[:count])
        )
    return lines


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mnist-data",
        description="Get and check the MNIST data used for training and evaluation.",
        epilog="Without --dir, the data directory is $MNIST_DIR, else ../shared/data/mnist, else "
        f"{user_cache_dir()}. Searched now: " + ", ".join(str(d) for d in default_data_dirs()),
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    download = sub.add_parser(
        "download",
        help="download the four canonical files from public mirrors, verifying each SHA-256 and writing atomically",
    )
    download.add_argument("--dir", type=Path, help=f"target directory (default: {user_cache_dir()})")
    verify = sub.add_parser(
        "verify",
        help="validate magic numbers, dimensions, counts and lengths of all files, "
        "and report whether each matches the canonical checksum",
    )
    verify.add_argument("--dir", type=Path, help="MNIST directory (default: see below)")
    inspect = sub.add_parser("inspect", help="print statistics of a split and optionally save a PNG grid of samples")
    inspect.add_argument("--dir", type=Path, help="MNIST directory (default: see below)")
    inspect.add_argument("--split", choices=list(SPLIT_FILES), default="test", help="which split")
    inspect.add_argument("--grid", type=Path, help="write a PNG grid of the first images to this path")
    inspect.add_argument("--count", type=int, default=50, help="images in the grid")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "download":
            target = args.dir or Path(os.environ.get("MNIST_DIR") or user_cache_dir())
            for name in CANONICAL_SHA256:
                download_file(name, target)
            print("\n".join(verify_dir(target)))
        elif args.command == "verify":
            print("\n".join(verify_dir(resolve_data_dir(args.dir))))
        else:
            print("\n".join(inspect_split(resolve_data_dir(args.dir), args.split, args.grid, args.count)))
    except (IdxFormatError, DownloadError) as exc:
        print(f"mnist-data: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
