"""Middleware: each HTTP request's OpenTelemetry span, continuing the caller's W3C traceparent.

In the chain only when tracing is on (metrics/tracing.py), first, so that its span covers every other
middleware's work; the broker calls a resource makes while it runs are its children (frontend/timing.py).
"""
from __future__ import annotations

import socket

import falcon.asgi

from metrics import tracing

_NODE = socket.gethostname()


class TraceRequests:
    """Start the request's span from its `traceparent` header (or a new trace), end it with the status."""

    async def process_request(self, req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
        req.context.trace = tracing.ServerSpan(req.method, req.get_header("traceparent"), req.get_header("tracestate"),
                                               {"http.request.method": req.method, "url.path": req.path,
                                                tracing.NODE: _NODE})

    async def process_resource(self, req: falcon.asgi.Request, resp: falcon.asgi.Response, resource: object,
                               params: dict) -> None:
        trace = getattr(req.context, "trace", None)
        if trace is not None and req.uri_template:
            trace.span.update_name(f"{req.method} {req.uri_template}")  # semantic conventions: method and route
            trace.span.set_attribute("http.route", req.uri_template)
            if params.get("name"):
                trace.span.set_attribute(tracing.MODEL, params["name"])
            if params.get("version"):
                trace.span.set_attribute(tracing.VERSION, params["version"])

    async def process_response(self, req: falcon.asgi.Request, resp: falcon.asgi.Response, resource: object,
                               req_succeeded: bool) -> None:
        status = int(str(resp.status)[:3])
        self._end(req, "ok" if status < 400 else f"http {status}", status)

    def process_cancel(self, req: falcon.asgi.Request) -> None:
        """The client left before its answer (logged and counted as 499)."""
        self._end(req, "cancelled", 499)

    @staticmethod
    def _end(req: falcon.asgi.Request, outcome: str, status: int) -> None:
        trace = getattr(req.context, "trace", None)
        if trace is not None:
            req.context.trace = None
            trace.end(outcome, {"http.response.status_code": status,
                                tracing.REQUEST_ID: getattr(req.context, "request_id", "")})
