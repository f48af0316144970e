"""The REST API in one table: routing, public paths, error shapes, GET /help and GET /openapi.json are all
built from it.

Each entry names its resource class; app.py builds each class once with the process's Parts and routes
every path to it. The rest is data, so /help and /openapi.json need no app, no broker and no socket.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Callable, Literal

from .errors import status_body
from .observability import Metrics, StatusJson, StatusPage
from .parts import Parts
from .resources import Information, Model, Models, Prediction, SendToModelhost, Static, Welcome, json_bytes
from .v2 import (
    Infer,
    ModelConfig,
    ModelMetadata,
    ModelReady,
    ModelStatistics,
    RepositoryIndex,
    RepositoryLoad,
    RepositoryUnload,
    ServerLive,
    ServerMetadata,
    ServerReady,
)

BASE = "http://localhost:8002"
JSON, MULTIPART, OCTETS = "application/json", "multipart/form-data", "application/octet-stream"

# seed: {"http_status": ...} bodies; v2: the Open Inference Protocol's; text: a page or the Prometheus
# exposition, whose errors take the seed's shape
Shape = Literal["seed", "v2", "text"]
Handler = Callable[[Parts], object]  # a resource class (or a factory): built once per process by app.py


@dataclass(frozen=True)
class Endpoint:
    method: str
    path: str
    handler: Handler        # every entry of one path names the same one
    operation: str          # OpenAPI operationId after the method: get_<operation>
    summary: str
    curl: str
    requests: tuple[str, ...] = ()  # request media types, in the order the OpenAPI document lists them
    body_schema: dict = field(default_factory=dict)  # of the application/json body
    form_field: str = ""    # the multipart/form-data part that carries the file
    form_extra: dict = field(default_factory=dict)   # the form's other fields: name -> schema
    response: str = JSON    # media type of a 200
    result: dict = field(default_factory=dict)   # fields beside http_status in a 200 response
    protocol: Shape = "seed"  # the response and error shape
    public: bool = False    # answers without the API token: probes, scrapers, the docs (any method)
    admin: bool = False     # changes models: needs the admin token when one is set
    static: bool = False    # a document built at start-up: neither a body nor the broker can fail it

    def __post_init__(self) -> None:
        if (MULTIPART in self.requests) != bool(self.form_field):
            raise ValueError(f"{self.method} {self.path}: a multipart body needs its form_field, and only it")
        unknown = set(self.requests) - {JSON, MULTIPART, OCTETS}
        if unknown:
            raise ValueError(f"{self.method} {self.path}: no OpenAPI schema for {sorted(unknown)}")


class Help(Static):
    """GET /help: the table, its examples at the address users reach this server at (public_url)."""

    def __init__(self, parts: Parts):
        super().__init__(_indented(status_body(200, "OK", endpoints=help_entries(parts.settings.public_url or BASE))))


class OpenApi(Static):
    def __init__(self, parts: Parts):
        super().__init__(json_bytes(openapi(parts.version)))


def _indented(body: bytes) -> bytes:
    """JSON a person reads in a terminal (GET /help): indented, still JSON."""
    return json.dumps(json.loads(body), indent=2, ensure_ascii=False).encode() + b"\n"


_STATUS = {"type": "object", "properties": {
    "code": {"type": "integer"}, "name": {"type": "string"}, "description": {"type": "string"}}}
_NAMES = {"type": "array", "items": {"type": "string"}}
_INFO = {"model": {"type": "string"}, "description": {"type": "string"},
         "inputs": {"type": "array", "items": {"$ref": "#/components/schemas/Tensor"}},
         "outputs": {"type": "array", "items": {"$ref": "#/components/schemas/Tensor"}},
         "size_bytes": {"type": "integer"}, "last_modified": {"type": "string", "format": "date-time"}}
_PREDICT_BODY = {"type": "object", "properties": {
    "values": {"description": "one row, or a list of rows, for the model's (first) input"},
    "inputs": {"type": "object", "description": "input name -> nested list, for multi-input models"},
    "outputs": {"description": "list of output names, or \"all\": answer those outputs by name beside "
                               "\"values\" (always the first output)"}}}
_PREDICT_FORM = {"outputs": {"type": "string", "description": "\"all\" or an output name; repeat for more"}}

ENDPOINTS = [
    Endpoint("GET", "/", Welcome, "welcome", "Welcome message.", f"curl {BASE}/", public=True,
             static=True),
    Endpoint("GET", "/help", Help, "help", "Every endpoint with an example.", f"curl {BASE}/help",
             result={"endpoints": {"type": "array", "items": {"type": "object"}}}, public=True, static=True),
    Endpoint("GET", "/openapi.json", OpenApi, "openapi", "This API as an OpenAPI 3 document.",
             f"curl {BASE}/openapi.json", public=True, static=True),
    Endpoint("POST", "/api/test/sendtomodelhost", SendToModelhost, "sendtomodelhost",
             "Send each element of data to a worker through the broker; shows which worker (node id) answered.",
             f"curl -X POST -H \"Content-Type: application/json\" --data '{{\"data\": [\"ONE\", \"TWO\"]}}' "
             f"{BASE}/api/test/sendtomodelhost", requests=(JSON,),
             body_schema={"type": "object", "required": ["data"], "properties": {"data": {"type": "array"}}},
             result={"data": {"type": "array", "items": {"type": "object", "properties": {
                 "data": {}, "node": {"type": "string"}}}}}),
    Endpoint("GET", "/api/v1/models", Models, "models", "Names of the models in the pool, sorted.",
             f"curl -X GET {BASE}/api/v1/models", result={"model_list": _NAMES}),
    Endpoint("GET", "/api/v1/models/information", Information, "information", "Every model with its description.",
             f"curl -X GET {BASE}/api/v1/models/information",
             result={"model_list": {"type": "array", "items": {"type": "object", "properties": {
                 "description": {"type": "string"}, "model": {"type": "string"}}}}}),
    Endpoint("GET", "/api/v1/models/{name}", Model, "model",
             "A model's description, inputs and outputs (name, dtype, shape), size and last change.",
             f"curl -X GET {BASE}/api/v1/models/iris.onnx", result=_INFO),
    Endpoint("POST", "/api/v1/models/{name}", Model, "model", "Set a model's description.",
             f"curl -X POST -H \"Content-Type: application/json\" --data "
             f"'{{\"model_description\": \"Iris species from 4 measurements.\"}}' {BASE}/api/v1/models/iris.onnx",
             requests=(JSON,), body_schema={"type": "object", "required": ["model_description"],
                                       "properties": {"model_description": {"type": "string"}}},
             result={"model": {"type": "string"}, "description": {"type": "string"}}, admin=True),
    Endpoint("PUT", "/api/v1/models/{name}", Model, "model",
             "Upload or atomically replace a model (multipart field 'path', or a raw "
             "application/octet-stream body); it is validated in ONNX Runtime first; ?version=V stores version V.",
             f"curl -X PUT -F \"path=@/path/to/model.onnx\" {BASE}/api/v1/models/my_model.onnx",
             requests=(MULTIPART, OCTETS), form_field="path", result=_INFO, admin=True),
    Endpoint("DELETE", "/api/v1/models/{name}", Model, "model", "Delete a model (?version=V: one version).",
             f"curl -X DELETE {BASE}/api/v1/models/my_model.onnx", result={"model": {"type": "string"}},
             admin=True),
    Endpoint("GET", "/api/v1/models/{name}/prediction", Prediction, "prediction",
             "Predict from JSON {\"values\": row or rows} (the model's first input), {\"inputs\": {name: "
             "rows}}, or an image (multipart field 'file', or an image/* body). One rule for all: "
             "\"values\" is the model's first output, one entry per row (a classifier's label); "
             "\"outputs\": \"all\" or a list of names (JSON field, -F outputs=all, or ?outputs= beside an "
             "image/* body) adds \"outputs\": {name: value}. POST works the same.",
             f"curl -X GET -H \"Content-Type: application/json\" --data '{{\"values\":[2, 5, 1, 4]}}' "
             f"{BASE}/api/v1/models/iris.onnx/prediction", requests=(JSON, MULTIPART), body_schema=_PREDICT_BODY,
             form_field="file", form_extra=_PREDICT_FORM,
             result={"values": {"type": "array"}, "outputs": {"type": "object"}}),
    Endpoint("POST", "/api/v1/models/{name}/prediction", Prediction, "prediction",
             "Same as GET. The example sends models/digits_sample.png, which `fractal serve` puts in its "
             "model directory (./models unless --model-dir says otherwise; run it from where you started "
             "the server): a handwritten 8, 32x32 gray, white ink on black. The answer is \"values\": [8] "
             "and, with outputs=all, the label and the 10 class probabilities.",
             f"curl -X POST -F \"file=@models/digits_sample.png\" -F outputs=all "
             f"{BASE}/api/v1/models/digits.onnx/prediction",
             requests=(JSON, MULTIPART), body_schema=_PREDICT_BODY, form_field="file", form_extra=_PREDICT_FORM,
             result={"values": {"type": "array"}, "outputs": {"type": "object"}}),
]


_V2_INFER_BODY = {"type": "object", "required": ["inputs"], "properties": {
    "id": {"type": "string"}, "parameters": {"type": "object"},
    "inputs": {"type": "array", "items": {"type": "object", "required": ["name", "shape", "datatype"],
                                          "properties": {"name": {"type": "string"},
                                                         "shape": {"type": "array", "items": {"type": "integer"}},
                                                         "datatype": {"type": "string"}, "data": {},
                                                         "parameters": {"type": "object"}}}},
    "outputs": {"type": "array", "items": {"type": "object", "properties": {
        "name": {"type": "string"}, "parameters": {"type": "object"}}}}}}
_V2_INFER_CURL = (f"curl -X POST -H \"Content-Type: application/json\" --data '{{\"inputs\": [{{\"name\": "
                  f"\"float_input\", \"shape\": [1, 4], \"datatype\": \"FP32\", \"data\": [2, 5, 1, 4]}}]}}' "
                  f"{BASE}/v2/models/iris.onnx/infer")

ENDPOINTS += [
    Endpoint("GET", "/v2/health/live", ServerLive, "v2_live", "Open Inference Protocol: the server is alive.",
             f"curl {BASE}/v2/health/live", protocol="v2", public=True),
    Endpoint("GET", "/v2/health/ready", ServerReady, "v2_ready",
             "Open Inference Protocol: ready when at least one live worker is registered with the broker.",
             f"curl {BASE}/v2/health/ready", protocol="v2", public=True),
    Endpoint("GET", "/v2", ServerMetadata, "v2_server", "Open Inference Protocol: server name, version and extensions.",
             f"curl {BASE}/v2", protocol="v2"),
    Endpoint("GET", "/v2/models/{name}", ModelMetadata, "v2_model", "Open Inference Protocol: model metadata.",
             f"curl {BASE}/v2/models/iris.onnx", protocol="v2"),
    Endpoint("GET", "/v2/models/{name}/versions/{version}", ModelMetadata, "v2_model", "Model metadata (one version).",
             f"curl {BASE}/v2/models/iris.onnx/versions/1", protocol="v2"),
    Endpoint("GET", "/v2/models/{name}/ready", ModelReady, "v2_model_ready",
             "Open Inference Protocol: model readiness.", f"curl {BASE}/v2/models/iris.onnx/ready", protocol="v2"),
    Endpoint("GET", "/v2/models/{name}/versions/{version}/ready", ModelReady, "v2_model_ready",
             "Model readiness (one version).", f"curl {BASE}/v2/models/iris.onnx/versions/1/ready",
             protocol="v2"),
    Endpoint("POST", "/v2/models/{name}/infer", Infer, "v2_infer",
             "Open Inference Protocol inference: JSON tensors, or the binary tensor data extension "
             "(Inference-Header-Content-Length) in both directions.", _V2_INFER_CURL, requests=(JSON, OCTETS),
             body_schema=_V2_INFER_BODY, protocol="v2"),
    Endpoint("POST", "/v2/models/{name}/versions/{version}/infer", Infer, "v2_infer", "Inference (one version).",
             _V2_INFER_CURL.replace("/infer", "/versions/1/infer"), requests=(JSON, OCTETS),
             body_schema=_V2_INFER_BODY, protocol="v2"),
    Endpoint("GET", "/v2/models/{name}/config", ModelConfig, "v2_config",
             "Model configuration extension: Triton's config (platform, max_batch_size, inputs and outputs "
             "with data types and dims, dynamic_batching).", f"curl {BASE}/v2/models/iris.onnx/config",
             protocol="v2"),
    Endpoint("GET", "/v2/models/{name}/versions/{version}/config", ModelConfig, "v2_config",
             "Model configuration (one version).", f"curl {BASE}/v2/models/iris.onnx/versions/1/config",
             protocol="v2"),
    Endpoint("GET", "/v2/models/stats", ModelStatistics, "v2_stats",
             "Statistics extension: inference counts and times of every ready model, summed over workers "
             "(as fresh as the broker's status_interval_s).", f"curl {BASE}/v2/models/stats", protocol="v2"),
    Endpoint("GET", "/v2/models/{name}/stats", ModelStatistics, "v2_stats", "Statistics of one model.",
             f"curl {BASE}/v2/models/iris.onnx/stats", protocol="v2"),
    Endpoint("GET", "/v2/models/{name}/versions/{version}/stats", ModelStatistics, "v2_stats",
             "Statistics of one model (one version).", f"curl {BASE}/v2/models/iris.onnx/versions/1/stats",
             protocol="v2"),
    Endpoint("POST", "/v2/repository/index", RepositoryIndex, "v2_index",
             "Model repository: every model and its state.", f"curl -X POST {BASE}/v2/repository/index", protocol="v2"),
    Endpoint("POST", "/v2/repository/models/{name}/load", RepositoryLoad, "v2_load",
             "Model repository: serve a model again and warm it.",
             f"curl -X POST {BASE}/v2/repository/models/iris.onnx/load", protocol="v2", admin=True),
    Endpoint("POST", "/v2/repository/models/{name}/unload", RepositoryUnload, "v2_unload",
             "Model repository: stop serving a model; workers drop its session.",
             f"curl -X POST {BASE}/v2/repository/models/iris.onnx/unload", protocol="v2", admin=True),
]


ENDPOINTS += [
    Endpoint("GET", "/metrics", Metrics, "metrics", "Prometheus metrics of the frontend (all gunicorn workers).",
             f"curl {BASE}/metrics", response="text/plain", protocol="text", public=True),
    Endpoint("GET", "/api/v1/status", StatusJson, "status",
             "The broker and each worker: node id (the worker's id), state, last heartbeat, requests served, "
             "models resident.",
             f"curl {BASE}/api/v1/status",
             result={"broker": {"type": "object"}, "workers": {"type": "array", "items": {"type": "object"}}}),
    Endpoint("GET", "/status", StatusPage, "status_page", "The same as a page that refreshes itself.",
             f"curl {BASE}/status", response="text/html", protocol="text"),
]


def help_entries(base: str = BASE) -> list[dict]:
    """GET /help's list; the examples point at `base`, the address users reach this server at."""
    base = base.rstrip("/")
    return [{"method": e.method, "path": e.path, "description": e.summary, "example": e.curl.replace(BASE, base)}
            for e in ENDPOINTS]


