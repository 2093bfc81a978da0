"""Train the operator model of ReadExpression: is a cut-out symbol a digit, or which of + - × ÷ = is it?

    python -m training.operators --out-dir server/bundled     # about 8 minutes on 2 CPU cores

Read top to bottom: config -> data (digits from MNIST train, operators from stroke generator A) -> model -> training
-> held-out evaluation (MNIST test digits, operators of the never-trained generator B) -> ONNX export, checked
against PyTorch -> report and sample sheet. Every image is prepared as the server prepares a symbol it cut out of a
page: its own ink cropped to its box, then `server.pipeline.reading._prepared` (ink scaled by its 95th percentile,
longest side to 20 px, centred by mass in 28x28). The model sees pixel / 255, without MNIST's mean and deviation,
and its ONNX graph ends in a softmax over `proto.contract.OPERATOR_CLASSES` (the contract's names and shapes).

Why generator B is the judge: training and testing on one generator measures how well the network learned that
generator. `training/strokes.py` draws B in another way (Bezier strokes with a constant pen, affine, blur), so B's
accuracy says whether the model learned the symbols. If B's accuracy falls short, widen A's variety; never train on B.
"""

from __future__ import annotations

import argparse
import io
import json
import platform
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image, ImageFilter
from scipy import ndimage

from proto.contract import OPERATOR_CLASSES, OPERATOR_INPUT, OPERATOR_OUTPUT
from server.pipeline.reading import _binarize, _ink, _prepared
from training.data import load_split, resolve_data_dir
from training.strokes import SYMBOL_CLASS, SYMBOLS, render_symbol

try:
    from tqdm import tqdm
except ImportError:  # tqdm is in the train extra; without it the steps print plain lines
    tqdm = None

# --- config: the defaults of a run; the flags override them ------------------------------------------------------
OUT_DIR = "server/bundled"
SEED = 20240
TRAIN_DIGITS = 45_000  # MNIST train digits for the "digit" class
PER_OPERATOR = 9_000  # generator-A symbols per operator class; half of the division class is drawn as ":"
PAGED = 0.7  # share of training images written on a page (clean or photographed) and cut out as the server does
TRAIN_HEIGHTS = (22, 80)  # generator A draws for lines whose digits are this many px tall (uniform)
EVAL_PER_SYMBOL = 1_000  # generator-B symbols per symbol of SYMBOLS ("÷" and ":" each: 2,000 for division)
EVAL_HEIGHTS = (24, 90)
EPOCHS = 10
BATCH_SIZE = 128
LEARNING_RATE = 3e-3  # AdamW's peak (one cycle: warm-up, then cosine decay to zero)
WEIGHT_DECAY = 1e-4
CHANNELS = (16, 32, 48)
THREADS = 2
ONNX_OPSET = 17
ONNX_TOLERANCE = 1e-4  # max |ONNX Runtime - PyTorch| over the checked probabilities
MAX_ONNX_BYTES = 300_000
# Targets on held-out data (the report says whether they were met; the run still writes its files).
TARGET_OPERATOR_ACCURACY = 0.98  # each operator class, generator B
TARGET_DIGITS_AS_OPERATOR = 0.003  # MNIST test digits the model calls an operator

SEED_TRAIN_SYMBOLS, SEED_EVAL_SYMBOLS, SEED_AUGMENT, SEED_SAMPLES, SEED_PAGED_HELD_OUT = 1, 2, 3, 4, 5  # offsets
PAGED_HELD_OUT_DIGITS = 2_000
DIGIT = OPERATOR_CLASSES.index("digit")


@dataclass
class OperatorConfig:
    """One run's settings (the report records them)."""

    out_dir: str = OUT_DIR
    seed: int = SEED
    train_digits: int = TRAIN_DIGITS
    per_operator: int = PER_OPERATOR
    eval_per_symbol: int = EVAL_PER_SYMBOL
    epochs: int = EPOCHS
    batch_size: int = BATCH_SIZE
    learning_rate: float = LEARNING_RATE
    weight_decay: float = WEIGHT_DECAY
    threads: int = THREADS
    data_dir: str | None = None


