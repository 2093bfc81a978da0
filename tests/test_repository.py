"""Models as a repository: versions chosen per request, hot reload with zero failed calls, refusal of bad files."""

from __future__ import annotations

import asyncio
import os
import shutil
import threading
import time
from collections import Counter
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2

from proto.inference import grpc_service_pb2 as oip
from proto.inference import grpc_service_pb2_grpc as oip_grpc
from proto.mnist.v1 import classifier_pb2 as pb
from server.app import MnistServer
from server.config import BUNDLED_MODEL
from server.errors import NotFound
from server.models.repository import FAILED, LOADING, READY, UNLOADING, ModelRepository, scan_repository
from tests.support import Harness, test_config
from training.data import load_split

MODEL = "googlenet-fast"
SERVING = health_pb2.HealthCheckResponse.SERVING


def publish(repository: Path, version: int, model: str = MODEL, content: bytes | None = None) -> Path:
    """A version folder written the way mnist-export --publish writes it: staged, then renamed in one step."""
    staging = repository / model / f".staging-{version}"
    staging.mkdir(parents=True)
    if content is None:
        shutil.copyfile(BUNDLED_MODEL, staging / "model.onnx")
    else:
        (staging / "model.onnx").write_bytes(content)
    os.rename(staging, repository / model / str(version))
    return repository / model / str(version)


def config_pbtxt(repository: Path, text: str, model: str = MODEL) -> None:
    path = repository / model / "config.pbtxt"
    path.write_text(f'name: "{model}"\n{text}\n')
    os.utime(path)


# --- the folder: which versions a model's policy selects ----------------------------------------------


def test_the_default_policy_is_the_latest_version_and_other_folders_are_ignored(tmp_path: Path) -> None:
    for version in (1, 2, 10):
        publish(tmp_path, version)
    (tmp_path / MODEL / "notes").mkdir()
    (tmp_path / MODEL / "3").mkdir()  # no model.onnx yet
    (tmp_path / ".trash").mkdir()
    spec = scan_repository(tmp_path)[MODEL]
    assert list(spec.versions) == ["10"] and spec.default_version == "" and not spec.problem
    assert list(scan_repository(tmp_path)) == [MODEL]


@pytest.mark.parametrize(
    ("policy", "versions"),
    [
        ("version_policy { latest { num_versions: 2 } }", ["2", "10"]),
        ("version_policy { all { } }", ["1", "2", "10"]),
        ("version_policy { specific { versions: [1, 10] } }", ["1", "10"]),
    ],
)
def test_a_version_policy_in_config_pbtxt_selects_versions_as_in_triton(tmp_path, policy, versions) -> None:
    for version in (1, 2, 10):
        publish(tmp_path, version)
    config_pbtxt(tmp_path, policy + '\nparameters { key: "default_version" value { string_value: "2" } }')
    spec = scan_repository(tmp_path)[MODEL]
    assert list(spec.versions) == versions and spec.default_version == "2"


def test_an_unreadable_config_is_a_problem_named_not_a_crash(tmp_path: Path) -> None:
    publish(tmp_path, 1)
    config_pbtxt(tmp_path, "version_policy { latest { num_versions: two } }")
    assert "not a valid model configuration" in scan_repository(tmp_path)[MODEL].problem


# --- the repository's logic, with stand-in pipelines ----------------------------------------------------


class FakePipeline:
    def __init__(self, name: str, version: str) -> None:
        self.name, self.version = name, version
        self.closed = False

    async def close(self, timeout: float | None = None) -> None:
        self.closed = True


class FakeLoader:
    """Loads instantly, or waits for a gate; fails for files whose content is b'broken'."""

    def __init__(self) -> None:
        self.gates: dict[str, asyncio.Event] = {}
        self.loaded: list[str] = []

    async def __call__(self, name: str | None, version: str | None, path: Path) -> FakePipeline:
        if version in self.gates:
            await self.gates[version].wait()
        if path.read_bytes() == b"broken":
            raise ValueError(f"{path} is not an ONNX model")
        self.loaded.append(version)
        return FakePipeline(name, version)


def run(coroutine):
    return asyncio.run(coroutine)


