"""mnist-serve: wire config, backend, model pipeline, gRPC service, health, reflection and metrics.

Lifecycle, all on one asyncio event loop: gRPC up with health NOT_SERVING -> backend loaded and
every batch shape warmed up (in a worker thread, so health answers meanwhile) -> SERVING ->
(SIGTERM/SIGINT) NOT_SERVING for `drain_seconds` -> refuse new calls, finish in-flight ones within
`grace_seconds` -> exit 0. Waiting calls cost a coroutine each, not a thread.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
import threading
import time

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from server.backends import build_backend
from server.config import ServeConfig, describe, load_config
from server.metrics import ServiceMetrics
from server.pipeline import ModelPipeline, PipelineSettings
from server.service import SERVICE, ClassifierServicer, add_to_server

log = logging.getLogger("mnist.serve")
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class MnistServer:
    """The whole service in one object: `await start_async()` on a loop, or `start()` on a thread of its own."""

    def __init__(self, config: ServeConfig) -> None:
        self.config = config
        self.metrics = ServiceMetrics()
        self.metrics.queue_capacity.set(config.max_queue_size)
        self.servicer = ClassifierServicer(config)
        self.pipeline: ModelPipeline | None = None
        self.port: int | None = None
        self.metrics_port: int | None = None
        self._grpc: grpc.aio.Server | None = None
        self._health: health.aio.HealthServicer | None = None
        self._metrics_http = None
        self._stopping = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    # --- on the event loop ---------------------------------------------------------------------------

    async def _set_health(self, status: int) -> None:
        for name in ("", SERVICE.full_name):
            await self._health.set(name, status)
        self.metrics.serving.set(1 if status == SERVING else 0)

    async def start_async(self) -> MnistServer:
        """Bind and answer health (NOT_SERVING) at once, then load and warm the model, then SERVING."""
        options = [
            ("grpc.max_receive_message_length", self.config.max_message_bytes),
            ("grpc.max_send_message_length", self.config.max_message_bytes),
        ]
        self._grpc = grpc.aio.server(options=options)
        self._health = health.aio.HealthServicer()
        add_to_server(self.servicer, self._grpc, self.metrics)
        health_pb2_grpc.add_HealthServicer_to_server(self._health, self._grpc)
        reflection.enable_server_reflection(
            (SERVICE.full_name, health.SERVICE_NAME, reflection.SERVICE_NAME), self._grpc
        )
        await self._set_health(NOT_SERVING)
        try:
            self.port = self._grpc.add_insecure_port(f"{self.config.host}:{self.config.port}")
        except RuntimeError:
            self.port = 0
        if not self.port:
            raise RuntimeError(f"cannot listen on {self.config.host}:{self.config.port}")
        await self._grpc.start()
        if self.config.metrics_port:
            self._metrics_http, _ = self.metrics.serve_http(self.config.metrics_port)
            self.metrics_port = self._metrics_http.server_port
        log.info("gRPC listening on port %d (health NOT_SERVING while the model loads)", self.port)

        loop = asyncio.get_running_loop()
        backend = await loop.run_in_executor(None, build_backend, self.config)
        info = backend.describe()
        log.info("backend: %s", info.summary())
        if info.engine == "onnxruntime" and not info.on_gpu:
            log.info("inference provider: %s (no usable CUDA GPU, or --provider cpu)", info.providers[0])
        else:
            log.info("inference provider: %s", info.providers[0] if info.providers else info.engine)
        self.pipeline = ModelPipeline(
            backend,
            PipelineSettings(
                max_batch_size=info.max_batch_size,
                max_queue_size=self.config.max_queue_size,
                max_queue_delay=self.config.max_queue_delay_ms / 1000,
                max_image_pixels=self.config.max_image_pixels,
                preprocess_workers=self.config.preprocess_workers,
            ),
            self.metrics.batch_observer(),
            self.metrics.observe_predictions,
        )
        self.pipeline.start()
        log.info("warm-up took %.2f s", await self.pipeline.warm_up())
        info = self.pipeline.info
        self.servicer.pipeline = self.pipeline
        self.metrics.describe_model(info)
        await self._set_health(SERVING)
        log.info(
            "SERVING %s %s on port %d, metrics on %s",
            info.model_name,
            info.model_version,
            self.port,
            self.metrics_port or "(off)",
        )
        return self

    async def stop_async(self) -> None:
        """Drain: NOT_SERVING, wait `drain_seconds`, refuse new calls, let in-flight ones finish."""
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
        self.metrics.serving.set(0)
        await asyncio.sleep(self.config.drain_seconds)
        grace_ends = time.monotonic() + self.config.grace_seconds  # one budget for calls and queue together
        if self._grpc is not None:
            await self._grpc.stop(self.config.grace_seconds)
        if self.pipeline is not None:
            await self.pipeline.close(timeout=max(0.0, grace_ends - time.monotonic()))
        if self._metrics_http is not None:
            self._metrics_http.shutdown()
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
        if self._loop is None or self._thread is None:
            return
        asyncio.run_coroutine_threadsafe(self.stop_async(), self._loop).result()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()
        self._loop = None


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
    await server.stop_async()
    return 0


def main(argv: list[str] | None = None) -> int:
    config = load_config(argv)
    logging.basicConfig(level=config.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    log.info("configuration:\n%s", describe(config))
    return asyncio.run(serve(config))


if __name__ == "__main__":
    sys.exit(main())
