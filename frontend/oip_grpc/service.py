"""GRPCInferenceService over the broker: the same operations as the REST /v2 routes, as messages.

Calls go through one AsyncClient (any number in flight on one socket). The broker's MMI questions
(is a worker registered, what is every worker's status) are rare and go through a synchronous
Client on a thread, as the REST frontend asks them.
"""
from __future__ import annotations

import asyncio

from google.protobuf import json_format

from broker.client import AsyncClient, Client
from broker.errors import BadInput, ModelNotFound, NoWorkerAvailable
from broker.protocol import check_model_name

from .. import oip
from ..timing import timed
from ..v2_tensors import datatype_of
from .calls import ADMIN, OPEN, Call, Calls, rpc
from .proto import grpc_service_pb2 as pb
from .proto import grpc_service_pb2_grpc as pb_grpc
from .proto import model_config_pb2
from .tensors import decode_inputs, encode_response, requested_outputs

SERVER_NAME = "fractal-ml-server"
EXTENSIONS = ["binary_tensor_data", "model_repository", "model_configuration", "statistics"]
MMI_TIMEOUT_S = 2.0


def pool_name(name: str) -> str:
    """The pool's file name for a model name ("iris" finds "iris.onnx"); versions go to the worker."""
    if not name:
        raise BadInput("a model name is required")
    return check_model_name(name if name.endswith(".onnx") else name + ".onnx")


def _version_parameter(parameters, what: str) -> str | None:
    """A load's or unload's one parameter, "version" (string_param or int64_param); None: every version."""
    # NOTE: tritonclient's unload always sends unload_dependents; a model here has no dependents
    if set(parameters) - {"version", *(("unload_dependents",) if what == "unload" else ())}:
        raise BadInput(f"{what} takes one parameter here, 'version' (no config override, no files): upload a "
                       f"model with PUT /api/v1/models/NAME, then load it")
    if "version" not in parameters:
        return None
    param = parameters["version"]
    kind = param.WhichOneof("parameter_choice")
    if kind not in ("string_param", "int64_param"):
        raise BadInput(f"{what}: the 'version' parameter must be a string or an integer")
    return str(getattr(param, kind))


def _tensor_metadata(spec: dict) -> pb.ModelMetadataResponse.TensorMetadata:
    return pb.ModelMetadataResponse.TensorMetadata(
        name=spec["name"], datatype=datatype_of(spec["dtype"]), shape=[-1 if d is None else d for d in spec["shape"]])


def _unsupported(name: str, what: str):
    """A handler answering UNIMPLEMENTED through the shared call path (counted, logged, no traceback)."""
    @rpc(name)
    async def handler(self: "InferenceService", request: object, call: Call) -> None:
        raise NotImplementedError(f"{name}: {what} is not supported by this server")
    return handler


