"""OpenTelemetry traces: a server span per call, with child spans for preprocess, queue wait and inference.

Off by default. `--otlp-endpoint` (e.g. http://collector:4317) turns it on: spans go to that OTLP
collector over gRPC through a BatchSpanProcessor (exported off the event loop, dropped rather than
queued without bound when the collector is slow), sampled by a parent-based ratio sampler
(`--trace-sample-ratio`: a caller's sampling decision is kept, new traces are sampled at the ratio).

The spans of one call, the parent taken from the caller's W3C `traceparent` / `tracestate` (gRPC
metadata or HTTP headers; without one, or with a malformed one, the call starts a new trace):

    mnist.v1.Classifier/Classify   SERVER; rpc.system, rpc.service, rpc.method, rpc.grpc.status_code,
     |                             mnist.images; status ERROR ("CODE: message") when not answered OK
     |- preprocess                 payload checks and decoding
     |- queue wait                 from the job's enqueue to the start of the first batch run taking its images
     '- inference                  from that start to the end of the (last) batch run; mnist.batch.images

A batch serves many calls, so there is no shared batch span: each call gets its own `queue wait`
and `inference` spans, drawn afterwards with explicit start and end times that the batcher records
on its Job (server/engine/batching.py: monotonic clock, converted to wall-clock time here). Every trace then
shows where its own time went; `mnist.batch.images` says how many images shared the run.

The rest of the code calls this module through a small API and checks `tracing.enabled` first, so
with tracing off a call costs that check and nothing else: no OpenTelemetry context work.
Another transport (REST) starts its server span from its request headers the same way:

    with tracing.server_span("POST /v2/models/mnist/infer", request.headers) as span:
        ...  # pipeline.classify(...) inside gets the child spans
        span.set_attribute("http.response.status_code", status)

`Tracing` is one process-wide installation (the server's, or a test's with an in-memory exporter).
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any, Protocol

try:
    from opentelemetry import context as otel_context
    from opentelemetry import trace
    from opentelemetry.propagators.textmap import Getter
    from opentelemetry.trace import SpanKind, Status, StatusCode
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    AVAILABLE = True
except ImportError:  # the serve extras bring it; a bare machine (the lent GPU one) may not: tracing stays off
    AVAILABLE = False

if TYPE_CHECKING:
    from opentelemetry.sdk.trace.export import SpanExporter

SERVICE_NAME = "mnist-serve"
SHUTDOWN_SECONDS = 5.0  # at stop: how long the last spans may take to reach the collector

enabled = False  # tracing is on in this process: the hooks' one check
_tracer: trace.Tracer | None = None
_installed: Tracing | None = None
_PROPAGATOR = TraceContextTextMapPropagator() if AVAILABLE else None  # W3C traceparent + tracestate, not global

# gRPC invocation metadata (key, value) pairs, or an HTTP headers mapping (names in any case).
Carrier = Mapping[str, Any] | Iterable[tuple[str, Any]] | None


class _CarrierGetter(Getter[Mapping[str, Any]] if AVAILABLE else object):
    def get(self, carrier: Mapping[str, Any], key: str) -> list[str] | None:
        value = carrier.get(key)
        if value is None:  # a plain dict of HTTP headers may spell it Traceparent; gRPC keys are lowercase
            value = next((v for k, v in carrier.items() if isinstance(k, str) and k.lower() == key), None)
        return [value] if isinstance(value, str) else None

    def keys(self, carrier: Mapping[str, Any]) -> list[str]:
        return list(carrier)


_GETTER = _CarrierGetter()


class Tracing:
    """A tracer provider exporting through a BatchSpanProcessor; `install()` makes it the process's tracing."""

    def __init__(self, exporter: SpanExporter, sample_ratio: float = 1.0) -> None:
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
        from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

        self.provider = TracerProvider(
            sampler=ParentBased(TraceIdRatioBased(sample_ratio)),
            resource=Resource.create({"service.name": SERVICE_NAME}),
            shutdown_on_exit=False,  # flushed by shutdown() when the server stops, never at exit
        )
        self.provider.add_span_processor(BatchSpanProcessor(exporter))
        self.sample_ratio = sample_ratio
        self.tracer = self.provider.get_tracer("server.tracing")

    @classmethod
    def from_config(cls, config: Any) -> Tracing | None:
        """OTLP over gRPC to `config.otlp_endpoint`; None when it is empty (tracing off)."""
        if not config.otlp_endpoint:
            return None
        if not AVAILABLE:
            raise RuntimeError(
                "--otlp-endpoint needs OpenTelemetry: "
                "pip install opentelemetry-sdk opentelemetry-exporter-otlp-proto-grpc"
            )
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        return cls(OTLPSpanExporter(endpoint=config.otlp_endpoint), config.trace_sample_ratio)

    def install(self) -> Tracing:
        global enabled, _tracer, _installed
        _tracer, _installed, enabled = self.tracer, self, True
        return self

    def force_flush(self) -> bool:
        """Export every span ended so far, now (tests read an in-memory exporter after this)."""
        return self.provider.force_flush()

    def shutdown(self, timeout: float = SHUTDOWN_SECONDS) -> None:
        """Turn tracing off (if this one is installed) and export what is left, waiting at most `timeout` s."""
        global enabled, _installed
        if _installed is self:
            enabled, _installed = False, None  # _tracer stays: a call still running ends its spans harmlessly
        worker = threading.Thread(target=self.provider.shutdown, name="trace-flush", daemon=True)
        worker.start()
        worker.join(timeout)  # a collector that does not answer cannot hold the shutdown longer


