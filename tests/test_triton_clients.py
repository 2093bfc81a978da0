"""NVIDIA's official tritonclient (gRPC and HTTP) against a live server: what Triton users arrive with works.

tritonclient pins protobuf < 7 and the server needs >= 7.35.1, so the clients run in their own virtual
environment, .venv-triton, which the README's test command creates (tests/triton_clients.py runs there).
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from proto.mnist.v1 import classifier_pb2 as pb
from server.app import MnistServer
from tests.support import Harness, free_port, test_config
from training.data import load_split

ROOT = Path(__file__).resolve().parents[1]
TRITON_PYTHON = ROOT / ".venv-triton" / "bin" / "python"
MODEL = "googlenet-fast"


@pytest.fixture(scope="module")
def report(mnist_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[dict, list, list]]:
    if not TRITON_PYTHON.exists():
        pytest.fail(f"{TRITON_PYTHON} is missing: run the README's test command, which installs tritonclient there")
    test = load_split("test", mnist_dir)
    images, labels = test.images[:8], test.labels[:8]
    folder = tmp_path_factory.mktemp("triton")
    np.save(folder / "images.npy", images)
    png = ROOT / "server" / "samples" / "seven.png"
    harness = Harness(MnistServer(test_config(http_port=free_port())).start())
    try:
        batch = pb.ClassifyBatchRequest(requests=[pb.ClassifyRequest(raw=image.tobytes()) for image in images])
        v1 = [r.digit for r in harness.stub.ClassifyBatch(batch, timeout=10).responses]
        result = subprocess.run(
            [
                str(TRITON_PYTHON),
                str(ROOT / "tests" / "triton_clients.py"),
                f"127.0.0.1:{harness.server.port}",
                f"127.0.0.1:{harness.server.http_port}",
                MODEL,
                str(folder / "images.npy"),
                str(png),
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert result.returncode == 0, result.stderr[-3000:]
        yield json.loads(result.stdout), v1, labels.tolist()
    finally:
        harness.close()


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_health_metadata_and_config_read_as_triton_users_expect(report, protocol: str) -> None:
    got = report[0][protocol]
    assert got["live"] and got["ready"] and got["model_ready"] and not got["other_model_ready"]
    assert got["inputs"] == [["image", "FP32", [-1, 1, 28, 28]]]
    assert got["max_batch_size"] >= 1 and got["server"] == "mnist-googlenet-service"


@pytest.mark.parametrize("protocol", ["grpc", "http"])
@pytest.mark.parametrize("form", ["uint8", "fp32"])
def test_inference_gives_mnist_v1s_answers(report, protocol: str, form: str) -> None:
    got, v1, labels = report
    answer = got[protocol][form]
    assert answer["digits"] == v1
    assert np.allclose(np.sum(answer["probabilities"], axis=1), 1, atol=1e-3)
    assert np.mean(np.equal(answer["digits"], labels)) >= 0.85


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_an_encoded_image_travels_as_bytes(report, protocol: str) -> None:
    assert report[0][protocol]["bytes"]["digits"] == [7]


def test_http_json_tensors_work_as_well_as_binary_ones(report) -> None:
    got, v1, _ = report
    assert got["http"]["uint8_json"]["digits"] == v1[:2]


@pytest.mark.parametrize(("protocol", "status"), [("grpc", "StatusCode.NOT_FOUND"), ("http", "404")])
def test_an_unknown_model_is_an_error_that_names_the_served_one(report, protocol: str, status: str) -> None:
    error = report[0][protocol]["unknown_model_error"]
    assert error["status"] == status and "googlenet-fast" in error["message"]


def test_statistics_and_streaming(report) -> None:
    got, v1, _ = report
    assert got["grpc"]["inference_count"] >= 8 + 8 + 1  # uint8, fp32 and one encoded image so far
    assert got["stream"] == v1[:3]
