"""mnist-serve: wire config, backend, model pipeline, gRPC service, health, reflection and metrics.

Lifecycle, all on one asyncio event loop: gRPC up with health NOT_SERVING -> backend loaded and
every batch shape warmed up (in a worker thread, so health answers meanwhile) -> SERVING ->
(SIGTERM/SIGINT) NOT_SERVING for `drain_seconds` -> refuse new calls, finish in-flight ones within
`grace_seconds` -> exit 0. Waiting calls cost a coroutine each, not a thread.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import gc
import logging
import os
import resource
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
import numpy as np
from grpc_health.v1 import health, health_pb2
from grpc_reflection.v1alpha import reflection, reflection_pb2
from grpc_reflection.v1alpha._async import ReflectionServicer

from server.config import ServeConfig, describe, feedback_peer_targets, load_config, worker_count
from server.engine.backends import build_backend
from server.errors import ServiceError
from server.feedback.answers import AnswerMemory
from server.feedback.loop import FeedbackLoop, FeedbackResult
from server.feedback.peers import FeedbackPeers
from server.feedback.quality import AnswerTally, LiveQuality
from server.feedback.store import QUEUE_FULL, UNAVAILABLE, FeedbackWriter, open_store
from server.models.model_settings import check_against
from server.models.repository import AgreedDefaults, ModelRepository, RepositoryObserver, verify_on_samples
from server.ops.liveness import LoopHeartbeat
from server.ops.metrics import ServiceMetrics
from server.ops.metrics_http import MetricsHttpServer
from server.ops.sockets import cut_connections
from server.ops.worker_link import INDEX_ENV, LINK_ENV, WorkerLink
from server.pipeline.digit_detector import DigitDetector
from server.pipeline.model_pipeline import ModelPipeline, PipelineSettings
from server.pipeline.operators import OperatorModel
from server.pipeline.second_opinion import SecondOpinion
from server.plane.data_plane import DataPlane
from server.security import (
    TokenChecker,
    grpc_server_credentials,
    http_ssl_context,
    load_token_checker,
    peer_channel_credentials,
    redact_url,
)
from server.security import describe as describe_security
from server.tracing import Tracing
from server.transport.guards import CallGate, StreamGate, generic_handler, status_of
from server.transport.health import HealthService
from server.transport.oip_grpc import SERVICE as INFERENCE_SERVICE
from server.transport.oip_grpc import InferenceServicer
from server.transport.oip_grpc import add_to_server as add_inference_to_server
from server.transport.replicas import ReplicaPeers
from server.transport.service import SERVICE, ClassifierServicer, add_to_server

if TYPE_CHECKING:
    from server.transport.rest import RestServer  # imported at start, only when --http-port is set (aiohttp)

log = logging.getLogger("mnist.serve")
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
HEALTH = health_pb2.DESCRIPTOR.services_by_name["Health"]
REFLECTION = reflection_pb2.DESCRIPTOR.services_by_name["ServerReflection"]
METRICS_MAX_CONNECTIONS = 4096  # slow or idle scrapers cost a descriptor each, never a thread
STOP_MARGIN_SECONDS = 10.0  # beyond drain and grace: close the models, flush the last answers, spans (a few s)
SHUTDOWN_FLUSH_SECONDS = 1.0  # after every call is answered: time for the last responses to leave


def grpc_options(config: ServeConfig) -> list[tuple[str, int]]:
    """Channel arguments that keep untrusted connections from holding the server's resources."""
    return [
        ("grpc.max_receive_message_length", config.max_message_bytes),
        ("grpc.max_send_message_length", config.max_message_bytes),
        ("grpc.max_concurrent_streams", config.max_calls_per_connection),  # per connection (HTTP/2 setting)
        ("grpc.server_handshake_timeout_ms", 10_000),  # a connection that never finishes its preface is dropped
        ("grpc.max_connection_idle_ms", 5 * 60_000),  # a connection with no call for 5 min gets GOAWAY
        ("grpc.keepalive_time_ms", 60_000),  # ping idle connections: dead peers are found and dropped
        ("grpc.keepalive_timeout_ms", 20_000),
        ("grpc.http2.min_ping_interval_without_data_ms", 10_000),  # clients may ping as often as every 10 s
        ("grpc.keepalive_permit_without_calls", 1),
        *_connection_age(config),
    ]


