"""The gRPC transport for mnist.v1.Classifier: thin asyncio handlers over the model pipeline.

A handler turns the request into payloads, awaits the pipeline and writes the response. Every
failure becomes a status through one table (`STATUS_OF`); nothing a client sends can crash the
server or surface as UNKNOWN. The handler table is built from the service descriptor, so a method
the proto declares and this servicer lacks stops the server at start-up.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
from google.protobuf import message_factory
from google.protobuf.descriptor import ServiceDescriptor

from proto.mnist.v1 import classifier_pb2 as pb
from server.config import ServeConfig
from server.errors import (
    Cancelled,
    DeadlineExpired,
    InvalidInput,
    NotReady,
    Overloaded,
    ServiceError,
    ShuttingDown,
)
from server.metrics import ServiceMetrics
from server.pipeline import ModelPipeline, Predictions
from server.wire import (
    ParsedRequest,
    encode_classify_batch_response,
    encode_classify_response,
    fill_request_ids,
    new_request_ids,
    parse_classify_batch_request,
    parse_classify_request,
    safe_parser,
)

log = logging.getLogger("mnist.service")

SERVICE = pb.DESCRIPTOR.services_by_name["Classifier"]
STATUS_OF: dict[type[ServiceError], grpc.StatusCode] = {
    InvalidInput: grpc.StatusCode.INVALID_ARGUMENT,
    Overloaded: grpc.StatusCode.RESOURCE_EXHAUSTED,
    NotReady: grpc.StatusCode.UNAVAILABLE,
    ShuttingDown: grpc.StatusCode.UNAVAILABLE,
    DeadlineExpired: grpc.StatusCode.DEADLINE_EXCEEDED,
    Cancelled: grpc.StatusCode.CANCELLED,
}
# Requests parsed by our own deserializers (server/wire.py); any other method gets `safe_parser`.
PARSERS: dict[str, Callable[[bytes], ParsedRequest]] = {
    "Classify": parse_classify_request,
    "ClassifyBatch": parse_classify_batch_request,
}
# grpcio reports "no deadline" as a huge time_remaining().
NO_DEADLINE_SECONDS = 24 * 3600


def status_of(error: ServiceError) -> grpc.StatusCode:
    for cls in type(error).__mro__:
        if cls in STATUS_OF:
            return STATUS_OF[cls]
    return grpc.StatusCode.INTERNAL


def request_deadline(context: grpc.aio.ServicerContext) -> float | None:
    """time.monotonic() by which the client needs the answer, or None when it set no deadline."""
    remaining = context.time_remaining()
    if remaining is None or remaining > NO_DEADLINE_SECONDS:
        return None
    return time.monotonic() + remaining


class ClassifierServicer:
    """Attached to a pipeline once the model is warm; until then every call is answered UNAVAILABLE."""

    def __init__(self, config: ServeConfig) -> None:
        self.config = config
        self.pipeline: ModelPipeline | None = None

    def _ready(self) -> ModelPipeline:
        if self.pipeline is None:
            raise NotReady("model is still loading; retry shortly")
        return self.pipeline

    async def Classify(self, request: pb.ClassifyRequest, context: grpc.aio.ServicerContext) -> bytes:
        pipeline = self._ready()
        kind = request.WhichOneof("image")
        payload = getattr(request, kind) if kind else b""
        predictions = await pipeline.classify([payload], [kind], request_deadline(context))
        return encode_classify_response(
            predictions.probabilities[0],
            predictions.digits[0],
            predictions.confidences[0],
            predictions.model_version,
            request.request_id or new_request_ids(1)[0],
        )

    async def ClassifyBatch(self, request: pb.ClassifyBatchRequest, context: grpc.aio.ServicerContext) -> bytes:
        pipeline = self._ready()
        items = request.requests
        if not items:
            raise InvalidInput("batch is empty: send at least one request")
        if len(items) > self.config.max_request_images:
            raise InvalidInput(f"batch has {len(items)} requests, over the maximum of {self.config.max_request_images}")
        raws = [item.raw for item in items]
        # An item with `encoded` (or nothing) set has an empty `raw`: then look at what each item holds.
        kinds = None if min(map(len, raws)) > 0 else [item.WhichOneof("image") for item in items]
        payloads = raws if kinds is None else [getattr(i, k) if k else b"" for i, k in zip(items, kinds, strict=True)]
        try:
            predictions = await pipeline.classify(payloads, kinds, request_deadline(context))
        except InvalidInput as err:
            raise InvalidInput(f"requests[{err.index}]: {err}", err.index) from None
        return self._batch_response(predictions, [item.request_id for item in items])

    @staticmethod
    def _batch_response(predictions: Predictions, request_ids: list[str]) -> bytes:
        return encode_classify_batch_response(
            predictions.probabilities,
            predictions.digits,
            predictions.confidences,
            predictions.model_version,
            fill_request_ids(request_ids),
        )

    async def GetModelInfo(self, request: pb.GetModelInfoRequest, context: grpc.aio.ServicerContext) -> pb.ModelInfo:
        info = self._ready().info
        return pb.ModelInfo(
            name=info.model_name,
            version=info.model_version,
            sha256=info.model_sha256,
            providers=list(info.providers),
            max_batch_size=info.max_batch_size,
            test_accuracy=info.test_accuracy,
            backend=info.engine,
            precision=info.precision,
            layout=info.layout,
            batch_buckets=list(info.batch_buckets),
            cuda_graph=info.cuda_graph,
            device=info.device,
            runtime=info.runtime,
            engine_options=[f"{key}={value}" for key, value in sorted(info.options.items())],
        )


Handler = Callable[[Any, grpc.aio.ServicerContext], Awaitable[Any]]


def instrumented(method: str, handler: Handler, metrics: ServiceMetrics) -> Handler:
    """Count and time one method's calls, and turn every failure into a status with a message."""
    latency = {code: metrics.request_latency.labels(method, code.name) for code in grpc.StatusCode}
    calls = {code: metrics.requests.labels(method, code.name) for code in grpc.StatusCode}

    async def handle(parsed: ParsedRequest, context: grpc.aio.ServicerContext) -> Any:
        started = time.perf_counter()
        metrics.in_flight.inc()
        code, message = grpc.StatusCode.OK, ""
        try:
            if parsed.problem:
                raise InvalidInput(parsed.problem)
            return await handler(parsed.message, context)
        except ServiceError as err:
            code, message = status_of(err), str(err)
        except asyncio.CancelledError:  # the client went away or its deadline passed: nobody hears an answer
            code = grpc.StatusCode.CANCELLED
            raise
        except Exception:  # a bug, not the client's fault: log it, answer INTERNAL, keep serving
            log.exception("%s failed", method)
            code, message = grpc.StatusCode.INTERNAL, f"internal error in {method}; see the server log"
        finally:
            metrics.in_flight.dec()
            calls[code].inc()
            latency[code].observe(time.perf_counter() - started)
        await context.abort(code, message)

    return handle


def _serialize(response: Any) -> bytes:
    return response if isinstance(response, bytes) else response.SerializeToString()


def generic_handler(servicer: object, service: ServiceDescriptor, metrics: ServiceMetrics) -> grpc.GenericRpcHandler:
    """Handlers for every method `service` declares; a method the servicer lacks is an error now, not later."""
    handlers = {}
    for method in service.methods:
        implementation = getattr(servicer, method.name, None)
        if not callable(implementation):
            raise TypeError(f"{type(servicer).__name__} does not implement {method.full_name}")
        if method.client_streaming or method.server_streaming:
            raise TypeError(f"{method.full_name} streams; only unary methods are supported here")
        parse = PARSERS.get(method.name) or safe_parser(message_factory.GetMessageClass(method.input_type))
        handlers[method.name] = grpc.unary_unary_rpc_method_handler(
            instrumented(method.name, implementation, metrics), parse, _serialize
        )
    return grpc.method_handlers_generic_handler(service.full_name, handlers)


def add_to_server(servicer: ClassifierServicer, server: grpc.aio.Server, metrics: ServiceMetrics) -> None:
    server.add_generic_rpc_handlers((generic_handler(servicer, SERVICE, metrics),))
