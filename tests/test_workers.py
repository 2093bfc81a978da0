"""`mnist-serve --workers N`: several processes on one port, one /metrics, coherent defaults, drain and restarts."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import pytest
from prometheus_client.multiprocess import MultiProcessCollector

from loadtest.servers import ServerProcess, free_port
from proto.mnist.v1 import classifier_pb2 as pb
from proto.mnist.v1 import classifier_pb2_grpc as pb_grpc
from server.balancing import SERVICE_CONFIG
from server.config import load_config, usable_cores, worker_count
from server.models.repository import AgreedDefaults, ModelRepository
from server.supervisor import Worker, agree_defaults, ask_all, remove_stale_metrics_folders
from tests.test_repository import MODEL, FakeLoader, config_pbtxt, publish

RAW = (np.arange(784) % 251).astype(np.uint8).tobytes()  # any image with contrast: the null engine reads none


# --- the agreement on defaults, as a rule -----------------------------------------------------------------


def models(local: str, *ready: str) -> dict:
    return {MODEL: {"ready": list(ready), "local": local}}


def test_a_default_moves_only_once_every_worker_would_choose_it_and_has_it_ready() -> None:
    assert agree_defaults({MODEL: "1"}, [models("2", "1", "2"), models("1", "1")]) == {MODEL: "1"}
    assert agree_defaults({MODEL: "1"}, [models("2", "1", "2"), models("2", "1", "2")]) == {MODEL: "2"}
    # a rollback (default_version 1 in config.pbtxt) moves the same way
    assert agree_defaults({MODEL: "2"}, [models("1", "1", "2"), models("2", "1", "2")]) == {MODEL: "2"}
    assert agree_defaults({MODEL: "2"}, [models("1", "1", "2"), models("1", "1", "2")]) == {MODEL: "1"}


def test_without_a_previous_agreement_the_newest_version_ready_everywhere_is_chosen() -> None:
    assert agree_defaults({}, [models("3", "2", "3"), models("2", "2")]) == {MODEL: "2"}
    assert agree_defaults({}, [models("3", "3"), models("2", "2")]) == {}  # nothing in common: each decides
    assert agree_defaults({}, [models("1", "1"), {}]) == {}  # a model one worker lacks gets no agreed default
    # a model whose folder is gone (no worker would choose any version) loses its agreement, then is retired
    gone = {MODEL: {"ready": ["1"], "local": None}}
    assert agree_defaults({MODEL: "1"}, [gone, gone]) == {}


def test_workers_auto_is_one_per_four_cores_at_most_eight_and_bad_counts_are_refused() -> None:
    config = load_config([], environ={})  # the default, whatever MNIST_SERVE_WORKERS the tests run with
    assert config.workers == "auto"
    assert [worker_count(config, cores) for cores in (1, 2, 4, 16, 64)] == [1, 1, 1, 4, 8]
    assert worker_count(load_config(["--workers", "3"])) == 3
    for bad in ("0", "-1", "many", "²", "65"):
        with pytest.raises(SystemExit, match="workers must be auto or a whole number from 1 to 64"):
            load_config(["--workers", bad])


def test_workers_auto_counts_the_cores_a_container_limit_allows(tmp_path: Path) -> None:
    (tmp_path / "cpu.max").write_text("100000 100000\n")  # limits.cpu: 1
    assert usable_cores(tmp_path) == 1
    (tmp_path / "cpu.max").write_text("150000 100000\n")  # 1.5 cores: a second worker's loop would get half a core
    assert usable_cores(tmp_path) == min(2, len(os.sched_getaffinity(0)))
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert usable_cores(tmp_path) == len(os.sched_getaffinity(0))
    assert usable_cores(tmp_path / "absent") == len(os.sched_getaffinity(0))


def test_explicit_model_control_is_refused_with_several_workers(tmp_path: Path) -> None:
    flags = ["--model-repository", str(tmp_path), "--model-control", "on"]
    with pytest.raises(SystemExit, match="model_control on needs --workers 1"):
        load_config([*flags, "--workers", "2"])
    assert load_config([*flags, "--workers", "1"]).model_control == "on"


def test_an_answer_too_late_for_one_round_is_dropped_and_the_link_keeps_working() -> None:
    """A worker busy for longer than a round (a model load holding the GIL) misses that round only: its late answer
    is recognised by its id and dropped, and the next round gets the next answer."""
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    worker = Worker(0, link=ours)

    def slow_then_quick() -> None:
        reader = theirs.makefile("rb")
        for delay in (0.4, 0.0):
            question = json.loads(reader.readline())
            time.sleep(delay)
            theirs.sendall(json.dumps({"id": question["id"], "n": question["n"]}).encode() + b"\n")

    answering = threading.Thread(target=slow_then_quick)
    answering.start()
    assert ask_all({worker: {"op": "status", "n": 1}}, timeout=0.1) == {}
    time.sleep(0.5)  # the late answer to the first question arrives meanwhile
    assert ask_all({worker: {"op": "status", "n": 2}}, timeout=2.0) == {worker: {"id": 2, "n": 2}}
    answering.join(5)
    worker.close_link()
    theirs.close()


def test_metrics_folders_of_supervisors_that_are_gone_are_removed_at_start(tmp_path: Path) -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    folders = {
        "dead": tmp_path / f"mnist-serve-metrics-{dead.pid}-x1",
        "ours": tmp_path / f"mnist-serve-metrics-{os.getpid()}-x2",  # a previous life as pid 1 in a container
        "alive": tmp_path / f"mnist-serve-metrics-{os.getppid()}-x3",
        "other": tmp_path / "mnist-serve-metrics-notes",
    }
    for folder in folders.values():
        folder.mkdir()
    remove_stale_metrics_folders(tmp_path)
    assert sorted(name for name, folder in folders.items() if folder.exists()) == ["alive", "other"]


# --- the agreement inside one worker's repository -------------------------------------------------------


def test_a_worker_switches_to_an_agreed_default_at_the_agreed_instant_and_holds_the_old_one_until_then(
    tmp_path: Path,
) -> None:
    async def scenario() -> None:
        publish(tmp_path, 1, content=b"v1")
        repository = ModelRepository(FakeLoader(), tmp_path, grace=1)
        await repository.poll(settle=False)
        repository.propose_defaults(AgreedDefaults(1, {MODEL: "1"}, time.monotonic()))
        assert repository.resolve().version == "1"
        publish(tmp_path, 2, content=b"v2")
        await repository.poll(settle=False)
        # loaded and READY here, but the workers have not agreed: version 1 still answers and is not retired
        assert repository.local_defaults() == {MODEL: "2"}
        assert repository.resolve().version == "1" and repository.resolve(MODEL, "2").version == "2"
        repository.propose_defaults(AgreedDefaults(2, {MODEL: "2"}, time.monotonic() + 0.3))
        assert repository.resolve().version == "1"  # not before the agreed instant
        await asyncio.sleep(0.35)
        assert repository.resolve().version == "2"
        await repository.poll(settle=False)  # no agreement routes to version 1 any more: it is retired
        await asyncio.sleep(0.05)
        assert repository.ready_versions() == {MODEL: ["2"]}
        await repository.close()

    asyncio.run(scenario())


def test_a_rollback_by_removing_the_newest_version_is_agreed_although_the_agreement_holds_it(tmp_path: Path) -> None:
    """The version the workers agreed on is kept while they route to it, but it is no longer what a worker would
    choose once its folder is gone: the next agreement moves back, and then it is retired."""

    async def scenario() -> None:
        publish(tmp_path, 1, content=b"v1")
        publish(tmp_path, 2, content=b"v2")
        (tmp_path / MODEL / "config.pbtxt").write_text(f'name: "{MODEL}"\nversion_policy {{ all {{ }} }}\n')
        repository = ModelRepository(FakeLoader(), tmp_path, grace=1)
        await repository.poll(settle=False)
        repository.propose_defaults(AgreedDefaults(1, {MODEL: "2"}, time.monotonic()))
        assert repository.resolve().version == "2"
        shutil.rmtree(tmp_path / MODEL / "2")
        await repository.poll(settle=False)
        assert repository.resolve().version == "2"  # held: the other workers may still answer with it
        assert repository.local_defaults() == {MODEL: "1"} and repository.ready_versions() == {MODEL: ["1", "2"]}
        workers = [{MODEL: {"ready": ["1", "2"], "local": "1"}}] * 2
        repository.propose_defaults(AgreedDefaults(2, agree_defaults({MODEL: "2"}, workers), time.monotonic()))
        assert repository.resolve().version == "1"
        await repository.poll(settle=False)
        await asyncio.sleep(0.05)
        assert [s.version for s in repository.served()] == ["1"]
        await repository.close()

    asyncio.run(scenario())


# --- the supervisor and its workers, as processes ---------------------------------------------------------


class Workers(ServerProcess):
    """`mnist-serve --workers N` on the null engine, with /metrics, started and ready (every worker)."""

    def __init__(self, tmp_path: Path, count: int, *args: str, env: dict | None = None) -> None:
        self.metrics = free_port()
        super().__init__(
            ["--backend", "null", *args, "--workers", str(count)],
            metrics_port=self.metrics,
            log=tmp_path / "serve.log",
            env={"TMPDIR": str(tmp_path), **(env or {})},
        )
        self.tmp_path = tmp_path

    def start(self) -> Workers:
        super().start()
        deadline = time.monotonic() + 60
        while self.http("/readyz")[0] != 200:
            assert time.monotonic() < deadline, self.http("/readyz")
            time.sleep(0.1)
        return self

    def http(self, path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics}{path}", timeout=5) as reply:
                return reply.status, reply.read().decode()
        except urllib.error.HTTPError as err:
            return err.code, err.read().decode()
        except OSError as err:
            return 0, str(err)

    def metric(self, line_start: str) -> float:
        for line in self.http("/metrics")[1].splitlines():
            if line.startswith(line_start):
                return float(line.rsplit(" ", 1)[1])
        return 0.0

    def info_by_version(self) -> dict[str, float]:
        """mnist_model_info by version (the highest of its series, one per default="true"/"false"): 1 while served,
        0 once retired (a series cannot be removed across workers)."""
        info: dict[str, float] = {}
        for line in self.http("/metrics")[1].splitlines():
            if line.startswith("mnist_model_info{"):
                version = re.search(r'version="([^"]*)"', line).group(1)
                info[version] = max(info.get(version, 0.0), float(line.rsplit(" ", 1)[1]))
        return info

    def worker_pids(self) -> list[int]:
        pid = self.process.pid
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        return sorted(int(child) for child in children)

    def log_text(self) -> str:
        return (self.tmp_path / "serve.log").read_text()


def process_gone(pid: int) -> bool:
    """Reaped by the supervisor: every thread has exited and every descriptor is closed (a killed process whose main
    thread is already a zombie may still hold its listening socket while its other threads die)."""
    return not Path(f"/proc/{pid}").exists()


def classify_on_fresh_connections(target: str, calls: int) -> list[pb.ClassifyResponse]:
    """Each call on a connection of its own: the kernel picks the worker for every one. With the documented client
    service config (retries on UNAVAILABLE): a connection the kernel queued for a worker as it died is retried."""
    options = [("grpc.service_config", json.dumps(SERVICE_CONFIG)), ("grpc.enable_retries", 1)]
    answers = []
    for _ in range(calls):
        with grpc.insecure_channel(target, options=options) as channel:
            answers.append(pb_grpc.ClassifierStub(channel).Classify(pb.ClassifyRequest(raw=RAW), timeout=10))
    return answers


def requests_answered_by_each_worker(
    metrics_dir: Path, name: str = "mnist_requests_total", labels: dict | None = None
) -> dict[int, float]:
    """A counter (by default mnist_requests_total for Classify OK) read from each worker's own multiprocess file."""
    labels = {"method": "Classify", "code": "OK"} if labels is None else labels
    answered = {}
    for path in metrics_dir.glob("counter_*.db"):
        for metric in MultiProcessCollector.merge([str(path)]):
            for sample in metric.samples:
                if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                    answered[int(path.stem.split("_")[1])] = (
                        answered.get(int(path.stem.split("_")[1]), 0) + sample.value
                    )
    return answered


