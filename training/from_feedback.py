"""mnist-train --from-feedback DB: the next version, fine-tuned on the digits the service was told the truth about.

Read top to bottom: config -> labelled feedback -> the served model as a trainable network -> fine-tune -> keep
what it knew -> judged before and after -> model.pt for mnist-export.

- The served model is an ONNX file whose batch norms were folded into its convolutions at export;
  `network_from_onnx` unfolds them (a batch norm of mean 0 and variance 1 carrying the folded bias), exactly: the
  network answers as the file does. Batch-norm statistics stay frozen: a few thousand images must not move them.
- Every step is part feedback, part MNIST training digits replayed; on the replayed digits the network is also
  held to the served model's own answers (distillation, as in "Learning without Forgetting").
- Then the fine-tuned weights are kept only as far as MNIST's validation split (which neither model trained on)
  allows: if it lost more than `max_mnist_loss`, the weights are mixed back toward the served ones (as WiSE-FT).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from proto.contract import MNIST_NORMALIZATION, ModelMetadata
from training.augment import AUGMENTATIONS, augment
from training.data import load_split, train_validation_split
from training.model import PRESETS, build_model
from training.train import CHECKPOINT_FORMAT, TrainConfig

BUNDLED_MODEL = Path(__file__).resolve().parents[1] / "server" / "bundled" / "googlenet-fast.onnx"
DISTILL_TEMPERATURE = 2.0
# Channels last: on the CPU this network's convolutions and max pools evaluate 1.9x faster than in the default layout
# (a training step 1.5x; measured here, 2026-12-07). Evaluation only: training keeps the layout, and so its numbers.
EVALUATION_LAYOUT = torch.channels_last
MIX_SHARES = (1.0, 0.8, 0.6, 0.4, 0.2)  # of the fine-tuned weights, tried in turn until MNIST is kept


@dataclass
class FeedbackTuneConfig:
    """Every knob of a fine-tune; the flags map one to one onto these fields."""

    feedback_db: str = ""
    init: str = str(BUNDLED_MODEL)  # the model being served: its ONNX file, or an mnist-train model.pt
    model: str = ""  # whose feedback to learn from (a model name in the database; "" = the init model's name)
    since: float = 0.0  # only feedback received at or after this unix time (0 = all)
    steps: int = 300
    batch_size: int = 64
    replay: float = 0.5  # share of each batch that is MNIST training digits, replayed so that it does not forget
    lr: float = 0.01  # SGD with momentum, cosine to zero
    momentum: float = 0.9
    weight_decay: float = 5e-4
    augment: str = "basic"  # a recipe of training/augment.py, on both halves
    held_out: float = 0.2  # share of the feedback kept aside to judge the fine-tune on
    distill: float = 1.0  # weight of matching the served model's answers on the replayed digits (0 = labels only)
    max_mnist_loss: float = 0.001  # accuracy on MNIST's validation split the result may lose (weights interpolated)
    test_limit: int = 0  # judge on the first N MNIST test digits only (0 = all 10,000); for smoke runs
    seed: int = 0
    data_dir: str | None = None
    out_dir: str = "runs/from-feedback"
    device: str = "auto"


# --- labelled feedback ---------------------------------------------------------------------------------------------


def feedback_digits(url: str, model: str, since: float = 0.0) -> tuple[np.ndarray, np.ndarray, dict[str, int]]:
    """Every labelled digit of `model` in the feedback database: (N, 28, 28) uint8 images, labels, and counts.
    A ReadDigits record gives one digit per image it kept, when its true text has as many digits."""
    from server.feedback.store import open_store

    store = open_store(url)
    try:
        records = store.records(model=model or None, with_images=True, since=since or None)
    finally:
        store.close()
    images, labels = [], []
    counts = {"records": len(records), "without_image": 0, "unmatched_reading": 0}
    for record in records:
        if record.image is None:
            counts["without_image"] += 1
            continue
        pixels = np.frombuffer(record.image, np.uint8).reshape(-1, 28, 28)
        truth = "".join(record.label.split())
        if len(pixels) != len(truth) or not truth.isdigit():
            counts["unmatched_reading"] += 1
            continue
        images.extend(pixels)
        labels.extend(int(c) for c in truth)
    counts["digits"] = len(labels)
    return np.asarray(images, np.uint8).reshape(-1, 28, 28), np.asarray(labels, np.int64), counts


# --- the served model as a trainable network -----------------------------------------------------------------------


def network_from_onnx(path: Path) -> tuple[torch.nn.Module, str, ModelMetadata]:
    """The network an exported model file holds, trainable again: each folded convolution's bias moves into a batch
    norm of mean 0 and variance 1 - eps (so the norm is the identity plus that bias)."""
    import onnx
    from onnx import numpy_helper

    proto = onnx.load(str(path))
    metadata = ModelMetadata.from_props({p.key: p.value for p in proto.metadata_props})
    preset = metadata.model_name if metadata.model_name in PRESETS else "googlenet-fast"
    weights = {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}
    network = build_model(preset)
    norms = {name: m for name, m in network.named_modules() if isinstance(m, torch.nn.BatchNorm2d)}
    state = {}
    for key, value in network.state_dict().items():
        owner, _, leaf = key.rpartition(".")
        if f"model.{key}" in weights:
            state[key] = torch.from_numpy(weights[f"model.{key}"].copy())
        elif owner in norms:
            convolution = owner.rpartition(".")[0] + ".0.weight_bias"  # X.1 is X.0's norm
            folded = {
                "weight": torch.ones_like(value),
                "bias": torch.from_numpy(weights[f"model.{convolution}"].copy()),
                "running_mean": torch.zeros_like(value),
                "running_var": torch.full_like(value, 1.0 - norms[owner].eps),
                "num_batches_tracked": torch.zeros_like(value),
            }
            state[key] = folded[leaf]
        else:
            raise ValueError(f"{path}: no weights for {key}: not a model mnist-export wrote for preset {preset}")
    network.load_state_dict(state)
    return network.eval(), preset, metadata


def load_network(path: Path) -> tuple[torch.nn.Module, str]:
    """An ONNX model file (what is served) or an mnist-train model.pt."""
    if path.suffix == ".onnx":
        network, preset, _ = network_from_onnx(path)
        return network, preset
    state = torch.load(path, map_location="cpu", weights_only=True)
    preset = state.get("preset") or state.get("config", {}).get("preset")
    network = build_model(preset)
    network.load_state_dict(state["model"])
    return network.eval(), preset


# --- judging -----------------------------------------------------------------------------------------------------


def accuracy(network: torch.nn.Module, images: np.ndarray, labels: np.ndarray, device: torch.device) -> float:
    if not len(images):
        return float("nan")
    network.eval()
    right = 0
    network.to(memory_format=EVALUATION_LAYOUT)  # the same weights, laid out for speed; as they were after
    try:
        with torch.no_grad():
            for start in range(0, len(images), 500):
                x = torch.from_numpy(MNIST_NORMALIZATION.apply(images[start : start + 500])[:, None]).to(device)
                x = x.contiguous(memory_format=EVALUATION_LAYOUT)
                right += int((network(x).argmax(1).cpu().numpy() == labels[start : start + 500]).sum())
    finally:
        network.to(memory_format=torch.contiguous_format)
    return right / len(images)


# --- the fine-tune -----------------------------------------------------------------------------------------------


def fine_tune(config: FeedbackTuneConfig) -> dict[str, Any]:
    started = time.time()
    device = torch.device("cuda" if config.device == "auto" and torch.cuda.is_available() else "cpu")
    if config.device not in ("auto", "cpu"):
        device = torch.device(config.device)
    out_dir = Path(config.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)

    # --- data: the feedback (some of it held out to judge on), MNIST's training split to replay, its test set ---
    network, preset = load_network(Path(config.init))
    model_name = config.model
    if not model_name and Path(config.init).suffix == ".onnx":
        model_name = network_from_onnx(Path(config.init))[2].model_name
    images, labels, counts = feedback_digits(config.feedback_db, model_name, config.since)
    if len(images) < 10:
        raise SystemExit(
            f"mnist-train --from-feedback: {counts['digits']} labelled digits of model {model_name!r} with images in "
            f"{config.feedback_db} ({counts['records']} records): too few to learn from (servers keep images unless "
            "--feedback-images off)"
        )
    order = rng.permutation(len(images))
    held = order[: int(len(images) * config.held_out)]
    learn = order[int(len(images) * config.held_out) :]
    train_config = TrainConfig(preset=preset)  # the split the served model was selected on stays out of the replay
    train = load_split("train", config.data_dir)
    replay_rows, validation_rows = train_validation_split(
        len(train.images), train_config.validation_size, train_config.seed
    )
    test = load_split("test", config.data_dir)
    if config.test_limit:
        test = type(test)(test.name, test.images[: config.test_limit], test.labels[: config.test_limit])

    network = network.to(device)

    def judged() -> dict[str, float]:
        return {
            "mnist_test": accuracy(network, test.images, test.labels, device),
            "feedback_held_out": accuracy(network, images[held], labels[held], device),
        }

    before = judged()
    print(
        f"{len(images)} labelled digits of {model_name} ({len(learn)} to learn from, {len(held)} held out); before: "
        f"MNIST test {before['mnist_test']:.2%}, held-out feedback {before['feedback_held_out']:.2%}"
    )

    # --- fine-tune: batch norms frozen (eval), dropout on; feedback and replay in every step; on the replayed digits
    # the network also learns to answer as the served model did (distillation, as in "Learning without Forgetting")
    served = copy.deepcopy(network).eval()
    for parameter in served.parameters():
        parameter.requires_grad_(False)
    optimizer = torch.optim.SGD(
        network.parameters(), lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay
    )
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, config.steps)
    recipe = AUGMENTATIONS[config.augment]
    generator = torch.Generator().manual_seed(config.seed)
    half = config.batch_size - round(config.batch_size * config.replay)  # the feedback's part of a batch
    losses = []
    for _ in tqdm(range(config.steps), desc="fine-tune", unit="step"):
        network.train()
        for module in network.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.eval()
        rows = rng.choice(learn, half)
        replay = rng.choice(replay_rows, config.batch_size - half)
        batch = np.concatenate([images[rows], train.images[replay]])
        target = torch.from_numpy(np.concatenate([labels[rows], train.labels[replay]]).astype(np.int64))
        x = augment(torch.from_numpy(batch).float().div_(255).unsqueeze(1), generator, recipe)
        x = ((x - MNIST_NORMALIZATION.mean) / MNIST_NORMALIZATION.std).to(device)
        logits = network(x)
        loss = F.cross_entropy(logits, target.to(device))
        if config.distill:
            with torch.no_grad():
                teacher = F.softmax(served(x[half:]) / DISTILL_TEMPERATURE, 1)
            student = F.log_softmax(logits[half:] / DISTILL_TEMPERATURE, 1)
            kept = F.kl_div(student, teacher, reduction="batchmean") * DISTILL_TEMPERATURE**2
            loss = loss + config.distill * kept
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(loss.item())

    # --- no forgetting: the fine-tuned weights, or a mix with the served ones (as WiSE-FT), the most fine-tuned mix
    # that keeps MNIST's validation accuracy (the split neither trained on) within max_mnist_loss of the served ---
    validation = train.images[validation_rows], train.labels[validation_rows]
    served_validation = accuracy(served, *validation, device)
    tuned = {k: v.detach().clone() for k, v in network.state_dict().items()}
    original = served.state_dict()
    mixes = []
    for share in MIX_SHARES:
        network.load_state_dict(_mixed(original, tuned, share))
        mixes.append({"fine_tuned_share": share, "mnist_validation": accuracy(network, *validation, device)})
        if mixes[-1]["mnist_validation"] >= served_validation - config.max_mnist_loss:
            break
    else:
        network.load_state_dict(original)  # every mix forgot too much: the served weights stand
        mixes.append({"fine_tuned_share": 0.0, "mnist_validation": served_validation})
    chosen = mixes[-1]["fine_tuned_share"]
    print(
        f"fine-tuned share kept {chosen:.0%}: MNIST validation {mixes[-1]['mnist_validation']:.2%} against the "
        f"served model's {served_validation:.2%}"
    )

    after = judged()
    print(
        f"after {config.steps} steps: MNIST test {after['mnist_test']:.2%} "
        f"({100 * (after['mnist_test'] - before['mnist_test']):+.2f} points), held-out feedback "
        f"{after['feedback_held_out']:.2%} ({100 * (after['feedback_held_out'] - before['feedback_held_out']):+.2f})"
    )

    # --- outputs: model.pt as mnist-train writes it (mnist-export reads it), and a report ---
    state = {k: v.cpu() for k, v in network.state_dict().items()}
    torch.save(
        {
            "format": CHECKPOINT_FORMAT,
            "preset": preset,
            "not_a_digit_class": False,
            "config": asdict(train_config),
            "model": state,
            "epoch": 0,
            "val_accuracy": float("nan"),
            "test_accuracy": after["mnist_test"],
            "from_feedback": {"feedback_db_records": counts["records"], "init": str(config.init)},
        },
        out_dir / "model.pt",
    )
    report = {
        "config": asdict(config) | {"feedback_db": _redacted(config.feedback_db)},
        "model": model_name,
        "feedback": counts | {"learned_from": len(learn), "held_out": len(held)},
        "before": before,
        "after": after,
        "mnist_test_change_points": 100 * (after["mnist_test"] - before["mnist_test"]),
        "mnist_validation_served": served_validation,
        "mixes": mixes,
        "fine_tuned_share": chosen,
        "loss_first_last": [float(np.mean(losses[:20])), float(np.mean(losses[-20:]))],
        "seconds": time.time() - started,
        "device": str(device),
    }
    (out_dir / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    seconds = report["seconds"]
    print(f"wrote {out_dir}/model.pt and report.json in {seconds:.0f} s; next: mnist-export {out_dir}/model.pt")
    return report


def _mixed(original: dict, tuned: dict, share: float) -> dict:
    """Weights `share` of the way from the served model's to the fine-tuned ones (integer buffers: the served)."""
    return {
        k: original[k] * (1 - share) + tuned[k] * share if original[k].is_floating_point() else original[k]
        for k in original
    }


