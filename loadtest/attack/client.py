"""Talking to the server from this process: method paths, raw-bytes calls timed (`Client`, `Reply`), the wire
fields of a reply, /metrics scraped and read, the MNIST test digits sent, and `probe`: what a well-behaved client
sees while a check runs."""

from __future__ import annotations

import contextlib
import threading
import time
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np

CLASSIFY = "/mnist.v1.Classifier/Classify"
CLASSIFY_BATCH = "/mnist.v1.Classifier/ClassifyBatch"
GET_MODEL_INFO = "/mnist.v1.Classifier/GetModelInfo"
HEALTH_CHECK = "/grpc.health.v1.Health/Check"
HEALTH_WATCH = "/grpc.health.v1.Health/Watch"
REFLECTION_V1ALPHA = "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"
REFLECTION_V1 = "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo"
RETRY_HINT_KEYS = ("retry-after-ms", "grpc-retry-pushback-ms")
CHANNEL_OPTIONS = [("grpc.max_receive_message_length", 64 << 20), ("grpc.max_send_message_length", 64 << 20)]


def top_level_fields(data: bytes) -> set[int]:
    """Field numbers present at the top level of a serialized message (empty set if it does not scan)."""
    numbers, pos = set(), 0
    try:
        while pos < len(data):
            key, pos = _varint(data, pos)
            number, wire = key >> 3, key & 7
            numbers.add(number)
            if wire == 0:
                _, pos = _varint(data, pos)
            elif wire == 2:
                length, pos = _varint(data, pos)
                pos += length
            elif wire in (1, 5):
                pos += 8 if wire == 1 else 4
            elif wire not in (3, 4):
                return numbers
    except IndexError:
        pass
    return numbers


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7


def varint(value: int) -> bytes:
    out = bytearray()
    while True:
        out.append((value & 0x7F) | (0x80 if value > 0x7F else 0))
        value >>= 7
        if not value:
            return bytes(out)


@dataclass
class Reply:
    code: str
    seconds: float
    details: str = ""
    response: Any = None  # a parsed ClassifyResponse / ClassifyBatchResponse on OK
    wire: set[int] = field(default_factory=set)  # top-level field numbers of a ClassifyResponse on the wire
    trailing: tuple = ()


def response_field(response: Any, name: str) -> Any:
    """`response.name`, or None when the generated stubs lack the field (not yet regenerated)."""
    if response is None or name not in response.DESCRIPTOR.fields_by_name:
        return None
    return getattr(response, name)


class Client:
    """Raw-bytes calls to the server, timed; failures come back as a status name, never raised."""

    def __init__(self, target: str) -> None:
        import grpc

        self.grpc = grpc
        self.channel = grpc.insecure_channel(target, options=CHANNEL_OPTIONS)
        self._classify = self.channel.unary_unary(CLASSIFY)
        self._batch = self.channel.unary_unary(CLASSIFY_BATCH)
        self._check = self.channel.unary_unary(HEALTH_CHECK)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.channel.close()

    def _call(self, method: Any, payload: bytes, timeout: float, parse: Any) -> Reply:
        started = time.perf_counter()
        try:
            data, call = method.with_call(payload, timeout=timeout)
        except self.grpc.RpcError as err:
            return Reply(
                err.code().name,
                time.perf_counter() - started,
                err.details() or "",
                trailing=tuple(err.trailing_metadata() or ()),
            )
        seconds = time.perf_counter() - started
        return Reply("OK", seconds, "", parse(data), top_level_fields(data), tuple(call.trailing_metadata() or ()))

    def classify(self, request: Any, timeout: float = 10.0) -> Reply:
        from proto.mnist.v1 import classifier_pb2 as pb

        payload = request if isinstance(request, bytes) else request.SerializeToString()
        return self._call(self._classify, payload, timeout, pb.ClassifyResponse.FromString)

    def classify_batch(self, requests: list[Any], timeout: float = 10.0) -> Reply:
        from proto.mnist.v1 import classifier_pb2 as pb

        payload = pb.ClassifyBatchRequest(requests=requests).SerializeToString()
        return self._call(self._batch, payload, timeout, pb.ClassifyBatchResponse.FromString)

    def health(self, timeout: float = 5.0) -> Reply:
        from grpc_health.v1 import health_pb2

        return self._call(self._check, b"", timeout, health_pb2.HealthCheckResponse.FromString)


