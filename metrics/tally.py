"""A frontend process's per-request metric updates, summed in memory and written once per event-loop turn.

In prometheus-client's multiprocess mode (the frontend under gunicorn) every counter increment and
every histogram observation is an mmap write under a lock with a pid check; one prediction made ten of
them. A `Tally` sums the updates of one event-loop turn per series and writes each series once, from a
callback the turn's first update schedules with `loop.call_soon` (issue 13: the frontend's CPU per
request). What reaches the files is exact as of the end of the turn that finished a request: before its
process reads another request, so a scrape after an answer, served by the same process, counts it; a
scrape served by another process may miss requests finished within that turn (well under a millisecond).
"""
from __future__ import annotations

import asyncio
from bisect import bisect_left
from typing import Any


class Tally:
    """Counter and gauge increments and histogram observations of prometheus-client children, kept until
    `flush` (scheduled once per loop turn, or called before a scrape). Outside a running event loop an
    update is written at once."""

    __slots__ = ("_amounts", "_observed", "_scheduled")

    def __init__(self) -> None:
        self._amounts: dict[Any, float] = {}  # counter or gauge child -> amount to add (a gauge's may be < 0)
        self._observed: dict[Any, list[float]] = {}  # histogram child -> values observed
        self._scheduled = False

    def inc(self, child: Any, amount: float = 1.0) -> None:
        """`child.inc(amount)` by the end of this loop turn."""
        amounts = self._amounts
        amounts[child] = amounts.get(child, 0.0) + amount
        if not self._scheduled:
            self._schedule()

    def observe(self, child: Any, value: float) -> None:
        """`child.observe(value)` by the end of this loop turn."""
        values = self._observed.get(child)
        if values is None:
            self._observed[child] = [value]
        else:
            values.append(value)
        if not self._scheduled:
            self._schedule()

    def _schedule(self) -> None:
        try:
            asyncio.get_running_loop().call_soon(self.flush)
        except RuntimeError:  # no loop running (a caller outside the server): write now
            self.flush()
            return
        self._scheduled = True

    def flush(self) -> None:
        """Write every kept update: one write per counter or gauge, one per histogram sum and bucket."""
        self._scheduled = False
        amounts, self._amounts = self._amounts, {}
        observed, self._observed = self._observed, {}
        for child, amount in amounts.items():
            if amount:
                child.inc(amount)
        for child, values in observed.items():
            _observe_all(child, values)


class Direct:
    """A Tally's interface that writes each update at once (callers that want no deferral: gRPC)."""

    __slots__ = ()

    def inc(self, child: Any, amount: float = 1.0) -> None:
        child.inc(amount)

    def observe(self, child: Any, value: float) -> None:
        child.observe(value)

    def flush(self) -> None:
        """Nothing is kept."""


DIRECT = Direct()


def _observe_all(child: Any, values: list[float]) -> None:
    """`child.observe(v)` for each of `values`, with one write per bucket that got any.

    NOTE: uses prometheus_client's Histogram internals (_sum, _upper_bounds, _buckets), as
    definitions.observe_many does; tests/test_metrics_tally.py checks the exported series against
    observe's. observe puts a value in the first bucket whose bound is >= it: bisect_left.
    """
    bounds = getattr(child, "_upper_bounds", None)
    if bounds is None or len(values) == 1:
        for value in values:
            child.observe(value)
        return
    hits: dict[int, int] = {}
    for value in values:
        if value != value:
            continue  # NOTE: NaN is in no bucket, only in the sum, as with observe
        i = bisect_left(bounds, value)
        hits[i] = hits.get(i, 0) + 1
    child._sum.inc(sum(values))
    buckets = child._buckets
    for i, n in hits.items():
        buckets[i].inc(n)
