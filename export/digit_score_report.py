"""The in-graph digit score against the numpy detector it replaces: does the score still catch what it caught?

    python -m export.digit_score_report --data-dir /work/shared/data/mnist

Before: the numpy detector (server/pipeline/digit_detector.py) scoring the model's probabilities after the
model, as the server did for every answer. After: the models' own `digit_score` output
(export/digit_score_graph.py), fp32 and fp16. Measured on the same images:
  - catch rate on non-digits: the evaluation sets of `python -m training.fit_digit_detector` (fresh
    samples of the fitted kinds, kinds held out of fitting, and the ambiguous rings and strokes,
    reported apart), generated from the same seed;
  - false-alarm rate on MNIST test digits, clean and through mnist-eval's 21-kind corruption suite
    (training/corruptions.py, the same seed and images as `mnist-eval --seed S --limit N`).
The fp16 model's scores are compared with the numpy detector on the fp16 model's own probabilities
(what a GPU server would have computed before) and with the fp32 numpy figures (today's CPU server).
Writes a JSON report beside the model (NAME.digit-score.json) and prints the headline table.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from proto.contract import DIGIT_SCORE, INPUT_NAME, MNIST_NORMALIZATION, PROBABILITIES, variant_path
from server.config import BUNDLED_MODEL, DIGIT_DETECTOR
from server.pipeline.digit_detector import DigitDetector
from training.corruptions import HELD_OUT_CORRUPTIONS, corrupt
from training.data import load_split, sha256_file

TARGET_POINTS = 1.0  # the in-graph score may move a headline rate by at most this many percentage points
BATCH = 256
# The four ways of scoring an image: numpy after the model (before) and in the graph (after), per precision
SCORERS = ("numpy_fp32", "in_graph_fp32", "numpy_fp16", "in_graph_fp16")
# (after, before) pairs whose headline rates must agree within TARGET_POINTS
COMPARISONS = {
    "fp32: in-graph vs numpy": ("in_graph_fp32", "numpy_fp32"),
    "fp16: in-graph vs numpy on fp16 probabilities": ("in_graph_fp16", "numpy_fp16"),
    "fp16 in-graph vs today's fp32 numpy": ("in_graph_fp16", "numpy_fp32"),
}


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def score_all(session: Any, detector: DigitDetector, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(the model's own digit_score, the numpy detector's score on the model's own probabilities) of inputs x."""
    own, numpy_scores = [], []
    for start in range(0, len(x), BATCH):
        batch = np.ascontiguousarray(x[start : start + BATCH], np.float32)
        probabilities, scores = session.run([PROBABILITIES, DIGIT_SCORE], {INPUT_NAME: batch})
        own.append(scores)
        numpy_scores.append(detector.score(batch, probabilities))
    return np.concatenate(own), np.concatenate(numpy_scores)


def digit_sets(data_dir: str | None, limit: int, seed: int) -> dict[str, np.ndarray]:
    """MNIST test digits as model input: clean (all), then each corruption kind of the first `limit`."""
    test = load_split("test", data_dir)
    images = test.images[:limit] if limit else test.images
    sets = {"clean": MNIST_NORMALIZATION.apply(test.images)[:, None]}
    for kind in HELD_OUT_CORRUPTIONS:
        sets[kind] = MNIST_NORMALIZATION.apply(corrupt(images, kind, seed))[:, None]
    return sets


def rates(scores: dict[str, np.ndarray], threshold: float, below_is: str) -> dict[str, float]:
    """Per set, the share of scores under the threshold (caught non-digits, or false alarms on digits)."""
    return {name: round(float(np.mean(s < threshold)), 5) for name, s in scores.items()} | {"_meaning": below_is}


