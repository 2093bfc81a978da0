"""The Open Inference Protocol over gRPC (`inference.GRPCInferenceService`): thin handlers over the data plane.

Served on the same port as `mnist.v1`, through the same guards (status mapping, call bounds,
metrics) and the same model pipeline and batch queue. Tensors arrive in `raw_input_contents`
(little-endian bytes) or typed `contents`; outputs always leave as `raw_output_contents`, as Triton
sends them. Shared-memory tensors, model control and trace/log settings are answered UNIMPLEMENTED.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
import numpy as np
from google.protobuf import json_format

from proto.inference import grpc_service_pb2 as pb
from proto.inference import model_config_pb2
from server.errors import InvalidInput, ServiceError, Unsupported
from server.ops.metrics import ServiceMetrics
from server.plane.data_plane import DataPlane
from server.plane.oip import Tensor, tensor_from_bytes, tensor_from_values
from server.security import TokenChecker
from server.transport.guards import CallGate, StreamGate, generic_handler, request_deadline

SERVICE = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"]
# Which typed `contents` field carries each datatype (FP16 and BF16 travel only as raw bytes).
CONTENTS_FIELD = {
    "BOOL": "bool_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}
NO_SHARED_MEMORY = "shared-memory tensors are not supported by this server; send tensor data in the request"


def request_tensors(request: pb.ModelInferRequest) -> list[Tensor]:
    """The request's input tensors, from raw_input_contents when present (all inputs), else typed contents."""
    raw = request.raw_input_contents
    if raw and len(raw) != len(request.inputs):
        raise InvalidInput(f"{len(raw)} raw_input_contents for {len(request.inputs)} inputs; send one per input")
    tensors = []
    for i, tensor in enumerate(request.inputs):
        if "shared_memory_region" in tensor.parameters:
            raise Unsupported(NO_SHARED_MEMORY)
        shape = list(tensor.shape)
        if raw:
            tensors.append(tensor_from_bytes(tensor.name, tensor.datatype, shape, raw[i]))
            continue
        field = CONTENTS_FIELD.get(tensor.datatype)
        if field is None:
            raise InvalidInput(
                f"input '{tensor.name}': {tensor.datatype or 'no datatype'} cannot travel in typed contents; "
                "send it in raw_input_contents"
            )
        tensors.append(tensor_from_values(tensor.name, tensor.datatype, shape, getattr(tensor.contents, field)))
    return tensors


def infer_response(
    request: pb.ModelInferRequest, name: str, version: str, outputs: list[Tensor]
) -> pb.ModelInferResponse:
    response = pb.ModelInferResponse(model_name=name, model_version=version, id=request.id)
    for tensor in outputs:
        response.outputs.add(name=tensor.name, datatype=tensor.datatype, shape=tensor.shape)
        response.raw_output_contents.append(np.ascontiguousarray(tensor.data).tobytes())
    return response


