"""Every FRACTAL metric, defined once: one class per component, built on the registry it reports to.

Names follow Prometheus conventions with the fractal_ prefix; counters get _total from the client
library. Label children used on the hot path are bound once, not looked up per request. A component
run with metrics off gets the same attributes as no-op objects, so its code has no branches.
"""
from __future__ import annotations

from typing import Any, Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from broker.rejections import Rejection

from .tally import DIRECT, Direct, Tally, _observe_all

# 100 us .. 10 s: iris round trips sit near the bottom, image models and queueing near the top.
LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                   1.0, 2.5, 5.0, 10.0)


class _Null:
    """Stands in for any metric (or label child) when metrics are off: every call does nothing."""

    def labels(self, *args: object, **kwargs: object) -> "_Null":
        return self

    def inc(self, *args: object) -> None:
        pass

    dec = set = observe = remove = inc


_NULL = _Null()


def observe_many(child: Any, value: float, count: int) -> None:
    """`child.observe(value)` done `count` times (a pack's requests share one duration), in O(1).

    NOTE: uses prometheus_client's Histogram internals (_sum, _upper_bounds, _buckets, stable since
    0.4); tests/test_packing.py checks the exported counts.
    """
    if count == 1 or child is _NULL:
        child.observe(value)
        return
    child._sum.inc(value * count)
    for i, bound in enumerate(child._upper_bounds):
        if value <= bound:
            child._buckets[i].inc(count)
            break


# Rows per InferenceSession.run: 1 (no batching) up to a pack's PACK_MAX_ROWS.
ROW_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096)
VERSION = "1"  # the version of a flat NAME.onnx file (worker/versions.py), and a reply that names none


def _kinds(enabled: bool) -> tuple[Callable, Callable, Callable]:
    if enabled:
        return Counter, Gauge, Histogram
    null = lambda *args, **kwargs: _NULL  # noqa: E731
    return null, null, null


class BrokerMetrics:
    def __init__(self, registry: CollectorRegistry | None, enabled: bool = True):
        counter, gauge, histogram = _kinds(enabled)
        r, s = registry, ["service"]
        self.workers = gauge("fractal_broker_workers", "Live workers registered, by service.", s, registry=r)
        self.idle_workers = gauge("fractal_broker_idle_workers", "Workers waiting for a request.", s, registry=r)
        self.queue_depth = gauge("fractal_broker_queue_depth", "Requests waiting for a worker.", s, registry=r)
        self.dispatched = counter("fractal_broker_requests_dispatched", "Requests sent to a worker "
                                  "(re-dispatches included).", s, registry=r)
        self.completed = counter("fractal_broker_requests_completed", "FINAL replies passed to clients.", s,
                                 registry=r)
        self.redispatched = counter("fractal_broker_requests_redispatched", "Requests sent again after "
                                    "their worker died.", s, registry=r)
        self.expired = counter("fractal_broker_requests_expired", "Requests that waited past "
                               "queue_timeout_s.", s, registry=r)
        self.rejected = counter("fractal_broker_requests_rejected", "Requests answered with an error by the "
                                f"broker itself, by reason: {', '.join(Rejection)}.", ["service", "reason"],
                                registry=r)
        self.dropped = counter("fractal_broker_dropped_messages", "Malformed or unexpected messages logged "
                               "and dropped.", registry=r)
        self.worker_deaths = counter("fractal_broker_worker_deaths", "Workers declared dead after missing "
                                     "heartbeats.", registry=r)
        self.duration = histogram("fractal_broker_request_duration_seconds", "From a client's REQUEST to the "
                                  "FINAL reply.", s, buckets=LATENCY_BUCKETS, registry=r)
        self.queue_wait = histogram("fractal_broker_queue_wait_seconds", "From a client's REQUEST to its "
                                    "first dispatch to a worker.", s, buckets=LATENCY_BUCKETS, registry=r)
        # Per model, from the routing header; a model becomes a series once a worker reports it resident.
        sm = ["service", "model"]
        self.model_dispatched = counter("fractal_broker_model_requests_dispatched", "Requests sent to a worker, "
                                        "by model (once a worker reports it resident).", sm, registry=r)
        self.model_queue_wait = histogram("fractal_broker_model_queue_wait_seconds", "From a client's REQUEST "
                                          "to its first dispatch, by model.", sm, buckets=LATENCY_BUCKETS,
                                          registry=r)
        self.model_rejected = counter("fractal_broker_model_requests_rejected", "Requests answered with an "
                                      "error by the broker itself, by model and reason.", [*sm, "reason"],
                                      registry=r)

    def forget_service(self, service: str, models: Iterable[str] = ()) -> None:
        """Drop a service's series (and its `models`' series) when it has no workers left (peers choose
        service names)."""
        for model in models:
            for metric in (self.model_dispatched, self.model_queue_wait):
                try:
                    metric.remove(service, model)
                except KeyError:
                    pass
            for reason in Rejection:
                try:
                    self.model_rejected.remove(service, model, reason)
                except KeyError:
                    pass
        for metric in (self.workers, self.idle_workers, self.queue_depth, self.dispatched, self.completed,
                       self.redispatched, self.expired, self.duration, self.queue_wait):
            try:
                metric.remove(service)
            except KeyError:
                pass
        for reason in Rejection:
            try:
                self.rejected.remove(service, reason)
            except KeyError:
                pass


