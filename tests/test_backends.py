"""server.engine.backends: batch buckets, the setup plan, ONNX Runtime's one-shape-per-session design, warm-up,
null engine."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from proto.contract import DIGIT_SCORE, INPUT_NAME, INPUT_SHAPE, LOGITS, MNIST_NORMALIZATION, OUTPUT_NAMES, variant_path
from server.config import BUNDLED_MODEL, CHOICES, DIGIT_DETECTOR, ServeConfig, parse_buckets
from server.engine.backends import ENGINES, BackendUnavailable, build_backend
from server.engine.backends.buckets import Run, plan_runs, powers_of_two
from server.engine.backends.null_backend import FIXED_ROW, FIXED_SCORE, FIXED_THRESHOLD, NullBackend
from server.engine.backends.onnxruntime_backend import (
    CPU,
    CUDA,
    OnnxRuntimeBackend,
    nvidia_driver_present,
    resolve_plan,
)
from server.pipeline.digit_detector import DigitDetector
from tests.support import RecordingSession, recording_factory
from training.data import load_split

FP16_MODEL = variant_path(BUNDLED_MODEL, "fp16")


@pytest.fixture(scope="module")
def test_digits(mnist_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    """The first 400 MNIST test digits, normalized as the model expects, and their labels."""
    test = load_split("test", mnist_dir)
    return MNIST_NORMALIZATION.apply(test.images[:400, None]), test.labels[:400]


# --- buckets ---------------------------------------------------------------------------------------


def test_powers_of_two_double_up_to_the_largest_and_end_with_it() -> None:
    assert powers_of_two(1) == (1,)
    assert powers_of_two(8) == (1, 2, 4, 8)
    assert powers_of_two(256) == (1, 2, 4, 8, 16, 32, 64, 128, 256)
    assert powers_of_two(6) == (1, 2, 4, 6)  # not a power of two: the largest is still a bucket
    with pytest.raises(ValueError, match="at least 1"):
        powers_of_two(0)


def test_parse_buckets_sorts_and_deduplicates() -> None:
    assert parse_buckets("32,1,8") == (1, 8, 32)
    assert parse_buckets(" 8 , 1,8,") == (1, 8)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("1,eight", "comma-separated whole numbers, not '1,eight'"),
        ("1.5", "comma-separated whole numbers, not '1.5'"),
        ("", "give at least one size"),
        (" , ", "give at least one size"),
        ("0,4", "at least 1, got 0"),
        ("4,-2", "at least 1, got -2"),
    ],
)
def test_parse_buckets_names_what_is_wrong(text: str, message: str) -> None:
    with pytest.raises(ValueError) as err:
        parse_buckets(text)
    assert message in str(err.value)


def test_a_batch_larger_than_the_largest_bucket_is_full_runs_plus_one_padded_remainder() -> None:
    assert plan_runs(20, (1, 2, 4, 8)) == [Run(0, 8, 8), Run(8, 16, 8), Run(16, 20, 4)]
    assert plan_runs(17, (8, 1, 2, 4)) == [Run(0, 8, 8), Run(8, 16, 8), Run(16, 17, 1)]
    assert plan_runs(16, (1, 2, 4, 8)) == [Run(0, 8, 8), Run(8, 16, 8)]  # no empty remainder run
    assert plan_runs(3, (1, 2, 4, 8)) == [Run(0, 3, 4)]
    assert plan_runs(0, (1, 8)) == []
    assert Run(16, 20, 4).images == 4


def test_plan_runs_covers_every_row_once_at_a_bucket_with_the_least_padding() -> None:
    rng = np.random.default_rng(2024)
    for _ in range(300):
        buckets = tuple(int(b) for b in rng.choice(np.arange(1, 300), size=int(rng.integers(1, 7)), replace=False))
        largest = max(buckets)
        for n in (*rng.integers(1, 1200, size=8).tolist(), 1, largest, largest + 1, 2 * largest):
            runs = plan_runs(n, buckets)
            rows = [row for run in runs for row in range(run.start, run.stop)]
            assert rows == list(range(n)), (n, buckets, runs)  # in order, each row exactly once
            assert all(run.bucket in buckets and 1 <= run.images <= run.bucket for run in runs), (n, buckets, runs)
            assert all(run.images == run.bucket == largest for run in runs[:-1]), (n, buckets, runs)
            last = runs[-1]
            assert last.bucket == min(b for b in buckets if b >= last.images), (n, buckets, runs)
            assert len(runs) == -(-n // largest)


# --- one shape per session ---------------------------------------------------------------------------


def test_no_session_is_ever_run_at_two_shapes(test_digits) -> None:
    """Every bucket session sees only its own batch shape, across warm-up and batches split over many runs."""
    images, _ = test_digits
    sessions: list[RecordingSession] = []
    backend = OnnxRuntimeBackend(
        BUNDLED_MODEL, provider="cpu", batch_buckets="1,2,4,8", session_factory=recording_factory(sessions)
    )
    assert sorted(s.bucket for s in sessions) == [1, 2, 4, 8]  # one session per bucket, batch axis fixed at load
    backend.warm_up()
    runs_at_warm_up = {s.bucket: len(s.shapes) for s in sessions}

    reference = OnnxRuntimeBackend(BUNDLED_MODEL, provider="cpu")  # one session that takes any shape
    assert reference.describe().batch_buckets == ()
    rng = np.random.default_rng(11)
    sizes = [1, 2, 3, 5, 8, 9, 16, 17, 40, *rng.integers(1, 41, size=18).tolist()]
    for n in sizes:
        batch = images[rng.choice(len(images), size=n, replace=False)]
        got, expected = backend.run(batch), reference.run(batch)
        np.testing.assert_allclose(got.probabilities, expected.probabilities, atol=1e-5, err_msg=f"batch of {n}")
        np.testing.assert_allclose(got.digit_scores, expected.digit_scores, atol=1e-5, err_msg=f"scores, batch of {n}")

    for session in sessions:
        assert set(session.shapes) == {(session.bucket, *INPUT_SHAPE)}, f"bucket {session.bucket}: {session.shapes}"
        assert len(session.shapes) > runs_at_warm_up[session.bucket], f"bucket {session.bucket} unused after warm-up"


def test_a_bucket_session_refuses_any_other_batch_size() -> None:
    """ONNX Runtime itself enforces the fixed batch axis: a second shape is an error, never a silent re-plan."""
    sessions: list[RecordingSession] = []
    OnnxRuntimeBackend(BUNDLED_MODEL, provider="cpu", batch_buckets="2,4", session_factory=recording_factory(sessions))
    session = next(s for s in sessions if s.bucket == 2).session
    three = np.zeros((3, *INPUT_SHAPE), np.float32)
    with pytest.raises(Exception, match="Got: 3 Expected: 2"):
        session.run([OUTPUT_NAMES[1]], {INPUT_NAME: three})
    binding = session.io_binding()
    binding.bind_ortvalue_input(INPUT_NAME, ort.OrtValue.ortvalue_from_numpy(three))
    binding.bind_output(OUTPUT_NAMES[1])
    with pytest.raises(Exception, match="Got: 3 Expected: 2"):
        session.run_with_iobinding(binding)
    assert session.run([OUTPUT_NAMES[1]], {INPUT_NAME: three[:2]})[0].shape == (2, 10)  # its own shape runs


# --- the plan ------------------------------------------------------------------------------------------


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    (tmp_path / "model.onnx").write_bytes(b"fp32 weights")
    return tmp_path


def with_fp16(model_dir: Path) -> Path:
    (model_dir / "model.fp16.onnx").write_bytes(b"fp16 weights")
    return model_dir


def test_on_a_gpu_with_an_fp16_variant_the_plan_is_fp16_nhwc_power_of_two_buckets_and_graphs(model_dir) -> None:
    plan = resolve_plan(with_fp16(model_dir) / "model.onnx", on_gpu=True)
    assert plan.on_gpu and plan.model_path == model_dir / "model.fp16.onnx"
    assert (plan.precision, plan.layout) == ("fp16", "NHWC")
    assert plan.buckets == (1, 2, 4, 8, 16, 32, 64, 128, 256) and plan.max_batch_size == 256
    assert plan.cuda_graph is True
    assert plan.reasons and any("fp16" in reason for reason in plan.reasons)


def test_on_a_gpu_without_an_fp16_variant_the_plan_is_fp32_nchw(model_dir) -> None:
    plan = resolve_plan(model_dir / "model.onnx", on_gpu=True)
    assert (plan.precision, plan.layout, plan.model_path) == ("fp32", "NCHW", model_dir / "model.onnx")
    assert plan.buckets == powers_of_two(256) and plan.cuda_graph is True
    assert any("no fp16 variant" in reason for reason in plan.reasons)


def test_on_the_cpu_the_plan_is_one_fp32_session_for_any_size_up_to_32(model_dir) -> None:
    plan = resolve_plan(with_fp16(model_dir) / "model.onnx", on_gpu=False)  # the fp16 file is not used on a CPU
    assert (plan.precision, plan.layout, plan.model_path) == ("fp32", "NCHW", model_dir / "model.onnx")
    assert plan.buckets == () and plan.max_batch_size == 32 and plan.cuda_graph is False


@pytest.mark.parametrize("on_gpu", [True, False])
def test_explicit_fp16_without_the_file_names_it_and_the_export_command(model_dir, on_gpu: bool) -> None:
    with pytest.raises(BackendUnavailable) as err:
        resolve_plan(model_dir / "model.onnx", on_gpu=on_gpu, precision="fp16")
    message = str(err.value)
    assert str(model_dir / "model.fp16.onnx") in message
    assert f"mnist-export --check {model_dir / 'model.onnx'} --fp16" in message


def test_nhwc_layout_on_the_cpu_is_refused(model_dir) -> None:
    with pytest.raises(BackendUnavailable, match="nhwc"):
        resolve_plan(model_dir / "model.onnx", on_gpu=False, layout="nhwc")
    assert resolve_plan(model_dir / "model.onnx", on_gpu=True, layout="nhwc").layout == "NHWC"


def test_no_buckets_is_refused_on_a_gpu_and_allowed_on_the_cpu(model_dir) -> None:
    with pytest.raises(BackendUnavailable, match="refused on a GPU"):
        resolve_plan(model_dir / "model.onnx", on_gpu=True, batch_buckets="none")
    plan = resolve_plan(model_dir / "model.onnx", on_gpu=False, batch_buckets="none", max_batch_size=48)
    assert plan.buckets == () and plan.max_batch_size == 48


def test_explicit_buckets_set_the_largest_batch_unless_a_maximum_is_given(model_dir) -> None:
    plan = resolve_plan(model_dir / "model.onnx", on_gpu=True, batch_buckets="32,1,8")
    assert plan.buckets == (1, 8, 32) and plan.max_batch_size == 32
    assert not any("split" in reason for reason in plan.reasons)
    plan = resolve_plan(model_dir / "model.onnx", on_gpu=True, batch_buckets="1,8,32", max_batch_size=100)
    assert plan.buckets == (1, 8, 32) and plan.max_batch_size == 100
    assert any("split into runs of 32" in reason for reason in plan.reasons)
    cpu = resolve_plan(model_dir / "model.onnx", on_gpu=False, batch_buckets="1,8,32")
    assert cpu.buckets == (1, 8, 32) and cpu.max_batch_size == 32 and cpu.cuda_graph is False


def test_bad_explicit_buckets_are_backend_unavailable_naming_them(model_dir) -> None:
    with pytest.raises(BackendUnavailable, match="'1,x'"):
        resolve_plan(model_dir / "model.onnx", on_gpu=True, batch_buckets="1,x")


def test_giving_the_fp16_file_itself_plans_fp16(model_dir) -> None:
    fp16 = with_fp16(model_dir) / "model.fp16.onnx"
    for on_gpu in (True, False):
        plan = resolve_plan(fp16, on_gpu=on_gpu)
        assert plan.precision == "fp16" and plan.model_path == fp16
    assert resolve_plan(fp16, on_gpu=True).layout == "NHWC"
    assert resolve_plan(fp16, on_gpu=True, precision="fp32").model_path == model_dir / "model.onnx"


def test_cuda_graphs_on_without_a_gpu_are_refused(model_dir) -> None:
    with pytest.raises(BackendUnavailable, match="CUDA provider"):
        resolve_plan(model_dir / "model.onnx", on_gpu=False, cuda_graph="on")
    assert resolve_plan(model_dir / "model.onnx", on_gpu=True, cuda_graph="off").cuda_graph is False


# --- warm-up verification ------------------------------------------------------------------------------


def test_a_healthy_bucketed_backend_warms_up() -> None:
    backend = OnnxRuntimeBackend(BUNDLED_MODEL, provider="cpu", batch_buckets="1,4")
    seconds = backend.warm_up()
    assert isinstance(seconds, float) and seconds > 0


def _class_outputs(outputs: dict[str, ort.OrtValue]) -> list[ort.OrtValue]:
    """The (bucket, 10) outputs, logits and probabilities: not the digit score."""
    return [value for name, value in outputs.items() if name != DIGIT_SCORE]


def _same_row_always(outputs: dict[str, ort.OrtValue]) -> None:
    for value in _class_outputs(outputs):
        value.update_inplace(np.tile(np.arange(10, dtype=np.float32), (value.shape()[0], 1)))


def _reversed_classes(outputs: dict[str, ort.OrtValue]) -> None:
    for value in _class_outputs(outputs):
        value.update_inplace(np.ascontiguousarray(value.numpy()[:, ::-1]))


def _not_a_number(outputs: dict[str, ort.OrtValue]) -> None:
    for value in outputs.values():
        value.update_inplace(np.full(value.shape(), np.nan, np.float32))


@pytest.mark.parametrize(
    ("corrupt", "problem"),
    [
        (None, None),
        (_same_row_always, "gives the same answer for different images"),
        (_reversed_classes, "disagrees with the largest bucket"),
        (_not_a_number, "returns non-finite logits"),
    ],
    ids=["healthy", "same-answer", "disagrees", "nan"],
)
def test_warm_up_refuses_a_bucket_that_answers_wrongly(corrupt, problem: str | None) -> None:
    sessions: list[RecordingSession] = []
    backend = OnnxRuntimeBackend(
        BUNDLED_MODEL, provider="cpu", batch_buckets="1,4", session_factory=recording_factory(sessions)
    )
    next(s for s in sessions if s.bucket == 1).corrupt = corrupt
    if problem is None:
        assert backend.warm_up() > 0
        return
    with pytest.raises(BackendUnavailable) as err:
        backend.warm_up()
    assert f"batch bucket 1 {problem}" in str(err.value) and "refusing to serve" in str(err.value)


def test_the_corruption_is_visible_in_what_the_bucket_returns() -> None:
    """The simulated fault reaches the backend's answers (so the warm-up tests above test the check, not the proxy)."""
    sessions: list[RecordingSession] = []
    backend = OnnxRuntimeBackend(
        BUNDLED_MODEL, provider="cpu", batch_buckets="1,4", session_factory=recording_factory(sessions)
    )
    image = np.random.default_rng(3).normal(size=(1, *INPUT_SHAPE)).astype(np.float32)
    healthy = backend._buckets[1].run(image, LOGITS)
    next(s for s in sessions if s.bucket == 1).corrupt = _reversed_classes
    np.testing.assert_array_equal(backend._buckets[1].run(image, LOGITS), healthy[:, ::-1])


