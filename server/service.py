"""The gRPC transport: mnist.v1.Classifier on top of the batch queue and the model runtime.

Maps every failure to a gRPC status with a message that says what is wrong; nothing a client
sends can crash the server or surface as UNKNOWN.
"""

from __future__ import annotations

import functools
import logging
import time
import uuid
from collections.abc import Callable
from concurrent.futures import CancelledError, Future
from concurrent.futures import TimeoutError as FutureTimeout

import grpc
import numpy as np

from proto.mnist.v1 import classifier_pb2 as pb
from proto.mnist.v1 import classifier_pb2_grpc as pb_grpc
from server.batching import BatchQueue, DeadlineExpired, QueueClosed, QueueFull
from server.config import ServeConfig
from server.metrics import ServiceMetrics
from server.preprocess import InvalidImage, from_encoded, from_raw
from server.runtime import OnnxModel, Prediction, to_predictions
from server.wire import ParsedRequest, parse_classify_batch_request, parse_classify_request

log = logging.getLogger("mnist.service")


# grpcio reports "no deadline" as a huge time_remaining(), which would overflow timed waits.
NO_DEADLINE_SECONDS = 24 * 3600


def request_deadline(context: grpc.ServicerContext) -> float | None:
    """time.monotonic() by which the client needs the answer, or None when it set no deadline."""
    remaining = context.time_remaining()
    if remaining is None or remaining > NO_DEADLINE_SECONDS:
        return None
    return time.monotonic() + remaining


class RpcError(Exception):
    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code, self.message = code, message


def instrumented(method: str) -> Callable:
    """Count, time and translate errors of one RPC method."""

    def wrap(handler: Callable) -> Callable:
        @functools.wraps(handler)
        def wrapper(self: ClassifierService, request, context: grpc.ServicerContext):
            started = time.perf_counter()
            self.metrics.in_flight.inc()
            code = grpc.StatusCode.OK
            try:
                if isinstance(request, ParsedRequest):
                    if request.problem:
                        raise RpcError(grpc.StatusCode.INVALID_ARGUMENT, request.problem)
                    request = request.message
                return handler(self, request, context)
            except RpcError as err:
                code = err.code
                context.abort(err.code, err.message)
            except Exception:  # a bug, not the client's fault: log it, answer INTERNAL, keep serving
                code = grpc.StatusCode.INTERNAL
                log.exception("%s failed", method)
                context.abort(code, f"internal error in {method}; see the server log")
            finally:
                self.metrics.in_flight.dec()
                self.metrics.requests.labels(method, code.name).inc()
                self.metrics.request_latency.labels(method, code.name).observe(time.perf_counter() - started)

        return wrapper

    return wrap


