"""The Falcon app factory gunicorn runs in each worker process: `frontend.app:create_app()`."""
from __future__ import annotations

import json
import logging
import time
import uuid
from importlib import metadata

import falcon
from prometheus_client import CollectorRegistry

from broker.client import Client
from broker.curve import PeerKeys
from broker.settings import load
from metrics import FrontendMetrics, multiprocess

from . import api, errors
from .auth import TokenAuth
from .errors import status_body
from .observability import Metrics, MetricsMiddleware, StatusJson, StatusPage
from .resources import (Information, Model, Models, Prediction, SendToModelhost, Static, json_bytes,
                        welcome_body)
from .settings import FrontendSettings
from .v2 import (Infer, ModelMetadata, ModelReady, RepositoryIndex, RepositoryLoad, RepositoryUnload,
                 ServerLive, ServerMetadata, ServerReady)

log = logging.getLogger("frontend.access")


class RequestLog:
    """X-Request-ID in (or made) and out, and one log line per request."""

    def process_request(self, req: falcon.Request, resp: falcon.Response) -> None:
        req.context.request_id = (req.get_header("X-Request-ID") or uuid.uuid4().hex)[:128]
        req.context.started = time.perf_counter()

    def process_response(self, req: falcon.Request, resp: falcon.Response, resource: object,
                         req_succeeded: bool) -> None:
        request_id = getattr(req.context, "request_id", "-")
        resp.set_header("X-Request-ID", request_id)
        started = getattr(req.context, "started", time.perf_counter())
        log.info("%s %s %s %.2fms %s", req.method, req.path, str(resp.status)[:3],
                 (time.perf_counter() - started) * 1e3, request_id)


def _version() -> str:
    try:
        return metadata.version("fractal-ml-server")
    except metadata.PackageNotFoundError:
        return "0+unknown"


def _indented(body: bytes) -> bytes:
    """JSON a person reads in a terminal (GET /help): indented, still JSON."""
    return json.dumps(json.loads(body), indent=2, ensure_ascii=False).encode() + b"\n"


def create_app(settings: FrontendSettings | None = None, registry: CollectorRegistry | None = None) -> falcon.App:
    """Build the app from api.ENDPOINTS; the broker client is made here, after gunicorn forked.

    Metrics go to `registry`, or under gunicorn to prometheus-client's multiprocess files.
    """
    settings = settings or load(FrontendSettings, "frontend")
    if registry is None and not multiprocess():
        registry = CollectorRegistry()
    client = Client(settings.broker, settings.service, settings.timeout_s,
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
        "metrics": Metrics(registry), "status": StatusJson(client), "status_page": StatusPage(client),
    }
    middleware = [RequestLog(), TokenAuth(settings.admin_token, settings.api_token)]
    if settings.metrics:
        middleware.append(MetricsMiddleware(FrontendMetrics(registry)))
    app = falcon.App(middleware=middleware)
    app.req_options.strip_url_path_trailing_slash = True
    errors.install(app)
    for path in dict.fromkeys(e.path for e in api.ENDPOINTS):
        resource = resources[next(e.resource for e in api.ENDPOINTS if e.path == path)]
        app.add_route(path, resource)
    return app
