"""The feedback loop end to end, small (loadtest/feedback_loop.py; the recorded run is its full size): shifted digits
with labels lower the live accuracy and fire the alerts in a real Prometheus, the next version learnt from the stored
labels is published, tried on part of the traffic and promoted, and it reads the shift better without forgetting."""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import pytest

from loadtest.feedback_loop import run


@pytest.mark.timeout(600)  # a server, Prometheus, a fine-tune and an export, one after the other
def test_labelled_shifted_digits_lead_to_a_better_version_promoted_by_canary(tmp_path: Path, mnist_dir: Path) -> None:
    assert shutil.which("prometheus"), "Debian's prometheus is missing: tests/setup.sh installs it"
    settings = argparse.Namespace(
        out=tmp_path / "loop",
        corruption="occlusion",
        clean=100,
        shifted=600,
        steps=100,
        canary_share=0.5,
        canary_labels=100,
        judge=1000,
        after=50,
        window=100,
        drift_window=10.0,
        prometheus=True,
        test_limit=1000,
        seed=0,
        data_dir=str(mnist_dir),
    )
    report = run(settings)
    clean, shifted = report["clean"]["1"]["accuracy"], report["shifted"]["1"]["accuracy"]
    assert clean >= 0.97 and shifted <= clean - 0.04, (clean, shifted)
    drift = report["after_shift"]
    assert max(drift["prediction_drift_psi"]["1"], drift["confidence_drift_psi"]["1"]) > 0.25, drift
    assert "MnistLiveAccuracyDrop" in report["alerts_firing_after_shift"], report["alerts_firing_after_shift"]
    assert report["canary_started"]["2"]["reason"].startswith("canary")
    decision = report["decision"]
    assert decision["2"]["default"] and decision["2"]["reason"].startswith("promoted after a canary"), decision
    judged = report["judged"]
    assert judged["version_2_shifted"] > judged["version_1_shifted"], judged
    tuned = report["fine_tune"]
    # No forgetting, on the 1,000 test digits judged here, within what 1,000 digits can tell: runs of this test lost 0
    # to 4 of them; without replay, distillation and the mix the same fine-tune lost 10 (measured 2026-12-07). The
    # full-size recorded run measures the 0.1-point target on all 10,000 (loadtest/results/feedback-loop).
    assert tuned["after"]["mnist_test"] >= tuned["before"]["mnist_test"] - 0.006, tuned
    assert (settings.out / "feedback-loop.png").stat().st_size > 10_000
