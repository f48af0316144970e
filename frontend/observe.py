"""What every request leaves behind: its X-Request-ID, its log line, its metrics and Server-Timing.

One middleware rather than three (request log, Server-Timing, metrics) because Falcon awaits one
coroutine per hook and middleware: merged, a request pays three hook calls instead of eight, and reads
the clock once at each end (issue 13: the frontend's CPU per request).
"""
from __future__ import annotations

import itertools
import logging
import secrets
import time

import falcon.asgi

from metrics import FrontendMetrics

from .disconnect import REQUEST_KEY
from .timing import HEADER, count, server_timing

log = logging.getLogger("frontend.access")

METHODS = frozenset({"GET", "POST", "PUT", "DELETE", "HEAD", "OPTIONS", "PATCH"})
# NOTE: a made-up request id is 32 hex digits, as a uuid4's: 16 random per process, then a counter,
# so ids stay unique across processes without an os.urandom call per request.
_ID_PREFIX = secrets.token_hex(8)
_ids = itertools.count(1)


def new_request_id() -> str:
    return f"{_ID_PREFIX}{next(_ids) & 0xFFFF_FFFF_FFFF_FFFF:016x}"


class Observe:
    """Middleware, first in the chain so that the times it reports span every other middleware's work:

    - X-Request-ID in (or made) and out, and one access log line per request;
    - with `metrics`: requests by route template, method and status, latency, requests in flight, and
      each prediction in its model's series;
    - with `server_timing`: a Server-Timing header on a prediction that got its answer.

    A client that leaves before its answer is logged and counted once, as status 499 (process_cancel).
    """

    def __init__(self, server_timing: bool, metrics: FrontendMetrics | None):
        self.header = server_timing
        self.metrics = metrics
        self.models = metrics.models if metrics is not None else None
        self.timed = server_timing or metrics is not None  # does a prediction fill a timing map?
        self._bound: dict[tuple, tuple] = {}  # (route, method, status) -> label children, made once

    async def process_request(self, req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
        context = req.context
        context.request_id = (req.get_header("X-Request-ID") or new_request_id())[:128]
        context.timing = {} if self.timed else None
        req.scope[REQUEST_KEY] = req  # for process_cancel, if the client goes away
        if self.metrics is not None:
            self.metrics.in_flight.inc()
        context.started = time.perf_counter()

    async def process_resource(self, req: falcon.asgi.Request, resp: falcon.asgi.Response, resource: object,
                               params: dict) -> None:
        req.context.model = params.get("name")  # the model a route names, for the line's `model` field

    async def process_response(self, req: falcon.asgi.Request, resp: falcon.asgi.Response, resource: object,
                               req_succeeded: bool) -> None:
        context = req.context
        resp.set_header("X-Request-ID", getattr(context, "request_id", "-"))
        timing = getattr(context, "timing", None)
        if timing:
            count(self.models, timing)
            if self.header and req_succeeded and "call_ms" in timing:
                started = getattr(context, "started", None)
                if started is not None:
                    resp.set_header(HEADER, server_timing((time.perf_counter() - started) * 1e3, timing))
        self._done(req, str(resp.status)[:3])

    def process_cancel(self, req: falcon.asgi.Request) -> None:
        """The client disconnected before its answer: logged and counted as nginx's 499."""
        self._done(req, "499")

    def _done(self, req: falcon.asgi.Request, status: str) -> None:
        context = req.context
        started = getattr(context, "started", None)
        if started is None:
            return  # not started, or already logged and counted (a client that left during the send)
        context.started = None
        elapsed_s = time.perf_counter() - started
        if self.metrics is not None:
            self._count(self.metrics, req, status, elapsed_s)
        if log.isEnabledFor(logging.INFO):
            latency_ms, request_id = elapsed_s * 1e3, getattr(context, "request_id", "-")
            log.info("%s %s %s %.2fms %s", req.method, req.path, status, latency_ms, request_id, extra={
                "request_id": request_id, "method": req.method, "path": req.path, "status": int(status),
                "latency_ms": round(latency_ms, 3), "model": getattr(context, "model", None)})

    def _count(self, metrics: FrontendMetrics, req: falcon.asgi.Request, status: str, elapsed_s: float) -> None:
        metrics.in_flight.dec()
        method = req.method if req.method in METHODS else "OTHER"  # clients choose methods: bound them
        key = (req.uri_template or "unmatched", method, status)
        bound = self._bound.get(key)
        if bound is None:
            bound = self._bound[key] = (metrics.requests.labels(*key), metrics.duration.labels(*key[:2]))
        bound[0].inc()
        bound[1].observe(elapsed_s)
