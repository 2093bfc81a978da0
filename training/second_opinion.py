"""Train the second opinion: a second, different digit classifier whose probabilities the reading calls average
with the served model's.

    python -m training.second_opinion --out-dir server/bundled     # about 15 minutes on 2 CPU cores

Why (docs/reading-numbers.md, "The second opinion"): a page is read whole only when every digit on it is. Two
networks of different shapes, trained on different views of the data, make different mistakes; the average of
their probabilities is right more often than either (a plain ensemble). `Classify` never uses it.

Read top to bottom: config -> data (MNIST train digits, prepared as the server prepares a digit it cut out of a
page, a share of them written on a page and cut out again) -> model (a plain CNN, nothing like GoogLeNet's
inception blocks) -> training (AdamW, one cycle; every batch warped: rotation, zoom, shear, shift, elastic) ->
ONNX export checked against PyTorch, its weights then stored as fp16 (half the bytes; computed in fp32) and its
label smoothing undone in the graph (probabilities on the served model's scale) ->
held-out evaluation of the file as shipped (every MNIST test digit, prepared the same way, and 2,000 written on
pages), alone, the bundled classifier alone on the same images, and the two averaged -> report. Nothing of the
test set is looked at to choose anything: the settings below were fixed before the run.
"""

from __future__ import annotations

import argparse
import json
import os
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

from proto.contract import (
    IMAGE_SIDE,
    MNIST_NORMALIZATION,
    NUM_CLASSES,
    PROBABILITIES,
    SECOND_OPINION_INPUT,
    SECOND_OPINION_OUTPUT,
)
from server.config import BUNDLED_MODEL
from server.pipeline.second_opinion import SecondOpinion, averaged
from training.augment import elastic, random_affine
from training.data import load_split, resolve_data_dir, sha256_file
from training.operators import ONNX_OPSET, export_onnx, parameter_count, prepared_digits, progress, to_input

# --- config: the defaults of a run; the flags override them ------------------------------------------------------
OUT_DIR = "server/bundled"
SEED = 31337
PAGED = 0.3  # share of training digits written on a page (clean or photographed) and cut out as the server does
EPOCHS = 12
BATCH_SIZE = 128
LEARNING_RATE = 3e-3  # AdamW's peak (one cycle: warm-up, then cosine decay to zero)
WEIGHT_DECAY = 5e-4
LABEL_SMOOTHING = 0.05
CHANNELS = (24, 48, 96)
WARP = {"max_rotation_deg": 12.0, "max_scale": 0.12, "max_shift_px": 2.5, "max_shear": 0.25}
ELASTIC_SHARE = 0.5  # batches that also get the elastic wobble
THREADS = 2
FP16_STORAGE_TOLERANCE = 2e-3  # max |weights stored fp16 - fp32| over the checked probabilities
MAX_ONNX_BYTES = 400_000  # its share of the bundled models' budget (tests/test_export.py holds the total)
PAGED_HELD_OUT_DIGITS = 2_000

SEED_AUGMENT, SEED_PAGED_HELD_OUT = 1, 2  # offsets from the run's seed


@dataclass
class SecondOpinionConfig:
    """One run's settings (the report records them)."""

    out_dir: str = OUT_DIR
    seed: int = SEED
    epochs: int = EPOCHS
    batch_size: int = BATCH_SIZE
    learning_rate: float = LEARNING_RATE
    weight_decay: float = WEIGHT_DECAY
    paged: float = PAGED
    threads: int = THREADS
    classifier: str = str(BUNDLED_MODEL)
    train_limit: int = 0  # first N MNIST train digits only (0: all): a quick run to check the pipeline
    test_limit: int = 0  # first N MNIST test digits only (0: all)
    data_dir: str | None = None


# --- data ---------------------------------------------------------------------------------------------------------


@dataclass
class Digits:
    images: np.ndarray  # (N, 28, 28) uint8, prepared as the server prepares a cut-out digit
    labels: np.ndarray  # (N,) int64


