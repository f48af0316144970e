"""The frontend's gunicorn worker: uvicorn's httptools protocol, with two per-request costs removed.

- A response's writes leave as one. uvicorn writes a response's head and its body with two
  `transport.write` calls, so each response cost two send(2) calls and two TCP segments. Here every write
  a connection makes in one event-loop turn is held and leaves at the end of that turn as one writev(2)
  (`transport.writelines`: no copy of the body). Nothing waits longer than the turn that wrote it, and a
  close sends what is held first.
- A client that hangs up cancels its request here, where the connection is lost. uvicorn only tells the
  app through a later receive(), which needed a watcher task per request (about 6 µs of a ~90 µs request);
  frontend/disconnect.py explains what the app does with the cancellation.
- The garbage collector is tuned for serving once the app is built (broker/heap.py).
- uvicorn's ProxyHeadersMiddleware (X-Forwarded-For and -Proto from `--forwarded-allow-ips` peers into the
  scope's client and scheme) runs only when gunicorn writes an access log (`--access-logfile`), the one
  reader of the client's address: the app reads neither, and it cost a middleware call per request.
"""
from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle
from uvicorn_worker import UvicornWorker

from broker import heap
from frontend.disconnect import CLIENT_GONE


class _TurnWrites:
    """A transport whose writes in one loop turn leave together; everything else is the real one's."""

    __slots__ = ("_transport", "_loop", "_held")

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop):
        self._transport = transport
        self._loop = loop
        self._held: list[bytes] | None = None

    def write(self, data: bytes) -> None:
        held = self._held
        if held is None:
            self._held = [data]
            self._loop.call_soon(self._flush)
        else:
            held.append(data)

    def writelines(self, lines: Any) -> None:
        for data in lines:
            self.write(data)

    def _flush(self) -> None:
        held, self._held = self._held, None
        if held:
            self._transport.writelines(held)

    def close(self) -> None:
        self._flush()
        self._transport.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


class FrontendProtocol(HttpToolsProtocol):
    """HttpToolsProtocol with turn-coalesced writes and cancellation on a lost connection."""

    _app_task: asyncio.Task | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(_TurnWrites(transport, self.loop))  # type: ignore[arg-type]

    def _start_asgi_task(self, cycle: RequestResponseCycle, app: Any) -> None:
        # NOTE: uvicorn's own body, keeping the task: one request runs at a time per connection (pipelined
        # ones wait in self.pipeline), so the last task started is the one a lost connection abandons.
        task = self.loop.create_task(cycle.run_asgi(app))
        task.add_done_callback(self.tasks.discard)
        self.tasks.add(task)
        self._app_task = task

    def connection_lost(self, exc: Exception | None) -> None:
        cycle, task = self.cycle, self._app_task
        super().connection_lost(exc)
        if cycle is not None and not cycle.response_complete and task is not None and not task.done():
            cycle.scope[CLIENT_GONE] = True  # type: ignore[literal-required]
            task.cancel()


class Worker(UvicornWorker):
    """uvicorn_worker.UvicornWorker (uvloop, httptools) speaking FrontendProtocol."""

    CONFIG_KWARGS: dict[str, Any] = {"loop": "uvloop", "http": FrontendProtocol}

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # NOTE: read when the server loads the app, after this: the access log's client address is the
        # only user of the forwarded headers (issue 13: one middleware call less per request without it).
        self.config.proxy_headers = bool(self.cfg.accesslog)

    def load_wsgi(self) -> None:
        super().load_wsgi()  # builds the app (frontend.app:create_app()), after the fork
        heap.settle()