def test_a_new_version_takes_no_request_before_it_is_ready(tmp_path: Path) -> None:
    async def scenario() -> None:
        publish(tmp_path, 1, content=b"v1")
        loader = FakeLoader()
        repository = ModelRepository(loader, tmp_path, grace=1)
        await repository.poll(settle=False)
        publish(tmp_path, 2, content=b"v2")
        loader.gates["2"] = asyncio.Event()
        polling = asyncio.ensure_future(repository.poll(settle=False))
        await asyncio.sleep(0.05)
        assert [(s.version, s.state) for s in repository.statuses()] == [("1", READY), ("2", LOADING)]
        assert repository.resolve(MODEL).version == "1"  # requests keep going to the ready version
        with pytest.raises(NotFound, match="no version '2' ready .it is LOADING"):
            repository.resolve(MODEL, "2")
        loader.gates["2"].set()
        await polling
        assert repository.resolve(MODEL).version == "2"
        assert [(s.version, s.state) for s in repository.statuses()] == [("1", UNLOADING), ("2", READY)]
        await asyncio.sleep(0.01)  # nothing holds version 1: it is closed at once
        assert [(s.version, s.state) for s in repository.statuses()] == [("2", READY)]
        await repository.close()

    run(scenario())


def test_calls_are_refused_unread_only_while_one_version_is_the_whole_server(tmp_path: Path) -> None:
    """A refusal decided before a call's message is read applies to whatever the call names: so only while one
    version is served, as its model's default."""

    async def scenario() -> None:
        publish(tmp_path, 1, content=b"v1")
        repository = ModelRepository(FakeLoader(), tmp_path, grace=1)
        await repository.poll(settle=False)
        assert repository.sole_version().version == "1"
        config_pbtxt(tmp_path, "version_policy: { specific: { versions: [1, 2] } }")
        publish(tmp_path, 2, content=b"v2")
        await repository.poll(settle=False)
        assert [s.version for s in repository.served()] == ["1", "2"]
        assert repository.sole_version() is None  # a call may name either version
        config_pbtxt(tmp_path, "version_policy: { latest: { num_versions: 1 } }")
        await repository.poll(settle=False)
        await asyncio.sleep(0.05)  # version 1, retired, closes
        assert repository.sole_version().version == "2"
        publish(tmp_path, 1, model="other", content=b"o1")
        await repository.poll(settle=False)
        assert repository.sole_version() is None  # a call may name either model
        await repository.close()
        assert repository.sole_version() is None

    run(scenario())


def test_a_retired_version_is_closed_only_after_the_requests_holding_it(tmp_path: Path) -> None:
    async def scenario() -> None:
        publish(tmp_path, 1, content=b"v1")
        repository = ModelRepository(FakeLoader(), tmp_path, grace=5)
        await repository.poll(settle=False)
        with repository.lease(MODEL) as held:
            publish(tmp_path, 2, content=b"v2")
            await repository.poll(settle=False)
            assert repository.resolve(MODEL).version == "2"
            await asyncio.sleep(0.05)
            assert not held.pipeline.closed  # a request still uses it
        await asyncio.sleep(0.05)
        assert held.pipeline.closed
        await repository.close()

    run(scenario())


def test_a_file_that_fails_to_load_never_serves_and_is_retried_only_once_changed(tmp_path: Path) -> None:
    async def scenario() -> None:
        publish(tmp_path, 1, content=b"v1")
        loader = FakeLoader()
        repository = ModelRepository(loader, tmp_path, grace=1)
        await repository.poll(settle=False)
        publish(tmp_path, 2, content=b"broken")
        await repository.poll(settle=False)
        statuses = {s.version: s for s in repository.statuses()}
        assert statuses["2"].state == FAILED and "not an ONNX model" in statuses["2"].reason
        assert statuses["1"].state == READY and repository.resolve(MODEL).version == "1"
        await repository.poll(settle=False)
        assert loader.loaded == ["1"]  # the same broken file is not tried again
        (tmp_path / MODEL / "2" / "model.onnx").write_bytes(b"v2 fixed")
        await repository.poll(settle=False)
        assert repository.resolve(MODEL).version == "2" and loader.loaded == ["1", "2"]
        await repository.close()

    run(scenario())


