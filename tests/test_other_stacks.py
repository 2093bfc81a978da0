"""Clients on another gRPC stack: Node.js @grpc/grpc-js (the README's test command installs it in .node-clients).

Nothing generated on the Python side is shared: the JavaScript client loads the .proto files at run time, so
this checks the wire format, the status codes and the metadata as any other stack sees them.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from loadtest.reading import compose
from proto.mnist.v1 import classifier_pb2 as pb
from server.app import MnistServer
from tests.support import Harness, test_config
from training.data import load_split

ROOT = Path(__file__).resolve().parents[1]
NODE_MODULES = ROOT / ".node-clients" / "node_modules"


@pytest.fixture(scope="module")
def answers(mnist_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple]:
    node = shutil.which("node")
    if node is None or not (NODE_MODULES / "@grpc" / "grpc-js").is_dir():
        pytest.fail("Node.js and @grpc/grpc-js are missing: run the README's test command, which installs them")
    test = load_split("test", mnist_dir)
    folder = tmp_path_factory.mktemp("js")
    (folder / "digit.raw").write_bytes(test.images[0].tobytes())
    number = compose(np.random.default_rng(7), test.images, test.labels, "four-digits", photo=False)
    (folder / "number.png").write_bytes(number.image)
    harness = Harness(MnistServer(test_config()).start())
    try:
        result = subprocess.run(
            [node, str(ROOT / "tests" / "grpc_js_client.js"), f"127.0.0.1:{harness.server.port}",
             str(folder / "digit.raw"), str(ROOT / "server" / "samples" / "seven.png"), str(folder / "number.png")],
            capture_output=True, text=True, timeout=60, env={**os.environ, "NODE_PATH": str(NODE_MODULES)},
        )  # fmt: skip
        assert result.returncode == 0, result.stderr[-3000:]
        yield json.loads(result.stdout), harness, test.images[0], number
    finally:
        harness.close()


def test_grpc_js_gets_mnist_v1s_answers_byte_for_byte(answers) -> None:
    got, harness, digit, _ = answers
    python = harness.stub.Classify(pb.ClassifyRequest(raw=digit.tobytes()), timeout=10)
    assert got["classify_raw"]["digit"] == python.digit and got["classify_raw"]["request_id"] == "js-1"
    assert np.allclose(got["classify_raw"]["probabilities"], python.probabilities)
    assert got["classify_png"] == 7 and got["batch"] == [python.digit, 7]
    assert got["info"] == "googlenet-fast" and got["models"] == ["googlenet-fast READY"]


def test_grpc_js_reads_a_number_and_sees_the_status_codes(answers) -> None:
    got, _, _, number = answers
    assert got["read"]["text"] == number.text and len(got["read"]["boxes"]) == 4
    assert got["bad"]["code"] == 3 and "784" in got["bad"]["details"]  # INVALID_ARGUMENT, naming the size


def test_grpc_js_speaks_the_open_inference_protocol(answers) -> None:
    got, harness, digit, _ = answers
    assert got["oip"]["outputs"] == ["probabilities FP32 [1,10]", "digit INT64 [1]"]
    assert got["oip"]["digit"] == harness.stub.Classify(pb.ClassifyRequest(raw=digit.tobytes()), timeout=10).digit
    assert got["oip_missing"]["code"] == 5  # NOT_FOUND
