"""Prometheus metrics of the service, on their own registry (served by server/ops/metrics_http.py).

Per-image figures (predicted digits, confidences, queue waits) arrive as arrays once per batch
or call and are counted with numpy (`BulkHistogram`), not with one Python call per image.

Under `mnist-serve --workers N` (server/supervisor.py) each worker process runs in prometheus_client's
multiprocess mode (PROMETHEUS_MULTIPROC_DIR set before it starts): every value lives in a file the
supervisor's /metrics reads through `MultiProcessCollector`. Each gauge says there how the workers'
values combine (`multiprocess_mode`); the bulk histograms feed a real prometheus Histogram's values.
"""

from __future__ import annotations

import bisect
import os
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import grpc
import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import HistogramMetricFamily
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from proto.contract import CONFIDENCE_BINS
from server.engine.batching import BatchObserver

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
    0.25,  # a loaded CPU server queues hundreds of milliseconds (64 load-test users: about 250 ms), and a standing
    0.5,  # queue holds up to --queue-target-ms (at most 500 ms by default): without these edges every quantile
    1.0,  # above 100 ms read as 100 ms
    2.5,
    5.0,
)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
CONFIDENCE_BUCKETS = CONFIDENCE_BINS  # shared with each version's reference (proto/contract.py): drift's bins
AUTH_PROTOCOLS = ("grpc", "http", "metrics")  # mnist_auth_refused_total series exist from the start, at 0
AUTH_REASONS = ("missing", "malformed", "invalid")


def multiprocess_mode() -> bool:
    """Whether this process writes its metrics for a supervisor (prometheus_client's own test, at import)."""
    return "PROMETHEUS_MULTIPROC_DIR" in os.environ or "prometheus_multiproc_dir" in os.environ


class InFlight:
    """Calls being handled: `inc`/`dec` on the event loop (no lock, a Gauge's lock cost every call two), read when
    /metrics is scraped."""

    def __init__(self) -> None:
        self.count = 0

    def inc(self) -> None:
        self.count += 1

    def dec(self) -> None:
        self.count -= 1

    def value(self) -> float:
        return float(self.count)


class BulkCounts:
    """One histogram series: counts per bucket and a sum, fed many observations in one numpy call."""

    def __init__(self, edges: np.ndarray) -> None:
        self.edges = edges
        self._edge_list = [float(edge) for edge in edges]
        self._counts = np.zeros(len(edges) + 1, np.int64)  # last: above every edge (+Inf only)
        self._sum = 0.0
        self._lock = threading.Lock()  # observations come from the loop or the runner, scrapes from the HTTP thread

    def observe_many(self, values: np.ndarray | list[float]) -> None:
        if len(values) <= 4:  # numpy's fixed cost per call is larger than a few bisections
            for value in values:
                self.observe(float(value))
            return
        values = np.asarray(values, np.float64).ravel()
        # Prometheus buckets are "less than or equal": a value equal to an edge falls in that edge's bucket.
        counts = np.bincount(np.searchsorted(self.edges, values, side="left"), minlength=len(self.edges) + 1)
        self._add(counts, float(values.sum()))

    def _add(self, counts: np.ndarray, total: float) -> None:
        with self._lock:
            self._counts += counts
            self._sum += total

    def observe(self, value: float) -> None:
        index = bisect.bisect_left(self._edge_list, value) if value == value else len(self._edge_list)  # NaN: +Inf
        with self._lock:
            self._counts[index] += 1
            self._sum += value

    def buckets(self) -> tuple[list[tuple[str, float]], float]:
        with self._lock:
            cumulative = np.cumsum(self._counts)
            total = self._sum
        buckets = [(_edge_label(edge), float(count)) for edge, count in zip(self.edges, cumulative[:-1], strict=True)]
        buckets.append(("+Inf", float(cumulative[-1])))
        return buckets, total


class SharedBulkCounts(BulkCounts):
    """BulkCounts that also adds each observation to a prometheus_client Histogram series, whose values live in the
    multiprocess files: the numpy counts per call, added bucket by bucket (the Histogram's own `observe` would cost a
    Python call per value). tests/test_metrics.py holds it to `observe`'s result."""

    def __init__(self, edges: np.ndarray, series: Any) -> None:
        super().__init__(edges)
        self._buckets, self._total = series._buckets, series._sum  # one value per bucket (not cumulative) and the sum

    def _add(self, counts: np.ndarray, total: float) -> None:
        with self._lock:
            for index, count in enumerate(counts.tolist()):
                if count:
                    self._buckets[index].inc(count)
            self._total.inc(total)

    def observe(self, value: float) -> None:
        index = bisect.bisect_left(self._edge_list, value) if value == value else len(self._edge_list)  # NaN: +Inf
        with self._lock:
            self._buckets[index].inc(1)
            self._total.inc(value)


