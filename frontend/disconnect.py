"""Client disconnects cancel the request: what the app does with the cancellation.

uvicorn does not cancel an app whose HTTP client went away; it only answers a later receive() with
http.disconnect. The frontend's own worker class (frontend/http_worker.py) cancels the request's task
where the connection is lost, if the response is not complete, and marks the scope CLIENT_GONE first. The
request is cancelled where it waits (a broker call: its pending future is cancelled and forgotten), and
this wrapper turns that cancellation into the middlewares' `process_cancel(req)` hooks, which count and
log it (Falcon skips process_response for a cancelled request). Any other cancellation (the server
stopping) is not ours to swallow. Under another worker class a disconnected client's request runs to its
end.

It also hands Falcon, which awaits a first http.request event before it routes, an empty one at once
when a body is announced: uvicorn's receive() waits for body bytes, and a request refused from its
headers alone (413 from Content-Length, 401, 404) must be answered without them, as gunicorn's
threaded workers did.
"""
from __future__ import annotations

import asyncio
import logging
from typing import Any, Awaitable, Callable

log = logging.getLogger(__name__)

Scope = dict
Message = dict
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

REQUEST_KEY = "fractal.request"  # scope key where middleware leaves the falcon Request for process_cancel


CLIENT_GONE = "fractal.client_gone"  # scope key: set by the worker's protocol just before it cancels


def _announces_body(scope: Scope) -> bool:
    for name, value in scope["headers"]:  # uvicorn gives lower-case names
        if name == b"content-length":
            return value.strip() != b"0"
        if name == b"transfer-encoding":
            return True
    return False


class _EmptyFirst:
    """receive() that answers an empty, unfinished http.request first, then the server's events."""

    __slots__ = ("_receive", "_head")

    def __init__(self, receive: Receive):
        self._receive = receive
        self._head = True

    async def __call__(self) -> Message:
        if self._head:
            self._head = False
            return {"type": "http.request", "body": b"", "more_body": True}
        return await self._receive()


class CancelOnDisconnect:
    """ASGI app: `app`, with a request its client abandoned counted and logged instead of raised."""

    def __init__(self, app: Callable[[Scope, Receive, Send], Awaitable[None]], hooks: list[Any]):
        self.app = app
        self._hooks = [h.process_cancel for h in hooks if hasattr(h, "process_cancel")]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        try:
            await self.app(scope, _EmptyFirst(receive) if _announces_body(scope) else receive, send)
        except asyncio.CancelledError:
            if not scope.get(CLIENT_GONE):
                raise  # the server is stopping: not ours to swallow
            task = asyncio.current_task()
            if task is not None:
                task.uncancel()
            self._cancelled(scope)
        finally:
            scope.pop(REQUEST_KEY, None)  # NOTE: the request refers to its scope: no cycle left for the GC

    def _cancelled(self, scope: Scope) -> None:
        req = scope.get(REQUEST_KEY)
        if req is None:
            return
        for hook in self._hooks:
            try:
                hook(req)
            except Exception:
                log.exception("process_cancel hook failed")
