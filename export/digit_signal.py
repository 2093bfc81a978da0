"""The not-a-digit signal as clients get it, judged on named sources (training/digit_sources.py), each apart.

    mnist-eval server/bundled/googlenet-fast.onnx --digit-sources        # the table (also with the usual report)
    python -m export.digit_signal MODEL.onnx --out DIR                    # the table, a JSON and the curve picture

Every upload goes through the server's own preprocessing; the model file's own `digit_score` output and the
threshold in its metadata decide `is_digit`, exactly as served (a model without the output is scored by the
separate detector file). A refused upload (blank, no ink) counts as flagged: a digit refused is a false alarm,
a non-digit refused is caught. Per source: the share flagged, and for digits how the detector and the classifier
agree (a flagged digit the classifier read right is the detector's mistake; an accepted one it read wrong slipped
through). Targets (issue 22): at most 1% of held-out real digits flagged, at least 95% of held-out non-digits
caught; look-alike letters (O l I S Z B g q) are reported apart and count in neither.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from proto.contract import DIGIT_SCORE, INPUT_NAME, PROBABILITIES, ModelMetadata
from training import digit_sources

FALSE_ALARM_TARGET = 0.01  # at most this share of held-out real digits flagged
CATCH_TARGET = 0.95  # at least this share of held-out non-digits caught
CONFIDENT = 0.9  # a read whose top probability is at least this is "confident"


@dataclass(frozen=True)
class Scored:
    """One source run through a model: per upload its probabilities, digit score (NaN where refused)."""

    name: str
    kind: str
    role: str
    labels: np.ndarray
    refused: np.ndarray
    probabilities: np.ndarray  # (N, 10); NaN rows where refused
    scores: np.ndarray  # (N,); NaN where refused


@dataclass(frozen=True)
class Row:
    """One source's line of the report."""

    source: str
    kind: str
    role: str
    n: int
    refused: int
    flagged: float  # share with is_digit false or refused: false alarms for digits, catches for non-digits
    accuracy: float | None = None  # digits (and look-alikes: the digit each resembles): the classifier's reads
    flagged_read_right: int | None = None  # digits flagged although the classifier read them right
    flagged_read_right_confident: int | None = None  # ... with a top probability of at least CONFIDENT
    flagged_read_wrong: int | None = None  # digits flagged that the classifier misread (the flag was useful)
    accepted_read_wrong: int | None = None  # digits let through misread


class ModelScorer:
    """The model's probabilities and digit score for inputs, as the server computes them."""

    def __init__(self, model: Path, detector: Path | None = None) -> None:
        import onnxruntime as ort

        self.session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
        outputs = [o.name for o in self.session.get_outputs()]
        metadata = ModelMetadata.from_props(self.session.get_modelmeta().custom_metadata_map)
        self.in_graph = DIGIT_SCORE in outputs
        self.detector = None
        if self.in_graph:
            self.threshold = float(metadata.digit_threshold)
        else:
            from server.pipeline.digit_detector import DigitDetector

            if detector is None:
                raise ValueError(f"{model} has no {DIGIT_SCORE!r} output: name the detector file (--detector)")
            self.detector = DigitDetector.load(detector)
            self.threshold = self.detector.threshold

    def __call__(self, x: np.ndarray, batch: int = 256) -> tuple[np.ndarray, np.ndarray]:
        probabilities, scores = [], []
        for start in range(0, len(x), batch):
            part = np.ascontiguousarray(x[start : start + batch], np.float32)
            if self.in_graph:
                p, s = self.session.run([PROBABILITIES, DIGIT_SCORE], {INPUT_NAME: part})
            else:
                (p,) = self.session.run([PROBABILITIES], {INPUT_NAME: part})
                s = self.detector.score(part, p)
            probabilities.append(p)
            scores.append(s)
        if not probabilities:
            return np.zeros((0, 10), np.float32), np.zeros(0, np.float32)
        return np.concatenate(probabilities), np.concatenate(scores)


def score_source(source: digit_sources.Source, scorer: ModelScorer) -> Scored:
    n = len(source)
    probabilities = np.full((n, 10), np.nan, np.float32)
    scores = np.full(n, np.nan, np.float32)
    kept = ~source.refused
    probabilities[kept], scores[kept] = scorer(source.inputs[kept])
    return Scored(source.name, source.kind, source.role, source.labels, source.refused, probabilities, scores)


