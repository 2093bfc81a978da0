"""ONNX Runtime: CUDA when usable, else CPU; on the GPU one session per fixed batch shape.

On a GPU every bucket (batch size) gets its own session whose batch axis is fixed at load
(`add_free_dimension_override_by_name`), so no session can ever run a second shape and cuDNN
searches its algorithms once per bucket, at warm-up. Inputs and outputs are bound to buffers
allocated once per session (IO binding); with that, the CUDA provider can capture each session's
run as a CUDA graph and replay it. On the CPU, where any batch size costs nothing extra, one
session takes any size, unless fixed buckets are asked for (then the GPU path runs on the CPU,
IO binding included: that is how the tests exercise it).

A model may carry the digit detector as a third output, `digit_score` (export/digit_score_graph.py);
then each run returns it with the probabilities, and its threshold comes from the model's metadata.
Model files without it are served as before (the server's separate detector scores them).
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import importlib.util
import logging
import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from proto.contract import (
    BATCH_AXIS,
    DIGIT_SCORE,
    INPUT_DTYPE,
    INPUT_NAME,
    INPUT_SHAPE,
    LOGITS,
    NUM_CLASSES,
    OUTPUT_NAMES,
    PROBABILITIES,
    SCORED_OUTPUT_NAMES,
    ModelMetadata,
    variant_path,
)
from server.config import ServeConfig, parse_buckets
from server.engine.backends.base import BackendInfo, BackendOutput, BackendUnavailable
from server.engine.backends.buckets import plan_runs, powers_of_two

log = logging.getLogger("mnist.backend.onnxruntime")

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"
# Largest GPU batch by default. Measured with the bare runtime on an H200 (CUDA graph, one session per
# size): googlenet-fast 0.65 ms at batch 1, 0.86 ms at 32, 2.4 ms at 256; past 256 images/s grow little
# while every call in the batch waits longer.
GPU_MAX_BATCH = 256
CPU_MAX_BATCH = 32  # measured on a 2-core CPU: batch 8 / 32 / 64 within noise of each other
WARM_RUNS = 3  # the CUDA provider captures its graph after a couple of plain runs
# A bucket's answers must match the largest bucket's on the same images (relative to the largest logit):
# different shapes pick different kernels (and TF32 on the GPU), so not bit-exact; a bug is off by O(1).
BUCKET_AGREEMENT = {"fp32": 1e-2, "fp16": 3e-2}

SessionFactory = Callable[..., Any]  # (path, sess_options, providers) -> onnxruntime.InferenceSession

# CUDA-graph capture is process-wide (cudaStreamCaptureModeGlobal): while one thread captures, a cudaMalloc or cudaFree
# on another (a model version's sessions being built or released) invalidates the capture or fails. So, across every
# backend in the process, building and warming GPU sessions (warm-up is where the graphs are captured) and releasing
# them take turns: a new version's warm-up never overlaps a retiring version's close().
_GPU_TURN = threading.Lock()


def gpu_turn(on_gpu: bool) -> AbstractContextManager[Any]:
    """The process's GPU turn (see `_GPU_TURN`) for a backend on the GPU; nothing to wait for on the CPU."""
    return _GPU_TURN if on_gpu else contextlib.nullcontext()


@dataclass(frozen=True)
class Plan:
    """How the engine will be set up, with the reason for every choice made on the operator's behalf."""

    on_gpu: bool
    model_path: Path
    precision: str
    layout: str  # "NCHW" or "NHWC" (the CUDA provider's prefer_nhwc)
    buckets: tuple[int, ...]  # () = one session, any batch size
    max_batch_size: int
    cuda_graph: bool
    reasons: list[str] = field(default_factory=list)


