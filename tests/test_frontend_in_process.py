"""The REST frontend through falcon.testing (ASGI), in process: create_app's `client` seam takes an
AsyncClient on an inproc endpoint, where a real Broker and a real ModelHost run in threads of this
process. Same app, same answers as under gunicorn; no subprocess, no port."""
from __future__ import annotations

import asyncio
import itertools
import json
import threading
from pathlib import Path
from typing import Any, Awaitable, Callable, Iterator

import falcon.testing
import pytest
import zmq
from prometheus_client import CollectorRegistry

from broker.broker import Broker, BrokerSettings
from broker.client import AsyncClient
from frontend.app import create_app
from frontend.settings import FrontendSettings
from worker.modelhost import ModelHost, WorkerSettings

from .harness import copy_bundled_models, wait_for

_endpoints = itertools.count()
JSON = {"Content-Type": "application/json"}


class Stack:
    """A broker and one worker on an inproc endpoint, each in a thread of this process."""

    def __init__(self, model_dir: Path):
        self.context = zmq.Context()
        self.endpoint = f"inproc://frontend-stack-{next(_endpoints)}"
        beats: dict[str, Any] = {"heartbeat_interval_s": 0.25, "metrics_port": 0}
        self.broker = Broker(BrokerSettings(bind=self.endpoint, status_interval_s=3600, **beats),
                             context=self.context)
        self.broker.bind()  # NOTE: before the worker connects: inproc has no late binding to wait for
        self.host = ModelHost(WorkerSettings(connect=self.endpoint, model_dir=str(model_dir), **beats),
                              context=self.context)
        self.threads = [threading.Thread(target=c.run, name=name, daemon=True)
                        for c, name in ((self.broker, "broker"), (self.host, "worker"))]
        for t in self.threads:
            t.start()
        wait_for(lambda: any(s.workers for s in self.broker._services.values()), 10, "the worker's READY")

    def stop(self) -> None:
        # NOTE: the worker first: its DISCONNECT needs the broker's end of the inproc pipe to leave.
        for component, thread in zip((self.host, self.broker), reversed(self.threads), strict=True):
            component.stop()
            thread.join(timeout=10)
            assert not thread.is_alive(), f"the {thread.name} thread did not stop"
        self.context.destroy(linger=0)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    s = Stack(copy_bundled_models(tmp_path_factory.mktemp("pool") / "models"))
    yield s
    s.stop()


def with_app(stack: Stack, test: Callable[[falcon.testing.ASGIConductor], Awaitable[None]],
             service: str = "modelhost", **settings: Any) -> None:
    """Run `test` against a fresh app whose one AsyncClient talks to the stack (`settings`: more
    FrontendSettings)."""
    async def main() -> None:
        client = AsyncClient(stack.endpoint, service, timeout_s=10, context=stack.context)
        # NOTE: .app, the Falcon app inside CancelOnDisconnect: falcon.testing's simulated client
        # reports a disconnect once the body is read, which that wrapper rightly takes as a hang-up.
        app = create_app(FrontendSettings(broker=stack.endpoint, service=service, timeout_s=10, **settings),
                         registry=CollectorRegistry(), client=client).app
        try:
            async with falcon.testing.ASGIConductor(app) as conductor:
                await test(conductor)
        finally:  # NOTE: also when an assert failed inside, so the stack's context can end
            await client.aclose()
    asyncio.run(main())


def test_the_seed_prediction_and_model_list(stack: Stack) -> None:
    async def test(c: falcon.testing.ASGIConductor) -> None:
        r = await c.simulate_get("/api/v1/models/iris.onnx/prediction", body=b'{"values":[2, 5, 1, 4]}',
                                 headers=JSON)
        assert r.status_code == 200 and r.json == {
            "http_status": {"code": 200, "description": "Prediction successful", "name": "OK"}, "values": [1]}
        assert r.headers["X-Request-ID"]
        rows = {"values": [[2, 5, 1, 4], [5.1, 3.5, 1.4, 0.2]], "outputs": "all"}
        r = await c.simulate_post("/api/v1/models/iris/prediction", json=rows)
        assert r.status_code == 200 and r.json["values"] == [1, 0]
        assert set(r.json["outputs"]) == {"label", "probabilities"}
        r = await c.simulate_get("/api/v1/models")
        assert r.status_code == 200 and "iris.onnx" in r.json["model_list"]
    with_app(stack, test)