def flagged_mask(scored: Scored, threshold: float) -> np.ndarray:
    """Per upload: refused, or scored under the threshold (NaN scores are refused rows)."""
    return scored.refused | ~(np.nan_to_num(scored.scores, nan=-1.0) >= threshold)


def row(scored: Scored, threshold: float) -> Row:
    flagged = flagged_mask(scored, threshold)
    base = dict(
        source=scored.name,
        kind=scored.kind,
        role=scored.role,
        n=len(flagged),
        refused=int(scored.refused.sum()),
        flagged=float(flagged.mean()) if len(flagged) else 0.0,
    )
    if scored.kind == "non-digit":
        return Row(**base)
    kept = ~scored.refused
    reads = np.where(kept, np.nan_to_num(scored.probabilities, nan=0.0).argmax(1), -1)
    top = np.nan_to_num(scored.probabilities, nan=0.0).max(1)
    right = reads == scored.labels
    return Row(
        **base,
        accuracy=float(right[kept].mean()) if kept.any() else None,
        flagged_read_right=int((flagged & right).sum()),
        flagged_read_right_confident=int((flagged & right & (top >= CONFIDENT)).sum()),
        flagged_read_wrong=int((flagged & kept & ~right).sum()),
        accepted_read_wrong=int((~flagged & kept & ~right).sum()),
    )


def curve(scored: list[Scored], role: str, points: int = 400) -> dict[str, list[float]]:
    """Catch rate against false-alarm rate over thresholds, on the sources of `role`, each source weighing alike."""

    def scores(kind: str) -> list[np.ndarray]:
        return [
            np.where(s.refused, -np.inf, np.nan_to_num(s.scores, nan=-np.inf))
            for s in scored
            if s.kind == kind and s.role == role and len(s.scores)
        ]

    return digit_sources.catch_curve(scores("digit"), scores("non-digit"), points)


def at(curve_: dict[str, list[float]], threshold: float) -> tuple[float, float]:
    """(false alarm, catch) of the curve's point nearest `threshold`."""
    i = int(np.argmin(np.abs(np.asarray(curve_["threshold"]) - threshold)))
    return curve_["false_alarm"][i], curve_["catch"][i]


def _size(name: str, per_source: int | None) -> int | None:
    return None if per_source is None else min(per_source, digit_sources.SOURCES[name].size)


