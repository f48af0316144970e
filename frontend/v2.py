"""Open Inference Protocol (KServe v2) REST resources, on the same client and workers as the seed API.

Model names are the pool's file names; a bare name ("iris") also finds "iris.onnx". Each model has
the versions of worker/versions.py.
"""
from __future__ import annotations

from typing import Any

import falcon
import falcon.asgi
import orjson

from broker import jsonbody
from broker.errors import BadInput, NoWorkerAvailable
from broker.protocol import model_file_name

from . import bodies, oip
from .deadlines import header_timeout_s, parameter_timeout_s
from .parts import Parts
from .timing import request_timing, timed
from .v2_tensors import HEADER_LENGTH, datatype_of, decode_request, encode_response

SERVER_NAME = "fractal-ml-server"
EXTENSIONS = ["binary_tensor_data", "model_repository", "model_configuration", "statistics"]


def model_name(name: str) -> str:
    """The pool name of a route's model; its version goes to the worker as it came (None: the newest)."""
    return model_file_name(name)


def _json(resp: falcon.asgi.Response, value: Any) -> None:
    resp.content_type = falcon.MEDIA_JSON
    resp.data = orjson.dumps(value, option=orjson.OPT_NON_STR_KEYS)


def _tensor_meta(spec: dict) -> dict:
    return {"name": spec["name"], "datatype": datatype_of(spec["dtype"]),
            "shape": [-1 if d is None else d for d in spec["shape"]]}


class V2Resource:
    def __init__(self, parts: Parts):
        self.client = parts.client
        self.max_body_bytes = parts.settings.max_body_bytes
        self.version = parts.version


class ServerLive(V2Resource):
    async def on_get(self, req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
        _json(resp, {"live": True})


class ServerReady(V2Resource):
    async def on_get(self, req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
        if not await self.client.service_ready(timeout_s=2.0):
            raise NoWorkerAvailable("no live worker is registered with the broker")
        _json(resp, {"ready": True})


class ServerMetadata(V2Resource):
    async def on_get(self, req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
        _json(resp, {"name": SERVER_NAME, "version": self.version, "extensions": EXTENSIONS})


class ModelMetadata(V2Resource):
    async def on_get(self, req: falcon.asgi.Request, resp: falcon.asgi.Response, name: str,
                     version: str | None = None) -> None:
        info = await self.client.model_info(model_name(name), version=version or None,
                                            request_id=req.context.request_id)
        _json(resp, {"name": name, "versions": info["versions"], "platform": "onnxruntime_onnx",
                     "inputs": [_tensor_meta(i) for i in info["inputs"]],
                     "outputs": [_tensor_meta(o) for o in info["outputs"]]})


class ModelReady(V2Resource):
    async def on_get(self, req: falcon.asgi.Request, resp: falcon.asgi.Response, name: str,
                     version: str | None = None) -> None:
        await self.client.model_info(model_name(name), version=version or None, request_id=req.context.request_id)
        _json(resp, {"name": name, "ready": True})


class Infer(V2Resource):
    async def on_post(self, req: falcon.asgi.Request, resp: falcon.asgi.Response, name: str,
                      version: str | None = None) -> None:
        model = model_name(name)
        header = req.get_header(HEADER_LENGTH)
        try:
            header_length = int(header) if header is not None else None
        except ValueError:
            header_length = -1  # decode_request rejects it with the protocol's message
        timeout_s = header_timeout_s(req, self.client.timeout_s)
        request = decode_request(await bodies.raw(req, self.max_body_bytes), header_length)
        timeout_s = parameter_timeout_s(request.timeout, timeout_s)
        outputs, served = await timed(request_timing(req), model, lambda timing: self.client.infer(
            model, request.inputs, request.outputs, version=version or None, request_id=req.context.request_id,
            timing=timing, timeout_s=timeout_s))
        body, json_length = encode_response(name, request, outputs, served)
        resp.data = body
        if json_length is None:
            resp.content_type = falcon.MEDIA_JSON
        else:
            resp.content_type = "application/octet-stream"
            resp.set_header(HEADER_LENGTH, str(json_length))


class ModelConfig(V2Resource):
    async def on_get(self, req: falcon.asgi.Request, resp: falcon.asgi.Response, name: str,
                     version: str | None = None) -> None:
        config = await self.client.model_config(model_name(name), version=version or None,
                                                request_id=req.context.request_id)
        _json(resp, oip.model_config(name, config))


class ModelStatistics(V2Resource):
    """Summed over workers from the broker's status table: as fresh as its status_interval_s."""

    async def on_get(self, req: falcon.asgi.Request, resp: falcon.asgi.Response, name: str | None = None,
                     version: str | None = None) -> None:
        rid = req.context.request_id
        if name is None:
            models = [(m["name"], m["name"], m["version"]) for m in await self.client.repository(request_id=rid)
                      if m["state"] == "READY"]
        else:  # an unknown model or version is a 404; none named is the newest served
            info = await self.client.model_info(model_name(name), version=version or None, request_id=rid)
            models = [(name, model_name(name), info.get("version", oip.VERSION))]
        status = await self.client.broker_status()
        if status is None:
            raise NoWorkerAvailable("the broker did not answer its status")
        _json(resp, oip.statistics(oip.summed_stats(status), models))


class RepositoryIndex(V2Resource):
    async def on_post(self, req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
        _json(resp, await self.client.repository(request_id=req.context.request_id))


async def _repository_version(req: falcon.asgi.Request, max_body_bytes: int) -> str | None:
    """The version a load or unload names in its body's parameters ({"parameters": {"version": "2"}});
    None (every version) for an empty body or none named."""
    data = await bodies.raw(req, max_body_bytes)
    if not data.strip():
        return None
    body = jsonbody.loads(data, "the request body")
    parameters = body.get("parameters") if isinstance(body, dict) else None
    if parameters is not None and not isinstance(parameters, dict):
        raise BadInput('"parameters" must be an object, e.g. {"parameters": {"version": "2"}}')
    version = (parameters or {}).get("version")
    if version is not None and not isinstance(version, (str, int)):
        raise BadInput('"parameters.version" must be a string such as "2"')
    return str(version) if version is not None else None


class RepositoryLoad(V2Resource):
    async def on_post(self, req: falcon.asgi.Request, resp: falcon.asgi.Response, name: str) -> None:
        version = await _repository_version(req, self.max_body_bytes)
        await self.client.load(model_name(name), version=version, request_id=req.context.request_id)
        _json(resp, {})


class RepositoryUnload(V2Resource):
    async def on_post(self, req: falcon.asgi.Request, resp: falcon.asgi.Response, name: str) -> None:
        version = await _repository_version(req, self.max_body_bytes)
        await self.client.unload(model_name(name), version=version, request_id=req.context.request_id)
        _json(resp, {})
