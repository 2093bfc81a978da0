"""Prometheus metrics of the service, on their own registry and HTTP port."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from server.batching import BatchObserver

# 0.1 ms to 100 ms, with 10 ms (the SLO) as an edge.
LATENCY_BUCKETS = (
    0.0001,
    0.00025,
    0.0005,
    0.00075,
    0.001,
    0.0015,
    0.002,
    0.003,
    0.005,
    0.0075,
    0.01,
    0.015,
    0.025,
    0.05,
    0.1,
)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
CONFIDENCE_BUCKETS = (0.5, 0.7, 0.8, 0.9, 0.95, 0.98, 0.99, 0.995, 0.999, 1.0)


class ServiceMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.request_latency = Histogram(
            "mnist_request_latency_seconds",
            "gRPC call latency, server side",
            ["method", "code"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.requests = Counter("mnist_requests", "gRPC calls answered", ["method", "code"], registry=r)
        self.in_flight = Gauge("mnist_requests_in_flight", "gRPC calls being handled", registry=r)
        self.session_run = Histogram(
            "mnist_session_run_seconds", "ONNX Runtime session.run per batch", buckets=LATENCY_BUCKETS, registry=r
        )
        self.queue_wait = Histogram(
            "mnist_queue_wait_seconds", "time an image waited in the batch queue", buckets=LATENCY_BUCKETS, registry=r
        )
        self.batch_size = Histogram("mnist_batch_size", "images per session run", buckets=BATCH_BUCKETS, registry=r)
        self.queue_depth = Gauge("mnist_queue_depth", "images waiting in the batch queue", registry=r)
        self.queue_capacity = Gauge("mnist_queue_capacity", "most images the batch queue holds", registry=r)
        self.serving = Gauge("mnist_health_serving", "1 while grpc.health reports SERVING, else 0", registry=r)
        self.expired = Counter(
            "mnist_deadline_expired_images", "images dropped unrun: their deadline passed while queued", registry=r
        )
        self.model_info = Gauge(
            "mnist_model_info", "the model being served (value 1)", ["name", "version", "provider"], registry=r
        )
        self.predictions = Counter("mnist_predictions", "predicted digits", ["digit"], registry=r)
        self.confidence = Histogram(
            "mnist_prediction_confidence", "probability of the predicted digit", buckets=CONFIDENCE_BUCKETS, registry=r
        )
        for digit in range(10):
            self.predictions.labels(digit=str(digit))

    def batch_observer(self) -> BatchObserver:
        def on_batch(size: int, seconds: float) -> None:
            self.batch_size.observe(size)
            self.session_run.observe(seconds)

        return BatchObserver(
            on_batch=on_batch,
            on_wait=self.queue_wait.observe,
            on_depth=self.queue_depth.set,
            on_expired=self.expired.inc,
        )

    def serve_http(self, port: int, addr: str = "0.0.0.0"):
        """Start /metrics on `port` in a background thread; returns (server, thread)."""
        return start_http_server(port, addr=addr, registry=self.registry)
