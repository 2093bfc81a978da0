"""mnist-eval: score an ONNX model on MNIST-test and on a seeded corruption suite of it.

Clean test accuracy (99%+) says little about the photos and scans people send; the suite in
`training/corruptions.py` (noise, blur, grey paper, rotation, stray pen lines, ...) asks how the
model fares on such images, reproducibly: the same seed gives the same corrupted images. Images
reach the model exactly as the server feeds them: the normalization stored in the model's
metadata (the contract's default for a file without it), the contract's input and output names.
Writes report.json, examples.png (what each kind looks like) and worst.png (the most confident
mistakes per kind) to --out.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from proto.contract import INPUT_NAME, MNIST_NORMALIZATION, PROBABILITIES, ModelMetadata, Normalization
from training.corruptions import HELD_OUT_CORRUPTIONS, corrupt
from training.data import load_split, sha256_file

PROG = "mnist-eval"
CLEAN = "clean"  # the unchanged test images: always scored, first, and left out of the mean
EXAMPLES_PER_KIND = 10
WORST_PER_KIND = 8


class EvalError(RuntimeError):
    """Bad input (model file, kind names, data): the message is the one line the user sees."""


# --- the model -----------------------------------------------------------------------------------


@dataclass
class Model:
    """An ONNX Runtime session and how to feed it: the normalization the server would use for this file."""

    path: Path
    session: Any  # onnxruntime.InferenceSession
    normalization: Normalization
    normalization_source: str
    provider: str

    def probabilities(self, images: np.ndarray, batch_size: int) -> np.ndarray:
        """uint8 (N, 28, 28) images -> (N, 10) class probabilities from the model's own softmax output."""
        rows = []
        for start in range(0, len(images), batch_size):
            x = self.normalization.apply(images[start : start + batch_size])[:, None]
            rows.append(self.session.run([PROBABILITIES], {INPUT_NAME: x})[0])
        return np.concatenate(rows) if rows else np.zeros((0, 10), np.float32)


def open_model(path: Path) -> Model:
    """Load `path` on CUDA when this onnxruntime build has it (else the CPU) and check its tensor names."""
    if not path.is_file():
        raise EvalError(f"model file not found: {path}")
    import onnxruntime as ort

    providers = ["CPUExecutionProvider"]
    if "CUDAExecutionProvider" in ort.get_available_providers():
        from server.engine.backends.onnxruntime_backend import preload_cuda_libraries

        preload_cuda_libraries(ort)  # the server's loader: also finds CUDA wheels unpacked apart from onnxruntime
        providers.insert(0, "CUDAExecutionProvider")  # ONNX Runtime falls back to the CPU if CUDA cannot start
    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only: the CUDA fallback's warnings are not the user's business
    try:
        session = ort.InferenceSession(str(path), sess_options=options, providers=providers)
    except Exception as exc:  # noqa: BLE001 - ONNX Runtime raises its own unrelated types for a bad file
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise EvalError(f"{path}: ONNX Runtime cannot load it: {first_line}") from None
    inputs = [i.name for i in session.get_inputs()]
    outputs = [o.name for o in session.get_outputs()]
    if INPUT_NAME not in inputs or PROBABILITIES not in outputs:
        raise EvalError(
            f"{path}: has inputs {inputs} and outputs {outputs}; expected input {INPUT_NAME!r} and output "
            f"{PROBABILITIES!r} (proto/contract.py)"
        )
    try:
        normalization = ModelMetadata.from_props(session.get_modelmeta().custom_metadata_map).norm
        source = "model metadata"
    except ValueError:  # not written by mnist-export: the contract's MNIST normalization, as training used
        normalization, source = MNIST_NORMALIZATION, "proto.contract (the model has no mnist-export metadata)"
    return Model(path, session, normalization, source, session.get_providers()[0])


# --- scoring -------------------------------------------------------------------------------------


@dataclass
class KindResult:
    """One kind's accuracy, with what the pictures need: the first images and the most confident mistakes."""

    kind: str
    accuracy: float
    examples: np.ndarray  # (k, 28, 28) uint8: the first images of the set, the same indices for every kind
    example_predictions: np.ndarray
    example_labels: np.ndarray
    worst: np.ndarray  # (m, 28, 28) uint8: wrong answers, most confident first
    worst_labels: np.ndarray
    worst_predictions: np.ndarray
    worst_confidence: np.ndarray
    wrong: int  # all mistakes, not only those kept for the picture


