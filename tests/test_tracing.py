"""OpenTelemetry tracing end to end: broker, workers, gunicorn and gRPC frontends with FRACTAL_TRACING on,
exporting over OTLP/HTTP to a receiver this test runs on a free local port, which decodes the spans with
opentelemetry-proto. Checks the span tree (a caller's trace id kept end to end), attributes, links from
packed and batched requests to their pack's and batch's spans, and that children fit in their parents."""
from __future__ import annotations

import asyncio
import http.server
import json
import threading
import urllib.request
from collections import defaultdict
from pathlib import Path
from typing import Iterator

import grpc
import numpy as np
import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc

from broker.client import AsyncClient

from .harness import HEARTBEAT, Processes, free_port, start_frontend, wait_for, wait_workers

pytestmark = pytest.mark.slow  # every test here starts processes

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
CALLER_SPAN = "00f067aa0ba902b7"
ROW = b'{"values": [2, 5, 1, 4]}'


class Receiver:
    """A tiny OTLP/HTTP collector: POST /v1/traces with an ExportTraceServiceRequest (protobuf)."""

    def __init__(self) -> None:
        self.spans: list[dict] = []
        self._lock = threading.Lock()
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                request = trace_service_pb2.ExportTraceServiceRequest()
                request.ParseFromString(body)
                receiver.add(request)
                answer = trace_service_pb2.ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def add(self, request: trace_service_pb2.ExportTraceServiceRequest) -> None:
        with self._lock:
            for resource_spans in request.resource_spans:
                service = next((a.value.string_value for a in resource_spans.resource.attributes
                                if a.key == "service.name"), "")
                for scope_spans in resource_spans.scope_spans:
                    for span in scope_spans.spans:
                        self.spans.append(_plain(span, service))

    def trace(self, trace_id: str) -> list[dict]:
        with self._lock:
            return [s for s in self.spans if s["trace_id"] == trace_id]

    def wait(self, predicate, what: str, timeout_s: float = 30) -> list[dict]:
        wait_for(lambda: predicate(self.snapshot()), timeout_s, what)
        return self.snapshot()

    def snapshot(self) -> list[dict]:
        with self._lock:
            return list(self.spans)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _value(any_value) -> object:
    kind = any_value.WhichOneof("value")
    return getattr(any_value, kind) if kind else None


def _plain(span, service: str) -> dict:
    return {"service": service, "name": span.name, "trace_id": span.trace_id.hex(), "span_id": span.span_id.hex(),
            "parent": span.parent_span_id.hex(), "start": span.start_time_unix_nano, "end": span.end_time_unix_nano,
            "kind": span.kind, "attributes": {a.key: _value(a.value) for a in span.attributes},
            "links": [(link.trace_id.hex(), link.span_id.hex()) for link in span.links], "status": span.status.code}


def env_for(receiver: Receiver) -> dict:
    return {"FRACTAL_TRACING": "true", "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,
            "OTEL_BSP_SCHEDULE_DELAY": "50", "OTEL_TRACES_SAMPLER": "parentbased_always_on"}


@pytest.fixture(scope="module")
def traced(tmp_path_factory) -> Iterator[dict]:
    """Broker, a batching worker, gunicorn and the gRPC frontend, all tracing to one receiver."""
    tmp = tmp_path_factory.mktemp("tracing")
    receiver = Receiver()
    procs = Processes(tmp)
    env = env_for(receiver)
    models = tmp / "models"
    models.mkdir()
    bundled = Path(__file__).resolve().parents[1] / "worker" / "models"
    for item in bundled.glob("*.onnx*"):
        (models / item.name).write_bytes(item.read_bytes())
    url = f"tcp://127.0.0.1:{free_port()}"
    try:
        procs.broker(url)
        procs.start("worker", [*_python("worker"), "--connect", url, "--model-dir", str(models), "--connections",
                               "8", "--batch-max-size", "64", "--batch-max-delay-us", "20000",
                               "--metrics-port", "0", *HEARTBEAT], env=env)
        wait_workers(url, 1)
        base = start_frontend(procs, url, FRACTAL_FRONTEND_METRICS="false", **env)
        grpc_port = free_port()
        procs.start("grpc", [*_python("frontend.oip_grpc"), "--broker", url, "--port", str(grpc_port),
                             "--metrics-port", "0"], env=env)
        channel = grpc.insecure_channel(f"127.0.0.1:{grpc_port}")
        grpc.channel_ready_future(channel).result(timeout=60)
        yield {"receiver": receiver, "base": base, "url": url, "grpc": service_pb2_grpc.GRPCInferenceServiceStub(
            channel), "procs": procs, "models": models}
        channel.close()
    finally:
        procs.stop_all()
        receiver.close()


