"""Falcon ASGI resources of the seed's REST API; each turns HTTP into awaited calls of the async client."""
from __future__ import annotations

import asyncio
import json
from typing import Any

import falcon
import falcon.asgi
import numpy as np

from broker.client import AsyncClient
from broker.errors import BadInput, Timeout, UnsupportedMediaType
from broker.protocol import model_file_name

from . import bodies
from .deadlines import header_timeout_s
from .errors import status_body
from .parts import Parts
from .timing import request_timing, timed

WELCOME = ("Greetings from Fractal - ML Server - Inferrer, the Machine Learning model server. "
           "For more information, visit /help")
PREDICT_EXAMPLE = '{"values": [2, 5, 1, 4]}'


def ok(resp: falcon.asgi.Response, description: str = "OK", /, **extra: Any) -> None:
    resp.content_type = falcon.MEDIA_JSON
    resp.data = status_body(200, description, **extra)


def jsonable(value: Any) -> Any:
    """Arrays become nested lists; maps from ZipMap-style outputs get string keys."""
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    return value


class Static:
    """A JSON response built once at start-up: welcome, help, the OpenAPI document."""

    def __init__(self, data: bytes):
        self._data = data

    async def on_get(self, req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
        resp.content_type = falcon.MEDIA_JSON
        resp.data = self._data


class Welcome(Static):
    def __init__(self, parts: Parts):
        super().__init__(welcome_body())


class Resource:
    def __init__(self, parts: Parts):
        self.client = parts.client
        self.max_body_bytes = parts.settings.max_body_bytes


class SendToModelhost(Resource):
    async def on_post(self, req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
        body = await bodies.json_body(req, self.max_body_bytes, '{"data": ["ONE", "TWO"]}')
        if not isinstance(body, dict) or not isinstance(body.get("data"), list):
            raise BadInput('send {"data": [...]}: a list whose elements go to the workers')
        replies = await echo_all(self.client, body["data"], req.context.request_id)
        ok(resp, "Sent to modelhost", data=[{"data": r["data"], "node": r["node"]} for r in replies])


class Models(Resource):
    async def on_get(self, req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
        ok(resp, model_list=await self.client.models(request_id=req.context.request_id))


class Information(Resource):
    async def on_get(self, req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
        ok(resp, model_list=await self.client.information(request_id=req.context.request_id))


class Model(Resource):
    async def on_get(self, req: falcon.asgi.Request, resp: falcon.asgi.Response, name: str) -> None:
        ok(resp, **await self.client.model_info(model_file_name(name), version=_version(req),
                                                request_id=req.context.request_id))

    async def on_post(self, req: falcon.asgi.Request, resp: falcon.asgi.Response, name: str) -> None:
        name = model_file_name(name)
        body = await bodies.json_body(req, self.max_body_bytes, '{"model_description": "..."}')
        if not isinstance(body, dict) or not isinstance(body.get("model_description"), str):
            raise BadInput('send {"model_description": "..."} with a string description')
        result = await self.client.describe(name, body["model_description"], request_id=req.context.request_id)
        ok(resp, "Model description updated", **result)

    async def on_put(self, req: falcon.asgi.Request, resp: falcon.asgi.Response, name: str) -> None:
        name = model_file_name(name)
        kind = bodies.media_type(req)
        if kind == "multipart/form-data":
            data = await bodies.form_file(req, "path", self.max_body_bytes)
        elif kind in ("application/octet-stream", ""):
            data = await bodies.raw(req, self.max_body_bytes)
        else:
            raise UnsupportedMediaType(f"upload the model as multipart field 'path' (-F \"path=@model.onnx\")"
                                       f" or an application/octet-stream body, not {kind}")
        if not data:
            raise BadInput("the uploaded model is empty")
        info = await self.client.upload(name, data, version=_version(req), request_id=req.context.request_id)
        ok(resp, "Model uploaded", **info)

    async def on_delete(self, req: falcon.asgi.Request, resp: falcon.asgi.Response, name: str) -> None:
        name = model_file_name(name)
        ok(resp, "Model deleted", **await self.client.delete(name, version=_version(req),
                                                             request_id=req.context.request_id))


def _version(req: falcon.asgi.Request) -> str | None:
    """The `?version=V` of a seed route (README, Model versions); None: the newest served."""
    return (req.get_param("version") or None) if req.query_string else None  # NOTE: no parsing without a query


class Prediction(Resource):
    """GET or POST /api/v1/models/{name}/prediction: JSON rows, named inputs, or an image.

    One answer for all of them: `values` is the model's first output (a classifier's label), one
    entry per row; `outputs` ("all" or names) adds {"outputs": {name: value}}.
    """

    async def on_get(self, req: falcon.asgi.Request, resp: falcon.asgi.Response, name: str) -> None:
        name = model_file_name(name)
        kind = bodies.media_type(req)
        if kind == "multipart/form-data":
            image, fields = await bodies.form_fields(req, "file", self.max_body_bytes, frozenset({"outputs"}))
            await self._image(req, resp, name, image, _form_outputs(fields.get("outputs")))
        elif kind.startswith("image/"):
            await self._image(req, resp, name, await bodies.raw(req, self.max_body_bytes),
                              _form_outputs(req.get_param_as_list("outputs")))
        else:
            await self._json(req, resp, name, await bodies.json_body(req, self.max_body_bytes, PREDICT_EXAMPLE, kind))

    on_post = on_get

    async def _json(self, req: falcon.asgi.Request, resp: falcon.asgi.Response, name: str, body: Any) -> None:
        if not isinstance(body, dict) or ("values" in body) == ("inputs" in body):
            raise BadInput(f'send {PREDICT_EXAMPLE} (one row, or a list of rows), or {{"inputs": '
                           f'{{"name": [...], ...}}}} for a model with named inputs')
        if "values" in body:
            inputs: Any = [_array(body["values"], "values")]
        elif isinstance(body["inputs"], dict):
            inputs = {str(k): _array(v, f"inputs.{k}") for k, v in body["inputs"].items()}
        else:
            raise BadInput('"inputs" must map input names to arrays')
        wanted = _wanted_outputs(body.get("outputs"))
        # NOTE: every output is computed, so that `values` is the model's first whatever was asked for.
        timeout_s = header_timeout_s(req, self.client.timeout_s)
        outputs = await timed(request_timing(req), name, lambda timing: self.client.predict(
            name, inputs, version=_version(req), request_id=req.context.request_id, timing=timing,
            timeout_s=timeout_s))
        _answer(resp, name, outputs, wanted)

    async def _image(self, req: falcon.asgi.Request, resp: falcon.asgi.Response, name: str, image: bytes,
                     wanted: list[str] | bool) -> None:
        if not image:
            raise BadInput("the image is empty")
        timeout_s = header_timeout_s(req, self.client.timeout_s)
        outputs = await timed(request_timing(req), name, lambda timing: self.client.predict_image(
            name, image, version=_version(req), request_id=req.context.request_id, timing=timing,
            timeout_s=timeout_s))
        _answer(resp, name, outputs, wanted)


def _answer(resp: falcon.asgi.Response, model: str, outputs: dict, wanted: list[str] | bool) -> None:
    """values: the first output; with `wanted` (True: all, or names) also outputs by name."""
    extra = {}
    if wanted is True:
        extra["outputs"] = {k: jsonable(v) for k, v in outputs.items()}
    elif wanted:
        unknown = [n for n in wanted if n not in outputs]
        if unknown:
            raise BadInput(f"unknown output {unknown[0]!r}; {model} has {', '.join(outputs)}")
        extra["outputs"] = {k: jsonable(outputs[k]) for k in wanted}
    ok(resp, "Prediction successful", values=jsonable(next(iter(outputs.values()))), **extra)


async def echo_all(client: AsyncClient, items: list, request_id: str) -> list[dict]:
    """Each item to a worker and back, one after another, so that each is a message of its own and the
    broker's LRU spreads them over the workers, as the seed's demo shows (sent together they would
    leave as one pack, for one worker). The client's timeout bounds the whole list; the first error
    fails it."""
    replies: list[dict] = []
    try:
        async with asyncio.timeout(client.timeout_s):
            for item in items:
                replies.append(await client.echo(item, request_id=request_id))
    except TimeoutError:
        raise Timeout(f"no reply from the broker within {client.timeout_s:g} s "
                      f"({len(items) - len(replies)} echoes outstanding)") from None
    return replies


def _array(value: Any, where: str) -> np.ndarray:
    try:
        array = np.asarray(value)
    except ValueError:
        raise BadInput(f"'{where}' must be a rectangular list of numbers") from None
    if array.dtype.kind not in "biufU":
        raise BadInput(f"'{where}' must be a rectangular list of numbers or strings")
    return array


def _wanted_outputs(outputs: Any) -> list[str] | bool:
    """The "outputs" field: False when absent, True for "all", else the list of names."""
    if outputs is None:
        return False
    if outputs == "all":
        return True
    if isinstance(outputs, list) and outputs and all(isinstance(o, str) for o in outputs):
        return outputs
    raise BadInput('"outputs" must be "all" or a list of output names')


def _form_outputs(values: list[str] | None) -> list[str] | bool:
    """`-F outputs=all`, `-F outputs=label -F outputs=probabilities` (or `label,probabilities`)."""
    names = [n.strip() for v in values or [] for n in v.split(",") if n.strip()]
    return _wanted_outputs(None if not names else "all" if names == ["all"] else names)


def welcome_body() -> bytes:
    return status_body(200, WELCOME)


def json_bytes(value: Any) -> bytes:
    return json.dumps(value).encode()
