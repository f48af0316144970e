"""metrics/tally.py: updates kept for an event-loop turn reach the registry as the direct calls would
(in-process: pure logic over real prometheus-client metrics)."""
from __future__ import annotations

import asyncio
import math

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from metrics import LATENCY_BUCKETS
from metrics.tally import Tally

VALUES = [0.0, 0.00005, 0.0001, 0.00011, 0.0025, 0.003, 0.7, 10.0, 11.0, 0.0001, 0.5, math.nan]


def series(registry: CollectorRegistry) -> dict:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value for m in registry.collect() for s in m.samples
            if not s.name.endswith("_created")}


def metrics(registry: CollectorRegistry) -> tuple[Counter, Gauge, Histogram]:
    return (Counter("c", "c", ["k"], registry=registry), Gauge("g", "g", registry=registry),
            Histogram("h", "h", ["k"], buckets=LATENCY_BUCKETS, registry=registry))


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(a[k] == b[k] or (math.isnan(a[k]) and math.isnan(b[k])) for k in a)


def test_a_turns_updates_reach_the_registry_as_direct_calls_would():
    direct, kept = CollectorRegistry(), CollectorRegistry()
    (c1, g1, h1), (c2, g2, h2) = metrics(direct), metrics(kept)
    for v in VALUES:
        c1.labels("a").inc()
        g1.inc()
        h1.labels("a").observe(v)
    g1.dec(3)
    h1.labels("b").observe(0.2)
    tally = Tally()
    seen: dict = {}

    async def turn() -> None:
        for v in VALUES:
            tally.inc(c2.labels("a"))
            tally.inc(g2)
            tally.observe(h2.labels("a"), v)
        tally.inc(g2, -3.0)
        tally.observe(h2.labels("b"), 0.2)
        seen["during"] = series(kept)
        await asyncio.sleep(0)  # the turn ends: the flush runs
        seen["after"] = series(kept)

    asyncio.run(turn())
    assert seen["during"][("c_total", (("k", "a"),))] == 0  # kept for the turn
    assert same(seen["after"], series(direct))
    assert seen["after"][("h_count", (("k", "a"),))] == len(VALUES) - 1  # NaN: in the sum, in no bucket


def test_flush_writes_at_once_and_outside_a_loop_updates_are_not_kept():
    registry = CollectorRegistry()
    counter, gauge, _ = metrics(registry)
    tally = Tally()
    tally.inc(counter.labels("x"), 2.0)  # no running loop: written now
    assert registry.get_sample_value("c_total", {"k": "x"}) == 2.0

    async def scrape() -> float | None:
        tally.inc(gauge, 5.0)
        tally.flush()  # as GET /metrics does before reading
        return registry.get_sample_value("g")

    assert asyncio.run(scrape()) == 5.0