def test_rollback_by_default_version_then_by_removing_the_new_version(tmp_path: Path) -> None:
    async def scenario() -> None:
        publish(tmp_path, 1, content=b"v1")
        publish(tmp_path, 2, content=b"v2")
        config_pbtxt(tmp_path, "version_policy { latest { num_versions: 2 } }")
        repository = ModelRepository(FakeLoader(), tmp_path, grace=1)
        await repository.poll(settle=False)
        assert repository.resolve(MODEL).version == "2"
        config_pbtxt(
            tmp_path,
            'version_policy { latest { num_versions: 2 } }\nparameters { key: "default_version" value { '
            'string_value: "1" } }',
        )
        await repository.poll(settle=False)
        assert repository.resolve(MODEL).version == "1" and repository.resolve(MODEL, "2").version == "2"
        config_pbtxt(tmp_path, "version_policy { latest { num_versions: 2 } }")
        shutil.rmtree(tmp_path / MODEL / "2")
        await repository.poll(settle=False)
        assert repository.resolve(MODEL).version == "1"
        with pytest.raises(NotFound, match="available: '1'"):
            repository.resolve(MODEL, "2")
        await repository.close()

    run(scenario())


def test_an_operator_unload_holds_until_an_explicit_load(tmp_path: Path) -> None:
    async def scenario() -> None:
        publish(tmp_path, 1, content=b"v1")
        publish(tmp_path, 1, model="other", content=b"o1")
        repository = ModelRepository(FakeLoader(), tmp_path, grace=1)
        await repository.poll(settle=False)
        assert repository.default_model == MODEL  # the first by name when several are served
        await repository.unload_model(MODEL)
        await repository.poll(settle=False)
        with pytest.raises(NotFound, match="no model named 'googlenet-fast'; this server serves 'other'"):
            repository.resolve(MODEL)
        await repository.load_model(MODEL)
        assert repository.resolve(MODEL).version == "1"
        await repository.close()

    run(scenario())


# --- the server: a real repository of the bundled model ---------------------------------------------------


@pytest.fixture
def repository(tmp_path: Path) -> Path:
    publish(tmp_path, 1)
    publish(tmp_path, 2)
    config_pbtxt(tmp_path, "version_policy { latest { num_versions: 2 } }")
    return tmp_path


@pytest.fixture
def served_repository(repository: Path):
    config = test_config(model_repository=str(repository), repository_poll_seconds=0.1, model_control="on")
    harness = Harness(MnistServer(config).start())
    harness.oip = oip_grpc.GRPCInferenceServiceStub(harness.channel)
    yield harness
    harness.close()


@pytest.fixture(scope="module")
def digits(mnist_dir: Path):
    test = load_split("test", mnist_dir)
    return test.images[:32], test.labels[:32]


def test_requests_choose_a_version_and_an_unknown_one_names_those_served(served_repository, digits) -> None:
    stub, raw = served_repository.stub, digits[0][0].tobytes()
    assert stub.Classify(pb.ClassifyRequest(raw=raw), timeout=10).model_version == "2"  # the newest by default
    assert stub.Classify(pb.ClassifyRequest(raw=raw, model_version="1"), timeout=10).model_version == "1"
    batch = pb.ClassifyBatchRequest(requests=[pb.ClassifyRequest(raw=raw)] * 2, model_name=MODEL, model_version="1")
    assert [r.model_version for r in stub.ClassifyBatch(batch, timeout=10).responses] == ["1", "1"]
    with pytest.raises(grpc.RpcError) as error:
        stub.Classify(pb.ClassifyRequest(raw=raw, model_version="7"), timeout=10)
    assert error.value.code() == grpc.StatusCode.NOT_FOUND and "available: '1', '2'" in error.value.details()
    with pytest.raises(grpc.RpcError) as error:
        stub.Classify(pb.ClassifyRequest(raw=raw, model_name="resnet"), timeout=10)
    assert error.value.code() == grpc.StatusCode.NOT_FOUND and "serves 'googlenet-fast'" in error.value.details()
    info = stub.GetModelInfo(pb.GetModelInfoRequest(model_version="1"), timeout=10)
    assert (info.name, info.version) == (MODEL, "1")
    listed = stub.ListModels(pb.ListModelsRequest(), timeout=10)
    assert [(m.name, m.version, m.state, m.is_default) for m in listed.models] == [
        (MODEL, "1", READY, False),
        (MODEL, "2", READY, True),
    ]
    assert listed.default_model == MODEL and all(m.load_seconds > 0 for m in listed.models)
    assert served_repository.oip.ModelReady(oip.ModelReadyRequest(name=MODEL, version="1")).ready
    assert not served_repository.oip.ModelReady(oip.ModelReadyRequest(name=MODEL, version="3")).ready
    assert served_repository.health_status(MODEL) == SERVING