class ModelSeries:
    """One loaded model's label children in a worker, bound once when its session is loaded."""

    __slots__ = ("inference", "batch_rows", "queue_wait", "requests", "resident", "resident_bytes", "_failures",
                 "_failed", "labels")

    def __init__(self, m: "WorkerMetrics", labels: tuple[str, str, str]):
        self.labels = labels  # (node, model, version)
        self.inference = m.inference_seconds.labels(*labels)
        self.batch_rows = m.batch_rows.labels(*labels)
        self.queue_wait = m.model_queue_wait.labels(*labels)
        self.requests = m.model_requests.labels(*labels)
        self.resident = m.model_resident.labels(*labels)
        self.resident_bytes = m.model_resident_bytes.labels(*labels)
        self._failures, self._failed = m.model_failures, labels
        self.resident.set(1)

    def failed(self, reason: str) -> None:
        self._failures.labels(*self._failed, reason).inc()


class WorkerMetrics:
    def __init__(self, registry: CollectorRegistry | None, node: str, enabled: bool = True):
        counter, gauge, histogram = _kinds(enabled)
        r, n, mv = registry, ["node"], ["node", "model", "version"]
        self.node = node
        self.requests = counter("fractal_worker_requests", "Requests answered, by op and outcome.",
                                ["node", "op", "outcome"], registry=r)
        self.request_seconds = histogram("fractal_worker_request_duration_seconds", "Handling time of a "
                                         "request, from its receipt to its encoded reply.", ["node", "op"],
                                         buckets=LATENCY_BUCKETS, registry=r)
        # Per model, only for models this worker loaded: series come and go with their sessions.
        self.inference_seconds = histogram("fractal_worker_inference_seconds", "InferenceSession.run time, by "
                                           "model.", mv, buckets=LATENCY_BUCKETS, registry=r)
        self.batch_rows = histogram("fractal_worker_batch_rows", "Rows per InferenceSession.run (a dynamic "
                                    "batch or a pack's rows together), by model.", mv, buckets=ROW_BUCKETS,
                                    registry=r)
        self.model_queue_wait = histogram("fractal_worker_model_queue_wait_seconds", "A batched request's wait "
                                          "in the worker for its batch's run, by model.", mv,
                                          buckets=LATENCY_BUCKETS, registry=r)
        self.model_requests = counter("fractal_worker_model_requests", "Predictions answered, failed or not, "
                                      "by model.", mv, registry=r)
        self.model_failures = counter("fractal_worker_model_failures", "Predictions that failed, by model and "
                                      "reason (the error type).", [*mv, "reason"], registry=r)
        self.model_resident = gauge("fractal_worker_model_resident", "1 while the model's session is loaded "
                                    "in this worker.", mv, registry=r)
        self.model_resident_bytes = gauge("fractal_worker_model_resident_bytes", "Memory the model's session "
                                          "holds, measured when it loaded (what the memory budget counts).", mv,
                                          registry=r)
        self._models: dict[str, ModelSeries] = {}  # by entry: NAME, or NAME@VERSION (worker/versions.py)
        self._newest: dict[str, ModelSeries] = {}  # by model name: its newest loaded version's series
        self.model_loads = counter("fractal_worker_model_loads", "ONNX Runtime sessions created.", n,
                                   registry=r).labels(node)
        self.model_load_seconds = histogram("fractal_worker_model_load_seconds", "Time to create a session.",
                                            n, buckets=LATENCY_BUCKETS, registry=r).labels(node)
        self.cache_hits = counter("fractal_worker_session_cache_hits", "Calls served by a cached session.", n,
                                  registry=r).labels(node)
        self.cache_misses = counter("fractal_worker_session_cache_misses", "Calls that had to load a session.",
                                    n, registry=r).labels(node)
        self.cache_evictions = counter("fractal_worker_session_cache_evictions", "Sessions evicted by the LRU.",
                                       n, registry=r).labels(node)
        self.models_resident = gauge("fractal_worker_models_resident", "Sessions loaded in this worker.", n,
                                     registry=r).labels(node)
        self.cold_loads = counter("fractal_worker_cold_loads", "Sessions loaded because a request needed a "
                                  "model that was not resident.", n, registry=r).labels(node)
        self.resident_bytes = gauge("fractal_worker_resident_bytes", "Memory the resident sessions hold, "
                                    "measured at load; at most fractal_worker_memory_budget_bytes.", n,
                                    registry=r).labels(node)
        self.memory_budget = gauge("fractal_worker_memory_budget_bytes", "The sessions' memory budget; 0: "
                                   "unlimited.", n, registry=r).labels(node)
        self.memory_rss = gauge("fractal_worker_memory_rss_bytes", "Resident memory of the worker process.",
                                n, registry=r).labels(node)
        self.dropped = counter("fractal_worker_requests_dropped", "Requests answered without being run, by "
                               "reason (deadline: the caller's deadline passed before its run).", ["node", "reason"],
                               registry=r)
        self.dropped_deadline = self.dropped.labels(node, "deadline")
        self._bound: dict[tuple, tuple] = {}

    def model_series(self, entry: str, model: str | None = None, version: str | None = None) -> ModelSeries:
        """The series of an entry (NAME or NAME@VERSION) whose session was just loaded, labelled with its
        model name and the version it serves (None: a flat file, version 1). Only loaded versions become
        series, so the version label is as bounded as the model label."""
        name = entry if model is None else model
        series = self._models[entry] = ModelSeries(self, (self.node, name, version or VERSION))
        newest = self._newest.get(name)
        if newest is None or int(newest.labels[2]) <= int(series.labels[2]):
            self._newest[name] = series
        return series

    def forget_model(self, entry: str) -> None:
        """Drop an entry's series when its session leaves (users name models: names must not pile up)."""
        series = self._models.pop(entry, None)
        if series is None:
            return
        labels = series.labels
        for metric in (self.inference_seconds, self.batch_rows, self.model_queue_wait, self.model_requests,
                       self.model_resident, self.model_resident_bytes):
            try:
                metric.remove(*labels)
            except KeyError:
                pass
        if isinstance(self.model_failures, Counter):  # NOTE: _metrics (label values -> child) is stable API-wise
            for failed in [ls for ls in self.model_failures._metrics if ls[1:3] == labels[1:]]:
                self.model_failures.remove(*failed)
        if self._newest.get(labels[1]) is series:
            del self._newest[labels[1]]
            rest = [s for s in self._models.values() if s.labels[1] == labels[1]]
            if rest:
                self._newest[labels[1]] = max(rest, key=lambda s: int(s.labels[2]))

    def model_done(self, model: object, reason: str | None, version: object = None, count: int = 1) -> None:
        """Count a prediction (`count` of them) for `model` (an entry, its file name, or the bare name) if
        this worker loaded it, on the version that served it: `version` when given (the reply's or the one
        asked for), else the entry's, else the model's newest loaded version."""
        if type(model) is not str:
            return
        series = self._models.get(model) if version is None else None
        if series is None:
            name = model if model.endswith(".onnx") else f"{model}.onnx"
            if version is None:
                series = self._models.get(name) or self._newest.get(name)
            else:
                series = self._models.get(f"{name}@{version}")
                if series is None and str(version) == "1":
                    series = self._models.get(name)
            if series is None:
                return  # never loaded here: an unknown name never becomes a series
        series.requests.inc(count)
        if reason is not None:
            series.failed(reason)

    def request_done(self, op: str, outcome: str, seconds: float) -> None:
        bound = self._bound.get((op, outcome)) or self._bind(op, outcome)
        bound[0].inc()
        bound[1].observe(seconds)

    def requests_done(self, op: str, outcome: str, seconds: list[float]) -> None:
        """request_done for each of `seconds` (requests answered together, e.g. a pack's), with one write
        per counter and histogram bucket instead of one per request (as metrics/tally.py does)."""
        bound = self._bound.get((op, outcome)) or self._bind(op, outcome)
        bound[0].inc(len(seconds))
        _observe_all(bound[1], seconds)

    def _bind(self, op: str, outcome: str) -> tuple:
        bound = self._bound[(op, outcome)] = (self.requests.labels(self.node, op, outcome),
                                              self.request_seconds.labels(self.node, op))
        return bound

    @staticmethod
    def disabled(node: str = "") -> NullWorkerMetrics:
        """The no-op twin, for a worker run with metrics off (metrics_port 0)."""
        return NullWorkerMetrics(node)


