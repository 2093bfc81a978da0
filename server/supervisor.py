"""`mnist-serve --workers N`: N frontend processes on one port, under one supervisor.

One Python process tops out near one core: its event loop and the GIL serialize every call. So the
supervisor starts N workers, each the ordinary single-process server (parsing, decoding, batching and its
own inference engine), all bound to the same gRPC (and HTTP) port with SO_REUSEPORT: the kernel spreads
new connections among them, as gRPC's own examples/python/multiprocessing does. Why one engine per
worker and not one shared engine fed over shared memory: docs/performance.md, "Capacity on paper" (measured).

What the supervisor does, and nothing else:
- serves /metrics for all workers (prometheus_client's multiprocess mode: each worker writes its values to
  files in a folder made for this run; `MultiProcessCollector` reads them), and /livez and /readyz;
- asks each worker for its status over its own socket (server/ops/worker_link.py) a few times a second;
- moves every worker to a new default model version at the same instant (`agree_defaults`): a worker that
  has loaded version 2 keeps answering with version 1 until every worker has version 2 READY;
- makes the folder of the workers' own sockets, over which a label reaches the worker that gave the answer
  (server/feedback/peers.py);
- decides canary trials on every worker's labels, and sends each verdict to the workers running the trial;
- restarts a worker that dies or whose event loop stalls (a crash loop at start stops the whole server);
- on SIGTERM or SIGINT: /readyz says shutting down, every worker drains (its own drain and grace), then exits.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client import multiprocess as prometheus_multiprocess

from server.config import ServeConfig, describe, worker_count
from server.feedback.peers import PEERS_ENV
from server.models.canary import PROMOTED, ROLLED_BACK, TrialJudge
from server.models.repository import version_key
from server.ops.metrics import canary_events_counter
from server.ops.metrics_http import MetricsHttpServer
from server.ops.worker_link import AGREED_ENV, INDEX_ENV, LINK_ENV
from server.security import http_ssl_context, load_token_checker

log = logging.getLogger("mnist.supervisor")

STATUS_INTERVAL_S = 0.25  # how often each worker is asked how it is
STATUS_TIMEOUT_S = 2.0  # how long one round of questions waits for the workers' answers
# A worker's last answer counts this long: longer than the slowest round (a status round and an agreement round, each
# held up to STATUS_TIMEOUT_S by one silent worker), so one slow worker never makes the others look stale.
STATUS_FRESH_S = 3 * STATUS_TIMEOUT_S
STARTUP_TIMEOUT_S = 300.0  # a worker not ready this long after it started is killed
# New defaults are sent this far ahead of the instant every worker switches: more than the longest an answer is
# waited for, so a worker that acknowledged in time had them before the instant.
AGREEMENT_LEAD_S = STATUS_TIMEOUT_S + 0.5
RESTART_BACKOFF_S = (0.5, 1.0, 2.0, 5.0, 10.0, 30.0)
STOP_MARGIN_S = 15.0  # beyond the workers' drain and grace: their own close (models, ports, traces)
METRICS_DIR_PREFIX = "mnist-serve-metrics-"  # then the supervisor's pid and a random part
PEERS_DIR_PREFIX = "mnist-serve-peers-"  # the workers' feedback sockets (server/feedback/peers.py), named the same way


def agree_defaults(previous: dict[str, str], workers: list[dict[str, dict[str, Any]]]) -> dict[str, str]:
    """The default version of each model that every worker can route to, from each worker's `models` status
    ({model: {"ready": [every READY version], "local": the version it would choose alone, or None when its
    folder wants none}}).

    A model's default moves only when every worker would choose the same version alone and has it READY; until
    then the previous agreement holds while every worker still has that version READY (workers do not retire a
    version an agreement routes to); otherwise the newest version READY on every worker. A model no worker's
    folder wants any more, or not READY on every worker, gets no agreed default (each worker decides)."""
    if not workers:
        return dict(previous)
    agreed = {}
    for name in set().union(*(set(models) for models in workers)):
        ready_everywhere = set.intersection(*(set(models.get(name, {}).get("ready", ())) for models in workers))
        local = {models.get(name, {}).get("local") for models in workers}
        if not ready_everywhere or local == {None}:
            continue
        if len(local) == 1 and (choice := next(iter(local))) in ready_everywhere:
            agreed[name] = choice
        elif previous.get(name) in ready_everywhere:
            agreed[name] = previous[name]
        else:
            agreed[name] = max(ready_everywhere, key=version_key)
    return agreed


@dataclass(eq=False)
class Worker:
    """One worker process and the supervisor's end of its link (JSON lines; each request carries an `id` its answer
    repeats, so an answer that comes too late for one round is recognised and dropped in the next)."""

    index: int
    process: subprocess.Popen | None = None
    link: socket.socket | None = None
    started: float = 0.0
    status: dict[str, Any] = field(default_factory=dict)
    answered: float = 0.0  # time.monotonic() of its last status answer
    agreed_seq: int = 0  # the agreement it has acknowledged
    ready_once: bool = False  # this process has been ready
    served_before: bool = False  # some process of this worker has been ready: a death is restarted, not fatal
    restarts: int = 0
    restart_at: float | None = None  # when a dead worker is started again
    shutting_since: float | None = None  # when it first said it is shutting down (on its own)
    _buffer: bytearray = field(default_factory=bytearray)
    _next_id: int = 0

    def send(self, message: dict[str, Any]) -> int | None:
        """Send one request; its id, or None when the link is gone."""
        if self.link is None:
            return None
        self._next_id += 1
        try:
            self.link.sendall(json.dumps({**message, "id": self._next_id}).encode() + b"\n")
        except OSError:
            return None
        return self._next_id

    def receive(self) -> list[dict[str, Any]]:
        """Every whole answer that has arrived (call when the link is readable)."""
        try:
            data = self.link.recv(1 << 16) if self.link is not None else b""
        except (BlockingIOError, InterruptedError):
            return []
        except OSError:
            data = b""
        if not data:  # the worker closed its end: it is exiting
            self.close_link()
            return []
        self._buffer += data
        *lines, rest = self._buffer.split(b"\n")
        self._buffer = bytearray(rest)
        answers = []
        for line in lines:
            with contextlib.suppress(ValueError):
                answers.append(json.loads(line))
        return answers

    def close_link(self) -> None:
        if self.link is not None:
            with contextlib.suppress(OSError):
                self.link.close()
        self.link = None
        self._buffer.clear()


def ask_all(
    questions: dict[Worker, dict[str, Any]], timeout: float, wake: socket.socket | None = None
) -> dict[Worker, dict[str, Any]]:
    """Send each worker its question, then collect the answers until all are in or `timeout` has passed: one slow
    worker delays the round by at most `timeout`, never one timeout per worker. Returns early, with what has
    arrived, once `wake` is readable (a signal asked the supervisor to stop)."""
    waiting = {}
    for worker, question in questions.items():
        ident = worker.send(question)
        if ident is not None:
            waiting[worker] = ident
    answers: dict[Worker, dict[str, Any]] = {}
    deadline = time.monotonic() + timeout
    while waiting and (left := deadline - time.monotonic()) > 0:
        by_socket = {worker.link: worker for worker in waiting if worker.link is not None}
        if not by_socket:
            break
        readable, _, _ = select.select([*by_socket, *([wake] if wake is not None else [])], [], [], left)
        if wake is not None and wake in readable:
            break
        for sock in readable:
            worker = by_socket[sock]
            for answer in worker.receive():
                if answer.get("id") == waiting.get(worker):
                    answers[worker] = answer
                    del waiting[worker]
            if worker.link is None:
                waiting.pop(worker, None)
    return answers


def remove_stale_metrics_folders(root: Path, prefix: str = METRICS_DIR_PREFIX) -> None:
    """Metrics (or peers') folders of supervisors that are gone (killed before they could remove theirs); in a
    container, a folder named after our own pid is a previous life's (the supervisor is pid 1 every time)."""
    for folder in root.glob(prefix + "*"):
        owner = folder.name[len(prefix) :].split("-")[0]
        if not owner.isdigit():
            continue
        alive = int(owner) != os.getpid()
        if alive:
            try:
                os.kill(int(owner), 0)
            except ProcessLookupError:
                alive = False
            except PermissionError:
                pass  # another user's process: alive
        if not alive:
            shutil.rmtree(folder, ignore_errors=True)


class Supervisor:
    def __init__(self, config: ServeConfig, argv: list[str]) -> None:
        self.config = config
        self.argv = list(argv)
        self.count = worker_count(config)
        self.workers = [Worker(index) for index in range(self.count)]
        for prefix in (METRICS_DIR_PREFIX, PEERS_DIR_PREFIX):
            remove_stale_metrics_folders(Path(tempfile.gettempdir()), prefix)
        self.metrics_dir = tempfile.mkdtemp(prefix=f"{METRICS_DIR_PREFIX}{os.getpid()}-")
        self.peers_dir = tempfile.mkdtemp(prefix=f"{PEERS_DIR_PREFIX}{os.getpid()}-")  # mode 0700: ours alone
        self.registry = CollectorRegistry()
        prometheus_multiprocess.MultiProcessCollector(self.registry, path=self.metrics_dir)
        Gauge("mnist_workers", "worker processes configured (--workers)", registry=self.registry).set(self.count)
        self.workers_ready = Gauge("mnist_workers_ready", "worker processes serving now", registry=self.registry)
        self.worker_restarts = Counter(
            "mnist_worker_restarts", "worker processes started again after dying or stalling", registry=self.registry
        )
        self.trials = TrialJudge()  # canary trials, decided here on every worker's labels
        self.canary_events = canary_events_counter(self.registry)  # the workers leave them to the supervisor
        self.agreed: dict[str, str] = {}
        self.agreement_seq = 0
        self._agreement_at = 0.0
        self.port = config.port
        self.stopping = threading.Event()  # set by the main loop once a stop is asked for; read by /readyz
        self._stop_signal: str | None = None  # set by the signal handler (a plain assignment: safe there)
        self._wake_r, self._wake_w = socket.socketpair()  # the signal's byte (set_wakeup_fd) ends a wait at once
        self.failed: str | None = None  # a worker that cannot start: the whole server stops
        self._reserved: socket.socket | None = None
        self._metrics_http: MetricsHttpServer | None = None
        self._lock = threading.Lock()

    # --- probes, read by the metrics HTTP thread ------------------------------------------------------------

    def liveness(self) -> str | None:
        processes = [w.process for w in self.workers]  # read once: the main thread may replace them meanwhile
        if not any(process is not None and process.poll() is None for process in processes):
            return "no worker process is running"
        return None

    def readiness(self) -> str | None:
        if self.stopping.is_set():
            return "shutting down"
        ready = sum(1 for w in self.workers if self._is_ready(w))
        if not all(w.served_before for w in self.workers):
            return f"not serving yet: {ready} of {self.count} workers ready (models loading)"
        if not ready:
            return f"no worker of {self.count} is serving"
        return None

    def _is_ready(self, worker: Worker) -> bool:
        fresh = time.monotonic() - worker.answered < STATUS_FRESH_S
        process = worker.process
        return fresh and worker.status.get("ready", "?") is None and process is not None and process.poll() is None

    # --- running ----------------------------------------------------------------------------------------

    def run(self) -> int:
        """Start the workers and watch them until SIGTERM or SIGINT; returns the exit status."""
        log.info("configuration (%d workers, each):\n%s", self.count, describe(self.config))
        for end in (self._wake_r, self._wake_w):
            end.setblocking(False)
        signal.set_wakeup_fd(self._wake_w.fileno())
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_signal)
        try:
            self._reserve_port()
            if self.config.metrics_port:
                self._start_metrics()
            for worker in self.workers:
                self._spawn(worker)
            log.info("%d workers starting on port %d (metrics on %s)", self.count, self.port, self.config.metrics_port)
            while self._stop_signal is None and self.failed is None:
                self._watch_once()
                self._pause(STATUS_INTERVAL_S)
        except Exception as exc:  # the metrics port taken, ...
            log.error("cannot start: %s: %s", type(exc).__name__, exc)
            self.failed = self.failed or str(exc)
        self.stopping.set()
        if self._stop_signal is not None:
            log.info("received %s: draining %d workers", self._stop_signal, self.count)
        status = self._stop_workers()
        if self._metrics_http is not None:
            self._metrics_http.stop()
        shutil.rmtree(self.metrics_dir, ignore_errors=True)
        shutil.rmtree(self.peers_dir, ignore_errors=True)
        if self.failed:
            log.error("stopped: %s", self.failed)
            return 2
        log.info("stopped")
        return status

    def _on_signal(self, number: int, _frame: object) -> None:
        self._stop_signal = signal.Signals(number).name

    def _pause(self, seconds: float) -> None:
        """Wait `seconds`, or less if a signal arrives (its byte on the wake-up socket)."""
        readable, _, _ = select.select([self._wake_r], [], [], seconds)
        if readable:
            with contextlib.suppress(BlockingIOError):
                self._wake_r.recv(4096)

    def _reserve_port(self) -> None:
        """With --port 0, pick the port every worker binds (held with SO_REUSEPORT until they have bound it)."""
        if self.port:
            return
        host = self.config.host.strip("[]") or "::"
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._reserved = socket.socket(family, socket.SOCK_STREAM)
        self._reserved.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        self._reserved.bind((host, 0))  # bound, never listening: the kernel hands it no connection
        self.port = self._reserved.getsockname()[1]

    def _start_metrics(self) -> None:
        tokens = load_token_checker(self.config)
        self._metrics_http = MetricsHttpServer(
            self.registry,
            self.config.metrics_host or self.config.host,
            self.config.metrics_port,
            ssl_context=http_ssl_context(self.config),
            auth=tokens if self.config.metrics_auth == "on" else None,
            liveness=self.liveness,
            readiness=self.readiness,
        )
        self._metrics_http.start()

    def _spawn(self, worker: Worker) -> None:
        ours, theirs = socket.socketpair()
        environment = {
            **os.environ,
            "PROMETHEUS_MULTIPROC_DIR": self.metrics_dir,
            PEERS_ENV: self.peers_dir,
            LINK_ENV: str(theirs.fileno()),
            INDEX_ENV: f"{worker.index}/{self.count}",
            # the defaults in force now: a worker started again routes by them from its first call
            AGREED_ENV: json.dumps({"seq": self.agreement_seq, "defaults": self.agreed, "at": self._agreement_at}),
        }
        command = [sys.executable, "-m", "server.app", *self.argv]
        command += ["--workers", "1", "--metrics-port", "0", "--port", str(self.port)]
        try:
            worker.process = subprocess.Popen(command, env=environment, pass_fds=(theirs.fileno(),))
        except OSError:
            ours.close()
            raise
        finally:
            theirs.close()
        ours.setblocking(False)
        worker.close_link()
        worker.link = ours
        worker.started = worker.answered = time.monotonic()
        worker.status, worker.agreed_seq, worker.restart_at = {}, self.agreement_seq, None
        worker.ready_once, worker.shutting_since = False, None
        log.info("worker %d started (pid %d)", worker.index, worker.process.pid)

    def _watch_once(self) -> None:
        now = time.monotonic()
        for worker in self.workers:
            if worker.process is None and worker.restart_at is not None and now >= worker.restart_at:
                try:
                    self._spawn(worker)
                except OSError as err:  # no memory, no process slot: try again later, keep serving meanwhile
                    log.error("cannot start worker %d again: %s", worker.index, err)
                    worker.restart_at = now + RESTART_BACKOFF_S[-1]
        running = [w for w in self.workers if w.process is not None and w.process.poll() is None]
        answers = ask_all({worker: {"op": "status"} for worker in running}, STATUS_TIMEOUT_S, self._wake_r)
        now = time.monotonic()
        for worker in running:
            answer = answers.get(worker)
            if answer is not None:
                worker.status, worker.answered = answer, now
                if answer.get("ready") is None:
                    worker.ready_once = worker.served_before = True
                if answer.get("ready") != "shutting down":
                    worker.shutting_since = None
                elif worker.shutting_since is None:
                    worker.shutting_since = now
            if (reason := self._stuck(worker, answer, now)) is not None:
                log.error("worker %d (pid %d) is stuck (%s): killing it", worker.index, worker.process.pid, reason)
                worker.process.kill()
                worker.process.wait()
        for worker in self.workers:
            if worker.process is not None and (code := worker.process.poll()) is not None:
                self._on_exit(worker, code)
        if self._reserved is not None and all(w.ready_once for w in self.workers):
            self._reserved.close()  # every worker has bound the port
            self._reserved = None
        self.workers_ready.set(sum(1 for w in self.workers if self._is_ready(w)))
        if self._stop_signal is None:
            self._judge_trials()
            self._agree(answers)

    def _stuck(self, worker: Worker, answer: dict[str, Any] | None, now: float) -> str | None:
        """Why a running worker should be killed, or None."""
        if not worker.ready_once:
            if now - worker.started > STARTUP_TIMEOUT_S:
                return f"not ready {STARTUP_TIMEOUT_S:g} s after it started"
            return None  # loading: a model load may hold the GIL and delay its answers for seconds
        if worker.shutting_since is not None:  # stopping on its own (its link closed, or a signal of its own)
            bound = self.config.drain_seconds + self.config.grace_seconds + STOP_MARGIN_S
            return f"still shutting down after {bound:g} s" if now - worker.shutting_since > bound else None
        if answer is not None and answer.get("live") is not None:
            return answer["live"]
        if now - worker.answered > self.config.liveness_stall_seconds:
            return f"no answer on its link for {now - worker.answered:.0f} s"
        return None

    def _on_exit(self, worker: Worker, code: int) -> None:
        pid = worker.process.pid
        worker.close_link()
        worker.process = None
        prometheus_multiprocess.mark_process_dead(pid, self.metrics_dir)  # its live gauges no longer count
        if not worker.served_before:
            self.failed = f"worker {worker.index} exited with status {code} before it was ready (see its log above)"
            return
        if time.monotonic() - worker.started > 60:
            worker.restarts = 0  # it had run a while: this death starts the backoff afresh
        delay = RESTART_BACKOFF_S[min(worker.restarts, len(RESTART_BACKOFF_S) - 1)]
        log.error(
            "worker %d (pid %d) exited with status %d: starting it again in %.1f s", worker.index, pid, code, delay
        )
        worker.restarts += 1
        worker.restart_at = time.monotonic() + delay
        self.worker_restarts.inc()

    def _judge_trials(self) -> None:
        """Canary trials, decided on every running worker's last counts summed (server/models/canary.py,
        TrialJudge); each event counted once, here, and each verdict sent to the workers still running its trial."""
        running = [w for w in self.workers if w.process is not None and w.process.poll() is None]
        reports = {worker: worker.status.get("trials") or {} for worker in running}
        events, verdicts = self.trials.update(reports)
        for model, version, event, why in events:
            self.canary_events.labels(model, version, event).inc()
            if event in (PROMOTED, ROLLED_BACK):
                holders = sum(1 for report in reports.values() if model in report)
                log.info(
                    "model %s version %s %s on the labels of %d worker(s): %s", model, version, event, holders, why
                )
        if verdicts:
            ask_all({w: {"op": "conclude", "verdicts": v} for w, v in verdicts.items()}, STATUS_TIMEOUT_S, self._wake_r)

    def _agree(self, answers: dict[Worker, dict[str, Any]]) -> None:
        """Move the agreed defaults when the workers agree, and send the agreement to every worker that lacks it.

        Only when every running worker that has been ready answered this round (a late one may lack the version
        the others agree on), and never before the last agreement's instant has passed (a worker that took it
        would switch twice)."""
        now = time.monotonic()
        serving = [w for w in self.workers if w.process is not None and w.ready_once]
        current = serving and all(w in answers for w in serving) and now >= self._agreement_at
        if current:
            statuses = [w.status.get("models", {}) for w in serving if w.status.get("ready") is None]
            agreed = agree_defaults(self.agreed, statuses) if statuses else self.agreed
            if agreed != self.agreed:
                self.agreement_seq += 1
                self.agreed = agreed
                # the first agreement at once: no worker routes by an earlier one it could disagree with
                self._agreement_at = now + AGREEMENT_LEAD_S if self.agreement_seq > 1 else now
                log.info("default versions agreed by the workers (from %.1f s on): %s", AGREEMENT_LEAD_S, agreed or "-")
        lagging = [w for w in self.workers if w.process is not None and w.agreed_seq != self.agreement_seq]
        message = {"op": "agree", "seq": self.agreement_seq, "defaults": self.agreed, "at": self._agreement_at}
        for worker, answer in ask_all(dict.fromkeys(lagging, message), STATUS_TIMEOUT_S, self._wake_r).items():
            if answer.get("seq") == self.agreement_seq:
                worker.agreed_seq = self.agreement_seq
                if self.agreement_seq > 1 and (late := time.monotonic() - self._agreement_at) > 0:  # the first: at once
                    log.warning("worker %d took the defaults %.3f s after the agreed instant", worker.index, late)

    def _stop_workers(self) -> int:
        """SIGTERM to every worker (each drains: NOT_SERVING, then grace for calls in flight), then wait for them."""
        running = [w for w in self.workers if w.process is not None and w.process.poll() is None]
        for worker in running:
            with contextlib.suppress(OSError):
                worker.process.send_signal(signal.SIGTERM)
        bound = time.monotonic() + self.config.drain_seconds + self.config.grace_seconds + STOP_MARGIN_S
        status = 0
        for worker in running:
            try:
                code = worker.process.wait(timeout=max(0.0, bound - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.error("worker %d did not stop in time: killing it", worker.index)
                worker.process.kill()
                code = worker.process.wait()
            status = status or (1 if code else 0)
            worker.close_link()
        if self._reserved is not None:
            self._reserved.close()
        return status