class ClassifierService(pb_grpc.ClassifierServicer):
    """Registered before the model is loaded (so health can answer NOT_SERVING meanwhile); `attach` readies it."""

    def __init__(self, config: ServeConfig, metrics: ServiceMetrics) -> None:
        self.config, self.metrics = config, metrics
        self.model: OnnxModel | None = None
        self.queue: BatchQueue | None = None

    def attach(self, model: OnnxModel, queue: BatchQueue) -> None:
        self.model, self.queue = model, queue

    def _ready(self) -> tuple[OnnxModel, BatchQueue]:
        if self.model is None or self.queue is None:
            raise RpcError(grpc.StatusCode.UNAVAILABLE, "model is still loading; retry shortly")
        return self.model, self.queue

    @instrumented("Classify")
    def Classify(self, request: pb.ClassifyRequest, context: grpc.ServicerContext) -> pb.ClassifyResponse:
        self._ready()
        tensor = self._preprocess(request, "")
        (prediction,) = self._infer([tensor], context)
        return self._response(prediction, request.request_id)

    @instrumented("ClassifyBatch")
    def ClassifyBatch(
        self,
        request: pb.ClassifyBatchRequest,
        context: grpc.ServicerContext,
    ) -> pb.ClassifyBatchResponse:
        self._ready()
        count = len(request.requests)
        if count == 0:
            raise RpcError(grpc.StatusCode.INVALID_ARGUMENT, "batch is empty: send at least one request")
        if count > self.config.max_request_images:
            raise RpcError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"batch has {count} requests, over the maximum of {self.config.max_request_images}",
            )
        tensors = [self._preprocess(item, f"requests[{i}]: ") for i, item in enumerate(request.requests)]
        predictions = self._infer(tensors, context)
        return pb.ClassifyBatchResponse(
            responses=[
                self._response(p, item.request_id) for p, item in zip(predictions, request.requests, strict=True)
            ]
        )

    @instrumented("GetModelInfo")
    def GetModelInfo(self, request: pb.GetModelInfoRequest, context: grpc.ServicerContext) -> pb.ModelInfo:
        model, _ = self._ready()
        meta = model.metadata
        return pb.ModelInfo(
            name=meta.model_name,
            version=meta.model_version,
            sha256=model.sha256,
            providers=model.providers,
            max_batch_size=self.config.max_batch_size,
            test_accuracy=meta.test_accuracy,
        )

    def _preprocess(self, request: pb.ClassifyRequest, where: str) -> np.ndarray:
        kind = request.WhichOneof("image")
        try:
            if kind == "raw":
                return from_raw(request.raw, self.model.normalization).tensor
            if kind == "encoded":
                return from_encoded(request.encoded, self.model.normalization, self.config.max_image_pixels).tensor
        except InvalidImage as exc:
            raise RpcError(grpc.StatusCode.INVALID_ARGUMENT, f"{where}{exc}") from None
        raise RpcError(grpc.StatusCode.INVALID_ARGUMENT, f"{where}no image: set either 'encoded' or 'raw'")

    def _infer(self, tensors: list[np.ndarray], context: grpc.ServicerContext) -> list[Prediction]:
        deadline = request_deadline(context)
        try:
            futures = self._ready()[1].submit(tensors, deadline)
        except QueueFull as exc:
            raise RpcError(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc)) from None
        except QueueClosed as exc:
            raise RpcError(grpc.StatusCode.UNAVAILABLE, str(exc)) from None

        def cancel_all() -> None:  # images not yet running are then never run
            for future in futures:
                future.cancel()

        context.add_callback(cancel_all)  # the client went away (cancel, disconnect, deadline)
        try:
            rows = [self._wait(f, deadline) for f in futures]
        except BaseException:
            cancel_all()
            raise
        predictions = to_predictions(np.stack(rows))
        for p in predictions:
            self.metrics.predictions.labels(str(p.digit)).inc()
            self.metrics.confidence.observe(p.confidence)
        return predictions

    @staticmethod
    def _wait(future: Future, deadline: float | None) -> np.ndarray:
        try:
            return future.result(None if deadline is None else max(0.0, deadline - time.monotonic()))
        except (DeadlineExpired, FutureTimeout):
            raise RpcError(
                grpc.StatusCode.DEADLINE_EXCEEDED, "deadline expired before the image was classified"
            ) from None
        except CancelledError:
            raise RpcError(grpc.StatusCode.CANCELLED, "the call was cancelled") from None

    def _response(self, p: Prediction, request_id: str) -> pb.ClassifyResponse:
        return pb.ClassifyResponse(
            digit=p.digit,
            confidence=p.confidence,
            probabilities=p.probabilities.tolist(),
            model_version=self.model.metadata.model_version,
            request_id=request_id or uuid.uuid4().hex,
        )


def add_to_server(service: ClassifierService, server: grpc.Server) -> None:
    """Register like the generated `add_ClassifierServicer_to_server`, with the oneof-checking deserializers."""
    handlers = {
        "Classify": grpc.unary_unary_rpc_method_handler(
            service.Classify, parse_classify_request, pb.ClassifyResponse.SerializeToString
        ),
        "ClassifyBatch": grpc.unary_unary_rpc_method_handler(
            service.ClassifyBatch, parse_classify_batch_request, pb.ClassifyBatchResponse.SerializeToString
        ),
        "GetModelInfo": grpc.unary_unary_rpc_method_handler(
            service.GetModelInfo, pb.GetModelInfoRequest.FromString, pb.ModelInfo.SerializeToString
        ),
    }
    name = pb.DESCRIPTOR.services_by_name["Classifier"].full_name
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(name, handlers),))