class NullWorkerMetrics(WorkerMetrics):
    """WorkerMetrics with metrics off, so the worker's code has no `if metrics` branches.

    Built by WorkerMetrics' own __init__ from no-op metrics, so it has every metric the real one has (a
    new one cannot be left out of it); each method that keeps per-model state or label children does
    nothing instead, so the metrics-off path costs one no-op call. It keeps no state: one instance may
    serve any number of session caches (tests/test_null_metrics.py checks both promises).
    """

    def __init__(self, node: str = ""):
        super().__init__(None, node, enabled=False)

    def model_series(self, entry: str, model: str | None = None, version: str | None = None) -> ModelSeries:
        """A no-op series with the labels the real one would get; nothing keeps it."""
        return ModelSeries(self, (self.node, entry if model is None else model, version or VERSION))

    def forget_model(self, entry: str) -> None:
        """No series were kept."""

    def model_done(self, model: object, reason: str | None, version: object = None, count: int = 1) -> None:
        """Nothing counts."""

    def request_done(self, op: str, outcome: str, seconds: float) -> None:
        """Nothing counts."""

    def requests_done(self, op: str, outcome: str, seconds: list[float]) -> None:
        """Nothing counts."""


NO_WORKER_METRICS = NullWorkerMetrics()  # a default for callers built without metrics (tests, tools)
NO_SERIES = NO_WORKER_METRICS.model_series("")  # the series of a session no cache holds


