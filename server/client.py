"""A small Python client for mnist.v1.Classifier, and the `mnist-classify` command."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from proto.mnist.v1 import classifier_pb2 as pb
from proto.mnist.v1 import classifier_pb2_grpc as pb_grpc


class ClassifierClient:
    """`with ClassifierClient("localhost:50051") as c: c.classify_file("digit.png").digit`"""

    def __init__(self, target: str, timeout: float = 10.0) -> None:
        self.channel = grpc.insecure_channel(target)
        self.stub = pb_grpc.ClassifierStub(self.channel)
        self.timeout = timeout

    def __enter__(self) -> ClassifierClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.channel.close()

    def classify_encoded(self, data: bytes, request_id: str = "") -> pb.ClassifyResponse:
        return self.stub.Classify(pb.ClassifyRequest(encoded=data, request_id=request_id), timeout=self.timeout)

    def classify_raw(self, pixels: bytes, request_id: str = "") -> pb.ClassifyResponse:
        """`pixels`: 784 bytes, 28x28 uint8 row-major, light digit on dark (MNIST layout)."""
        return self.stub.Classify(pb.ClassifyRequest(raw=pixels, request_id=request_id), timeout=self.timeout)

    def classify_file(self, path: str | Path) -> pb.ClassifyResponse:
        return self.classify_encoded(Path(path).read_bytes(), request_id=str(path))

    def classify_batch(self, requests: list[pb.ClassifyRequest]) -> list[pb.ClassifyResponse]:
        reply = self.stub.ClassifyBatch(pb.ClassifyBatchRequest(requests=requests), timeout=self.timeout)
        return list(reply.responses)

    def model_info(self) -> pb.ModelInfo:
        return self.stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=self.timeout)

    def wait_until_serving(self, seconds: float) -> bool:
        """Poll grpc.health.v1 until the server reports SERVING (True) or `seconds` pass (False)."""
        health = health_pb2_grpc.HealthStub(self.channel)
        deadline = time.monotonic() + seconds
        while True:
            try:
                reply = health.Check(health_pb2.HealthCheckRequest(), timeout=1)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return True
            except grpc.RpcError:
                pass
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.2)


def certainty(confidence: float) -> str:
    """0.985 -> '.985', as the reference system printed it; 1.0 stays '1.000'."""
    text = f"{confidence:.3f}"
    return text[1:] if text.startswith("0") else text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="mnist-classify",
        description="Classify image files of handwritten digits with a running mnist-serve; prints one line per file.",
    )
    parser.add_argument("images", nargs="*", type=Path, help="PNG, JPEG, BMP, GIF or WebP files, any size")
    parser.add_argument("--server", default="localhost:50051", help="host:port of mnist-serve")
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for each answer")
    parser.add_argument("--probabilities", action="store_true", help="also print all ten probabilities")
    parser.add_argument(
        "--wait",
        type=float,
        default=0,
        metavar="SECONDS",
        help="first wait up to this long for the server to report SERVING (e.g. right after start)",
    )
    parser.add_argument(
        "--health",
        action="store_true",
        help="only check grpc.health.v1: exit 0 if the server is SERVING, else 1 (for HEALTHCHECK)",
    )
    args = parser.parse_args(argv)
    if args.health:
        with ClassifierClient(args.server, args.timeout) as client:
            serving = client.wait_until_serving(args.wait)
        print(f"{args.server}: {'SERVING' if serving else 'not serving'}")
        return 0 if serving else 1
    if not args.images:
        parser.error("give at least one image file (or --health)")
    failures = 0
    with ClassifierClient(args.server, args.timeout) as client:
        if args.wait and not client.wait_until_serving(args.wait):
            print(f"mnist-classify: {args.server} did not report SERVING within {args.wait:g} s", file=sys.stderr)
            return 1
        for path in args.images:
            try:
                reply = client.classify_file(path)
            except OSError as exc:
                print(f"{path}: cannot read: {exc.strerror}", file=sys.stderr)
                failures += 1
                continue
            except grpc.RpcError as exc:
                print(f"{path}: {exc.code().name}: {exc.details()}", file=sys.stderr)
                failures += 1
                if exc.code() == grpc.StatusCode.UNAVAILABLE:
                    break
                continue
            line = f"{path}: {reply.digit} with {certainty(reply.confidence)} certainty"
            if args.probabilities:
                line += "  [" + " ".join(f"{p:.3f}" for p in reply.probabilities) + "]"
            print(line)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