def evaluate(
    model: Path,
    names: list[str] | None = None,
    mnist_dir: str | None = None,
    detector: Path | None = None,
    threshold: float | None = None,
    per_source: int | None = None,
) -> dict[str, Any]:
    """Every source (or `names`; the first `per_source` images of each) through `model`: the rows at the served
    threshold (or `threshold`), the curves."""
    scorer = ModelScorer(model, detector)
    chosen = scorer.threshold if threshold is None else threshold
    scored = [
        score_source(digit_sources.build(name, n=_size(name, per_source), mnist_dir=mnist_dir), scorer)
        for name in (names or list(digit_sources.SOURCES))
    ]
    rows = [row(s, chosen) for s in scored]
    held = [r for r in rows if r.role == "held-out"]
    digits = [r for r in held if r.kind == "digit"]
    others = [r for r in held if r.kind == "non-digit"]
    worst_digits = max((r.flagged for r in digits), default=None)
    worst_catch = min((r.flagged for r in others), default=None)
    return {
        "model": str(model),
        "model_sha256": hashlib.sha256(Path(model).read_bytes()).hexdigest(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "threshold": chosen,
        "score": "in-graph" if scorer.in_graph else "separate detector",
        "rows": [asdict(r) for r in rows],
        "targets": {
            "false_alarm_max": FALSE_ALARM_TARGET,
            "catch_min": CATCH_TARGET,
            "held_out_digits_worst_false_alarm": worst_digits,
            "held_out_non_digits_worst_catch": worst_catch,
            "met": bool(
                worst_digits is not None
                and worst_catch is not None
                and worst_digits <= FALSE_ALARM_TARGET
                and worst_catch >= CATCH_TARGET
            ),
        },
        "curves": {role: curve(scored, role) for role in ("fit", "held-out")},
    }


def markdown(report: dict[str, Any]) -> str:
    lines = [
        f"Not-a-digit signal of {Path(report['model']).name} ({report['score']} score), "
        f"threshold {report['threshold']:.4f}",
        "",
        "| source | role | n | refused | flagged | classifier right | flagged, read right (confident) "
        "| flagged, misread | let through, misread |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    order = {"digit": 0, "non-digit": 1, "look-alike": 2}
    for r in sorted(report["rows"], key=lambda r: (order[r["kind"]], r["role"] != "held-out", r["source"])):
        what = {"digit": "false alarm", "non-digit": "caught", "look-alike": "flagged (not judged)"}[r["kind"]]
        extra = ["", "", "", ""]
        if r["accuracy"] is not None:
            extra = [
                f"{r['accuracy']:.1%}",
                f"{r['flagged_read_right']} ({r['flagged_read_right_confident']})",
                str(r["flagged_read_wrong"]),
                str(r["accepted_read_wrong"]),
            ]
        lines.append(
            f"| {r['source']} ({r['kind']}) | {r['role']} | {r['n']} | {r['refused']} | "
            f"{r['flagged']:.1%} {what} | " + " | ".join(extra) + " |"
        )
    t = report["targets"]
    lines += [
        "",
        f"Held-out: worst false alarm on real digits {t['held_out_digits_worst_false_alarm']:.1%} "
        f"(target <= {t['false_alarm_max']:.0%}), worst catch on non-digits {t['held_out_non_digits_worst_catch']:.1%} "
        f"(target >= {t['catch_min']:.0%}): {'MET' if t['met'] else 'NOT MET'}",
    ]
    return "\n".join(lines)


def plot_curve(report: dict[str, Any], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.8), dpi=110)
    roles = [role for role in ("fit", "held-out") if report["curves"][role]["threshold"]]  # those with both kinds
    defaults = {role: at(report["curves"][role], report["threshold"]) for role in roles}
    right = max(
        5.0, 1.25 * 100 * max((fa for fa, _ in defaults.values()), default=0.0)
    )  # the default point always shows
    low = 100.0
    for role, style in (("fit", "--"), ("held-out", "-")):
        if role not in roles:
            continue
        c = report["curves"][role]
        fa_line, catch_line = np.asarray(c["false_alarm"]) * 100, np.asarray(c["catch"]) * 100
        fa, catch = defaults[role]
        label = f"{role} sources; at the default {report['threshold']:.3f}: {fa:.1%} flagged, {catch:.1%} caught"
        ax.plot(fa_line, catch_line, style, label=label)
        ax.plot([fa * 100], [catch * 100], "o", color=ax.lines[-1].get_color())
        low = min(low, float(catch_line[fa_line <= right].min(initial=100.0)))
    ax.axvline(FALSE_ALARM_TARGET * 100, color="grey", lw=0.8, ls=":")
    ax.axhline(CATCH_TARGET * 100, color="grey", lw=0.8, ls=":")
    ax.set_xlim(0, right)
    ax.set_ylim(max(0.0, low - 3), 100.5)
    ax.set_xlabel("real digits flagged, % (false alarms; sources weigh alike)")
    ax.set_ylabel("non-digits caught, %")
    ax.set_title("Not-a-digit signal: catch rate against false alarms")
    ax.legend(loc="lower right", fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("model", type=Path, help="the ONNX model, as served")
    parser.add_argument(
        "--out", type=Path, help="write digit-signal.json, digit-signal.md and digit-signal.curve.png here"
    )
    parser.add_argument("--sources", help="comma-separated source names (default: all)")
    parser.add_argument("--mnist", help="the MNIST directory (default: the project's copy)")
    parser.add_argument("--detector", type=Path, help="the detector file, for a model without an in-graph score")
    parser.add_argument("--threshold", type=float, help="judge at this threshold instead of the model's")
    parser.add_argument("--per-source", type=int, help="only the first N images of each source (default: all)")
    args = parser.parse_args(argv)
    report = evaluate(
        args.model,
        args.sources.split(",") if args.sources else None,
        args.mnist,
        args.detector,
        args.threshold,
        args.per_source,
    )
    print(markdown(report))
    if args.out:
        write(report, args.out)
    return 0


def write(report: dict[str, Any], out: Path) -> list[Path]:
    """digit-signal.json, digit-signal.md and digit-signal.curve.png in `out`."""
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "digit-signal.json", out / "digit-signal.md", out / "digit-signal.curve.png"]
    paths[0].write_text(json.dumps(report, indent=1) + "\n")
    paths[1].write_text(markdown(report) + "\n")
    plot_curve(report, paths[2])
    return paths


if __name__ == "__main__":
    sys.exit(main())