def _python(module: str) -> list[str]:
    import sys
    return [sys.executable, "-m", module]


def by_name(spans: list[dict]) -> dict[str, list[dict]]:
    named: dict[str, list[dict]] = defaultdict(list)
    for span in spans:
        named[span["name"]].append(span)
    return named


def inside(child: dict, parent: dict) -> bool:
    return parent["start"] <= child["start"] <= child["end"] <= parent["end"]


def assert_worker_tree(spans: list[dict], parent: dict) -> dict:
    """The worker's span under `parent`, its phases its children and inside it, in order; returns it."""
    named = by_name(spans)
    worker = next(s for s in named["worker predict"] if s["parent"] == parent["span_id"])
    assert worker["service"] == "fractal-worker"
    attributes = worker["attributes"]
    assert attributes["fractal.model"] == "iris.onnx" and attributes["fractal.outcome"] == "ok"
    assert attributes["fractal.node"] and attributes["fractal.batch.size"] >= 1
    phases = sorted((s for s in spans if s["parent"] == worker["span_id"]), key=lambda s: s["start"])
    names = [s["name"] for s in phases]
    assert names[0] == "decode" and names[-1] == "encode" and "inference" in names, names
    assert all(inside(s, worker) for s in phases), (worker, phases)
    assert all(a["end"] <= b["start"] for a, b in zip(phases, phases[1:], strict=False)), phases  # one after another
    return worker


def test_a_rest_prediction_keeps_the_callers_trace_through_frontend_and_worker(traced):
    receiver = traced["receiver"]
    req = urllib.request.Request(traced["base"] + "/api/v1/models/iris/prediction", data=ROW, method="POST",
                                 headers={"Content-Type": "application/json", "X-Request-ID": "trace-rest-1",
                                          "traceparent": f"00-{TRACE_ID}-{CALLER_SPAN}-01"})
    with urllib.request.urlopen(req, timeout=20) as resp:
        assert json.loads(resp.read())["values"] == [1]
    spans = receiver.wait(lambda s: {"worker predict", "POST /api/v1/models/{name}/prediction"}
                          <= {x["name"] for x in s if x["trace_id"] == TRACE_ID}, "the REST trace")
    spans = receiver.trace(TRACE_ID)
    named = by_name(spans)
    server = named["POST /api/v1/models/{name}/prediction"][0]
    assert server["parent"] == CALLER_SPAN and server["service"] == "fractal-frontend"
    assert server["attributes"]["http.response.status_code"] == 200
    assert server["attributes"]["fractal.request_id"] == "trace-rest-1"
    assert server["attributes"]["fractal.model"] == "iris" and server["attributes"]["fractal.outcome"] == "ok"
    call = named["broker predict"][0]
    assert call["parent"] == server["span_id"] and inside(call, server)
    assert call["attributes"]["fractal.model"] == "iris.onnx"
    queue = named["broker queue"][0]
    assert queue["parent"] == call["span_id"] and inside(queue, call)
    worker = assert_worker_tree(spans, call)
    assert worker["attributes"]["fractal.request_id"] == "trace-rest-1"
    # One host, one clock here: the worker's time sits inside the call that waited for it.
    assert inside(worker, call)


def test_a_request_without_traceparent_starts_a_new_trace(traced):
    receiver = traced["receiver"]
    req = urllib.request.Request(traced["base"] + "/v2/models/iris/infer", method="POST",
                                 data=json.dumps({"inputs": [{"name": "float_input", "shape": [1, 4],
                                                              "datatype": "FP32", "data": [2, 5, 1, 4]}]}).encode(),
                                 headers={"Content-Type": "application/json", "X-Request-ID": "trace-v2-1"})
    with urllib.request.urlopen(req, timeout=20) as resp:
        resp.read()

    def server_span(spans: list[dict]) -> dict | None:
        return next((s for s in spans if s["attributes"].get("fractal.request_id") == "trace-v2-1"
                     and s["service"] == "fractal-frontend"), None)
    spans = receiver.wait(lambda s: server_span(s) is not None and any(
        x["name"] == "worker predict" and x["trace_id"] == server_span(s)["trace_id"] for x in s), "the v2 trace")
    server = server_span(spans)
    assert server["parent"] == "" and server["trace_id"] != TRACE_ID
    assert server["name"] == "POST /v2/models/{name}/infer"
    trace = receiver.trace(server["trace_id"])
    call = next(s for s in trace if s["name"] == "broker predict")
    assert call["parent"] == server["span_id"]
    assert_worker_tree(trace, call)


