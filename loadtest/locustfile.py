"""Locust scenario for mnist-serve: a weighted mix of Classify (raw), Classify (encoded) and ClassifyBatch.

Payloads are MNIST test digits; every answer is checked against its label, so accuracy under load
is measured too. Besides Locust's own statistics (whose response times are rounded to whole
milliseconds), each call's exact latency is kept and written, with the accuracy, to
$MNIST_LOADTEST_RESULTS when the run stops: that file is what `mnist-loadtest` judges.

Run through `mnist-loadtest`, or directly: `locust -f loadtest/locustfile.py --host HOST:PORT`.
"""

from __future__ import annotations

import io
import json
import os
import time
from collections import defaultdict

import grpc.experimental.gevent as grpc_gevent

grpc_gevent.init_gevent()  # before any gRPC object exists: lets gRPC yield to gevent's loop

import grpc  # noqa: E402
import numpy as np  # noqa: E402
from locust import User, constant, events, task  # noqa: E402
from PIL import Image  # noqa: E402

from proto.mnist.v1 import classifier_pb2 as pb  # noqa: E402
from proto.mnist.v1 import classifier_pb2_grpc as pb_grpc  # noqa: E402
from server.balancing import channel_options, channel_target  # noqa: E402

BATCH_IMAGES = int(os.environ.get("MNIST_LOADTEST_BATCH_IMAGES", "16"))
TIMEOUT_S = float(os.environ.get("MNIST_LOADTEST_TIMEOUT_S", "5"))


class Payloads:
    """MNIST test digits as raw bytes and as encoded PNGs (dark ink on light, 4x upscaled), with labels."""

    def __init__(self, count: int = 2000) -> None:
        from training.data import load_split

        test = load_split("test")
        self.labels = [int(y) for y in test.labels[:count]]
        self.raw = [image.tobytes() for image in test.images[:count]]
        self.encoded = []
        for image in test.images[: min(count, 500)]:
            buffer = io.BytesIO()
            Image.fromarray(255 - image).resize((112, 112), Image.Resampling.BILINEAR).save(buffer, "PNG")
            self.encoded.append(buffer.getvalue())


class Tally:
    """Exact latencies per request name, error codes, and answers checked against labels."""

    def __init__(self) -> None:
        self.latencies_ms: dict[str, list[float]] = defaultdict(list)
        self.errors: dict[str, int] = defaultdict(int)
        self.correct = 0
        self.checked = 0

    def to_json(self) -> dict:
        return {
            "latencies_ms": self.latencies_ms,
            "errors": self.errors,
            "correct": self.correct,
            "checked": self.checked,
        }


PAYLOADS: Payloads | None = None
TALLY = Tally()


@events.test_start.add_listener
def _load_payloads(environment, **_kwargs) -> None:
    global PAYLOADS
    PAYLOADS = PAYLOADS or Payloads()


@events.test_stop.add_listener
def _write_results(environment, **_kwargs) -> None:
    path = os.environ.get("MNIST_LOADTEST_RESULTS")
    if path:
        with open(path, "w") as f:
            json.dump(TALLY.to_json(), f)


class ClassifierUser(User):
    """One client connection sending the request mix back to back."""

    wait_time = constant(0)  # closed loop: each user has one call in flight at a time

    def on_start(self) -> None:
        if self.host is None:
            raise ValueError("give the server as --host HOST:PORT")
        servers = self.host.removeprefix("grpc://").removeprefix("http://")
        self.channel = grpc.insecure_channel(channel_target(servers), options=channel_options(servers))
        self.stub = pb_grpc.ClassifierStub(self.channel)
        self.rng = np.random.default_rng()

    def on_stop(self) -> None:
        self.channel.close()

    def _call(self, name: str, method, request, labels: list[int]) -> None:
        started = time.perf_counter()
        exception, length = None, 0
        try:
            reply = method(request, timeout=TIMEOUT_S)
            length = reply.ByteSize()
            digits = [r.digit for r in reply.responses] if hasattr(reply, "responses") else [reply.digit]
            TALLY.correct += sum(int(d == y) for d, y in zip(digits, labels, strict=True))
            TALLY.checked += len(labels)
        except grpc.RpcError as err:
            exception = RuntimeError(f"{err.code().name}: {err.details()}")
            TALLY.errors[err.code().name] += 1
        except Exception as exc:  # a malformed answer (e.g. a short batch) is an error, not a silent pass
            exception = exc
            TALLY.errors[f"BAD_ANSWER ({type(exc).__name__})"] += 1
        elapsed_ms = (time.perf_counter() - started) * 1000
        TALLY.latencies_ms[name].append(elapsed_ms)
        events.request.fire(
            request_type="grpc",
            name=name,
            response_time=elapsed_ms,
            response_length=length,
            exception=exception,
            context={},
        )

    @task(6)
    def classify_raw(self) -> None:
        i = int(self.rng.integers(len(PAYLOADS.raw)))
        self._call("Classify raw", self.stub.Classify, pb.ClassifyRequest(raw=PAYLOADS.raw[i]), [PAYLOADS.labels[i]])

    @task(3)
    def classify_encoded(self) -> None:
        i = int(self.rng.integers(len(PAYLOADS.encoded)))
        self._call(
            "Classify encoded",
            self.stub.Classify,
            pb.ClassifyRequest(encoded=PAYLOADS.encoded[i]),
            [PAYLOADS.labels[i]],
        )

    @task(1)
    def classify_batch(self) -> None:
        picks = self.rng.integers(len(PAYLOADS.raw), size=BATCH_IMAGES)
        request = pb.ClassifyBatchRequest(requests=[pb.ClassifyRequest(raw=PAYLOADS.raw[i]) for i in picks])
        self._call("ClassifyBatch", self.stub.ClassifyBatch, request, [int(PAYLOADS.labels[i]) for i in picks])
