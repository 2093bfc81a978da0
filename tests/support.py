"""What the tests share: a server in this process (`Harness`, `test_config`), one as a subprocess (`start_server`),
free ports, traces exported to memory (`Traces`), and ONNX Runtime sessions that record their runs (`RecordingSession`,
`recording_factory`). A plain module, not a test file: pytest collects nothing here.

Imports only what a server without aiohttp, scipy or OpenTelemetry has (tests/test_server.py imports this module
in such a process); OpenTelemetry is imported where `Traces` needs it.
"""

from __future__ import annotations

import subprocess
import urllib.request
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

import grpc
import numpy as np
import onnxruntime as ort
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from loadtest.servers import ServerProcess, free_port
from proto.contract import INPUT_NAME
from proto.mnist.v1 import classifier_pb2_grpc as pb_grpc
from server.app import MnistServer
from server.config import ServeConfig

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import ReadableSpan

ROOT = Path(__file__).resolve().parents[1]


# --- a server in this process --------------------------------------------------------------------------


def test_config(**overrides) -> ServeConfig:
    base = ServeConfig(
        host="127.0.0.1",
        port=0,
        metrics_port=free_port(),
        http_port=0,
        provider="cpu",
        drain_seconds=0,
        grace_seconds=5,
        max_request_images=16,
        max_image_pixels=10_000_000,
        feedback_db="none",  # a test that stores labels names its own database
    )
    return replace(base, **overrides)


test_config.__test__ = False  # a helper, not a test (the test modules that import it would collect it)


class Harness:
    """A started server with a channel, stubs and a /metrics reader."""

    def __init__(self, server: MnistServer) -> None:
        self.server = server
        self.channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
        self.stub = pb_grpc.ClassifierStub(self.channel)
        self.health = health_pb2_grpc.HealthStub(self.channel)

    def health_status(self, service: str = "") -> int:
        return self.health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status

    def metrics(self) -> dict[str, float]:
        """Every sample as 'name{label="value",...}' -> value."""
        text = urllib.request.urlopen(f"http://127.0.0.1:{self.server.metrics_port}/metrics", timeout=5).read()
        samples = {}
        for family in text_string_to_metric_families(text.decode()):
            for s in family.samples:
                labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
                samples[f"{s.name}{{{labels}}}"] = s.value
        return samples

    def close(self) -> None:
        self.channel.close()
        self.server.stop()


# --- a server as a process -------------------------------------------------------------------------------


class _PipedServer(ServerProcess):
    def not_serving(self, exited: int | None) -> NoReturn:
        assert self.process is not None
        output = self.process.communicate()[0]
        raise AssertionError(f"server did not become SERVING within {self.wait_s:.0f} s:\n" + output)


def smoke_training(out: Path, mnist_dir: Path, **overrides: object) -> dict:
    """One epoch on 300 MNIST digits into `out` (model.pt, report): a real checkpoint in seconds, to export."""
    from training.train import TrainConfig, train

    config = TrainConfig(
        epochs=1,
        batch_size=32,
        lr=0.05,
        train_limit=300,
        eval_limit=100,
        device="cpu",
        out_dir=str(out),
        data_dir=str(mnist_dir),
    )
    return train(replace(config, **overrides))


def start_server(*flags: str, env: dict[str, str] | None = None) -> tuple[subprocess.Popen, int]:
    """`mnist-serve --provider cpu FLAGS` on a free port with its own defaults otherwise, SERVING; its output (stdout
    and stderr) on a pipe. The caller signals and stops it."""
    server = _PipedServer(
        ["--provider", "cpu", *flags], wait_s=30, defaults=(), log=subprocess.PIPE, env=env, cwd=ROOT
    ).start()
    assert server.process is not None
    return server.process, server.port


# --- traces ------------------------------------------------------------------------------------------------

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE_ID}-{PARENT_ID}-01"


class Traces:
    """Tracing installed for one test, exporting to memory."""

    def __init__(self, sample_ratio: float = 1.0) -> None:
        from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

        from server.tracing import Tracing

        self.exporter = InMemorySpanExporter()
        self.tracing = Tracing(self.exporter, sample_ratio).install()

    def spans(self) -> list[ReadableSpan]:
        self.tracing.force_flush()
        return list(self.exporter.get_finished_spans())

    def call_spans(self) -> list[ReadableSpan]:
        from opentelemetry.trace import SpanKind

        return [span for span in self.spans() if span.kind == SpanKind.SERVER]

    def children(self, call: ReadableSpan) -> dict[str, ReadableSpan]:
        return {s.name: s for s in self.spans() if s.parent is not None and s.parent.span_id == call.context.span_id}


# --- ONNX Runtime sessions that record their runs ---------------------------------------------------------


class RecordingBinding:
    """An IOBinding that remembers the OrtValue bound as the input, so each run's input shape can be read."""

    def __init__(self, binding: ort.IOBinding) -> None:
        self.binding = binding
        self.bound_input: ort.OrtValue | None = None
        self.bound_outputs: dict[str, ort.OrtValue] = {}

    def bind_ortvalue_input(self, name: str, ortvalue: ort.OrtValue) -> None:
        self.bound_input = ortvalue
        self.binding.bind_ortvalue_input(name, ortvalue)

    def bind_ortvalue_output(self, name: str, ortvalue: ort.OrtValue) -> None:
        self.bound_outputs[name] = ortvalue
        self.binding.bind_ortvalue_output(name, ortvalue)

    def __getattr__(self, name: str):
        return getattr(self.binding, name)


class RecordingSession:
    """A real InferenceSession that records the input shape of every run, plain or IO-bound.

    `corrupt`, when set, is called with the bound outputs after each IO-bound run (to simulate a broken bucket).
    """

    def __init__(self, session: ort.InferenceSession) -> None:
        self.session = session
        self.bucket = session.get_inputs()[0].shape[0]  # an int when the batch axis is fixed, else its name
        self.shapes: list[tuple[int, ...]] = []
        self.corrupt = None

    def run(self, output_names, input_feed, run_options=None):
        self.shapes.append(tuple(np.shape(input_feed[INPUT_NAME])))
        return self.session.run(output_names, input_feed, run_options)

    def io_binding(self) -> RecordingBinding:
        return RecordingBinding(self.session.io_binding())

    def run_with_iobinding(self, binding: RecordingBinding, run_options=None) -> None:
        assert binding.bound_input is not None, "input not bound through bind_ortvalue_input: shape unknown"
        self.shapes.append(tuple(binding.bound_input.shape()))  # the shape of what is bound now, at this run
        self.session.run_with_iobinding(binding.binding, run_options)
        if self.corrupt is not None:
            self.corrupt(binding.bound_outputs)

    def __getattr__(self, name: str):
        return getattr(self.session, name)


def recording_factory(sessions: list[RecordingSession]):
    def factory(path: str, sess_options: ort.SessionOptions, providers: list) -> RecordingSession:
        session = RecordingSession(ort.InferenceSession(path, sess_options, providers=providers))
        sessions.append(session)
        return session

    return factory
