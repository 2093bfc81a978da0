"""A stop that hangs is bounded: `MnistServer.stop()` gives up after drain + grace + a margin and says so, so a
hung shutdown fails a test run (or an embedding process) instead of holding it until CI's own limit."""

from __future__ import annotations

import asyncio
import threading

import pytest

from server import app
from server.app import MnistServer
from tests.support import test_config


def test_stop_is_bounded_by_drain_grace_and_a_margin() -> None:
    server = MnistServer(test_config(drain_seconds=0.5, grace_seconds=2))
    assert server.stop_deadline_s() == pytest.approx(0.5 + 2 + app.STOP_MARGIN_SECONDS)


def test_a_stop_that_hangs_raises_timeout_error_and_ends_the_servers_loop(monkeypatch) -> None:
    monkeypatch.setattr(app, "STOP_MARGIN_SECONDS", 0.5)
    server = MnistServer(test_config(drain_seconds=0, grace_seconds=0)).start()
    loop_thread = server._thread
    assert loop_thread is not None
    entered, never = threading.Event(), asyncio.Event()

    async def hangs(grace: float) -> None:
        entered.set()
        await never.wait()  # a model that never finishes closing

    monkeypatch.setattr(server.models, "close", hangs)
    try:
        with pytest.raises(TimeoutError, match=r"did not stop within 0\.5 s \(drain 0 s \+ grace 0 s"):
            server.stop()
    finally:
        if server._metrics_http is not None:  # the stop never got that far: later tests count metrics threads
            server._metrics_http.stop()
    assert entered.is_set()  # it hung where we made it hang, not somewhere earlier
    loop_thread.join(5)
    assert not loop_thread.is_alive()
    server.stop()  # a second stop after the bound is a no-op, not a second wait


def test_a_stop_that_finishes_in_time_raises_nothing_and_ends_the_loop() -> None:
    server = MnistServer(test_config(drain_seconds=0, grace_seconds=0)).start()
    loop_thread = server._thread
    server.stop()
    assert loop_thread is not None and not loop_thread.is_alive()