def summarize(
    digits: dict[str, dict[str, np.ndarray]],
    non_digits: dict[str, dict[str, np.ndarray]],
    groups: dict[str, str],
    threshold: float,
) -> dict[str, dict[str, float]]:
    """Headline rates per scorer: the means the detector's own report gives, and the pooled suite."""
    out = {}
    for scorer in SCORERS:
        caught = {name: float(np.mean(s[scorer] < threshold)) for name, s in non_digits.items()}
        alarms = {name: float(np.mean(s[scorer] < threshold)) for name, s in digits.items()}
        suite = [name for name in digits if name != "clean"]
        out[scorer] = {
            "non_digits_caught_fitted_kinds": np.mean([v for k, v in caught.items() if groups[k] == "fitted"]),
            "non_digits_caught_held_out_kinds": np.mean([v for k, v in caught.items() if groups[k] == "held-out"]),
            "non_digits_caught_ambiguous_kinds": np.mean([v for k, v in caught.items() if groups[k] == "ambiguous"]),
            "false_alarm_mnist_test_clean": alarms["clean"],
            "false_alarm_corruption_suite_mean": np.mean([alarms[k] for k in suite]),
            "false_alarm_corruption_suite_pooled": float(
                np.mean(np.concatenate([digits[k][scorer] for k in suite]) < threshold)
            ),
        }
        out[scorer] = {k: round(float(v), 5) for k, v in out[scorer].items()}
    return out


def agreement(sets: dict[str, dict[str, np.ndarray]], threshold: float) -> dict[str, dict[str, float]]:
    """In-graph against numpy on the same probabilities: the largest score difference and the changed decisions."""
    out = {}
    for precision in ("fp32", "fp16"):
        own = np.concatenate([s[f"in_graph_{precision}"] for s in sets.values()])
        ref = np.concatenate([s[f"numpy_{precision}"] for s in sets.values()])
        changed = (own >= threshold) != (ref >= threshold)
        out[precision] = {
            "images": len(own),
            "max_abs_score_diff": float(np.abs(own - ref).max()),
            "mean_abs_score_diff": float(np.abs(own - ref).mean()),
            "is_digit_decisions_changed": int(changed.sum()),
            "largest_distance_from_threshold_of_a_changed_decision": float(np.abs(ref - threshold)[changed].max())
            if changed.any()
            else None,
            "max_abs_score_diff_by_set": {
                name: float(f"{np.abs(s[f'in_graph_{precision}'] - s[f'numpy_{precision}']).max():.2e}")
                for name, s in sets.items()
            },
        }
    return out


def build_report(args: argparse.Namespace) -> dict[str, Any]:
    import onnxruntime as ort

    from training.fit_digit_detector import LETTER_SHARE, NEGATIVES_EVAL, SEED, negative_categories

    started = time.perf_counter()
    detector = DigitDetector.load(args.digit_detector)
    models = {p: variant_path(args.model, p) for p in ("fp32", "fp16")}
    sessions = {p: ort.InferenceSession(str(m), providers=["CPUExecutionProvider"]) for p, m in models.items()}
    log("generating non-digits (the evaluation sets of training.fit_digit_detector) ...")
    categories = negative_categories(SEED, fit=False, n=args.negatives or NEGATIVES_EVAL)
    groups = {c.name: c.group for c in categories}
    log(f"generating digits: clean MNIST test and {len(HELD_OUT_CORRUPTIONS)} corruption kinds ...")
    digit_inputs = digit_sets(args.data_dir, args.limit, args.seed)

    def scored(x: np.ndarray) -> dict[str, np.ndarray]:
        row: dict[str, np.ndarray] = {}
        for precision, session in sessions.items():
            row[f"in_graph_{precision}"], row[f"numpy_{precision}"] = score_all(session, detector, x)
        return row

    non_digits = {c.name: scored(c.x) for c in categories}
    log("non-digits scored")
    digits = {name: scored(x) for name, x in digit_inputs.items()}
    log("digits scored")
    threshold = detector.threshold
    headline = summarize(digits, non_digits, groups, threshold)
    deltas = {
        label: {key: round(100 * (headline[after][key] - headline[before][key]), 3) for key in headline[after]}
        for label, (after, before) in COMPARISONS.items()
    }
    worst = max(abs(v) for row in deltas.values() for v in row.values())
    return {
        "command": "python -m export.digit_score_report " + " ".join(args.argv),
        "what": "catch rate on non-digits and false-alarm rate on MNIST test digits, before (numpy detector after "
        "the model, on its probabilities) and after (the model's own digit_score output); rates in [0, 1], deltas "
        "in percentage points (after - before)",
        "threshold": threshold,
        "target": f"every headline rate within {TARGET_POINTS:g} point of the numpy detector's",
        "within_target": worst <= TARGET_POINTS,
        "largest_change_points": worst,
        "headline": headline,
        "change_points": deltas,
        "agreement_in_graph_vs_numpy_same_probabilities": agreement({**digits, **non_digits}, threshold),
        "non_digits_caught": {
            scorer: {
                name: {
                    "group": groups[name],
                    "n": len(s[scorer]),
                    "caught": round(float(np.mean(s[scorer] < threshold)), 4),
                }
                for name, s in non_digits.items()
            }
            for scorer in SCORERS
        },
        "digit_false_alarms": {
            scorer: {
                name: {"n": len(s[scorer]), "false_alarm": round(float(np.mean(s[scorer] < threshold)), 4)}
                for name, s in digits.items()
            }
            for scorer in SCORERS
        },
        "data": {
            "non_digits": f"training.fit_digit_detector.negative_categories(seed {SEED}, fresh evaluation samples, "
            f"{args.negatives or NEGATIVES_EVAL} per kind, letters {LETTER_SHARE}x that)",
            "digits": f"MNIST test: clean all 10,000; corruption suite (training/corruptions.py, seed {args.seed}) on "
            f"the first {args.limit or 10_000:,} per kind, as mnist-eval --seed {args.seed} --limit {args.limit}",
        },
        "models": {p: {"file": str(m), "sha256": sha256_file(m)} for p, m in models.items()},
        "digit_detector": {"file": str(args.digit_detector), "sha256": sha256_file(Path(args.digit_detector))},
        "provider": "CPUExecutionProvider",
        "seconds": round(time.perf_counter() - started, 1),
    }