def _connection_age(config: ServeConfig) -> list[tuple[str, int]]:
    """End each connection after --max-connection-age (GOAWAY: calls in flight finish), so clients spread over
    replicas added since they connected; 0 = never (gRPC's own default)."""
    if not config.max_connection_age:
        return []
    return [
        ("grpc.max_connection_age_ms", round(config.max_connection_age * 1000)),
        ("grpc.max_connection_age_grace_ms", round(config.max_connection_age_grace * 1000)),
    ]


def load_operator_model(config: ServeConfig) -> OperatorModel | None:
    """ReadExpression's operator model, one for each model version (its sessions are its own); None when turned
    off. A file that is not an operator model fails the version, saying why, as a broken model file does."""
    if config.operator_model == "none":
        return None
    operators = OperatorModel(Path(config.operator_model))
    log.info("operator model for ReadExpression: %s", operators.describe())
    return operators


def load_second_opinion(config: ServeConfig) -> SecondOpinion | None:
    """The reading calls' second digit classifier, one for each model version; None when turned off. A file that
    is not one fails the version, saying why, as a broken model file does."""
    if config.second_opinion == "none":
        return None
    second_opinion = SecondOpinion(Path(config.second_opinion))
    log.info("second opinion for the reading calls: %s", second_opinion.describe())
    return second_opinion


QUALITY_SAMPLE_SECONDS = 10.0  # how often each version's drift is worked out (a tenth of a shorter drift window)


def _both(first: Callable[..., None], second: Callable[[np.ndarray, np.ndarray], None]) -> Callable[..., None]:
    """A pipeline's prediction callback that feeds the metrics and the drift tally."""

    def both(digits: np.ndarray, confidences: np.ndarray, is_digit: np.ndarray | None = None) -> None:
        first(digits, confidences, is_digit)
        second(digits, confidences)

    return both


def feedback_writer(config: ServeConfig, metrics: ServiceMetrics) -> FeedbackWriter | None:
    """The database writer for --feedback-db (None: labels are not stored). It opens the database on its own
    thread, so a database that is down at start-up delays nothing: records wait in its bounded queue until it is up,
    and what overflows is dropped and counted."""
    if config.feedback_db.strip().lower() == "none":
        log.info("feedback: labels are counted in live accuracy but not stored (--feedback-db none)")
        return None
    url = config.feedback_db
    if "://" not in url and not url.startswith("sqlite:"):  # a plain path: SQLite, its folder made
        path = Path(url).expanduser()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as problem:  # a read-only root file system, say: serve, and say why nothing is stored
            log.error("feedback: cannot make %s (%s): labels are not stored; set --feedback-db", path.parent, problem)
            return None
        url = str(path)

    reasons = {QUEUE_FULL: "queue_full", UNAVAILABLE: "database_unavailable"}  # else: the database refused them

    def dropped(count: int, why: str) -> None:
        metrics.feedback_dropped.labels(reasons.get(why, "write_failed")).inc(count)

    writer = FeedbackWriter(
        lambda: open_store(url),
        max_pending=config.feedback_queue,
        on_written=metrics.feedback_stored.inc,
        on_dropped=dropped,
    )
    log.info("feedback: labelled answers stored in %s", redact_url(url))
    return writer


def _version() -> str:
    try:
        return metadata.version("mnist-googlenet-service")
    except metadata.PackageNotFoundError:  # run from a source tree that was never installed
        return "0+unknown"


