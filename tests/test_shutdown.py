"""mnist-serve as a process: configuration printed at start, graceful shutdown on SIGTERM and SIGINT."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from proto.mnist.v1 import classifier_pb2 as pb
from proto.mnist.v1 import classifier_pb2_grpc as pb_grpc
from tests.support import free_port, start_server
from training.data import load_split


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_shutdown_finishes_in_flight_requests_then_exits_zero(mnist_dir: Path, sig: signal.Signals) -> None:
    # one image per session run, so a 256-image batch stays in flight long enough to be interrupted
    metrics_port = free_port()
    process, port = start_server(
        "--max-batch-size", "1", "--drain-seconds", "0", "--grace-seconds", "30", "--max-request-images", "256",
        "--metrics-port", str(metrics_port),
    )  # fmt: skip
    images = load_split("test", mnist_dir)
    batch = pb.ClassifyBatchRequest(requests=[pb.ClassifyRequest(raw=images.images[i].tobytes()) for i in range(256)])
    outcome: dict = {}
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = pb_grpc.ClassifierStub(channel)

        def call() -> None:
            try:
                outcome["reply"] = stub.ClassifyBatch(batch, timeout=60)
            except grpc.RpcError as err:
                outcome["error"] = err

        runs_before = scrape(metrics_port)["mnist_batch_size_count"]
        caller = threading.Thread(target=call)
        caller.start()
        deadline = time.monotonic() + 30
        while True:  # until the batch is being classified: its first images have run, the call is still in flight
            metrics = scrape(metrics_port)
            if metrics["mnist_batch_size_count"] > runs_before and metrics["mnist_requests_in_flight"] >= 1:
                break
            assert time.monotonic() < deadline and caller.is_alive(), "the batch never started"
            time.sleep(0.005)
        assert metrics["mnist_batch_size_count"] - runs_before < 256  # signalled mid-batch: images still to run
        process.send_signal(sig)
        caller.join(60)
    output, _ = process.communicate(timeout=60)
    assert "error" not in outcome, outcome.get("error")
    assert [r.digit for r in outcome["reply"].responses] == list(images.labels[:256])
    assert process.returncode == 0, output
    assert f"received {sig.name}" in output and "stopped" in output


def scrape(port: int) -> dict[str, float]:
    """/metrics: each unlabelled sample's value."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    return {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples if not s.labels}


def test_configuration_is_printed_at_start_and_env_vars_apply(tmp_path: Path) -> None:
    process, port = start_server(
        "--max-batch-size", "8", env={"MNIST_SERVE_MAX_QUEUE_DELAY_MS": "0.5", "MNIST_SERVE_MAX_BATCH_SIZE": "4"}
    )
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=30)
    assert process.returncode == 0
    for line in (
        rf"port +{port}\n",
        r"max_batch_size +8\n",  # the flag beats MNIST_SERVE_MAX_BATCH_SIZE
        r"max_queue_delay_ms +0\.5\n",  # MNIST_SERVE_MAX_QUEUE_DELAY_MS applies where no flag says otherwise
        r"provider +cpu\n",
        "inference provider: CPUExecutionProvider",
    ):
        assert re.search(line, output), line


def test_an_invalid_configuration_exits_with_a_message() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "server.app", "--max-batch-size", "-1", "--model", "/nope.onnx"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert result.returncode != 0
    assert "max_batch_size must not be negative" in result.stderr and "/nope.onnx does not exist" in result.stderr


def test_a_file_that_is_no_model_stops_the_server_with_a_message(tmp_path: Path) -> None:
    bogus = tmp_path / "model.onnx"
    bogus.write_bytes(b"not an onnx model")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "server.app",
            "--model",
            str(bogus),
            "--port",
            str(free_port()),
            "--metrics-port",
            "0",
            "--drain-seconds",
            "0",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert result.returncode == 2
    assert "cannot start:" in result.stderr and "stopped" in result.stderr
