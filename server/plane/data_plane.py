"""The one data plane: every operation the service offers, transport-free, over the model repository.

Three transports translate to it and nothing else: `mnist.v1` over gRPC (server/transport/service.py), the Open
Inference Protocol over gRPC (server/transport/oip_grpc.py) and over HTTP (server/transport/rest.py, which also serves
`/read` and the web page). Here a request is routed to the model version it names (leases, so a version
being unloaded finishes its calls first), run through that version's pipeline (server/pipeline/model_pipeline.py), and
counted in the version's statistics whatever protocol carried it. Failures are domain errors
(server/errors.py); each transport maps them to its own status codes.

Adding an operation: a method here, then one small function per transport that exposes it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import TYPE_CHECKING

import numpy as np

from proto.contract import INPUT_NAME, INPUT_SHAPE, NUM_CLASSES, PROBABILITIES
from server.errors import InvalidInput, Overloaded, Unsupported
from server.models.repository import Lease, ModelRepository, ServedModel, VersionStatus
from server.pipeline.digit_scores import config_parameters as digit_score_parameters
from server.pipeline.model_pipeline import ENCODED
from server.pipeline.predictions import Predictions
from server.plane.oip import DIGIT, EXTENSIONS, OUTPUTS, PLATFORM, SERVER_NAME, Tensor, images_from

if TYPE_CHECKING:  # server.pipeline.reading needs scipy, which only the Read* calls need
    from server.feedback.loop import FeedbackLoop, FeedbackResult
    from server.pipeline.expressions import Expression
    from server.pipeline.reading import Reading
    from server.pipeline.tables import Table


@dataclass
class ModelStatistics:
    """Counts for the Open Inference Protocol's statistics extension (Triton's ModelStatistics), per model version,
    of every request that ran on it, whichever protocol carried it."""

    inference_count: int = 0  # images answered
    execution_count: int = 0  # requests answered
    success_count: int = 0
    success_ns: int = 0
    fail_count: int = 0
    fail_ns: int = 0
    last_inference_ms: int = 0  # wall-clock time of the last request, ms since the epoch
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def as_json(self, name: str, version: str) -> dict:
        """One entry of the protocol's model_stats, in its JSON form (REST sends it, gRPC parses it)."""
        with self.lock:
            return {
                "name": name,
                "version": version,
                "last_inference": self.last_inference_ms,
                "inference_count": self.inference_count,
                "execution_count": self.execution_count,
                "inference_stats": {
                    "success": {"count": self.success_count, "ns": self.success_ns},
                    "fail": {"count": self.fail_count, "ns": self.fail_ns},
                },
            }

    def record(self, images: int, seconds: float, ok: bool) -> None:
        with self.lock:
            ns = int(seconds * 1e9)
            if ok:
                self.inference_count += images
                self.execution_count += 1
                self.success_count += 1
                self.success_ns += ns
            else:
                self.fail_count += 1
                self.fail_ns += ns
            self.last_inference_ms = int(time.time() * 1000)


class _Counted:
    """One request held on its version and counted in the version's statistics, as a success or, if it raises, a
    failure (`with plane._counted(...) as (served, count)`; `count.images`: how many images the request turned out
    to hold, known only once its input is read). A class, not a generator, as `ModelRepository.lease`."""

    __slots__ = ("lease", "stats", "images", "started")

    def __init__(self, lease: Lease, stats: ModelStatistics) -> None:
        self.lease, self.stats, self.images = lease, stats, 0

    def __enter__(self) -> tuple[ServedModel, _Counted]:
        served = self.lease.__enter__()
        self.started = time.perf_counter()
        return served, self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> None:
        try:
            self.stats.record(self.images, time.perf_counter() - self.started, ok=kind is None)
        finally:
            self.lease.__exit__(kind, error, traceback)


def platform_of(engine: str) -> str:
    """Triton's platform name for what an engine runs (`onnxruntime_onnx` for an ONNX model on ONNX Runtime)."""
    return {"onnxruntime": PLATFORM}.get(engine, engine)


