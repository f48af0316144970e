"""The Falcon ASGI app factory gunicorn's uvicorn workers run in each process: `frontend.app:create_app()`."""
from __future__ import annotations

import json
from importlib import metadata
from typing import Any

import falcon
import falcon.asgi
from prometheus_client import CollectorRegistry

from broker.client import AsyncClient
from broker.curve import PeerKeys
from broker.settings import load
from metrics import FrontendMetrics, multiprocess, tracing

from . import api, errors
from .auth import TokenAuth
from .disconnect import CancelOnDisconnect
from .errors import status_body
from .observability import Metrics, StatusJson, StatusPage
from .observe import Observe
from .resources import Information, Model, Models, Prediction, SendToModelhost, Static, json_bytes, welcome_body
from .settings import FrontendSettings
from .traces import TraceRequests
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
    metrics = FrontendMetrics(registry) if settings.metrics else FrontendMetrics.disabled()
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
        "metrics": Metrics(registry, metrics.tally.flush),
        "status": StatusJson(client), "status_page": StatusPage(client),
    }
    # NOTE: here, after gunicorn's fork: the span exporter's thread must be this process's own
    traces = [TraceRequests()] if tracing.configure("frontend", settings.tracing) else []
    middleware: list[Any] = [*traces, Observe(settings.server_timing, metrics),
                             TokenAuth(settings.admin_token, settings.api_token)]
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
        tracing.shutdown()  # export the spans still buffered
