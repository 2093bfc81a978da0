"""The ONNX Runtime backend's GPU-only branches, driven without a GPU.

`StandInGpu` plays the CUDA provider with the CPU one: `cuda_usable` says yes, every session is a real CPU session
that says CUDA runs it, OrtValues asked for on device "cuda" live in CPU memory, and everything the backend asks for
(providers, their options, devices) is recorded. It fails the way a GPU does when told to: a session that cannot be
built (with a CUDA graph or at all), ONNX Runtime quietly leaving CUDA out, a bucket that answers wrongly.
"""

from __future__ import annotations

import logging
import threading
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest

from proto.contract import BATCH_AXIS, DIGIT_SCORE, INPUT_SHAPE, MNIST_NORMALIZATION, NUM_CLASSES, variant_path
from server.config import BUNDLED_MODEL
from server.engine.backends import onnxruntime_backend
from server.engine.backends.base import BackendUnavailable
from server.engine.backends.buckets import powers_of_two
from server.engine.backends.onnxruntime_backend import CPU, CUDA, OnnxRuntimeBackend, resolve_plan
from tests.support import RecordingBinding, RecordingSession
from training.data import load_split

FP16_MODEL = variant_path(BUNDLED_MODEL, "fp16")
LOGGER = "mnist.backend.onnxruntime"
GUARD_S = 60.0  # how long a thread waits for its next step before the test calls it a deadlock: never a timing

Fault = Callable[[dict[str, ort.OrtValue]], None]  # done to a session's bound outputs after each IO-bound run


@dataclass(frozen=True)
class Build:
    """One session the backend asked the stand-in for."""

    version: str  # which backend asked (the factory's label)
    model: Path
    bucket: int | str  # the fixed batch size, or the batch axis' name for a session that takes any size
    providers: tuple[str, ...]  # the providers asked for, in order
    cuda_options: dict[str, str] | None  # the CUDA provider's options; None when only the CPU was asked for
    intra_op_threads: int

    @property
    def graph(self) -> bool:
        return self.cuda_options is not None and self.cuda_options["enable_cuda_graph"] == "1"


class StandInSession(RecordingSession):
    """A real CPU session that reports the providers the stand-in says, and tells the stand-in of each IO-bound run."""

    def __init__(self, session: ort.InferenceSession, build: Build, providers_in_use: list[str], gpu: StandInGpu):
        super().__init__(session)
        self.build, self.providers_in_use, self.gpu = build, providers_in_use, gpu

    def get_providers(self) -> list[str]:
        return list(self.providers_in_use)

    def run_with_iobinding(self, binding: RecordingBinding, run_options: Any = None) -> None:
        self.gpu.record(self.build, "run")
        self.gpu.during_run(self)
        super().run_with_iobinding(binding, run_options)
        self.gpu.record(self.build, "run done")