def score(kind: str, images: np.ndarray, labels: np.ndarray, probabilities: np.ndarray) -> KindResult:
    predictions = probabilities.argmax(axis=1)
    confidence = probabilities.max(axis=1)
    wrong = np.flatnonzero(predictions != labels)
    worst = wrong[np.argsort(-confidence[wrong], kind="stable")][:WORST_PER_KIND]
    first = slice(0, EXAMPLES_PER_KIND)
    return KindResult(
        kind=kind,
        accuracy=float((predictions == labels).mean()) if len(labels) else 0.0,
        examples=images[first].copy(),
        example_predictions=predictions[first],
        example_labels=labels[first],
        worst=images[worst].copy(),
        worst_labels=labels[worst],
        worst_predictions=predictions[worst],
        worst_confidence=confidence[worst],
        wrong=len(wrong),
    )


def parse_kinds(text: str) -> list[str]:
    """'all' or a comma-separated list of kind names (order kept, repeats and 'clean' dropped)."""
    if text.strip() == "all":
        return list(HELD_OUT_CORRUPTIONS)
    kinds: list[str] = []
    for name in (part.strip() for part in text.split(",")):
        if not name or name == CLEAN or name in kinds:
            continue
        if name not in HELD_OUT_CORRUPTIONS:
            raise EvalError(f"unknown corruption kind {name!r}; known kinds: {', '.join(HELD_OUT_CORRUPTIONS)}")
        kinds.append(name)
    return kinds


def evaluate(
    model: Model,
    images: np.ndarray,
    labels: np.ndarray,
    kinds: list[str],
    seed: int,
    batch_size: int,
    progress: bool | None = None,
) -> list[KindResult]:
    """Clean first, then each kind's corrupted copy of `images`, all through `model`.

    `progress` None: a tqdm bar on stderr when it is a terminal; True or False: always or never.
    """
    from tqdm import tqdm

    results = [score(CLEAN, images, labels, model.probabilities(images, batch_size))]
    bar = tqdm(
        kinds,
        desc="corruptions",
        unit="kind",
        file=sys.stderr,
        disable=None if progress is None else not progress,
        leave=False,
    )
    for kind in bar:
        bar.set_postfix_str(kind)
        corrupted = corrupt(images, kind, seed)
        results.append(score(kind, corrupted, labels, model.probabilities(corrupted, batch_size)))
    return results


def mean_corruption_accuracy(results: list[KindResult]) -> float | None:
    corrupted = [r.accuracy for r in results if r.kind != CLEAN]
    return float(np.mean(corrupted)) if corrupted else None


# --- outputs -------------------------------------------------------------------------------------


def build_report(
    model: Model, results: list[KindResult], seed: int, limit: int, images: int, seconds: float
) -> dict[str, Any]:
    clean = results[0]
    return {
        "model": str(model.path),
        "model_sha256": sha256_file(model.path),
        "provider": model.provider,
        "normalization": {**model.normalization.as_dict(), "source": model.normalization_source},
        "seed": seed,
        "limit": limit,
        "images": images,
        "clean_accuracy": clean.accuracy,
        "corruption_accuracy": {r.kind: r.accuracy for r in results[1:]},
        "mean_corruption_accuracy": mean_corruption_accuracy(results),
        "descriptions": {r.kind: HELD_OUT_CORRUPTIONS[r.kind].description for r in results[1:]},
        "seconds": round(seconds, 2),
    }


def format_table(results: list[KindResult]) -> str:
    """kind | accuracy | change from clean | description: clean first, the mean over kinds last."""
    width = max(len(r.kind) for r in results) + 2
    width = max(width, len(f"mean of {len(results) - 1} kinds") + 2)
    clean = results[0].accuracy
    lines = [f"{'kind':<{width}}{'accuracy':>9}  {'vs clean':>8}  description", "-" * (width + 40)]
    for r in results:
        change = "" if r.kind == CLEAN else f"{100 * (r.accuracy - clean):+.2f}"
        description = "MNIST test images as they are" if r.kind == CLEAN else HELD_OUT_CORRUPTIONS[r.kind].description
        lines.append(f"{r.kind:<{width}}{100 * r.accuracy:>8.2f}%  {change:>8}  {description}")
    mean = mean_corruption_accuracy(results)
    if mean is not None:
        lines.append("-" * (width + 40))
        lines.append(f"{f'mean of {len(results) - 1} kinds':<{width}}{100 * mean:>8.2f}%  {100 * (mean - clean):+8.2f}")
    return "\n".join(lines)