def _redacted(url: str) -> str:
    from server.security import redact_url

    return redact_url(url)


HELP = {
    "feedback_db": "the feedback database the servers write (--feedback-db of mnist-serve): a SQLite file, "
    "sqlite:///PATH or postgresql://USER@HOST/DB",
    "init": "the model to start from: the ONNX file being served (default: the bundled model), or an mnist-train "
    "model.pt",
    "model": "learn from this model's feedback (default: the --init model's name)",
    "since": "only feedback received at or after this unix time (0 = all)",
    "steps": "optimizer steps",
    "batch_size": "images per step",
    "replay": "share of each step's images that are MNIST training digits, replayed beside the feedback",
    "lr": "peak learning rate (SGD with momentum, cosine to zero)",
    "augment": f"augmentation recipe on both halves ({', '.join(AUGMENTATIONS)})",
    "held_out": "share of the feedback kept aside to judge the fine-tune on",
    "distill": "weight of matching the served model's answers on the replayed MNIST digits, so that what it knew "
    "stays (0: their labels only)",
    "max_mnist_loss": "MNIST validation accuracy the result may lose against the served model: the fine-tuned "
    "weights are mixed back toward the served ones (1.0, 0.8, ... of the way) until it holds",
    "test_limit": "judge on the first N MNIST test digits only (0 = all 10,000); for smoke runs",
    "out_dir": "where model.pt (the input to mnist-export) and report.json go",
}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="mnist-train --from-feedback",
        description="Fine-tune the served model on the labelled digits its servers stored (mnist-serve "
        "--feedback-db), with MNIST replayed beside them so it does not forget; writes model.pt for mnist-export "
        "(then mnist-export --publish REPO puts it in a model repository).",
    )
    defaults = FeedbackTuneConfig()
    for name, value in asdict(defaults).items():
        flag = "--" + name.replace("_", "-")
        kind = type(value) if value is not None else str
        parser.add_argument(flag, type=kind, default=value, help=HELP.get(name, name.replace("_", " ")))
    args = parser.parse_args(argv)
    if not args.feedback_db:
        parser.error("--from-feedback needs the feedback database: mnist-train --from-feedback DB")
    if args.augment not in AUGMENTATIONS:
        parser.error(f"--augment must be one of {', '.join(AUGMENTATIONS)}")
    fine_tune(FeedbackTuneConfig(**{k: v for k, v in vars(args).items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