class StandInGpu:
    """The CUDA provider played by the CPU one; set the attributes below to make it fail as a GPU would."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.builds: list[Build] = []  # every session asked for, built or refused
        self.allocations: list[tuple[tuple[int, ...], str]] = []  # every OrtValue allocated: shape, device asked for
        self.events: list[str] = []  # runs and releases, in order: "<version> bucket <n>: run | run done | released"
        self.alive: weakref.WeakSet[StandInSession] = weakref.WeakSet()
        self.fails_to_build: Callable[[Build], bool] = lambda build: False  # the CUDA provider cannot start it
        self.quietly_on_cpu: Callable[[Build], bool] = lambda build: False  # built, but CUDA left out of it
        self.faults: dict[int, Fault] = {}  # bucket -> how its sessions (graph or not) answer wrongly
        self.graph_faults: dict[int, Fault] = {}  # bucket -> how its sessions with a CUDA graph answer wrongly
        self.during_run: Callable[[StandInSession], None] = lambda session: None  # inside a run, before it computes
        self.during_release: Callable[[Build], None] = lambda build: None  # as a session is freed, before "released"
        monkeypatch.setattr(onnxruntime_backend, "cuda_usable", lambda ort_module, provider: provider != "cpu")
        allocate = ort.OrtValue.ortvalue_from_shape_and_type

        def on_device(shape: Any, element_type: Any, device_type: str = "cpu", device_id: int = 0) -> ort.OrtValue:
            self.allocations.append((tuple(shape), device_type))
            return allocate(shape, element_type, "cpu", device_id)  # "cuda" memory is CPU memory here

        monkeypatch.setattr(ort.OrtValue, "ortvalue_from_shape_and_type", staticmethod(on_device))

    def factory(self, version: str = "gpu") -> Callable[..., StandInSession]:
        """A session factory for OnnxRuntimeBackend; `version` labels what it builds."""

        def build_session(path: str, sess_options: ort.SessionOptions, providers: list[Any]) -> StandInSession:
            session = ort.InferenceSession(path, sess_options, providers=[CPU])
            cuda = next((dict(p[1]) for p in providers if isinstance(p, tuple) and p[0] == CUDA), None)
            build = Build(
                version,
                Path(path),
                session.get_inputs()[0].shape[0],
                tuple(p if isinstance(p, str) else p[0] for p in providers),
                cuda,
                sess_options.intra_op_num_threads,
            )
            self.builds.append(build)
            if cuda is not None and self.fails_to_build(build):
                raise RuntimeError(
                    f"[ONNXRuntimeError] CUDA failure 2: out of memory (stand-in, bucket {build.bucket})"
                )
            on_cuda = cuda is not None and not self.quietly_on_cpu(build)
            standin = StandInSession(session, build, [CUDA, CPU] if on_cuda else [CPU], self)
            standin.corrupt = self.faults.get(build.bucket) or (
                self.graph_faults.get(build.bucket) if build.graph else None
            )
            self.alive.add(standin)
            weakref.finalize(standin, self.release, build)
            return standin

        return build_session

    def record(self, build: Build, event: str) -> None:
        self.events.append(f"{build.version} bucket {build.bucket}: {event}")

    def release(self, build: Build) -> None:
        self.during_release(build)
        self.record(build, "released")


@pytest.fixture
def gpu(monkeypatch: pytest.MonkeyPatch) -> StandInGpu:
    return StandInGpu(monkeypatch)


@pytest.fixture(scope="module")
def digits(mnist_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    """The first 100 MNIST test digits, normalized as the model expects, and their labels."""
    test = load_split("test", mnist_dir)
    return MNIST_NORMALIZATION.apply(test.images[:100, None]), test.labels[:100]


@pytest.fixture(scope="module")
def cpu_reference() -> OnnxRuntimeBackend:
    """The bundled fp32 model on the CPU, one session: the answers every GPU path must give."""
    return OnnxRuntimeBackend(BUNDLED_MODEL, provider="cpu")


def fp32_buckets(gpu: StandInGpu, buckets: str, version: str = "gpu") -> OnnxRuntimeBackend:
    """The bundled fp32 model "on the GPU" (the stand-in) with these buckets and CUDA graphs (auto: on)."""
    return OnnxRuntimeBackend(
        BUNDLED_MODEL, provider="cuda", precision="fp32", batch_buckets=buckets, session_factory=gpu.factory(version)
    )


def graphs(backend: OnnxRuntimeBackend) -> dict[int, bool]:
    """Bucket -> whether its session replays a CUDA graph."""
    return {bucket: session.graph for bucket, session in backend._buckets.items()}


# --- faults: what a broken CUDA graph does to a bucket's outputs -----------------------------------------------------


def _class_outputs(outputs: dict[str, ort.OrtValue]) -> list[ort.OrtValue]:
    return [value for name, value in outputs.items() if name != DIGIT_SCORE]


def same_answer_always(outputs: dict[str, ort.OrtValue]) -> None:
    for value in _class_outputs(outputs):
        value.update_inplace(np.tile(np.arange(NUM_CLASSES, dtype=np.float32), (value.shape()[0], 1)))


def reversed_classes(outputs: dict[str, ort.OrtValue]) -> None:
    for value in _class_outputs(outputs):
        value.update_inplace(np.ascontiguousarray(value.numpy()[:, ::-1]))


def not_a_number(outputs: dict[str, ort.OrtValue]) -> None:
    for value in outputs.values():
        value.update_inplace(np.full(value.shape(), np.nan, np.float32))


def capture_fails(outputs: dict[str, ort.OrtValue]) -> None:
    raise RuntimeError("CUDA failure 900: operation not permitted when stream is capturing (stand-in)")


FAULTS = pytest.mark.parametrize(
    ("fault", "problem"),
    [
        (same_answer_always, "gives the same answer for different images"),
        (not_a_number, "returns non-finite logits"),
        (reversed_classes, "disagrees with the largest bucket"),
        (capture_fails, "failed to run (CUDA failure 900"),
    ],
    ids=["same-answer", "nan", "disagrees", "fails-to-run"],
)


# --- a session with a CUDA graph that cannot be built ---------------------------------------------------------------


def test_a_bucket_whose_graph_session_cannot_be_built_is_rebuilt_without_a_graph_and_the_others_keep_theirs(
    gpu: StandInGpu, caplog: pytest.LogCaptureFixture, digits, cpu_reference: OnnxRuntimeBackend
) -> None:
    gpu.fails_to_build = lambda build: build.graph and build.bucket == 2
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        backend = fp32_buckets(gpu, "1,2,4")
    assert [(b.bucket, b.graph) for b in gpu.builds] == [(1, True), (2, True), (2, False), (4, True)]
    assert graphs(backend) == {1: True, 2: False, 4: True}
    assert "batch bucket 2: no session with a CUDA graph (ONNX Runtime cannot load" in caplog.text
    assert "out of memory (stand-in, bucket 2)); building it without" in caplog.text
    info = backend.describe()
    assert backend.plan.cuda_graph is True and info.cuda_graph is False  # not every bucket replays a graph
    assert info.providers == (CUDA, CPU) and info.io_binding is True
    backend.warm_up()
    assert graphs(backend) == {1: True, 2: False, 4: True}  # nothing else to rebuild at warm-up
    images, _ = digits
    for n in (1, 2, 4, 7):  # every bucket, the graph-less one included
        np.testing.assert_allclose(
            backend.run(images[:n]).probabilities, cpu_reference.run(images[:n]).probabilities, atol=1e-5
        )


# --- warm-up: a bucket whose CUDA graph answers wrongly ---------------------------------------------------------


@FAULTS
def test_warm_up_rebuilds_a_bucket_whose_cuda_graph_answers_wrongly_without_the_graph(
    gpu: StandInGpu, caplog: pytest.LogCaptureFixture, digits, cpu_reference: OnnxRuntimeBackend, fault, problem: str
) -> None:
    gpu.graph_faults = {1: fault}
    backend = fp32_buckets(gpu, "1,4")
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        backend.warm_up()
    assert [(b.bucket, b.graph) for b in gpu.builds] == [(1, True), (4, True), (1, False)]  # bucket 1 rebuilt, once
    assert graphs(backend) == {1: False, 4: True}
    assert f"batch bucket 1 with a CUDA graph {problem}" in caplog.text
    assert "rebuilding it without the graph" in caplog.text
    assert "CUDA graphs off for batch buckets [1]" in caplog.text
    assert backend.describe().cuda_graph is False
    images, _ = digits
    np.testing.assert_allclose(
        backend.run(images[:1]).probabilities, cpu_reference.run(images[:1]).probabilities, atol=1e-5
    )


@FAULTS
def test_a_bucket_still_answering_wrongly_without_its_cuda_graph_stops_the_start(
    gpu: StandInGpu, fault, problem: str
) -> None:
    gpu.faults = {1: fault}  # with a graph or without
    backend = fp32_buckets(gpu, "1,4")
    with pytest.raises(BackendUnavailable) as err:
        backend.warm_up()
    assert f"batch bucket 1 {problem}" in str(err.value) and str(err.value).endswith("; refusing to serve")
    assert [(b.bucket, b.graph) for b in gpu.builds] == [(1, True), (4, True), (1, False)]  # the rebuild came first


# --- CUDA quietly left out ---------------------------------------------------------------------------------------


def test_a_session_onnx_runtime_quietly_left_on_the_cpu_is_refused_saying_so(gpu: StandInGpu) -> None:
    gpu.quietly_on_cpu = lambda build: True
    with pytest.raises(BackendUnavailable) as err:
        fp32_buckets(gpu, "1,4")
    assert str(err.value) == (
        f"ONNX Runtime could not start CUDA for {BUNDLED_MODEL} (providers in use: ['CPUExecutionProvider']); "
        "run with --provider cpu to serve on the CPU"
    )
    assert [(b.bucket, b.graph) for b in gpu.builds] == [(1, True), (1, False)]  # without the graph too; then stop


# --- provider auto: the CPU when the GPU sessions cannot be opened; provider cuda: no server ----------------------


@pytest.mark.parametrize(
    "failure", ["fails_to_build", "quietly_on_cpu"], ids=["cuda-cannot-start", "cuda-quietly-left-out"]
)
def test_provider_auto_serves_on_the_cpu_when_the_gpu_sessions_cannot_be_opened(
    gpu: StandInGpu, caplog: pytest.LogCaptureFixture, digits, cpu_reference: OnnxRuntimeBackend, failure: str
) -> None:
    setattr(gpu, failure, lambda build: build.bucket == 8)  # buckets 1, 2 and 4 open on the GPU first
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        backend = OnnxRuntimeBackend(BUNDLED_MODEL, provider="auto", session_factory=gpu.factory())
    tried = [(b.bucket, b.graph) for b in gpu.builds[:-1]]
    assert tried == [(1, True), (2, True), (4, True), (8, True), (8, False)]  # the GPU plan first, up to bucket 8
    assert {(b.model, b.providers) for b in gpu.builds[:-1]} == {(FP16_MODEL, (CUDA, CPU))}
    cpu = gpu.builds[-1]
    assert (cpu.model, cpu.bucket, cpu.providers, cpu.cuda_options) == (BUNDLED_MODEL, BATCH_AXIS, (CPU,), None)
    assert "--provider auto: serving on the CPU instead" in caplog.text
    assert backend.plan == resolve_plan(BUNDLED_MODEL, on_gpu=False)  # re-planned: fp32, NCHW, one session
    info = backend.describe()
    assert (info.providers, info.device, info.precision, info.layout) == ((CPU,), "CPU", "fp32", "NCHW")
    assert (info.batch_buckets, info.io_binding, info.cuda_graph) == ((), False, False)
    assert backend._dynamic_session.build == cpu
    on_cuda = [s.build.bucket for s in gpu.alive if s.get_providers()[0] == CUDA]
    assert on_cuda == []  # the GPU sessions opened before the failure are released: no device memory kept
    images, labels = digits
    served = backend.run(images).probabilities
    np.testing.assert_allclose(served, cpu_reference.run(images).probabilities, atol=1e-6)
    assert (served.argmax(1) == labels).mean() >= 0.97


def test_provider_cuda_refuses_to_start_when_the_gpu_sessions_cannot_be_opened(gpu: StandInGpu) -> None:
    gpu.fails_to_build = lambda build: True
    with pytest.raises(BackendUnavailable) as err:
        OnnxRuntimeBackend(BUNDLED_MODEL, provider="cuda", session_factory=gpu.factory())
    assert str(err.value).startswith(f"ONNX Runtime cannot load {FP16_MODEL}: [ONNXRuntimeError] CUDA failure 2")
    assert gpu.builds and all(b.providers == (CUDA, CPU) for b in gpu.builds)  # never a session on the CPU


# --- fp16, NHWC, power-of-two buckets, CUDA graphs, device buffers ------------------------------------------------


def test_on_a_gpu_the_fp16_variant_runs_nhwc_in_power_of_two_buckets_with_graphs_and_device_buffers(
    gpu: StandInGpu, digits, cpu_reference: OnnxRuntimeBackend
) -> None:
    backend = OnnxRuntimeBackend(BUNDLED_MODEL, provider="cuda", session_factory=gpu.factory())  # every choice auto
    plan = backend.plan
    assert (plan.on_gpu, plan.model_path, plan.precision, plan.layout) == (True, FP16_MODEL, "fp16", "NHWC")
    assert plan.buckets == powers_of_two(256) and plan.cuda_graph is True
    expected_options = {
        "cudnn_conv_algo_search": "EXHAUSTIVE",
        "do_copy_in_default_stream": "1",
        "prefer_nhwc": "1",
        "enable_cuda_graph": "1",
    }
    assert [b.bucket for b in gpu.builds] == list(plan.buckets)  # one session per bucket, its batch axis fixed
    for build in gpu.builds:
        assert (build.model, build.providers, build.cuda_options) == (FP16_MODEL, (CUDA, CPU), expected_options)
        assert build.intra_op_threads == 1  # the GPU needs no CPU thread pool
    assert {device for _, device in gpu.allocations} == {"cuda"}  # inputs and outputs bound in device memory
    shapes = sorted(shape for shape, _ in gpu.allocations)
    assert shapes == sorted(
        shape
        for b in plan.buckets
        for shape in ((b, *INPUT_SHAPE), (b, NUM_CLASSES), (b, NUM_CLASSES), (b,))  # image; logits, probs, score
    )
    info = backend.describe()
    assert (info.precision, info.layout, info.cuda_graph, info.io_binding) == ("fp16", "NHWC", True, True)
    assert info.providers == (CUDA, CPU) and info.options["prefer_nhwc"] == "1"
    images, labels = digits
    served = backend.run(images).probabilities  # 100 images: one run at bucket 128
    assert (served.argmax(1) == cpu_reference.run(images).probabilities.argmax(1)).mean() >= 0.99
    assert (served.argmax(1) == labels).mean() >= 0.97


# --- CUDA-graph capture and another version's close() take turns -------------------------------------------------


class WatchedLock:
    """The backend's GPU turn as a real lock that tells the test when a thread has to wait for it."""

    def __init__(self, on_wait: Callable[[], None]) -> None:
        self._lock = threading.Lock()
        self._on_wait = on_wait

    def __enter__(self) -> WatchedLock:
        if not self._lock.acquire(blocking=False):
            self._on_wait()
            self._lock.acquire()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._lock.release()


