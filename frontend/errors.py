"""The one place errors become HTTP: always the seed's {"http_status": {code, name, description}}."""
from __future__ import annotations

import http
import logging
import uuid

import falcon
import falcon.asgi
import orjson

from broker.errors import FractalError

log = logging.getLogger(__name__)


def status_body(code: int, description: str, /, **extra: object) -> bytes:
    """The seed's response shape; `extra` fields follow http_status (e.g. model_list, values).

    Positional-only, so a result with its own "description" (a model's) cannot replace the status's.
    """
    status = {"code": code, "description": description, "name": http.HTTPStatus(code).phrase}
    body: dict[str, object] = {"http_status": status}
    body.update(extra)
    return orjson.dumps(body, option=orjson.OPT_NON_STR_KEYS)  # NOTE: non-finite floats become null


def _write(req: falcon.asgi.Request, resp: falcon.asgi.Response, code: int, description: str) -> None:
    """The seed's shape, or under /v2 the Open Inference Protocol's {"error": "..."}."""
    resp.status = code
    resp.content_type = falcon.MEDIA_JSON
    if req.path == "/v2" or req.path.startswith("/v2/"):
        resp.data = orjson.dumps({"error": description})
    else:
        resp.data = status_body(code, description)


async def _fractal_error(req: falcon.asgi.Request, resp: falcon.asgi.Response, ex: FractalError, params: dict,
                         ws: object = None) -> None:
    _write(req, resp, ex.http_status, str(ex))
    for name, value in ex.headers.items():
        resp.set_header(name, value)
    if ex.retry_after_s is not None:
        resp.set_header("Retry-After", str(max(1, round(ex.retry_after_s))))


async def _http_error(req: falcon.asgi.Request, resp: falcon.asgi.Response, ex: falcon.HTTPError, params: dict,
                      ws: object = None) -> None:
    description = ex.description or ex.title or http.HTTPStatus(ex.status_code).phrase
    if ex.status_code == 404 and not ex.description:
        description = f"no route {req.method} {req.path}; see GET /help"
    elif ex.status_code == 405:
        allowed = dict(ex.headers or {}).get("Allow", "")
        description = f"{req.method} is not allowed on {req.path}; use {allowed}"
    _write(req, resp, ex.status_code, description)
    for name, value in dict(ex.headers or {}).items():
        resp.set_header(name, value)


async def _unexpected(req: falcon.asgi.Request, resp: falcon.asgi.Response, ex: Exception, params: dict,
                      ws: object = None) -> None:
    request_id = getattr(req.context, "request_id", None) or uuid.uuid4().hex
    log.exception("request %s: %s %s failed unexpectedly", request_id, req.method, req.path)
    _write(req, resp, 500, f"internal error; request id {request_id}")


def install(app: falcon.asgi.App) -> None:
    # NOTE: Falcon picks the most specific registered class, so the order here does not matter.
    app.add_error_handler(Exception, _unexpected)
    app.add_error_handler(falcon.HTTPError, _http_error)
    app.add_error_handler(FractalError, _fractal_error)
