"""What the in-graph digit score costs a session run: the model with and without it, interleaved.

    python -m loadtest.digit_score_cost --rounds 9 -- --provider cpu

Three ways of answering a batch, each built exactly as the server builds its engine (`build_backend` from
the server arguments after `--`, as `mnist-bench`'s floor does):
  - classifier: the model without the digit_score output (a copy with the subgraph taken out);
  - classifier + numpy detector: that, then `DigitDetector.score` on its probabilities (the server before);
  - in-graph: the model with the output (the server now): one run gives both.
The two the target is about, classifier and in-graph, alternate call by call (A, B, A, B, ...; the
next round B, A, ...), each call timed alone, so a noisy, shared machine slows both alike. The numpy
variant runs as its own block in each round, then the process sleeps: OpenBLAS's threads spin on
after its products and would slow whichever call came next (as they slow the next batch in a server
that runs the numpy detector). Every round's median is reported, and over all calls the median and
the 10th percentile (the least disturbed). Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from loadtest.drivers import sample_digits
from proto.contract import INPUT_SHAPE
from server.config import BUNDLED_MODEL, DIGIT_DETECTOR

VARIANTS = ("classifier", "classifier + numpy detector", "in-graph")
OPENBLAS_QUIET_S = 0.5  # after numpy's products, until OpenBLAS's spinning threads sleep


def timed(run: Callable[[], Any]) -> float:
    """Milliseconds of one call of `run`."""
    started = time.perf_counter()
    run()
    return (time.perf_counter() - started) * 1000


def measure(server_args: list[str], model: Path, batches: list[int], rounds: int, budget_s: float) -> dict[str, Any]:
    import onnx

    from export.digit_score_graph import has_digit_score, without_digit_score
    from server.config import load_config
    from server.engine.backends import build_backend
    from server.pipeline.digit_detector import DigitDetector

    proto = onnx.load(str(model))
    if not has_digit_score(proto):
        raise SystemExit(f"{model} has no digit_score output: nothing to compare (mnist-export --add-digit-score)")
    detector = DigitDetector.load(DIGIT_DETECTOR)
    with tempfile.TemporaryDirectory() as tmp:
        plain_path = Path(tmp) / model.name
        onnx.save(without_digit_score(proto), str(plain_path))
        plain = build_backend(load_config([*server_args, "--model", str(plain_path)], environ={}))
        scored = build_backend(load_config([*server_args, "--model", str(model)], environ={}))
        for backend in (plain, scored):
            backend.warm_up()
        info = scored.describe()
        digits = info.normalization.apply(sample_digits())[:, None]
        results: dict[str, Any] = {}
        for batch in batches:
            x = np.ascontiguousarray(np.resize(digits, (batch, *INPUT_SHAPE)))

            def with_numpy(x: np.ndarray = x) -> np.ndarray:
                return detector.score(x, np.asarray(plain.run(x).probabilities, np.float32))

            calls: dict[str, Callable[[], Any]] = {
                VARIANTS[0]: lambda x=x: plain.run(x),
                VARIANTS[1]: with_numpy,
                VARIANTS[2]: lambda x=x: scored.run(x),
            }
            for call in calls.values():
                for _ in range(3):
                    call()  # warm
            runs = max(3, int(budget_s / (timed(calls[VARIANTS[2]]) / 1000)))  # calls per variant per round
            times: dict[str, list[list[float]]] = {name: [] for name in VARIANTS}
            pair = (VARIANTS[0], VARIANTS[2])
            for r in range(rounds):
                order = pair if r % 2 == 0 else pair[::-1]
                for name in VARIANTS:
                    times[name].append([])
                for _ in range(runs):
                    for name in order:
                        times[name][-1].append(timed(calls[name]))
                for _ in range(runs):
                    times[VARIANTS[1]][-1].append(timed(calls[VARIANTS[1]]))
                time.sleep(OPENBLAS_QUIET_S)
            every = {name: np.concatenate(rows) for name, rows in times.items()}
            medians = {name: float(np.median(values)) for name, values in every.items()}
            p10 = {name: float(np.percentile(values, 10)) for name, values in every.items()}
            results[str(batch)] = {
                "calls_per_round": runs,
                "ms_per_round": {
                    name: [round(float(np.median(row)), 4) for row in rows] for name, rows in times.items()
                },
                "median_ms": {k: round(v, 4) for k, v in medians.items()},
                "p10_ms": {k: round(v, 4) for k, v in p10.items()},
                "in_graph_over_classifier_p10": round(p10[VARIANTS[2]] / p10[VARIANTS[0]] - 1, 4),
                "in_graph_over_classifier": round(medians[VARIANTS[2]] / medians[VARIANTS[0]] - 1, 4),
                "numpy_detector_over_classifier": round(medians[VARIANTS[1]] / medians[VARIANTS[0]] - 1, 4),
                "in_graph_over_numpy_detector": round(medians[VARIANTS[2]] / medians[VARIANTS[1]] - 1, 4),
            }
        summary = info.summary()
        for backend in (plain, scored):
            backend.close()
    return {
        "command": "python -m loadtest.digit_score_cost " + " ".join(sys.argv[1:]),
        "engine": summary,
        "model": str(model),
        "machine": f"{platform.machine()}, {platform.processor() or '?'}, Python {platform.python_version()}",
        "rounds": rounds,
        "batches": results,
    }


def table(report: dict[str, Any]) -> str:
    lines = [report["engine"]]
    for batch, row in report["batches"].items():
        lines.append(f"batch {batch} ({row['calls_per_round']} calls per variant per round), ms per call:")
        for name in VARIANTS:
            values = " ".join(f"{v:.3f}" for v in row["ms_per_round"][name])
            lines.append(
                f"  {name:<28} median {row['median_ms'][name]:8.3f}  p10 {row['p10_ms'][name]:8.3f}   "
                f"round medians: {values}"
            )
        lines.append(
            f"  in-graph score adds {100 * row['in_graph_over_classifier']:+.1f}% to the classifier's run (p10: "
            f"{100 * row['in_graph_over_classifier_p10']:+.1f}%); the numpy detector added "
            f"{100 * row['numpy_detector_over_classifier']:+.1f}%"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m loadtest.digit_score_cost",
        description="Time the model's session run with and without its digit_score output (and with the numpy "
        "detector after it), as the server builds its engine; server arguments go after --.",
    )
    parser.add_argument("--model", type=Path, default=BUNDLED_MODEL, help="a model with the digit_score output")
    parser.add_argument("--batches", default="1,256", help="batch sizes, comma-separated")
    parser.add_argument("--rounds", type=int, default=9, help="interleaved rounds per batch size")
    parser.add_argument("--round-seconds", type=float, default=0.5, help="about this long per variant per round")
    parser.add_argument("--json", type=Path, help="also write the report here")
    parser.add_argument("server_args", nargs="*", help="mnist-serve arguments, e.g. -- --provider cpu")
    args = parser.parse_args(argv)
    batches = [int(b) for b in args.batches.split(",")]
    report = measure(args.server_args, args.model, batches, args.rounds, args.round_seconds)
    print(table(report))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