def _request_body(e: Endpoint) -> dict | None:
    content: dict[str, Any] = {}
    for media in e.requests:
        if media == JSON:
            schema = e.body_schema or {"type": "object"}
        elif media == MULTIPART:
            schema = {"type": "object", "properties": {e.form_field: {"type": "string", "format": "binary"},
                                                       **e.form_extra}}
        else:
            schema = {"type": "string", "format": "binary"}
        content[media] = {"schema": schema}
    return {"required": True, "content": content} if content else None


def _responses(e: Endpoint) -> dict:
    if e.protocol == "text":
        return {"200": {"description": "OK", "content": {e.response: {"schema": {"type": "string"}}}}}
    if e.protocol == "v2":
        error: dict[str, Any] = {"content": {JSON: {"schema": {"$ref": "#/components/schemas/V2Error"}}}}
        return {"200": {"description": "OK", "content": {e.response: {"schema": {"type": "object"}}}},
                **{code: {**error, "description": text} for code, text in (
                    ("400", "bad request"), ("404", "unknown model"), ("503", "no live worker"),
                    ("504", "deadline passed"))}}
    ok: dict[str, Any] = {"type": "object",
                          "properties": {"http_status": {"$ref": "#/components/schemas/HttpStatus"}, **e.result}}
    error = {"description": "error", "content": {JSON: {"schema": {"$ref": "#/components/schemas/Error"}}}}
    codes = {"400": "bad input", "404": "unknown model or route", "405": "method not allowed"}
    if not e.static:
        codes.update({"413": "body, model or image too large", "415": "unsupported content or image type",
                      "503": "overloaded or no live worker (see Retry-After)", "504": "deadline passed",
                      "507": "model larger than the workers' memory budget",
                      "500": "unexpected failure (with a request id)"})
    responses: dict[str, Any] = {"200": {"description": "OK", "content": {e.response: {"schema": ok}}}}
    responses.update({code: {**error, "description": text} for code, text in codes.items()})
    return responses