def resolve_plan(
    model: Path,
    on_gpu: bool,
    precision: str = "auto",
    layout: str = "auto",
    batch_buckets: str = "auto",
    max_batch_size: int = 0,
    cuda_graph: str = "auto",
) -> Plan:
    """Turn 'auto' settings into concrete ones for a GPU or a CPU. Pure: tested without a GPU."""
    reasons = []
    model = Path(model)
    fp16_file = variant_path(model, "fp16")
    given_fp16 = model.name.endswith(".fp16.onnx")
    if precision == "auto":
        if given_fp16:
            precision = "fp16"
            reasons.append("precision fp16: the model file given is the fp16 variant")
        elif on_gpu and fp16_file.is_file():
            precision = "fp16"
            reasons.append(f"precision fp16: on a GPU, and {fp16_file.name} exists (fp16 measured ~1.8x faster)")
        else:
            precision = "fp32"
            reasons.append("precision fp32: " + ("no fp16 variant beside the model" if on_gpu else "CPU"))
    model_path = variant_path(model, precision)
    if not model_path.is_file():
        hint = f"mnist-export --check {variant_path(model, 'fp32')} --fp16" if precision == "fp16" else "mnist-export"
        raise BackendUnavailable(f"precision {precision} asked for, but {model_path} does not exist (write it: {hint})")

    if layout == "auto":
        layout = "nhwc" if on_gpu and precision == "fp16" else "nchw"
        reasons.append(
            f"layout {layout.upper()}: "
            + (
                "fp16 on a GPU (the CUDA provider's NHWC kernels use the tensor cores without transposes)"
                if layout == "nhwc"
                else "fp32 or CPU"
            )
        )
    elif layout == "nhwc" and not on_gpu:
        raise BackendUnavailable("layout nhwc is a CUDA provider preference; the CPU provider has none")
    layout = layout.upper()

    if batch_buckets == "auto":
        largest = max_batch_size or (GPU_MAX_BATCH if on_gpu else CPU_MAX_BATCH)
        buckets = powers_of_two(largest) if on_gpu else ()
        reasons.append(
            f"batch buckets {','.join(map(str, buckets))}: every GPU session sees one shape"
            if on_gpu
            else f"one session for any batch size up to {largest}: CPU kernels take any shape at no extra cost"
        )
    elif batch_buckets == "none":
        if on_gpu:
            raise BackendUnavailable("batch buckets 'none' means one session for all shapes: refused on a GPU")
        buckets, largest = (), max_batch_size or CPU_MAX_BATCH
    else:
        try:
            buckets = parse_buckets(batch_buckets)
        except ValueError as exc:
            raise BackendUnavailable(str(exc)) from None
        largest = max_batch_size or buckets[-1]
    if buckets and largest > buckets[-1]:
        reasons.append(f"batches over {buckets[-1]} are split into runs of {buckets[-1]}")

    if cuda_graph == "auto":
        graph = on_gpu and bool(buckets)
        reasons.append("CUDA graph " + ("on: one fixed shape per session" if graph else "off: not on a GPU"))
    else:
        graph = cuda_graph == "on"
        if graph and not on_gpu:
            raise BackendUnavailable("--cuda-graph on needs the CUDA provider")
    return Plan(on_gpu, model_path, precision, layout, buckets, largest, graph, reasons)


def nvidia_driver_present() -> bool:
    try:
        ctypes.CDLL("libcuda.so.1")
    except OSError:
        return False
    return True


def cuda_usable(ort: Any, provider: str) -> bool:
    """Whether to try CUDA: asked for or 'auto', a driver present, a CUDA build. Raises if 'cuda' cannot be had."""
    if provider == "cpu":
        return False
    if not nvidia_driver_present():  # spares the log ONNX Runtime's own CUDA loading errors
        if provider == "cuda":
            raise BackendUnavailable("--provider cuda asked for, but no NVIDIA driver (libcuda.so.1) is present")
        log.info("no NVIDIA driver (libcuda.so.1) found; using CPU")
        return False
    preload_cuda_libraries(ort)
    if CUDA not in ort.get_available_providers():
        if provider == "cuda":
            raise BackendUnavailable(
                "--provider cuda asked for, but this onnxruntime build has no CUDA provider (install onnxruntime-gpu)"
            )
        log.info("CUDAExecutionProvider not in this onnxruntime build; using CPU")
        return False
    return True


