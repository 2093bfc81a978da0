"""The limit of Python gRPC on this machine: a minimal asyncio server of mnist.v1 that answers at once.

No parsing beyond protobuf's own, no queue, no model, no metrics: `Classify` returns a fixed
response and `ClassifyBatch` that response once per request. `mnist-bench --compare-echo` drives
it and the real server (on the `null` backend) with the same clients in the same run; the ratio
between the two is the serving code's own efficiency.

    python -m loadtest.echo_server --port 50099
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from proto.mnist.v1 import classifier_pb2 as pb
from proto.mnist.v1 import classifier_pb2_grpc as pb_grpc

FIXED = pb.ClassifyResponse(
    digit=0, confidence=0.91, probabilities=[0.91] + [0.01] * 9, model_version="echo", request_id="echo"
)


class EchoClassifier(pb_grpc.ClassifierServicer):
    async def Classify(self, request, context):
        return FIXED

    async def ClassifyBatch(self, request, context):
        return pb.ClassifyBatchResponse(responses=[FIXED] * len(request.requests))

    async def GetModelInfo(self, request, context):
        return pb.ModelInfo(name="echo", version="0", backend="echo")


async def serve(host: str, port: int, max_message_bytes: int) -> None:
    options = [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
    ]
    server = grpc.aio.server(options=options)
    pb_grpc.add_ClassifierServicer_to_server(EchoClassifier(), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    bound = server.add_insecure_port(f"{host}:{port}")
    await server.start()
    print(f"echo server on port {bound}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest.echo_server", description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, default=50099, help="gRPC port")
    parser.add_argument("--max-message-bytes", type=int, default=16 * 1024 * 1024, help="largest message")
    args = parser.parse_args(argv)
    asyncio.run(serve(args.host, args.port, args.max_message_bytes))
    return 0


if __name__ == "__main__":
    sys.exit(main())