class StatusLike(Protocol):
    """grpc.StatusCode, without importing grpc here: value is (number, text)."""

    name: str
    value: tuple[int, str]


class ServerSpan:
    """One call's span, current while the call runs; end it once (end, end_grpc or the server_span block)."""

    __slots__ = ("span", "_token", "_error")

    def __init__(self, span: trace.Span, token: object) -> None:
        self.span = span
        self._token = token
        self._error: str | None = None

    def set_attribute(self, key: str, value: Any) -> None:
        self.span.set_attribute(key, value)

    def fail(self, description: str) -> None:
        """The call failed: the span ends with status ERROR and this description."""
        self._error = description

    def end_grpc(self, code: StatusLike, message: str = "") -> None:
        self.span.set_attribute("rpc.grpc.status_code", code.value[0])
        if code.value[0] != 0:
            self.fail(f"{code.name}: {message}" if message else code.name)
        self.end()

    def end(self) -> None:
        if self._error is not None:
            self.span.set_status(Status(StatusCode.ERROR, self._error))
        self.span.end()
        otel_context.detach(self._token)


class _NoSpan:
    """What server_span yields with tracing off: every method does nothing."""

    __slots__ = ()

    def set_attribute(self, key: str, value: Any) -> None:
        pass

    def fail(self, description: str) -> None:
        pass

    def end_grpc(self, code: StatusLike, message: str = "") -> None:
        pass

    def end(self) -> None:
        pass


NO_SPAN = _NoSpan()


def grpc_call(service: str, method: str) -> tuple[str, dict[str, str]]:
    """The span name ("mnist.v1.Classifier/Classify") and attributes of a gRPC method's calls: once per method."""
    name = f"{service}/{method}" if service else method
    return name, {"rpc.system": "grpc", "rpc.service": service, "rpc.method": method}


def start_server_span(name: str, carrier: Carrier, attributes: Mapping[str, Any] | None = None) -> ServerSpan | _NoSpan:
    """Start a call's SERVER span, child of the caller's traceparent in `carrier`, and make it current.

    Call it on the task that runs the call (the span is current in that task's context until end())."""
    if not enabled:
        return NO_SPAN
    headers = carrier if isinstance(carrier, Mapping) else dict(carrier or ())
    parent = _PROPAGATOR.extract(headers, getter=_GETTER)
    span = _tracer.start_span(name, context=parent, kind=SpanKind.SERVER, attributes=attributes)
    return ServerSpan(span, otel_context.attach(trace.set_span_in_context(span)))


@contextlib.contextmanager
def server_span(
    name: str, carrier: Carrier, attributes: Mapping[str, Any] | None = None
) -> Iterator[ServerSpan | _NoSpan]:
    """`start_server_span` as a block: an exception leaving it marks the span ERROR; the span ends with it."""
    call = start_server_span(name, carrier, attributes)
    try:
        yield call
    except BaseException as exc:
        call.fail(f"{type(exc).__name__}: {exc}")
        raise
    finally:
        call.end()


@contextlib.contextmanager
def preprocess_span(images: int) -> Iterator[None]:
    """The `preprocess` child of the current call's span; also puts the call's image count on the call."""
    call = trace.get_current_span()
    if not call.is_recording():  # not sampled, or no call span here
        yield
        return
    call.set_attribute("mnist.images", images)
    with _tracer.start_as_current_span("preprocess", attributes={"mnist.images": images}):
        yield


class TimedJob(Protocol):
    """What the batcher records on a Job (time.monotonic() seconds; None = not yet)."""

    enqueued_at: float
    run_started: float | None
    run_ended: float | None
    batch_images: int


def record_job(job: TimedJob) -> None:
    """The `queue wait` and `inference` children of the current call's span, from its job's timestamps.

    A job that never ran (its deadline passed, its caller left) gets a `queue wait` up to now only."""
    call = trace.get_current_span()
    if not call.is_recording():
        return
    now = time.monotonic()
    offset = _wall_offset_ns()

    def wall(seconds: float) -> int:
        return round(seconds * 1e9) + offset

    started = job.run_started
    queued = _tracer.start_span("queue wait", start_time=wall(job.enqueued_at))
    queued.end(end_time=wall(now if started is None else started))
    if started is not None:
        ended = job.run_ended if job.run_ended is not None and job.run_ended >= started else now  # still running
        inference = _tracer.start_span(
            "inference", start_time=wall(started), attributes={"mnist.batch.images": job.batch_images}
        )
        inference.end(end_time=wall(ended))


def _wall_offset_ns() -> int:
    """time.time_ns() - time.monotonic_ns(), read tightly: the narrowest of three brackets (a thread switched out
    between the two reads would shift every converted time by the switch)."""
    best = (1 << 62, 0)
    for _ in range(3):
        before = time.monotonic_ns()
        wall = time.time_ns()
        after = time.monotonic_ns()
        best = min(best, (after - before, wall - (before + after) // 2))
    return best[1]
