"""mnist-attack: a skipped check is no pass. It is counted apart and named in the summary, leaves the exit status alone,
and fails the run when the run is strict (`--strict`, or MNIST_TEST_STRICT=1)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from loadtest.attack import cli, runner
from loadtest.attack.core import FAIL, INFO, PASS, SKIP, Check, Line, Skip, judge


def line(name: str, status: str) -> Line:
    return Line(name, status, "sent", "measured", "target", "" if status == PASS else "why")


PASSED, SKIPPED, FAILED = line("modes", PASS), line("reflection-v1", SKIP), line("bomb", FAIL)


def test_a_run_with_a_skip_exits_0_unless_strict_then_1() -> None:
    assert runner.exit_status([PASSED, SKIPPED], strict=False) == 0
    assert runner.exit_status([PASSED, SKIPPED], strict=True) == 1
    assert runner.exit_status([PASSED], strict=True) == 0
    assert runner.exit_status([PASSED, FAILED], strict=False) == runner.exit_status([FAILED], strict=True) == 1


def test_the_tally_counts_skips_apart_and_says_they_are_not_passes() -> None:
    assert runner.tally([PASSED, PASSED, SKIPPED, line("cpu", INFO)]) == (
        "2 PASS, 0 FAIL, 1 SKIP (not run, not passed), 1 INFO"
    )
    assert runner.tally([PASSED]) == "1 PASS, 0 FAIL, 0 SKIP"


def test_the_verdict_names_what_was_skipped_and_how_to_make_it_fail() -> None:
    assert runner.verdict([PASSED], strict=False) == "passed"
    lenient = runner.verdict([PASSED, SKIPPED], strict=False)
    assert lenient.startswith("passed; skipped, not passed: reflection-v1")
    assert "--strict or MNIST_TEST_STRICT=1" in lenient
    assert runner.verdict([PASSED, SKIPPED], strict=True).startswith("FAILED (strict): 1 check(s) skipped")
    assert runner.verdict([SKIPPED], strict=False).startswith("nothing passed")  # skips alone pass nothing
    assert runner.verdict([PASSED, FAILED, SKIPPED], strict=False).startswith("FAILED: 1 line(s) failed")


@pytest.mark.parametrize(("value", "strict"), [("1", True), (" 1 ", True), ("0", False), ("", False), ("yes", False)])
def test_mnist_test_strict_1_makes_the_run_strict(value: str, strict: bool) -> None:
    assert runner.strict_from_env({"MNIST_TEST_STRICT": value}) is strict
    assert runner.strict_from_env({}) is False


def test_the_report_counts_and_lists_skips_apart(tmp_path: Path) -> None:
    meta = {"started": "now", "quick": True, "budget_s": 60, "elapsed_s": 1, "server_args": "", "machine": "m"}
    runner.write_report(tmp_path, {**meta, "strict": False}, [PASSED, SKIPPED])
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["summary"] == {PASS: 1, SKIP: 1}
    assert report["skipped"] == ["reflection-v1"] and report["exit_status"] == 0
    markdown = (tmp_path / "report.md").read_text()
    assert "**1 PASS, 0 FAIL, 1 SKIP (not run, not passed)**" in markdown
    assert "skipped, not passed: reflection-v1" in markdown
    runner.write_report(tmp_path, {**meta, "strict": True}, [PASSED, SKIPPED])
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["exit_status"] == 1 and report["verdict"].startswith("FAILED (strict)")


# --- the command, with two stand-in checks: one passes, one cannot run -------------------------------------------


def passes(ctx) -> list[Line]:
    return [judge("stand-in-pass", True, "sent", "measured", "target")]


def cannot_run(ctx) -> list[Line]:
    raise Skip("not served here")


@pytest.fixture
def stand_ins(monkeypatch: pytest.MonkeyPatch) -> None:
    checks = [
        Check("stand-in-pass", "0 stand-ins", "nothing", "PASS", True, 30, 0, passes),
        Check("stand-in-skip", "0 stand-ins", "nothing", "PASS", True, 30, 0, cannot_run),
    ]
    monkeypatch.setattr(cli, "select", lambda only, quick: checks)
    monkeypatch.setattr(cli, "digits", lambda count: None)  # no MNIST needed: no check sends digits
    monkeypatch.setattr(cli.Ctx, "has_flag", lambda self, flag: True)  # no mnist-serve --help
    monkeypatch.setattr(cli.signal, "signal", lambda signum, handler: None)  # pytest keeps its own SIGTERM handling
    monkeypatch.delenv("MNIST_TEST_STRICT", raising=False)


@pytest.mark.parametrize(
    ("argv", "environ", "status"),
    [([], {}, 0), (["--strict"], {}, 1), ([], {"MNIST_TEST_STRICT": "1"}, 1), ([], {"MNIST_TEST_STRICT": "0"}, 0)],
    ids=["lenient", "--strict", "MNIST_TEST_STRICT=1", "MNIST_TEST_STRICT=0"],
)
def test_the_command_exits_by_its_skips_only_when_strict(
    stand_ins, tmp_path: Path, monkeypatch, capsys, argv, environ, status
) -> None:
    for key, value in environ.items():
        monkeypatch.setenv(key, value)
    assert cli.main(["--out", str(tmp_path), *argv]) == status
    output = capsys.readouterr().out
    assert "done: 1 PASS, 0 FAIL, 1 SKIP (not run, not passed)" in output
    assert "skipped, not passed: stand-in-skip" in output
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["summary"] == {PASS: 1, SKIP: 1} and report["exit_status"] == status
    assert report["strict"] is (status == 1)
