"""Non-digits for the classifier's eleventh class, "not a digit", and digits in other hands: `mnist-train --non-digits`.

    python -m training.non_digits --out runs/non-digits.npz        # about 100 s on 2 cores

The images are the fitted kinds of the digit detector (`training/fit_digit_detector.py`: noise, blank paper with
specks, lines, thin strips, scribbles, polygons, letters no digit resembles in the fitted print fonts, letters and
textures of the fit-role handwriting sources) and the digits of the fit-role handwriting fonts, drawn with another
seed than the detector's own samples. Nothing of a held-out source (`training/digit_sources.py`) or of the
detector's held-out kinds is generated here, so `mnist-eval --digit-sources` still judges on what was never seen.
Each image is stored as the model's input before normalization (28x28 uint8, as MNIST), so the training
augmentation treats it as it treats a digit.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from proto.contract import MNIST_NORMALIZATION, NUM_CLASSES

NOT_A_DIGIT = NUM_CLASSES  # the label of the eleventh class: after the ten digits
SEED_OFFSET = 1  # the detector fits on samples of seed SEED; these are other samples of the same kinds
PER_KIND = 1000  # non-digits per fitted kind (letters: LETTER_SHARE times as many)


@dataclass(frozen=True)
class NonDigitSet:
    """Extra training images: non-digits labelled NOT_A_DIGIT and digits in other hands labelled 0-9."""

    images: np.ndarray  # (N, 28, 28) uint8, white ink on black, as MNIST
    labels: np.ndarray  # (N,) uint8
    kinds: np.ndarray  # (N,) str: where each image comes from

    def summary(self) -> str:
        counts = Counter(self.kinds.tolist())
        non_digits = int((self.labels == NOT_A_DIGIT).sum())
        parts = ", ".join(f"{kind} {n:,}" for kind, n in sorted(counts.items()))
        return f"extra training images: {non_digits:,} not a digit, {len(self.labels) - non_digits:,} digits ({parts})"


THRESHOLD_FALSE_ALARM = 0.01  # the score under which this share of the threshold digits falls is the threshold
THRESHOLD_RENDERS = 1000  # fresh renders of the fit handwriting fonts (another seed than training's)
THRESHOLD_SEED_OFFSET = 7
SEED_STRIDE = 1000  # seeds step by this; offsets below it never meet: threshold renders are never training renders


def threshold_digits(config: dict[str, Any], data_dir: str | None) -> dict[str, np.ndarray]:
    """Digits the model never trained on, as normalized model input, per set: where its threshold is set.

    The validation split of its own run (MNIST train digits held out for model selection) and fresh renders of the
    fit handwriting fonts; the same rule as the separate detector's (1% of these flagged, each set weighing alike),
    and like it nothing of a held-out source."""
    from training import fit_digit_detector as detector_fit
    from training.data import load_split, train_validation_split

    train = load_split("train", data_dir)
    n = config.get("train_limit") or len(train)
    _, validation = train_validation_split(n, min(config["validation_size"], n // 10), config["seed"])
    at = detector_fit.SEED + THRESHOLD_SEED_OFFSET + SEED_STRIDE * config["seed"]
    renders = detector_fit.fit_source(
        "handwriting-fonts-fit", "handwriting_fonts_threshold", "threshold", at, n=THRESHOLD_RENDERS
    )
    sets = {
        "mnist_validation": MNIST_NORMALIZATION.apply(train.images[validation])[:, None],
        "handwriting_fonts_threshold": renders.x,
    }
    return {name: x for name, x in sets.items() if len(x)}  # a run without a validation split has renders only


def to_pixels(x: np.ndarray) -> np.ndarray:
    """Normalized model input (N, 1, 28, 28) -> the uint8 pixels it was made from."""
    norm = MNIST_NORMALIZATION
    return np.clip(np.round((x[:, 0] * norm.std + norm.mean) / norm.scale), 0, 255).astype(np.uint8)


def build(seed: int, per_kind: int = PER_KIND) -> NonDigitSet:
    """Generate the set (minutes: letters are rendered with fonts, uploads go through the server's preprocessing)."""
    from training import fit_digit_detector as detector_fit

    at = detector_fit.SEED + SEED_OFFSET + SEED_STRIDE * seed
    negatives = detector_fit.negative_categories(at, fit=True, n=per_kind)
    negatives += detector_fit.other_hand_negatives(at, fit=True)
    hands = detector_fit.handwriting_categories(at)[0]  # the fitting renders; the threshold renders stay unseen
    images = [to_pixels(c.x) for c in negatives] + [to_pixels(hands.x)]
    labels = [np.full(len(c.x), NOT_A_DIGIT, np.uint8) for c in negatives] + [hands.labels.astype(np.uint8)]
    kinds = [np.full(len(c.x), c.name) for c in negatives] + [np.full(len(hands.x), hands.name)]
    return NonDigitSet(np.concatenate(images), np.concatenate(labels), np.concatenate(kinds))


def save(data: NonDigitSet, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".tmp.npz")
    np.savez_compressed(partial, images=data.images, labels=data.labels, kinds=data.kinds)
    partial.replace(path)


def load_non_digits(path: Path) -> NonDigitSet:
    """Read a set written by `save`; a wrong file is a ValueError naming what is wrong."""
    try:
        with np.load(path, allow_pickle=False) as f:
            data = NonDigitSet(f["images"], f["labels"], f["kinds"])
    except FileNotFoundError:
        raise ValueError(f"{path}: not found (make it with: python -m training.non_digits --out {path})") from None
    except (KeyError, OSError, ValueError, TypeError, AttributeError) as exc:  # not an .npz of the three arrays
        raise ValueError(f"{path}: not a set of training.non_digits ({exc})") from None
    n = len(data.labels)
    if data.labels.shape != (n,) or data.labels.dtype != np.uint8 or int(data.labels.max(initial=0)) > NOT_A_DIGIT:
        raise ValueError(f"{path}: labels must be one uint8 0-{NOT_A_DIGIT} per image")
    if data.images.shape != (n, 28, 28) or data.images.dtype != np.uint8 or data.kinds.shape != (n,):
        raise ValueError(f"{path}: images {data.images.shape} {data.images.dtype} do not match {n} labels")
    if not (data.labels == NOT_A_DIGIT).any():
        raise ValueError(
            f"{path}: no image labelled {NOT_A_DIGIT} ('not a digit'): the eleventh class would learn nothing"
        )
    return data


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m training.non_digits",
        description="Generate the extra training images of mnist-train --non-digits: the digit detector's fitted "
        "kinds of non-digits (label 10, 'not a digit') and digits in the fit-role handwriting fonts.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--out", type=Path, default=Path("runs/non-digits.npz"), help="the .npz to write")
    parser.add_argument("--per-kind", type=int, default=PER_KIND, help="non-digits per fitted kind")
    parser.add_argument("--seed", type=int, default=0, help="another set: the detector's seed + offset + 1000 x this")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    data = build(args.seed, args.per_kind)
    save(data, args.out)
    print(f"{data.summary()}\nwrote {args.out} in {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