def build_training_set(config: SecondOpinionConfig) -> Digits:
    """Every MNIST train digit, prepared as a served crop; a share `paged` of them through a page first."""
    train = load_split("train", resolve_data_dir(config.data_dir))
    count = config.train_limit or len(train.labels)
    augment = np.random.default_rng(config.seed + SEED_AUGMENT)
    images = prepared_digits(train.images[:count], augment, "preparing MNIST train digits", config.paged)
    return Digits(images, train.labels[:count].astype(np.int64))


def build_held_out_sets(config: SecondOpinionConfig) -> dict[str, Digits]:
    """Every MNIST test digit prepared as a crop, and 2,000 of them written on pages and cut out again."""
    test = load_split("test", resolve_data_dir(config.data_dir))
    images, labels = test.images[: config.test_limit or None], test.labels[: config.test_limit or None]
    rng = np.random.default_rng(config.seed + SEED_PAGED_HELD_OUT)
    picked = rng.choice(len(labels), size=min(PAGED_HELD_OUT_DIGITS, len(labels)), replace=False)
    return {
        "MNIST test": Digits(prepared_digits(images, None, "preparing MNIST test digits"), labels),
        "MNIST test on pages": Digits(
            prepared_digits(images[picked], rng, "MNIST test digits on pages", paged=1.0), labels[picked]
        ),
    }


# --- model --------------------------------------------------------------------------------------------------------


class SecondOpinionNet(nn.Module):
    """Three stages of two 3x3 convolutions (BN + ReLU), max-pooled between, global average, linear: a plain VGG-style
    CNN. `forward` gives logits (training); training.operators' `ProbabilitiesOut` adds the softmax for export."""

    def __init__(self, channels: tuple[int, int, int] = CHANNELS) -> None:
        super().__init__()
        a, b, c = channels

        def convolution(inputs: int, outputs: int) -> list[nn.Module]:
            return [nn.Conv2d(inputs, outputs, 3, padding=1, bias=False), nn.BatchNorm2d(outputs), nn.ReLU()]

        self.features = nn.Sequential(
            *convolution(1, a), *convolution(a, a), nn.MaxPool2d(2),
            *convolution(a, b), *convolution(b, b), nn.MaxPool2d(2),
            *convolution(b, c), *convolution(c, c),
        )  # fmt: skip
        self.head = nn.Linear(c, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean(dim=(2, 3)))


# --- training -----------------------------------------------------------------------------------------------------


def warped(x: torch.Tensor, generator: torch.Generator, with_elastic: bool) -> torch.Tensor:
    """Each digit of the batch rotated, zoomed, sheared and moved by its own amount; wobbled too when asked."""
    x = random_affine(x, generator, **WARP)
    return elastic(x, generator) if with_elastic else x


def train_model(model: SecondOpinionNet, data: Digits, config: SecondOpinionConfig) -> list[dict[str, float]]:
    """AdamW, one cycle (warm up, then cosine decay to zero), label smoothing; channels-last (faster on the CPU)."""
    x, y = to_input(data.images), torch.from_numpy(data.labels)
    model.to(memory_format=torch.channels_last)
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
        total_loss, correct, started = 0.0, 0, time.perf_counter()
        for step in progress(range(steps_per_epoch), f"epoch {epoch + 1}/{config.epochs}"):
            index = order[step * config.batch_size : (step + 1) * config.batch_size]
            batch = warped(x[index], generator, with_elastic=float(torch.rand(1, generator=generator)) < ELASTIC_SHARE)
            logits = model(batch.contiguous(memory_format=torch.channels_last))
            loss = F.cross_entropy(logits, y[index], label_smoothing=LABEL_SMOOTHING)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            total_loss += loss.item() * len(index)
            correct += int((logits.argmax(1) == y[index]).sum())
        entry = {
            "epoch": epoch + 1,
            "loss": total_loss / len(y),
            "train_accuracy": correct / len(y),
            "seconds": round(time.perf_counter() - started, 1),
        }
        log.append(entry)
        print(
            f"epoch {epoch + 1}: loss {entry['loss']:.4f}, train accuracy (warped) {entry['train_accuracy']:.4f}, "
            f"{entry['seconds']:.0f} s",
            flush=True,
        )
    return log