def test_two_workers_share_one_port_and_one_metrics_endpoint(tmp_path: Path) -> None:
    with Workers(tmp_path, 2) as server:
        pids = server.worker_pids()
        assert len(pids) == 2
        answers = classify_on_fresh_connections(server.target, 40)
        assert all(answer.digit in range(10) for answer in answers)
        # one /metrics for both: the calls of every worker, summed by prometheus_client's multiprocess mode
        assert server.metric('mnist_requests_total{code="OK",method="Classify"}') == 40
        assert server.metric("mnist_workers_ready") == 2 and server.metric("mnist_health_serving") == 1
        (metrics_dir,) = tmp_path.glob("mnist-serve-metrics-*")
        per_worker = requests_answered_by_each_worker(metrics_dir)
        assert sorted(per_worker) == pids and all(count > 0 for count in per_worker.values()), per_worker
        assert server.http("/livez")[0] == 200
    assert server.process.returncode == 0
    assert not list(tmp_path.glob("mnist-serve-metrics-*")), "the metrics folder outlived the server"


def test_a_killed_worker_is_started_again_while_the_other_keeps_answering(tmp_path: Path) -> None:
    with Workers(tmp_path, 2) as server:
        first, second = server.worker_pids()
        os.kill(first, signal.SIGKILL)
        while not process_gone(first):  # its sockets closed: the kernel sends new connections to the other only
            time.sleep(0.01)
        classify_on_fresh_connections(server.target, 10)  # the other worker answers meanwhile
        deadline = time.monotonic() + 60
        while server.metric("mnist_worker_restarts_total") < 1 or server.metric("mnist_workers_ready") < 2:
            assert time.monotonic() < deadline, server.log_text()[-3000:]
            time.sleep(0.2)
        pids = server.worker_pids()
        assert len(pids) == 2 and first not in pids and second in pids
        assert server.metric("mnist_worker_restarts_total") == 1 and server.http("/readyz")[0] == 200
        assert len(classify_on_fresh_connections(server.target, 10)) == 10
        assert "exited with status -9: starting it again" in server.log_text()


