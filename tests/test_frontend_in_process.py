"""The REST frontend through falcon.testing (ASGI), in process: create_app's `client` seam takes an
AsyncClient on an inproc endpoint, where a real Broker and a real ModelHost run in threads of this
process. Same app, same answers as under gunicorn; no subprocess, no port."""
from __future__ import annotations

import asyncio
import dataclasses
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
from frontend import api
from frontend.app import create_app
from frontend.errors import ErrorShapes
from frontend.settings import FrontendSettings
from worker.modelhost import ModelHost
from worker.settings import WorkerSettings

from .harness import BUNDLED, copy_bundled_models, wait_for

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
    """Run `test` against a fresh app whose one AsyncClient talks to the stack; `settings` are more
    FrontendSettings fields (tokens)."""
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


# -- the endpoint table: what each entry says is what its route does ---------------------------------

TOKENS = {"api_token": "reader-token", "admin_token": "admin-token"}


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def filled(path: str) -> str:
    """A table path with its parameters filled in: a model nobody serves, so that no call changes one."""
    return path.replace("{name}", "absent.onnx").replace("{version}", "1")


def shape(r: falcon.testing.Result) -> str:
    """The shape of an error answer: "v2" ({"error": ...}) or "seed" ({"http_status": ...})."""
    keys = set(r.json) if isinstance(r.json, dict) else set()
    return {frozenset({"error"}): "v2", frozenset({"http_status"}): "seed"}.get(frozenset(keys), repr(r.text))


def error_shape(protocol: str) -> str:
    return "v2" if protocol == "v2" else "seed"  # text routes (a page, /metrics) answer errors as the seed


def multipart(field: str, data: bytes) -> dict[str, Any]:
    """simulate_request arguments for a multipart/form-data body of one file field."""
    boundary = "table-test-boundary"
    body = (f'--{boundary}\r\nContent-Disposition: form-data; name="{field}"; filename="f"\r\n'
            f"Content-Type: application/octet-stream\r\n\r\n").encode() + data + f"\r\n--{boundary}--\r\n".encode()
    return {"body": body, "headers": {"Content-Type": f"multipart/form-data; boundary={boundary}"}}


def test_public_routes_answer_without_a_token_and_every_other_needs_its_own(stack: Stack) -> None:
    async def test(c: falcon.testing.ASGIConductor) -> None:
        assert any(e.public for e in api.ENDPOINTS) and not all(e.public for e in api.ENDPOINTS)
        for e in api.ENDPOINTS:
            where = (e.method, e.path)
            r = await c.simulate_request(e.method, filled(e.path))
            if e.public:
                assert r.status_code == 200, where
                continue
            assert r.status_code == 401 and r.headers["WWW-Authenticate"].startswith("Bearer"), where
            assert shape(r) == error_shape(e.protocol), where
            if e.admin:
                r = await c.simulate_request(e.method, filled(e.path), headers=bearer(TOKENS["api_token"]))
                assert r.status_code == 403 and shape(r) == error_shape(e.protocol), where
            token = TOKENS["admin_token" if e.admin else "api_token"]
            r = await c.simulate_request(e.method, filled(e.path), headers=bearer(token))
            assert r.status_code not in (401, 403), (where, r.status_code, r.text)  # past the check
    with_app(stack, test, **TOKENS)


def test_every_route_answers_errors_in_its_entrys_shape(stack: Stack) -> None:
    async def test(c: falcon.testing.ASGIConductor) -> None:
        assert {r.protocol for r in api.ROUTES} == {"seed", "v2", "text"}
        for route in api.ROUTES:
            r = await c.simulate_request("PATCH", filled(route.path))
            assert r.status_code == 405 and shape(r) == error_shape(route.protocol), route.path
        # no route matched: the shape the table's routes under the same first segment agree on
        for path, expected in {"/v2/nothing": "v2", "/v2/models/iris.onnx/nothing": "v2", "/api/v2/nothing": "seed",
                               "/v2x": "seed", "/metrics/x": "seed", "/no/such/route": "seed"}.items():
            r = await c.simulate_get(path)
            assert r.status_code == 404 and shape(r) == expected, path
    with_app(stack, test)


def test_the_error_shape_is_the_matched_routes_not_its_paths() -> None:
    shapes = ErrorShapes({"/v2/odd": "seed", "/v2/x": "v2", "/other/x": "v2", "/api/a": "seed", "/api/b": "text"})

    def of(path: str, template: str | None) -> str:
        req = falcon.testing.create_asgi_req(path=path)
        req.uri_template = template
        return shapes.of(req)

    assert of("/v2/odd", "/v2/odd") == "seed" and of("/v2/x", "/v2/x") == "v2"
    assert of("/other/x", "/other/x") == "v2" and of("/other/y", None) == "v2"  # the routes there agree
    assert of("/v2/y", None) == "seed"  # they disagree: the seed's
    assert of("/api/c", None) == "seed" and of("/elsewhere", None) == "seed"


def test_each_multipart_route_takes_the_form_field_its_entry_and_openapi_name(stack: Stack) -> None:
    uploads = {"PUT": ("table-upload.onnx", (BUNDLED / "iris.onnx").read_bytes())}
    predicts = ("digits.onnx", (BUNDLED / "digits_sample.png").read_bytes())

    async def test(c: falcon.testing.ASGIConductor) -> None:
        doc = (await c.simulate_get("/openapi.json")).json
        forms = [e for e in api.ENDPOINTS if api.MULTIPART in e.requests]
        assert {e.form_field for e in forms} == {"path", "file"}
        for e in forms:
            where = (e.method, e.path)
            body = doc["paths"][e.path][e.method.lower()]["requestBody"]["content"]
            fields = body[api.MULTIPART]["schema"]["properties"]
            assert list(fields) == [e.form_field, *e.form_extra], where
            assert fields[e.form_field] == {"type": "string", "format": "binary"}, where
            r = await c.simulate_request(e.method, filled(e.path), **multipart("other", b"x"))
            assert r.status_code == 400 and repr(e.form_field) in r.json["http_status"]["description"], where
            name, data = uploads.get(e.method, predicts)
            r = await c.simulate_request(e.method, e.path.replace("{name}", name), **multipart(e.form_field, data))
            assert r.status_code == 200, (where, r.text)
            if e.method == "PUT":
                assert (await c.simulate_delete(f"/api/v1/models/{name}")).status_code == 200
            else:
                assert r.json["values"] == [8]  # the sample is a handwritten 8
    with_app(stack, test)


def test_a_table_that_contradicts_itself_does_not_build() -> None:
    welcome = api.ENDPOINTS[0]
    with pytest.raises(ValueError, match="disagree"):
        api.routes([welcome, dataclasses.replace(welcome, method="POST", public=not welcome.public)])
    with pytest.raises(ValueError, match="form_field"):
        dataclasses.replace(welcome, requests=(api.MULTIPART,))
    with pytest.raises(ValueError, match="no OpenAPI schema"):
        dataclasses.replace(welcome, requests=("image/png",))
    assert [r.path for r in api.routes()] == list(dict.fromkeys(e.path for e in api.ENDPOINTS))
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
