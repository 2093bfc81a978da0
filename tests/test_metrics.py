"""server.ops.metrics: the numpy histogram exposes what prometheus_client's own would; predictions are counted
per batch."""

from __future__ import annotations

import numpy as np
import pytest
from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from server.ops.metrics import CONFIDENCE_BUCKETS, LATENCY_BUCKETS, BulkHistogram, ServiceMetrics

NAME = "mnist_test_seconds"


def exposition(registry: CollectorRegistry) -> dict[str, float]:
    """Bucket, count and sum samples as 'name{le="..."}' -> value (prometheus_client's `_created` left out)."""
    samples = {}
    for family in text_string_to_metric_families(generate_latest(registry).decode()):
        for s in family.samples:
            if s.name.endswith(("_bucket", "_count", "_sum")):
                samples[s.name + (f'{{le="{s.labels["le"]}"}}' if "le" in s.labels else "")] = s.value
    return samples


def values_for(buckets: tuple[float, ...]) -> np.ndarray:
    """Random values across the range, every edge exactly, values above the last edge, below the first, and 0."""
    rng = np.random.default_rng(9)
    top = buckets[-1]
    return np.concatenate(
        [rng.uniform(0, 1.2 * top, 300), np.asarray(buckets), np.asarray(buckets), [top * 2, top * 1e6, 0.0, -1.0]]
    )


def reference(buckets: tuple[float, ...], values: np.ndarray) -> dict[str, float]:
    registry = CollectorRegistry()
    histogram = Histogram(NAME, "reference", buckets=buckets, registry=registry)
    for value in values.tolist():
        histogram.observe(value)
    return exposition(registry)


@pytest.mark.parametrize("buckets", [LATENCY_BUCKETS, CONFIDENCE_BUCKETS, (1, 2, 4, 8)], ids=["latency", "conf", "int"])
def test_observe_many_exposes_the_same_buckets_count_and_sum_as_prometheus_client(buckets) -> None:
    values = values_for(buckets)
    registry = CollectorRegistry()
    bulk = BulkHistogram(NAME, "bulk", buckets, registry)
    for part in np.array_split(values, 5):  # several batches, one empty among them
        bulk.observe_many(part)
    bulk.observe_many(np.empty(0))
    got, expected = exposition(registry), reference(buckets, values)
    assert got.keys() == expected.keys()
    sums = f"{NAME}_sum"
    # numpy sums each batch pairwise, prometheus_client one value at a time: equal up to rounding
    assert got.pop(sums) == pytest.approx(expected.pop(sums), rel=1e-12)
    assert got == expected
    assert expected[f'{NAME}_bucket{{le="+Inf"}}'] == expected[f"{NAME}_count"] == len(values)


@pytest.mark.parametrize("buckets", [LATENCY_BUCKETS, CONFIDENCE_BUCKETS, (1, 2, 4, 8)], ids=["latency", "conf", "int"])
def test_observe_exposes_exactly_what_prometheus_client_does(buckets) -> None:
    values = values_for(buckets)
    registry = CollectorRegistry()
    bulk = BulkHistogram(NAME, "bulk", buckets, registry)
    for value in values.tolist():
        bulk.observe(value)
    assert exposition(registry) == reference(buckets, values)


def test_a_value_on_an_edge_falls_in_that_edges_bucket() -> None:
    registry = CollectorRegistry()
    bulk = BulkHistogram(NAME, "bulk", (0.5, 1.0), registry)
    bulk.observe_many(np.array([0.5, 1.0, 1.0000001]))
    bulk.observe(0.5)
    assert exposition(registry) == {
        f'{NAME}_bucket{{le="0.5"}}': 2,
        f'{NAME}_bucket{{le="1.0"}}': 3,
        f'{NAME}_bucket{{le="+Inf"}}': 4,
        f"{NAME}_count": 4,
        f"{NAME}_sum": pytest.approx(3.0000001),
    }


def test_a_nan_observation_is_counted_alike_by_observe_and_observe_many_and_never_under_a_finite_edge() -> None:
    values = np.array([0.2, np.nan, 0.7])
    exposed = {}
    for feed in ("observe", "observe_many"):
        registry = CollectorRegistry()
        bulk = BulkHistogram(NAME, "bulk", (0.5, 1.0), registry)
        if feed == "observe":
            for value in values.tolist():
                bulk.observe(value)
        else:
            bulk.observe_many(values)
        exposed[feed] = exposition(registry)
        assert np.isnan(exposed[feed].pop(f"{NAME}_sum"))
        assert exposed[feed][f'{NAME}_bucket{{le="0.5"}}'] == 1, feed  # 0.2 only
        assert exposed[feed][f'{NAME}_bucket{{le="1.0"}}'] == 2, feed  # 0.2 and 0.7
    assert exposed["observe"] == exposed["observe_many"]


