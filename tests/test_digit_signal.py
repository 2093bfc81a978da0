"""export/digit_signal.py: the not-a-digit signal judged per source exactly as served, its arithmetic, and the CLIs."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from export import digit_signal
from export.digit_signal import ModelScorer, Scored, curve, flagged_mask, row, score_source
from proto.mnist.v1 import classifier_pb2 as pb
from server.app import MnistServer
from server.config import BUNDLED_MODEL
from tests.support import Harness, test_config
from training import digit_sources


def scored(kind: str, scores: list[float], labels: list[int], reads: list[int], top: list[float], refused=()) -> Scored:
    n = len(scores)
    probabilities = np.zeros((n, 10), np.float32)
    for i, (read, p) in enumerate(zip(reads, top, strict=True)):
        probabilities[i] = (1 - p) / 9
        probabilities[i, read] = p
    refused_mask = np.zeros(n, bool)
    refused_mask[list(refused)] = True
    values = np.asarray(scores, np.float32)
    values[refused_mask] = np.nan
    probabilities[refused_mask] = np.nan
    return Scored("s", kind, "held-out", np.asarray(labels), refused_mask, probabilities, values)


def test_a_refused_upload_counts_as_flagged_and_a_score_at_the_threshold_passes() -> None:
    s = scored("digit", [0.5, 0.6, 0.7, 0.0], [1, 2, 3, 4], [1, 2, 3, 4], [0.99] * 4, refused=[3])
    assert flagged_mask(s, 0.6).tolist() == [True, False, False, True]


def test_a_digits_row_says_who_was_right_when_detector_and_classifier_disagree() -> None:
    # 0: flagged, read right, confident; 1: flagged, read right, unsure; 2: flagged, misread; 3: passed, misread;
    # 4: passed, read right; 5: refused
    s = scored(
        "digit",
        [0.1, 0.2, 0.3, 0.9, 0.95, 0.0],
        [7, 7, 7, 7, 7, 7],
        [7, 7, 1, 1, 7, 7],
        [0.99, 0.5, 0.9, 0.9, 0.99, 0.99],
        refused=[5],
    )
    r = row(s, 0.5)
    assert (r.n, r.refused, r.flagged) == (6, 1, pytest.approx(4 / 6))
    assert (r.flagged_read_right, r.flagged_read_right_confident, r.flagged_read_wrong, r.accepted_read_wrong) == (
        2,
        1,
        1,
        1,
    )
    assert r.accuracy == pytest.approx(3 / 5)  # of the five the server answered


def test_a_non_digits_row_counts_catches_only() -> None:
    r = row(scored("non-digit", [0.1, 0.9, 0.0], [-1, -1, -1], [3, 3, 3], [0.9] * 3, refused=[2]), 0.5)
    assert r.flagged == pytest.approx(2 / 3) and r.accuracy is None and r.flagged_read_right is None


def test_the_curve_rises_with_the_threshold_and_weighs_each_source_alike() -> None:
    small = Scored("a", "digit", "fit", np.zeros(2), np.zeros(2, bool), np.zeros((2, 10)), np.array([0.1, 0.9]))
    large = Scored("b", "digit", "fit", np.zeros(8), np.zeros(8, bool), np.zeros((8, 10)), np.full(8, 0.9))
    others = Scored("c", "non-digit", "fit", np.zeros(4), np.zeros(4, bool), np.zeros((4, 10)), np.full(4, 0.3))
    c = curve([small, large, others], "fit")
    assert all(np.diff(c["false_alarm"]) >= 0) and all(np.diff(c["catch"]) >= 0)
    fa, catch = digit_signal.at(c, 0.5)
    assert fa == pytest.approx(0.25)  # half of source a, none of b: sources weigh alike, not images
    assert catch == pytest.approx(1.0)


def test_scores_are_the_servers_own_for_the_same_uploads() -> None:
    """What the report judges is what a client gets: digit_score and is_digit from Classify on the same bytes."""
    source = digit_sources.build("handwriting-fonts", n=6)
    scorer = ModelScorer(BUNDLED_MODEL)
    mine = score_source(source, scorer)
    harness = Harness(MnistServer(test_config()).start())
    try:
        for i, data in enumerate(source.encoded):
            reply = harness.stub.Classify(pb.ClassifyRequest(encoded=data), timeout=20)
            assert reply.digit_score == pytest.approx(float(mine.scores[i]), abs=1e-5)
            assert reply.is_digit == (not flagged_mask(mine, scorer.threshold)[i])
            assert reply.digit == int(np.argmax(mine.probabilities[i]))
    finally:
        harness.close()


def test_mnist_eval_prints_and_writes_the_signal_per_source(tmp_path: Path, capsys) -> None:
    from export.evaluate import main

    assert main([str(BUNDLED_MODEL), "--limit", "20", "--kinds", "gaussian_blur", "--digit-sources", "8", "--out",
                 str(tmp_path)]) == 0  # fmt: skip
    printed = capsys.readouterr().out
    for name in digit_sources.SOURCES:
        assert f"| {name} (" in printed
    assert "Held-out: worst false alarm on real digits" in printed
    report = json.loads((tmp_path / "digit-signal.json").read_text())
    assert {r["source"] for r in report["rows"]} == set(digit_sources.SOURCES)
    assert all(r["n"] == min(8, digit_sources.SOURCES[r["source"]].size) for r in report["rows"])
    assert (tmp_path / "digit-signal.curve.png").stat().st_size > 10_000


def test_the_recorded_report_is_the_bundled_models_own_and_still_reproduces() -> None:
    """server/bundled/googlenet-fast.digit-signal.json (the figures docs/serving.md quotes) describes the file that is
    bundled now, at its threshold, and two of its rows come out the same when measured again."""
    recorded = json.loads((BUNDLED_MODEL.parent / "googlenet-fast.digit-signal.json").read_text())
    assert recorded["model_sha256"] == hashlib.sha256(BUNDLED_MODEL.read_bytes()).hexdigest()
    assert recorded["threshold"] == pytest.approx(ModelScorer(BUNDLED_MODEL).threshold, abs=1e-6)
    again = digit_signal.evaluate(BUNDLED_MODEL, names=["mnist-test-encoders", "uci-scans"])
    rows = {r["source"]: r for r in recorded["rows"]}
    for row_again in again["rows"]:
        assert row_again == rows[row_again["source"]]


def test_the_cli_judges_the_named_sources_on_their_first_images(tmp_path: Path, capsys) -> None:
    assert digit_signal.main([str(BUNDLED_MODEL), "--sources", "uci-scans,paper", "--per-source", "5",
                              "--out", str(tmp_path)]) == 0  # fmt: skip
    report = json.loads((tmp_path / "digit-signal.json").read_text())
    assert [(r["source"], r["n"]) for r in report["rows"]] == [("uci-scans", 5), ("paper", 5)]
    assert report["curves"]["fit"]["threshold"] == []  # no fit source named: no fit curve, and no crash drawing it
    assert (tmp_path / "digit-signal.curve.png").is_file() and "| uci-scans (digit) |" in capsys.readouterr().out
