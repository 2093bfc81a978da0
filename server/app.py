"""mnist-serve: wire config, model runtime, batch queue, gRPC service, health, reflection and metrics.

Lifecycle: gRPC up with health NOT_SERVING -> model loaded and warmed up -> SERVING ->
(SIGTERM/SIGINT) NOT_SERVING for `drain_seconds` -> refuse new calls, finish in-flight ones -> exit 0.
"""

from __future__ import annotations

import logging
import signal
import sys
import threading
import time
from concurrent import futures

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from proto.mnist.v1 import classifier_pb2 as pb
from server.batching import BatchQueue
from server.config import ServeConfig, describe, load_config
from server.metrics import ServiceMetrics
from server.runtime import OnnxModel
from server.service import ClassifierService, add_to_server

log = logging.getLogger("mnist.serve")
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Classifier"].full_name


class MnistServer:
    """The whole service in one object, so tests can run it in-process on a free port."""

    def __init__(self, config: ServeConfig) -> None:
        self.config = config
        self.metrics = ServiceMetrics()
        self.metrics.queue_capacity.set(config.max_queue_size)
        self.health = health.HealthServicer()
        self.service = ClassifierService(config, self.metrics)
        self.queue: BatchQueue | None = None
        self.model: OnnxModel | None = None
        self.port: int | None = None
        self.metrics_port: int | None = None
        self._metrics_http = None
        self._stopped = threading.Event()
        options = [
            ("grpc.max_receive_message_length", config.max_message_bytes),
            ("grpc.max_send_message_length", config.max_message_bytes),
        ]
        self.grpc = grpc.server(
            futures.ThreadPoolExecutor(config.grpc_workers, thread_name_prefix="grpc"), options=options
        )
        add_to_server(self.service, self.grpc)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.grpc)
        reflection.enable_server_reflection((SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), self.grpc)

    def _set_health(self, status: int) -> None:
        for name in ("", SERVICE_NAME):
            self.health.set(name, status)
        self.metrics.serving.set(1 if status == health_pb2.HealthCheckResponse.SERVING else 0)

    def start(self) -> MnistServer:
        """Bind and answer health (NOT_SERVING) at once, then load and warm the model, then SERVING."""
        self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        self.port = self.grpc.add_insecure_port(f"{self.config.host}:{self.config.port}")
        if self.port == 0:
            raise SystemExit(f"mnist-serve: cannot listen on {self.config.host}:{self.config.port}")
        self.grpc.start()
        if self.config.metrics_port:
            self._metrics_http, _ = self.metrics.serve_http(self.config.metrics_port)
            self.metrics_port = self._metrics_http.server_port
        log.info("gRPC listening on port %d (health NOT_SERVING while the model loads)", self.port)

        self.model = OnnxModel(
            self.config.model, self.config.provider, self.config.max_batch_size, self.config.intra_op_threads
        )
        provider = self.model.providers[0]
        log.info(
            "inference provider: %s%s",
            provider,
            "" if self.model.on_gpu else " (no usable CUDA GPU, or --provider cpu)",
        )
        self.metrics.model_info.labels(self.model.metadata.model_name, self.model.metadata.model_version, provider).set(
            1
        )
        log.info("warm-up took %.2f s", self.model.warm_up())
        self.queue = BatchQueue(
            self.model.run,
            self.config.max_batch_size,
            self.config.max_queue_size,
            self.config.max_queue_delay_ms / 1000,
            self.metrics.batch_observer(),
        )
        self.service.attach(self.model, self.queue)
        self._set_health(health_pb2.HealthCheckResponse.SERVING)
        log.info(
            "SERVING %s %s on port %d, metrics on %s",
            self.model.metadata.model_name,
            self.model.metadata.model_version,
            self.port,
            self.metrics_port or "(off)",
        )
        return self

    def stop(self) -> None:
        """Drain: NOT_SERVING, wait `drain_seconds`, refuse new calls, let in-flight ones finish."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        log.info(
            "shutting down: health NOT_SERVING for %.1f s, then %.1f s grace for in-flight calls",
            self.config.drain_seconds,
            self.config.grace_seconds,
        )
        self.health.enter_graceful_shutdown()
        self.metrics.serving.set(0)
        time.sleep(self.config.drain_seconds)
        grace_ends = time.monotonic() + self.config.grace_seconds  # one budget for calls and queue together
        self.grpc.stop(self.config.grace_seconds).wait()
        if self.queue is not None:
            self.queue.close(timeout=max(0.0, grace_ends - time.monotonic()))
        if self._metrics_http is not None:
            self._metrics_http.shutdown()
        log.info("stopped")


def main(argv: list[str] | None = None) -> int:
    config = load_config(argv)
    logging.basicConfig(level=config.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    log.info("configuration:\n%s", describe(config))
    server = MnistServer(config)
    stop_requested = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(
            sig, lambda signum, _frame: (log.info("received %s", signal.Signals(signum).name), stop_requested.set())
        )
    try:
        server.start()
    except Exception as exc:  # no CUDA with --provider cuda, not an ONNX model, metrics port taken, ...
        log.error("cannot start: %s: %s", type(exc).__name__, exc)
        server.stop()
        return 2
    while not stop_requested.wait(0.5):
        pass
    server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