def raise_open_file_limit() -> int:
    """Every connection is a file descriptor: take the hard limit, so 1,000 idle clients do not use them up."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        return hard
    return soft


class RepositoryMetrics(RepositoryObserver):
    """Versions coming and going, into metrics and grpc health (one health service per model name)."""

    def __init__(self, server: MnistServer) -> None:
        self.server = server

    def on_loaded(self, name: str, version: str, seconds: float) -> None:
        self.server.metrics.model_load_seconds.labels(name, version).set(seconds)

    def on_failed(self, name: str, version: str, reason: str) -> None:
        self.server.metrics.model_load_failures.labels(name, version or "-").inc()

    def on_request(self, name: str, version: str, seconds: float, error: BaseException | None) -> None:
        if error is None:
            code = "OK"
        elif isinstance(error, ServiceError):
            code = status_of(error).name
        else:
            code = "CANCELLED" if isinstance(error, asyncio.CancelledError) else "INTERNAL"
        self.server.metrics.observe_model_request(name, version, code, seconds)

    def on_canary(self, name: str, version: str, event: str, reason: str) -> None:
        if self.server.link is None:  # with `--workers N` the supervisor counts them (it decides the trials)
            self.server.metrics.canary_events.labels(name, version, event).inc()

    def on_unloaded(self, name: str, version: str) -> None:
        self.server.metrics.forget_version(name, version)
        self.server.feedback.forget(name, version)
        self.server.plane.forget(name, version)

    def on_changed(self, repository: ModelRepository) -> None:
        self.server.metrics.describe_models(repository)
        if self.server.link is not None:  # what this worker serves, for its supervisor's agreement on defaults
            local = repository.local_defaults()
            self.server.link.models = {
                name: {"ready": versions, "local": local.get(name)}  # local None: the folder wants none of them
                for name, versions in repository.ready_versions().items()
            }
        if self.server._health is not None and not self.server._stopping:
            asyncio.ensure_future(self.server._set_model_health())


class MnistServer:
    """The whole service in one object: `await start_async()` on a loop, or `start()` on a thread of its own."""

    def __init__(self, config: ServeConfig) -> None:
        self.config = config
        self.metrics = ServiceMetrics()
        self.metrics.queue_capacity.set(config.max_queue_size)
        self.calls = CallGate()
        self.streams = StreamGate(config.max_streams, config.stream_idle_seconds)
        # Every model version served, READY before it takes traffic; both protocols route through it.
        self.models = ModelRepository(
            self._load_model, None, RepositoryMetrics(self), config.default_model, config.grace_seconds
        )
        self.detector: DigitDetector | None = None
        self._watch: asyncio.Future | None = None
        self._serving = False
        self._model_health_names: set[str] = set()
        # The one data plane under every transport: mnist.v1, the Open Inference Protocol's gRPC and REST.
        self.plane = DataPlane(
            self.models,
            config.max_request_images,
            _version(),
            config.model_control,
            config.max_read_digits,
            config.max_table_cells,
        )
        # Labels for earlier answers: remembered answers, live quality per version, the database (opened at start)
        self.feedback = FeedbackLoop(
            self.metrics,
            AnswerMemory(config.feedback_memory, config.feedback_memory_seconds, config.feedback_images == "on"),
            LiveQuality(self.metrics, config.live_accuracy_window, config.drift_window_seconds),
        )
        self.plane.feedback = self.feedback
        self.feedback.on_labelled = self.models.observe_label  # a canary's trial is decided by labels
        self._quality_sampler: asyncio.Future | None = None
        self.servicer = ClassifierServicer(config, self.plane)
        self.http_port: int | None = None
        self._rest: RestServer | None = None
        self.tracing: Tracing | None = None  # OpenTelemetry spans, with --otlp-endpoint (server/tracing.py)
        self.tokens: TokenChecker | None = None  # loaded at start from --auth-tokens-file; the HTTP API uses it too
        self.port: int | None = None
        self.metrics_port: int | None = None
        self._grpc: grpc.aio.Server | None = None
        self._health: HealthService | None = None
        self._metrics_http: MetricsHttpServer | None = None
        self._heartbeat: LoopHeartbeat | None = None  # with the metrics port: /livez reads it off the loop
        self.link: WorkerLink | None = None  # a worker of `--workers N`: its line to the supervisor
        self._stopping = False
        self._loop: asyncio.AbstractEventLoop | None = None  # start(): the loop of the server's own thread
        self._loop_running: asyncio.AbstractEventLoop | None = None  # the loop serving, however started
        self._thread: threading.Thread | None = None

    @property
    def pipeline(self) -> ModelPipeline | None:
        """The default model's default version (what a request naming no model gets), or None before one loads."""
        try:
            return self.models.resolve().pipeline
        except ServiceError:
            return None

    # --- on the event loop ---------------------------------------------------------------------------

    async def _set_health(self, status: int) -> None:
        for name in ("", SERVICE.full_name, INFERENCE_SERVICE.full_name):
            await self._health.set(name, status)
        self._serving = status == SERVING
        self.metrics.serving.set(1 if self._serving else 0)
        await self._set_model_health()

    async def _set_model_health(self) -> None:
        """grpc health per model name: SERVING while a version of it is READY (and the server is serving)."""
        names = {status.name for status in self.models.statuses()}
        for name in sorted(names | self._model_health_names):  # a model gone from the repository: NOT_SERVING
            ready = self._serving and name in names and self.models.model_ready(name)
            await self._health.set(name, SERVING if ready else NOT_SERVING)
        self._model_health_names |= names

    async def start_async(self) -> MnistServer:
        """Bind and answer health (NOT_SERVING) at once, then load and warm the model, then SERVING."""
        log.info("open-file limit: %d", raise_open_file_limit())
        if (tracing := Tracing.from_config(self.config)) is not None:
            self.tracing = tracing.install()
            log.info("traces: OTLP to %s, %g of new traces sampled", self.config.otlp_endpoint, tracing.sample_ratio)
        self.tokens = load_token_checker(self.config)
        self._loop_running = asyncio.get_running_loop()
        # Calls over the bound are refused by gRPC before any handler runs (0.8x an echo call's CPU; admission's own
        # refusals, decided before the message is read, about 0.9-1.0x: loadtest/cpu_cost.py).
        self._grpc = grpc.aio.server(
            options=grpc_options(self.config), maximum_concurrent_rpcs=self.config.max_concurrent_calls
        )
        self._health = HealthService()
        # Bearer tokens: the Classifier and reflection (it lists the API) need one; health never does (probes).
        add_to_server(self.servicer, self._grpc, self.metrics, self.calls, self.streams, self.tokens)
        add_inference_to_server(
            InferenceServicer(self.plane), self._grpc, self.metrics, self.calls, self.streams, self.tokens
        )
        reflector = ReflectionServicer(
            (SERVICE.full_name, INFERENCE_SERVICE.full_name, health.SERVICE_NAME, reflection.SERVICE_NAME)
        )
        self._grpc.add_generic_rpc_handlers(
            (
                generic_handler(self._health, HEALTH, self.metrics, streams=self.streams),
                generic_handler(reflector, REFLECTION, self.metrics, streams=self.streams, auth=self.tokens),
            )
        )
        await self._set_health(NOT_SERVING)
        linked = WorkerLink.from_environment()
        if self.config.metrics_port or linked:
            self._heartbeat = LoopHeartbeat(self.config.liveness_stall_seconds)
            self._heartbeat.start(asyncio.get_running_loop())
        if linked is not None:
            self.models.trials_judged_here = False  # the supervisor decides canaries on every worker's labels
            if (agreed := WorkerLink.agreement_at_start()) is not None:
                self._propose_defaults(agreed)  # the other workers' defaults, from this worker's first call
            self.link = WorkerLink(
                *linked,
                self._heartbeat.problem,
                self._readiness,
                self._propose_defaults,
                trials=lambda: self.models.trials_now,
                conclude=self._conclude_trial,
            )
            self.link.start()
            # a label for an answer another worker gave is taken by that worker (server/feedback/peers.py)
            peers = FeedbackPeers.from_environment(self.link.index, self.link.count, self._take_for_a_sibling)
            if peers is not None:
                await peers.start()
                self.feedback.peers = peers
        else:  # alone, the port answers health (NOT_SERVING) while the model loads; a worker binds it (gRPC listens
            await self._open_ports()  # as it binds) only once READY, so no connection waits on a loading worker
        if self.config.metrics_port:
            self._metrics_http = MetricsHttpServer(
                self.metrics.registry,
                self.config.metrics_host or self.config.host,
                self.config.metrics_port,
                max_connections=METRICS_MAX_CONNECTIONS,
                ssl_context=http_ssl_context(self.config),
                auth=self.tokens if self.config.metrics_auth == "on" else None,
                on_refused=lambda refused: self.metrics.count_refusal("metrics", refused),
                liveness=self._heartbeat.problem,
                readiness=self._readiness,
            )
            self.metrics_port = self._metrics_http.start()

        self.feedback.writer = feedback_writer(self.config, self.metrics)
        if targets := feedback_peer_targets(self.config.feedback_peers):
            self.feedback.replicas = ReplicaPeers(targets, peer_channel_credentials(self.config))
            log.info("feedback: labels for answers this replica did not give are asked of %s", ", ".join(targets))
        self._quality_sampler = asyncio.ensure_future(self._sample_quality())
        self.detector = None if self.config.digit_detector == "none" else DigitDetector.load(self.config.digit_detector)
        if self.config.model_repository:
            root = Path(self.config.model_repository)
            log.info("model repository %s (polled every %s s)", root, self.config.repository_poll_seconds or "-")
            self.models.root = root
            await self.models.poll()
            if not self.models.served():
                failures = "; ".join(f"{s.name} {s.version}: {s.reason}" for s in self.models.statuses() if s.reason)
                raise RuntimeError(f"no model in {root} could be served ({failures or 'no <model>/<n>/model.onnx'})")
            if self.config.repository_poll_seconds:
                interval = self.config.repository_poll_seconds
                offset = interval * self.link.index / self.link.count if self.link is not None else 0.0
                self._watch = asyncio.ensure_future(self.models.watch(interval, offset))
        else:
            await self.models.load_file(Path(self.config.model))
        gc.collect()
        gc.freeze()  # the modules and the model stay: full collections no longer scan them (pauses of 20-30 ms)
        if self.link is not None:
            await self._open_ports()
        await self._set_health(SERVING)
        log.info(
            "SERVING %s on port %d, metrics on %s",
            ", ".join(f"{s.name} {s.version}" for s in self.models.served()),
            self.port,
            self.metrics_port or "(off)",
        )
        return self

    def _conclude_trial(self, model: str, candidate: str, verdict: str, why: str) -> None:
        """From the link's thread: the supervisor's verdict on a canary, from every worker's labels."""
        with contextlib.suppress(RuntimeError):  # the loop has closed: the worker is stopping
            self._loop_running.call_soon_threadsafe(self.models.conclude_trial, model, candidate, verdict, why)

    def _take_for_a_sibling(self, request_id: str, label: int | None, text: str | None, model: str) -> FeedbackResult:
        """A label another worker received for an answer it does not remember: this worker's, if it gave it."""
        return self.feedback.take(request_id, label, text, model, count_unknown=False)

    def _readiness(self) -> str | None:
        """grpc health's readiness, from two flags (read on another thread; never a call into the loop)."""
        return "shutting down" if self._stopping else None if self._serving else "not serving yet: model loading"

    def _propose_defaults(self, agreed: AgreedDefaults) -> None:
        """From the link's thread: the workers' agreed defaults, switched to at their instant even with no call."""
        self.models.propose_defaults(agreed)
        loop = self._loop_running
        with contextlib.suppress(RuntimeError):  # the loop has closed: the worker is stopping
            loop.call_soon_threadsafe(
                lambda: loop.call_later(max(0.0, agreed.at - time.monotonic()), self.models.follow_agreement)
            )

    async def _open_ports(self) -> None:
        """Bind the gRPC port (gRPC listens as it binds) and start answering on it, and on the HTTP API's."""
        try:
            address, credentials = f"{self.config.host}:{self.config.port}", grpc_server_credentials(self.config)
            if credentials is None:
                self.port = self._grpc.add_insecure_port(address)
            else:
                self.port = self._grpc.add_secure_port(address, credentials)
        except RuntimeError:
            self.port = 0
        if not self.port:
            raise RuntimeError(f"cannot listen on {self.config.host}:{self.config.port}")
        await self._grpc.start()
        if self.feedback.replicas is not None:
            self.feedback.replicas.own_port = self.port  # its own address is not asked
        if self.config.http_port:
            from server.transport.rest import RestApi, RestServer  # aiohttp only when the HTTP API is on

            api = RestApi(
                self.plane, self.metrics, self.tokens, self.config.max_message_bytes, self.config.max_read_digits
            )
            host = self.config.http_host or self.config.host
            self._rest = RestServer(
                api,
                host,
                self.config.http_port,
                http_ssl_context(self.config),
                self.config.grace_seconds,
                reuse_port=self.link is not None,
            )
            self.http_port = await self._rest.start()
            log.info("REST API (Open Inference Protocol /v2) and web page on port %d", self.http_port)
        log.info(
            "gRPC listening on port %d: %s%s",
            self.port,
            describe_security(self.config),
            "" if self.link is not None else " (health NOT_SERVING while the model loads)",
        )

    async def _load_model(self, name: str | None, version: str | None, path: Path) -> ModelPipeline:
        """One model version, loaded, warmed on every batch shape and verified before any request reaches it, with
        its model's own settings (config.pbtxt in a repository) in place of the flags."""
        settings = self.models.settings(name)
        check_against(settings, self.config)  # ValueError: this version FAILED, saying why
        config = replace(settings.applied_to(self.config), model=str(path))
        if settings.overrides():
            log.info("%s %s: settings from its config.pbtxt: %s", name, version, settings.describe())
        # the side models first: one that fails to load then leaves no backend (and no GPU memory) behind
        operators = await asyncio.get_running_loop().run_in_executor(None, load_operator_model, config)
        second_opinion = await asyncio.get_running_loop().run_in_executor(None, load_second_opinion, config)
        backend = await asyncio.get_running_loop().run_in_executor(None, build_backend, config)
        info = backend.describe()
        name, version = name or info.model_name, version or info.model_version
        log.info("backend: %s", info.summary())
        if info.engine == "onnxruntime" and not info.on_gpu:
            log.info("inference provider: %s (no usable CUDA GPU, or --provider cpu)", info.providers[0])
        else:
            log.info("inference provider: %s", info.providers[0] if info.providers else info.engine)
        tally = AnswerTally()  # its answers, for drift; followed once verified (a failed file leaves the old alone)
        pipeline = ModelPipeline(
            backend,
            PipelineSettings(
                max_batch_size=info.max_batch_size,
                max_queue_size=config.max_queue_size,
                max_queue_delay=config.max_queue_delay_ms / 1000,
                max_image_pixels=config.max_image_pixels,
                max_request_pixels=config.max_request_pixels,
                max_decoding_pixels=config.max_decoding_pixels,
                queue_target=config.queue_target_seconds(),
                preprocess_workers=config.preprocess_workers,
            ),
            self.metrics.batch_observer(),
            _both(self.metrics.prediction_observer(name, version), tally.add),
            self.detector,
            self.metrics.decoding_pixels.set,
            operators,
            second_opinion,
        )
        pipeline.name, pipeline.version = name, version
        pipeline.on_reading = self.metrics.observe_reading
        pipeline.on_table = self.metrics.observe_table
        pipeline.on_expression = self.metrics.observe_expression
        pipeline.start()
        try:
            log.info("%s %s: warm-up took %.2f s", pipeline.name, pipeline.version, await pipeline.warm_up())
            if self.config.verify_model == "on":
                await verify_on_samples(pipeline)
            pipeline.batcher.forget_costs()  # its speed is learnt from real traffic, not from these first runs
        except BaseException:
            await pipeline.close(timeout=0)
            raise
        # the fp16 variant is not the file the reference was measured on: no check of the reference then
        self.feedback.track(name, version, path, info.model_sha256 if info.precision == "fp32" else "", tally)
        return pipeline

    async def _sample_quality(self) -> None:
        while True:
            await asyncio.sleep(min(QUALITY_SAMPLE_SECONDS, self.config.drift_window_seconds / 10))
            self.feedback.quality.sample()

    async def stop_async(self) -> None:
        """Drain: NOT_SERVING for `drain_seconds`, then refuse new calls (UNAVAILABLE) and give in-flight ones
        `grace_seconds`; what is still running then is answered UNAVAILABLE too, never left to be CANCELLED."""
        if self._stopping:
            return
        self._stopping = True
        log.info(
            "shutting down: health NOT_SERVING for %.1f s, then %.1f s grace for in-flight calls",
            self.config.drain_seconds,
            self.config.grace_seconds,
        )
        if self._health is not None:
            await self._health.enter_graceful_shutdown()
        self.plane.draining = True  # the protocol's ServerReady and ModelReady say false, as health does
        self.metrics.serving.set(0)
        await asyncio.sleep(self.config.drain_seconds)
        self.streams.closing.set()  # health watchers and reflection streams end UNAVAILABLE
        rest_drained = asyncio.ensure_future(self._rest.api.drain(self.config.grace_seconds)) if self._rest else None
        await self.calls.close(self.config.grace_seconds)
        if rest_drained is not None:
            await rest_drained  # REST as gRPC: new requests answered 503 (not a reset), running ones finished
        if self.feedback.peers is not None:
            await self.feedback.peers.close()
        if self.feedback.replicas is not None:
            await self.feedback.replicas.close()
        if self._watch is not None:
            self._watch.cancel()
        if self._quality_sampler is not None:
            self._quality_sampler.cancel()
        await self.models.close(0)
        await asyncio.get_running_loop().run_in_executor(None, self.feedback.close)  # what is queued is written
        if self._grpc is not None:
            await asyncio.sleep(SHUTDOWN_FLUSH_SECONDS)  # the last UNAVAILABLE answers leave
            if self.port:  # a worker that stops before its model loaded never bound it
                cut_connections(self.port)
            await self._grpc.stop(0)
        if self._rest is not None:
            await self._rest.stop()
        if self._metrics_http is not None:
            self._metrics_http.stop()
        if self._heartbeat is not None:
            self._heartbeat.stop()
        if self.tracing is not None:  # the last spans leave (within a few seconds, collector or not)
            await asyncio.get_running_loop().run_in_executor(None, self.tracing.shutdown)
        log.info("stopped")

    # --- from another thread (tests, embedding) ------------------------------------------------------

    def start(self) -> MnistServer:
        """Run the server on an event loop in a thread of its own; returns once SERVING (or raises)."""
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="mnist-serve-loop", daemon=True)
        self._thread.start()
        try:
            asyncio.run_coroutine_threadsafe(self.start_async(), self._loop).result()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Drain and stop (`stop_async`), waiting no longer than `stop_deadline_s()`: a stop that hangs raises
        TimeoutError naming the bound instead of holding its caller (a test run, an embedding process) forever."""
        if self._loop is None or self._thread is None:
            return
        bound = self.stop_deadline_s()
        stopping = asyncio.run_coroutine_threadsafe(self.stop_async(), self._loop)
        try:
            stopping.result(timeout=bound)
        except concurrent.futures.TimeoutError:
            stopping.cancel()
            raise TimeoutError(
                f"the server did not stop within {bound:.1f} s (drain {self.config.drain_seconds:g} s + grace "
                f"{self.config.grace_seconds:g} s + {STOP_MARGIN_SECONDS:g} s to close models, ports and traces)"
            ) from None
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(STOP_MARGIN_SECONDS)
            if not self._thread.is_alive():
                self._loop.close()
            self._loop = None

    def stop_deadline_s(self) -> float:
        """The longest a stop may take: the drain, the grace for calls in flight, and a margin for the rest."""
        return self.config.drain_seconds + self.config.grace_seconds + STOP_MARGIN_SECONDS


async def serve(config: ServeConfig) -> int:
    """Run until SIGTERM or SIGINT; returns the exit status."""
    server = MnistServer(config)
    stop_requested = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, lambda s=sig: (log.info("received %s", s.name), stop_requested.set()))
    try:
        await server.start_async()
    except Exception as exc:  # no CUDA with --provider cuda, not an ONNX model, port or metrics port taken, ...
        log.error("cannot start: %s: %s", type(exc).__name__, exc)
        await server.stop_async()
        return 2
    await stop_requested.wait()
    try:
        await asyncio.wait_for(server.stop_async(), server.stop_deadline_s())
    except TimeoutError:
        log.error("did not stop within %.1f s; exiting anyway", server.stop_deadline_s())
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    config = load_config(argv)
    worker = os.environ.get(INDEX_ENV, "").partition("/")[0]
    where = f"worker {worker} " if worker and os.environ.get(LINK_ENV) else ""
    logging.basicConfig(level=config.log_level, format=f"%(asctime)s %(levelname)s {where}%(name)s: %(message)s")
    if not where and worker_count(config) > 1:
        from server.supervisor import Supervisor  # the parent of N workers, each this same program

        return Supervisor(config, argv).run()
    log.log(logging.DEBUG if where else logging.INFO, "configuration:\n%s", describe(config))  # workers: said once
    return asyncio.run(serve(config))


if __name__ == "__main__":
    sys.exit(main())