def operation_id(e: Endpoint) -> str:
    """The entry's OpenAPI operationId, unique as the spec requires: entries that share an operation
    (one resource on several paths: v2's per-version routes, statistics of all models) are told apart
    by their path's parameters."""
    base = f"{e.method.lower()}_{e.operation}"
    if sum(o.method == e.method and o.operation == e.operation for o in ENDPOINTS) == 1:
        return base
    return base + ("_version" if "{version}" in e.path else "" if "{name}" in e.path else "_all")


def openapi(version: str) -> dict:
    paths: dict = {}
    for e in ENDPOINTS:
        operation: dict[str, Any] = {"summary": e.summary, "operationId": operation_id(e),
                     "responses": _responses(e)}
        if "{name}" in e.path:
            operation["parameters"] = [{"name": "name", "in": "path", "required": True,
                                        "schema": {"type": "string", "pattern": r"^[^/\\.][^/\\]*$"},
                                        "description": "model file name (iris.onnx); a bare name (iris) means "
                                                       "the .onnx file"}]
        if "{version}" in e.path:
            operation["parameters"].append({"name": "version", "in": "path", "required": True,
                                            "schema": {"type": "string", "enum": ["1"]}})
        body = _request_body(e)
        if body:
            operation["requestBody"] = body
        if e.admin:
            operation["security"] = [{"bearer": []}]
            operation["responses"].update({"401": {"description": "no token (when FRACTAL_ADMIN_TOKEN is set)"},
                                           "403": {"description": "wrong token"}})
        paths.setdefault(e.path, {})[e.method.lower()] = operation
    return {
        "openapi": "3.0.3",
        "info": {"title": "FRACTAL ML Server", "version": version,
                 "description": "ONNX models over REST; every error is {\"http_status\": {code, name, "
                                "description}}."},
        "paths": paths,
        "components": {"schemas": {
            "HttpStatus": _STATUS,
            "Error": {"type": "object", "properties": {"http_status": {"$ref": "#/components/schemas/HttpStatus"}}},
            "V2Error": {"type": "object", "properties": {"error": {"type": "string"}}},
            "Tensor": {"type": "object", "properties": {"name": {"type": "string"}, "dtype": {"type": "string"},
                                                        "shape": {"type": "array", "items": {"type": "integer",
                                                                                             "nullable": True}}}},
        }, "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
    }


@dataclass(frozen=True)
class Route:
    """One path of the table with what its methods share: Falcon routes a path to one resource, and
    the token check and the error shape go by the matched path too."""

    path: str
    handler: Handler
    protocol: Shape
    public: bool


def routes(endpoints: list[Endpoint] = ENDPOINTS) -> list[Route]:
    """One Route per path, in the table's order; ValueError when a path's entries disagree on one of them."""
    found: dict[str, Route] = {}
    for e in endpoints:
        route = Route(e.path, e.handler, e.protocol, e.public)
        if found.setdefault(e.path, route) != route:
            raise ValueError(f"the entries of {e.path} disagree: {found[e.path]} and {route}")
    return list(found.values())


ROUTES = routes()  # NOTE: at import, so a table that contradicts itself never serves