def progress(items: Any, description: str, total: int | None = None) -> Any:
    """A tqdm bar when tqdm is installed; else the items as they are, with a line saying what runs."""
    if tqdm is not None:
        return tqdm(items, desc=description, total=total, leave=False, dynamic_ncols=True)
    print(f"{description} ...", flush=True)
    return items


# --- data ---------------------------------------------------------------------------------------------------------


def through_a_page(ink: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A symbol's ink (0..1, cropped) written on a page and cut out again as the server cuts it: the page is clean
    paper (dark ink on white, or light on dark) or a photograph (uneven light, grainy paper, blur, JPEG), and the
    crop is what `server.pipeline.reading` finds there (its background removal and hysteresis threshold), so the
    network learns the symbols as they reach it from real pages, faint ends and lost dots included. The photo here
    is this module's own simulation, not the benchmark's (loadtest/reading.py)."""
    h, w = ink.shape
    margin = max(6, int(0.4 * max(h, w)))
    page_ink = np.zeros((h + 2 * margin, w + 2 * margin), np.float32)
    page_ink[margin : margin + h, margin : margin + w] = ink
    darkness = rng.uniform(0.55, 1.0)
    if rng.random() < 0.5:  # clean paper
        page = page_ink * darkness if rng.random() < 0.2 else 1.0 - page_ink * darkness
        gray = page
    else:
        yy, xx = np.mgrid[0 : page_ink.shape[0], 0 : page_ink.shape[1]] / max(page_ink.shape)
        angle = rng.uniform(0, 2 * np.pi)
        light = rng.uniform(0.5, 0.9) + rng.uniform(0.0, 0.3) * (np.cos(angle) * xx + np.sin(angle) * yy)
        grain = ndimage.gaussian_filter(rng.normal(0, 1, page_ink.shape), rng.uniform(0.5, 2.0))
        paper = np.clip(light + rng.uniform(0.005, 0.04) * grain / max(grain.std(), 1e-6), 0, 1)
        page = paper * (1.0 - page_ink * darkness * rng.uniform(0.6, 1.0))
        picture = Image.fromarray(np.clip(page * 255, 0, 255).astype(np.uint8))
        picture = picture.filter(ImageFilter.GaussianBlur(rng.uniform(0.2, 1.3)))
        encoded = io.BytesIO()
        picture.save(encoded, "JPEG", quality=int(rng.integers(35, 92)))
        gray = np.asarray(Image.open(encoded), np.float32) / 255.0
    try:
        found = _ink(np.asarray(gray, np.float32))
        mask = _binarize(found)
    except ValueError:  # nothing stands out: the ink as written
        return ink
    labels, count = ndimage.label(mask, structure=np.ones((3, 3), bool))
    areas = np.bincount(labels.ravel(), minlength=count + 1)[1:]
    keep = np.concatenate([[False], areas >= max(4.0, 0.004 * float(areas.max()))])
    mask = keep[labels]
    ys, xs = np.nonzero(mask)
    if not len(ys):
        return ink
    cut = np.where(mask, found, 0.0)[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]
    return cut.astype(np.float32)


def at_height(ink: np.ndarray, rng: np.random.Generator, heights: tuple[int, int]) -> np.ndarray:
    """An MNIST digit's ink (about 20 px tall) at the size of a written line's digit, as the benchmark's are."""
    height = int(rng.integers(heights[0], heights[1] + 1))
    width = max(2, round(ink.shape[1] * height / ink.shape[0]))
    picture = Image.fromarray((ink * 255).astype(np.uint8)).resize((width, height), Image.Resampling.BICUBIC)
    return np.asarray(picture, np.float32) / 255.0


def lightly_augmented(ink: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A crop's ink with a different pen response: a gamma on the ink, and sometimes its faint edge cleared, as a
    page's binarization may clear it before the server cuts the symbol out."""
    ink = ink ** rng.uniform(0.7, 1.4)
    if rng.random() < 0.5:
        ink = np.where(ink >= rng.uniform(0.05, 0.3), ink, 0.0)
    return ink.astype(np.float32)


def ink_of_mnist(image: np.ndarray) -> np.ndarray:
    """An MNIST digit (28x28 uint8) as the server would cut it out of a page: its ink (0..1) cropped to its box."""
    rows, cols = np.flatnonzero(image.any(axis=1)), np.flatnonzero(image.any(axis=0))
    return image[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1].astype(np.float32) / 255.0


def prepared_digits(
    images: np.ndarray, rng: np.random.Generator | None, description: str, paged: float = 0.0
) -> np.ndarray:
    """MNIST digits re-prepared as served crops are (augmented when `rng` is given; a share `paged` of them written
    at a line's size on a page and cut out again, `through_a_page`): (N, 28, 28) uint8."""
    out = np.empty((len(images), 28, 28), np.uint8)
    for i in progress(range(len(images)), description):
        ink = ink_of_mnist(images[i])
        if rng is not None and rng.random() < paged:
            out[i] = _prepared(through_a_page(at_height(ink, rng, TRAIN_HEIGHTS), rng))
        else:
            out[i] = _prepared(lightly_augmented(ink, rng) if rng is not None else ink)
    return out


def drawn_symbols(
    symbols: list[str],
    generator: str,
    heights: tuple[int, int],
    rng: np.random.Generator,
    description: str,
    augment: np.random.Generator | None = None,
    paged: float = 0.0,
) -> np.ndarray:
    """One prepared 28x28 uint8 image per entry of `symbols`, drawn by `generator` at a random line height; a share
    `paged` of them written on a page and cut out again (`through_a_page`, with `augment`'s randomness)."""
    out = np.empty((len(symbols), 28, 28), np.uint8)
    for i in progress(range(len(symbols)), description):
        ink = render_symbol(symbols[i], generator, rng, int(rng.integers(heights[0], heights[1] + 1)))
        if augment is not None and augment.random() < paged:
            out[i] = _prepared(through_a_page(ink, augment))
        elif augment is not None:
            out[i] = _prepared(lightly_augmented(ink, augment))
        else:
            out[i] = _prepared(ink)
    return out


def operator_symbols(per_class: int, rng: np.random.Generator) -> list[str]:
    """Symbols for `per_class` images of each operator class, the division class half "÷" and half ":", shuffled."""
    symbols = []
    for name in OPERATOR_CLASSES[1:]:
        forms = [s for s in SYMBOLS if SYMBOL_CLASS[s] == name]
        symbols += [forms[i % len(forms)] for i in range(per_class)]
    return [symbols[i] for i in rng.permutation(len(symbols))]


@dataclass
class LabelledImages:
    images: np.ndarray  # (N, 28, 28) uint8, prepared
    labels: np.ndarray  # (N,) int64 indices of OPERATOR_CLASSES
    sources: np.ndarray  # (N,) str: "digit" or the symbol drawn


def build_training_set(config: OperatorConfig) -> LabelledImages:
    """MNIST train digits (a random `train_digits` of them) and generator-A operators, augmented lightly."""
    train = load_split("train", resolve_data_dir(config.data_dir))
    rng = np.random.default_rng(config.seed)
    augment = np.random.default_rng(config.seed + SEED_AUGMENT)
    picked = rng.choice(len(train.labels), size=min(config.train_digits, len(train.labels)), replace=False)
    digits = prepared_digits(train.images[picked], augment, "preparing MNIST train digits", PAGED)
    symbols = operator_symbols(config.per_operator, rng)
    generator_a = np.random.default_rng(config.seed + SEED_TRAIN_SYMBOLS)
    drawn = drawn_symbols(symbols, "A", TRAIN_HEIGHTS, generator_a, "drawing A", augment, PAGED)
    return LabelledImages(
        np.concatenate([digits, drawn]),
        np.array([DIGIT] * len(digits) + [OPERATOR_CLASSES.index(SYMBOL_CLASS[s]) for s in symbols], np.int64),
        np.array(["digit"] * len(digits) + symbols),
    )


def build_held_out_set(config: OperatorConfig) -> LabelledImages:
    """All MNIST test digits and `eval_per_symbol` generator-B drawings of each symbol; nothing augmented."""
    test = load_split("test", resolve_data_dir(config.data_dir))
    digits = prepared_digits(test.images, None, "preparing MNIST test digits")
    symbols = [s for s in SYMBOLS for _ in range(config.eval_per_symbol)]
    drawn = drawn_symbols(
        symbols, "B", EVAL_HEIGHTS, np.random.default_rng(config.seed + SEED_EVAL_SYMBOLS), "drawing B (held out)"
    )
    return LabelledImages(
        np.concatenate([digits, drawn]),
        np.array([DIGIT] * len(digits) + [OPERATOR_CLASSES.index(SYMBOL_CLASS[s]) for s in symbols], np.int64),
        np.array(["digit"] * len(digits) + symbols),
    )


def build_paged_held_out_set(config: OperatorConfig) -> LabelledImages:
    """The held-out sources again, every image written on a page (clean or photographed) and cut out as served:
    2,000 MNIST test digits and a fifth of `eval_per_symbol` generator-B drawings of each symbol, other seeds."""
    test = load_split("test", resolve_data_dir(config.data_dir))
    rng = np.random.default_rng(config.seed + SEED_PAGED_HELD_OUT)
    picked = rng.choice(len(test.labels), size=min(PAGED_HELD_OUT_DIGITS, len(test.labels)), replace=False)
    digits = prepared_digits(test.images[picked], rng, "MNIST test digits on pages", paged=1.0)
    symbols = [s for s in SYMBOLS for _ in range(max(1, config.eval_per_symbol // 5))]
    drawn = drawn_symbols(symbols, "B", EVAL_HEIGHTS, rng, "drawing B on pages (held out)", rng, paged=1.0)
    return LabelledImages(
        np.concatenate([digits, drawn]),
        np.array([DIGIT] * len(digits) + [OPERATOR_CLASSES.index(SYMBOL_CLASS[s]) for s in symbols], np.int64),
        np.array(["digit"] * len(digits) + symbols),
    )


def to_input(images: np.ndarray) -> torch.Tensor:
    """Prepared uint8 images -> the contract's input: float32 [N, 1, 28, 28], pixel / 255."""
    return torch.from_numpy(images).float().div_(255.0).unsqueeze(1)


# --- model --------------------------------------------------------------------------------------------------------


class OperatorNet(nn.Module):
    """A small CNN: three 3x3 stages (BN + ReLU, two max-pools) and a last 3x3 at 7x7, global average, linear.
    `forward` gives logits (training); `ProbabilitiesOut` adds the softmax for export."""

    def __init__(self, channels: tuple[int, int, int] = CHANNELS, classes: int = len(OPERATOR_CLASSES)) -> None:
        super().__init__()
        a, b, c = channels

        def stage(inputs: int, outputs: int) -> list[nn.Module]:
            return [nn.Conv2d(inputs, outputs, 3, padding=1, bias=False), nn.BatchNorm2d(outputs), nn.ReLU()]

        self.features = nn.Sequential(
            *stage(1, a), nn.MaxPool2d(2), *stage(a, b), nn.MaxPool2d(2), *stage(b, c), *stage(c, c)
        )
        self.head = nn.Linear(c, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean(dim=(2, 3)))


class ProbabilitiesOut(nn.Module):
    """The exported graph: the network and its softmax, so the server reads probabilities straight away."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, symbol: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.net(symbol), dim=1)


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# --- training -----------------------------------------------------------------------------------------------------


def shifted(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Each image moved by up to 1 px either way: centring by mass is not exact to the pixel in the server."""
    padded = F.pad(x, (1, 1, 1, 1))
    dy, dx = torch.randint(0, 3, (2,), generator=generator).tolist()
    return padded[:, :, dy : dy + 28, dx : dx + 28]


def train_model(model: OperatorNet, data: LabelledImages, config: OperatorConfig) -> list[dict[str, float]]:
    """AdamW (Adam, decoupled weight decay), one cycle: warm up, then cosine decay to zero. Per-epoch log.

    The loss is not class-balanced: digits are half the data and most of what the server cuts out of a page, and
    a digit taken for an operator costs a wrong reading as much as the reverse."""
    x, y = to_input(data.images), torch.from_numpy(data.labels)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)
    steps_per_epoch = (len(y) + config.batch_size - 1) // config.batch_size
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, config.learning_rate, total_steps=config.epochs * steps_per_epoch, pct_start=0.15
    )
    log = []
    for epoch in range(config.epochs):
        model.train()
        generator = torch.Generator().manual_seed(config.seed * 1000 + epoch)
        order = torch.randperm(len(y), generator=generator)
        total_loss, correct = 0.0, 0
        batches = progress(range(steps_per_epoch), f"epoch {epoch + 1}/{config.epochs}")
        for step in batches:
            index = order[step * config.batch_size : (step + 1) * config.batch_size]
            logits = model(shifted(x[index], generator))
            loss = F.cross_entropy(logits, y[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            total_loss += loss.item() * len(index)
            correct += int((logits.argmax(1) == y[index]).sum())
        entry = {"epoch": epoch + 1, "loss": total_loss / len(y), "train_accuracy": correct / len(y)}
        log.append(entry)
        print(f"epoch {epoch + 1}: loss {entry['loss']:.4f}, train accuracy {entry['train_accuracy']:.4f}", flush=True)
    return log


@torch.no_grad()
def probabilities(model: nn.Module, images: np.ndarray, batch_size: int = 1024) -> np.ndarray:
    model.eval()
    x = to_input(images)
    return torch.cat([torch.softmax(model(x[i : i + batch_size]), 1) for i in range(0, len(x), batch_size)]).numpy()


# --- evaluation ---------------------------------------------------------------------------------------------------


def evaluate(predicted: np.ndarray, data: LabelledImages) -> dict[str, Any]:
    """Per-class accuracy, digits taken for operators, and the confusion (rows: what was drawn, ":" apart)."""
    sources = ["digit", *SYMBOLS]
    confusion = {
        source: np.bincount(predicted[data.sources == source], minlength=len(OPERATOR_CLASSES)).tolist()
        for source in sources
    }
    per_class = {name: float((predicted[data.labels == k] == k).mean()) for k, name in enumerate(OPERATOR_CLASSES)}
    per_symbol = {s: float((predicted[data.sources == s] == data.labels[data.sources == s]).mean()) for s in SYMBOLS}
    digits = data.labels == DIGIT
    operators = ~digits
    return {
        "per_class_accuracy": per_class,
        "per_symbol_accuracy": per_symbol,
        "digits_taken_for_operator": float((predicted[digits] != DIGIT).mean()),
        "operators_taken_for_digit": float((predicted[operators] == DIGIT).mean()),
        "operator_accuracy": float((predicted[operators] == data.labels[operators]).mean()),
        "confusion": {"rows": sources, "columns": list(OPERATOR_CLASSES), "counts": confusion},
        "counts": {s: int((data.sources == s).sum()) for s in sources},
    }


def print_evaluation(result: dict[str, Any]) -> None:
    print("held-out accuracy per class (digits: MNIST test; operators: generator B):")
    for name, accuracy in result["per_class_accuracy"].items():
        print(f"  {name:>6}: {accuracy:.4f}")
    symbol = result["per_symbol_accuracy"]
    print(f"  ÷ as an obelus {symbol['÷']:.4f}, as a colon {symbol[':']:.4f}")
    print(f"digits taken for an operator: {result['digits_taken_for_operator']:.4%}")
    print("confusion (rows: drawn; columns: " + " ".join(OPERATOR_CLASSES) + "):")
    for source, row in result["confusion"]["counts"].items():
        print(f"  {source:>6}: " + " ".join(f"{n:6d}" for n in row))


# --- export -------------------------------------------------------------------------------------------------------


def export_onnx(
    model: nn.Module,
    path: Path,
    check_images: np.ndarray,
    names: tuple[str, str] = (OPERATOR_INPUT, OPERATOR_OUTPUT),
    max_bytes: int | None = MAX_ONNX_BYTES,
) -> float:
    """The network and its softmax as ONNX with the contract's `names` (input, output) and a dynamic batch;
    returns the largest difference from PyTorch over `check_images` (raises when over ONNX_TOLERANCE, or when the
    file is over `max_bytes`). The second opinion's training exports through it too."""
    import onnxruntime as ort

    input_name, output_name = names
    exported = ProbabilitiesOut(model).eval()
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.onnx.export(
        exported,
        (to_input(check_images[:2]),),
        str(path),
        input_names=[input_name],
        output_names=[output_name],
        dynamic_axes={input_name: {0: "batch"}, output_name: {0: "batch"}},
        opset_version=ONNX_OPSET,
        dynamo=False,
    )
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = to_input(check_images)
    from_onnx = session.run([output_name], {input_name: x.numpy()})[0]
    with torch.no_grad():
        from_torch = exported(x).numpy()
    difference = float(np.abs(from_onnx - from_torch).max())
    if difference > ONNX_TOLERANCE:
        raise RuntimeError(f"ONNX output differs from PyTorch by {difference:.2e} (limit {ONNX_TOLERANCE:.0e})")
    if max_bytes is not None and path.stat().st_size > max_bytes:
        raise RuntimeError(f"{path} is {path.stat().st_size:,} bytes, over the limit of {max_bytes:,}")
    return difference


def write_samples(path: Path, training: LabelledImages, held_out: LabelledImages, per_side: int = 8) -> None:
    """A sheet of prepared inputs: one row per class (":" apart), generator A (training) left, B (held out) right;
    the digit row shows MNIST train left and test right."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rng = np.random.default_rng(SEED_SAMPLES)
    rows = ["digit", *SYMBOLS]
    figure, axes = plt.subplots(len(rows), 2 * per_side + 1, figsize=(2 * per_side + 1, len(rows) * 1.05))
    for r, source in enumerate(rows):
        for side, data in enumerate((training, held_out)):
            pool = np.flatnonzero(data.sources == source)
            for k, index in enumerate(rng.choice(pool, size=per_side, replace=False)):
                axis = axes[r, k + side * (per_side + 1)]
                axis.imshow(data.images[index], cmap="gray", vmin=0, vmax=255)
        for axis in axes[r]:
            axis.set_xticks([])
            axis.set_yticks([])
        axes[r, per_side].axis("off")
        axes[r, 0].set_ylabel(source if source != ":" else "÷ (:)", rotation=0, labelpad=18, fontsize=14)
    axes[0, 0].set_title("training: generator A (digits: MNIST train)", loc="left", fontsize=12)
    axes[0, per_side + 1].set_title("held out: generator B (digits: MNIST test)", loc="left", fontsize=12)
    figure.subplots_adjust(left=0.06, right=0.99, top=0.93, bottom=0.01, wspace=0.05, hspace=0.08)
    figure.savefig(path, dpi=60)
    plt.close(figure)


# --- the run ------------------------------------------------------------------------------------------------------


def run(config: OperatorConfig) -> dict[str, Any]:
    started = time.perf_counter()
    torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)
    out_dir = Path(config.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    training = build_training_set(config)
    held_out = build_held_out_set(config)
    paged_held_out = build_paged_held_out_set(config)
    data_seconds = time.perf_counter() - started
    print(f"data: {len(training.labels):,} training images, {len(held_out.labels):,} held out ({data_seconds:.0f} s)")

    model = OperatorNet()
    print(f"model: {parameter_count(model):,} parameters")
    training_started = time.perf_counter()
    log = train_model(model, training, config)
    training_seconds = time.perf_counter() - training_started

    predicted = probabilities(model, held_out.images).argmax(1)
    result = evaluate(predicted, held_out)
    print_evaluation(result)
    on_pages = evaluate(probabilities(model, paged_held_out.images).argmax(1), paged_held_out)
    print("the same sources written on pages and cut out as the server does:")
    print_evaluation(on_pages)

    onnx_path = out_dir / "operators.onnx"
    check = held_out.images[np.random.default_rng(config.seed).choice(len(held_out.labels), 64, replace=False)]
    difference = export_onnx(model, onnx_path, check)
    samples_path = out_dir / "operators.samples.png"
    write_samples(samples_path, training, held_out)

    operators_met = all(
        min(result["per_class_accuracy"][name], on_pages["per_class_accuracy"][name]) >= TARGET_OPERATOR_ACCURACY
        for name in OPERATOR_CLASSES[1:]
    )
    report = {
        "model": "operators",
        "classes": list(OPERATOR_CLASSES),
        "input": {"name": OPERATOR_INPUT, "shape": ["batch", 1, 28, 28], "scale": "pixel / 255, no mean or deviation"},
        "output": {"name": OPERATOR_OUTPUT, "shape": ["batch", len(OPERATOR_CLASSES)], "kind": "softmax"},
        "config": asdict(config),
        "settings": {
            "train_heights": TRAIN_HEIGHTS,
            "eval_heights": EVAL_HEIGHTS,
            "channels": CHANNELS,
            "onnx_opset": ONNX_OPSET,
        },
        "seeds": {
            "run": config.seed,
            "training_symbols": config.seed + SEED_TRAIN_SYMBOLS,
            "held_out_symbols": config.seed + SEED_EVAL_SYMBOLS,
            "augmentation": config.seed + SEED_AUGMENT,
        },
        "sizes": {
            "training": {s: int((training.sources == s).sum()) for s in ["digit", *SYMBOLS]},
            "held_out": result.pop("counts"),
            "parameters": parameter_count(model),
            "onnx_bytes": onnx_path.stat().st_size,
        },
        "held_out": {
            "digits": "MNIST test, every image, prepared as served crops",
            "operators": "training/strokes.py generator B (never trained on)",
            **result,
        },
        "held_out_on_pages": {
            "how": "each image written on clean paper or a simulated photograph and cut out as the server does",
            **on_pages,
        },
        "targets": {
            "operator_accuracy_per_class": TARGET_OPERATOR_ACCURACY,
            "digits_taken_for_operator_at_most": TARGET_DIGITS_AS_OPERATOR,
            "operators_met": operators_met,
            "digits_met": max(result["digits_taken_for_operator"], on_pages["digits_taken_for_operator"])
            <= TARGET_DIGITS_AS_OPERATOR,
        },
        "epochs": log,
        "onnx_max_abs_difference": difference,
        "data_seconds": round(data_seconds, 1),
        "training_seconds": round(training_seconds, 1),
        "total_seconds": round(time.perf_counter() - started, 1),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "threads": config.threads,
    }
    (out_dir / "operators.report.json").write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    print(
        f"wrote {onnx_path} ({onnx_path.stat().st_size:,} bytes), {samples_path}, {out_dir / 'operators.report.json'}"
    )
    if not (operators_met and report["targets"]["digits_met"]):
        print("held-out targets NOT met: see the report's targets", file=sys.stderr)
    return report


def build_parser() -> argparse.ArgumentParser:
    defaults = OperatorConfig()
    parser = argparse.ArgumentParser(
        prog="python -m training.operators",
        description="Train the operator model (digit or + - × ÷ =) on MNIST digits and generator-A strokes, judge "
        "it on MNIST test digits and generator-B strokes, export ONNX with report and sample sheet.",
    )
    parser.add_argument(
        "--out-dir", default=defaults.out_dir, help="where operators.onnx, .report.json, .samples.png go"
    )
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--epochs", type=int, default=defaults.epochs)
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--learning-rate", type=float, default=defaults.learning_rate, help="AdamW's peak rate")
    parser.add_argument("--train-digits", type=int, default=defaults.train_digits, help="MNIST train digits used")
    parser.add_argument("--per-operator", type=int, default=defaults.per_operator, help="generator-A images per class")
    parser.add_argument(
        "--eval-per-symbol", type=int, default=defaults.eval_per_symbol, help="generator-B images per symbol"
    )
    parser.add_argument("--threads", type=int, default=defaults.threads, help="torch CPU threads")
    parser.add_argument("--data-dir", default=None, help="MNIST directory (default: the project's usual places)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    config = OperatorConfig(**{k: v for k, v in vars(args).items()})
    run(config)
    return 0


if __name__ == "__main__":
    sys.exit(main())
