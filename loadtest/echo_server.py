"""The limit of Python gRPC on this machine: a minimal asyncio server of mnist.v1 that answers at once.

No parsing beyond protobuf's own, no queue, no model, no metrics: `Classify` returns a fixed
response and `ClassifyBatch` that response once per request. `mnist-bench --compare-echo` drives
it and the real server (on the `null` backend) with the same clients in the same run; the ratio
between the two is the serving code's own efficiency.

With `--refuse-all` it answers nothing: every call is refused RESOURCE_EXHAUSTED by grpc.aio's own concurrency
limit (`maximum_concurrent_rpcs=1`, held by one call the server makes to itself) before any handler runs. That is
the cheapest refusal grpc.aio has: the floor for what a refused call can cost (loadtest/cpu_cost.py).

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
    def __init__(self) -> None:
        self.hold = asyncio.Event()  # --refuse-all: GetModelInfo waits on it, holding the only call slot

    async def Classify(self, request, context):
        return FIXED

    async def ClassifyBatch(self, request, context):
        return pb.ClassifyBatchResponse(responses=[FIXED] * len(request.requests))

    async def GetModelInfo(self, request, context):
        if request.model_name == HOLD:
            await self.hold.wait()
        return pb.ModelInfo(name="echo", version="0", backend="echo")


HOLD = "hold"  # --refuse-all: the model name of the call that holds the only slot


async def serve(host: str, port: int, max_message_bytes: int, refuse_all: bool = False) -> None:
    options = [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
    ]
    server = grpc.aio.server(options=options, maximum_concurrent_rpcs=1 if refuse_all else None)
    echo = EchoClassifier()
    pb_grpc.add_ClassifierServicer_to_server(echo, server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    bound = server.add_insecure_port(f"{host}:{port}")
    await server.start()
    held = None
    if refuse_all:  # take the only slot with a call that waits until the server stops
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{bound}")
        held = asyncio.ensure_future(
            pb_grpc.ClassifierStub(channel).GetModelInfo(pb.GetModelInfoRequest(model_name=HOLD))
        )
        await asyncio.sleep(0.2)
    print(f"echo server on port {bound}" + (" (refusing every call)" if refuse_all else ""), flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    echo.hold.set()
    if held is not None:
        await asyncio.gather(held, return_exceptions=True)
    await server.stop(0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest.echo_server", description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, default=50099, help="gRPC port")
    parser.add_argument("--max-message-bytes", type=int, default=16 * 1024 * 1024, help="largest message")
    parser.add_argument(
        "--refuse-all",
        action="store_true",
        help="refuse every call with grpc.aio's own concurrency limit, before any handler (the floor of a refusal's "
        "cost); health checks are refused too",
    )
    args = parser.parse_args(argv)
    asyncio.run(serve(args.host, args.port, args.max_message_bytes, args.refuse_all))
    return 0


if __name__ == "__main__":
    sys.exit(main())
