"""What every RPC shares with REST: request ids, bearer tokens, deadlines, errors as status codes, metrics.

Each servicer method is wrapped by `rpc(name, access)`; the method itself gets the request and a
`Call` (request id and timeout) and raises FractalErrors, never touching the gRPC context.
"""
from __future__ import annotations

import asyncio
import functools
import hmac
import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable

import grpc

from broker.errors import (
    BadInput,
    Forbidden,
    FractalError,
    ModelNotFound,
    PayloadTooLarge,
    QueueFull,
    RetryLater,
    Timeout,
    Unauthorized,
    UnsupportedMediaType,
)
from metrics import GrpcMetrics, tracing

from ..timing import count, server_timing

log = logging.getLogger("frontend.grpc.access")

OPEN, API, ADMIN = "open", "api", "admin"  # who may call: anyone, the API token, the admin token

# Most specific first: ModelUnloaded is a ModelNotFound, QueueFull (an Overloaded) a RetryLater, ProtocolError a
# BadInput.
CODES = [(Unauthorized, grpc.StatusCode.UNAUTHENTICATED), (Forbidden, grpc.StatusCode.PERMISSION_DENIED),
         (BadInput, grpc.StatusCode.INVALID_ARGUMENT), (UnsupportedMediaType, grpc.StatusCode.INVALID_ARGUMENT),
         (ModelNotFound, grpc.StatusCode.NOT_FOUND), (PayloadTooLarge, grpc.StatusCode.RESOURCE_EXHAUSTED),
         (QueueFull, grpc.StatusCode.RESOURCE_EXHAUSTED), (RetryLater, grpc.StatusCode.UNAVAILABLE),
         (Timeout, grpc.StatusCode.DEADLINE_EXCEEDED)]


def status_code(exc: FractalError) -> grpc.StatusCode:
    for cls, code in CODES:
        if isinstance(exc, cls):
            return code
    return grpc.StatusCode.INTERNAL


DEADLINE_SLACK = 0.1  # of the call's whole deadline: a reset this close to it is the client's deadline


def cancel_code(remaining_s: float | None, elapsed_s: float) -> grpc.StatusCode:
    """How a call the client ended is counted: DEADLINE_EXCEEDED when it ended at its deadline.

    The client's deadline clock starts before ours by the request's transit time, so when it fires it
    resets the stream a little before our deadline, which we would otherwise count as CANCELLED. A reset
    with less than DEADLINE_SLACK of the whole deadline left (elapsed + remaining) is that deadline."""
    if remaining_s is None:
        return grpc.StatusCode.CANCELLED
    if remaining_s <= DEADLINE_SLACK * (elapsed_s + max(remaining_s, 0.0)):
        return grpc.StatusCode.DEADLINE_EXCEEDED
    return grpc.StatusCode.CANCELLED


@dataclass(frozen=True)
class Call:
    request_id: str
    timeout_s: float   # what is left of the caller's deadline, capped by the frontend's timeout_s
    timing: dict = field(default_factory=dict)  # a ModelInfer's times (frontend/timing.py)


def _matches(presented: str, token: str) -> bool:
    return bool(token) and hmac.compare_digest(presented.encode(), token.encode())