# --- describe, providers --------------------------------------------------------------------------------


def test_the_default_cpu_backend_describes_one_any_shape_fp32_session() -> None:
    info = OnnxRuntimeBackend(BUNDLED_MODEL, provider="cpu").describe()
    assert info.engine == "onnxruntime" and info.model_name == "googlenet-fast"
    assert list(info.providers) == ["CPUExecutionProvider"] and not info.on_gpu
    assert (info.precision, info.layout, info.batch_buckets) == ("fp32", "NCHW", ())
    assert info.max_batch_size == 32 and info.io_binding is False and info.cuda_graph is False
    assert info.device == "CPU" and info.runtime.startswith("onnxruntime")
    assert info.options == {"intra_op_spinning": "on"}
    assert info.model_path == str(BUNDLED_MODEL) and len(info.model_sha256) == 64


@pytest.mark.parametrize(
    ("spinning", "allowed", "stop", "described"),
    [("auto", "", "", "on"), ("on", "", "", "on"), ("run", "", "1", "run"), ("off", "0", "", "off")],
)
def test_cpu_sessions_spin_as_onnx_runtime_does_by_default_unless_asked(
    spinning: str, allowed: str, stop: str, described: str
) -> None:
    """Spinning between runs (ONNX Runtime's default) halved a third-of-capacity p99; `run` and `off` are asked for."""
    options: list[ort.SessionOptions] = []

    def factory(path: str, sess_options: ort.SessionOptions, providers: list) -> ort.InferenceSession:
        options.append(sess_options)
        return ort.InferenceSession(path, sess_options, providers=providers)

    backend = OnnxRuntimeBackend(BUNDLED_MODEL, provider="cpu", spinning=spinning, session_factory=factory)

    def entry(o: ort.SessionOptions, key: str) -> str:
        try:
            return o.get_session_config_entry(key)
        except RuntimeError:  # not set: ONNX Runtime's default (spinning, and on after a run)
            return ""

    assert [entry(o, "session.intra_op.allow_spinning") for o in options] == [allowed]
    assert [entry(o, "session.force_spinning_stop") for o in options] == [stop]
    assert backend.describe().options["intra_op_spinning"] == described