class DataPlane:
    """Every operation of the service over the model repository (server/models/repository.py)."""

    def __init__(
        self,
        models: ModelRepository,
        max_images: int,
        server_version: str,
        model_control: str = "off",
        max_read_digits: int = 0,
        max_table_cells: int = 0,
    ) -> None:
        self.models = models
        self.max_images = max_images
        self.max_read_digits = max_read_digits  # and symbols per expression
        self.max_table_cells = max_table_cells
        self.server_version = server_version
        self.model_control = model_control == "on"
        self.draining = False  # set when shutdown begins: ServerReady and ModelReady turn false; calls still served
        self._statistics: dict[tuple[str, str], ModelStatistics] = {}
        self.feedback: FeedbackLoop | None = None  # answers remembered for labels (server/feedback/loop.py)

    # --- health and metadata --------------------------------------------------------------------

    def live(self) -> bool:
        return True

    def ready(self) -> bool:
        return bool(self.models.served()) and not self.draining

    def model_ready(self, name: str, version: str = "") -> bool:
        return not self.draining and self.models.model_ready(name, version)

    def server_metadata(self) -> dict:
        return {"name": SERVER_NAME, "version": self.server_version, "extensions": list(EXTENSIONS)}

    def model_metadata(self, name: str, version: str = "") -> dict:
        served = self.served(name, version)
        versions = [s.version for s in self.models.served() if s.name == served.name]
        return {
            "name": served.name,
            "versions": versions if not version else [served.version],
            "platform": platform_of(served.pipeline.info.engine),
            "inputs": [{"name": INPUT_NAME, "datatype": "FP32", "shape": [-1, *INPUT_SHAPE]}],
            "outputs": [
                {"name": PROBABILITIES, "datatype": "FP32", "shape": [-1, NUM_CLASSES]},
                {"name": DIGIT, "datatype": "INT64", "shape": [-1]},
            ],
        }

    def model_config(self, name: str, version: str = "") -> dict:
        """Triton's ModelConfig in its JSON form (dims without the batch axis), for perf_analyzer and friends, from
        what the version's engine and batcher report; its parameters say how the engine runs the model and where
        the answers' digit_score comes from."""
        served = self.served(name, version)
        info, settings = served.pipeline.info, served.pipeline.settings
        versions = [int(s.version) for s in self.models.served() if s.name == served.name and s.version.isdigit()]
        engine = {
            "engine": info.engine,
            "device": info.device,
            "precision": info.precision,
            "layout": info.layout,
            "batch_buckets": ",".join(map(str, info.batch_buckets)) or "any",
            "cuda_graph": "on" if info.cuda_graph else "off",
            **{f"engine_{key}": str(value) for key, value in sorted(info.options.items())},
        }
        return {
            "name": served.name,
            "platform": platform_of(info.engine),
            "backend": info.engine,
            "max_batch_size": min(info.max_batch_size, self.max_images),
            "input": [{"name": INPUT_NAME, "data_type": "TYPE_FP32", "dims": list(INPUT_SHAPE)}],
            "output": [
                {"name": PROBABILITIES, "data_type": "TYPE_FP32", "dims": [NUM_CLASSES]},
                {"name": DIGIT, "data_type": "TYPE_INT64", "dims": [1], "reshape": {"shape": []}},
            ],
            "version_policy": {"specific": {"versions": versions}} if versions else {"latest": {"num_versions": 1}},
            "dynamic_batching": {"max_queue_delay_microseconds": str(round(settings.max_queue_delay * 1e6))},
            "instance_group": [{"name": served.name, "count": 1, "kind": "KIND_GPU" if info.on_gpu else "KIND_CPU"}],
            # how the engine runs it, and where each answer's digit_score comes from (the model's own output or a
            # separate detector file)
            "parameters": {
                **{key: {"string_value": value} for key, value in engine.items()},
                **digit_score_parameters(served.pipeline.detector),
            },
        }

    def model_info(self, name: str, version: str = "") -> ServedModel:
        """The version a request naming `name` and `version` would get: its pipeline describes its engine
        (`pipeline.info`) and its digit score (`pipeline.detector`)."""
        return self.served(name, version)

    def list_models(self) -> tuple[list[VersionStatus], str]:
        """Every version the server knows of and its state, and the default model's name."""
        return self.models.statuses(), self.models.default_model

    def repository_index(self) -> list[dict]:
        """Every version the server knows of and its state (READY, LOADING, FAILED, UNLOADING), as Triton lists."""
        return [
            {"name": s.name, "version": s.version, "state": s.state, "reason": s.reason} for s in self.models.statuses()
        ]

    def statistics(self, name: str = "", version: str = "") -> list[dict]:
        """The protocol's model_stats entries of every READY version, or of the one named (NotFound if not served)."""
        if name and version:
            served = self.served(name, version)
            rows = [(served.name, served.version)]
        else:  # every version of the model named (all of them: the protocol's empty version), or of every model
            rows = [(s.name, s.version) for s in self.models.served() if not name or s.name == name]
            if name and not rows:
                self.served(name)  # NotFound naming what is served
        return [self._statistics.setdefault((n, v), ModelStatistics()).as_json(n, v) for n, v in rows]

    def forget(self, name: str, version: str) -> None:
        """A version is gone: its statistics go with it."""
        self._statistics.pop((name, version), None)

    # --- feedback: labels for earlier answers -----------------------------------------------------

    def remember(self, predictions: Predictions, request_ids: Sequence[str]) -> None:
        """Classify's answers, for a label sent later (a dictionary insert; nothing when feedback is off)."""
        if self.feedback is not None:
            self.feedback.remember(predictions, request_ids)

    def remember_batch(self, predictions: Predictions, prefix: str) -> None:
        """A raw batch's answers under generated ids sharing `prefix` (server/transport/wire.py)."""
        if self.feedback is not None:
            self.feedback.remember_batch(predictions, prefix)

    def remember_reading(self, served: ServedModel, request_id: str, reading: Reading) -> None:
        if self.feedback is not None:
            self.feedback.remember_reading(
                served.name, served.version, request_id, reading.text, reading.confidence, reading.images
            )

    async def feedback_for(
        self,
        request_id: str,
        label: int | None,
        text: str | None,
        model: str = "",
        forwarded: bool = False,
        authorization: str | None = None,
    ) -> FeedbackResult:
        """The true label of an earlier answer: joined, counted in live quality and stored (server/feedback/), by the
        worker or replica that gave the answer (`forwarded`: sent by another replica; `authorization`: the caller's,
        for the replicas asked)."""
        if self.feedback is None:
            raise Unsupported("this server keeps no answers for feedback")
        return await self.feedback.take_anywhere(request_id, label, text, model, forwarded, authorization)

    # --- model control (explicit loads and unloads, when enabled) ---------------------------------

    async def load_model(self, name: str) -> None:
        self._check_control()
        await self.models.load_model(name)

    async def unload_model(self, name: str) -> None:
        self._check_control()
        await self.models.unload_model(name)

    def _check_control(self) -> None:
        if not self.model_control:
            raise Unsupported(
                "model control is off on this server: start it with --model-control on (and --model-repository) to "
                "load and unload models through the API; new versions in the repository are picked up by polling"
            )

    # --- inference --------------------------------------------------------------------------------

    def refusal_before_reading(self, deadline: float | None) -> Overloaded | None:
        """The refusal any inference request would get now, decided before its message is read: while a single
        version is served and its queue would refuse even one image for this deadline (or for standing above its
        target). Counted as a failed request of that version. None: read the request, and decide on what it holds.

        A request that names another model, or holds a bad image, is refused with the rest while this lasts: it is
        then told to retry later rather than what it got wrong, in exchange for a refusal that costs the server no
        read of the message (server/transport/guards.py)."""
        served = self.models.sole_version()
        if served is None:
            return None
        refused = served.pipeline.batcher.refusal(1, deadline)
        if refused is not None:
            self._statistics_of(served.name, served.version).record(0, 0.0, False)
            self.models.observer.on_request(served.name, served.version, 0.0, refused)
        return refused

    def _counted(self, name: str, version: str) -> _Counted:
        """Lease the version and count the request in its statistics, as a success or, if it raises, a failure."""
        lease = self.models.lease(name, version)
        return _Counted(lease, self._statistics_of(lease.served.name, lease.served.version))

    def _statistics_of(self, name: str, version: str) -> ModelStatistics:
        key = (name, version)  # get first: no new ModelStatistics (and lock) per call
        return self._statistics.get(key) or self._statistics.setdefault(key, ModelStatistics())

    async def classify(
        self, name: str, version: str, payloads: Sequence[bytes], kinds: Sequence[str | None] | None, deadline: float
    ) -> Predictions:
        """Images as clients send them (raw 28x28 bytes or encoded files; `kinds` None: all raw) -> predictions."""
        with self._counted(name, version) as (served, count):
            count.images = len(payloads)
            return await served.pipeline.classify(payloads, kinds, deadline)

    async def classify_tensor(self, name: str, version: str, pixels: np.ndarray, deadline: float | None) -> Predictions:
        """Raw images already joined as one uint8 array [N, 28, 28] (a raw batch off the wire) -> predictions."""
        with self._counted(name, version) as (served, count):
            count.images = len(pixels)
            return await served.pipeline.classify_tensor(pixels, deadline)

    async def read_digits(
        self, name: str, version: str, image: bytes, expected_digits: int, deadline: float | None
    ) -> tuple[ServedModel, Reading, tuple[int, int]]:
        """The number written in an image file: the version that read it, the reading, and the image's size."""
        if not image:
            raise InvalidInput("no image: send an image file (PNG, JPEG, ...) holding the digits to read")
        if not 0 <= expected_digits <= self.max_read_digits:
            raise InvalidInput(f"expected_digits {expected_digits} is over the limit of {self.max_read_digits}")
        with self._counted(name, version) as (served, count):
            count.images = 1
            reading, size = await served.pipeline.read_digits(image, expected_digits, deadline, self.max_read_digits)
            return served, reading, size

    async def read_table(
        self, name: str, version: str, image: bytes, deadline: float | None
    ) -> tuple[ServedModel, Table, tuple[int, int]]:
        """The table of numbers in an image file: the version that read it, the table, and the image's size."""
        if not image:
            raise InvalidInput("no image: send an image file (PNG, JPEG, ...) holding the table to read")
        with self._counted(name, version) as (served, count):
            count.images = 1
            table, size = await served.pipeline.read_table(image, deadline, self.max_table_cells)
            return served, table, size

    async def read_expression(
        self, name: str, version: str, image: bytes, deadline: float | None
    ) -> tuple[ServedModel, Expression, tuple[int, int]]:
        """The arithmetic written in an image file, read and evaluated: the version, the expression, the size."""
        if not image:
            raise InvalidInput("no image: send an image file (PNG, JPEG, ...) holding the expression to read")
        with self._counted(name, version) as (served, count):
            count.images = 1
            expression, size = await served.pipeline.read_expression(image, deadline, self.max_read_digits)
            return served, expression, size

    async def infer(
        self,
        name: str,
        version: str,
        inputs: Sequence[Tensor],
        requested: Sequence[str] | None = None,
        deadline: float | None = None,
    ) -> tuple[str, str, list[Tensor]]:
        """The Open Inference Protocol's infer: the requested outputs (all when `requested` is empty) for `inputs`;
        returns the name and version of the model that answered, and the outputs."""
        with self._counted(name, version) as (served, count):
            wanted = list(requested or OUTPUTS)
            unknown = [output for output in wanted if output not in OUTPUTS]
            if unknown:
                raise InvalidInput(f"unknown output {unknown[0]!r}; this model gives {', '.join(OUTPUTS)}")
            if len(set(wanted)) != len(wanted):
                raise InvalidInput("an output is requested more than once; name each at most once")
            if len(inputs) != 1:
                raise InvalidInput(f"send exactly one input, '{INPUT_NAME}' (got {len(inputs)})")
            pixels = images_from(inputs[0], self.max_images)
            count.images = len(pixels)
            try:
                if pixels.dtype == object:  # encoded images: decoded and prepared as mnist.v1's are
                    predictions = await served.pipeline.classify(list(pixels), [ENCODED] * len(pixels), deadline)
                else:
                    predictions = await served.pipeline.classify_tensor(pixels, deadline)
            except InvalidInput as err:
                if err.index is None:
                    raise
                raise InvalidInput(f"input '{INPUT_NAME}', image {err.index}: {err}", err.index) from None
        n = len(predictions)
        tensors = {
            PROBABILITIES: Tensor(PROBABILITIES, "FP32", (n, NUM_CLASSES), predictions.probabilities.astype("<f4")),
            DIGIT: Tensor(DIGIT, "INT64", (n,), predictions.digits.astype("<i8")),
        }
        return served.name, predictions.model_version, [tensors[output] for output in wanted]

    def served(self, name: str, version: str = "") -> ServedModel:
        """The READY version serving `name` at `version` ("" = its default); NotReady or NotFound naming what is."""
        return self.models.resolve(name, version)