CELL = 28  # one image in the picture grids, in mosaic pixels
GAP_X, GAP_Y = 5, 13  # between cells; the vertical gap carries each cell's caption
INCH_PER_PIXEL = 0.03  # a cell is about 0.85 in wide
LABEL_INCHES = 1.7  # the left margin holding the row labels


@dataclass
class Cell:
    image: np.ndarray  # (28, 28) uint8
    caption: str
    color: str


def plot_grid(rows: list[tuple[str, list[Cell]]], columns: int, path: Path, title: str) -> None:
    """Rows of captioned images as one mosaic in one Axes: hundreds of small Axes would take seconds to draw.

    Drawn on the Agg canvas directly (no pyplot), so no global matplotlib backend state is touched.
    """
    from matplotlib import colormaps
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    step_x, step_y = CELL + GAP_X, CELL + GAP_Y
    mosaic = np.full((len(rows) * step_y, columns * step_x - GAP_X), np.nan, np.float32)  # NaN: the white gutter
    for r, (_, cells) in enumerate(rows):
        for c, cell in enumerate(cells[:columns]):
            top, left = r * step_y + GAP_Y, c * step_x
            mosaic[top : top + CELL, left : left + CELL] = cell.image
    width_in = LABEL_INCHES + mosaic.shape[1] * INCH_PER_PIXEL + 0.2
    height_in = mosaic.shape[0] * INCH_PER_PIXEL + 0.5
    figure = Figure(figsize=(width_in, height_in), dpi=100)
    FigureCanvasAgg(figure)
    ax = figure.add_axes(
        (LABEL_INCHES / width_in, 0.05 / height_in, mosaic.shape[1] * INCH_PER_PIXEL / width_in,
         mosaic.shape[0] * INCH_PER_PIXEL / height_in)
    )  # fmt: skip
    ax.imshow(mosaic, cmap=colormaps["gray"].with_extremes(bad="white"), vmin=0, vmax=255, interpolation="nearest")
    ax.set_axis_off()
    for r, (label, cells) in enumerate(rows):
        top = r * step_y + GAP_Y
        ax.text(-4, top + CELL / 2, label, ha="right", va="center", fontsize=8)
        if not cells:
            ax.text(2, top + CELL / 2, "none", ha="left", va="center", fontsize=7, color="0.4")
        for c, cell in enumerate(cells[:columns]):
            ax.text(c * step_x + CELL / 2, top - 1.5, cell.caption, ha="center", va="bottom", fontsize=6.5,
                    color=cell.color)  # fmt: skip
    figure.suptitle(title, fontsize=9, y=1 - 0.08 / height_in, va="top")
    figure.savefig(path)


def plot_examples(results: list[KindResult], path: Path, title: str) -> None:
    """One row per kind (clean first): the same test images, each captioned with the model's answer."""
    rows = [
        (
            f"{result.kind}\n{100 * result.accuracy:.1f}%",
            [
                Cell(image, f"{label}→{predicted}", "tab:green" if predicted == label else "tab:red")
                for image, label, predicted in zip(
                    result.examples, result.example_labels, result.example_predictions, strict=True
                )
            ],
        )
        for result in results
    ]
    plot_grid(rows, EXAMPLES_PER_KIND, path, title)


def plot_worst(results: list[KindResult], path: Path, title: str) -> None:
    """Per kind, the mistakes the model was surest of, captioned 'true→predicted (confidence)'."""
    rows = [
        (
            f"{result.kind}\n{result.wrong:,} wrong",
            [
                Cell(image, f"{label}→{predicted} ({confidence:.2f})", "tab:red")
                for image, label, predicted, confidence in zip(
                    result.worst, result.worst_labels, result.worst_predictions, result.worst_confidence, strict=True
                )
            ],
        )
        for result in results
    ]
    plot_grid(rows, WORST_PER_KIND, path, title)


# --- command line --------------------------------------------------------------------------------


