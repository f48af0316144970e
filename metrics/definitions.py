"""Every FRACTAL metric, defined once: one class per component, built on the registry it reports to.

Names follow Prometheus conventions with the fractal_ prefix; counters get _total from the client
library. Label children used on the hot path are bound once, not looked up per request. A component
run with metrics off gets the same attributes as no-op objects, so its code has no branches.
"""
from __future__ import annotations

from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

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


def observe_many(child: object, value: float, count: int) -> None:
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
                                "broker itself, by reason.", ["service", "reason"], registry=r)
        self.dropped = counter("fractal_broker_dropped_messages", "Malformed or unexpected messages logged "
                               "and dropped.", registry=r)
        self.worker_deaths = counter("fractal_broker_worker_deaths", "Workers declared dead after missing "
                                     "heartbeats.", registry=r)
        self.duration = histogram("fractal_broker_request_duration_seconds", "From a client's REQUEST to the "
                                  "FINAL reply.", s, buckets=LATENCY_BUCKETS, registry=r)
        self.queue_wait = histogram("fractal_broker_queue_wait_seconds", "From a client's REQUEST to its "
                                    "first dispatch to a worker.", s, buckets=LATENCY_BUCKETS, registry=r)

    def forget_service(self, service: str) -> None:
        """Drop a service's series when it has no workers left (peers choose service names)."""
        for metric in (self.workers, self.idle_workers, self.queue_depth, self.dispatched, self.completed,
                       self.redispatched, self.expired, self.duration, self.queue_wait):
            try:
                metric.remove(service)
            except KeyError:
                pass
        for reason in ("overloaded", "no_worker", "worker_lost", "bad_request", "stopping"):
            try:
                self.rejected.remove(service, reason)
            except KeyError:
                pass


class WorkerMetrics:
    def __init__(self, registry: CollectorRegistry | None, node: str, enabled: bool = True):
        counter, gauge, histogram = _kinds(enabled)
        r, n = registry, ["node"]
        self.node = node
        self.requests = counter("fractal_worker_requests", "Requests answered, by op and outcome.",
                                ["node", "op", "outcome"], registry=r)
        self.request_seconds = histogram("fractal_worker_request_duration_seconds", "Handling time of a "
                                         "request, decoded body to encoded reply.", ["node", "op"],
                                         buckets=LATENCY_BUCKETS, registry=r)
        self.inference_seconds = histogram("fractal_worker_inference_seconds", "InferenceSession.run time.",
                                           ["node", "model"], buckets=LATENCY_BUCKETS, registry=r)
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
        self.memory_rss = gauge("fractal_worker_memory_rss_bytes", "Resident memory of the worker process.",
                                n, registry=r).labels(node)
        self._bound: dict[tuple, tuple] = {}

    def request_done(self, op: str, outcome: str, seconds: float) -> None:
        bound = self._bound.get((op, outcome))
        if bound is None:
            bound = self._bound[(op, outcome)] = (self.requests.labels(self.node, op, outcome),
                                                  self.request_seconds.labels(self.node, op))
        bound[0].inc()
        bound[1].observe(seconds)


class FrontendMetrics:
    """Under gunicorn these live in prometheus-client's multiprocess mode (frontend/gunicorn_conf.py)."""

    def __init__(self, registry: CollectorRegistry | None, enabled: bool = True):
        counter, gauge, histogram = _kinds(enabled)
        r = registry
        self.requests = counter("fractal_frontend_requests", "HTTP requests, by route template, method and "
                                "status.", ["route", "method", "status"], registry=r)
        self.duration = histogram("fractal_frontend_request_duration_seconds", "HTTP request latency.",
                                  ["route", "method"], buckets=LATENCY_BUCKETS, registry=r)
        self.in_flight = gauge("fractal_frontend_requests_in_flight", "HTTP requests being handled.",
                               registry=r, multiprocess_mode="livesum")


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
        self._bound: dict[tuple, tuple] = {}

    def call_done(self, rpc: str, code: str, seconds: float) -> None:
        bound = self._bound.get((rpc, code))
        if bound is None:
            bound = self._bound[(rpc, code)] = (self.requests.labels(rpc, code), self.duration.labels(rpc))
        bound[0].inc()
        bound[1].observe(seconds)