def test_a_cpu_backend_with_buckets_describes_them_and_io_binding() -> None:
    info = OnnxRuntimeBackend(BUNDLED_MODEL, provider="cpu", batch_buckets="2,1").describe()
    assert info.batch_buckets == (1, 2) and info.max_batch_size == 2
    assert info.io_binding is True and info.cuda_graph is False
    assert "batch shapes 1,2" in info.summary() and "IO binding" in info.summary()


@pytest.mark.may_skip("a GPU machine")
@pytest.mark.skipif(nvidia_driver_present(), reason="an NVIDIA driver is present here")
def test_provider_cuda_without_a_driver_is_unavailable() -> None:
    with pytest.raises(BackendUnavailable, match="no NVIDIA driver"):
        OnnxRuntimeBackend(BUNDLED_MODEL, provider="cuda")


@pytest.mark.may_skip("a GPU machine")
@pytest.mark.skipif(
    nvidia_driver_present() and CUDA in ort.get_available_providers(), reason="CUDA is usable here: auto picks it"
)
def test_provider_auto_falls_back_to_the_cpu() -> None:
    backend = OnnxRuntimeBackend(BUNDLED_MODEL, provider="auto")
    assert backend.plan.on_gpu is False and backend.describe().providers == (CPU,)
    assert backend.run(np.zeros((3, *INPUT_SHAPE), np.float32)).probabilities.shape == (3, 10)


