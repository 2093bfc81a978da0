"""What keeps CI honest and bounded: the strict switch (tests/strict_skips.py: under MNIST_TEST_STRICT=1 a skip
fails the run unless the test is marked `may_skip`; without it, skips stay skips) and the per-test timeout (a hung
test fails, the run goes on). Each runs pytest on a small file of its own (pytester)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.strict_skips import SWITCH

SKIPPING = """
import pytest
from pathlib import Path

def test_skips_inside():
    pytest.skip("data missing")

@pytest.mark.skipif(True, reason="a dependency missing")
def test_skipped_by_its_mark():
    pass

@pytest.mark.may_skip("the machine has no IPv6")
def test_may_skip():
    pytest.skip("no IPv6 here")

@pytest.mark.xfail(reason="a known bug")
def test_expected_to_fail():
    assert False

def test_runs():
    pass
"""

MODULE_SKIP = """
import pytest
from pathlib import Path
pytest.importorskip("a_module_that_is_not_installed")

def test_never_collected():
    pass
"""


def run(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, source: str, strict: bool) -> pytest.RunResult:
    if strict:
        monkeypatch.setenv(SWITCH, "1")
    else:
        monkeypatch.delenv(SWITCH, raising=False)
    pytester.makepyfile(test_probe=source)
    return pytester.runpytest("-p", "tests.strict_skips", "-p", "no:cacheprovider", "-rA")


def test_under_the_switch_a_skip_fails_naming_its_reason_and_may_skip_is_spared(pytester, monkeypatch) -> None:
    result = run(pytester, monkeypatch, SKIPPING, strict=True)
    result.assert_outcomes(passed=1, failed=1, errors=1, skipped=1, xfailed=1)  # the skipif mark skips at setup
    result.stdout.fnmatch_lines(["*at setup of test_skipped_by_its_mark*", "*STRICT=1*: a dependency missing"])
    result.stdout.fnmatch_lines(["*_ test_skips_inside _*", "*skipped under MNIST_TEST_STRICT=1*: data missing"])
    assert result.ret != 0


def test_under_the_switch_a_module_that_skips_itself_fails(pytester, monkeypatch) -> None:
    result = run(pytester, monkeypatch, MODULE_SKIP, strict=True)
    result.stdout.fnmatch_lines(["*skipped under MNIST_TEST_STRICT=1*a_module_that_is_not_installed*"])
    assert result.ret != 0


def test_without_the_switch_skips_stay_skips(pytester, monkeypatch) -> None:
    result = run(pytester, monkeypatch, SKIPPING, strict=False)
    result.assert_outcomes(passed=1, skipped=3, xfailed=1)
    assert result.ret == 0
    module = run(pytester, monkeypatch, MODULE_SKIP, strict=False)
    module.assert_outcomes(skipped=1)


HANGING = """
import threading

def test_hangs():
    threading.Event().wait()  # never set

def test_after_it():
    pass
"""


def test_the_suite_runs_under_a_per_test_timeout(request: pytest.FixtureRequest) -> None:
    assert request.config.pluginmanager.hasplugin("timeout")
    assert 0 < float(request.config.getini("timeout")) <= 600
    assert request.config.getini("timeout_method") == "signal"  # fails the one test; the run goes on


def test_a_hung_test_fails_with_a_timeout_and_the_next_one_still_runs(pytester, monkeypatch) -> None:
    monkeypatch.delenv(SWITCH, raising=False)
    pytester.makepyfile(test_probe=HANGING)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "--timeout", "1", "-o", "timeout_method=signal")
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(["*Failed: Timeout (>1.0s) from pytest-timeout*"])


def test_ci_runs_the_readmes_test_command_under_the_strict_switch() -> None:
    root = Path(__file__).resolve().parents[1]
    readme = (root / "README.md").read_text()
    command = next(line for line in readme.splitlines() if line.startswith("bash tests/setup.sh"))
    script = (root / ".ci" / "run").read_text().splitlines()
    ci = [line for line in script if line and not line.startswith(("#", "set ", "cd "))]
    assert ci == [command]
    assert f"{SWITCH}=1 .venv/bin/python -m pytest" in command
