"""The `Server-Timing` header of a prediction: where its time went, split without comparing clocks.

The frontend times the whole request and its wait for the broker's reply; the worker reports its own
time and its InferenceSession.run's in the reply (docs/protocol.md, "Timing"). So, in ms:

    frontend  = total - the wait for the reply     (reading, checking and encoding, here)
    queue     = the wait - the worker's time        (client, broker queue and wire both ways)
    worker    = the worker's time - inference       (decoding inputs, batch wait, collecting outputs)
    inference = InferenceSession.run                 (a batched request: its batch's run)

Each part is rounded down and the total up, to the µs, so the parts never add up to more than it.
"""
from __future__ import annotations

import math
import time
from typing import Any, Awaitable, Callable

import falcon.asgi

from broker.errors import FractalError
from metrics import CallerModelMetrics, tracing

HEADER = "Server-Timing"


def server_timing(total_ms: float, timing: dict) -> str:
    """The header's value from the request's total and the timing map filled by `timed`."""
    call = min(max(float(timing.get("call_ms", 0.0)), 0.0), total_ms)
    worker = min(max(_number(timing.get("worker_ms")), 0.0), call)
    inference = min(max(_number(timing.get("inference_ms")), 0.0), worker)
    floor = math.floor  # NOTE: one f-string, not a join over a generator: this runs on every prediction
    return (f"frontend;dur={floor((total_ms - call) * 1e3) / 1e3:.3f}, "
            f"queue;dur={floor((call - worker) * 1e3) / 1e3:.3f}, "
            f"worker;dur={floor((worker - inference) * 1e3) / 1e3:.3f}, "
            f"inference;dur={floor(inference * 1e3) / 1e3:.3f}, total;dur={math.ceil(total_ms * 1e3) / 1e3:.3f}")


def _number(value: Any) -> float:
    return float(value) if type(value) in (int, float) and math.isfinite(value) else 0.0


async def timed(timing: dict | None, model: str, call: Callable[[dict | None], Awaitable[Any]]) -> Any:
    """Await `call(timing)` (a client predict of `model` that fills `timing` with the worker's times),
    adding the wait as call_ms, or the error's type as error; with `timing` None (neither Server-Timing
    nor per-model metrics wanted) just await it. With tracing on, the call is a span of its own, whose
    traceparent the request carries to the worker."""
    span = tracing.BrokerCall("predict", model) if tracing.ENABLED else None
    if timing is None:
        if span is None:
            return await call(None)
        timing = {}
    timing["model"] = model
    started = time.perf_counter()
    try:
        result = await call(timing)
        timing["call_ms"] = (time.perf_counter() - started) * 1e3
    except FractalError as exc:
        timing["error"] = exc.__class__.__name__
        raise
    finally:
        if span is not None:
            span.end(timing)
    return result


def request_timing(req: falcon.asgi.Request) -> dict | None:
    """The timing map of this request, or None when nothing here wants it."""
    return getattr(req.context, "timing", None)


def count(models: CallerModelMetrics, timing: dict) -> None:
    """A prediction's per-model series, from the map `timed` filled (nothing for other calls)."""
    if "call_ms" in timing:
        models.answered(timing["model"], timing)
    elif "error" in timing:
        models.failed(timing["model"], timing["error"])
