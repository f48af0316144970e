"""OpenTelemetry tracing, optional: spans of the frontends and workers, and the W3C traceparent between them.

Off unless a process calls `configure(..., enabled=True)` (FRACTAL_TRACING=true) with the `otel` extra
installed; then everything else comes from the OpenTelemetry SDK's own variables: OTEL_TRACES_EXPORTER
(otlp, the default, over OTLP/HTTP protobuf; console; none), OTEL_EXPORTER_OTLP_ENDPOINT and
OTEL_EXPORTER_OTLP_TRACES_ENDPOINT, OTEL_TRACES_SAMPLER / OTEL_TRACES_SAMPLER_ARG, OTEL_SERVICE_NAME,
OTEL_RESOURCE_ATTRIBUTES, OTEL_BSP_*, OTEL_SDK_DISABLED. Off, the hot paths cost one check of
`ENABLED`, a module global, and this module imports nothing from OpenTelemetry.

The wire (docs/protocol.md, "Tracing"): a request map may carry `traceparent`, the W3C header's value.
The broker never reads it. Workers time their phases with perf_counter_ns, as they already do for
Server-Timing, and record their spans when a request is answered, with those times; so a worker's
spans are children of the frontend's call span and cost nothing until the answer is known.

Worker side, per request: `received` (the message arrived), `answered` (its outcome is known; the
times of the InferenceSession.run it took part in are in `RUN`), `finish` (its reply is encoded: the
spans are recorded). Dynamic batches and packs get a span of their own, linked from each request.
"""
from __future__ import annotations

import logging
import os
import time
from typing import TYPE_CHECKING, Any, Mapping

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SpanExporter
    from opentelemetry.trace import Span, SpanContext, Tracer

log = logging.getLogger(__name__)

ENABLED = False                 # the one check the hot paths make
TRACEPARENT = "traceparent"     # the request map's field, and the HTTP header / gRPC metadata key
RECORD = "\x00trace"            # a decoded request's worker record (set by `received`, never from the wire)

# Span attributes (no semantic convention covers model serving: ours are under fractal.*)
MODEL, VERSION, NODE, OUTCOME = "fractal.model", "fractal.model.version", "fractal.node", "fractal.outcome"
BATCH_SIZE, REQUESTS = "fractal.batch.size", "fractal.batch.requests"
OP, REQUEST_ID = "fractal.op", "fractal.request_id"

# (queued_ns, run_start_ns, run_end_ns, rows, batch span context or None) of the InferenceSession.run a
# request just took part in, perf_counter_ns; set by worker/inference.py and worker/batching.py just
# before the request is answered, read by `answered`. Workers answer on one thread.
RUN: tuple[int, int, int, int, Any] | None = None

_provider: "TracerProvider | None" = None
_tracer: "Tracer | None" = None
_node = ""
# opentelemetry.trace and opentelemetry.context, and the W3C propagator, bound once by `configure`:
# an import statement in a function costs a lookup on every call.
_trace: Any = None
_context: Any = None
_propagator: Any = None


def configure(component: str, enabled: bool, node: str = "", exporter: "SpanExporter | None" = None,
              env: Mapping[str, str] | None = None) -> bool:
    """Switch tracing on for this process when `enabled` and the SDK is installed; True when it is on.

    `exporter` replaces the one OTEL_TRACES_EXPORTER names (tests pass an InMemorySpanExporter, and
    then spans are exported as they end). Call it once per process, after any fork.
    """
    global ENABLED, _provider, _tracer, _node, _trace, _context, _propagator
    env = os.environ if env is None else env
    shutdown()
    if not enabled:
        return False
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        log.info("tracing: OTEL_SDK_DISABLED=true, tracing stays off")
        return False
    kind = env.get("OTEL_TRACES_EXPORTER", "otlp").strip().lower() or "otlp"
    if exporter is None and kind == "none":
        return False
    try:
        from opentelemetry import context as otel_context
        from opentelemetry import trace as otel_trace
        from opentelemetry.sdk.resources import SERVICE_INSTANCE_ID, SERVICE_NAME, Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
    except ImportError:
        log.warning("tracing: FRACTAL_TRACING is on but OpenTelemetry is not installed (pip install "
                    "'fractal-ml-server[otel]'); tracing stays off")
        return False
    if exporter is None:
        exporter = _exporter(kind)
        if exporter is None:
            return False
        processor: Any = BatchSpanProcessor(exporter)
    else:
        processor = SimpleSpanProcessor(exporter)
    attributes: dict[str, str] = {SERVICE_INSTANCE_ID: node or f"{component}-{os.getpid()}"}
    if not env.get("OTEL_SERVICE_NAME"):  # NOTE: the variable wins over our default, as the SDK's rule is
        attributes[SERVICE_NAME] = f"fractal-{component}"
    _provider = TracerProvider(resource=Resource.create(attributes))  # sampler: OTEL_TRACES_SAMPLER(_ARG)
    _provider.add_span_processor(processor)
    _tracer = _provider.get_tracer("fractal")
    _node = node
    _trace, _context, _propagator = otel_trace, otel_context, TraceContextTextMapPropagator()
    ENABLED = True
    log.info("tracing on: %s spans exported by %s", component, exporter.__class__.__name__)
    return True