def test_a_grpc_call_keeps_the_callers_trace_from_its_metadata(traced):
    receiver = traced["receiver"]
    trace_id = "0af7651916cd43dd8448eb211c80319c"
    row = pb.InferTensorContents(fp32_contents=[2, 5, 1, 4])
    request = pb.ModelInferRequest(model_name="iris", inputs=[pb.ModelInferRequest.InferInputTensor(
        name="float_input", datatype="FP32", shape=[1, 4], contents=row)])
    traced["grpc"].ModelInfer(request, timeout=20, metadata=(("traceparent", f"00-{trace_id}-b7ad6b7169203331-01"),))
    receiver.wait(lambda s: {"grpc ModelInfer", "worker predict"} <= {x["name"] for x in s
                                                                     if x["trace_id"] == trace_id}, "the gRPC trace")
    spans = receiver.trace(trace_id)
    named = by_name(spans)
    server = named["grpc ModelInfer"][0]
    assert server["parent"] == "b7ad6b7169203331" and server["service"] == "fractal-grpc"
    assert server["attributes"]["rpc.grpc.status_code"] == 0 and server["attributes"]["fractal.model"] == "iris"
    call = named["broker predict"][0]
    assert call["parent"] == server["span_id"] and inside(call, server)
    assert_worker_tree(spans, call)


def test_a_failed_prediction_says_why_in_every_tier(traced):
    receiver = traced["receiver"]
    trace_id = "11111111111111111111111111111111"
    req = urllib.request.Request(traced["base"] + "/api/v1/models/iris/prediction", method="POST",
                                 data=b'{"values": [1, 2]}', headers={
                                     "Content-Type": "application/json",
                                     "traceparent": f"00-{trace_id}-2222222222222222-01"})
    with pytest.raises(urllib.error.HTTPError) as failed:
        urllib.request.urlopen(req, timeout=20)
    assert failed.value.code == 400
    receiver.wait(lambda s: {"worker predict", "POST /api/v1/models/{name}/prediction"}
                  <= {x["name"] for x in s if x["trace_id"] == trace_id}, "the failed request's trace")
    named = by_name(receiver.trace(trace_id))
    assert named["POST /api/v1/models/{name}/prediction"][0]["attributes"]["fractal.outcome"] == "http 400"
    assert named["broker predict"][0]["attributes"]["fractal.outcome"] == "BadInput"
    worker = named["worker predict"][0]
    assert worker["attributes"]["fractal.outcome"] == "BadInput" and worker["status"] == 2  # STATUS_CODE_ERROR


def test_spans_carry_the_version_that_served_not_the_one_asked_for(traced):
    """A request naming no version is served by the newest: every tier's span says which, the frontend's
    from the reply; a request naming one says that one."""
    from .onnx_models import constant_model
    receiver = traced["receiver"]
    for version in (1, 2):
        target = traced["models"] / "vm" / str(version) / "model.onnx"
        target.parent.mkdir(parents=True)
        target.write_bytes(constant_model(float(version)))
    asked = {"77777777777777777777777777777777": ("/api/v1/models/vm/prediction",
                                                  "POST /api/v1/models/{name}/prediction"),
             "88888888888888888888888888888888": ("/v2/models/vm/versions/2/infer",
                                                  "POST /v2/models/{name}/versions/{version}/infer")}
    bodies = {"/api/v1/models/vm/prediction": b'{"values": [0]}',
              "/v2/models/vm/versions/2/infer": json.dumps({"inputs": [{"name": "x", "shape": [1, 1],
                                                                        "datatype": "FP32", "data": [0]}]}).encode()}
    for trace_id, (path, _) in asked.items():
        req = urllib.request.Request(traced["base"] + path, data=bodies[path], method="POST", headers={
            "Content-Type": "application/json", "traceparent": f"00-{trace_id}-9999999999999999-01"})
        with urllib.request.urlopen(req, timeout=20) as resp:
            answer = json.loads(resp.read())
        values = answer["values"] if "values" in answer else answer["outputs"][0]["data"]
        assert np.asarray(values, np.float32).ravel().tolist() == [2.0], answer  # version 2 answered
    for trace_id, (_, route) in asked.items():
        receiver.wait(lambda s, t=trace_id, r=route: {"worker predict", r} <= {x["name"] for x in s
                                                                              if x["trace_id"] == t}, route)
        named = by_name(receiver.trace(trace_id))
        for name in (route, "broker predict", "worker predict"):
            assert named[name][0]["attributes"]["fractal.model.version"] == "2", (name, named[name][0])
        batch = named["inference"][0]["links"]
        if batch:  # batched: its batch's span names the version it ran too
            spans = {s["span_id"]: s for s in receiver.snapshot()}
            assert spans[batch[0][1]]["attributes"]["fractal.model.version"] == "2"