def preload_cuda_libraries(ort: Any) -> None:
    """Load CUDA and cuDNN before the CUDA provider looks for them.

    onnxruntime-gpu >= 1.21 finds the nvidia-* wheels installed beside it (`preload_dlls`). Where they were
    installed with another package (PyTorch's, on a machine that has torch but carries onnxruntime-gpu
    elsewhere), each library still missing is looked for in every `nvidia/*/lib` folder on the path.
    Whatever is loaded first is what the provider uses; a library missing everywhere only means no CUDA,
    found out when the first session starts.
    """
    if hasattr(ort, "preload_dlls"):
        try:
            ort.preload_dlls()
        except Exception as exc:  # noqa: BLE001
            log.debug("preload_dlls: %s", exc)
    try:
        from onnxruntime.capi import build_and_package_info as build

        major = str(build.cuda_version).split(".")[0]
    except (ImportError, AttributeError):
        return  # a CPU build: nothing to load
    spec = importlib.util.find_spec("nvidia")
    roots = list(spec.submodule_search_locations or []) if spec else []
    names = [f"libcudart.so.{major}", f"libcublasLt.so.{major}", f"libcublas.so.{major}", "libcurand.so.10",
             f"libnvrtc.so.{major}", "libcudnn.so.9"]  # fmt: skip
    for name in names:
        try:
            ctypes.CDLL(name)  # already loaded, or on the loader's own path
            continue
        except OSError:
            pass
        for candidate in (path for root in roots for path in sorted(Path(root).glob(f"*/lib/{name}"))):
            try:
                ctypes.CDLL(str(candidate))
                log.info("loaded %s", candidate)
                break
            except OSError as exc:
                log.debug("cannot load %s: %s", candidate, exc)


