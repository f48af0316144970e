"""What every request leaves behind: its X-Request-ID, its log line, its metrics and Server-Timing.

One middleware rather than three (request log, Server-Timing, metrics) because Falcon awaits one
coroutine per hook and middleware: merged, a request pays three hook calls instead of eight, and reads
the clock once at each end (issue 13: the frontend's CPU per request).
"""
from __future__ import annotations

import itertools
import logging
import os
import secrets
import time

import falcon.asgi

from metrics import FrontendMetrics

from .disconnect import REQUEST_KEY
from .headers import header
from .timing import HEADER, count, server_timing

log = logging.getLogger("frontend.access")
ACCESS_FORMAT = "%s %s %s %.2fms %s"

# NOTE: a made-up request id is 32 hex digits, as a uuid4's: 16 random per process, then a counter,
# so ids stay unique across processes without an os.urandom call per request.
_ID_PREFIX = secrets.token_hex(8)
_ids = itertools.count(1)


def new_request_id() -> str:
    return f"{_ID_PREFIX}{next(_ids) & 0xFFFF_FFFF_FFFF_FFFF:016x}"


class Observe:
    """Middleware, first in the chain so that the times it reports span every other middleware's work:

    - X-Request-ID in (or made) and out, and one access log line per request;
    - to `metrics` (metrics off: its no-op twin, FrontendMetrics.disabled()): requests by route template,
      method and status, latency, requests in flight, and each prediction in its model's series;
    - with `server_timing`: a Server-Timing header on a prediction that got its answer.

    A client that leaves before its answer is logged and counted once, as status 499 (process_cancel).
    """

    def __init__(self, server_timing: bool, metrics: FrontendMetrics):
        self.header = server_timing
        self.metrics = metrics
        self.models = metrics.models
        self.timed = server_timing or metrics.timed  # does a prediction fill a timing map?
        self._record, self._log_start = _record_template()

    async def process_request(self, req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
        context = req.context
        context.request_id = (header(req, b"x-request-id") or new_request_id())[:128]
        context.timing = {} if self.timed else None
        req.scope[REQUEST_KEY] = req  # for process_cancel, if the client goes away
        self.metrics.request_started()
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
        self.metrics.request_done(req.uri_template, req.method, status, elapsed_s)
        if log.isEnabledFor(logging.INFO):
            self._log(req, context, status, elapsed_s * 1e3)

    def _log(self, req: falcon.asgi.Request, context: object, status: str, latency_ms: float) -> None:
        """The access line, as `log.info(ACCESS_FORMAT, ..., extra=...)` would make it, for less.

        NOTE: Logger.info's makeRecord and LogRecord.__init__ recompute per line what is the same on
        every access line (file and module names, pid, level name); this copies them from a template made
        once per process, sets the rest, and hands the record to `log.handle`, which applies the logger's
        filters and handlers as `info` does: text and JSON lines come out as before (issue 13).
        """
        request_id, method, path = getattr(context, "request_id", "-"), req.method, req.path
        record = _new_record(logging.LogRecord)
        fields = record.__dict__
        fields.update(self._record)
        now = time.time()
        fields["created"] = now
        fields["msecs"] = int((now - int(now)) * 1000) + 0.0
        fields["relativeCreated"] = (now - self._log_start) * 1000
        fields["args"] = (method, path, status, latency_ms, request_id)
        fields["request_id"], fields["method"], fields["path"] = request_id, method, path
        fields["status"], fields["latency_ms"] = int(status), round(latency_ms, 3)
        fields["model"] = getattr(context, "model", None)
        log.handle(record)


_new_record = object.__new__


def _record_template() -> tuple[dict, float]:
    """What every access record holds whatever the request, made in the serving process (its pid),
    and when logging started (the origin of relativeCreated)."""
    record = log.makeRecord(log.name, logging.INFO, "(unknown file)", 0, ACCESS_FORMAT, (), None,
                            "(unknown function)")
    fields = dict(record.__dict__)
    fields["process"] = os.getpid()
    return fields, record.created - record.relativeCreated / 1000
