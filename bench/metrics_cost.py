"""CPU cost of the metric calls one REST prediction makes, tier by tier, with the real metric classes.

    python bench/metrics_cost.py

A/B throughput runs on a shared 2-core VM swing +-15 % between identical runs, more than the effect
measured; this times exactly what metrics add per request (the frontend in prometheus-client's
multiprocess mode, as under gunicorn) so it can be set against the server's CPU per request.
"""
from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="fractal-metrics-cost-")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from prometheus_client import CollectorRegistry  # noqa: E402

from metrics import BrokerMetrics, FrontendMetrics, WorkerMetrics  # noqa: E402
from metrics.tally import DIRECT  # noqa: E402

N = 50_000


def per_call_us(fn) -> float:
    for _ in range(1000):
        fn()
    started = time.perf_counter()
    for _ in range(N):
        fn()
    return (time.perf_counter() - started) / N * 1e6


def frontend() -> float:
    """Each update written at once, as before the frontend's Tally (metrics/tally.py)."""
    m = FrontendMetrics(None)  # multiprocess files, as under gunicorn
    m.models.tally = DIRECT
    requests = m.requests.labels("/api/v1/models/{name}/prediction", "POST", "200")
    duration = m.duration.labels("/api/v1/models/{name}/prediction", "POST")

    timing = {"call_ms": 0.5, "worker_ms": 0.1, "inference_ms": 0.05}

    def one() -> None:
        started = time.perf_counter()
        m.in_flight.inc()
        m.in_flight.dec()
        requests.inc()
        duration.observe(time.perf_counter() - started)
        m.models.answered("iris.onnx", timing)
    return per_call_us(one)


def frontend_tally(per_turn: int) -> float:
    """As frontend(), through the Tally the frontend writes with: `per_turn` requests end per loop turn."""
    import asyncio
    m = FrontendMetrics(None)
    requests = m.requests.labels("/api/v1/models/{name}/prediction", "POST", "200")
    duration = m.duration.labels("/api/v1/models/{name}/prediction", "POST")
    timing = {"call_ms": 0.5, "worker_ms": 0.1, "inference_ms": 0.05}
    tally, turns = m.tally, N // per_turn

    async def run() -> float:
        started = time.perf_counter()
        for _ in range(turns):
            for _ in range(per_turn):
                began = time.perf_counter()
                tally.inc(m.in_flight)
                tally.inc(m.in_flight, -1.0)
                tally.inc(requests)
                tally.observe(duration, time.perf_counter() - began)
                m.models.answered("iris.onnx", timing)
            await asyncio.sleep(0)  # the turn ends: the tally writes
        return (time.perf_counter() - started) / (turns * per_turn) * 1e6
    return asyncio.run(run())


def broker() -> float:
    m = BrokerMetrics(CollectorRegistry())
    dispatched, completed = m.dispatched.labels("modelhost"), m.completed.labels("modelhost")
    duration, queue_wait = m.duration.labels("modelhost"), m.queue_wait.labels("modelhost")

    def one() -> None:
        received = time.monotonic()
        dispatched.inc()
        queue_wait.observe(time.monotonic() - received)
        completed.inc()
        duration.observe(time.monotonic() - received)
    return per_call_us(one)


def worker(m: WorkerMetrics) -> float:
    """A predict's metric calls; with WorkerMetrics.disabled(), what metrics off costs (no-op calls)."""
    series = m.model_series("iris.onnx")

    def one() -> None:
        started = time.perf_counter()
        m.cache_hits.inc()
        series.inference.observe(time.perf_counter() - started)
        series.batch_rows.observe(1)
        m.request_done("predict", "ok", time.perf_counter() - started)
        m.model_done("iris.onnx", None)
    return per_call_us(one)


def frontend_off() -> float:
    """The calls Observe makes per request with metrics off: FrontendMetrics' no-op twin."""
    m = FrontendMetrics.disabled()
    timing = {"call_ms": 0.5, "worker_ms": 0.1, "inference_ms": 0.05}

    def one() -> None:
        started = time.perf_counter()
        m.request_started()
        m.request_done("/api/v1/models/{name}/prediction", "POST", "200", time.perf_counter() - started)
        m.models.answered("iris.onnx", timing)
    return per_call_us(one)


def main() -> dict[str, float]:
    costs = {"frontend": frontend(), "broker": broker(), "worker": worker(WorkerMetrics(CollectorRegistry(), "n"))}
    for tier, us in costs.items():
        print(f"  {tier:9} {us:5.1f} us of metric calls per request")
    for per_turn in (1, 4, 16):
        print(f"  frontend through its Tally, {per_turn:2} requests per loop turn: {frontend_tally(per_turn):5.1f} us")
    print(f"  {'total':9} {sum(costs.values()):5.1f} us")
    print(f"  metrics off (the no-op twins): frontend {frontend_off():4.2f} us, "
          f"worker {worker(WorkerMetrics.disabled('n')):4.2f} us per request")
    return costs


if __name__ == "__main__":
    main()
