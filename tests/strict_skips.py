"""A pytest plugin: under `MNIST_TEST_STRICT=1` (the README's test command and CI set it) every skip is a failure,
except a test marked `may_skip` for what a machine may lack without the project being wrong (IPv6, a second
address, an NVIDIA driver present or not). A missing dependency, missing data or a quietly bypassed check then
fails CI instead of passing as a skip. Registered by tests/conftest.py.
"""

from __future__ import annotations

import os

import pytest

SWITCH = "MNIST_TEST_STRICT"


def strict() -> bool:
    return os.environ.get(SWITCH, "") == "1"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", f"may_skip(why): this test may skip under {SWITCH}=1, for a reason of the machine's"
    )


def _fail_instead(report: pytest.TestReport | pytest.CollectReport, what: str) -> None:
    """Turn a skip report into a failure that says why, its own skip reason included."""
    reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
    report.outcome = "failed"
    report.longrepr = f"{what} skipped under {SWITCH}=1, where every test must run: {reason}"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    report = (yield).get_result()
    if strict() and report.skipped and not hasattr(report, "wasxfail") and item.get_closest_marker("may_skip") is None:
        _fail_instead(report, "test")


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector: pytest.Collector):
    report = (yield).get_result()
    if strict() and report.skipped:
        _fail_instead(report, f"module {collector.nodeid}")
