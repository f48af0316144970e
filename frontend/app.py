"""The Falcon app factory gunicorn runs in each worker process: `frontend.app:create_app()`."""
from __future__ import annotations

import logging
import time
import uuid

import falcon

from broker.client import Client
from broker.settings import load

from . import errors
from .resources import Prediction, Welcome
from .settings import FrontendSettings

log = logging.getLogger("frontend.access")


class RequestLog:
    """X-Request-ID in (or made) and out, and one log line per request."""

    def process_request(self, req: falcon.Request, resp: falcon.Response) -> None:
        req.context.request_id = req.get_header("X-Request-ID") or uuid.uuid4().hex
        req.context.started = time.perf_counter()

    def process_response(self, req: falcon.Request, resp: falcon.Response, resource: object,
                         req_succeeded: bool) -> None:
        resp.set_header("X-Request-ID", req.context.request_id)
        log.info("%s %s %s %.2fms %s", req.method, req.path, resp.status[:3] if isinstance(resp.status, str)
                 else resp.status, (time.perf_counter() - req.context.started) * 1e3, req.context.request_id)


def create_app(settings: FrontendSettings | None = None) -> falcon.App:
    """Build the app; the broker client is made here, i.e. after gunicorn forked this process."""
    settings = settings or load(FrontendSettings, "frontend")
    client = Client(settings.broker, settings.service, settings.timeout_s)
    app = falcon.App(middleware=[RequestLog()])
    app.req_options.strip_url_path_trailing_slash = True
    errors.install(app)
    app.add_route("/", Welcome())
    app.add_route("/api/v1/models/{name}/prediction", Prediction(client, settings.max_body_bytes))
    return app