def _exporter(kind: str) -> "SpanExporter | None":
    if kind == "console":
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter
        return ConsoleSpanExporter()
    if kind != "otlp":
        log.warning("tracing: OTEL_TRACES_EXPORTER=%s is not one this server ships (otlp, console, none); "
                    "tracing stays off", kind)
        return None
    try:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    except ImportError:
        log.warning("tracing: the OTLP/HTTP exporter is not installed (pip install 'fractal-ml-server[otel]'); "
                    "tracing stays off")
        return None
    return OTLPSpanExporter()  # endpoint, headers, timeout: OTEL_EXPORTER_OTLP_* (http/protobuf)


def shutdown() -> None:
    """Export what is buffered and switch tracing off (a stopping process, or `configure` again)."""
    global ENABLED, _provider, _tracer, RUN
    ENABLED, RUN = False, None  # NOTE: _trace and _context stay bound: a request in flight may still end
    if _provider is not None:
        _provider.shutdown()
    _provider = _tracer = None


def tracer() -> "Tracer":
    if _tracer is None:
        raise RuntimeError("tracing is off")
    return _tracer


# ---------------------------------------------------------------------------------------------
# Context: W3C trace context in and out


def extract(traceparent: Any, tracestate: Any = None) -> Any:
    """The OpenTelemetry Context a caller's traceparent (and tracestate) names; an empty one for none or
    a malformed one (then a new trace starts, as the W3C spec says)."""
    if not isinstance(traceparent, str) or not traceparent:
        return _context.Context()
    carrier = {TRACEPARENT: traceparent}
    if isinstance(tracestate, str) and tracestate:
        carrier["tracestate"] = tracestate
    return _propagator.extract(carrier)


def traceparent_of(context: "SpanContext") -> str:
    """The W3C traceparent value of a span context."""
    return f"00-{context.trace_id:032x}-{context.span_id:016x}-{int(context.trace_flags):02x}"


def with_traceparent(fields: dict) -> dict:
    """`fields` with the current span's traceparent (the client's outgoing request map), when there
    is a span; called by broker/client.py while ENABLED."""
    context = _trace.get_current_span().get_span_context()
    if not context.is_valid:
        return fields
    return {**fields, TRACEPARENT: traceparent_of(context)}


# ---------------------------------------------------------------------------------------------
# Frontends: the server span of an HTTP or gRPC request, and the client span of its broker call


class ServerSpan:
    """A frontend request's span, current (so the client's calls are its children) until `end`."""

    def __init__(self, name: str, traceparent: Any, tracestate: Any = None, attributes: dict | None = None):
        self.span = tracer().start_span(name, extract(traceparent, tracestate), kind=_trace.SpanKind.SERVER,
                                        attributes=attributes)
        self._token: Any = _context.attach(_trace.set_span_in_context(self.span))

    def end(self, outcome: str, attributes: dict | None = None) -> None:
        if self._token is None:
            return
        try:
            _context.detach(self._token)
        except Exception:  # NOTE: ended from another task (a cancelled request): nothing to restore there
            pass
        self._token = None
        span = self.span
        if span.is_recording():
            if attributes:
                span.set_attributes(attributes)
            span.set_attribute(OUTCOME, outcome)
            if outcome != "ok":
                _error_status(span, outcome)
        span.end()