def test_errors_have_the_seed_shape_and_the_v2_shape(stack: Stack) -> None:
    async def test(c: falcon.testing.ASGIConductor) -> None:
        r = await c.simulate_post("/api/v1/models/iris.onnx/prediction", body=b'{"values": [2, 5', headers=JSON)
        assert r.status_code == 400 and r.json["http_status"]["code"] == 400
        r = await c.simulate_post("/api/v1/models/irs.onnx/prediction", json={"values": [2, 5, 1, 4]})
        assert r.status_code == 404 and "iris.onnx" in r.json["http_status"]["description"]  # the closest name
        r = await c.simulate_post("/api/v1/models/iris.onnx/prediction", json={"values": [2, 5, 1]})
        assert r.status_code == 400 and "4" in r.json["http_status"]["description"]  # names the expected shape
        r = await c.simulate_post("/v2/models/nope/infer", json={"inputs": [
            {"name": "x", "shape": [1], "datatype": "FP32", "data": [1]}]})
        assert r.status_code == 404 and set(r.json) == {"error"}
        r = await c.simulate_get("/no/such/route")
        assert r.status_code == 404 and "GET /help" in r.json["http_status"]["description"]
    with_app(stack, test)


def test_a_service_without_workers_is_a_503_with_retry_after(stack: Stack) -> None:
    async def test(c: falcon.testing.ASGIConductor) -> None:
        r = await c.simulate_post("/api/v1/models/iris.onnx/prediction", json={"values": [2, 5, 1, 4]})
        assert r.status_code == 503 and r.headers["Retry-After"]
        assert json.loads(r.text)["http_status"]["code"] == 503
    with_app(stack, test, service="nobody-serves-this")


def test_metrics_off_answers_as_metrics_on_and_counts_nothing(stack: Stack) -> None:
    """Metrics off is FrontendMetrics' no-op twin: the same answers and Server-Timing; /metrics has no series."""
    seen: dict[bool, list] = {}

    def story(metrics: bool) -> Callable[[falcon.testing.ASGIConductor], Awaitable[None]]:
        async def test(c: falcon.testing.ASGIConductor) -> None:
            calls = [c.simulate_post("/api/v1/models/iris.onnx/prediction", json={"values": [2, 5, 1, 4]}),
                     c.simulate_post("/api/v1/models/iris.onnx/prediction", json={"values": [2, 5, 1]}),
                     c.simulate_post("/v2/models/iris.onnx/infer", json={"inputs": [
                         {"name": "float_input", "shape": [1, 4], "datatype": "FP32", "data": [2, 5, 1, 4]}]}),
                     c.simulate_request("BREW", "/api/v1/models")]
            answers = [await call for call in calls]
            seen[metrics] = [(r.status_code, r.json, "Server-Timing" in r.headers) for r in answers]
            text = (await c.simulate_get("/metrics")).text
            predicted = ('fractal_frontend_requests_total{method="POST",route="/api/v1/models/{name}/prediction",'
                         'status="200"} 1.0')
            if metrics:
                assert predicted in text and 'method="OTHER"' in text
                assert 'fractal_frontend_model_requests_total{model="iris.onnx",version="1"} 3.0' in text
                assert 'fractal_frontend_model_failures_total{model="iris.onnx",reason="BadInput",version="1"} 1.0' \
                    in text
            else:
                assert "fractal_frontend" not in text, text
        return test

    for metrics in (True, False):
        with_app(stack, story(metrics), metrics=metrics, server_timing=True)
    assert seen[True] == seen[False]
    assert [s[0] for s in seen[True]] == [200, 400, 200, 400] and [s[2] for s in seen[True]] == [
        True, False, True, False]
