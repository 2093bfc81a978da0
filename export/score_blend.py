"""Blends of the not-a-digit evidence, judged as the served score is: which mix should the next detector be?

    python -m export.score_blend MODEL.onnx --blend 0.6,0.4,0 --blend 0.5,0,0.5 --blend 0,0,1

Three log-odds per image: the separate detector's fusion network and its pixel network
(server/pipeline/digit_detector.py, on MODEL's own probabilities), and MODEL's own "not a digit" class (its
`digit_score` output: a model trained with `mnist-train --non-digits`). Each blend (a weight for each of the
three) gets its threshold by the served scores' rule (1% of digits the model never trained on flagged, each set
weighing alike: `training.non_digits.threshold_digits`, rebuilt from the split the model's metadata records) and
is judged on every source of training/digit_sources.py as `export.digit_signal` judges: per source the share
flagged at that threshold, and on the held-out curve the catch at 1% and 2% of real digits flagged. The
fit-role sources' catch is printed too: a blend to ship is chosen there, not on the held-out figures.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from proto.contract import DIGIT_SCORE, INPUT_NAME, PROBABILITIES, ModelMetadata
from server.config import DIGIT_DETECTOR
from training import digit_sources

EVIDENCE = ("fusion network", "pixel network", "own class")
BATCH = 256


@dataclass(frozen=True)
class Evidence:
    """One source's three log-odds per upload (-inf rows where the server refuses the upload)."""

    name: str
    kind: str
    role: str
    log_odds: np.ndarray  # (N, 3), columns as EVIDENCE


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(p.astype(np.float64), 1e-12, 1 - 1e-12)
    return np.log(p) - np.log1p(-p)


class EvidenceReader:
    """The three log-odds of inputs, from one model file and the separate detector."""

    def __init__(self, model: Path, detector: Path = DIGIT_DETECTOR) -> None:
        import onnxruntime as ort

        from export.onnx_export import is_own_class
        from server.pipeline.digit_detector import DigitDetector

        self.session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
        self.metadata = ModelMetadata.from_props(self.session.get_modelmeta().custom_metadata_map)
        if not is_own_class(self.metadata):
            raise ValueError(f"{model}: its digit_score is not its own class (train it with mnist-train --non-digits)")
        self.detector = DigitDetector.load(detector)
        if self.detector.pixel_network is None:
            raise ValueError(f"{detector}: a detector without a pixel network (format 3 or later is needed)")

    def __call__(self, x: np.ndarray) -> np.ndarray:
        rows = []
        for start in range(0, len(x), BATCH):
            part = np.ascontiguousarray(x[start : start + BATCH], np.float32)
            probabilities, own = self.session.run([PROBABILITIES, DIGIT_SCORE], {INPUT_NAME: part})
            fusion = 2.0 * self.detector._half_logits(self.detector.raw_inputs(part, probabilities))
            pixel = self.detector.pixel_network.logits(part)
            rows.append(np.stack([fusion.astype(np.float64), pixel.astype(np.float64), _logit(own)], axis=1))
        return np.concatenate(rows) if rows else np.zeros((0, 3))


def gather(model: Path, per_source: int | None = None, data_dir: str | None = None) -> dict[str, Any]:
    """The threshold digits' and every source's evidence (the first `per_source` images of each)."""
    from training.non_digits import threshold_digits

    read = EvidenceReader(model)
    split = read.metadata.digit_detector["validation_split"]
    threshold_sets = {name: read(x) for name, x in threshold_digits(split, data_dir).items()}
    sources = []
    for name, spec in digit_sources.SOURCES.items():
        n = None if per_source is None else min(per_source, spec.size)
        source = digit_sources.build(name, n=n, mnist_dir=data_dir)
        log_odds = np.full((len(source), 3), -np.inf)
        kept = ~source.refused
        if kept.any():
            log_odds[kept] = read(source.inputs[kept])
        sources.append(Evidence(name, source.kind, source.role, log_odds))
    return {"threshold_sets": threshold_sets, "sources": sources}