def in_thread(
    work: Callable[[], object], errors: list[BaseException], then: Callable[[], None] = lambda: None
) -> threading.Thread:
    """A thread doing `work`, handing what it raises to `errors`, then calling `then`."""

    def body() -> None:
        try:
            work()
        except BaseException as exc:  # noqa: BLE001 - handed to the test thread
            errors.append(exc)
        then()

    return threading.Thread(target=body)


def join_all(*threads: threading.Thread) -> None:
    for thread in threads:
        thread.join(GUARD_S)
        assert not thread.is_alive(), f"{thread} still running: deadlocked"


def test_a_retiring_versions_close_waits_for_a_new_versions_cuda_graph_capture(
    gpu: StandInGpu, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Capture is process-wide (cudaStreamCaptureModeGlobal): the old version's sessions are released only after the
    new version's warm-up, never in the middle of a run that captures."""
    old = fp32_buckets(gpu, "1", version="old")
    old.warm_up()
    new = fp32_buckets(gpu, "1", version="new")
    capturing, close_waits_or_is_done, go_on = threading.Event(), threading.Event(), threading.Event()
    errors: list[BaseException] = []

    def hold_the_first_capture(session: StandInSession) -> None:
        if session.build.version == "new" and not capturing.is_set():
            capturing.set()
            go_on.wait(GUARD_S)

    gpu.during_run = hold_the_first_capture
    monkeypatch.setattr(onnxruntime_backend, "_GPU_TURN", WatchedLock(on_wait=close_waits_or_is_done.set))
    gpu.events.clear()
    warming = in_thread(new.warm_up, errors)
    closing = in_thread(old.close, errors, then=close_waits_or_is_done.set)
    warming.start()
    assert capturing.wait(GUARD_S), "the new version's warm-up never ran"
    closing.start()
    assert close_waits_or_is_done.wait(GUARD_S), "close() neither waited for the GPU turn nor returned"
    go_on.set()
    join_all(warming, closing)
    assert errors == []
    runs = ["new bucket 1: run", "new bucket 1: run done"] * (onnxruntime_backend.WARM_RUNS + 1)
    assert gpu.events == [*runs, "old bucket 1: released"], "the old version's session was released mid-capture"


def test_a_new_versions_cuda_graph_capture_waits_for_a_retiring_versions_close(
    gpu: StandInGpu, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The other way round: a warm-up that starts while the old version's sessions are being released captures
    nothing until they are gone."""
    old = fp32_buckets(gpu, "1", version="old")
    old.warm_up()
    new = fp32_buckets(gpu, "1", version="new")
    releasing, warm_up_waits_or_is_done, go_on = threading.Event(), threading.Event(), threading.Event()
    errors: list[BaseException] = []

    def hold_the_release(build: Build) -> None:
        if build.version == "old":
            releasing.set()
            go_on.wait(GUARD_S)

    gpu.during_release = hold_the_release
    monkeypatch.setattr(onnxruntime_backend, "_GPU_TURN", WatchedLock(on_wait=warm_up_waits_or_is_done.set))
    gpu.events.clear()
    closing = in_thread(old.close, errors)
    warming = in_thread(new.warm_up, errors, then=warm_up_waits_or_is_done.set)
    closing.start()
    assert releasing.wait(GUARD_S), "close() released no session"
    warming.start()
    assert warm_up_waits_or_is_done.wait(GUARD_S), "warm_up() neither waited for the GPU turn nor returned"
    go_on.set()
    join_all(closing, warming)
    assert errors == []
    runs = ["new bucket 1: run", "new bucket 1: run done"] * (onnxruntime_backend.WARM_RUNS + 1)
    assert gpu.events == ["old bucket 1: released", *runs], "the new version captured while the old one was released"
