"""Server configuration in one typed place: defaults, `MNIST_SERVE_*` environment variables, flags.

Precedence: flag > environment variable > default. Every field is printed at start.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, fields
from pathlib import Path

BUNDLED_MODEL = Path(__file__).resolve().parent / "bundled" / "googlenet-fast.onnx"
ENV_PREFIX = "MNIST_SERVE_"


@dataclass(frozen=True)
class ServeConfig:
    host: str = "[::]"
    port: int = 50051
    metrics_port: int = 9464  # not 9090, which is Prometheus's own
    model: str = str(BUNDLED_MODEL)
    provider: str = "auto"  # auto: CUDA when usable, else CPU; or cuda / cpu
    max_batch_size: int = 32  # images per session run
    max_queue_delay_ms: float = 0.0  # extra wait for a fuller batch once the queue has run dry
    max_queue_size: int = 1024  # images waiting; beyond it requests get RESOURCE_EXHAUSTED
    max_request_images: int = 256  # images per ClassifyBatch
    max_image_pixels: int = 40_000_000  # width x height of one encoded image (decompression-bomb guard)
    max_message_bytes: int = 16 * 1024 * 1024
    grpc_workers: int = 32  # threads answering RPCs (each waits on the batch queue)
    intra_op_threads: int = 0  # ONNX Runtime threads per session run (0 = one per core)
    drain_seconds: float = 1.0  # after SIGTERM: report NOT_SERVING this long before refusing new calls
    grace_seconds: float = 10.0  # then: how long in-flight calls may take to finish
    log_level: str = "INFO"


HELP = {
    "host": "address to listen on for gRPC",
    "port": "gRPC port",
    "metrics_port": "Prometheus /metrics HTTP port (0 = no metrics endpoint)",
    "model": "ONNX model written by mnist-export (default: the bundled googlenet-fast)",
    "provider": "ONNX Runtime provider: auto (CUDA when usable, else CPU), cuda (fail without it) or cpu",
    "max_batch_size": "most images coalesced into one session run",
    "max_queue_delay_ms": "how long a batch may wait for more requests once the queue is empty (0 = run at once)",
    "max_queue_size": "most images waiting to run; further requests are answered RESOURCE_EXHAUSTED at once",
    "max_request_images": "most images in one ClassifyBatch request",
    "max_image_pixels": "largest encoded image accepted, in pixels (width x height)",
    "max_message_bytes": "largest gRPC request or response message in bytes",
    "grpc_workers": "threads handling RPCs concurrently; also caps how many single-image calls can share a batch, "
    "so keep it >= max_batch_size",
    "intra_op_threads": "ONNX Runtime intra-op threads (0 = ONNX Runtime's default, one per core)",
    "drain_seconds": "on SIGTERM/SIGINT, seconds of NOT_SERVING health before new calls are refused",
    "grace_seconds": "on shutdown, seconds in-flight calls get to finish",
    "log_level": "logging level: DEBUG, INFO, WARNING, ERROR",
}


def _env_name(field_name: str) -> str:
    return ENV_PREFIX + field_name.upper()


def _converter(type_name: str):
    return {"int": int, "float": float}.get(type_name, str)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mnist-serve",
        description="Serve MNIST digit classification over gRPC (mnist.v1.Classifier: Classify, ClassifyBatch, "
        "GetModelInfo) with ONNX Runtime, dynamic batching, grpc.health.v1, server reflection and Prometheus "
        "metrics. Every flag can also be set by the environment variable shown; flags win.",
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
    config = ServeConfig(**values)
    validate(config)
    return config


def validate(config: ServeConfig) -> None:
    problems = []
    for name in ("max_batch_size", "max_queue_size", "max_request_images", "max_image_pixels", "grpc_workers"):
        if getattr(config, name) < 1:
            problems.append(f"{name} must be at least 1")
    for name in ("max_queue_delay_ms", "drain_seconds", "grace_seconds", "intra_op_threads"):
        if getattr(config, name) < 0:
            problems.append(f"{name} must not be negative")
    if config.provider not in ("auto", "cuda", "cpu"):
        problems.append(f"provider must be auto, cuda or cpu, not {config.provider!r}")
    if config.max_request_images > config.max_queue_size:
        problems.append("max_request_images cannot exceed max_queue_size (such a batch could never be queued)")
    if not Path(config.model).is_file():
        problems.append(f"model file {config.model} does not exist")
    if problems:
        raise SystemExit("mnist-serve: invalid configuration: " + "; ".join(problems))


def describe(config: ServeConfig) -> str:
    return "\n".join(f"  {f.name:<20} {getattr(config, f.name)}" for f in fields(config))
