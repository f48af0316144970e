"""metrics/tracing.py in one process, with the SDK's InMemorySpanExporter: when tracing is on, the trace
context in and out, the worker's spans from its phase times, and the frontend's broker-queue span."""
from __future__ import annotations

import sys
import time
from typing import Iterator

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from broker.errors import BadInput
from metrics import tracing

PARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    assert tracing.configure("test", True, "node-1", exporter=exporter, env={})
    yield exporter
    tracing.shutdown()


@pytest.mark.parametrize("enabled, env", [
    (False, {}),                                       # FRACTAL_TRACING off: the default
    (True, {"OTEL_SDK_DISABLED": "true"}),             # the SDK's own off switch
    (True, {"OTEL_TRACES_EXPORTER": "none"}),          # no exporter: nothing to record for
    (True, {"OTEL_TRACES_EXPORTER": "zipkin"}),        # one this server does not ship: said, and off
])
def test_tracing_stays_off_unless_switched_on_with_an_exporter(enabled, env):
    assert tracing.configure("test", enabled, env=env) is False
    assert tracing.ENABLED is False


def test_without_the_otel_extra_tracing_stays_off_and_says_why(monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "opentelemetry.sdk.trace", None)  # import fails, as when not installed
    assert tracing.configure("test", True, env={}) is False
    assert tracing.ENABLED is False
    assert "pip install 'fractal-ml-server[otel]'" in caplog.text


def test_the_otlp_exporter_is_the_default_and_service_name_follows_the_sdk_rules(monkeypatch):
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:9")  # never reached: nothing ends
    try:
        assert tracing.configure("worker", True, "worker-1-9-abcd", env={})
        resource = tracing._provider.resource.attributes
        assert resource["service.name"] == "fractal-worker"
        assert resource["service.instance.id"] == "worker-1-9-abcd"
        monkeypatch.setenv("OTEL_SERVICE_NAME", "models-eu")
        assert tracing.configure("worker", True, env={"OTEL_SERVICE_NAME": "models-eu"})
        assert tracing._provider.resource.attributes["service.name"] == "models-eu"
    finally:
        tracing.shutdown()


def test_a_traceparent_goes_in_and_comes_out_the_same(spans):
    context = trace.get_current_span(tracing.extract(PARENT)).get_span_context()
    assert context.is_remote and f"{context.trace_id:032x}" == "0af7651916cd43dd8448eb211c80319c"
    assert tracing.traceparent_of(context) == PARENT
    with trace.use_span(tracing.tracer().start_span("caller", tracing.extract(PARENT)), end_on_exit=True) as span:
        sent = tracing.with_traceparent({"op": "predict"})
    assert sent["traceparent"] == tracing.traceparent_of(span.get_span_context())
    assert sent["traceparent"].startswith("00-0af7651916cd43dd8448eb211c80319c-")
    assert tracing.with_traceparent({"op": "predict"}) == {"op": "predict"}  # no current span: nothing added


@pytest.mark.parametrize("bad", ["", "garbage", "ff-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
                                 "00-00000000000000000000000000000000-b7ad6b7169203331-01", 42, None])
def test_a_malformed_traceparent_starts_a_new_trace(spans, bad):
    server = tracing.ServerSpan("GET /", bad)
    server.end("ok")
    (span,) = spans.get_finished_spans()
    assert span.parent is None and f"{span.context.trace_id:032x}" != "0af7651916cd43dd8448eb211c80319c"


@pytest.mark.parametrize("asked, result, served", [
    (None, {"outputs": {}, "version": "3"}, "3"),  # none named: the newest served, and the result says which
    (None, {"outputs": {}}, "1"),                   # a flat file is version 1
    ("2", {"outputs": {}, "version": "2"}, "2"),
    ("2", BadInput("no"), "2"),                      # a failure has no result: the version asked for
    (None, BadInput("no"), None),
])
def test_the_worker_span_carries_the_version_that_served(spans, asked, result, served):
    request = {"op": "predict", "model": "m.onnx", "traceparent": PARENT}
    if asked is not None:
        request["version"] = asked
    tracing.received(request, time.perf_counter_ns())
    tracing.answered(request, result)
    tracing.finish(request, "node-1")
    (worker,) = [s for s in spans.get_finished_spans() if s.name == "worker predict"]
    assert worker.attributes.get("fractal.model.version") == served


def test_a_worker_request_becomes_a_span_with_its_phases_inside_it(spans):
    request = {"op": "predict", "model": "iris.onnx", "version": "2", "request_id": "r-1", "traceparent": PARENT}
    now = time.perf_counter_ns()
    tracing.received(request, now - 9_000_000)
    batch = tracing.batch_span(None, now - 6_000_000, now - 2_000_000, 12, 3)
    tracing.RUN = (now - 8_000_000, now - 6_000_000, now - 2_000_000, 12, batch)
    tracing.answered(request, {"outputs": {}, "version": "2"})  # a version directory's result names it
    assert tracing.RUN is None  # taken: the next request does not see this one's run
    tracing.finish(request, "node-1")
    finished = {s.name: s for s in spans.get_finished_spans()}
    worker = finished["worker predict"]
    assert f"{worker.parent.span_id:016x}" == "b7ad6b7169203331" and worker.kind is trace.SpanKind.SERVER
    assert dict(worker.attributes) == {"fractal.op": "predict", "fractal.node": "node-1", "fractal.outcome": "ok",
                                       "fractal.model": "iris.onnx", "fractal.model.version": "2",
                                       "fractal.request_id": "r-1", "fractal.batch.size": 12}
    phases = [finished[name] for name in ("decode", "batch wait", "inference", "encode")]
    assert all(p.parent.span_id == worker.context.span_id for p in phases)
    assert [round((p.end_time - p.start_time) / 1e6) for p in phases[:3]] == [1, 2, 4]
    assert all(a.end_time <= b.start_time for a, b in zip(phases, phases[1:], strict=False))
    assert worker.start_time == phases[0].start_time and worker.end_time == phases[-1].end_time
    assert [link.context for link in worker.links] == [batch]
    assert [link.context for link in finished["inference"].links] == [batch]
    batch_span = finished["batch inference"]
    assert batch_span.parent is None and batch_span.attributes["fractal.batch.requests"] == 3