def test_sigterm_drains_every_worker_and_the_supervisor_exits_0(tmp_path: Path) -> None:
    """A call still running when SIGTERM arrives (300 ms of emulated device time) is answered; then all exit."""
    server = Workers(
        tmp_path, 2, "--backend", "null-threaded", "--null-device-ms", "300+0", "--drain-seconds", "0.5",
        "--grace-seconds", "5", "--log-level", "INFO",
    ).start()  # fmt: skip
    try:
        pids = server.worker_pids()
        with grpc.insecure_channel(server.target) as channel:
            running = pb_grpc.ClassifierStub(channel).Classify.future(pb.ClassifyRequest(raw=RAW), timeout=10)
            time.sleep(0.1)
            server.process.send_signal(signal.SIGTERM)
            assert running.result().digit in range(10)
            assert server.process.wait(30) == 0
        assert all(not Path(f"/proc/{pid}").exists() for pid in pids)
        log = server.log_text()
        assert log.count("mnist.serve: stopped") == 2 and "mnist.supervisor: stopped" in log
    finally:
        server.stop()


def test_a_worker_that_cannot_start_stops_the_whole_server_with_the_reason(tmp_path: Path) -> None:
    with socket.socket() as taken:  # a port held without SO_REUSEPORT: no worker can bind it
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run(
            [sys.executable, "-m", "server.app", "--backend", "null", "--host", "127.0.0.1", "--port", str(port),
             "--metrics-port", "0", "--http-port", "0", "--workers", "2"],
            capture_output=True, text=True, timeout=120, env={**os.environ, "TMPDIR": str(tmp_path)},
        )  # fmt: skip
    assert done.returncode == 2
    assert "before it was ready" in done.stderr and "cannot listen on" in done.stderr