def judge(evidence: dict[str, Any], weights: tuple[float, float, float]) -> dict[str, Any]:
    """One blend: its threshold by the 1% rule, the share flagged per source, the held-out curve's catch."""
    from training.fit_digit_detector import weighted_quantile
    from training.non_digits import THRESHOLD_FALSE_ALARM

    w = np.asarray(weights, np.float64)

    def blend(log_odds: np.ndarray) -> np.ndarray:
        used = log_odds[:, w != 0]  # a part weighing 0 cannot make a row unusable
        finite = np.isfinite(used).all(axis=1)
        return np.where(finite, np.nan_to_num(log_odds, nan=0.0, posinf=0.0, neginf=0.0) @ w, -np.inf)

    threshold = weighted_quantile([blend(x) for x in evidence["threshold_sets"].values()], THRESHOLD_FALSE_ALARM)
    scored = {e.name: (e.kind, e.role, blend(e.log_odds)) for e in evidence["sources"]}
    flagged = {name: float(np.mean(s < threshold)) for name, (_, _, s) in scored.items()}
    curve = digit_sources.catch_curve(
        [s for kind, role, s in scored.values() if (kind, role) == ("digit", "held-out")],
        [s for kind, role, s in scored.values() if (kind, role) == ("non-digit", "held-out")],
    )
    false_alarm, catch = np.asarray(curve["false_alarm"]), np.asarray(curve["catch"])

    def catch_at(share: float) -> float:
        return float(catch[false_alarm <= share].max()) if (false_alarm <= share).any() else 0.0

    def of(kind: str, role: str) -> list[float]:
        return [flagged[name] for name, (k, r, _) in scored.items() if (k, r) == (kind, role)]

    return {
        "weights": dict(zip(EVIDENCE, map(float, weights), strict=True)),
        "threshold_log_odds": threshold,
        "flagged": flagged,
        "held_out_digits_worst_false_alarm": max(of("digit", "held-out")),
        "held_out_non_digits_worst_catch": min(of("non-digit", "held-out")),
        "held_out_non_digits_mean_catch": float(np.mean(of("non-digit", "held-out"))),
        "fit_non_digits_mean_catch": float(np.mean(of("non-digit", "fit"))),
        "held_out_catch_at_1_percent_flagged": catch_at(0.01),
        "held_out_catch_at_2_percent_flagged": catch_at(0.02),
    }


def markdown(results: list[dict[str, Any]], sources: list[Evidence]) -> str:
    digits = [e.name for e in sources if (e.kind, e.role) == ("digit", "held-out")]
    lines = [
        "| fusion, pixel, own class | false alarms, held-out digits (" + ", ".join(digits) + ") | caught, held-out "
        "(worst, mean) | caught, fit-role | held-out curve: caught at 1% / 2% flagged |",
        "| --- | --- | --- | ---: | --- |",
    ]
    for r in results:
        weights = ", ".join(f"{v:g}" for v in r["weights"].values())
        alarms = ", ".join(f"{r['flagged'][name]:.1%}" for name in digits)
        lines.append(
            f"| {weights} | {alarms} | {r['held_out_non_digits_worst_catch']:.1%}, "
            f"{r['held_out_non_digits_mean_catch']:.1%} | {r['fit_non_digits_mean_catch']:.1%} | "
            f"{r['held_out_catch_at_1_percent_flagged']:.1%} / {r['held_out_catch_at_2_percent_flagged']:.1%} |"
        )
    return "\n".join(lines)


def parse_blend(text: str) -> tuple[float, float, float]:
    try:
        weights = tuple(float(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: three numbers separated by commas, e.g. 0.5,0,0.5") from None
    if len(weights) != 3 or not any(weights) or min(weights) < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: three weights >= 0, not all 0 (fusion, pixel, own class)")
    return weights  # type: ignore[return-value]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m export.score_blend",
        description="Judge blends of the fusion network's, the pixel network's and a model's own class's log-odds "
        "on the digit sources, each at the threshold the served rule gives it.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("model", type=Path, help="an ONNX model whose digit_score is its own class")
    parser.add_argument(
        "--blend",
        type=parse_blend,
        action="append",
        help="weights of fusion,pixel,own (repeat; default: the detector as served, the own class, and 0.5,0,0.5)",
    )
    parser.add_argument("--per-source", type=int, default=None, help="only the first N images of each source")
    parser.add_argument("--data-dir", default=None, help="MNIST directory (default: as mnist-train finds it)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args(argv)
    try:
        evidence = gather(args.model, args.per_source, args.data_dir)
    except ValueError as exc:
        print(f"score_blend: {exc}", file=sys.stderr)
        return 2
    blends = args.blend or [(0.6, 0.4, 0.0), (0.0, 0.0, 1.0), (0.5, 0.0, 0.5)]
    results = [judge(evidence, weights) for weights in blends]
    print(markdown(results, evidence["sources"]))
    if args.json is not None:
        args.json.write_text(json.dumps({"model": str(args.model), "blends": results}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