class BulkHistogram(Collector):
    """A Prometheus histogram that takes many observations in one numpy call; with `labelnames`, one series per
    `labels(...)`, as prometheus_client's own. In multiprocess mode its series are a prometheus_client Histogram's,
    written to the shared files (SharedBulkCounts), and this collector yields nothing of its own."""

    def __init__(
        self,
        name: str,
        documentation: str,
        buckets: Sequence[float],
        registry: CollectorRegistry,
        labelnames: Sequence[str] = (),
    ) -> None:
        self.name, self.documentation = name, documentation
        self.edges = np.asarray(buckets, np.float64)
        self.labelnames = tuple(labelnames)
        self._lock = threading.Lock()
        self._shared = (
            Histogram(name, documentation, self.labelnames, buckets=buckets, registry=None)
            if multiprocess_mode()
            else None
        )
        self._series: dict[tuple[str, ...], BulkCounts] = {} if self.labelnames else {(): self._new_series(())}
        registry.register(self)

    def _new_series(self, values: tuple[str, ...]) -> BulkCounts:
        if self._shared is None:
            return BulkCounts(self.edges)
        return SharedBulkCounts(self.edges, self._shared.labels(*values) if values else self._shared)

    def labels(self, *values: str) -> BulkCounts:
        if len(values) != len(self.labelnames):
            raise ValueError(f"{self.name} takes labels {self.labelnames}, got {values}")
        with self._lock:
            series = self._series.get(tuple(values))
            if series is None:
                series = self._series[tuple(values)] = self._new_series(tuple(values))
            return series

    def remove(self, *values: str) -> None:
        with self._lock:
            self._series.pop(tuple(values), None)

    def observe_many(self, values: np.ndarray | list[float]) -> None:
        self._series[()].observe_many(values)

    def observe(self, value: float) -> None:
        self._series[()].observe(value)

    def collect(self) -> Iterator[HistogramMetricFamily]:
        if self._shared is not None:
            return  # the supervisor reads these series from the multiprocess files
        family = HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)
        with self._lock:
            series = list(self._series.items())
        for values, counts in series:
            buckets, total = counts.buckets()
            family.add_metric(list(values), buckets, total)
        yield family

    def describe(self) -> Iterator[HistogramMetricFamily]:
        yield HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)


CODE_NAMES = tuple(code.name for code in grpc.StatusCode)  # the codes mnist_model_requests is labelled by


def _remove(family: Any, *labels: str) -> None:
    try:
        family.remove(*labels)
    except KeyError:  # never observed
        pass


def _edge_label(edge: float) -> str:
    return floatToGoString(float(edge))  # as prometheus_client labels its own buckets: 1 -> "1.0"


def canary_events_counter(registry: CollectorRegistry) -> Counter:
    """mnist_canary_events_total: counted by the server, or with `--workers N` by the supervisor, which decides the
    trials (server/models/canary.py, TrialJudge), so each event is counted once."""
    return Counter(
        "mnist_canary_events",
        "canary trials of new versions (server/models/canary.py), by model, the version on trial and what "
        "happened: STARTED, PROMOTED, ROLLED_BACK, ENDED (a version went away undecided)",
        ["model", "version", "event"],
        registry=registry,
    )


class ServiceMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.multiprocess = multiprocess_mode()
        self._gauge_series: dict[int, set[tuple[str, ...]]] = {}  # multiprocess mode: label sets set, to zero later
        self._model_series: dict[tuple[str, str, str], tuple[Any, Any]] = {}  # observe_model_request's
        self.request_latency = Histogram(
            "mnist_request_latency_seconds",
            "gRPC call latency, server side",
            ["method", "code"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.requests = Counter("mnist_requests", "gRPC calls answered", ["method", "code"], registry=r)
        if self.multiprocess:  # a function's value is not written to the shared files: a gauge summed over workers
            self.in_flight = Gauge(
                "mnist_requests_in_flight", "gRPC calls being handled", registry=r, multiprocess_mode="livesum"
            )
        else:
            self.in_flight = InFlight()  # a plain count on the hot path; read when scraped
            Gauge("mnist_requests_in_flight", "gRPC calls being handled", registry=r).set_function(self.in_flight.value)
        self.auth_refused = Counter(
            "mnist_auth_refused",
            "calls refused for their credentials (server/security.py), by protocol (grpc, http, metrics) and "
            "reason (missing, malformed: no or unreadable bearer token; invalid: a token not accepted)",
            ["protocol", "reason"],
            registry=r,
        )
        for protocol in AUTH_PROTOCOLS:
            for reason in AUTH_REASONS:
                self.auth_refused.labels(protocol, reason)
        self.session_run = Histogram(
            "mnist_session_run_seconds", "inference backend run per batch", buckets=LATENCY_BUCKETS, registry=r
        )
        self.queue_wait = BulkHistogram(
            "mnist_queue_wait_seconds", "time a request waited in the batch queue", LATENCY_BUCKETS, r
        )
        self.batch_size = Histogram("mnist_batch_size", "images per session run", buckets=BATCH_BUCKETS, registry=r)
        self.queue_depth = Gauge(
            "mnist_queue_depth", "images waiting in the batch queue", registry=r, multiprocess_mode="livesum"
        )
        self.queue_capacity = Gauge(
            "mnist_queue_capacity", "most images the batch queue holds", registry=r, multiprocess_mode="livesum"
        )
        self.serving = Gauge(
            "mnist_health_serving",
            "1 while grpc.health reports SERVING, else 0 (with workers: 1 only while every worker does)",
            registry=r,
            multiprocess_mode="livemin",
        )
        self.expired = Counter(
            "mnist_deadline_expired_images", "images dropped unrun: their deadline passed while queued", registry=r
        )
        self.cancelled = Counter(
            "mnist_cancelled_images", "images dropped unrun: the caller went away while they were queued", registry=r
        )
        self.model_info = Gauge(
            "mnist_model_info",
            "what is being served (value 1 per READY version): model, version, whether requests naming no version get "
            "it, engine, provider, precision, layout, batch buckets, CUDA graph",
            ["name", "version", "default", "provider", "backend", "precision", "layout", "buckets", "cuda_graph"],
            registry=r,
            multiprocess_mode="livemax",
        )
        self.model_versions = Gauge(
            "mnist_model_versions",
            "model versions the server knows of, by state (READY, LOADING, FAILED, UNLOADING)",
            ["model", "state"],
            registry=r,
            multiprocess_mode="livemax",
        )
        self.model_load_seconds = Gauge(
            "mnist_model_load_seconds",
            "how long the version's load, verification on stored digits and warm-up took",
            ["model", "version"],
            registry=r,
            multiprocess_mode="livemax",
        )
        self.model_load_failures = Counter(
            "mnist_model_load_failures",
            "model versions that failed to load or verify and never took traffic (version '-': the model's "
            "config.pbtxt)",
            ["model", "version"],
            registry=r,
        )
        self.model_requests = Counter(
            "mnist_model_requests", "requests answered, by the model version that answered and status code",
            ["model", "version", "code"], registry=r,
        )  # fmt: skip
        self.model_latency = Histogram(
            "mnist_model_request_latency_seconds",
            "request latency from routing to answer, by the model version that answered (both protocols)",
            ["model", "version"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.decoding_pixels = Gauge(
            "mnist_decoding_pixels",
            "pixels of encoded images being decoded now (bounded by max_decoding_pixels)",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.open_streams = Gauge(
            "mnist_open_streams",
            "long-lived streams open now (health Watch, reflection; bounded by max_streams)",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.non_digits = Counter(
            "mnist_non_digit_images",
            "images answered is_digit=false (the detector says they are not digits), by model version: "
            "over mnist_predictions_total (the same images, all answers) it is the version's flagged share",
            ["model", "version"],
            registry=r,
        )
        self.read_digits = Histogram(
            "mnist_read_digits_per_image",
            "digits ReadDigits found in an image",
            buckets=(0, 1, 2, 3, 4, 5, 6, 8, 10, 12, 16, 20, 32, 64),
            registry=r,
        )
        self.read_segmentation = Histogram(
            "mnist_read_segmentation_seconds",
            "ReadDigits, ReadTable, ReadExpression: decoding an image and finding its digits (symbols, cells), "
            "before the model runs",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.table_cells = Histogram(
            "mnist_read_table_cells",
            "cells (rows x columns) of each table ReadTable read",
            buckets=(2, 4, 6, 9, 12, 16, 24, 36, 48, 72, 96, 128, 192, 256),
            registry=r,
        )
        self.expression_symbols = Histogram(
            "mnist_read_expression_symbols",
            "symbols (digits and operators) of each expression ReadExpression read",
            buckets=(2, 3, 4, 5, 6, 8, 10, 12, 16, 24, 32, 64),
            registry=r,
        )
        self.predictions = Counter(
            "mnist_predictions", "predicted digits, by model version", ["model", "version", "digit"], registry=r
        )
        self.confidence = BulkHistogram(
            "mnist_prediction_confidence",
            "probability of the predicted digit, by model version",
            CONFIDENCE_BUCKETS,
            r,
            ("model", "version"),
        )
        # The feedback loop (server/feedback/): labels joined with answers, the database, live quality and drift.
        version_labels = ["model", "version"]
        live = {"registry": r, "multiprocess_mode": "liveall"}  # with workers: one series per worker (a pid label)
        self.feedback = Counter(
            "mnist_feedback",
            "labelled answers: the true label of an answer joined with it, by the version that answered and whether "
            "it was right",
            ["model", "version", "correct"],
            registry=r,
        )
        self.feedback_refused = Counter(
            "mnist_feedback_refused",
            "Feedback calls refused, by reason (unknown_request, bad_label, duplicate, no_store)",
            ["reason"],
            registry=r,
        )
        self.feedback_stored = Counter("mnist_feedback_stored", "feedback records written to the database", registry=r)
        self.feedback_dropped = Counter(
            "mnist_feedback_dropped",
            "feedback records not stored, by reason (queue_full, database_unavailable, write_failed); answers are "
            "never slowed or failed by the database",
            ["reason"],
            registry=r,
        )
        self.feedback_confusion = Counter(
            "mnist_feedback_confusion",
            "labelled answers by true label and prediction (ReadDigits: digit by digit when the lengths agree)",
            ["model", "version", "label", "predicted"],
            registry=r,
        )
        self.live_accuracy = Gauge(
            "mnist_live_accuracy",
            "accuracy over the version's last labelled answers (NaN: none yet)",
            version_labels,
            **live,
        )
        self.live_accuracy_answers = Gauge(
            "mnist_live_accuracy_answers", "labelled answers mnist_live_accuracy is over", version_labels, **live
        )
        self.reference_accuracy = Gauge(
            "mnist_reference_accuracy",
            "the version's MNIST test-set accuracy, from its reference (NAME.reference.json; NaN: none)",
            version_labels,
            **live,
        )
        self.prediction_drift = Gauge(
            "mnist_prediction_drift_psi",
            "population stability index of the predicted-digit mix over the drift window against the version's "
            "reference (under 0.1 stable, over 0.25 shifted; NaN: no reference or too few answers)",
            version_labels,
            **live,
        )
        self.confidence_drift = Gauge(
            "mnist_confidence_drift_psi",
            "population stability index of the confidence distribution over the drift window against the "
            "version's reference",
            version_labels,
            **live,
        )
        self.canary_events = canary_events_counter(r)
        self.drift_window_answers = Gauge(
            "mnist_drift_window_answers", "answers in the drift window", version_labels, **live
        )

    def count_refusal(self, protocol: str, error: object) -> None:
        """One call refused by server/security.py's checks (`error` an AuthRefused: its `reason`
        labels it)."""
        self.auth_refused.labels(protocol, getattr(error, "reason", "invalid")).inc()

    def describe_models(self, repository: Any) -> None:
        """mnist_model_info for every READY version, and the count of versions by state
        (server/models/repository.py)."""
        self._clear_gauge(self.model_info)
        defaults = {(s.name, s.version) for s in repository.statuses() if s.is_default}
        for served in repository.served():
            info = served.pipeline.info
            self._gauge_labels(
                self.model_info,
                name=served.name,
                version=served.version,
                default=str((served.name, served.version) in defaults).lower(),
                provider=info.providers[0] if info.providers else info.engine,
                backend=info.engine,
                precision=info.precision,
                layout=info.layout,
                buckets=",".join(map(str, info.batch_buckets)) or "any",
                cuda_graph=str(info.cuda_graph).lower(),
            ).set(1)
        self._clear_gauge(self.model_versions)
        counts: dict[tuple[str, str], int] = {}
        for status in repository.statuses():
            counts[(status.name, status.state)] = counts.get((status.name, status.state), 0) + 1
        for (name, state), count in counts.items():
            self._gauge_labels(self.model_versions, model=name, state=state).set(count)

    def _gauge_labels(self, family: Gauge, **labels: str) -> Any:
        """`family.labels(**labels)`, remembered in multiprocess mode so `_clear_gauge` can zero it there."""
        if self.multiprocess:
            self._gauge_series.setdefault(id(family), set()).add(tuple(labels[name] for name in family._labelnames))
        return family.labels(**labels)

    def _clear_gauge(self, family: Gauge) -> None:
        """Every series of a labelled gauge gone; in multiprocess mode, where a series cannot be removed from the
        shared files, set to 0 instead (a version no longer served reads 0, not 1)."""
        if not self.multiprocess:
            family.clear()
            return
        for values in self._gauge_series.pop(id(family), set()):
            family.labels(*values).set(0)

    def observe_reading(self, digits: int, seconds: float) -> None:
        self.read_digits.observe(digits)
        self.read_segmentation.observe(seconds)

    def observe_table(self, cells: int, seconds: float) -> None:
        self.table_cells.observe(cells)
        self.read_segmentation.observe(seconds)

    def observe_expression(self, symbols: int, seconds: float) -> None:
        self.expression_symbols.observe(symbols)
        self.read_segmentation.observe(seconds)

    def observe_model_request(self, model: str, version: str, code: str, seconds: float) -> None:
        """One request answered by a model version: counted by code and timed. The labelled series are looked up
        once per (version, code) and kept: `labels()` was the largest cost of a refused call here."""
        series = self._model_series.get((model, version, code))
        if series is None:
            series = self._model_series[(model, version, code)] = (
                self.model_requests.labels(model, version, code),
                self.model_latency.labels(model, version),
            )
        series[0].inc()
        series[1].observe(seconds)

    def forget_version(self, model: str, version: str) -> None:
        """A version was unloaded: its series go, so that a server shipping weekly versions does not grow forever.
        In multiprocess mode series cannot be removed from the shared files: they stay, and stop growing."""
        if self.multiprocess:
            self._model_series = {
                key: value for key, value in self._model_series.items() if key[:2] != (model, version)
            }
            self.model_load_seconds.labels(model, version).set(0)
            return
        for key in [key for key in self._model_series if key[:2] == (model, version)]:
            del self._model_series[key]
        for digit in range(10):
            _remove(self.predictions, model, version, str(digit))
        for code in CODE_NAMES:
            _remove(self.model_requests, model, version, code)
        for family in (self.model_latency, self.model_load_seconds, self.non_digits):
            _remove(family, model, version)
        self.confidence.remove(model, version)

    def prediction_observer(self, model: str, version: str) -> Callable[[np.ndarray, np.ndarray, np.ndarray], None]:
        """The per-batch callback of one model version's pipeline: its digit counts, confidences and non-digits.
        The version's non-digit series exists from here on, at 0 until an image is flagged: its flagged share reads 0,
        not absent, and Prometheus's rate() sees the first flagged image."""
        digit_counters = [self.predictions.labels(model, version, str(digit)) for digit in range(10)]
        confidence = self.confidence.labels(model, version)
        non_digits = self.non_digits.labels(model, version)

        def observe(digits: np.ndarray, confidences: np.ndarray, is_digit: np.ndarray | None = None) -> None:
            if is_digit is not None and len(is_digit) and not is_digit.all():
                non_digits.inc(int(len(is_digit) - np.count_nonzero(is_digit)))
            if len(digits) <= 4:
                for digit in digits.tolist():
                    digit_counters[digit].inc()
            else:
                for digit, count in enumerate(np.bincount(digits, minlength=10)[:10].tolist()):
                    if count:
                        digit_counters[digit].inc(count)
            confidence.observe_many(confidences)

        return observe

    def observe_predictions(
        self, digits: np.ndarray, confidences: np.ndarray, is_digit: np.ndarray | None = None
    ) -> None:
        """A batch's predictions for a pipeline built without a model name (tests, tools): model and version ''."""
        self.prediction_observer("", "")(digits, confidences, is_digit)

    def batch_observer(self) -> BatchObserver:
        def on_batch(size: int, seconds: float) -> None:
            self.batch_size.observe(size)
            self.session_run.observe(seconds)

        def on_dropped(expired: int, cancelled: int) -> None:
            if expired:
                self.expired.inc(expired)
            if cancelled:
                self.cancelled.inc(cancelled)

        return BatchObserver(
            on_batch=on_batch,
            on_waits=self.queue_wait.observe_many,
            on_depth=self.queue_depth.set,
            on_dropped=on_dropped,
        )