# --- the null engine and the engine table ------------------------------------------------------------------


def test_the_null_backend_answers_digit_0_for_every_image() -> None:
    backend = NullBackend()
    rows = backend.run(np.random.default_rng(0).normal(size=(5, *INPUT_SHAPE)).astype(np.float32)).probabilities
    assert rows.shape == (5, 10) and (rows == FIXED_ROW).all()
    assert rows.argmax(1).tolist() == [0] * 5 and rows[0, 0] == pytest.approx(0.91)
    assert rows.sum(1) == pytest.approx(np.ones(5), abs=1e-6)
    assert backend.warm_up() == 0.0


def test_emulated_device_time_keeps_the_runner_waiting_without_using_the_cpu() -> None:
    """An accelerator's run, for admission-control benchmarks: 1 ms + 4 ms per image, slept, not computed."""
    backend = build_backend(ServeConfig(backend="null-threaded", null_device_ms="1+4"))
    assert backend.device_ms == (1.0, 4.0) and "emulated device 1+4 ms" in backend.describe().device
    images = np.zeros((5, *INPUT_SHAPE), np.float32)
    wall, cpu = time.perf_counter(), time.thread_time()  # this thread's own CPU time: not pytest's other threads'
    assert (backend.run(images).probabilities == FIXED_ROW).all()
    assert time.perf_counter() - wall >= 0.021
    assert time.thread_time() - cpu < 0.015