def wait_for(condition, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def default_version(harness: Harness) -> str:
    return next(m.version for m in harness.stub.ListModels(pb.ListModelsRequest(), timeout=5).models if m.is_default)


def test_three_swaps_under_a_steady_stream_fail_no_call(served_repository, repository: Path, digits) -> None:
    images, _ = digits
    expected = [
        served_repository.stub.Classify(pb.ClassifyRequest(raw=image.tobytes()), timeout=10).digit for image in images
    ]
    stop = threading.Event()
    answers: Counter[str] = Counter()
    failures: list[str] = []
    order: list[list[str]] = []

    def client(worker: int) -> None:
        seen: list[str] = []
        i = worker
        while not stop.is_set():
            try:
                reply = served_repository.stub.Classify(pb.ClassifyRequest(raw=images[i % 32].tobytes()), timeout=10)
            except grpc.RpcError as err:
                failures.append(f"{err.code().name}: {err.details()}")
                continue
            if reply.digit != expected[i % 32]:  # every version is the bundled model: the same answers
                failures.append(f"digit {reply.digit} from version {reply.model_version}, not {expected[i % 32]}")
            answers[reply.model_version] += 1
            if not seen or seen[-1] != reply.model_version:
                seen.append(reply.model_version)
            i += 4
        order.append(seen)

    clients = [threading.Thread(target=client, args=(w,)) for w in range(4)]
    for thread in clients:
        thread.start()
    try:
        for version in (3, 4, 5):
            time.sleep(0.4)
            publish(repository, version)
            wait_for(lambda v=version: default_version(served_repository) == str(v))
        time.sleep(0.4)
    finally:
        stop.set()
        for thread in clients:
            thread.join(10)
    assert failures == []
    assert set(answers) <= {"2", "3", "4", "5"} and answers["5"] > 0, answers
    for seen in order:  # each client moved forward through the versions, never back to a retired one
        assert seen == sorted(seen, key=int), seen
    # the policy keeps the latest two: the older versions drained and were unloaded
    wait_for(
        lambda: [m.version for m in served_repository.stub.ListModels(pb.ListModelsRequest()).models] == ["4", "5"]
    )


def test_a_corrupt_version_is_refused_and_the_previous_one_keeps_serving(served_repository, repository, digits) -> None:
    publish(repository, 3, content=b"\x08\x07 not a model at all")

    def failed() -> list:
        return [
            m for m in served_repository.stub.ListModels(pb.ListModelsRequest(), timeout=5).models if m.state == FAILED
        ]

    wait_for(lambda: failed())
    (status,) = failed()
    assert status.version == "3" and status.reason
    assert default_version(served_repository) == "2"
    reply = served_repository.stub.Classify(pb.ClassifyRequest(raw=digits[0][0].tobytes()), timeout=10)
    assert reply.model_version == "2"
    metrics = served_repository.metrics()
    assert metrics[f'mnist_model_load_failures_total{{model="{MODEL}",version="3"}}'] == 1
    assert metrics[f'mnist_model_versions{{model="{MODEL}",state="FAILED"}}'] == 1
    assert served_repository.health_status(MODEL) == SERVING


def test_a_model_that_loads_but_misreads_the_stored_digits_is_refused(served_repository, repository) -> None:
    """A file that is a valid ONNX model but computes nonsense: the verification on stored digits stops it."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(BUNDLED_MODEL))
    for initializer in model.graph.initializer:  # same graph, scrambled weights
        weights = numpy_helper.to_array(initializer)
        if weights.dtype == np.float32 and weights.size > 100:
            scrambled = np.random.default_rng(0).permutation(weights.ravel()).reshape(weights.shape)
            initializer.CopyFrom(numpy_helper.from_array(scrambled, initializer.name))
    publish(repository, 3, content=model.SerializeToString())
    wait_for(lambda: any(m.state == FAILED for m in served_repository.stub.ListModels(pb.ListModelsRequest()).models))
    (status,) = [m for m in served_repository.stub.ListModels(pb.ListModelsRequest()).models if m.state == FAILED]
    assert "verification" in status.reason and default_version(served_repository) == "2"


def test_explicit_unload_and_load_through_the_open_inference_protocol(served_repository) -> None:
    stub = served_repository.oip
    stub.RepositoryModelUnload(oip.RepositoryModelUnloadRequest(model_name=MODEL), timeout=10)
    wait_for(lambda: not stub.ModelReady(oip.ModelReadyRequest(name=MODEL)).ready)
    with pytest.raises(grpc.RpcError) as error:
        served_repository.stub.Classify(pb.ClassifyRequest(raw=bytes(range(256)) * 3 + bytes(16)), timeout=10)
    assert error.value.code() == grpc.StatusCode.UNAVAILABLE and "unloaded" in error.value.details()
    stub.RepositoryModelLoad(oip.RepositoryModelLoadRequest(model_name=MODEL), timeout=30)
    assert stub.ModelReady(oip.ModelReadyRequest(name=MODEL)).ready
    index = stub.RepositoryIndex(oip.RepositoryIndexRequest(ready=True), timeout=5)
    assert [(m.name, m.version) for m in index.models] == [(MODEL, "1"), (MODEL, "2")]


def test_model_control_is_off_unless_enabled(repository: Path) -> None:
    harness = Harness(MnistServer(test_config(model_repository=str(repository), repository_poll_seconds=0)).start())
    try:
        stub = oip_grpc.GRPCInferenceServiceStub(harness.channel)
        with pytest.raises(grpc.RpcError) as error:
            stub.RepositoryModelUnload(oip.RepositoryModelUnloadRequest(model_name=MODEL), timeout=10)
        assert error.value.code() == grpc.StatusCode.UNIMPLEMENTED and "--model-control on" in error.value.details()
    finally:
        harness.close()


def test_a_repository_with_nothing_servable_stops_the_start_with_the_reason(tmp_path: Path) -> None:
    publish(tmp_path, 1, content=b"garbage")
    server = MnistServer(test_config(model_repository=str(tmp_path)))
    with pytest.raises(RuntimeError, match="no model in .* could be served .*googlenet-fast 1"):
        server.start()


def test_mnist_classify_lists_models_and_asks_a_chosen_version(served_repository, capsys) -> None:
    from server.client import main

    target = f"127.0.0.1:{served_repository.server.port}"
    assert main(["--server", target, "--list-models"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(",")[0] for line in lines] == [f"{MODEL} 1 READY", f"{MODEL} 2 READY (default)"]
    seven = Path(__file__).resolve().parents[1] / "server" / "samples" / "seven.png"
    assert main(["--server", target, "--model-version", "1", str(seven)]) == 0
    assert capsys.readouterr().out.strip().endswith("certainty (version 1)")


# --- what a careless or unlucky operator does to the folder ---------------------------------------------


def test_a_file_still_being_written_is_loaded_once_it_holds_still_for_a_poll(tmp_path: Path) -> None:
    async def scenario() -> None:
        publish(tmp_path, 1, content=b"v1")
        loader = FakeLoader()
        repository = ModelRepository(loader, tmp_path, grace=1)
        await repository.poll()  # the first poll (at start) loads what it finds
        (tmp_path / MODEL / "2").mkdir()
        (tmp_path / MODEL / "2" / "model.onnx").write_bytes(b"half")
        await repository.poll()
        assert loader.loaded == ["1"]  # seen once: it may still be growing
        (tmp_path / MODEL / "2" / "model.onnx").write_bytes(b"half, now whole")
        await repository.poll()
        assert loader.loaded == ["1"]  # it changed since: wait again
        await repository.poll()
        assert loader.loaded == ["1", "2"] and repository.resolve(MODEL).version == "2"
        await repository.close()

    run(scenario())


def test_odd_folders_and_a_policy_that_selects_nothing_never_stop_serving(tmp_path: Path) -> None:
    async def scenario() -> None:
        publish(tmp_path, 1, content=b"v1")
        (tmp_path / MODEL / "²").mkdir()  # a digit to Python, not a version
        (tmp_path / MODEL / "²" / "model.onnx").write_bytes(b"x")
        loader = FakeLoader()
        repository = ModelRepository(loader, tmp_path, grace=1)
        await repository.poll(settle=False)
        assert repository.resolve(MODEL).version == "1"
        config_pbtxt(tmp_path, "version_policy { specific { versions: [7] } }")
        for _ in range(3):
            await repository.poll(settle=False)
        assert repository.resolve(MODEL).version == "1"  # kept serving
        (status,) = [s for s in repository.statuses() if s.state == FAILED]
        assert status.version == "" and "selects none of the versions present (1)" in status.reason
        await repository.close()

    run(scenario())


def test_a_broken_config_is_reported_once_not_at_every_poll(tmp_path: Path) -> None:
    from server.models.repository import RepositoryObserver

    class Failures(RepositoryObserver):
        def __init__(self) -> None:
            self.reported: list[tuple[str, str]] = []

        def on_failed(self, name: str, version: str, reason: str) -> None:
            self.reported.append((name, version))

    async def scenario(observer: Failures) -> None:
        publish(tmp_path, 1, content=b"v1")
        repository = ModelRepository(FakeLoader(), tmp_path, observer, grace=1)
        await repository.poll(settle=False)
        config_pbtxt(tmp_path, "version_policy { latest { num_versions: two } }")
        for _ in range(4):
            await repository.poll(settle=False)
        assert repository.resolve(MODEL).version == "1"
        await repository.close()

    observer = Failures()
    run(scenario(observer))
    assert observer.reported == [(MODEL, "")]


def test_a_failed_version_whose_folder_is_removed_is_forgotten(tmp_path: Path) -> None:
    async def scenario() -> None:
        publish(tmp_path, 1, content=b"v1")
        publish(tmp_path, 2, content=b"broken")
        config_pbtxt(tmp_path, "version_policy { latest { num_versions: 2 } }")
        repository = ModelRepository(FakeLoader(), tmp_path, grace=1)
        await repository.poll(settle=False)
        assert [(s.version, s.state) for s in repository.statuses()] == [("1", READY), ("2", FAILED)]
        shutil.rmtree(tmp_path / MODEL / "2")
        await repository.poll(settle=False)
        assert [(s.version, s.state) for s in repository.statuses()] == [("1", READY)]
        await repository.close()

    run(scenario())


def test_overlapping_unloads_and_loads_end_as_the_last_one_asked(tmp_path: Path) -> None:
    async def scenario() -> None:
        publish(tmp_path, 1, content=b"v1")
        loader = FakeLoader()
        repository = ModelRepository(loader, tmp_path, grace=1)
        await repository.poll(settle=False)
        loader.gates["1"] = asyncio.Event()  # the reload below takes a while
        first = asyncio.ensure_future(repository.unload_model(MODEL))
        second = asyncio.ensure_future(repository.load_model(MODEL))
        await asyncio.sleep(0.01)
        third = asyncio.ensure_future(repository.unload_model(MODEL))
        fourth = asyncio.ensure_future(repository.load_model(MODEL))
        await asyncio.sleep(0.01)
        loader.gates["1"].set()
        await asyncio.gather(first, second, third, fourth)
        assert repository.resolve(MODEL).version == "1"
        await repository.close()

    run(scenario())


def test_an_explicit_load_says_when_the_file_fails_and_names_must_be_folders(tmp_path: Path) -> None:
    from server.errors import InvalidInput

    async def scenario() -> None:
        publish(tmp_path, 1, content=b"v1")
        repository = ModelRepository(FakeLoader(), tmp_path, grace=1)
        await repository.poll(settle=False)
        (tmp_path / MODEL / "1" / "model.onnx").write_bytes(b"broken")
        with pytest.raises(NotFound, match="could not be loaded: a newer file failed to load: .* not an ONNX model"):
            await repository.load_model(MODEL)
        assert repository.resolve(MODEL).version == "1"  # the loaded one keeps serving
        for name in ("", "..", ".hidden", "a/b", "../etc"):
            with pytest.raises(InvalidInput, match="not a model name"):
                await repository.load_model(name)
        await repository.unload_model(MODEL)
        assert (MODEL, "", "UNAVAILABLE") in [(s.name, s.version, s.state) for s in repository.statuses()]
        await repository.close()

    run(scenario())


# --- each model's own settings, from its config.pbtxt ----------------------------------------------------------


def test_config_pbtxt_settings_are_read_as_triton_writes_them_and_bad_ones_are_named(tmp_path: Path) -> None:
    publish(tmp_path, 1)
    config_pbtxt(
        tmp_path,
        "max_batch_size: 8\ndynamic_batching { max_queue_delay_microseconds: 2500 }\n"
        "instance_group [ { count: 1 kind: KIND_CPU } ]\n"
        'parameters { key: "cudnn_conv_algo_search" value { string_value: "1" } }\n'
        'parameters { key: "precision" value { string_value: "FP32" } }',
    )
    settings = scan_repository(tmp_path)[MODEL].settings
    assert settings.overrides() == {
        "max_batch_size": 8,
        "max_queue_delay_ms": 2.5,
        "provider": "cpu",
        "precision": "fp32",
        "cudnn_conv_algo_search": "HEURISTIC",  # Triton's ONNX Runtime backend reads 1 as the heuristic search
    }
    config_pbtxt(tmp_path, 'parameters { key: "layout" value { string_value: "sideways" } }')
    spec = scan_repository(tmp_path)[MODEL]
    assert "parameter layout must be one of auto, nchw, nhwc, not 'sideways'" in spec.problem
    config_pbtxt(tmp_path, "version_policy { latest { num_versions: 1 } }")  # no settings: the flags decide
    assert scan_repository(tmp_path)[MODEL].settings.overrides() == {}


def test_two_models_with_different_batch_settings_are_served_side_by_side(tmp_path: Path, digits) -> None:
    """Each model is batched as its own config.pbtxt says; the flags are only the defaults."""
    publish(tmp_path, 1, model="small-batches")
    config_pbtxt(
        tmp_path,
        "max_batch_size: 4\ndynamic_batching { max_queue_delay_microseconds: 3000 }",
        model="small-batches",
    )
    publish(tmp_path, 1, model="flag-defaults")
    config = test_config(model_repository=str(tmp_path), max_batch_size=16, max_queue_delay_ms=0.0)
    harness = Harness(MnistServer(config).start())
    try:
        stub = oip_grpc.GRPCInferenceServiceStub(harness.channel)
        small = stub.ModelConfig(oip.ModelConfigRequest(name="small-batches"), timeout=5).config
        default = stub.ModelConfig(oip.ModelConfigRequest(name="flag-defaults"), timeout=5).config
        assert (small.max_batch_size, small.dynamic_batching.max_queue_delay_microseconds) == (4, 3000)
        assert (default.max_batch_size, default.dynamic_batching.max_queue_delay_microseconds) == (16, 0)
        assert small.backend == default.backend == "onnxruntime"  # what the engine reports, not a constant
        assert small.parameters["device"].string_value == "CPU"
        batchers = {s.name: s.pipeline.batcher for s in harness.server.models.served()}
        assert (batchers["small-batches"].max_batch_size, batchers["small-batches"].max_queue_delay) == (4, 0.003)
        assert (batchers["flag-defaults"].max_batch_size, batchers["flag-defaults"].max_queue_delay) == (16, 0.0)
        images, labels = digits
        for model in ("small-batches", "flag-defaults"):  # both answer, each through its own batcher
            batch = pb.ClassifyBatchRequest(
                model_name=model, requests=[pb.ClassifyRequest(raw=image.tobytes()) for image in images[:10]]
            )
            answers = harness.stub.ClassifyBatch(batch, timeout=30).responses
            assert [a.digit for a in answers] == list(labels[:10])
    finally:
        harness.close()


def test_a_setting_the_engine_cannot_use_fails_that_model_only(tmp_path: Path) -> None:
    publish(tmp_path, 1, model="broken")
    config_pbtxt(
        tmp_path, 'max_batch_size: 4\nparameters { key: "batch_buckets" value { string_value: "1,8" } }', "broken"
    )
    publish(tmp_path, 1, model="fine")
    harness = Harness(MnistServer(test_config(model_repository=str(tmp_path))).start())
    try:
        statuses = {(s.name, s.version): s for s in harness.server.models.statuses()}
        assert statuses[("fine", "1")].state == READY
        broken = statuses[("broken", "1")]
        assert broken.state == FAILED and "max_batch_size 4 is under the largest batch bucket 8" in broken.reason
    finally:
        harness.close()