class BrokerCall:
    """The client span of one call through the broker, current until `end` (so its traceparent travels
    in the request), and its "broker queue" child, drawn from `timing` (frontend/timing.py: call_ms,
    the worker's worker_ms) once the reply is in: the time the call spent outside the worker (client,
    broker queue and wire both ways), placed from the call's start. Under a sampled-out request, none:
    the request's own context, current already, travels instead, and says "not sampled" as well."""

    def __init__(self, op: str, model: str):
        self.span: Any = None
        self.parent = _trace.get_current_span()
        parent = self.parent.get_span_context()
        if parent.is_valid and not parent.trace_flags.sampled:
            return
        self.span = tracer().start_span(f"broker {op}", kind=_trace.SpanKind.CLIENT, attributes={MODEL: model, OP: op})
        self.started = time.time_ns()
        self._token = _context.attach(_trace.set_span_in_context(self.span))

    def end(self, timing: dict) -> None:
        if self.span is None:
            return
        _context.detach(self._token)
        if self.span.is_recording():
            _call_done(self.span, self.started, timing)
            version = timing.get("version")
            if version is not None:  # the version that served it, over the one the caller asked for
                self.span.set_attribute(VERSION, str(version))
                if self.parent.is_recording():
                    self.parent.set_attribute(VERSION, str(version))
        self.span.end()


def _call_done(span: "Span", started_ns: int, timing: dict) -> None:
    error = timing.get("error")
    span.set_attribute(OUTCOME, error or ("ok" if "call_ms" in timing else "cancelled"))
    if error:
        _error_status(span, error)
    call_ms, worker_ms = timing.get("call_ms"), timing.get("worker_ms")
    if _tracer is None or not isinstance(call_ms, float) or not isinstance(worker_ms, (int, float)):
        return  # no reply (an error, a cancelled call), or tracing stopped meanwhile
    if 0 <= worker_ms <= call_ms:
        queue = _tracer.start_span("broker queue", _trace.set_span_in_context(span), start_time=started_ns,
                                   attributes={"fractal.includes": "client, broker queue, network both ways"})
        queue.end(end_time=started_ns + int((call_ms - worker_ms) * 1e6))


def _error_status(span: "Span", outcome: str) -> None:
    span.set_status(_trace.Status(_trace.StatusCode.ERROR, outcome))


# ---------------------------------------------------------------------------------------------
# Workers: spans recorded once a request is answered, from perf_counter_ns times


class Record:
    """What a worker knows of one request's trip: its parent context and its phases' times."""
    __slots__ = ("parent", "received", "run", "answered", "encoded", "outcome", "pack", "version")

    def __init__(self, parent: Any, received: int):
        self.parent, self.received = parent, received
        self.run: tuple[int, int, int, int, Any] | None = None
        self.answered = 0
        self.encoded = 0  # when its reply was encoded: the span's end, taken before the send
        self.outcome = "ok"
        self.pack: Any = None  # the span context of the pack it came in
        self.version: str | None = None  # the version that served it (a predict's result says)


def received(request: dict, now_ns: int) -> None:
    """Attach a record to a decoded request (and to each request of a pack, and the pack when one of them
    has one); ENABLED only. Only requests with a sampled traceparent get one: a caller that does not
    trace (the broker asking for status) or was sampled out (flags without the sampled bit, 00 or 02)
    costs nothing more. Always written, so a map from the wire cannot bring its own."""
    begin()
    subs = request.get("requests") if request.get("op") == "pack" else None
    if not isinstance(subs, list):
        request[RECORD] = _record(request, now_ns)
        return
    traced = False
    for sub in subs:
        if isinstance(sub, dict):
            sub[RECORD] = _record(sub, now_ns)
            traced = traced or sub[RECORD] is not None
    request[RECORD] = Record(_context.Context(), now_ns) if traced else None


_NOT_SAMPLED = frozenset("02468ace")  # the last hex digit of a traceparent whose sampled bit is 0


def _record(request: dict, now_ns: int) -> Record | None:
    traceparent = request.get(TRACEPARENT)
    if not isinstance(traceparent, str) or not traceparent or traceparent[-1:] in _NOT_SAMPLED:
        return None  # NOTE: the last hex digit's low bit is the "sampled" flag
    return Record(extract(traceparent), now_ns)


def begin() -> None:
    """A request starts running: forget the last request's run."""
    global RUN
    RUN = None


