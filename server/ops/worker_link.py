"""A worker's end of the line to its supervisor (`mnist-serve --workers N`, server/supervisor.py).

The supervisor starts each worker with one end of a Unix socket pair, named by MNIST_WORKER_LINK_FD.
Over it, one JSON object per line, the supervisor asks and the worker's own thread answers (never the
event loop, so a busy loop still answers), repeating the request's `id`:

    {"op": "status", "id"}                          -> {"op": "status", "id", "pid", "live", "ready", "models"}
    {"op": "agree", "id", "seq", "defaults", "at"}  -> {"op": "agreed", "id", "seq"}
    {"op": "conclude", "id", "verdicts": [[model, candidate, verdict, why], ...]}  -> {"op": "concluded", "id"}

`live` and `ready` are None when all is well, else what is wrong, in words (the supervisor's /livez and
/readyz repeat them); `models` is {model: {"ready": [versions], "local": version}}, the default the worker
would choose alone. "agree" hands the repository the default versions every worker switches to at the
instant `at` (time.monotonic(), one clock for the host): see `AgreedDefaults`. A status also carries `trials`, the
canary trials running in the worker with their labelled counts (ModelRepository.trials_now): the supervisor pools
every worker's counts, decides, and sends the verdict with "conclude" (server/models/canary.py).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
from collections.abc import Callable
from typing import Any

from server.models.repository import AgreedDefaults

log = logging.getLogger("mnist.worker")

LINK_ENV = "MNIST_WORKER_LINK_FD"
INDEX_ENV = "MNIST_WORKER_INDEX"  # "2/4": the third worker of four
AGREED_ENV = "MNIST_WORKER_AGREED"  # {"seq", "defaults", "at"}: the agreement when the worker was started
MAX_LINE_BYTES = 1 << 20


class WorkerLink:
    """Answers the supervisor from a thread of its own. `models` is replaced (never mutated) by the event loop
    whenever the repository changes; `live` and `ready` are read when asked."""

    def __init__(
        self,
        sock: socket.socket,
        index: int,
        count: int,
        live: Callable[[], str | None],
        ready: Callable[[], str | None],
        propose: Callable[[AgreedDefaults], None],
        trials: Callable[[], dict[str, Any]] = dict,
        conclude: Callable[[str, str, str, str], None] = lambda model, candidate, verdict, why: None,
    ) -> None:
        self.index, self.count = index, count
        self.models: dict[str, dict[str, Any]] = {}
        self._sock, self._live, self._ready, self._propose = sock, live, ready, propose
        self._trials, self._conclude = trials, conclude
        self._thread = threading.Thread(target=self._serve, name="worker-link", daemon=True)

    @staticmethod
    def from_environment() -> tuple[socket.socket, int, int] | None:
        """The socket the supervisor passed, this worker's index and the number of workers; None when not started
        by a supervisor."""
        fd = os.environ.get(LINK_ENV)
        if not fd:
            return None
        index, _, count = os.environ.get(INDEX_ENV, "0/1").partition("/")
        return socket.socket(fileno=int(fd)), int(index), int(count or 1)

    @staticmethod
    def agreement_at_start() -> AgreedDefaults | None:
        """The defaults every other worker routes by now, from the supervisor; None when there are none yet."""
        try:
            agreed = json.loads(os.environ.get(AGREED_ENV) or "{}")
            if not agreed.get("seq"):
                return None
            return AgreedDefaults(int(agreed["seq"]), dict(agreed["defaults"]), float(agreed.get("at", 0.0)))
        except (ValueError, KeyError, TypeError):
            return None

    def start(self) -> None:
        self._thread.start()

    def _serve(self) -> None:
        reader = self._sock.makefile("rb")
        try:
            while line := reader.readline(MAX_LINE_BYTES):
                try:
                    reply = self._answer(json.loads(line))
                except (ValueError, KeyError, TypeError) as err:
                    log.error("supervisor sent something unreadable: %s", err)
                    continue
                self._sock.sendall(json.dumps(reply).encode() + b"\n")
        except OSError:
            pass
        # The supervisor is gone (its end closed): a worker must not outlive it and hold the port.
        log.error("the supervisor's link closed; stopping this worker")
        os.kill(os.getpid(), 15)

    def _answer(self, message: dict[str, Any]) -> dict[str, Any]:
        op, ident = message["op"], message.get("id")
        if op == "status":
            return {
                "op": "status",
                "id": ident,
                "pid": os.getpid(),
                "live": self._live(),
                "ready": self._ready(),
                "models": self.models,
                "trials": self._trials(),
            }
        if op == "agree":
            self._propose(AgreedDefaults(int(message["seq"]), dict(message["defaults"]), float(message["at"])))
            return {"op": "agreed", "id": ident, "seq": int(message["seq"])}
        if op == "conclude":
            for model, candidate, verdict, why in message["verdicts"]:
                self._conclude(str(model), str(candidate), str(verdict), str(why))
            return {"op": "concluded", "id": ident}
        raise ValueError(f"unknown op {op!r}")