def test_a_failed_request_has_no_run_and_an_error_status(spans):
    request = {"op": "predict", "model": "nope.onnx", "traceparent": PARENT}
    tracing.received(request, time.perf_counter_ns())
    tracing.answered(request, KeyError("x"))
    tracing.finish(request, "node-1")
    finished = {s.name: s for s in spans.get_finished_spans()}
    assert set(finished) == {"worker predict", "decode", "encode"}
    assert finished["worker predict"].attributes["fractal.outcome"] == "KeyError"
    assert not finished["worker predict"].status.is_ok


def test_sampled_out_callers_and_unanswered_requests_record_nothing(spans):
    sampled_out = {"op": "predict", "traceparent": PARENT[:-2] + "02"}  # W3C level 2: random, not sampled
    never_answered = {"op": "predict", "traceparent": PARENT}
    for request in (sampled_out, never_answered):
        tracing.received(request, time.perf_counter_ns())
    tracing.answered(sampled_out, {})
    for request in (sampled_out, never_answered):
        tracing.finish(request, "node-1")
    assert spans.get_finished_spans() == ()


def test_each_request_of_a_pack_links_to_the_pack(spans):
    subs = [{"op": "predict", "id": i, "traceparent": PARENT} for i in range(3)]
    pack = {"op": "pack", "n": 3, "requests": subs}
    tracing.received(pack, time.perf_counter_ns())
    for sub in subs:
        tracing.answered(sub, {})
    tracing.pack_done(pack, subs, "node-1")
    finished = spans.get_finished_spans()
    (pack_span,) = [s for s in finished if s.name == "worker pack"]
    workers = [s for s in finished if s.name == "worker predict"]
    assert len(workers) == 3 and pack_span.attributes["fractal.batch.requests"] == 3
    assert all([link.context for link in w.links] == [pack_span.context] for w in workers)


def test_the_broker_queue_span_is_the_calls_wait_beyond_the_workers_time(spans):
    call = tracing.BrokerCall("predict", "iris.onnx")
    time.sleep(0.01)
    call.end({"call_ms": 10.0, "worker_ms": 4.0})
    finished = {s.name: s for s in spans.get_finished_spans()}
    call, queue = finished["broker predict"], finished["broker queue"]
    assert call.kind is trace.SpanKind.CLIENT and queue.parent.span_id == call.context.span_id
    assert queue.end_time - queue.start_time == 6_000_000
    assert call.start_time <= queue.start_time and queue.end_time <= call.end_time
    assert call.attributes["fractal.outcome"] == "ok"


def test_a_failed_broker_call_says_why(spans):
    tracing.BrokerCall("predict", "iris.onnx").end({"error": "Timeout"})
    (call,) = spans.get_finished_spans()  # no reply, no worker time: no queue span
    assert call.attributes["fractal.outcome"] == "Timeout" and not call.status.is_ok


def test_the_sampler_comes_from_the_sdk_variables(monkeypatch):
    monkeypatch.setenv("OTEL_TRACES_SAMPLER", "traceidratio")
    monkeypatch.setenv("OTEL_TRACES_SAMPLER_ARG", "0")
    exporter = InMemorySpanExporter()
    try:
        assert tracing.configure("test", True, exporter=exporter, env={})
        call = tracing.BrokerCall("predict", "iris.onnx")
        sent = tracing.with_traceparent({})["traceparent"]
        call.end({"call_ms": 1.0, "worker_ms": 0.5})
        assert int(sent[-2:], 16) & 1 == 0  # not sampled: the worker records nothing
        assert exporter.get_finished_spans() == ()
    finally:
        tracing.shutdown()


def test_under_a_sampled_out_request_the_call_makes_no_span_and_passes_the_decision_on(spans):
    server = tracing.ServerSpan("POST /x", PARENT[:-2] + "00")
    call = tracing.BrokerCall("predict", "iris.onnx")
    sent = tracing.with_traceparent({})["traceparent"]
    call.end({"call_ms": 1.0, "worker_ms": 0.5})
    server.end("ok")
    assert call.span is None and sent.startswith("00-0af7651916cd43dd8448eb211c80319c-") and sent.endswith("-00")
    assert spans.get_finished_spans() == ()


def test_requests_without_a_traceparent_or_with_a_forged_record_record_nothing(spans):
    status = {"op": "status"}  # the broker's own question: no caller, no trace
    forged = {"op": "predict", tracing.RECORD: 42}  # a map from the wire may hold any key; never received()
    tracing.received(status, time.perf_counter_ns())
    for request in (status, forged):
        tracing.answered(request, {})
        tracing.finish(request, "node-1")
    tracing.pack_done({"op": "pack", "requests": [forged], tracing.RECORD: "x"}, [forged], "node-1")
    assert spans.get_finished_spans() == ()
