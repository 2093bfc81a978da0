"""Server configuration in one typed place: defaults, `MNIST_SERVE_*` environment variables, flags.

Precedence: flag > environment variable > default. Every field is printed at start.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import re
from dataclasses import dataclass, fields
from pathlib import Path
from urllib.parse import urlparse

from server.security import redact_url

BUNDLED_MODEL = Path(__file__).resolve().parent / "bundled" / "googlenet-fast.onnx"
DIGIT_DETECTOR = Path(__file__).resolve().parent / "bundled" / "digit-detector.npz"
OPERATOR_MODEL = Path(__file__).resolve().parent / "bundled" / "operators.onnx"
SECOND_OPINION_MODEL = Path(__file__).resolve().parent / "bundled" / "second-opinion.onnx"
TABLE_CANDIDATES_PER_CELL = 3  # ReadTable's candidate digit images per allowed cell (every way of cutting counted)
ENV_PREFIX = "MNIST_SERVE_"


@dataclass(frozen=True)
class ServeConfig:
    host: str = "[::]"
    port: int = 50051
    metrics_port: int = 9464  # not 9090, which is Prometheus's own
    metrics_host: str = ""  # "" = the same address as `host`
    # /livez fails once the gRPC loop has run nothing this long: overload delays it by under 1 s, a hang forever.
    liveness_stall_seconds: float = 20.0
    http_port: int = 8000  # Open Inference Protocol over HTTP/REST and the web page; 0 = off (Triton's default port)
    http_host: str = ""  # "" = the same address as `host`
    model: str = str(BUNDLED_MODEL)
    model_repository: str = ""  # serve every model and version under this folder instead of --model
    repository_poll_seconds: float = 5.0  # how often the repository folder is checked for changes; 0 = never
    model_control: str = "off"  # on: RepositoryModelLoad / RepositoryModelUnload (Open Inference Protocol) allowed
    default_model: str = ""  # the model requests naming none get ("" = the only one, or the first by name)
    verify_model: str = "on"  # a model must read the stored sample digits right before it takes traffic
    backend: str = "onnxruntime"  # or "null" / "null-threaded": answer at once without a model (benchmarking aids)
    null_device_ms: str = "0+0"  # null-threaded only: emulated device time per batch, "FIXED+PER_IMAGE" ms, no CPU
    provider: str = "auto"  # auto: CUDA when usable, else CPU; or cuda / cpu
    precision: str = "auto"  # auto: fp16 on a GPU when NAME.fp16.onnx exists, else fp32; or fp32 / fp16
    layout: str = "auto"  # auto: NHWC for fp16 on a GPU, else NCHW; or nchw / nhwc
    batch_buckets: str = "auto"  # auto: powers of two up to max_batch_size on a GPU, one any-shape session on CPU
    max_batch_size: int = 0  # images per session run; 0 = auto (256 on a GPU, 32 on CPU, or the largest bucket)
    cuda_graph: str = "auto"  # auto: on for GPU buckets; on / off
    cudnn_conv_algo_search: str = "EXHAUSTIVE"  # once per bucket session at warm-up; HEURISTIC / DEFAULT start faster
    max_queue_delay_ms: float = 0.0  # extra wait for a fuller batch once the queue has run dry
    max_queue_size: int = 4096  # images waiting; beyond it requests get RESOURCE_EXHAUSTED
    queue_target_ms: str = "auto"  # a standing queue is held to this wait (CoDel): auto, off, or ms
    max_concurrent_calls: int = 4096  # calls in flight at once on the gRPC port (gRPC refuses more itself)
    max_calls_per_connection: int = 1024  # HTTP/2 streams a single connection may have open
    max_connection_age: float = 60.0  # seconds before a connection is ended (GOAWAY) so clients spread; 0 = never
    max_connection_age_grace: float = 30.0  # then: how long the calls still on it may take
    max_streams: int = 64  # long-lived streams (health Watch, reflection) open at once
    stream_idle_seconds: float = 60.0  # a reflection stream with no request this long is closed
    max_request_images: int = 256  # images per ClassifyBatch
    max_read_digits: int = 64  # digits ReadDigits finds in one image (symbols, for ReadExpression) before it refuses it
    max_table_cells: int = 256  # cells (rows x columns) ReadTable reads in one image before it refuses it
    max_image_pixels: int = 4_000_000  # pixels decoded for one encoded image (JPEG is reduced on load to fit)
    max_request_pixels: int = 16_000_000  # pixels decoded for all the encoded images of one request
    max_decoding_pixels: int = 16_000_000  # pixels being decoded at once, all requests together
    max_message_bytes: int = 16 * 1024 * 1024
    preprocess_workers: int = 0  # threads decoding encoded images off the event loop; 0 = one per core
    digit_detector: str = str(DIGIT_DETECTOR)  # digit_score for models without it in their graph; "none" = all off
    operator_model: str = str(OPERATOR_MODEL)  # tells + - × ÷ = from digits for ReadExpression; "none" = refused
    second_opinion: str = str(SECOND_OPINION_MODEL)  # a second digit classifier the reading calls average; "none" = off
    intra_op_threads: int = 0  # ONNX Runtime threads per session run (0 = one per core)
    ort_spinning: str = "auto"  # auto = on: ONNX Runtime's default (spin between runs too); run: only during runs; off
    drain_seconds: float = 1.0  # after SIGTERM: report NOT_SERVING this long before refusing new calls
    grace_seconds: float = 10.0  # then: how long in-flight calls may take to finish
    tls_cert: str = ""  # PEM certificate chain: every port (gRPC, HTTP, /metrics) speaks TLS; "" = plaintext
    tls_key: str = ""  # PEM private key of tls_cert
    tls_client_ca: str = ""  # PEM CA bundle: clients must present a certificate it signed (mTLS)
    auth_tokens_file: str = ""  # bearer tokens, one per line (server/security.py); "" = no token check
    metrics_auth: str = "off"  # on: /metrics needs a token too
    otlp_endpoint: str = ""  # OpenTelemetry traces to this OTLP/gRPC collector, e.g. http://collector:4317; "" = off
    trace_sample_ratio: float = 1.0  # new traces sampled at this ratio; a caller's traceparent decision is kept
    workers: str = "auto"  # frontend processes on the one port (server/supervisor.py); auto = worker_count()
    feedback_db: str = str(Path("~/.local/state/mnist-serve/feedback.db"))  # labelled answers; "none" = not stored
    feedback_images: str = "on"  # on: a stored label keeps the 28x28 input the model saw; off: never kept
    feedback_memory: int = 20_000  # answers remembered for a label to be joined with; 0 = none (Feedback refused)
    feedback_memory_seconds: float = 3600.0  # and for at most this long
    feedback_queue: int = 10_000  # records waiting for the database; beyond it they are dropped, counted and logged
    feedback_peers: str = ""  # the fleet's replicas, asked for an answer this one does not remember (comma list)
    feedback_peers_ca: str = ""  # PEM CA that signed the replicas' certificates (needed with --tls-cert)
    live_accuracy_window: int = 500  # labelled answers mnist_live_accuracy is over, per version
    drift_window_seconds: float = 900.0  # answers the drift PSI is over, per version
    log_level: str = "INFO"

    def queue_target_seconds(self) -> float | str:
        """`queue_target_ms` for the batcher: "auto", 0.0 for off, else seconds."""
        return parse_queue_target(self.queue_target_ms)


CHOICES = {
    "model_control": ("off", "on"),
    "verify_model": ("on", "off"),
    "backend": ("onnxruntime", "null", "null-threaded"),
    "provider": ("auto", "cuda", "cpu"),
    "precision": ("auto", "fp32", "fp16"),
    "layout": ("auto", "nchw", "nhwc"),
    "cuda_graph": ("auto", "on", "off"),
    "metrics_auth": ("off", "on"),
    "feedback_images": ("on", "off"),
    "ort_spinning": ("auto", "on", "run", "off"),
    "cudnn_conv_algo_search": ("EXHAUSTIVE", "HEURISTIC", "DEFAULT"),
    "log_level": ("DEBUG", "INFO", "WARNING", "ERROR"),
}

HELP = {
    "host": "address to listen on for gRPC",
    "port": "gRPC port",
    "metrics_port": "HTTP port of Prometheus /metrics and of the probes /livez (liveness, answered off the gRPC event "
    "loop) and /readyz (mirrors grpc health); 0 = none of them, so no /livez for a liveness probe",
    "liveness_stall_seconds": "/livez answers 503 once the gRPC event loop has run no callback for this long (it is "
    "blocked or deadlocked); overload delays it by well under a second, so keep this generous",
    "metrics_host": "address /metrics, /livez and /readyz listen on (empty = the same as --host); e.g. 127.0.0.1 to "
    "keep them off the network (a kubelet probe then cannot reach /livez: use an exec probe)",
    "http_port": "HTTP port of the Open Inference Protocol's REST API (/v2/...) and of the web page at / where a "
    "person can draw a digit and see the answer (0 = no HTTP server)",
    "http_host": "address the REST API and web page listen on (empty = the same as --host)",
    "model": "ONNX model written by mnist-export (default: the bundled googlenet-fast); its fp16 variant "
    "NAME.fp16.onnx is looked for beside it",
    "model_repository": "serve every model and version under this folder (Triton's layout, as mnist-export --publish "
    "and --triton-repo write it): DIR/<model>/<version>/model.onnx, versions named by whole numbers, an optional "
    "DIR/<model>/config.pbtxt with a version_policy (default: the latest version) and a default_version parameter; "
    "new versions are loaded, verified and warmed up before they take traffic; replaces --model",
    "repository_poll_seconds": "with --model-repository: seconds between checks of the folder for new, changed and "
    "removed versions and config.pbtxt changes (0 = only at start and on explicit loads)",
    "model_control": "on: allow the Open Inference Protocol's RepositoryModelLoad / RepositoryModelUnload (over gRPC, "
    "and POST /v2/repository/models/NAME/load|unload), behind --auth-tokens-file when set; off: they answer "
    "UNIMPLEMENTED",
    "verify_model": "on: every model version must read the four stored digits in server/samples right (through the "
    "same preprocessing as requests, probabilities summing to 1) before it takes traffic, else it is refused and the "
    "previous version keeps serving; off: only loading and warm-up are checked (e.g. to benchmark a barely trained "
    "model)",
    "default_model": "the model that requests naming no model get (empty = the only one, or the first by name)",
    "backend": "inference engine: onnxruntime; or null (answers every image at once with a fixed probability row, "
    "no model: a benchmarking aid that measures the server's own cost), or null-threaded (the same, run on the batch "
    "runner thread as a model is: adds the cost of the thread hand-off)",
    "null_device_ms": "with --backend null-threaded: each batch also takes FIXED+PER_IMAGE milliseconds (e.g. 2+1.5) "
    "of emulated device time, sleeping on the runner thread without using the CPU, like a model on an accelerator: "
    "a benchmarking aid for admission control where the model, not the CPU, is the limit",
    "provider": "ONNX Runtime provider: auto (CUDA when usable, else CPU), cuda (fail without it) or cpu",
    "precision": "model variant: auto (fp16 on a GPU when NAME.fp16.onnx exists, else fp32), fp32 or fp16",
    "layout": "CUDA convolution layout: auto (NHWC for fp16 on a GPU, else NCHW), nchw or nhwc (prefer_nhwc)",
    "batch_buckets": "fixed batch sizes, one session each, every batch padded up to one (e.g. 1,8,32,256): auto "
    "(powers of two up to --max-batch-size on a GPU; on CPU one session takes any size), none (CPU only), or a list",
    "max_batch_size": "most images coalesced into one session run; larger batches are split (0 = auto: 256 on a GPU, "
    "32 on CPU, or the largest bucket)",
    "cuda_graph": "capture each GPU bucket's run as a CUDA graph and replay it: auto (on for GPU buckets), on, off",
    "cudnn_conv_algo_search": "cuDNN algorithm search, run once per bucket at warm-up: EXHAUSTIVE (fastest "
    "kernels), HEURISTIC or DEFAULT (faster start)",
    "max_queue_delay_ms": "how long a batch may wait for more requests once the queue is empty (0 = run at once)",
    "max_queue_size": "most images waiting to run; further requests are answered RESOURCE_EXHAUSTED at once",
    "queue_target_ms": "admission control (CoDel on the batch queue): once every request for an interval "
    "(100 ms, or two full batches if longer) has waited longer than this before its batch ran, the queue is "
    "standing (a load beyond capacity, not a burst: a burst drains, and a closed loop of clients holds no more "
    "than it has clients), and requests that would wait longer are refused at once with RESOURCE_EXHAUSTED and a "
    "retry-after-ms hint, before any decoding, until a request waits less; auto: sixteen full batches of the engine, "
    "as measured (5 to 500 ms), or eight typical requests' work if more (at most 5 s); off: never (queue bounded "
    "by --max-queue-size only); at any load a request "
    "that could not be answered before its deadline is refused the same way",
    "max_concurrent_calls": "most calls in flight at once on the gRPC port, over all connections and services "
    "(health checks and streams included); more are refused RESOURCE_EXHAUSTED by gRPC itself before any handler "
    "runs ('Concurrent RPC limit exceeded!', no retry hint): its cheapest refusal",
    "max_calls_per_connection": "most concurrent calls (HTTP/2 streams) one connection may open; a client's further "
    "calls wait on its side",
    "max_connection_age": "seconds after which the server ends a client's connection (HTTP/2 GOAWAY, give or "
    "take gRPC's own jitter of a tenth) so that clients reconnect, re-resolve and reach replicas added since; calls "
    "in flight finish on the old connection, new ones go on a new one, none fails; 0 = never (one connection per "
    "client for its lifetime: a Kubernetes Service then balances connections, not calls)",
    "max_connection_age_grace": "after --max-connection-age, seconds the calls still on the old connection get to "
    "finish before it is closed",
    "max_streams": "most long-lived streams (grpc.health.v1 Watch, server reflection) open at once; more are refused "
    "with RESOURCE_EXHAUSTED",
    "stream_idle_seconds": "a server-reflection stream that sends no request for this long is closed (UNAVAILABLE)",
    "max_request_images": "most images in one ClassifyBatch request",
    "max_read_digits": "most digits ReadDigits reads in one image (and symbols ReadExpression reads): an image with "
    "more candidates is refused (INVALID_ARGUMENT naming the count); the image itself is held to --max-image-pixels "
    "like any other",
    "max_table_cells": "most cells (rows x columns) ReadTable reads in one image: a table with more is refused "
    f"(INVALID_ARGUMENT naming its rows and columns) before the model runs; so is a table with more than "
    f"{TABLE_CANDIDATES_PER_CELL} candidate digits per allowed cell (every way of cutting a wide mark counted): "
    f"{TABLE_CANDIDATES_PER_CELL * 256} for 256 cells, and never more than --max-queue-size",
    "max_image_pixels": "most pixels decoded for one encoded image: a JPEG is decoded at 1/2, 1/4 or 1/8 scale to fit "
    "(so JPEGs up to 64x this are accepted); any other format over it is refused from its header, before decoding",
    "max_request_pixels": "most pixels decoded for the encoded images of one request together (after JPEG reduction)",
    "max_decoding_pixels": "most pixels being decoded at once over all requests: bounds decode memory (about 12 bytes "
    "per pixel at peak); requests wait their turn within their deadline",
    "max_message_bytes": "largest gRPC request or response message in bytes",
    "preprocess_workers": "threads decoding encoded images (PNG, JPEG, ...) off the event loop (0 = one per core)",
    "digit_detector": "the digit detector (.npz) behind digit_score / is_digit for model files without their own "
    "digit_score output (exported before it; it runs after the model on the batch runner thread). A model that has the "
    "output (the bundled one; mnist-export adds it) is scored by it, in the same run, with the threshold stored in the "
    "model, and this file is not used for it. none: scores off for every model, in-graph ones included: digit_score "
    "NaN and is_digit true (a model with the output still computes it: ONNX Runtime runs the whole graph)",
    "operator_model": "the operator model (.onnx) ReadExpression uses to tell the operators + - × ÷ = from digits "
    "(python -m training.operators makes it); it runs on the CPU beside each model version, only for "
    "ReadExpression (a few ms per expression). none: ReadExpression answers UNIMPLEMENTED",
    "second_opinion": "a second digit classifier (.onnx; python -m training.second_opinion makes it) whose "
    "probabilities ReadDigits, ReadTable and ReadExpression average with the served model's, so more pages are read "
    "whole; it runs on the CPU beside each model version, in the thread that segmented the image. Classify never "
    "uses it. none: the reading calls use the served model alone",
    "intra_op_threads": "ONNX Runtime intra-op threads (0 = ONNX Runtime's default, one per core)",
    "ort_spinning": "whether ONNX Runtime's intra-op threads spin while waiting for work: auto or on (ONNX Runtime's "
    "default: they go on spinning for a moment after a run, ready for the next: on the 2-core CPU a lone call 0.3 ms "
    "faster and the p99 at a third of capacity halved, for about twice the CPU per call at that load; nothing when "
    "idle), run (they spin while a run is in progress and stop as it returns: for cores shared with other work or "
    "capped by a CPU quota) or off (they never spin and wake op by op: a lone call about 0.8 ms slower)",
    "drain_seconds": "on SIGTERM/SIGINT, seconds of NOT_SERVING health before new calls are refused",
    "grace_seconds": "on shutdown, seconds in-flight calls get to finish",
    "tls_cert": "PEM certificate chain (server certificate first): serve gRPC, the HTTP API and /metrics over TLS "
    "with it (needs --tls-key); empty = plaintext",
    "tls_key": "PEM private key (unencrypted) of --tls-cert",
    "tls_client_ca": "PEM CA certificate(s): require every client, on every port, to present a certificate signed by "
    "one of them (mutual TLS; needs --tls-cert)",
    "auth_tokens_file": "file of accepted bearer tokens, one per line (blank lines and # comments ignored): every "
    "call must send 'authorization: Bearer <token>' (UNAUTHENTICATED / HTTP 401 without one, PERMISSION_DENIED / "
    "HTTP 403 for an unknown one), except grpc.health.v1 and, unless --metrics-auth on, /metrics",
    "metrics_auth": "off (Prometheus scrapes /metrics without a token) or on (/metrics needs a token from "
    "--auth-tokens-file too)",
    "otlp_endpoint": "send OpenTelemetry traces (a span per call, with preprocess, queue wait and inference "
    "children; a caller's W3C traceparent is honoured) to this OTLP collector over gRPC, e.g. http://collector:4317 "
    "(https:// for TLS); empty = tracing off",
    "trace_sample_ratio": "fraction of new traces sampled, 0..1; a call carrying a traceparent follows its caller's "
    "sampling decision",
    "workers": "frontend processes serving the one gRPC (and HTTP) port, each with its own engine, under one "
    "supervisor that serves /metrics (every worker's, through prometheus_client's multiprocess mode), /livez and "
    "/readyz for all of them, restarts a worker that dies, drains them all on SIGTERM and moves every worker to a "
    "new default model version at the same instant; auto = one per 4 usable cores (a container's CPU limit counts), "
    "at most 8: 1 on a 2-core machine (docs/operations.md, Workers)",
    "feedback_db": "where labelled answers (the Feedback call) are stored: a SQLite file (WAL), "
    "sqlite:///PATH, or postgresql://USER:PASSWORD@HOST:PORT/DB for a fleet (a connection pool; the schema is "
    "migrated at start-up; keep the password out of the URL: libpq reads PGPASSWORD or ~/.pgpass); none = labels "
    "still count in the live accuracy but are not stored. Writes are queued and made by a thread of their own: a "
    "slow or absent database never slows or fails an answer",
    "feedback_images": "on: a stored label keeps the 28x28 image the model saw (what mnist-train --from-feedback "
    "learns from); off: never kept, in memory or in the database",
    "feedback_memory": "answers (Classify, each ClassifyBatch item, ReadDigits) remembered by request_id so that a "
    "later Feedback call can be joined with them: 2.3 to 4.6 KB each with images (0.85 KB per raw batch image); "
    "0 = none (Feedback answers NOT_FOUND)",
    "feedback_memory_seconds": "an answer is remembered for at most this long",
    "feedback_queue": "most records waiting to be written to --feedback-db; beyond it they are dropped, counted "
    "(mnist_feedback_dropped_total) and logged",
    "feedback_peers": "the other replicas of a fleet, asked (over gRPC, with the caller's token) for an answer this "
    "one does not remember, so that a label reaches the replica that answered: host:port,host:port or "
    "dns:///NAME:PORT (a headless Service: every address it resolves to); empty = none",
    "feedback_peers_ca": "PEM CA certificate(s) that signed the replicas' TLS certificates: needed by "
    "--feedback-peers when this server speaks TLS",
    "live_accuracy_window": "mnist_live_accuracy: accuracy over each version's last this many labelled answers",
    "drift_window_seconds": "mnist_prediction_drift_psi and mnist_confidence_drift_psi: over each version's answers "
    "of the last this many seconds, against the reference stored beside its model (NAME.reference.json)",
    "log_level": "logging level: DEBUG, INFO, WARNING, ERROR",
}

MAX_WORKERS = 64
CORES_PER_WORKER = 4  # auto: a worker's event loop takes about a core at saturation, its engine and decoders the rest
AUTO_MAX_WORKERS = 8


def worker_count(config: ServeConfig, cores: int | None = None) -> int:
    """How many frontend processes `config.workers` asks for on a machine of `cores` cores (default: this one's)."""
    if str(config.workers).strip().lower() == "auto":
        cores = cores or usable_cores()
        return max(1, min(AUTO_MAX_WORKERS, cores // CORES_PER_WORKER))
    return int(config.workers)


def usable_cores(cgroup: Path = Path("/sys/fs/cgroup")) -> int:
    """The cores this process may use: its CPU affinity, capped by a cgroup CPU limit (a container's `limits.cpu`,
    which affinity does not show: a pod limited to 2 CPUs on a 64-core node sees 64)."""
    cores = len(os.sched_getaffinity(0))
    try:  # cgroup v2: "QUOTA PERIOD" or "max PERIOD"
        quota, period = (cgroup / "cpu.max").read_text().split()[:2]
        if quota != "max":
            cores = min(cores, max(1, -(-int(quota) // int(period))))
    except (OSError, ValueError):
        pass
    return cores


def workers_problem(text: str) -> str | None:
    value = str(text).strip().lower()
    if value == "auto":
        return None
    if not (value.isascii() and value.isdigit()) or not 1 <= int(value) <= MAX_WORKERS:
        return f"workers must be auto or a whole number from 1 to {MAX_WORKERS}, not {text!r}"
    return None


def _env_name(field_name: str) -> str:
    return ENV_PREFIX + field_name.upper()


def _converter(type_name: str):
    return {"int": int, "float": float}.get(type_name, str)


def _normalize_case(field_name: str, value):
    """Choices are matched case-insensitively: --layout NHWC, --log-level debug."""
    allowed = CHOICES.get(field_name)
    if allowed and isinstance(value, str):
        return next((choice for choice in allowed if choice.lower() == value.lower()), value)
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mnist-serve",
        description="Serve MNIST digit classification over gRPC (mnist.v1.Classifier: Classify, ClassifyBatch, "
        "GetModelInfo) with ONNX Runtime on the GPU (fixed batch buckets, CUDA graphs, fp16) or the CPU, dynamic "
        "batching on an asyncio event loop, grpc.health.v1, server reflection and Prometheus metrics. Every flag can "
        "also be set by the environment variable shown; flags win.",
    )
    for field in fields(ServeConfig):
        parser.add_argument(
            "--" + field.name.replace("_", "-"),
            type=_converter(str(field.type)),
            default=None,
            help=f"{HELP[field.name]} [env {_env_name(field.name)}; default {field.default}]",
        )
    return parser


def load_config(argv: list[str] | None = None, environ: dict[str, str] | None = None) -> ServeConfig:
    """Defaults, overridden by `MNIST_SERVE_*` variables, overridden by flags; values are validated."""
    environ = dict(os.environ if environ is None else environ)
    args = vars(build_parser().parse_args(argv))
    values = {}
    for field in fields(ServeConfig):
        convert = _converter(str(field.type))
        if args[field.name] is not None:
            values[field.name] = args[field.name]
        elif _env_name(field.name) in environ:
            raw = environ[_env_name(field.name)]
            try:
                values[field.name] = convert(raw)
            except ValueError:
                raise SystemExit(f"mnist-serve: {_env_name(field.name)}={raw!r} is not a valid {field.type}") from None
    config = ServeConfig(**{name: _normalize_case(name, value) for name, value in values.items()})
    validate(config)
    return config


def parse_buckets(text: str) -> tuple[int, ...]:
    """'1,8,32' -> (1, 8, 32), sorted and checked; names what is wrong."""
    try:
        sizes = sorted({int(part) for part in text.split(",") if part.strip()})
    except ValueError:
        raise ValueError(f"batch buckets must be comma-separated whole numbers, not {text!r}") from None
    if not sizes:
        raise ValueError("batch buckets: give at least one size")
    if sizes[0] < 1:
        raise ValueError(f"batch buckets must be at least 1, got {sizes[0]}")
    return tuple(sizes)


def parse_queue_target(text: str) -> float | str:
    """'auto' -> 'auto', 'off' -> 0.0, '250' -> 0.25 (seconds); names what is wrong."""
    value = str(text).strip().lower()
    if value in ("auto", "off"):
        return "auto" if value == "auto" else 0.0
    try:
        milliseconds = float(value)
    except ValueError:
        raise ValueError(f"queue_target_ms must be auto, off or a number of milliseconds, not {text!r}") from None
    if not milliseconds > 0 or milliseconds == float("inf"):
        raise ValueError(f"queue_target_ms must be a positive number of milliseconds (or auto, off), not {text!r}")
    return milliseconds / 1000


def parse_device_ms(text: str) -> tuple[float, float]:
    """'2+1.5' -> (2.0, 1.5): fixed milliseconds per batch and milliseconds per image; names what is wrong."""
    parts = [part.strip() for part in (text or "0").split("+")]
    try:
        values = [float(part) for part in parts]
    except ValueError:
        raise ValueError(f"null_device_ms must look like FIXED+PER_IMAGE in ms (e.g. 2+1.5), not {text!r}") from None
    if len(values) > 2 or any(value < 0 or value != value for value in values):
        raise ValueError(f"null_device_ms must be FIXED+PER_IMAGE, two non-negative numbers, not {text!r}")
    fixed, per_image = (values + [0.0])[:2]
    return fixed, per_image


def batching_problems(config: ServeConfig) -> list[str]:
    """What is wrong with the batch buckets and the largest batch together (the server's, or one model's)."""
    if config.batch_buckets in ("auto", "none"):
        return []
    try:
        buckets = parse_buckets(config.batch_buckets)
    except ValueError as exc:
        return [str(exc)]
    if config.max_batch_size and config.max_batch_size < buckets[-1]:
        return [f"max_batch_size {config.max_batch_size} is under the largest batch bucket {buckets[-1]}"]
    return []


def validate(config: ServeConfig) -> None:
    problems = []
    for name in (
        "max_queue_size",
        "max_request_images",
        "max_read_digits",
        "max_table_cells",
        "max_image_pixels",
        "max_request_pixels",
        "max_decoding_pixels",
        "max_message_bytes",
        "max_concurrent_calls",
        "max_calls_per_connection",
        "max_streams",
        "feedback_queue",
        "live_accuracy_window",
    ):
        if getattr(config, name) < 1:
            problems.append(f"{name} must be at least 1")
    for name in ("liveness_stall_seconds", "feedback_memory_seconds", "drift_window_seconds"):
        if not getattr(config, name) > 0:  # NaN too
            problems.append(f"{name} must be > 0")
    for name in (
        "http_port",
        "repository_poll_seconds",
        "max_batch_size",
        "max_queue_delay_ms",
        "stream_idle_seconds",
        "drain_seconds",
        "grace_seconds",
        "max_connection_age",
        "max_connection_age_grace",
        "intra_op_threads",
        "preprocess_workers",
        "feedback_memory",
    ):
        if getattr(config, name) < 0:
            problems.append(f"{name} must not be negative")
    for name, allowed in CHOICES.items():
        if getattr(config, name) not in allowed:
            problems.append(f"{name} must be one of {', '.join(allowed)}, not {getattr(config, name)!r}")
    try:
        parse_queue_target(config.queue_target_ms)
    except ValueError as exc:
        problems.append(str(exc))
    try:
        parse_device_ms(config.null_device_ms)
    except ValueError as exc:
        problems.append(str(exc))
    else:
        if config.null_device_ms.strip() not in ("0+0", "0", "") and config.backend != "null-threaded":
            problems.append("null_device_ms needs --backend null-threaded (emulated device time runs on its thread)")
    if config.feedback_db.strip().lower() != "none":
        if (problem := feedback_db_problem(config.feedback_db)) is not None:
            problems.append(f"feedback_db: {problem}")
    try:
        feedback_peer_targets(config.feedback_peers)
    except ValueError as exc:
        problems.append(str(exc))
    problems += batching_problems(config)
    if (problem := workers_problem(config.workers)) is not None:
        problems.append(problem)
    elif config.model_control == "on" and worker_count(config) > 1:
        problems.append(
            "model_control on needs --workers 1: a load or unload reaches only the worker its connection landed on "
            "(with several workers, change the repository folder, which every worker follows together)"
        )
    if config.http_port and config.http_port in (config.port, config.metrics_port):
        problems.append(f"http_port {config.http_port} is already taken by the gRPC or the metrics port")
    if config.max_request_images > config.max_queue_size:
        problems.append("max_request_images cannot exceed max_queue_size (such a batch could never be queued)")
    if config.max_image_pixels > min(config.max_request_pixels, config.max_decoding_pixels):
        problems.append("max_image_pixels cannot exceed max_request_pixels or max_decoding_pixels")
    if config.digit_detector != "none" and not Path(config.digit_detector).is_file():
        problems.append(f"digit detector {config.digit_detector} does not exist (or pass none)")
    if config.operator_model != "none" and not Path(config.operator_model).is_file():
        problems.append(f"operator model {config.operator_model} does not exist (or pass none)")
    if config.second_opinion != "none" and not Path(config.second_opinion).is_file():
        problems.append(f"second-opinion model {config.second_opinion} does not exist (or pass none)")
    if config.model_repository and not Path(config.model_repository).is_dir():
        problems.append(f"model repository {config.model_repository} is not a folder")
    if config.model_control == "on" and not config.model_repository:
        problems.append("model_control on needs --model-repository (loads and unloads come from its folder)")
    if config.backend == "onnxruntime" and not config.model_repository and not Path(config.model).is_file():
        problems.append(f"model file {config.model} does not exist")
    if not 0.0 <= config.trace_sample_ratio <= 1.0:
        problems.append(f"trace_sample_ratio must be between 0 and 1, not {config.trace_sample_ratio}")
    endpoint = urlparse(config.otlp_endpoint)
    if config.otlp_endpoint and (endpoint.scheme not in ("http", "https") or not endpoint.netloc):
        problems.append(f"otlp_endpoint must look like http://HOST:PORT (or https://), not {config.otlp_endpoint!r}")
    problems += security_problems(config)
    if problems:
        raise SystemExit("mnist-serve: invalid configuration: " + "; ".join(problems))


def security_problems(config: ServeConfig) -> list[str]:
    """What is wrong with the TLS and token settings: pairs, files, and whether they load."""
    from server.security import http_ssl_context, read_tokens  # stdlib only; here to keep imports light

    problems = []
    if config.tls_key and not config.tls_cert:
        problems.append("tls_key needs tls_cert (the certificate it belongs to)")
    if config.tls_cert and not config.tls_key:
        problems.append("tls_cert needs tls_key (its private key)")
    if config.tls_client_ca and not config.tls_cert:
        problems.append("tls_client_ca (client certificates) needs tls_cert and tls_key: mTLS is TLS first")
    if config.feedback_peers.strip() and config.tls_cert and not config.feedback_peers_ca:
        problems.append(
            "feedback_peers over TLS needs feedback_peers_ca (the CA that signed the replicas' certificates)"
        )
    if config.feedback_peers.strip() and config.tls_client_ca:
        problems.append(
            "feedback_peers with mutual TLS (tls_client_ca) is not supported: a replica has no client certificate "
            "to present to the others"
        )
    if config.metrics_auth == "on" and not config.auth_tokens_file:
        problems.append("metrics_auth on needs auth_tokens_file (the tokens /metrics would accept)")
    missing = [
        f"{name} {getattr(config, name)} does not exist"
        for name in ("tls_cert", "tls_key", "tls_client_ca", "feedback_peers_ca", "auth_tokens_file")
        if getattr(config, name) and not Path(getattr(config, name)).is_file()
    ]
    problems += missing
    if problems:
        return problems
    try:
        http_ssl_context(config)  # a key that does not match, a file that is not PEM: said now, not at bind
    except ValueError as exc:
        problems.append(str(exc))
    if config.auth_tokens_file:
        try:
            read_tokens(config.auth_tokens_file)
        except ValueError as exc:
            problems.append(str(exc))
    return problems


FEEDBACK_DB_SCHEMES = ("sqlite", "postgresql", "postgres")  # and a plain path: SQLite
_URL_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*):")


def feedback_peer_targets(text: str) -> list[str]:
    """--feedback-peers as gRPC targets (host:port, [v6]:port or dns:///NAME:PORT); ValueError naming a bad one."""
    targets = [target.strip() for target in text.split(",") if target.strip()]
    for target in targets:
        address = target.removeprefix("dns:///")
        host, colon, port = address.rpartition(":")
        if not colon or not host or not port.isdigit() or not 0 < int(port) < 65536 or "/" in address:
            raise ValueError(f"feedback_peers: {target!r} is not host:port or dns:///NAME:PORT")
    return targets


def feedback_db_problem(url: str) -> str | None:
    """What is wrong with a --feedback-db URL before anything is opened, or None: checked at start, so that a server
    does not retry a hopeless URL forever."""
    if not url.strip():
        return "the feedback database URL is empty: give a file path, sqlite:///path.db or postgresql://..."
    match = _URL_SCHEME.match(url)
    scheme = match.group(1).lower() if match and len(match.group(1)) > 1 else None  # "C:" is a drive
    if scheme is None:
        return None
    if scheme not in FEEDBACK_DB_SCHEMES:
        return (
            f"unknown feedback database URL scheme {scheme!r} in {redact_url(url)}: use a file path, "
            "sqlite:///abs/path.db, sqlite:relative.db or postgresql://user@host:port/db"
        )
    if scheme == "sqlite" and url.startswith("sqlite://") and not url.startswith("sqlite:///"):
        return f"the SQLite URL {url!r} names a host: use sqlite:///abs/path.db or sqlite:relative.db"
    if scheme != "sqlite" and not all(importlib.util.find_spec(m) for m in ("psycopg", "psycopg_pool")):
        return "a postgresql:// feedback database needs psycopg and psycopg-pool: pip install the serve extra"
    return None


SECRET_URL_FIELDS = ("feedback_db",)  # may carry a password: printed with it masked


def describe(config: ServeConfig) -> str:
    """Every field, one per line, as logged at start (a database URL's password masked)."""
    width = max(len(f.name) for f in fields(config))

    def shown(name: str) -> object:
        value = getattr(config, name)
        if name in SECRET_URL_FIELDS:
            return redact_url(value)
        return value

    return "\n".join(f"  {f.name:<{width}} {shown(f.name)}" for f in fields(config))