def gpu_description() -> str:
    """'NVIDIA H200 (driver 580.65.06, 143771 MiB)' from nvidia-smi, or what is known without it."""
    if shutil.which("nvidia-smi"):
        try:
            out = subprocess.run(
                ["nvidia-smi", "-i", "0", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                capture_output=True,
                text=True,
                timeout=10,
            ).stdout.strip()
            name, driver, memory = (part.strip() for part in out.split(","))
            return f"{name} (driver {driver}, {memory})"
        except (OSError, subprocess.SubprocessError, ValueError):
            pass
    return "CUDA device 0"


def runtime_description(ort: Any) -> str:
    """'onnxruntime-gpu 1.31.1 (CUDA 13.0, cuDNN 9)' as far as the package says."""
    try:
        from onnxruntime.capi import build_and_package_info as build
    except ImportError:  # pragma: no cover - every wheel has it
        build = None
    name = getattr(build, "package_name", "onnxruntime")
    details = [
        f"{label} {getattr(build, attr)}"
        for label, attr in (("CUDA", "cuda_version"), ("cuDNN", "cudnn_version"))
        if getattr(build, attr, None)
    ]
    return f"{name} {ort.__version__}" + (f" ({', '.join(details)})" if details else "")


class BucketSession:
    """One session fixed at one batch shape, with its input and outputs bound to buffers allocated once."""

    def __init__(
        self,
        ort: Any,
        session: Any,
        bucket: int,
        device: str,
        graph: bool = False,
        outputs: Sequence[str] = OUTPUT_NAMES,
    ) -> None:
        self.session, self.bucket, self.graph = session, bucket, graph
        self.host = np.zeros((bucket, *INPUT_SHAPE), INPUT_DTYPE)  # staging for padded batches
        self.input = ort.OrtValue.ortvalue_from_shape_and_type((bucket, *INPUT_SHAPE), INPUT_DTYPE, device, 0)
        self.outputs = {
            name: ort.OrtValue.ortvalue_from_shape_and_type(
                (bucket,) if name == DIGIT_SCORE else (bucket, NUM_CLASSES), np.float32, device, 0
            )
            for name in outputs
        }
        self.binding = session.io_binding()
        self.binding.bind_ortvalue_input(INPUT_NAME, self.input)
        for name, value in self.outputs.items():
            self.binding.bind_ortvalue_output(name, value)

    def run(self, images: np.ndarray, output: str = PROBABILITIES) -> np.ndarray:
        """Up to `bucket` images -> their rows of `output` (a copy)."""
        return self.run_outputs(images, (output,))[0]

    def run_outputs(self, images: np.ndarray, outputs: Sequence[str]) -> list[np.ndarray]:
        """Up to `bucket` images -> their rows of each of `outputs` (copies), from one run."""
        count = len(images)
        if count == self.bucket and images.flags.c_contiguous and images.dtype == INPUT_DTYPE:
            source = images
        else:
            self.host[:count] = images
            self.host[count:] = 0.0
            source = self.host
        self.input.update_inplace(source)  # host -> device (or into the CPU buffer): same address every run
        self.session.run_with_iobinding(self.binding)
        return [np.array(self.outputs[output].numpy()[:count]) for output in outputs]


@dataclass(frozen=True)
class OnnxRuntimeOptions:
    """This engine's options, and only its: what `mnist-serve`'s flags (or a model's config.pbtxt) say of it."""

    provider: str = "auto"
    precision: str = "auto"
    layout: str = "auto"
    batch_buckets: str = "auto"
    max_batch_size: int = 0
    cuda_graph: str = "auto"
    cudnn_conv_algo_search: str = "EXHAUSTIVE"
    intra_op_threads: int = 0
    spinning: str = "auto"

    @classmethod
    def from_config(cls, config: ServeConfig) -> OnnxRuntimeOptions:
        return cls(
            provider=config.provider,
            precision=config.precision,
            layout=config.layout,
            batch_buckets=config.batch_buckets,
            max_batch_size=config.max_batch_size,
            cuda_graph=config.cuda_graph,
            cudnn_conv_algo_search=config.cudnn_conv_algo_search,
            intra_op_threads=config.intra_op_threads,
            spinning=config.ort_spinning,
        )


class OnnxRuntimeBackend:
    """The model on ONNX Runtime; see the module docstring for the GPU design."""

    blocking = True  # a session run takes 0.5 ms and more: it runs on the batch runner thread

    def __init__(
        self,
        model: str | Path,
        provider: str = "auto",
        precision: str = "auto",
        layout: str = "auto",
        batch_buckets: str = "auto",
        max_batch_size: int = 0,
        cuda_graph: str = "auto",
        cudnn_conv_algo_search: str = "EXHAUSTIVE",
        intra_op_threads: int = 0,
        spinning: str = "auto",
        session_factory: SessionFactory | None = None,
    ) -> None:
        import onnxruntime as ort

        self._ort = ort
        self._session_factory = session_factory or ort.InferenceSession
        self._intra_op_threads = intra_op_threads
        self._spinning = spinning
        self._cudnn_search = cudnn_conv_algo_search
        on_gpu = cuda_usable(ort, provider)
        self.plan = resolve_plan(Path(model), on_gpu, precision, layout, batch_buckets, max_batch_size, cuda_graph)
        self._dynamic_session: Any = None
        self._buckets: dict[int, BucketSession] = {}
        self._outputs: tuple[str, ...] = OUTPUT_NAMES  # what the model file gives; `_check_io` sets it
        try:
            with gpu_turn(on_gpu):  # session builds allocate device memory: not while another version captures
                self._open_sessions()
        except BackendUnavailable as exc:
            if not (on_gpu and provider == "auto"):
                raise
            log.warning("%s; --provider auto: serving on the CPU instead", exc)
            with gpu_turn(on_gpu):  # the GPU sessions already built are released here
                self._buckets.clear()
            self.plan = resolve_plan(Path(model), False, precision, layout, batch_buckets, max_batch_size, cuda_graph)
            self._open_sessions()
        meta_props = self._any_session().get_modelmeta().custom_metadata_map
        try:
            self.metadata = ModelMetadata.from_props(meta_props)
        except ValueError as exc:
            raise BackendUnavailable(f"{self.plan.model_path}: {exc}") from None
        if self.metadata.precision != self.plan.precision:
            raise BackendUnavailable(
                f"{self.plan.model_path} says it is {self.metadata.precision}, but precision {self.plan.precision} "
                "was planned"
            )
        self.has_digit_score = DIGIT_SCORE in self._outputs
        if self.has_digit_score != self.metadata.has_digit_score:
            raise BackendUnavailable(
                f"{self.plan.model_path} has "
                + (
                    f"a {DIGIT_SCORE!r} output but no digit_threshold in its metadata"
                    if self.has_digit_score
                    else f"a digit_threshold in its metadata but no {DIGIT_SCORE!r} output"
                )
                + "; re-export it with mnist-export (--add-digit-score adds the score to an existing file)"
            )
        # What each run fetches: the probabilities, and the score when the model computes it
        self._fetch = [PROBABILITIES, DIGIT_SCORE] if self.has_digit_score else [PROBABILITIES]
        self.sha256 = hashlib.sha256(self.plan.model_path.read_bytes()).hexdigest()
        self.providers: tuple[str, ...] = tuple(self._any_session().get_providers())
        self._device = gpu_description() if self.plan.on_gpu else "CPU"
        for reason in self.plan.reasons:
            log.info("%s", reason)

    @classmethod
    def from_options(cls, model: str | Path, options: OnnxRuntimeOptions) -> OnnxRuntimeBackend:
        return cls(model, **asdict(options))

    @classmethod
    def from_config(cls, config: ServeConfig) -> OnnxRuntimeBackend:
        """The model `config.model` with the engine's options from the configuration (a model's own settings from
        its config.pbtxt already in place of the flags: server/models/model_settings.py)."""
        return cls.from_options(config.model, OnnxRuntimeOptions.from_config(config))

    # --- sessions --------------------------------------------------------------------------------------

    def _provider_options(self, graph: bool) -> dict[str, str]:
        return {
            "cudnn_conv_algo_search": self._cudnn_search,  # one search per session, at warm-up: the best kernels
            "do_copy_in_default_stream": "1",
            "prefer_nhwc": "1" if self.plan.layout == "NHWC" else "0",
            "enable_cuda_graph": "1" if graph else "0",
        }

    def _new_session(self, bucket: int | None, graph: bool) -> Any:
        ort = self._ort
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        threads = self._intra_op_threads or (1 if self.plan.on_gpu else 0)  # the GPU needs no CPU thread pool
        if threads:
            options.intra_op_num_threads = threads
        if not self._spins():
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        elif not self._spins_between_runs():
            options.add_session_config_entry("session.force_spinning_stop", "1")
        if bucket is not None:  # a static batch axis: this session can run no other shape
            options.add_free_dimension_override_by_name(BATCH_AXIS, bucket)
        providers: list[Any] = [CPU]
        if self.plan.on_gpu:
            providers = [(CUDA, self._provider_options(graph)), CPU]
        try:
            session = self._session_factory(str(self.plan.model_path), options, providers=providers)
        except Exception as exc:  # noqa: BLE001 - not an ONNX file, unsupported op, CUDA failure, ...
            raise BackendUnavailable(f"ONNX Runtime cannot load {self.plan.model_path}: {exc}") from None
        if self.plan.on_gpu and session.get_providers()[0] != CUDA:
            raise BackendUnavailable(
                f"ONNX Runtime could not start CUDA for {self.plan.model_path} (providers in use: "
                f"{session.get_providers()}); run with --provider cpu to serve on the CPU"
            )
        self._check_io(session)
        if bucket is not None and session.get_inputs()[0].shape[0] != bucket:
            raise BackendUnavailable(
                f"{self.plan.model_path}: the batch axis of {INPUT_NAME!r} is {session.get_inputs()[0].shape[0]!r}, "
                f"not the contract's {BATCH_AXIS!r}, so it could not be fixed at {bucket}; re-export with mnist-export"
            )
        return session

    def _check_io(self, session: Any) -> None:
        """The contract (proto/contract.py): one float input; logits and probabilities, optionally digit_score."""
        inputs = [(i.name, i.type) for i in session.get_inputs()]
        outputs = [(o.name, o.type) for o in session.get_outputs()]
        allowed = {names: [(name, "tensor(float)") for name in names] for names in (OUTPUT_NAMES, SCORED_OUTPUT_NAMES)}
        matching = [names for names, expected in allowed.items() if outputs == expected]
        if inputs != [(INPUT_NAME, "tensor(float)")] or not matching:
            raise BackendUnavailable(
                f"{self.plan.model_path} has inputs {inputs} and outputs {outputs}; the contract is "
                f"[({INPUT_NAME!r}, 'tensor(float)')] and {allowed[OUTPUT_NAMES]}, optionally followed by "
                f"({DIGIT_SCORE!r}, 'tensor(float)') [batch]"
            )
        score_shape = next((o.shape for o in session.get_outputs() if o.name == DIGIT_SCORE), None)
        if score_shape is not None and len(score_shape) != 1:
            raise BackendUnavailable(
                f"{self.plan.model_path}: output {DIGIT_SCORE!r} has shape {score_shape}; the contract is [batch]"
            )
        self._outputs = matching[0]

    def _spins(self) -> bool:
        """Whether intra-op threads spin at all: not with --ort-spinning off."""
        return self._spinning != "off"

    def _spins_between_runs(self) -> bool:
        """Whether they go on spinning after a run returns, ready for the next (`auto`, `on`: ONNX Runtime's default),
        or stop as it returns (`run`). Measured on the 2-core CPU with the bundled model: a lone call's p50 is 0.3 ms
        lower when they spin between runs (one client, alternating rounds against the server of 430fc00, which spun
        as ONNX Runtime does by default), and at 150 calls/s (a third of capacity) the p99 is 6-7 ms instead of
        12-13 ms, inside the load test's 10 ms objective; the price is CPU, about 10 ms of it per call at that rate
        against 5 ms (1.5 cores instead of 0.8), and none once the server is idle. `run` is for a CPU deployment
        whose cores are shared or capped by a quota; `off` never spins (a lone call about 0.5 ms slower still)."""
        return self._spinning in ("auto", "on")

    def _open_sessions(self) -> None:
        if not self.plan.buckets:
            self._dynamic_session = self._new_session(None, graph=False)
            return
        for bucket in self.plan.buckets:
            self._buckets[bucket] = self._bucket_session(bucket, self.plan.cuda_graph)

    def _bucket_session(self, bucket: int, graph: bool) -> BucketSession:
        device = "cuda" if self.plan.on_gpu else "cpu"
        try:
            session = self._new_session(bucket, graph)
            return BucketSession(self._ort, session, bucket, device, graph, self._outputs)
        except BackendUnavailable as exc:
            if not graph:
                raise
            log.warning("batch bucket %d: no session with a CUDA graph (%s); building it without", bucket, exc)
            session = self._new_session(bucket, False)
            return BucketSession(self._ort, session, bucket, device, False, self._outputs)

    def _any_session(self) -> Any:
        return self._dynamic_session or next(iter(self._buckets.values())).session

    # --- the Backend protocol --------------------------------------------------------------------------

    def describe(self) -> BackendInfo:
        ort, plan = self._ort, self.plan
        options = self._provider_options(plan.cuda_graph) if plan.on_gpu else {}
        if self._intra_op_threads:
            options["intra_op_num_threads"] = str(self._intra_op_threads)
        options["intra_op_spinning"] = "off" if not self._spins() else "on" if self._spins_between_runs() else "run"
        return BackendInfo(
            engine="onnxruntime",
            model_name=self.metadata.model_name,
            model_version=self.metadata.model_version,
            model_sha256=self.sha256,
            model_path=str(plan.model_path),
            test_accuracy=self.metadata.test_accuracy,
            providers=self.providers,
            precision=plan.precision,
            layout=plan.layout,
            batch_buckets=plan.buckets,
            max_batch_size=plan.max_batch_size,
            cuda_graph=bool(self._buckets) and all(session.graph for session in self._buckets.values()),
            io_binding=bool(plan.buckets),
            device=self._device,
            runtime=runtime_description(ort),
            options=options,
            normalization=self.metadata.norm,
            digit_threshold=self.metadata.digit_threshold,
            digit_detector=self.metadata.digit_detector or {},
        )

    def run(self, images: np.ndarray) -> BackendOutput:
        if self._dynamic_session is not None:
            fetched = self._dynamic_session.run(self._fetch, {INPUT_NAME: images})
            return BackendOutput(fetched[0], fetched[1] if self.has_digit_score else None)
        probabilities = np.empty((len(images), NUM_CLASSES), np.float32)
        scores = np.empty(len(images), np.float32) if self.has_digit_score else None
        for run in plan_runs(len(images), self.plan.buckets):
            fetched = self._buckets[run.bucket].run_outputs(images[run.start : run.stop], self._fetch)
            probabilities[run.start : run.stop] = fetched[0]
            if scores is not None:
                scores[run.start : run.stop] = fetched[1]
        return BackendOutput(probabilities, scores)

    def warm_up(self) -> float:
        """Run every bucket (capturing its CUDA graph) and check it answers like the largest one; returns seconds.

        A bucket whose CUDA graph fails to capture or replays wrong answers is rebuilt without the graph
        (logged); a bucket that still answers wrongly stops the start: better no server than wrong digits.
        On the GPU it holds the process's GPU turn throughout: the graphs are captured here (see `_GPU_TURN`).
        """
        with gpu_turn(self.plan.on_gpu):
            return self._warm_up()

    def _warm_up(self) -> float:
        started = time.perf_counter()
        rng = np.random.default_rng(20)  # not zeros: zeros hide unwritten buffers and wrong rows
        largest = max(self.plan.buckets or (self.plan.max_batch_size,))
        probes = tuple(rng.normal(size=(largest, *INPUT_SHAPE)).astype(INPUT_DTYPE) for _ in range(2))
        if self._dynamic_session is not None:
            self.run(probes[0])
            self.run(probes[0][:1])
            return time.perf_counter() - started
        reference: np.ndarray | None = None
        for bucket in sorted(self.plan.buckets, reverse=True):  # the largest first: it is the reference
            logits, problem = self._try_bucket(bucket, probes, reference)
            if problem and self._buckets[bucket].graph:
                log.warning("batch bucket %d with a CUDA graph %s; rebuilding it without the graph", bucket, problem)
                self._buckets[bucket] = self._bucket_session(bucket, graph=False)
                logits, problem = self._try_bucket(bucket, probes, reference)
            if problem:
                raise BackendUnavailable(f"batch bucket {bucket} {problem}; refusing to serve")
            reference = logits if reference is None else reference
        without = [b for b, s in self._buckets.items() if self.plan.cuda_graph and not s.graph]
        if without:
            log.warning("CUDA graphs off for batch buckets %s (see above); the others replay graphs", without)
        return time.perf_counter() - started

    def _try_bucket(
        self, bucket: int, probes: tuple[np.ndarray, np.ndarray], reference: np.ndarray | None
    ) -> tuple[np.ndarray, str]:
        """Warm one bucket on one probe, answer the other: (its logits, '' or what is wrong with them)."""
        session = self._buckets[bucket]
        try:
            for _ in range(WARM_RUNS):
                first = session.run(probes[0][:bucket], LOGITS)
            logits = session.run(probes[1][:bucket], LOGITS)
        except Exception as exc:  # noqa: BLE001 - a failed capture or run
            return np.empty(0), f"failed to run ({exc})"
        if not np.isfinite(logits).all():
            return logits, "returns non-finite logits"
        if np.array_equal(first, logits):
            return logits, "gives the same answer for different images"
        if reference is not None:
            error = float(np.abs(logits - reference[:bucket]).max() / max(1.0, float(np.abs(reference).max())))
            limit = BUCKET_AGREEMENT[self.plan.precision]
            log.info("batch bucket %d agrees with the largest: relative error %.1e (limit %.0e)", bucket, error, limit)
            if error > limit:
                return logits, f"disagrees with the largest bucket (relative error {error:.2e})"
        return logits, ""

    def close(self) -> None:
        """Release the sessions; on the GPU in the process's GPU turn: freeing device memory while another version
        captures its CUDA graphs would break that capture."""
        with gpu_turn(self.plan.on_gpu):
            self._buckets.clear()
            self._dynamic_session = None