def table(report: dict[str, Any]) -> str:
    headline = report["headline"]
    keys = list(next(iter(headline.values())))
    lines = [f"{'rate (%)':<40}" + "".join(f"{s:>15}" for s in SCORERS)]
    for key in keys:
        lines.append(f"{key:<40}" + "".join(f"{100 * headline[s][key]:>15.2f}" for s in SCORERS))
    lines.append("")
    for label, row in report["change_points"].items():
        lines.append(f"{label}: largest change {max(abs(v) for v in row.values()):.2f} points")
    for precision, row in report["agreement_in_graph_vs_numpy_same_probabilities"].items():
        lines.append(
            f"{precision} in-graph vs numpy on {row['images']:,} images: max |Δscore| {row['max_abs_score_diff']:.1e}, "
            f"{row['is_digit_decisions_changed']} is_digit decisions changed"
        )
    verdict = "within" if report["within_target"] else "NOT within"
    lines.append(f"{verdict} the target ({report['target']}); {report['seconds']} s")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m export.digit_score_report",
        description="Measure the models' in-graph digit_score against the numpy detector it replaces: catch rate on "
        "non-digits (training.fit_digit_detector's evaluation sets) and false alarms on MNIST test digits, clean and "
        "through mnist-eval's corruption suite, for the fp32 model and its fp16 variant, on the CPU provider. "
        "Deterministic for the seeds. Exit status 0, or 1 when a headline rate moves more than "
        f"{TARGET_POINTS:g} point.",
    )
    parser.add_argument("--model", type=Path, default=BUNDLED_MODEL, help="fp32 model; NAME.fp16.onnx beside it")
    parser.add_argument("--digit-detector", type=Path, default=DIGIT_DETECTOR, help="the numpy detector (.npz)")
    parser.add_argument("--data-dir", help="MNIST directory (default: $MNIST_DIR, else ../shared/data/mnist)")
    parser.add_argument("--limit", type=int, default=2000, help="test images per corruption kind (0 = all 10,000)")
    parser.add_argument("--seed", type=int, default=0, help="corruption seed, as mnist-eval --seed (default 0)")
    parser.add_argument("--negatives", type=int, default=0, help="non-digits per kind (0 = the detector report's)")
    parser.add_argument("--out", type=Path, help="JSON report (default: beside the model, NAME.digit-score.json)")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    args.argv = argv
    report = build_report(args)
    out = args.out or args.model.with_name(args.model.name.removesuffix(".onnx") + ".digit-score.json")
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(table(report))
    print(f"wrote {out}")
    return 0 if report["within_target"] else 1


if __name__ == "__main__":
    sys.exit(main())