class CallerModelMetrics:
    """A frontend's (REST or gRPC) per-model series. A model becomes a series only once it has answered
    through this process, so a caller's made-up names never do; its failures count from then on."""

    MAX_MODELS = 1000  # NOTE: a pool of more models than this stops adding series, rather than grow

    def __init__(self, prefix: str, registry: CollectorRegistry | None, enabled: bool = True,
                 tally: Tally | Direct = DIRECT):
        counter, _gauge, histogram = _kinds(enabled)
        r, mv = registry, ["model", "version"]
        self.tally = tally  # how updates are written: at once, or once per event-loop turn
        self.requests = counter(f"{prefix}_model_requests", "Predictions answered or failed, by model (once "
                                "it has answered here).", mv, registry=r)
        self.failures = counter(f"{prefix}_model_failures", "Predictions that failed, by model and reason (the "
                                "error type).", [*mv, "reason"], registry=r)
        self.queue = histogram(f"{prefix}_model_queue_wait_seconds", "From sending a prediction to its worker "
                               "taking it up, and back: client, broker queue and network (Server-Timing's "
                               "queue), by model.", mv, buckets=LATENCY_BUCKETS, registry=r)
        self.inference = histogram(f"{prefix}_model_inference_seconds", "InferenceSession.run time the worker "
                                   "reported, by model.", mv, buckets=LATENCY_BUCKETS, registry=r)
        self._known: dict[tuple[str, str], tuple] = {}  # (model, version) -> its label children
        self._served: dict[str, str] = {}  # model -> the version that last answered for it here

    def answered(self, model: str, timing: dict) -> None:
        """A prediction answered; `timing` holds call_ms, the worker's worker_ms and inference_ms, and the
        version that served (the worker's reply names it; VERSION when it does not)."""
        version = timing.get("version")
        version = str(version) if type(version) in (str, int) else VERSION
        bound = self._known.get((model, version))
        if bound is None:
            if len(self._known) >= self.MAX_MODELS:
                return
            labels = (model, version)
            bound = self._known[labels] = (self.requests.labels(*labels), self.queue.labels(*labels),
                                           self.inference.labels(*labels))
        self._served[model] = version
        tally = self.tally
        tally.inc(bound[0])
        worker_ms, inference_ms = timing.get("worker_ms"), timing.get("inference_ms")
        if type(worker_ms) is float:
            tally.observe(bound[1], max(timing.get("call_ms", 0.0) - worker_ms, 0.0) / 1e3)
        if type(inference_ms) is float:
            tally.observe(bound[2], inference_ms / 1e3)

    def failed(self, model: str, reason: str) -> None:
        """A prediction failed. A failure names no version (no worker answered it), so it counts under the
        version that last answered for `model` here."""
        version = self._served.get(model)
        if version is None:
            return  # never answered here: perhaps no such model, so no series
        self.tally.inc(self._known[(model, version)][0])
        self.tally.inc(self.failures.labels(model, version, reason))