def classifier_probabilities(path: str, images: np.ndarray, batch_size: int = 1000) -> np.ndarray:
    """The served classifier's probabilities for the same prepared images, normalized as the server feeds it."""
    import onnxruntime as ort

    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    parts = []
    for i in range(0, len(images), batch_size):
        inputs = MNIST_NORMALIZATION.apply(images[i : i + batch_size, None])
        parts.append(session.run([PROBABILITIES], {name: inputs})[0])
    return np.concatenate(parts).astype(np.float64)


# --- evaluation ---------------------------------------------------------------------------------------------------


def judged(own: np.ndarray, classifier: np.ndarray, labels: np.ndarray) -> dict[str, Any]:
    """Accuracy of each alone and of the average, and who was right where the two disagree."""
    mine, theirs, both = own.argmax(1), classifier.argmax(1), averaged(classifier, own).argmax(1)
    disagree = mine != theirs
    return {
        "digits": len(labels),
        "second_opinion": float((mine == labels).mean()),
        "classifier": float((theirs == labels).mean()),
        "averaged": float((both == labels).mean()),
        "errors": {
            "second_opinion": int((mine != labels).sum()),
            "classifier": int((theirs != labels).sum()),
            "averaged": int((both != labels).sum()),
        },
        "where_they_disagree": {
            "digits": int(disagree.sum()),
            "second_opinion_right": int((disagree & (mine == labels)).sum()),
            "classifier_right": int((disagree & (theirs == labels)).sum()),
            "averaged_right": int((disagree & (both == labels)).sum()),
        },
    }


# --- export -------------------------------------------------------------------------------------------------------