def test_emulated_device_time_is_refused_on_the_event_loop() -> None:
    with pytest.raises(ValueError, match="threaded null backend"):
        NullBackend(blocking=False, device_ms=(1.0, 0.0))


@pytest.mark.parametrize(("name", "blocking"), [("null", False), ("null-threaded", True)])
def test_build_backend_makes_the_null_engines(name: str, blocking: bool) -> None:
    backend = build_backend(ServeConfig(backend=name))
    assert isinstance(backend, NullBackend) and backend.blocking is blocking
    info = backend.describe()
    assert info.engine == name and info.model_name == "null" and info.max_batch_size == 256


def test_build_backend_with_an_unknown_engine_is_unavailable_listing_the_known_ones() -> None:
    with pytest.raises(BackendUnavailable) as err:
        build_backend(ServeConfig(backend="tensorrt"))
    assert "'tensorrt'" in str(err.value) and "onnxruntime, null, null-threaded" in str(err.value)


def test_every_configurable_backend_has_an_engine_and_no_engine_is_unconfigurable() -> None:
    assert set(ENGINES) == set(CHOICES["backend"])


def test_build_backend_makes_the_onnxruntime_engine_from_the_configuration() -> None:
    backend = build_backend(ServeConfig(provider="cpu", batch_buckets="1,2"))
    assert isinstance(backend, OnnxRuntimeBackend) and backend.blocking is True
    assert backend.describe().batch_buckets == (1, 2)