class NullCallerModelMetrics(CallerModelMetrics):
    """CallerModelMetrics with metrics off: the same attributes, as no-op metrics; nothing counts."""

    def __init__(self, prefix: str):
        super().__init__(prefix, None, enabled=False)

    def answered(self, model: str, timing: dict) -> None:
        """Nothing counts."""

    def failed(self, model: str, reason: str) -> None:
        """Nothing counts."""


# HTTP methods a request is counted under; any other is OTHER (clients choose methods: bound the label).
METHODS = frozenset({"GET", "POST", "PUT", "DELETE", "HEAD", "OPTIONS", "PATCH"})


class FrontendMetrics:
    """Under gunicorn these live in prometheus-client's multiprocess mode (frontend/gunicorn_conf.py).

    Per-request updates go through `tally`, written once per event-loop turn (metrics/tally.py).
    """

    timed = True  # a prediction's timing map feeds its model's series (frontend/timing.py)

    def __init__(self, registry: CollectorRegistry | None, enabled: bool = True):
        counter, gauge, histogram = _kinds(enabled)
        r = registry
        self.tally = Tally()
        self.requests = counter("fractal_frontend_requests", "HTTP requests, by route template, method and "
                                "status.", ["route", "method", "status"], registry=r)
        self.duration = histogram("fractal_frontend_request_duration_seconds", "HTTP request latency.",
                                  ["route", "method"], buckets=LATENCY_BUCKETS, registry=r)
        self.in_flight = gauge("fractal_frontend_requests_in_flight", "HTTP requests being handled.",
                               registry=r, multiprocess_mode="livesum")
        self.models = CallerModelMetrics("fractal_frontend", registry, enabled, self.tally)
        self._bound: dict[tuple, tuple] = {}  # (route, method, status) -> label children, made once

    def request_started(self) -> None:
        """A request came in: one more in flight until its request_done."""
        self.tally.inc(self.in_flight)

    def request_done(self, route: str | None, method: str, status: str, elapsed_s: float) -> None:
        """Count a request by its route template (None: no route matched), method and status."""
        tally = self.tally
        tally.inc(self.in_flight, -1.0)
        key = (route or "unmatched", method if method in METHODS else "OTHER", status)
        bound = self._bound.get(key)
        if bound is None:
            bound = self._bound[key] = (self.requests.labels(*key), self.duration.labels(*key[:2]))
        tally.inc(bound[0])
        tally.observe(bound[1], elapsed_s)

    @staticmethod
    def disabled() -> NullFrontendMetrics:
        """The no-op twin, for a frontend run with metrics off (FRACTAL_FRONTEND_METRICS=false)."""
        return NullFrontendMetrics()


class NullFrontendMetrics(FrontendMetrics):
    """FrontendMetrics with metrics off, so the frontend's code has no `if metrics` branches: built by
    FrontendMetrics' own __init__ from no-op metrics (a new metric cannot be left out of it); its methods
    do nothing, and a prediction needs no timing map for it."""

    timed = False

    def __init__(self) -> None:
        super().__init__(None, enabled=False)
        self.models = NullCallerModelMetrics("fractal_frontend")

    def request_started(self) -> None:
        """Nothing counts."""

    def request_done(self, route: str | None, method: str, status: str, elapsed_s: float) -> None:
        """Nothing counts."""


class GrpcMetrics:
    """The gRPC frontend's calls; `rpc` is one of the service's method names, never a client's string."""

    def __init__(self, registry: CollectorRegistry | None, enabled: bool = True):
        counter, gauge, histogram = _kinds(enabled)
        r = registry
        self.requests = counter("fractal_grpc_requests", "gRPC calls, by RPC and status code.", ["rpc", "code"],
                                registry=r)
        self.duration = histogram("fractal_grpc_request_duration_seconds", "gRPC call latency, by RPC.", ["rpc"],
                                  buckets=LATENCY_BUCKETS, registry=r)
        self.in_flight = gauge("fractal_grpc_requests_in_flight", "gRPC calls being handled.", registry=r)
        self.models = CallerModelMetrics("fractal_grpc", registry, enabled)
        self._bound: dict[tuple, tuple] = {}

    def call_done(self, rpc: str, code: str, seconds: float) -> None:
        bound = self._bound.get((rpc, code))
        if bound is None:
            bound = self._bound[(rpc, code)] = (self.requests.labels(rpc, code), self.duration.labels(rpc))
        bound[0].inc()
        bound[1].observe(seconds)
