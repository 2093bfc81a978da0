"""mnist-read-bench: a generated benchmark for ReadDigits, ReadTable and ReadExpression, from MNIST *test* digits.

Each image is a string of 1-10 test digits composed as people write them: random sizes, spacings
(including touching and slightly overlapping pairs), slants and baselines, one or more lines and
groups, on clean paper or a photo-like page (uneven light, texture, blur, JPEG). The set is seeded:
the same seed gives the same images. It runs against a live server's ReadDigits (or an in-process
one) and reports digit accuracy (1 - edit distance / length) and whole-string accuracy per kind, with
a PNG of example inputs and the boxes and readings the server returned. Tables and expressions
(loadtest/layouts.py) are scored by cells and whole tables, and by whole expressions and operators.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageFilter

# kind -> (how many digits, touching pair, lines, groups): what each part of the benchmark composes
KINDS: dict[str, dict] = {
    "four-digits": {"digits": (4, 4), "touching": False, "lines": 1, "groups": False},
    "one-to-ten": {"digits": (1, 10), "touching": False, "lines": 1, "groups": True},
    "two-lines": {"digits": (2, 6), "touching": False, "lines": 2, "groups": True},
    "touching-pair": {"digits": (2, 2), "touching": True, "lines": 1, "groups": False},
    "touching-in-four": {"digits": (4, 4), "touching": True, "lines": 1, "groups": False},
}


@dataclass(frozen=True)
class Composed:
    image: bytes  # an encoded image (PNG, or JPEG for photo-like pages)
    text: str  # what a reader should answer
    kind: str
    background: str
    sources: tuple[int, ...] = ()  # the MNIST test digits drawn (tables: for the classifier's own ceiling)


def _digit_ink(image: np.ndarray, height: int, slant: float, rng: np.random.Generator) -> np.ndarray:
    """One MNIST digit (light on dark 28x28) cropped to its ink, scaled to `height` px, slanted: float ink [0, 1]."""
    rows, cols = np.nonzero(image > 30)
    crop = image[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1].astype(np.float32) / 255.0
    width = max(2, round(crop.shape[1] * height / crop.shape[0] * rng.uniform(0.9, 1.15)))
    picture = Image.fromarray((crop * 255).astype(np.uint8)).resize((width, height), Image.Resampling.BICUBIC)
    pad = int(abs(slant) * height) + 2
    canvas = Image.new("L", (width + 2 * pad, height), 0)
    canvas.paste(picture, (pad, 0))
    # shear x by slant * (y - height / 2): a forward slant leans the top to the right
    sheared = canvas.transform(
        canvas.size, Image.Transform.AFFINE, (1, slant, -slant * height / 2, 0, 1, 0), Image.Resampling.BICUBIC
    )
    ink = np.asarray(sheared, np.float32) / 255.0
    cols = np.flatnonzero(ink.max(axis=0) > 0.1)
    return ink[:, cols[0] : cols[-1] + 1]


def compose(rng: np.random.Generator, images: np.ndarray, labels: np.ndarray, kind: str, photo: bool) -> Composed:
    spec = KINDS[kind]
    height = int(rng.integers(28, 90))
    lines_text: list[str] = []
    placed: list[tuple[np.ndarray, int, int]] = []  # ink, x, y
    y = int(rng.integers(8, 20))
    width_used = 0
    for _ in range(spec["lines"]):
        count = int(rng.integers(spec["digits"][0], spec["digits"][1] + 1))
        touch_at = int(rng.integers(0, count - 1)) if spec["touching"] and count > 1 else -1
        x = int(rng.integers(8, 24))
        text = ""
        slant = rng.uniform(-0.25, 0.25)  # a writer keeps a slant, roughly
        baseline = 0.0
        for i in range(count):
            index = int(rng.integers(0, len(images)))
            size = int(height * rng.uniform(0.85, 1.15))
            ink = _digit_ink(images[index], size, slant + rng.uniform(-0.06, 0.06), rng)
            baseline += rng.uniform(-0.06, 0.06) * height
            top = y + int(baseline) + (height - size)
            placed.append((ink, x, max(0, top)))
            text += str(int(labels[index]))
            if i == count - 1:
                break
            if i == touch_at:
                gap = rng.uniform(-0.12, 0.0) * height  # touching or slightly overlapping
            elif spec["groups"] and rng.random() < 0.2:
                gap = rng.uniform(0.9, 1.5) * height
                text += " "
            else:
                gap = rng.uniform(0.1, 0.35) * height
            x += ink.shape[1] + int(gap)
        width_used = max(width_used, x + placed[-1][0].shape[1])
        lines_text.append(text)
        y += int(height * rng.uniform(1.4, 1.9))
    canvas = np.zeros((y + 16, width_used + int(rng.integers(8, 24))), np.float32)
    for ink, x, top in placed:
        h, w = ink.shape
        region = canvas[top : top + h, x : x + w]
        np.maximum(region, ink[: region.shape[0], : region.shape[1]], out=region)
    return _render(canvas, "\n".join(lines_text), kind, photo, rng)


def _render(
    ink: np.ndarray, text: str, kind: str, photo: bool, rng: np.random.Generator, sources: tuple[int, ...] = ()
) -> Composed:
    """Ink on a page: clean (white paper, or MNIST's light on dark), or photo-like."""
    darkness = rng.uniform(0.7, 1.0)
    if not photo:
        if rng.random() < 0.2:
            page = ink * darkness  # light ink on a dark ground, as MNIST is stored
        else:
            page = 1.0 - ink * darkness
        out = io.BytesIO()
        Image.fromarray(np.clip(page * 255, 0, 255).astype(np.uint8)).save(out, "PNG")
        return Composed(out.getvalue(), text, kind, "clean", sources)
    h, w = ink.shape
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    light = rng.uniform(0.6, 0.8) + rng.uniform(0.1, 0.25) * (
        np.cos(rng.uniform(0, 6.3)) * xx + np.sin(rng.uniform(0, 6.3)) * yy
    )
    paper = np.clip(light + rng.normal(0, 0.03, ink.shape), 0, 1)
    page = paper * (1.0 - ink * darkness * rng.uniform(0.75, 0.95))
    picture = Image.fromarray(np.clip(page * 255, 0, 255).astype(np.uint8)).filter(
        ImageFilter.GaussianBlur(rng.uniform(0.3, 1.0))
    )
    out = io.BytesIO()
    picture.save(out, "JPEG", quality=int(rng.integers(55, 85)))
    return Composed(out.getvalue(), text, kind, "photo", sources)


def benchmark_set(images: np.ndarray, labels: np.ndarray, per_kind: int, seed: int = 0) -> Iterator[Composed]:
    """`per_kind` images of every kind, half on clean paper and half photo-like, seeded."""
    rng = np.random.default_rng(seed)
    for kind in KINDS:
        for i in range(per_kind):
            yield compose(rng, images, labels, kind, photo=i % 2 == 1)


def edit_distance(a: str, b: str) -> int:
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        current = [i]
        for j, cb in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        previous = current
    return previous[-1]


@dataclass
class KindScore:
    images: int = 0
    digits: int = 0
    digit_errors: int = 0  # edit distance over the digits alone
    strings_right: int = 0  # the digits, in order, all right
    texts_right: int = 0  # and the spaces and line breaks too

    def as_dict(self) -> dict:
        return {
            **asdict(self),
            "digit_accuracy": 1 - self.digit_errors / max(self.digits, 1),
            "string_accuracy": self.strings_right / max(self.images, 1),
            "text_accuracy": self.texts_right / max(self.images, 1),
        }


def score(results: list[tuple[Composed, str]]) -> dict[str, dict]:
    """Per kind (and per kind and background): digit accuracy, whole-string accuracy, layout-exact accuracy."""
    table: dict[str, KindScore] = {}
    for composed, answer in results:
        truth = composed.text.replace(" ", "").replace("\n", "")
        read = answer.replace(" ", "").replace("\n", "")
        for key in (composed.kind, f"{composed.kind}/{composed.background}"):
            entry = table.setdefault(key, KindScore())
            entry.images += 1
            entry.digits += len(truth)
            entry.digit_errors += min(edit_distance(read, truth), len(truth))
            entry.strings_right += read == truth
            entry.texts_right += answer == composed.text
    return {key: value.as_dict() for key, value in sorted(table.items())}


def run(
    read: Callable[[bytes], tuple[str, list]], images: np.ndarray, labels: np.ndarray, per_kind: int, seed: int = 0
) -> tuple[dict[str, dict], list[tuple[Composed, str, list]]]:
    """Read every image of the set with `read(encoded) -> (text, boxes)`; the scores and every answer."""
    answers = []
    for composed in benchmark_set(images, labels, per_kind, seed):
        text, boxes = read(composed.image)
        answers.append((composed, text, boxes))
    return score([(c, t) for c, t, _ in answers]), answers


def draw_examples(answers: list[tuple[Composed, str, list]], path: Path, per_kind: int = 4) -> None:
    """A grid of example inputs with the boxes the server found and its reading (green right, red wrong)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    chosen: list[tuple[Composed, str, list]] = []
    for kind in KINDS:
        chosen += [a for a in answers if a[0].kind == kind][:per_kind]
    columns = per_kind
    figure, axes = plt.subplots(len(KINDS), columns, figsize=(4 * columns, 2.2 * len(KINDS)), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for n, (composed, text, boxes) in enumerate(chosen):
        ax = axes[n // columns][n % columns]
        ax.imshow(Image.open(io.BytesIO(composed.image)).convert("L"), cmap="gray", vmin=0, vmax=255)
        for x, y, w, h, digit in boxes:
            ax.add_patch(Rectangle((x, y), w, h, fill=False, edgecolor="tab:orange", linewidth=1))
            ax.text(x, y - 2, str(digit), color="tab:orange", fontsize=7)
        right = text == composed.text
        shown = text.replace("\n", " / ")
        ax.set_title(
            f"{composed.kind} ({composed.background}): {shown!r}", fontsize=8, color="green" if right else "red"
        )
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    plt.close(figure)


def _stub(target: str) -> tuple[Any, Any, Any]:
    """grpc, the mnist.v1 messages and a Classifier stub on `target` (imported here: the composers need neither)."""
    import grpc

    from proto.mnist.v1 import classifier_pb2 as pb
    from proto.mnist.v1 import classifier_pb2_grpc as pb_grpc

    return grpc, pb, pb_grpc.ClassifierStub(grpc.insecure_channel(target))


def grpc_reader(target: str, timeout: float = 10.0) -> Callable[[bytes], tuple[str, list]]:
    grpc, pb, stub = _stub(target)

    def read(image: bytes) -> tuple[str, list]:
        try:
            reply = stub.ReadDigits(pb.ReadDigitsRequest(image=image), timeout=timeout)
        except grpc.RpcError as err:
            return f"<{err.code().name}>", []
        return reply.text, [(d.x, d.y, d.width, d.height, d.digit) for d in reply.digits]

    return read


def grpc_table_reader(target: str, timeout: float = 30.0) -> Callable[[bytes], tuple[str, list]]:
    """ReadTable: the cells' text, tab-separated, a row per line (what `loadtest.layouts` composes as truth)."""
    grpc, pb, stub = _stub(target)

    def read(image: bytes) -> tuple[str, list]:
        try:
            reply = stub.ReadTable(pb.ReadTableRequest(image=image), timeout=timeout)
        except grpc.RpcError as err:
            return f"<{err.code().name}: {err.details()}>", []
        text = "\n".join("\t".join(cell.text for cell in row.cells) for row in reply.rows)
        boxes = [(c.x, c.y, c.width, c.height, c.text) for row in reply.rows for c in row.cells]
        return text, boxes

    return read


def grpc_raw_classifier(target: str, timeout: float = 30.0) -> Callable[[np.ndarray], np.ndarray]:
    """ClassifyBatch on (N, 28, 28) uint8 digits as MNIST stores them, 256 a call: the digits it answers."""
    grpc, pb, stub = _stub(target)

    def classify(images: np.ndarray) -> np.ndarray:
        digits = []
        for start in range(0, len(images), 256):
            requests = [pb.ClassifyRequest(raw=image.tobytes()) for image in images[start : start + 256]]
            reply = stub.ClassifyBatch(pb.ClassifyBatchRequest(requests=requests), timeout=timeout)
            digits += [answer.digit for answer in reply.responses]
        return np.asarray(digits)

    return classify


def grpc_expression_reader(target: str, timeout: float = 10.0) -> Callable[[bytes], tuple[str, list]]:
    grpc, pb, stub = _stub(target)

    def read(image: bytes) -> tuple[str, list]:
        try:
            reply = stub.ReadExpression(pb.ReadExpressionRequest(image=image), timeout=timeout)
        except grpc.RpcError as err:
            return f"<{err.code().name}: {err.details()}>", []
        return reply.text, [(s.x, s.y, s.width, s.height, s.symbol) for s in reply.symbols]

    return read


def run_layouts(
    read_table: Callable[[bytes], tuple[str, list]],
    read_expression: Callable[[bytes], tuple[str, list]],
    images: np.ndarray,
    labels: np.ndarray,
    tables_per_kind: int,
    expressions: int,
    seed: int = 0,
    progress: Callable[[int, int], None] = lambda done, total: None,
    classify: Callable[[np.ndarray], np.ndarray] | None = None,
) -> tuple[dict[str, dict], dict[str, dict], list[tuple[Composed, str, list]]]:
    """Tables and expressions (loadtest/layouts.py) through the readers: table scores, expression scores, answers.
    Given `classify` ((N, 28, 28) uint8 -> (N,) digits), the tables' scores carry the classifier's own ceiling."""
    from loadtest.layouts import EXPRESSION_KIND, layout_set, score_expressions, score_tables

    composed = layout_set(images, labels, tables_per_kind, expressions, seed)
    answers = []
    for n, item in enumerate(composed):
        text, boxes = (read_expression if item.kind == EXPRESSION_KIND else read_table)(item.image)
        answers.append((item, text, boxes))
        progress(n + 1, len(composed))
    misread = None
    if classify is not None:
        used = sorted({index for c, _, _ in answers for index in c.sources})
        misread = frozenset(np.asarray(used)[classify(images[used]) != labels[used]].tolist()) if used else frozenset()
    tables = score_tables([(c, t) for c, t, _ in answers if c.kind != EXPRESSION_KIND], misread)
    sums = score_expressions([(c, t) for c, t, _ in answers if c.kind == EXPRESSION_KIND])
    return tables, sums, answers


def draw_layout_examples(answers: list[tuple[Composed, str, list]], path: Path, per_kind: int = 3) -> None:
    """Example tables and expressions with the boxes the server read (green: whole answer right, red: wrong)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    kinds = list(dict.fromkeys(c.kind for c, _, _ in answers))
    figure, axes = plt.subplots(len(kinds), per_kind, figsize=(5 * per_kind, 4 * len(kinds)), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for k, kind in enumerate(kinds):
        for n, (composed, text, boxes) in enumerate([a for a in answers if a[0].kind == kind][:per_kind]):
            ax = axes[k][n]
            ax.imshow(Image.open(io.BytesIO(composed.image)).convert("L"), cmap="gray", vmin=0, vmax=255)
            for x, y, w, h, read in boxes:
                ax.add_patch(Rectangle((x, y), w, h, fill=False, edgecolor="tab:orange", linewidth=1))
                ax.text(x + 1, y + 1, read, color="tab:blue", fontsize=6, va="top")
            right = text == composed.text
            shown = text if kind == "expression" else f"{text.count(chr(10)) + 1} rows"
            ax.set_title(f"{kind} ({composed.background}): {shown}", fontsize=8, color="green" if right else "red")
    figure.tight_layout()
    figure.savefig(path, dpi=80)
    plt.close(figure)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mnist-read-bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--server", default="localhost:50051", help="host:port of a running mnist-serve")
    parser.add_argument("--per-kind", type=int, default=200, help="images of each kind (half clean, half photo-like)")
    parser.add_argument(
        "--tables-per-kind",
        type=int,
        default=100,
        help="tables of each kind, ruled and unruled (2-12 rows x 2-6 columns; half clean, half photo-like); 0: none",
    )
    parser.add_argument(
        "--expressions",
        type=int,
        default=200,
        help="expressions (2-4 operands of 1-3 digits, operators from the held-out stroke generator); 0: none",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data-dir", help="MNIST directory (default: $MNIST_DIR, else ../shared/data/mnist)")
    parser.add_argument("--out", type=Path, default=Path("reports/read-bench"), help="folder for report.json and PNG")
    args = parser.parse_args(argv)
    from training.data import load_split, resolve_data_dir

    test = load_split("test", resolve_data_dir(args.data_dir))
    args.out.mkdir(parents=True, exist_ok=True)
    report: dict = {"per_kind": args.per_kind, "seed": args.seed}
    if args.per_kind:
        started = time.perf_counter()
        scores, answers = run(grpc_reader(args.server), test.images, test.labels, args.per_kind, args.seed)
        report.update(seconds=time.perf_counter() - started, scores=scores)
        draw_examples(answers, args.out / "examples.png")
        print(f"{'kind':<28} {'images':>6} {'digit acc':>9} {'string acc':>10} {'text acc':>8}")
        for kind, s in scores.items():
            accuracies = f"{s['digit_accuracy']:>9.2%} {s['string_accuracy']:>10.2%} {s['text_accuracy']:>8.2%}"
            print(f"{kind:<28} {s['images']:>6} {accuracies}")
        print(f"{len(answers)} images in {report['seconds']:.1f} s")
    if args.tables_per_kind or args.expressions:
        started = time.perf_counter()
        tables, sums, layout_answers = run_layouts(
            grpc_table_reader(args.server),
            grpc_expression_reader(args.server),
            test.images,
            test.labels,
            args.tables_per_kind,
            args.expressions,
            args.seed,
            _progress("tables and expressions"),
            grpc_raw_classifier(args.server),
        )
        report.update(
            tables_per_kind=args.tables_per_kind,
            expressions=args.expressions,
            layout_seconds=time.perf_counter() - started,
            tables=tables,
            expression_scores=sums,
        )
        draw_layout_examples(layout_answers, args.out / "layouts.png")
        # ceiling: tables none of whose digits the classifier misreads on its own, as MNIST stores them
        print(f"{'tables':<28} {'tables':>6} {'cells':>6} {'cell acc':>9} {'table acc':>9} {'ceiling':>8}")
        for kind, t in tables.items():
            line = f"{t['cell_accuracy']:>9.2%} {t['table_accuracy']:>9.2%} {t['classifier_ceiling']:>8.2%}"
            print(f"{kind:<28} {t['tables']:>6} {t['cells']:>6} {line}")
        print(f"{'expressions':<28} {'count':>6} {'ops':>6} {'text acc':>9} {'op acc':>9}")
        for kind, e in sums.items():
            line = f"{e['text_accuracy']:>9.2%} {e['operator_accuracy']:>9.2%}"
            print(f"{kind:<28} {e['expressions']:>6} {e['operators']:>6} {line}")
        print(f"{len(layout_answers)} tables and expressions in {report['layout_seconds']:.1f} s")
    (args.out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}/report.json and its pictures")
    return 0


def _progress(what: str) -> Callable[[int, int], None]:
    """A progress line on stderr, rewritten in place (tqdm when it is installed)."""
    try:
        from tqdm import tqdm
    except ImportError:
        tqdm = None
    bar = None

    def step(done: int, total: int) -> None:
        nonlocal bar
        if tqdm is not None:
            if bar is None:
                bar = tqdm(total=total, desc=what, unit="image")
            bar.update(1)
            if done == total:
                bar.close()
        elif done == total or done % 20 == 0:
            print(f"\r{what}: {done}/{total}", end="\n" if done == total else "", file=sys.stderr, flush=True)

    return step


if __name__ == "__main__":
    sys.exit(main())