class Calls:
    """The shared part of every call; one per server."""

    def __init__(self, timeout_s: float, admin_token: str, api_token: str, metrics: GrpcMetrics):
        self.timeout_s = timeout_s
        self.admin_token, self.api_token = admin_token, api_token
        self.metrics = metrics

    def authorize(self, access: str, header: str) -> None:
        """REST's rules (frontend/auth.py): admin calls need the admin token (or, without one, the API
        token); other calls the API token or the admin token; OPEN calls nothing."""
        if access == ADMIN and (self.admin_token or self.api_token):
            self._check(header, self.admin_token or self.api_token, "")
        elif access == API and self.api_token:
            self._check(header, self.api_token, self.admin_token)

    @staticmethod
    def _check(header: str, token: str, also: str) -> None:
        scheme, _, presented = header.partition(" ")
        if scheme.lower() != "bearer" or not presented.strip():
            raise Unauthorized("this call needs the metadata 'authorization: Bearer <token>'")
        if not (_matches(presented.strip(), token) or _matches(presented.strip(), also)):
            raise Forbidden("this token may not make this call")

    async def run(self, name: str, access: str, method: Callable[..., Awaitable[Any]], servicer: Any,
                  request: Any, context: grpc.aio.ServicerContext) -> Any:
        started = time.perf_counter()
        metadata = {m.key: m.value for m in context.invocation_metadata() or ()}
        request_id = str(metadata.get("x-request-id") or uuid.uuid4().hex)[:128]
        trailing = (("x-request-id", request_id),)
        context.set_trailing_metadata(trailing)
        code, call = grpc.StatusCode.OK, None
        # NOTE: the span is current while the method runs, so its broker calls are its children
        span = tracing.ServerSpan(f"grpc {name}", metadata.get(tracing.TRACEPARENT), metadata.get("tracestate"),
                                  {"rpc.system": "grpc", "rpc.method": name, tracing.REQUEST_ID: request_id,
                                   tracing.MODEL: _model_of(request)}) if tracing.ENABLED else None
        self.metrics.in_flight.inc()
        try:
            self.authorize(access, str(metadata.get("authorization", "")))
            remaining = context.time_remaining()
            timeout_s = self.timeout_s if remaining is None else min(self.timeout_s, remaining)
            if timeout_s <= 0:
                raise Timeout("the call's deadline passed before it started")
            call = Call(request_id, timeout_s)
            result = await method(servicer, request, call)
            if "call_ms" in call.timing:  # a prediction: the split of its time, as REST's Server-Timing
                context.set_trailing_metadata((*trailing, ("server-timing", server_timing(
                    (time.perf_counter() - started) * 1e3, call.timing))))
                count(self.metrics.models, call.timing)
            return result
        except FractalError as exc:
            if call is not None:
                count(self.metrics.models, call.timing)
            code = status_code(exc)
            message = str(exc) if code is not grpc.StatusCode.INTERNAL else f"{exc} (request id {request_id})"
            await context.abort(code, message, trailing)
        except NotImplementedError as exc:  # a call of the protocol this server does not offer
            code = grpc.StatusCode.UNIMPLEMENTED
            await context.abort(code, str(exc), trailing)
        except asyncio.CancelledError:  # the client went away, or its deadline passed first
            code = cancel_code(context.time_remaining(), time.perf_counter() - started)
            raise
        except Exception:
            code = grpc.StatusCode.INTERNAL
            log.exception("call %s: %s failed unexpectedly", request_id, name)
            await context.abort(code, f"internal error; request id {request_id}", trailing)
        finally:
            if span is not None:
                span.end("ok" if code is grpc.StatusCode.OK else code.name, {"rpc.grpc.status_code": code.value[0]})
            self.metrics.in_flight.dec()
            elapsed = time.perf_counter() - started
            self.metrics.call_done(name, code.name, elapsed)
            log.info("%s %s %.2fms %s", name, code.name, elapsed * 1e3, request_id, extra={
                "request_id": request_id, "rpc": name, "code": code.name, "latency_ms": round(elapsed * 1e3, 3),
                "model": _model_of(request) or None})


def _model_of(request: Any) -> str:
    return getattr(request, "name", None) or getattr(request, "model_name", None) or ""


def rpc(name: str, access: str = API) -> Callable:
    """Make `method(self, request, call)` a gRPC handler run through the servicer's `calls`."""
    def wrap(method: Callable[..., Awaitable[Any]]) -> Callable:
        @functools.wraps(method)
        async def handler(self: Any, request: Any, context: grpc.aio.ServicerContext) -> Any:
            return await self.calls.run(name, access, method, self, request, context)
        return handler
    return wrap