def answered(request: Any, outcome: Any) -> None:
    """The request's outcome is known; the run it took part in, if any, is in RUN (set just before)."""
    global RUN
    record = request.get(RECORD) if isinstance(request, dict) else None
    run, RUN = RUN, None
    if not isinstance(record, Record):
        return
    record.answered = time.perf_counter_ns()
    record.run = run
    if isinstance(outcome, BaseException):
        record.outcome = outcome.__class__.__name__
    elif type(outcome) is dict and "outputs" in outcome:  # a predict's result: a version directory's says so
        record.version = str(outcome.get("version", "1"))


def encoded(request: Any) -> None:
    """The request's reply is encoded and about to leave. Stamped before the send, since finish() runs
    after it (off the caller's path): the worker's span must end before the caller can have its reply."""
    record = request.get(RECORD) if isinstance(request, dict) else None
    if isinstance(record, Record):
        record.encoded = time.perf_counter_ns()


def finish(request: Any, node: str) -> None:
    """The request's reply is encoded: record its spans."""
    record = request.get(RECORD) if isinstance(request, dict) else None
    if not isinstance(record, Record) or not record.answered:
        return
    link, set_span_in_context = _trace.Link, _trace.set_span_in_context
    offset = time.time_ns() - time.perf_counter_ns()  # NOTE: span times are wall clock, ours monotonic
    encoded = record.encoded or time.perf_counter_ns()
    run = record.run
    op = str(request.get("op"))
    attributes: dict[str, str | int] = {OP: op, NODE: node, OUTCOME: record.outcome,
                                        MODEL: str(request.get("model", "")),
                                        REQUEST_ID: str(request.get("request_id", ""))}
    if record.version is not None:
        attributes[VERSION] = record.version  # served, not asked for: a request naming none gets the newest
    elif request.get("version") is not None:
        attributes[VERSION] = str(request["version"])
    if run is not None:
        attributes[BATCH_SIZE] = run[3]
    links = [link(ctx) for ctx in (record.pack, run[4] if run else None) if ctx is not None]
    tracer_ = tracer()
    span = tracer_.start_span(f"worker {op}", record.parent, kind=_trace.SpanKind.SERVER, attributes=attributes,
                              links=links, start_time=record.received + offset)
    if span.is_recording():
        if record.outcome != "ok":
            _error_status(span, record.outcome)
        parent = set_span_in_context(span)
        decoded = (run[0] or run[1]) if run else record.answered
        phases = [("decode", record.received, decoded)]
        if run is not None:
            if run[0]:
                phases.append(("batch wait", run[0], run[1]))
            phases.append(("inference", run[1], run[2]))
        phases.append(("encode", run[2] if run else record.answered, encoded))
        for name, start, end in phases:
            child = tracer_.start_span(name, parent, start_time=start + offset,
                                       links=[link(run[4])] if name == "inference" and run and run[4] else None)
            child.end(end_time=max(start, end) + offset)
    span.end(end_time=encoded + offset)


def batch_span(model: Any, started_ns: int, ran_ns: int, rows: int, requests: int) -> "SpanContext":
    """Record a dynamic batch's InferenceSession.run as a span of its own (a new trace: it serves many),
    which each of its requests links to; returns its context for RUN."""
    offset = time.time_ns() - time.perf_counter_ns()
    span = tracer().start_span("batch inference", _root(), start_time=started_ns + offset, attributes={
        MODEL: str(getattr(model, "name", "")), VERSION: str(getattr(model, "version", None) or "1"), NODE: _node,
        BATCH_SIZE: rows, REQUESTS: requests})
    span.end(end_time=ran_ns + offset)
    return span.get_span_context()


def pack_done(request: dict, subs: list, node: str) -> None:
    """A pack's reply is encoded: record its span (a new trace), then each request's, linked to it."""
    record = request.get(RECORD)
    if isinstance(record, Record):
        offset = time.time_ns() - time.perf_counter_ns()
        span = tracer().start_span("worker pack", _root(), start_time=record.received + offset,
                                   attributes={NODE: node, REQUESTS: len(subs)})
        span.end()
        pack = span.get_span_context()
        for sub in subs:
            sub_record = sub.get(RECORD) if isinstance(sub, dict) else None
            if isinstance(sub_record, Record):
                sub_record.pack = pack
    for sub in subs:
        finish(sub, node)


def _root() -> Any:
    return _context.Context()
