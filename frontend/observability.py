"""Operators' endpoints: /metrics, /api/v1/status (JSON) and /status (a page that refreshes itself)."""
from __future__ import annotations

import html
import time

import falcon
import falcon.asgi
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry

from broker.client import AsyncClient
from metrics import FrontendMetrics, exposition

from .errors import status_body

METHODS = frozenset({"GET", "POST", "PUT", "DELETE", "HEAD", "OPTIONS", "PATCH"})


class MetricsMiddleware:
    """Requests by route template, method and status; latency; requests in flight."""

    def __init__(self, metrics: FrontendMetrics):
        self.m = metrics
        self._bound: dict[tuple, tuple] = {}  # (route, method, status) -> label children, made once

    async def process_request(self, req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
        req.context.metrics_started = time.perf_counter()
        self.m.in_flight.inc()

    async def process_response(self, req: falcon.asgi.Request, resp: falcon.asgi.Response, resource: object,
                               req_succeeded: bool) -> None:
        self._count(req, str(resp.status)[:3])

    def process_cancel(self, req: falcon.asgi.Request) -> None:
        """The client disconnected before its answer: counted as status 499 (client closed request)."""
        self._count(req, "499")

    def _count(self, req: falcon.asgi.Request, status: str) -> None:
        started = getattr(req.context, "metrics_started", None)
        if started is None:
            return  # not started, or already counted
        req.context.metrics_started = None
        self.m.in_flight.dec()
        method = req.method if req.method in METHODS else "OTHER"  # clients choose methods: bound them
        key = (req.uri_template or "unmatched", method, status)
        bound = self._bound.get(key)
        if bound is None:
            bound = self._bound[key] = (self.m.requests.labels(*key), self.m.duration.labels(*key[:2]))
        bound[0].inc()
        bound[1].observe(time.perf_counter() - started)


class Metrics:
    def __init__(self, registry: CollectorRegistry | None):
        self._registry = registry  # None: multiprocess mode, read every gunicorn worker's files

    async def on_get(self, req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
        # NOTE: reads every process's metric files inline; small, and scrapes are rare.
        resp.content_type = CONTENT_TYPE_LATEST
        resp.data = exposition(self._registry)


async def broker_view(client: AsyncClient) -> dict:
    status = await client.broker_status()
    return status if status is not None else {"broker": {"up": False}, "workers": []}


class StatusJson:
    def __init__(self, client: AsyncClient):
        self.client = client

    async def on_get(self, req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
        view = await broker_view(self.client)
        resp.content_type = falcon.MEDIA_JSON
        resp.data = status_body(200, "OK", broker=view["broker"], workers=view["workers"])


_PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><meta http-equiv="refresh" content="2">
<title>FRACTAL ML Server status</title>
<style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:4px 10px;text-align:left}}.down{{color:#b00}}.busy{{color:#a60}}</style>
</head><body><h1>FRACTAL ML Server</h1>
<p>Broker: {broker}. Refreshes every 2 s. <a href="/api/v1/status">JSON</a> · <a href="/metrics">metrics</a></p>
<h2>Services</h2><table><tr><th>service</th><th>workers</th><th>idle</th><th>queued</th></tr>{services}</table>
<h2>Workers</h2><table><tr><th>node</th><th>state</th><th>last heartbeat</th><th>requests served</th>
<th>models resident</th><th>memory</th></tr>{workers}</table></body></html>
"""


def _cell(value: object) -> str:
    return f"<td>{html.escape('—' if value is None else str(value))}</td>"


def _worker_row(w: dict) -> str:
    models = ", ".join(w["models_resident"]) if w["models_resident"] is not None else None
    memory = f"{w['memory_rss_bytes'] / 2**20:.0f} MiB" if w["memory_rss_bytes"] else None
    return (f"<tr>{_cell(w['node'] or w['identity'])}<td class=\"{w['state']}\">{w['state']}</td>"
            f"{_cell(str(w['heartbeat_age_s']) + ' s ago')}{_cell(w['requests_served'])}{_cell(models)}"
            f"{_cell(memory)}</tr>")


def render_page(view: dict) -> str:
    broker = view["broker"]
    services = "".join(f"<tr>{_cell(name)}{_cell(s['workers'])}{_cell(s['idle'])}{_cell(s['queued'])}</tr>"
                       for name, s in sorted(broker.get("services", {}).items()))
    workers = "".join(_worker_row(w) for w in view["workers"])
    state = (f"up for {broker['uptime_s']:.0f} s" if broker.get("up")
             else '<span class="down">unreachable</span>')
    return _PAGE.format(broker=state, services=services, workers=workers)


class StatusPage:
    def __init__(self, client: AsyncClient):
        self.client = client

    async def on_get(self, req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
        resp.content_type = falcon.MEDIA_HTML
        resp.text = render_page(await broker_view(self.client))