def _count(minimum: int) -> Callable[[str], int]:
    """An argparse type: an integer of at least `minimum`, with an error message saying so."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be {minimum} or more, not {value}")
        return value

    return parse


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Score an ONNX MNIST model on the clean test set and on a seeded corruption suite of it "
        "(noise, blur, low resolution, JPEG, low contrast, fog, grey paper, partial inversion, occlusion, stray "
        "lines, elastic, rotation, shear, scale, translation, thick and thin strokes, outlines). Images are "
        "normalized as the server does for raw 28x28 requests; the model's 'probabilities' output is read. Prints "
        "a table (clean first, the mean over corruption kinds last) and writes report.json, examples.png and "
        "worst.png. Exit status 0 on success, 2 on bad input.",
    )
    parser.add_argument("model", type=Path, metavar="MODEL.onnx", help="the ONNX model to score")
    parser.add_argument(
        "--data-dir",
        metavar="DIR",
        help="MNIST directory (default: $MNIST_DIR, else ../shared/data/mnist, else the user cache)",
    )
    parser.add_argument(
        "--kinds",
        default="all",
        metavar="all|K1,K2",
        help=f"corruption kinds to score: 'all' (the default) or comma-separated names from: "
        f"{', '.join(HELD_OUT_CORRUPTIONS)}. The clean images are always scored",
    )
    parser.add_argument(
        "--limit",
        type=_count(0),
        default=0,
        metavar="N",
        help="score only the first N test images, e.g. 200 for a quick look (default: 0 = all 10,000)",
    )
    parser.add_argument(
        "--seed",
        type=_count(0),
        default=0,
        metavar="N",
        help="seed of the corruptions' random parameters: the same seed and images give the same corrupted "
        "images and so the same scores (default: 0)",
    )
    parser.add_argument(
        "--batch-size",
        type=_count(1),
        default=256,
        metavar="N",
        help="images per ONNX Runtime run: a matter of speed and memory (default: 256)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        metavar="DIR",
        help="where report.json, examples.png and worst.png are written (default: runs/eval/<model file stem>)",
    )
    parser.add_argument(
        "--digit-sources",
        type=_count(0),
        nargs="?",
        const=0,
        metavar="N",
        help="also judge the not-a-digit signal (is_digit, as served) on every named source of real digits and "
        "non-digits (training/digit_sources.py), each apart: false alarms and catches per source, how the "
        "detector and the classifier agree, the curve; writes digit-signal.json, .md and .curve.png beside the "
        "report; N: only the first N images of each source (default: all, about a minute on 2 cores; needs "
        "tests/setup.sh's handwriting fonts)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    started = time.perf_counter()
    try:
        kinds = parse_kinds(args.kinds)
        model = open_model(args.model)
        test = load_split("test", args.data_dir)
    except (EvalError, ValueError) as exc:  # IdxFormatError, a ValueError, names the data file at fault
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 2
    count = min(args.limit, len(test)) if args.limit else len(test)
    images, labels = test.images[:count], test.labels[:count]
    results = evaluate(model, images, labels, kinds, args.seed, args.batch_size)
    seconds = time.perf_counter() - started

    out = args.out or Path("runs") / "eval" / args.model.stem
    out.mkdir(parents=True, exist_ok=True)
    report = build_report(model, results, args.seed, args.limit, count, seconds)
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    title = f"{args.model.name} on {count:,} MNIST test images, seed {args.seed}"
    plot_examples(results, out / "examples.png", f"{title}: first {EXAMPLES_PER_KIND} images, predictions")
    plot_worst(results, out / "worst.png", f"{title}: most confident mistakes, true→predicted (confidence)")

    print(f"{args.model} (sha256 {report['model_sha256'][:16]}…) on {count:,} MNIST test images, seed {args.seed}")
    print(f"  {model.provider}, normalization from {model.normalization_source}, {seconds:.1f} s\n")
    print(format_table(results))
    print(f"\nwrote {out / 'report.json'}, {out / 'examples.png'}, {out / 'worst.png'}")
    if args.digit_sources is not None:
        from export import digit_signal

        signal = digit_signal.evaluate(args.model, mnist_dir=args.data_dir, per_source=args.digit_sources or None)
        written = digit_signal.write(signal, out)
        print("\n" + digit_signal.markdown(signal))
        print(f"\nwrote {', '.join(str(path) for path in written)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