def raw_request(data: bytes) -> Any:
    from proto.mnist.v1 import classifier_pb2 as pb

    return pb.ClassifyRequest(raw=data)


def encoded_request(data: bytes) -> Any:
    from proto.mnist.v1 import classifier_pb2 as pb

    return pb.ClassifyRequest(encoded=data)


def scrape(url: str, timeout: float = 2.0) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as reply:  # noqa: S310 - loopback only
        return reply.read().decode()


def metric(text: str, name: str, **labels: str) -> float | None:
    """Sum of the samples called `name` whose labels include `labels`; None when there is no such sample."""
    from prometheus_client.parser import text_string_to_metric_families

    total, seen = 0.0, False
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
                seen = True
    return total if seen else None


def percentile_ms(seconds: list[float] | np.ndarray, q: float) -> float:
    values = np.asarray(seconds, float)
    return float(np.percentile(values, q) * 1000) if len(values) else float("nan")


def fmt_ms(value: float) -> str:
    return "n/a" if value != value else (f"{value:.1f} ms" if value >= 10 else f"{value:.2f} ms")


def mb(nbytes: float) -> str:
    return f"{nbytes / 1e6:,.0f} MB"


def digits(count: int, start: int = 0) -> tuple[np.ndarray, np.ndarray]:
    from loadtest.attack.craft import mnist_test

    images, labels = mnist_test()
    return images[start : start + count], labels[start : start + count]


def warm(client: Client) -> None:
    images, _ = digits(1)
    client.classify(raw_request(images[0].tobytes()), timeout=30)


def probe(target: str, seconds: float, threads: int = 2, classify_every: int = 1) -> dict:
    """`threads` clients alternating raw Classify and health Check for `seconds`; latencies of each."""
    from grpc_health.v1 import health_pb2

    images, _ = digits(64)
    payloads = [raw_request(image.tobytes()).SerializeToString() for image in images]
    check_payload = health_pb2.HealthCheckRequest(service="").SerializeToString()
    result: dict[str, list] = {"classify": [], "health": []}
    errors: Counter = Counter()
    lock = threading.Lock()

    def run(offset: int) -> None:
        import grpc

        with grpc.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)]) as channel:
            classify, health = channel.unary_unary(CLASSIFY), channel.unary_unary(HEALTH_CHECK)
            with contextlib.suppress(grpc.RpcError):
                health(check_payload, timeout=5)
            end, i = time.monotonic() + seconds, offset
            while time.monotonic() < end:
                for kind, method, payload in (
                    ("classify", classify, payloads[i % 64]),
                    ("health", health, check_payload),
                ):
                    t0 = time.perf_counter()
                    try:
                        method(payload, timeout=2)
                        with lock:
                            result[kind].append(time.perf_counter() - t0)
                    except grpc.RpcError as err:
                        with lock:
                            errors[f"{kind} {err.code().name}"] += 1
                i += 1

    pool = [threading.Thread(target=run, args=(k,), daemon=True) for k in range(threads)]
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join(seconds + 30)
    return {
        "classify_p99_ms": percentile_ms(result["classify"], 99),
        "health_p99_ms": percentile_ms(result["health"], 99),
        "classify_p50_ms": percentile_ms(result["classify"], 50),
        "calls": len(result["classify"]) + len(result["health"]),
        "errors": dict(errors),
    }


def error_rate(probed: dict) -> float:
    failed = sum(probed["errors"].values())
    return failed / max(1, failed + probed["calls"])