class InferenceServicer:
    """`inference.GRPCInferenceService`, every method the proto declares; unsupported ones say so."""

    def __init__(self, plane: DataPlane) -> None:
        self.plane = plane

    async def ServerLive(self, request: pb.ServerLiveRequest, context: grpc.aio.ServicerContext):
        return pb.ServerLiveResponse(live=self.plane.live())

    async def ServerReady(self, request: pb.ServerReadyRequest, context: grpc.aio.ServicerContext):
        return pb.ServerReadyResponse(ready=self.plane.ready())

    async def ModelReady(self, request: pb.ModelReadyRequest, context: grpc.aio.ServicerContext):
        return pb.ModelReadyResponse(ready=self.plane.model_ready(request.name, request.version))

    async def ServerMetadata(self, request: pb.ServerMetadataRequest, context: grpc.aio.ServicerContext):
        return json_format.ParseDict(self.plane.server_metadata(), pb.ServerMetadataResponse())

    async def ModelMetadata(self, request: pb.ModelMetadataRequest, context: grpc.aio.ServicerContext):
        return json_format.ParseDict(
            self.plane.model_metadata(request.name, request.version), pb.ModelMetadataResponse()
        )

    async def ModelConfig(self, request: pb.ModelConfigRequest, context: grpc.aio.ServicerContext):
        config = json_format.ParseDict(
            self.plane.model_config(request.name, request.version), model_config_pb2.ModelConfig()
        )
        return pb.ModelConfigResponse(config=config)

    async def ModelInfer(self, request: pb.ModelInferRequest, context: grpc.aio.ServicerContext):
        return await self._infer(request, request_deadline(context))

    async def ModelStreamInfer(
        self, requests: AsyncIterator[pb.ModelInferRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.ModelStreamInferResponse]:
        """One response per request, in order; a request that fails gets its error in `error_message` and the
        stream goes on, as in Triton."""
        async for request in requests:
            try:
                response = await self._infer(request, None)
            except ServiceError as err:
                yield pb.ModelStreamInferResponse(error_message=str(err))
            else:
                yield pb.ModelStreamInferResponse(infer_response=response)

    async def _infer(self, request: pb.ModelInferRequest, deadline: float | None) -> pb.ModelInferResponse:
        self.plane.served(request.model_name, request.model_version)  # an unknown model is NOT_FOUND, whatever else
        for output in request.outputs:
            if "shared_memory_region" in output.parameters:
                raise Unsupported(NO_SHARED_MEMORY)
        name, version, outputs = await self.plane.infer(
            request.model_name,
            request.model_version,
            request_tensors(request),
            [output.name for output in request.outputs],
            deadline,
        )
        return infer_response(request, name, version, outputs)

    async def ModelStatistics(self, request: pb.ModelStatisticsRequest, context: grpc.aio.ServicerContext):
        stats = self.plane.statistics(request.name, request.version)
        return json_format.ParseDict({"model_stats": stats}, pb.ModelStatisticsResponse())

    async def RepositoryIndex(self, request: pb.RepositoryIndexRequest, context: grpc.aio.ServicerContext):
        response = pb.RepositoryIndexResponse()
        for row in self.plane.repository_index():
            if not request.ready or row["state"] == "READY":
                response.models.add(**row)
        return response

    async def RepositoryModelLoad(self, request: pb.RepositoryModelLoadRequest, context: grpc.aio.ServicerContext):
        await self.plane.load_model(request.model_name)
        return pb.RepositoryModelLoadResponse()

    async def RepositoryModelUnload(self, request: pb.RepositoryModelUnloadRequest, context: grpc.aio.ServicerContext):
        await self.plane.unload_model(request.model_name)
        return pb.RepositoryModelUnloadResponse()

    async def SystemSharedMemoryStatus(self, request, context: grpc.aio.ServicerContext):
        return pb.SystemSharedMemoryStatusResponse()  # no regions: none can be registered

    async def SystemSharedMemoryRegister(self, request, context: grpc.aio.ServicerContext):
        raise Unsupported(NO_SHARED_MEMORY)

    async def SystemSharedMemoryUnregister(self, request, context: grpc.aio.ServicerContext):
        return pb.SystemSharedMemoryUnregisterResponse()  # nothing registered, so nothing to remove

    async def CudaSharedMemoryStatus(self, request, context: grpc.aio.ServicerContext):
        return pb.CudaSharedMemoryStatusResponse()

    async def CudaSharedMemoryRegister(self, request, context: grpc.aio.ServicerContext):
        raise Unsupported(NO_SHARED_MEMORY)

    async def CudaSharedMemoryUnregister(self, request, context: grpc.aio.ServicerContext):
        return pb.CudaSharedMemoryUnregisterResponse()

    async def TraceSetting(self, request, context: grpc.aio.ServicerContext):
        raise Unsupported("trace settings are set at start (see mnist-serve --help), not per call")

    async def LogSettings(self, request, context: grpc.aio.ServicerContext):
        raise Unsupported("log settings are set at start (--log-level), not per call")


def add_to_server(
    servicer: InferenceServicer,
    server: grpc.aio.Server,
    metrics: ServiceMetrics,
    calls: CallGate | None = None,
    streams: StreamGate | None = None,
    auth: TokenChecker | None = None,
) -> None:
    server.add_generic_rpc_handlers((generic_handler(servicer, SERVICE, metrics, calls, streams, auth=auth),))