class InferenceService(pb_grpc.GRPCInferenceServiceServicer):
    ModelStreamInfer = _unsupported("ModelStreamInfer", "streaming inference")
    SystemSharedMemoryStatus = _unsupported("SystemSharedMemoryStatus", "system shared memory")
    SystemSharedMemoryRegister = _unsupported("SystemSharedMemoryRegister", "system shared memory")
    SystemSharedMemoryUnregister = _unsupported("SystemSharedMemoryUnregister", "system shared memory")
    CudaSharedMemoryStatus = _unsupported("CudaSharedMemoryStatus", "CUDA shared memory")
    CudaSharedMemoryRegister = _unsupported("CudaSharedMemoryRegister", "CUDA shared memory")
    CudaSharedMemoryUnregister = _unsupported("CudaSharedMemoryUnregister", "CUDA shared memory")
    TraceSetting = _unsupported("TraceSetting", "tracing")
    LogSettings = _unsupported("LogSettings", "changing log settings")

    def __init__(self, client: AsyncClient, mmi: Client, calls: Calls, version: str):
        self.client, self.mmi, self.calls, self.version = client, mmi, calls, version

    @rpc("ServerLive", OPEN)
    async def ServerLive(self, request: pb.ServerLiveRequest, call: Call) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    @rpc("ServerReady", OPEN)
    async def ServerReady(self, request: pb.ServerReadyRequest, call: Call) -> pb.ServerReadyResponse:
        ready = await asyncio.to_thread(self.mmi.service_ready, timeout_s=min(MMI_TIMEOUT_S, call.timeout_s))
        return pb.ServerReadyResponse(ready=ready)

    @rpc("ServerMetadata")
    async def ServerMetadata(self, request: pb.ServerMetadataRequest, call: Call) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(name=SERVER_NAME, version=self.version, extensions=EXTENSIONS)

    @rpc("ModelReady")
    async def ModelReady(self, request: pb.ModelReadyRequest, call: Call) -> pb.ModelReadyResponse:
        """Ready or not, as Triton answers: an unknown or unloaded model is not ready (no error)."""
        try:
            await self.client.model_info(pool_name(request.name), version=request.version or None,
                                         timeout_s=call.timeout_s, request_id=call.request_id)
        except ModelNotFound:
            return pb.ModelReadyResponse(ready=False)
        return pb.ModelReadyResponse(ready=True)

    @rpc("ModelMetadata")
    async def ModelMetadata(self, request: pb.ModelMetadataRequest, call: Call) -> pb.ModelMetadataResponse:
        info = await self.client.model_info(pool_name(request.name), version=request.version or None,
                                            timeout_s=call.timeout_s, request_id=call.request_id)
        return pb.ModelMetadataResponse(name=request.name, versions=info["versions"], platform=oip.PLATFORM,
                                        inputs=[_tensor_metadata(t) for t in info["inputs"]],
                                        outputs=[_tensor_metadata(t) for t in info["outputs"]])

    @rpc("ModelInfer")
    async def ModelInfer(self, request: pb.ModelInferRequest, call: Call) -> pb.ModelInferResponse:
        model = pool_name(request.model_name)
        inputs, wanted = decode_inputs(request), requested_outputs(request)
        outputs, served = await timed(call.timing, model, lambda timing: self.client.infer(
            model, inputs, wanted, version=request.model_version or None, timeout_s=call.timeout_s,
            request_id=call.request_id, timing=timing))
        return encode_response(request, outputs, served)

    @rpc("ModelConfig")
    async def ModelConfig(self, request: pb.ModelConfigRequest, call: Call) -> pb.ModelConfigResponse:
        config = await self.client.model_config(pool_name(request.name), version=request.version or None,
                                                timeout_s=call.timeout_s, request_id=call.request_id)
        message = json_format.ParseDict(oip.model_config(request.name, config), model_config_pb2.ModelConfig())
        return pb.ModelConfigResponse(config=message)

    @rpc("ModelStatistics")
    async def ModelStatistics(self, request: pb.ModelStatisticsRequest, call: Call) -> pb.ModelStatisticsResponse:
        """Summed over workers from the broker's status table: as fresh as its status_interval_s."""
        if request.name:
            info = await self.client.model_info(pool_name(request.name), version=request.version or None,
                                                timeout_s=call.timeout_s, request_id=call.request_id)
            models = [(request.name, pool_name(request.name), info.get("version", oip.VERSION))]
        else:
            index = await self.client.repository(timeout_s=call.timeout_s, request_id=call.request_id)
            models = [(m["name"], m["name"], m["version"]) for m in index if m["state"] == "READY"]
        status = await asyncio.to_thread(self.mmi.broker_status, timeout_s=min(MMI_TIMEOUT_S, call.timeout_s))
        if status is None:
            raise NoWorkerAvailable("the broker did not answer its status")
        return json_format.ParseDict(oip.statistics(oip.summed_stats(status), models), pb.ModelStatisticsResponse())

    @rpc("RepositoryIndex")
    async def RepositoryIndex(self, request: pb.RepositoryIndexRequest, call: Call) -> pb.RepositoryIndexResponse:
        index = await self.client.repository(timeout_s=call.timeout_s, request_id=call.request_id)
        return pb.RepositoryIndexResponse(models=[
            pb.RepositoryIndexResponse.ModelIndex(name=m["name"], version=m["version"], state=m["state"],
                                                  reason=m["reason"])
            for m in index if not request.ready or m["state"] == "READY"])

    @rpc("RepositoryModelLoad", ADMIN)
    async def RepositoryModelLoad(self, request: pb.RepositoryModelLoadRequest,
                                  call: Call) -> pb.RepositoryModelLoadResponse:
        await self.client.load(pool_name(request.model_name), version=_version_parameter(request.parameters, "load"),
                               timeout_s=call.timeout_s, request_id=call.request_id)
        return pb.RepositoryModelLoadResponse()

    @rpc("RepositoryModelUnload", ADMIN)
    async def RepositoryModelUnload(self, request: pb.RepositoryModelUnloadRequest,
                                    call: Call) -> pb.RepositoryModelUnloadResponse:
        await self.client.unload(pool_name(request.model_name),
                                 version=_version_parameter(request.parameters, "unload"), timeout_s=call.timeout_s,
                                 request_id=call.request_id)
        return pb.RepositoryModelUnloadResponse()
