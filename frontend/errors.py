"""The one place errors become HTTP: the seed's {"http_status": {code, name, description}}, or on an Open
Inference Protocol route its {"error": "..."}."""
from __future__ import annotations

import http
import logging
import uuid
from typing import Mapping

import falcon
import falcon.asgi
import orjson

from broker.errors import FractalError

log = logging.getLogger(__name__)
# NOTE: HTTPStatus(code).phrase is an enum lookup (0.5 µs) on every answer: read once (issue 13)
_PHRASES = {status.value: status.phrase for status in http.HTTPStatus}


def status_body(code: int, description: str, /, **extra: object) -> bytes:
    """The seed's response shape; `extra` fields follow http_status (e.g. model_list, values).

    Positional-only, so a result with its own "description" (a model's) cannot replace the status's.
    """
    phrase = _PHRASES.get(code)
    status = {"code": code, "description": description, "name": phrase or http.HTTPStatus(code).phrase}
    body: dict[str, object] = {"http_status": status}
    body.update(extra)
    return orjson.dumps(body, option=orjson.OPT_NON_STR_KEYS)  # NOTE: non-finite floats become null


class ErrorShapes:
    """Which shape an error answer takes: "v2" is the Open Inference Protocol's {"error": "..."}, any other
    shape the seed's. A request takes its matched route's shape (api.Route.protocol, by Falcon's
    `req.uri_template`); one that matched no route (a 404, or an error before routing) takes the shape its
    path's first segment has in the table when every route there agrees (so /v2/anything answers as
    v2), else the seed's."""

    def __init__(self, by_route: Mapping[str, str]):
        self._by_route = dict(by_route)
        roots: dict[str, set[str]] = {}
        for path, shape in by_route.items():
            roots.setdefault(_root(path), set()).add(shape)
        self._by_root = {root: shapes.pop() for root, shapes in roots.items() if len(shapes) == 1}

    def of(self, req: falcon.asgi.Request) -> str:
        shape = self._by_route.get(req.uri_template) if req.uri_template else None
        return shape or self._by_root.get(_root(req.path), "seed")


def _root(path: str) -> str:
    """The first segment of a path: /v2/models/x -> /v2, / -> /."""
    return "/" + path.split("/", 2)[1]


class _Handlers:
    """The app's error handlers, writing each answer in its request's shape."""

    def __init__(self, shapes: ErrorShapes):
        self.shapes = shapes

    def _write(self, req: falcon.asgi.Request, resp: falcon.asgi.Response, code: int, description: str) -> None:
        resp.status = code
        resp.content_type = falcon.MEDIA_JSON
        if self.shapes.of(req) == "v2":
            resp.data = orjson.dumps({"error": description})
        else:
            resp.data = status_body(code, description)

    async def fractal_error(self, req: falcon.asgi.Request, resp: falcon.asgi.Response, ex: FractalError,
                            params: dict, ws: object = None) -> None:
        self._write(req, resp, ex.http_status, str(ex))
        for name, value in ex.headers.items():
            resp.set_header(name, value)
        if ex.retry_after_s is not None:
            resp.set_header("Retry-After", str(max(1, round(ex.retry_after_s))))

    async def http_error(self, req: falcon.asgi.Request, resp: falcon.asgi.Response, ex: falcon.HTTPError,
                         params: dict, ws: object = None) -> None:
        description = ex.description or ex.title or http.HTTPStatus(ex.status_code).phrase
        if ex.status_code == 404 and not ex.description:
            description = f"no route {req.method} {req.path}; see GET /help"
        elif ex.status_code == 405:
            allowed = dict(ex.headers or {}).get("Allow", "")
            description = f"{req.method} is not allowed on {req.path}; use {allowed}"
        self._write(req, resp, ex.status_code, description)
        for name, value in dict(ex.headers or {}).items():
            resp.set_header(name, value)

    async def unexpected(self, req: falcon.asgi.Request, resp: falcon.asgi.Response, ex: Exception, params: dict,
                         ws: object = None) -> None:
        request_id = getattr(req.context, "request_id", None) or uuid.uuid4().hex
        log.exception("request %s: %s %s failed unexpectedly", request_id, req.method, req.path)
        self._write(req, resp, 500, f"internal error; request id {request_id}")


def install(app: falcon.asgi.App, shapes: Mapping[str, str]) -> None:
    """Answer every error of `app` in its route's shape; `shapes` maps each route's path to it."""
    handlers = _Handlers(ErrorShapes(shapes))
    # NOTE: Falcon picks the most specific registered class, so the order here does not matter.
    app.add_error_handler(Exception, handlers.unexpected)
    app.add_error_handler(falcon.HTTPError, handlers.http_error)
    app.add_error_handler(FractalError, handlers.fractal_error)