def undo_label_smoothing(path: Path, smoothing: float = LABEL_SMOOTHING) -> None:
    """Rewrite the file so its output undoes the label smoothing it was trained towards. A network trained on
    targets (1 - s) one-hot + s / 10 learns to answer about 0.955 for a digit it is sure of (s = 0.05); the served
    model was trained without smoothing, and averaged with it those answers would pull every reading's confidence
    down (a table's, a product over 40 digits, most of all). Inverting the targets' mixing, p = (q - s / 10) /
    (1 - s), clipped at 0 and renormalized, gives back probabilities on the served model's scale, fitted on
    nothing; the answers (argmax) stay the same."""
    import onnx
    from onnx import TensorProto, helper

    model = onnx.load(str(path))
    (last,) = [node for node in model.graph.node if SECOND_OPINION_OUTPUT in node.output]
    last.output[list(last.output).index(SECOND_OPINION_OUTPUT)] = "smoothed_probabilities"
    model.graph.initializer.extend(
        [
            helper.make_tensor("smoothing_floor", TensorProto.FLOAT, [], [smoothing / NUM_CLASSES]),
            helper.make_tensor("smoothing_share", TensorProto.FLOAT, [], [1.0 - smoothing]),
            helper.make_tensor("class_axis", TensorProto.INT64, [1], [1]),
        ]
    )
    model.graph.node.extend(
        [
            helper.make_node("Sub", ["smoothed_probabilities", "smoothing_floor"], ["lifted"]),
            helper.make_node("Div", ["lifted", "smoothing_share"], ["unsmoothed"]),
            helper.make_node("Relu", ["unsmoothed"], ["clipped"]),
            helper.make_node("ReduceSum", ["clipped", "class_axis"], ["total"], keepdims=1),
            helper.make_node("Div", ["clipped", "total"], [SECOND_OPINION_OUTPUT]),
        ]
    )
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def store_weights_as_fp16(path: Path, check_images: np.ndarray) -> tuple[float, int]:
    """Rewrite the file with every float32 weight stored as fp16 and cast back to float32 where it is read (ONNX
    Runtime folds the casts when the session is built, so the arithmetic stays fp32): half the bytes. Returns the
    largest change in probability over `check_images` and how many of their answers changed (raises when the
    change is over FP16_STORAGE_TOLERANCE or the file still over MAX_ONNX_BYTES)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    before = SecondOpinion(path).probabilities(check_images)
    model = onnx.load(str(path))
    casts, kept = [], []
    for weight in model.graph.initializer:
        values = numpy_helper.to_array(weight)
        if weight.data_type != TensorProto.FLOAT or values.size < 64:  # shapes and small vectors stay as they are
            kept.append(weight)
            continue
        kept.append(numpy_helper.from_array(values.astype(np.float16), weight.name + "_fp16"))
        casts.append(helper.make_node("Cast", [weight.name + "_fp16"], [weight.name], to=TensorProto.FLOAT))
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)
    nodes = casts + list(model.graph.node)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    after = SecondOpinion(path).probabilities(check_images)
    change = float(np.abs(after - before).max())
    if change > FP16_STORAGE_TOLERANCE:
        raise RuntimeError(f"fp16 storage moved a probability by {change:.2e} (limit {FP16_STORAGE_TOLERANCE:.0e})")
    if path.stat().st_size > MAX_ONNX_BYTES:
        raise RuntimeError(f"{path} is {path.stat().st_size:,} bytes, over the limit of {MAX_ONNX_BYTES:,}")
    return change, int((after.argmax(1) != before.argmax(1)).sum())


def judge_file(path: Path, classifier: str, held_out: dict[str, Digits]) -> dict[str, dict[str, Any]]:
    """The shipped file judged as the server runs it (`SecondOpinion`), beside the served classifier."""
    second_opinion = SecondOpinion(path)
    results = {}
    for name, digits in held_out.items():
        r = results[name] = judged(
            second_opinion.probabilities(digits.images),
            classifier_probabilities(classifier, digits.images),
            digits.labels,
        )
        print(
            f"{name} ({r['digits']:,} digits): second opinion {r['second_opinion']:.4f}, classifier "
            f"{r['classifier']:.4f}, averaged {r['averaged']:.4f} (errors {r['errors']})"
        )
    return results


def refuse_to_replace_the_bundled_file_with_a_worse_one(out_dir: Path, mnist_test: dict[str, Any]) -> None:
    """A run into server/bundled replaces what every server reads with: there, the average must read MNIST test at
    least as well as the classifier alone (a quick run with --train-limit or --epochs 1 belongs elsewhere)."""
    if out_dir.resolve() == BUNDLED_MODEL.parent.resolve() and mnist_test["averaged"] < mnist_test["classifier"]:
        raise RuntimeError(
            f"averaged with the classifier this run reads {mnist_test['averaged']:.4f} of MNIST test against "
            f"{mnist_test['classifier']:.4f} for the classifier alone: {BUNDLED_MODEL.parent} keeps its file "
            "(write a trial run elsewhere with --out-dir)"
        )


# --- the run ------------------------------------------------------------------------------------------------------


def run(config: SecondOpinionConfig) -> dict[str, Any]:
    started = time.perf_counter()
    torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)
    out_dir = Path(config.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    training = build_training_set(config)
    held_out = build_held_out_sets(config)
    data_seconds = time.perf_counter() - started
    print(f"data: {len(training.labels):,} training digits ({data_seconds:.0f} s)")

    model = SecondOpinionNet()
    print(f"model: {parameter_count(model):,} parameters")
    training_started = time.perf_counter()
    log = train_model(model, training, config)
    training_seconds = time.perf_counter() - training_started

    onnx_path = out_dir / "second-opinion.onnx"
    new_path = out_dir / "second-opinion.new.onnx"  # the shipped name only once every check has passed
    test_images = held_out["MNIST test"].images
    model = model.to(memory_format=torch.contiguous_format)
    names = (SECOND_OPINION_INPUT, SECOND_OPINION_OUTPUT)
    try:
        difference = export_onnx(model, new_path, test_images[:64], names, max_bytes=None)  # checked once fp16
        fp16_change, fp16_answers_changed = store_weights_as_fp16(new_path, test_images)
        print(
            f"weights stored as fp16: probabilities moved by {fp16_change:.1e} at most, {fp16_answers_changed} answers"
        )
        undo_label_smoothing(new_path)
        results = judge_file(new_path, config.classifier, held_out)
        refuse_to_replace_the_bundled_file_with_a_worse_one(out_dir, results["MNIST test"])
    except BaseException:
        new_path.unlink(missing_ok=True)
        raise
    os.replace(new_path, onnx_path)
    report = {
        "model": "second-opinion",
        "classes": list(range(NUM_CLASSES)),
        "input": {
            "name": SECOND_OPINION_INPUT,
            "shape": ["batch", 1, IMAGE_SIDE, IMAGE_SIDE],
            "scale": "pixel / 255, no mean or deviation",
        },
        "output": {
            "name": SECOND_OPINION_OUTPUT,
            "shape": ["batch", NUM_CLASSES],
            "kind": "softmax, its label smoothing undone in the graph",
        },
        "config": asdict(config),
        "settings": {
            "channels": CHANNELS,
            "warp": WARP,
            "elastic_share": ELASTIC_SHARE,
            "label_smoothing": LABEL_SMOOTHING,
            "onnx_opset": ONNX_OPSET,
        },
        "classifier": Path(config.classifier).name,
        "held_out": results,
        "sizes": {
            "training": len(training.labels),
            "parameters": parameter_count(model),
            "onnx_bytes": onnx_path.stat().st_size,
        },
        "epochs": log,
        "onnx_max_abs_difference": difference,
        "weights": "stored as fp16, computed in fp32",
        "fp16_storage_max_abs_change": fp16_change,
        "fp16_storage_answers_changed": {"of": len(test_images), "changed": fp16_answers_changed},
        "sha256": {"shipped": sha256_file(onnx_path), "classifier": sha256_file(Path(config.classifier))},
        "data_seconds": round(data_seconds, 1),
        "training_seconds": round(training_seconds, 1),
        "total_seconds": round(time.perf_counter() - started, 1),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "threads": config.threads,
    }
    report_path = out_dir / "second-opinion.report.json"
    new_report = out_dir / "second-opinion.report.new.json"
    new_report.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    os.replace(new_report, report_path)
    print(f"wrote {onnx_path} ({onnx_path.stat().st_size:,} bytes), {report_path}")
    return report


def build_parser() -> argparse.ArgumentParser:
    defaults = SecondOpinionConfig()
    parser = argparse.ArgumentParser(
        prog="python -m training.second_opinion",
        description="Train the second opinion (a second digit classifier the reading calls average with the served "
        "model), judge it on MNIST test digits alone and averaged with the bundled classifier, export ONNX and report.",
    )
    parser.add_argument("--out-dir", default=defaults.out_dir, help="where second-opinion.onnx and .report.json go")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--epochs", type=int, default=defaults.epochs)
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--learning-rate", type=float, default=defaults.learning_rate, help="AdamW's peak rate")
    parser.add_argument(
        "--paged", type=float, default=defaults.paged, help="share of training digits written on a page first"
    )
    parser.add_argument("--threads", type=int, default=defaults.threads, help="torch CPU threads")
    parser.add_argument(
        "--classifier", default=defaults.classifier, help="the served classifier (.onnx) it is averaged with"
    )
    parser.add_argument(
        "--train-limit", type=int, default=0, help="first N train digits only (0: all), for a quick run"
    )
    parser.add_argument("--test-limit", type=int, default=0, help="first N test digits only (0: all)")
    parser.add_argument("--data-dir", default=None, help="MNIST directory (default: the project's usual places)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    run(SecondOpinionConfig(**vars(args)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