# --- fp16 ----------------------------------------------------------------------------------------------------


@pytest.mark.skipif(
    not FP16_MODEL.is_file(), reason=f"no fp16 variant bundled ({FP16_MODEL.name}; mnist-export --check ... --fp16)"
)
def test_the_bundled_fp16_variant_loads_on_the_cpu_and_agrees_with_fp32(mnist_dir: Path) -> None:
    test = load_split("test", mnist_dir)
    images = MNIST_NORMALIZATION.apply(test.images[:200, None])
    fp16 = OnnxRuntimeBackend(BUNDLED_MODEL, provider="cpu", precision="fp16")
    fp32 = OnnxRuntimeBackend(BUNDLED_MODEL, provider="cpu", precision="fp32")
    assert fp16.describe().precision == "fp16" and fp16.describe().model_path == str(FP16_MODEL)
    agree = (fp16.run(images).probabilities.argmax(1) == fp32.run(images).probabilities.argmax(1)).mean()
    assert agree >= 0.99


# --- the digit score in the model's graph ----------------------------------------------------------------------------


@pytest.mark.parametrize("buckets", ["none", "1,4"], ids=["one-session", "bucket-sessions"])
def test_models_with_and_without_the_digit_score_output_are_served(test_digits, scoreless_model, buckets) -> None:
    """The bundled model gives its score with the probabilities; a file exported before the score gives none."""
    images, _ = test_digits
    batch = images[:7]  # with buckets 1,4: runs of 4, 2 (padded to 4) and 1
    scored = OnnxRuntimeBackend(BUNDLED_MODEL, provider="cpu", batch_buckets=buckets)
    plain = OnnxRuntimeBackend(scoreless_model, provider="cpu", batch_buckets=buckets)
    with_score, without = scored.run(batch), plain.run(batch)
    assert with_score.digit_scores.shape == (7,) and with_score.digit_scores.dtype == np.float32
    assert without.digit_scores is None
    np.testing.assert_array_equal(with_score.probabilities, without.probabilities)  # the classifier is the same
    alone = np.concatenate([scored.run(batch[i : i + 1]).digit_scores for i in range(7)])
    np.testing.assert_allclose(with_score.digit_scores, alone, atol=1e-5)  # each image's own score, in its row
    bundled_detector = DigitDetector.load(DIGIT_DETECTOR)  # the model carries the bundled detector's threshold
    assert scored.describe().digit_threshold == pytest.approx(bundled_detector.threshold)
    assert scored.describe().digit_detector["hidden_units"] > 0
    assert plain.describe().digit_threshold is None and plain.describe().digit_detector == {}


