"""Run by tests/test_triton_clients.py in its own virtual environment (.venv-triton: tritonclient pins protobuf < 7).

Drives a live server with NVIDIA's official `tritonclient` over gRPC and HTTP, as a Triton user would,
and prints what it got as one JSON object. Only tritonclient and numpy are imported here.

    python tests/triton_clients.py GRPC_URL HTTP_URL MODEL IMAGES.npy PNG_FILE
"""

from __future__ import annotations

import json
import sys
import threading

import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException


def normalized(images: np.ndarray) -> np.ndarray:
    return ((images.astype(np.float32) / 255 - 0.1307) / 0.3081).reshape(len(images), 1, 28, 28)


def run(module, client, model: str, images: np.ndarray, png: bytes, http: bool) -> dict:
    out: dict = {
        "live": client.is_server_live(),
        "ready": client.is_server_ready(),
        "model_ready": client.is_model_ready(model),
        "other_model_ready": client.is_model_ready("resnet50"),
    }
    meta = client.get_model_metadata(model) if http else client.get_model_metadata(model, as_json=True)
    out["inputs"] = [(t["name"], t["datatype"], [int(d) for d in t["shape"]]) for t in meta["inputs"]]
    config = client.get_model_config(model) if http else client.get_model_config(model, as_json=True)["config"]
    out["max_batch_size"] = int(config["max_batch_size"])
    server = client.get_server_metadata() if http else client.get_server_metadata(as_json=True)
    out["server"] = server["name"]

    def infer(array: np.ndarray, datatype: str, binary: bool = True) -> dict:
        tensor = module.InferInput("image", list(array.shape), datatype)
        tensor.set_data_from_numpy(array, binary_data=binary) if http else tensor.set_data_from_numpy(array)
        wanted = [
            module.InferRequestedOutput(name, binary_data=binary) if http else module.InferRequestedOutput(name)
            for name in ("probabilities", "digit")
        ]
        result = client.infer(model, [tensor], outputs=wanted, request_id="triton-1")
        return {"digits": result.as_numpy("digit").tolist(), "probabilities": result.as_numpy("probabilities").tolist()}

    out["uint8"] = infer(images, "UINT8")
    out["fp32"] = infer(normalized(images), "FP32")
    out["bytes"] = infer(np.array([png], dtype=np.object_), "BYTES")
    if http:
        out["uint8_json"] = infer(images[:2], "UINT8", binary=False)
    try:
        client.infer("resnet50", [module.InferInput("image", [1, 28, 28], "UINT8")])
    except InferenceServerException as err:
        out["unknown_model_error"] = {"status": str(err.status()), "message": err.message()}
    stats = client.get_inference_statistics(model) if http else client.get_inference_statistics(model, as_json=True)
    out["inference_count"] = int(stats["model_stats"][0]["inference_count"])
    return out


def stream(url: str, model: str, images: np.ndarray) -> list[int]:
    """ModelStreamInfer, as perf_analyzer --streaming and decoupled clients use it."""
    got: list[int] = []
    done = threading.Event()

    def on_result(result, error) -> None:
        got.append(-1 if error is not None else int(result.as_numpy("digit")[0]))
        if len(got) == len(images):
            done.set()

    client = grpcclient.InferenceServerClient(url)
    client.start_stream(callback=on_result)
    for image in images:
        tensor = grpcclient.InferInput("image", [1, 28, 28], "UINT8")
        tensor.set_data_from_numpy(image[None])
        client.async_stream_infer(model, [tensor])
    done.wait(20)
    client.stop_stream()
    client.close()
    return got


def main() -> int:
    grpc_url, http_url, model, images_path, png_path = sys.argv[1:6]
    images = np.load(images_path)
    png = open(png_path, "rb").read()
    report = {
        "grpc": run(grpcclient, grpcclient.InferenceServerClient(grpc_url), model, images, png, http=False),
        "http": run(httpclient, httpclient.InferenceServerClient(http_url), model, images, png, http=True),
        "stream": stream(grpc_url, model, images[:3]),
    }
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