def test_a_new_default_version_reaches_every_worker_at_once_never_new_then_old(tmp_path: Path) -> None:
    """Calls on many connections (spread over both workers) while version 2 is published: once any call has been
    answered by version 2, none is answered by version 1. Each worker polls the folder on its own, so without the
    supervisor's agreement the two would switch a poll apart and a client would see 1, 2, 1."""
    repository = tmp_path / "repository"
    publish(repository, 1, content=b"v1")
    with Workers(
        tmp_path, 2, "--model-repository", str(repository), "--repository-poll-seconds", "0.3", "--log-level", "INFO"
    ) as server:
        # a connection of its own for each channel (channels alike share one by default), added until the kernel has
        # given each worker some: 8 connections all land on one worker about once in a hundred runs
        (metrics_dir,) = tmp_path.glob("mnist-serve-metrics-*")
        channels: list[grpc.Channel] = []
        while len(channels) < 8 or len(requests_answered_by_each_worker(metrics_dir)) < 2:
            assert len(channels) < 64, requests_answered_by_each_worker(metrics_dir)
            channels.append(grpc.insecure_channel(server.target, [("grpc.use_local_subchannel_pool", 1)]))
            pb_grpc.ClassifierStub(channels[-1]).Classify(pb.ClassifyRequest(raw=RAW), timeout=10)
        stubs = [pb_grpc.ClassifierStub(channel) for channel in channels]
        seen: list[str] = []
        stop = threading.Event()

        def call_round_robin() -> None:
            turn = 0
            while not stop.is_set():
                answer = stubs[turn % len(stubs)].Classify(pb.ClassifyRequest(raw=RAW), timeout=10)
                seen.append(answer.model_version)
                turn += 1

        caller = threading.Thread(target=call_round_robin)
        caller.start()
        try:
            time.sleep(0.5)
            publish(repository, 2, content=b"v2")
            deadline = time.monotonic() + 30
            while "2" not in seen[-50:]:
                assert time.monotonic() < deadline, f"version 2 never served: {server.log_text()[-3000:]}"
                time.sleep(0.1)
            time.sleep(1.5)
        finally:
            stop.set()
            caller.join(30)
            for channel in channels:
                channel.close()
        first_new = seen.index("2")
        assert set(seen[:first_new]) == {"1"} and set(seen[first_new:]) == {"2"}, (first_new, seen[first_new:][:40])
        assert "default versions agreed by the workers" in server.log_text()
        per_worker = requests_answered_by_each_worker(metrics_dir)
        assert len(per_worker) == 2 and min(per_worker.values()) > 0, per_worker  # both workers took calls
        deadline = time.monotonic() + 10  # version 1, no longer routed to, is retired at a poll: its info reads 0
        while server.info_by_version() != {"1": 0.0, "2": 1.0}:
            assert time.monotonic() < deadline, server.info_by_version()
            time.sleep(0.2)


