"""Client disconnects cancel the request: an ASGI wrapper around the Falcon app.

uvicorn does not cancel an app whose HTTP client went away; it only answers a later receive() with
http.disconnect. So once the app has the whole request body (the last http.request event), a watcher
task waits on receive(); if the client goes before the response is complete, the request's task is
cancelled where it waits (a broker call: its pending future is cancelled and forgotten), and the
middlewares' `process_cancel(req)` hooks count and log it, since Falcon skips process_response for a
cancelled request. Later receive() calls of the app get the watcher's event, so receive() never has two
callers at once.

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


def _announces_body(scope: Scope) -> bool:
    for name, value in scope["headers"]:  # uvicorn gives lower-case names
        if name == b"content-length":
            return value.strip() != b"0"
        if name == b"transfer-encoding":
            return True
    return False


class _Exchange:
    """One HTTP exchange: the app's receive and send, and the watcher that notices a client leaving."""

    __slots__ = ("_receive", "_send", "_task", "_head", "watcher", "responded", "gone")

    def __init__(self, receive: Receive, send: Send, task: asyncio.Task, body: bool):
        self._receive, self._send, self._task = receive, send, task
        self._head = body  # an empty first event is still to be given
        self.watcher: asyncio.Task | None = None
        self.responded = False
        self.gone = False

    async def receive(self) -> Message:
        if self._head:
            self._head = False
            return {"type": "http.request", "body": b"", "more_body": True}
        if self.watcher is not None:
            # NOTE: the body is complete; the only event left is the disconnect the watcher awaits.
            return await asyncio.shield(self.watcher)
        message = await self._receive()
        if message["type"] == "http.request" and not message.get("more_body", False):
            self.watcher = asyncio.ensure_future(self._watch())
        return message

    async def send(self, message: Message) -> None:
        if message["type"] == "http.response.body" and not message.get("more_body", False):
            self.responded = True  # before the send: uvicorn wakes receive() when the response completes
        await self._send(message)

    async def _watch(self) -> Message:
        message = await self._receive()
        if message["type"] == "http.disconnect" and not self.responded:
            self.gone = True
            self._task.cancel()
        return message

    def close(self) -> None:
        if self.watcher is not None and not self.watcher.done():
            self.watcher.cancel()


class CancelOnDisconnect:
    """ASGI app: `app` with each HTTP request cancelled when its client disconnects."""

    def __init__(self, app: Callable[[Scope, Receive, Send], Awaitable[None]], hooks: list[Any]):
        self.app = app
        self._hooks = [h.process_cancel for h in hooks if hasattr(h, "process_cancel")]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        task = asyncio.current_task()
        if task is None:  # an ASGI server always runs the app inside a task
            raise RuntimeError("CancelOnDisconnect runs inside an asyncio task")
        exchange = _Exchange(receive, send, task, _announces_body(scope))
        try:
            await self.app(scope, exchange.receive, exchange.send)
        except asyncio.CancelledError:
            if not exchange.gone:
                raise  # the server is stopping: not ours to swallow
            task.uncancel()
            self._cancelled(scope)
        finally:
            exchange.close()
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
