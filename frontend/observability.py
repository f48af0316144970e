"""Operators' endpoints: /metrics, /api/v1/status (JSON) and /status (a page that refreshes itself)."""
from __future__ import annotations

import html

import falcon
import falcon.asgi
from prometheus_client import CONTENT_TYPE_LATEST

from broker.client import AsyncClient
from metrics import exposition

from .errors import status_body
from .parts import Parts


class Metrics:
    def __init__(self, parts: Parts):
        self._registry = parts.registry  # None: multiprocess mode, read every gunicorn worker's files
        # writes this process's updates kept for the loop turn (metrics/tally.py)
        self._flush = parts.metrics.tally.flush

    async def on_get(self, req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
        self._flush()
        # NOTE: reads every process's metric files inline; small, and scrapes are rare.
        resp.content_type = CONTENT_TYPE_LATEST
        resp.data = exposition(self._registry)


async def broker_view(client: AsyncClient) -> dict:
    status = await client.broker_status()
    return status if status is not None else {"broker": {"up": False}, "workers": []}


def residency(workers: list[dict]) -> dict[str, list[dict]]:
    """{model: [{"node", "bytes", "pinned"}]}: where each model is resident, from each node's freshest
    status (a process with several connections is several rows with one node)."""
    freshest: dict[str, dict] = {}
    for w in workers:
        node, age = w.get("node"), w.get("status_age_s")
        if node and age is not None and (node not in freshest or age < freshest[node]["status_age_s"]):
            freshest[node] = w
    found: dict[str, list[dict]] = {}
    for node, w in sorted(freshest.items()):
        sizes = _dict(_dict(w.get("resident_bytes")).get("models"))
        pinned = _list(w.get("models_pinned"))
        resident = _list(w.get("models_resident"))
        for model in (m for m in resident if isinstance(m, str)):
            found.setdefault(model, []).append({"node": node, "bytes": sizes.get(model), "pinned": model in pinned})
    return dict(sorted(found.items()))


def _list(value: object) -> list:
    """`value` when a worker sent a list, else []."""
    return value if isinstance(value, list) else []


def _dict(value: object) -> dict:
    """`value` when a worker sent a map, else {}: other implementations' status replies may differ."""
    return value if isinstance(value, dict) else {}


class StatusJson:
    def __init__(self, parts: Parts):
        self.client = parts.client

    async def on_get(self, req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
        view = await broker_view(self.client)
        resp.content_type = falcon.MEDIA_JSON
        resp.data = status_body(200, "OK", broker=view["broker"], workers=view["workers"],
                                residency=residency(view["workers"]))


_PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><meta http-equiv="refresh" content="2">
<title>FRACTAL ML Server status</title>
<style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:4px 10px;text-align:left}}.down{{color:#b00}}.busy{{color:#a60}}</style>
</head><body><h1>FRACTAL ML Server</h1>
<p>Broker: {broker}. Refreshes every 2 s. <a href="/api/v1/status">JSON</a> · <a href="/metrics">metrics</a></p>
<h2>Services</h2><table><tr><th>service</th><th>workers</th><th>idle</th><th>queued</th></tr>{services}</table>
<h2>Workers</h2><table><tr><th>node</th><th>state</th><th>last heartbeat</th><th>requests served</th>
<th>models resident</th><th>memory</th><th>sessions / budget</th></tr>{workers}</table>
<h2>Models resident</h2><table><tr><th>model</th><th>where (node: MiB)</th></tr>{models}</table></body></html>
"""


def _cell(value: object) -> str:
    return f"<td>{html.escape('—' if value is None else str(value))}</td>"


def _mib(n: object) -> str:
    return f"{n / 2**20:.0f} MiB" if type(n) is int else "?"


def _worker_row(w: dict) -> str:
    models = ", ".join(w["models_resident"]) if w["models_resident"] is not None else None
    memory = f"{w['memory_rss_bytes'] / 2**20:.0f} MiB" if w["memory_rss_bytes"] else None
    budget = w.get("memory_budget_bytes")
    sessions = (f"{_mib(_dict(w.get('resident_bytes')).get('total'))} of "
                f"{_mib(budget) if budget else 'unlimited'}") if budget is not None else None
    return (f"<tr>{_cell(w['node'] or w['identity'])}<td class=\"{w['state']}\">{w['state']}</td>"
            f"{_cell(str(w['heartbeat_age_s']) + ' s ago')}{_cell(w['requests_served'])}{_cell(models)}"
            f"{_cell(memory)}{_cell(sessions)}</tr>")


def _model_row(model: str, where: list[dict]) -> str:
    return f"<tr>{_cell(model)}{_cell(', '.join(_where(w) for w in where))}</tr>"


def _where(w: dict) -> str:
    return f"{w['node']}: {_mib(w['bytes'])}{' (pinned)' if w['pinned'] else ''}"


def render_page(view: dict) -> str:
    broker = view["broker"]
    services = "".join(f"<tr>{_cell(name)}{_cell(s['workers'])}{_cell(s['idle'])}{_cell(s['queued'])}</tr>"
                       for name, s in sorted(broker.get("services", {}).items()))
    workers = "".join(_worker_row(w) for w in view["workers"])
    models = "".join(_model_row(m, where) for m, where in residency(view["workers"]).items())
    state = (f"up for {broker['uptime_s']:.0f} s" if broker.get("up")
             else '<span class="down">unreachable</span>')
    return _PAGE.format(broker=state, services=services, workers=workers, models=models)


class StatusPage:
    def __init__(self, parts: Parts):
        self.client = parts.client

    async def on_get(self, req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
        resp.content_type = falcon.MEDIA_HTML
        resp.text = render_page(await broker_view(self.client))