def test_a_model_versions_predictions_count_digits_and_feed_its_confidence_histogram() -> None:
    metrics = ServiceMetrics()
    version = {"model": "googlenet-fast", "version": "3"}
    observe = metrics.prediction_observer("googlenet-fast", "3")

    def count(digit: int) -> float:
        return metrics.registry.get_sample_value("mnist_predictions_total", {**version, "digit": str(digit)})

    def confidence(sample: str, le: str | None = None) -> float:
        labels = {**version, "le": le} if le else version
        return metrics.registry.get_sample_value(f"mnist_prediction_confidence_{sample}", labels)

    digits = np.array([3, 3, 0, 9, 3, 9, 1])
    confidences = np.array([0.985, 0.5, 0.97, 0.75, 1.0, 0.6, 0.996], np.float32)  # 0.5, 1.0: edges, exact in float32
    observe(digits, confidences)
    assert [count(d) for d in range(10)] == [1, 1, 0, 3, 0, 0, 0, 0, 0, 2]
    assert confidence("count") == 7 and confidence("sum") == pytest.approx(float(confidences.sum()), rel=1e-6)
    cumulative = [confidence("bucket", le) for le in ("0.5", "0.7", "0.8", "0.9", "0.95", "0.98", "0.99", "0.995")]
    assert cumulative == [1, 2, 3, 3, 3, 4, 5, 5]
    assert confidence("bucket", "0.999") == 6 and confidence("bucket", "1.0") == confidence("bucket", "+Inf") == 7

    observe(np.array([3, 5]), np.array([0.9, 0.9], np.float32))
    assert [count(d) for d in range(10)] == [1, 1, 0, 4, 0, 1, 0, 0, 0, 2]
    assert confidence("count") == 9
    observe(np.array([], np.int64), np.array([], np.float32))
    assert confidence("count") == 9 and sum(count(d) for d in range(10)) == 9


def test_another_version_counts_apart() -> None:
    metrics = ServiceMetrics()
    metrics.prediction_observer("googlenet-fast", "3")(np.array([7]), np.array([0.9], np.float32))
    metrics.prediction_observer("googlenet-fast", "4")(np.array([7, 7]), np.array([0.9, 0.9], np.float32))
    for version, expected in (("3", 1), ("4", 2)):
        labels = {"model": "googlenet-fast", "version": version}
        assert metrics.registry.get_sample_value("mnist_predictions_total", {**labels, "digit": "7"}) == expected
        assert metrics.registry.get_sample_value("mnist_prediction_confidence_count", labels) == expected


def test_an_unloaded_versions_series_are_forgotten_and_others_kept() -> None:
    metrics = ServiceMetrics()
    for version in ("3", "4"):
        metrics.prediction_observer("googlenet-fast", version)(np.array([7]), np.array([0.9], np.float32))
        metrics.model_requests.labels("googlenet-fast", version, "OK").inc()
        metrics.model_latency.labels("googlenet-fast", version).observe(0.01)
    metrics.forget_version("googlenet-fast", "3")
    text = generate_latest(metrics.registry).decode()
    assert 'version="3"' not in text and 'version="4"' in text


def test_flagged_answers_are_counted_per_model_version_and_forgotten_with_it() -> None:
    metrics = ServiceMetrics()

    def flagged(version: str) -> float | None:
        labels = {"model": "googlenet-fast", "version": version}
        return metrics.registry.get_sample_value("mnist_non_digit_images_total", labels)

    observe = metrics.prediction_observer("googlenet-fast", "3")
    metrics.prediction_observer("googlenet-fast", "4")
    assert flagged("3") == flagged("4") == 0  # from load on: the share reads 0, not absent
    is_digit = np.array([True, False, True, True, False, True, False, True])
    observe(np.arange(8) % 10, np.full(8, 0.9, np.float32), is_digit)
    assert flagged("3") == 3 and flagged("4") == 0
    observe(np.array([1, 2]), np.array([0.9, 0.9], np.float32), np.array([True, True]))
    observe(np.array([1]), np.array([0.9], np.float32))  # a pipeline without a detector flags nothing
    assert flagged("3") == 3
    predicted = sum(
        metrics.registry.get_sample_value(
            "mnist_predictions_total", {"model": "googlenet-fast", "version": "3", "digit": str(d)}
        )
        for d in range(10)
    )
    assert predicted == 11  # the share's denominator counts the same images, flagged ones included

    metrics.forget_version("googlenet-fast", "3")
    assert flagged("3") is None and flagged("4") == 0


MULTIPROCESS_SCRIPT = """
import json, sys
import numpy as np
from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector
from server.ops.metrics import BulkHistogram, LATENCY_BUCKETS
values = np.asarray(json.loads(sys.argv[1]))
bulk = BulkHistogram("mnist_bulk_seconds", "bulk", LATENCY_BUCKETS, CollectorRegistry(), ("model",))
series = bulk.labels("m")
series.observe_many(values[:3])  # a few values: one at a time
series.observe_many(values[3:])  # many: counted with numpy
reference = Histogram("mnist_reference_seconds", "reference", ["model"], buckets=LATENCY_BUCKETS)
for value in values.tolist():
    reference.labels("m").observe(value)
merged = CollectorRegistry()
MultiProcessCollector(merged)
print(generate_latest(merged).decode())
"""


def test_in_multiprocess_mode_bulk_observations_reach_the_shared_files_as_prometheus_clients_own(tmp_path) -> None:
    """Under `mnist-serve --workers N` the bulk histograms write to prometheus_client's multiprocess files (through
    its Histogram's own values): what the supervisor's /metrics reads must be what Histogram.observe writes."""
    import json
    import os
    import subprocess
    import sys

    values = values_for(LATENCY_BUCKETS)
    done = subprocess.run(
        [sys.executable, "-c", MULTIPROCESS_SCRIPT, json.dumps(values.tolist())],
        capture_output=True, text=True, timeout=60, env={**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    samples: dict[str, dict[str, float]] = {"mnist_bulk_seconds": {}, "mnist_reference_seconds": {}}
    for family in text_string_to_metric_families(done.stdout):
        for s in family.samples:
            if family.name in samples and s.name.endswith(("_bucket", "_count", "_sum")):
                key = s.name.removeprefix(family.name) + s.labels.get("le", "")
                samples[family.name][key] = s.value
    bulk, reference = samples["mnist_bulk_seconds"], samples["mnist_reference_seconds"]
    assert len(bulk) == len(LATENCY_BUCKETS) + 3 and bulk.keys() == reference.keys()
    for key in reference:
        assert bulk[key] == pytest.approx(reference[key]), key