def _edited_bundled_model(tmp_path: Path, edit) -> Path:
    onnx = pytest.importorskip("onnx")
    model = onnx.load(str(BUNDLED_MODEL))
    edit(model)
    path = tmp_path / "edited.onnx"
    onnx.save(model, str(path))
    return path


def _score_renamed(model) -> None:
    """The score handed out under another name."""
    from onnx import helper

    model.graph.node.append(helper.make_node("Identity", [DIGIT_SCORE], ["score"]))
    model.graph.output[2].name = "score"


def _score_as_column(model) -> None:
    """The score as [batch, 1], not [batch]."""
    from onnx import TensorProto, helper

    (last,) = [node for node in model.graph.node if DIGIT_SCORE in node.output]
    last.output[0] = "score_vector"
    axes = helper.make_tensor("axis_1_for_column", TensorProto.INT64, [1], [1])
    model.graph.initializer.append(axes)
    model.graph.node.append(helper.make_node("Unsqueeze", ["score_vector", axes.name], [DIGIT_SCORE]))
    del model.graph.output[2]
    model.graph.output.append(helper.make_tensor_value_info(DIGIT_SCORE, TensorProto.FLOAT, ["batch", 1]))


def _threshold_forgotten(model) -> None:
    """The output, but no threshold in the metadata: the server could not judge the score."""
    from proto.contract import read_metadata

    dataclasses.replace(read_metadata(model), digit_threshold=None, digit_detector=None).write_into(model)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (_score_renamed, "optionally followed by ('digit_score', 'tensor(float)') [batch]"),
        (_score_as_column, "output 'digit_score' has shape ['batch', 1]; the contract is [batch]"),
        (_threshold_forgotten, "has a 'digit_score' output but no digit_threshold in its metadata"),
    ],
    ids=["renamed", "column", "no-threshold"],
)
def test_a_model_breaking_the_digit_score_contract_is_refused_saying_how(tmp_path: Path, edit, message: str) -> None:
    path = _edited_bundled_model(tmp_path, edit)
    with pytest.raises(BackendUnavailable) as err:
        OnnxRuntimeBackend(path, provider="cpu")
    assert str(path) in str(err.value) and message in str(err.value)


def test_the_null_backend_returns_its_fixed_digit_score_judged_a_digit() -> None:
    backend = NullBackend(max_batch_size=4)
    for n in (3, 9):  # within its preallocated rows and beyond them
        output = backend.run(np.zeros((n, *INPUT_SHAPE), np.float32))
        assert output.digit_scores.shape == (n,) and (output.digit_scores == FIXED_SCORE).all()
    info = backend.describe()
    assert (
        info.digit_threshold == FIXED_THRESHOLD <= FIXED_SCORE and "no detector runs" in info.digit_detector["method"]
    )