def test_the_workers_measurement_reports_each_count_with_every_workers_cpu(tmp_path: Path) -> None:
    out = tmp_path / "workers.json"
    done = subprocess.run(
        [sys.executable, "-m", "loadtest.processes", "--counts", "1,2", "--clients", "2", "--seconds", "1",
         "--json", str(out)],
        capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    assert [row["workers"] for row in rows] == [1, 2]
    assert all(row["calls"] > 0 and not row["errors"] and row["server_cpu_us_per_call"] > 0 for row in rows)
    assert len(rows[1]["cpu_share_per_worker"]) == 2 and "2 worker(s):" in done.stdout


def test_a_label_reaches_the_worker_that_gave_the_answer_whichever_worker_receives_it(tmp_path: Path) -> None:
    """Each worker remembers its own answers; the kernel spreads connections, so most labels arrive at a worker that
    did not answer: it asks the others (server/feedback/peers.py). 24 answers and 24 labels, each on a connection of
    its own: without that, about half the labels would be NOT_FOUND."""
    database = tmp_path / "feedback.db"
    ids = [f"label-me-{n}" for n in range(24)]
    with Workers(tmp_path, 2, "--feedback-db", str(database)) as server:
        answers = {}
        for request_id in ids:
            with grpc.insecure_channel(server.target) as channel:
                stub = pb_grpc.ClassifierStub(channel)
                answers[request_id] = stub.Classify(pb.ClassifyRequest(raw=RAW, request_id=request_id), timeout=10)
        (metrics_dir,) = tmp_path.glob("mnist-serve-metrics-*")
        gave = requests_answered_by_each_worker(metrics_dir)
        assert len(gave) == 2 and min(gave.values()) > 0, gave  # both workers answered some
        for request_id in ids:
            with grpc.insecure_channel(server.target) as channel:
                stub = pb_grpc.ClassifierStub(channel)
                taken = stub.Feedback(pb.FeedbackRequest(request_id=request_id, label=3), timeout=10)
                assert taken.prediction == str(answers[request_id].digit) and taken.stored, request_id
            with grpc.insecure_channel(server.target) as channel, pytest.raises(grpc.RpcError) as second:
                second_label = pb.FeedbackRequest(request_id=request_id, label=4)
                pb_grpc.ClassifierStub(channel).Feedback(second_label, timeout=10)  # wherever it lands: refused
            assert second.value.code() == grpc.StatusCode.ALREADY_EXISTS, request_id
            assert "already has a label (a different one)" in second.value.details()
        # each label was counted by the worker that gave its answer
        took = requests_answered_by_each_worker(metrics_dir, "mnist_feedback_total", {})
        assert took == gave, (took, gave)
        assert server.metric('mnist_feedback_refused_total{reason="unknown_request"}') == 0
    assert sorted(record.request_id for record in stored_records(database)) == sorted(ids)
    assert not list(tmp_path.glob("mnist-serve-peers-*")), "the workers' socket folder outlived the server"


def test_a_canary_trial_is_decided_on_every_workers_labels_and_moves_every_worker(tmp_path: Path) -> None:
    """Each worker routes its share of calls to the new version and counts the labels of its own answers; the
    supervisor sums them, decides once, and every worker's default moves together. Version 2 is labelled right and
    version 1 wrong; labels stop as soon as both versions have 12 (canary_min_labels) over both workers together:
    the promotion comes although, on one side at least, no worker alone has 12."""
    repository = tmp_path / "repository"
    publish(repository, 1, content=b"v1")
    config_pbtxt(
        repository,
        'parameters { key: "canary_share" value { string_value: "0.5" } }\n'
        'parameters { key: "canary_min_labels" value { string_value: "12" } }',
    )
    with Workers(
        tmp_path, 2, "--model-repository", str(repository), "--repository-poll-seconds", "0.2", "--log-level", "INFO"
    ) as server:
        (metrics_dir,) = tmp_path.glob("mnist-serve-metrics-*")
        publish(repository, 2, content=b"v2")
        started = f'mnist_canary_events_total{{event="STARTED",model="{MODEL}",version="2"}}'
        promoted = started.replace("STARTED", "PROMOTED")
        deadline = time.monotonic() + 30
        while server.metric(started) < 1:
            assert time.monotonic() < deadline, server.log_text()[-3000:]
            time.sleep(0.1)
        time.sleep(0.5)  # the other worker's poll: its trial too

        def labelled(version: str) -> dict[int, float]:
            return requests_answered_by_each_worker(metrics_dir, "mnist_feedback_total", {"version": version})

        for _ in range(300):
            if min(sum(labelled(version).values()) for version in ("1", "2")) >= 12:
                break
            with grpc.insecure_channel(server.target) as channel:
                stub = pb_grpc.ClassifierStub(channel)
                answer = stub.Classify(pb.ClassifyRequest(raw=RAW), timeout=10)
                label = answer.digit if answer.model_version == "2" else (answer.digit + 1) % 10
                stub.Feedback(pb.FeedbackRequest(request_id=answer.request_id, label=label), timeout=10)
        per_worker = {version: labelled(version) for version in ("1", "2")}
        assert min(max(counts.values()) for counts in per_worker.values()) < 12, per_worker  # no worker alone
        deadline = time.monotonic() + 10
        while server.metric(promoted) < 1:
            assert time.monotonic() < deadline, (per_worker, server.log_text()[-3000:])
            time.sleep(0.1)
        assert server.metric(promoted) == 1 and server.metric(started) == 1  # counted once, by the supervisor
        assert "version 2 PROMOTED on the labels of 2 worker(s)" in server.log_text()
        deadline = time.monotonic() + 15  # the supervisor's agreement: every worker moves to version 2
        while {answer.model_version for answer in classify_on_fresh_connections(server.target, 16)} != {"2"}:
            assert time.monotonic() < deadline, server.log_text()[-3000:]


def stored_records(database: Path) -> list:
    from server.feedback.store import open_store

    store = open_store(str(database))
    try:
        return list(store.records())
    finally:
        store.close()


def test_the_http_api_is_served_by_every_worker_on_one_port(tmp_path: Path) -> None:
    """REST (/v2) binds the one HTTP port with SO_REUSEPORT too: fresh connections reach both workers."""
    http_port = free_port()
    with Workers(tmp_path, 2, "--http-port", str(http_port)) as server:
        tensor = {"name": "image", "datatype": "UINT8", "shape": [1, 28, 28], "data": list(RAW)}
        body = json.dumps({"inputs": [tensor]}).encode()
        models = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{http_port}/v2", timeout=5).read())
        for _ in range(30):  # urllib opens a connection per request
            request = urllib.request.Request(
                f"http://127.0.0.1:{http_port}/v2/models/{server.info['name']}/infer",
                body,
                {"Content-Type": "application/json"},
            )
            with urllib.request.urlopen(request, timeout=10) as reply:
                outputs = {o["name"]: o for o in json.loads(reply.read())["outputs"]}
                assert outputs["digit"]["data"][0] in range(10)
        assert models["name"] and server.http("/readyz")[0] == 200
        (metrics_dir,) = tmp_path.glob("mnist-serve-metrics-*")
        answered = requests_answered_by_each_worker(metrics_dir, "mnist_model_requests_total", {"code": "OK"})
        assert sorted(answered) == server.worker_pids() and min(answered.values()) > 0, answered
        assert sum(answered.values()) == 30
