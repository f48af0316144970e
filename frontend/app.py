"""The Falcon ASGI app factory gunicorn's uvicorn workers run in each process: `frontend.app:create_app()`."""
from __future__ import annotations

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
from .observe import Observe
from .parts import Parts
from .settings import FrontendSettings
from .traces import TraceRequests


def _version() -> str:
    try:
        return metadata.version("fractal-ml-server")
    except metadata.PackageNotFoundError:
        return "0+unknown"


def create_app(settings: FrontendSettings | None = None, registry: CollectorRegistry | None = None,
               client: AsyncClient | None = None) -> CancelOnDisconnect:
    """Build the ASGI app from api.ROUTES, in the gunicorn worker after it forked.

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
    metrics = FrontendMetrics(registry) if settings.metrics else FrontendMetrics.disabled()
    parts = Parts(client, settings, registry, metrics, _version())
    # NOTE: one instance per class, as entries of several paths share theirs (v2 versions, statistics)
    resources = {handler: handler(parts) for handler in dict.fromkeys(r.handler for r in api.ROUTES)}
    # NOTE: here, after gunicorn's fork: the span exporter's thread must be this process's own
    traces = [TraceRequests()] if tracing.configure("frontend", settings.tracing) else []
    # NOTE: without tokens TokenAuth checks nothing: left out, a request pays one hook call less
    auth = [TokenAuth(settings.admin_token, settings.api_token)] if settings.admin_token or settings.api_token else []
    middleware: list[Any] = [*traces, Observe(settings.server_timing, metrics), *auth]
    app = falcon.asgi.App(middleware=[*middleware, Lifespan(client)])
    app.req_options.strip_url_path_trailing_slash = True
    errors.install(app, {r.path: r.protocol for r in api.ROUTES})
    for route in api.ROUTES:
        app.add_route(route.path, resources[route.handler])
    return CancelOnDisconnect(app, middleware)


class Lifespan:
    """Closes the process's broker client when the server stops."""

    def __init__(self, client: AsyncClient):
        self.client = client

    async def process_shutdown(self, scope: dict, event: dict) -> None:
        await self.client.aclose()
        tracing.shutdown()  # export the spans still buffered
