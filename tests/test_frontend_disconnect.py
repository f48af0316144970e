"""An HTTP client that goes away cancels its wait: the broker call's pending future is cancelled and
forgotten, the request counts as status 499, and the frontend keeps serving."""
from __future__ import annotations

import asyncio
import json
import re
import socket
import time
import urllib.request

import pytest
from prometheus_client import CollectorRegistry

from broker.client import AsyncClient, Client

from .harness import free_port, start_frontend, wait_busy, wait_for
from .onnx_models import slow_model, slow_steps

pytestmark = pytest.mark.slow  # starts real processes

SLOW = "slow.onnx"
PATH = f"/api/v1/models/{SLOW}/prediction"
ROUTE = "/api/v1/models/{name}/prediction"


def _body() -> bytes:
    """A prediction that computes for seconds: long enough for the client to leave during it."""
    return json.dumps({"values": [slow_steps(2.0)]}).encode()


def _request(port: int) -> bytes:
    body = _body()
    return (f"POST {PATH} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode() + body


def _upload_slow(url: str) -> None:
    with Client(url, timeout_s=30) as client:
        client.upload(SLOW, slow_model())


def _sample(registry: CollectorRegistry, name: str, **labels: str) -> float:
    return registry.get_sample_value(name, labels) or 0.0


def test_a_disconnect_cancels_the_pending_broker_call(cluster):
    """In-process uvicorn (the frontend's protocol) on the real app, so the test can see the client's pending calls."""
    import uvicorn

    from frontend.app import create_app
    from frontend.http_worker import FrontendProtocol
    from frontend.settings import FrontendSettings

    _upload_slow(cluster.url)
    port = free_port()

    async def scenario() -> None:
        registry = CollectorRegistry()
        client = AsyncClient(cluster.url, timeout_s=60)
        app = create_app(FrontendSettings(broker=cluster.url, timeout_s=60), registry, client)
        server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, http=FrontendProtocol,
                                               lifespan="on", log_config=None, access_log=False))
        serving = asyncio.ensure_future(server.serve())
        try:
            while not server.started:
                await asyncio.sleep(0.02)
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(_request(port))
            await writer.drain()
            deadline = time.monotonic() + 20
            while not client._pending and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
            assert len(client._pending) == 1, "the request never reached the broker"
            future = next(iter(client._pending.values()))
            writer.close()  # the HTTP client goes away while the model runs
            while client._pending and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
            assert not client._pending and future.cancelled()
            for _ in range(100):
                if _sample(registry, "fractal_frontend_requests_total", route=ROUTE, method="POST", status="499"):
                    break
                await asyncio.sleep(0.01)
            assert _sample(registry, "fractal_frontend_requests_total", route=ROUTE, method="POST",
                           status="499") == 1
            assert _sample(registry, "fractal_frontend_requests_in_flight") == 0
            # The process serves on, on the same client.
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write("GET /api/v1/models HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            assert (await asyncio.wait_for(reader.readline(), 30)).startswith(b"HTTP/1.1 200")
            writer.close()
        finally:
            server.should_exit = True
            await asyncio.wait_for(serving, 10)

    asyncio.run(scenario())


def test_a_disconnect_ends_the_request_early_under_gunicorn(procs, cluster):
    """Under gunicorn's uvicorn worker: the 499 is logged and counted long before the model answers."""
    _upload_slow(cluster.url)
    base = start_frontend(procs, cluster.url)
    port = int(base.rsplit(":", 1)[1])
    started = time.monotonic()
    req = urllib.request.Request(base + PATH, data=_body(), method="POST",
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as resp:
        assert resp.status == 200
    full_s = time.monotonic() - started  # one whole call of the slow model, measured here

    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(_request(port))
        wait_busy(cluster.url)  # the request is with a worker: the client leaves during the call
    frontend_log = procs.procs[-1].log_path
    pattern = re.compile(rf"POST {re.escape(PATH)} 499 ([\d.]+)ms")
    wait_for(lambda: pattern.search(open(frontend_log).read()), full_s, "the 499 line")
    cancelled_ms = float(pattern.search(open(frontend_log).read()).group(1))
    assert cancelled_ms < full_s * 1000

    with urllib.request.urlopen(base + "/metrics", timeout=10) as resp:
        text = resp.read().decode()
    line = next(row for row in text.splitlines() if row.startswith("fractal_frontend_requests_total")
                and 'status="499"' in row)
    assert float(line.rsplit(" ", 1)[1]) == 1
    with urllib.request.urlopen(base + "/api/v1/models", timeout=30) as resp:
        assert SLOW in json.loads(resp.read())["model_list"]