def test_packed_and_batched_requests_link_to_their_pack_and_batch(traced):
    """A direct client in a traced process: its concurrent calls leave as one pack, which the worker
    runs as one batch; each request's span is in its caller's trace and links to both."""
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from metrics import tracing
    receiver, exporter = traced["receiver"], InMemorySpanExporter()
    assert tracing.configure("test", True, exporter=exporter)
    try:
        parents = asyncio.run(_packed_calls(traced["url"], 6))
    finally:
        tracing.shutdown()
    trace_ids = {p.trace_id for p in parents}
    assert len(trace_ids) == 6
    spans = receiver.wait(lambda s: sum(x["name"] == "worker predict" and x["trace_id"] in trace_ids
                                        for x in s) == 6, "six traced requests")
    workers = [s for s in spans if s["name"] == "worker predict" and s["trace_id"] in trace_ids]
    assert {(w["trace_id"], w["parent"]) for w in workers} == {(p.trace_id, p.span_id) for p in parents}
    by_id = {s["span_id"]: s for s in spans}
    for worker in workers:
        linked = {by_id[span_id]["name"] for _, span_id in worker["links"] if span_id in by_id}
        assert linked == {"worker pack", "batch inference"}, worker
        assert worker["attributes"]["fractal.batch.size"] == 6
        inference = next(s for s in spans if s["parent"] == worker["span_id"] and s["name"] == "inference")
        batch = next(by_id[i] for _, i in inference["links"])
        assert batch["name"] == "batch inference" and batch["attributes"]["fractal.batch.size"] == 6
        assert batch["attributes"]["fractal.batch.requests"] == 6
    packs = {by_id[i]["span_id"] for w in workers for _, i in w["links"] if by_id[i]["name"] == "worker pack"}
    assert len(packs) == 1 and by_id[packs.pop()]["attributes"]["fractal.batch.requests"] == 6


class _Parent:
    def __init__(self, context) -> None:
        self.trace_id, self.span_id = f"{context.trace_id:032x}", f"{context.span_id:016x}"


async def _packed_calls(url: str, count: int) -> list[_Parent]:
    from metrics import tracing
    parents: list[_Parent] = []

    async def one(client: AsyncClient, row: int) -> None:
        span = tracing.tracer().start_span(f"caller {row}")
        from opentelemetry import trace
        with trace.use_span(span, end_on_exit=True):
            parents.append(_Parent(span.get_span_context()))
            await client.predict("iris", {"float_input": np.full((1, 4), row, np.float32)})

    async with AsyncClient(url, timeout_s=20) as client:
        await client.models()  # the connection is up: the calls below leave together, as one pack
        await asyncio.gather(*(one(client, row) for row in range(count)))
    return parents


def test_a_sampled_out_caller_leaves_no_spans(traced):
    receiver = traced["receiver"]
    trace_id, marker = "33333333333333333333333333333333", "55555555555555555555555555555555"

    def predict(traceparent: str) -> None:
        req = urllib.request.Request(traced["base"] + "/api/v1/models/iris/prediction", data=ROW, method="POST",
                                     headers={"Content-Type": "application/json", "traceparent": traceparent})
        with urllib.request.urlopen(req, timeout=20) as resp:
            resp.read()
    predict(f"00-{trace_id}-4444444444444444-00")
    # a later, sampled request's spans arrive after the first's would have: then none of those is there
    predict(f"00-{marker}-6666666666666666-01")
    receiver.wait(lambda s: sum(x["trace_id"] == marker for x in s) >= 7, "the marker request's spans")
    assert receiver.trace(trace_id) == []
