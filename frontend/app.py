"""The Falcon ASGI app factory gunicorn's uvicorn workers run in each process: `frontend.app:create_app()`."""
from __future__ import annotations

import json
import logging
import time
import uuid
from importlib import metadata
from typing import Any

import falcon
import falcon.asgi
from prometheus_client import CollectorRegistry

from broker.client import AsyncClient
from broker.curve import PeerKeys
from broker.settings import load
from metrics import FrontendMetrics, multiprocess

from . import api, errors
from .auth import TokenAuth
from .disconnect import REQUEST_KEY, CancelOnDisconnect
from .errors import status_body
from .observability import Metrics, MetricsMiddleware, StatusJson, StatusPage
from .resources import Information, Model, Models, Prediction, SendToModelhost, Static, json_bytes, welcome_body
from .settings import FrontendSettings
from .timing import RequestTiming
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

log = logging.getLogger("frontend.access")


class RequestLog:
    """X-Request-ID in (or made) and out, and one log line per request."""

    async def process_request(self, req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
        req.context.request_id = (req.get_header("X-Request-ID") or uuid.uuid4().hex)[:128]
        req.context.started = time.perf_counter()
        req.scope[REQUEST_KEY] = req  # for process_cancel, if the client goes away

    async def process_resource(self, req: falcon.asgi.Request, resp: falcon.asgi.Response, resource: object,
                               params: dict) -> None:
        req.context.model = params.get("name")  # the model a route names, for the line's `model` field

    async def process_response(self, req: falcon.asgi.Request, resp: falcon.asgi.Response, resource: object,
                               req_succeeded: bool) -> None:
        request_id = getattr(req.context, "request_id", "-")
        resp.set_header("X-Request-ID", request_id)
        self._line(req, str(resp.status)[:3])

    def process_cancel(self, req: falcon.asgi.Request) -> None:
        """The client disconnected before its answer: logged as nginx's 499, client closed request."""
        self._line(req, "499")

    @staticmethod
    def _line(req: falcon.asgi.Request, status: str) -> None:
        started = getattr(req.context, "started", time.perf_counter())
        if started is None:
            return  # already logged (a client that left while its answer was being sent)
        req.context.started = None
        latency_ms, request_id = (time.perf_counter() - started) * 1e3, getattr(req.context, "request_id", "-")
        log.info("%s %s %s %.2fms %s", req.method, req.path, status, latency_ms, request_id, extra={
            "request_id": request_id, "method": req.method, "path": req.path, "status": int(status),
            "latency_ms": round(latency_ms, 3), "model": getattr(req.context, "model", None)})


def _version() -> str:
    try:
        return metadata.version("fractal-ml-server")
    except metadata.PackageNotFoundError:
        return "0+unknown"


def _indented(body: bytes) -> bytes:
    """JSON a person reads in a terminal (GET /help): indented, still JSON."""
    return json.dumps(json.loads(body), indent=2, ensure_ascii=False).encode() + b"\n"


def create_app(settings: FrontendSettings | None = None, registry: CollectorRegistry | None = None,
               client: AsyncClient | None = None) -> CancelOnDisconnect:
    """Build the ASGI app from api.ENDPOINTS, in the gunicorn worker after it forked.

    One AsyncClient per process carries every request in flight. gunicorn calls this factory in each
    worker after the fork; the client opens its socket and reader task on its first call, inside the
    worker's running event loop (so no --preload: a ZeroMQ context must not cross a fork). Metrics go
    to `registry`, or under gunicorn to prometheus-client's multiprocess files. A caller that runs the
    app itself may pass the `client`.
    """
    settings = settings or load(FrontendSettings, "frontend")
    if registry is None and not multiprocess():
        registry = CollectorRegistry()
    client = client or AsyncClient(settings.broker, settings.service, settings.timeout_s,
                                   curve=PeerKeys.from_files(settings.curve_secret_key, settings.curve_broker_key))
    shared = (client, settings.max_body_bytes)
    resources = {
        "welcome": Static(welcome_body()),
        "help": Static(_indented(status_body(200, "OK", endpoints=api.help_entries(settings.public_url or api.BASE)))),
        "openapi": Static(json_bytes(api.openapi(_version()))),
        "sendtomodelhost": SendToModelhost(*shared), "models": Models(*shared),
        "information": Information(*shared), "model": Model(*shared), "prediction": Prediction(*shared),
        "v2_live": ServerLive(*shared), "v2_ready": ServerReady(*shared),
        "v2_server": ServerMetadata(*shared, _version()), "v2_model": ModelMetadata(*shared),
        "v2_model_ready": ModelReady(*shared), "v2_infer": Infer(*shared), "v2_index": RepositoryIndex(*shared),
        "v2_load": RepositoryLoad(*shared), "v2_unload": RepositoryUnload(*shared),
        "v2_config": ModelConfig(*shared), "v2_stats": ModelStatistics(*shared),
        "metrics": Metrics(registry), "status": StatusJson(client), "status_page": StatusPage(client),
    }
    metrics = FrontendMetrics(registry) if settings.metrics else None
    timing = ([RequestTiming(settings.server_timing, metrics.models if metrics else None)]
              if settings.server_timing or metrics else [])
    middleware: list[Any] = [*timing, RequestLog(), TokenAuth(settings.admin_token, settings.api_token)]
    if metrics:
        middleware.append(MetricsMiddleware(metrics))
    app = falcon.asgi.App(middleware=[*middleware, Lifespan(client)])
    app.req_options.strip_url_path_trailing_slash = True
    errors.install(app)
    for path in dict.fromkeys(e.path for e in api.ENDPOINTS):
        resource = resources[next(e.resource for e in api.ENDPOINTS if e.path == path)]
        app.add_route(path, resource)
    return CancelOnDisconnect(app, middleware)


class Lifespan:
    """Closes the process's broker client when the server stops."""

    def __init__(self, client: AsyncClient):
        self.client = client

    async def process_shutdown(self, scope: dict, event: dict) -> None:
        await self.client.aclose()
