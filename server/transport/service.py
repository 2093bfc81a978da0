"""The gRPC transport for mnist.v1.Classifier: thin asyncio handlers over the data plane (server/plane/data_plane.py).

A handler turns the request into the data plane's arguments, awaits it and writes the response. Parsing,
statuses, counting and the bounds on calls in flight are the guards' (server/transport/guards.py), the same
for every service the server exposes; nothing a client sends can crash the server or surface as
UNKNOWN. The handler table is built from the service descriptor, so a method the proto declares
and this servicer lacks stops the server at start-up.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import grpc

from proto.mnist.v1 import classifier_pb2 as pb
from server.config import ServeConfig
from server.errors import InvalidInput, NotReady, ServiceError
from server.feedback.answers import BATCH_PREFIX_CHARS
from server.ops.metrics import ServiceMetrics
from server.pipeline.digit_scores import summary as digit_score_summary
from server.plane.data_plane import DataPlane
from server.security import TokenChecker
from server.transport.guards import (
    STATUS_OF,
    CallGate,
    StreamGate,
    UnreadRefusal,
    generic_handler,
    request_deadline,
    status_of,
)
from server.transport.replicas import FORWARDED_KEY
from server.transport.wire import (
    ParsedRequest,
    RawBatch,
    encode_classify_batch_response,
    encode_classify_response,
    fill_request_ids,
    new_request_id_array,
    new_request_ids,
    parse_classify_batch_request,
    parse_classify_request,
)

if TYPE_CHECKING:  # server.pipeline.reading needs scipy, which only the Read* calls need
    from server.pipeline.reading import ReadDigit

__all__ = ["SERVICE", "STATUS_OF", "ClassifierServicer", "add_to_server", "generic_handler", "status_of"]

SERVICE = pb.DESCRIPTOR.services_by_name["Classifier"]
# Requests parsed by our own deserializers (server/transport/wire.py); any other method gets `safe_parser`.
PARSERS: dict[str, Callable[[bytes], ParsedRequest]] = {
    "Classify": parse_classify_request,
    "ClassifyBatch": parse_classify_batch_request,
}


# The model's calls: refused before their message is read while the only version served sheds load (UnreadRefusal).
UNREAD_REFUSALS = frozenset({"Classify", "ClassifyBatch", "ReadDigits", "ReadTable", "ReadExpression"})


class ClassifierServicer:
    """mnist.v1 over the data plane, which routes each call to the model version it names (the defaults when it names
    none); until a version is READY every call is answered UNAVAILABLE."""

    def __init__(self, config: ServeConfig, plane: DataPlane | None = None) -> None:
        self.config = config
        self._plane = plane

    @property
    def plane(self) -> DataPlane:
        if self._plane is None:
            raise NotReady("model is still loading; retry shortly")
        return self._plane

    def refusal_before_reading(self, deadline: float | None) -> ServiceError | None:
        """The refusal every model call would get now, before its message is read (None while loading: read it)."""
        return None if self._plane is None else self._plane.refusal_before_reading(deadline)

    async def Classify(self, request: pb.ClassifyRequest, context: grpc.aio.ServicerContext) -> bytes:
        kind = request.WhichOneof("image")
        payload = getattr(request, kind) if kind else b""
        predictions = await self.plane.classify(
            request.model_name, request.model_version, [payload], [kind], request_deadline(context)
        )
        request_id = request.request_id or new_request_ids(1)[0]
        self.plane.remember(predictions, (request_id,))
        return encode_classify_response(predictions, request_id)

    async def ClassifyBatch(
        self, request: pb.ClassifyBatchRequest | RawBatch, context: grpc.aio.ServicerContext
    ) -> bytes:
        if isinstance(request, RawBatch):  # raw images only, read off the wire as one array (server/transport/wire.py)
            return await self._classify_raw_batch(request, context)
        items = request.requests
        if not items:
            raise InvalidInput("batch is empty: send at least one request")
        if len(items) > self.config.max_request_images:
            raise InvalidInput(f"batch has {len(items)} requests, over the maximum of {self.config.max_request_images}")
        for index, item in enumerate(items):
            if (item.model_name or request.model_name, item.model_version or request.model_version) != (
                request.model_name,
                request.model_version,
            ):
                raise InvalidInput(
                    f"requests[{index}] names model {item.model_name!r} version {item.model_version!r}; one model "
                    "answers a batch: set model_name and model_version on the batch, not on its items",
                    index,
                )
        raws = [item.raw for item in items]
        # An item with `encoded` (or nothing) set has an empty `raw`: then look at what each item holds.
        kinds = None if min(map(len, raws)) > 0 else [item.WhichOneof("image") for item in items]
        payloads = raws if kinds is None else [getattr(i, k) if k else b"" for i, k in zip(items, kinds, strict=True)]
        try:
            predictions = await self.plane.classify(
                request.model_name, request.model_version, payloads, kinds, request_deadline(context)
            )
        except InvalidInput as err:
            if err.index is None:
                raise
            raise InvalidInput(f"requests[{err.index}]: {err}", err.index) from None
        request_ids = fill_request_ids([item.request_id for item in items])
        self.plane.remember(predictions, request_ids)
        return encode_classify_batch_response(predictions, request_ids)

    async def _classify_raw_batch(self, request: RawBatch, context: grpc.aio.ServicerContext) -> bytes:
        count = len(request.pixels)
        if count > self.config.max_request_images:
            raise InvalidInput(f"batch has {count} requests, over the maximum of {self.config.max_request_images}")
        try:
            predictions = await self.plane.classify_tensor(
                request.model_name, request.model_version, request.pixels, request_deadline(context)
            )
        except InvalidInput as err:
            if err.index is None:
                raise
            raise InvalidInput(f"requests[{err.index}]: {err}", err.index) from None
        request_ids = new_request_id_array(count)
        self.plane.remember_batch(predictions, request_ids[0, :BATCH_PREFIX_CHARS].tobytes().decode("ascii"))
        return encode_classify_batch_response(predictions, request_ids)

    async def GetModelInfo(self, request: pb.GetModelInfoRequest, context: grpc.aio.ServicerContext) -> pb.ModelInfo:
        served = self.plane.model_info(request.model_name, request.model_version)
        info, detector = served.pipeline.info, served.pipeline.detector
        return pb.ModelInfo(
            name=served.name,
            version=served.version,
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
            digit_threshold=detector.threshold if detector else float("nan"),
            digit_detector=detector_summary(detector),
        )

    async def ReadDigits(self, request: pb.ReadDigitsRequest, context: grpc.aio.ServicerContext):
        served, reading, (width, height) = await self.plane.read_digits(
            request.model_name, request.model_version, request.image, request.expected_digits, request_deadline(context)
        )
        request_id = request.request_id or new_request_ids(1)[0]
        self.plane.remember_reading(served, request_id, reading)
        return pb.ReadDigitsResponse(
            text=reading.text,
            digits=[_read_digit(d) for d in reading.digits],
            confidence=reading.confidence,
            model_version=served.version,
            request_id=request_id,
            image_width=width,
            image_height=height,
        )

    async def ReadTable(self, request: pb.ReadTableRequest, context: grpc.aio.ServicerContext):
        served, table, (width, height) = await self.plane.read_table(
            request.model_name, request.model_version, request.image, request_deadline(context)
        )
        return pb.ReadTableResponse(
            rows=[
                pb.TableRow(
                    cells=[
                        pb.TableCell(
                            text=cell.text,
                            confidence=cell.confidence,
                            **_box(cell.box),
                            digits=[_read_digit(d) for d in cell.digits],
                        )
                        for cell in row
                    ]
                )
                for row in table.rows
            ],
            columns=table.columns,
            ruled_rows=table.ruled_rows,
            ruled_columns=table.ruled_columns,
            skew_degrees=table.skew_degrees,
            confidence=table.confidence,
            model_version=served.version,
            request_id=request.request_id or new_request_ids(1)[0],
            image_width=width,
            image_height=height,
        )

    async def ReadExpression(self, request: pb.ReadExpressionRequest, context: grpc.aio.ServicerContext):
        served, expression, (width, height) = await self.plane.read_expression(
            request.model_name, request.model_version, request.image, request_deadline(context)
        )
        evaluation = expression.evaluation
        return pb.ReadExpressionResponse(
            text=expression.text,
            symbols=[
                pb.ExpressionSymbol(
                    symbol=s.symbol,
                    confidence=s.confidence,
                    **_box(s.box),
                    alternatives=[pb.SymbolAlternative(symbol=a, probability=q) for a, q in s.alternatives],
                )
                for s in expression.symbols
            ],
            value=evaluation.value,
            error=evaluation.error,
            written_answer=evaluation.written_answer,
            answer_correct=evaluation.answer_correct,
            confidence=expression.confidence,
            model_version=served.version,
            request_id=request.request_id or new_request_ids(1)[0],
            image_width=width,
            image_height=height,
        )

    async def Feedback(self, request: pb.FeedbackRequest, context: grpc.aio.ServicerContext) -> pb.FeedbackResponse:
        truth = request.WhichOneof("truth")
        if truth is None:
            raise InvalidInput("no truth: set `label` (the true digit of a Classify answer) or `text` (of ReadDigits)")
        metadata = dict(context.invocation_metadata() or ())
        result = await self.plane.feedback_for(
            request.request_id,
            request.label if truth == "label" else None,
            request.text if truth == "text" else None,
            request.model_name,
            forwarded=metadata.get(FORWARDED_KEY) == "1",  # by another replica: not forwarded again
            authorization=metadata.get("authorization"),
        )
        return pb.FeedbackResponse(
            model_name=result.answer.model,
            model_version=result.answer.version,
            prediction=result.answer.prediction,
            correct=result.correct,
            stored=result.stored,
            live_accuracy=result.live_accuracy,
            live_answers=result.live_answers,
        )

    async def ListModels(self, request: pb.ListModelsRequest, context: grpc.aio.ServicerContext):
        statuses, default_model = self.plane.list_models()
        return pb.ListModelsResponse(
            models=[
                pb.ModelVersionStatus(
                    name=s.name,
                    version=s.version,
                    state=s.state,
                    reason=s.reason,
                    is_default=s.is_default,
                    load_seconds=s.load_seconds,
                )
                for s in statuses
            ],
            default_model=default_model,
        )


def _read_digit(d: ReadDigit) -> pb.ReadDigit:
    return pb.ReadDigit(
        digit=d.digit,
        confidence=d.confidence,
        **_box(d.box),
        alternatives=[pb.DigitAlternative(digit=a, probability=q) for a, q in d.alternatives],
        line=d.line,
        group=d.group,
    )


def _box(box: tuple[int, int, int, int]) -> dict[str, int]:
    """A box (x, y, width, height) as the fields every Read* message names it by."""
    return {"x": box[0], "y": box[1], "width": box[2], "height": box[3]}


def detector_summary(detector: object | None) -> str:
    """One line on where digit_score comes from (the model's own output, or the separate detector file) and how it is
    computed, from the detector's own description."""
    return digit_score_summary(detector)


def add_to_server(
    servicer: ClassifierServicer,
    server: grpc.aio.Server,
    metrics: ServiceMetrics,
    calls: CallGate | None = None,
    streams: StreamGate | None = None,
    auth: TokenChecker | None = None,
) -> None:
    unread = UnreadRefusal(UNREAD_REFUSALS, servicer.refusal_before_reading)
    server.add_generic_rpc_handlers(
        (generic_handler(servicer, SERVICE, metrics, calls, streams, PARSERS, auth, unread),)
    )
