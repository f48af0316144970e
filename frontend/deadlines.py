"""The caller's deadline of a prediction: `X-Request-Timeout` (seconds) or v2 `parameters.timeout` (µs).

The deadline travels with the request (docs/protocol.md, "Routing header"): the broker and the worker
drop a request whose caller has given up instead of running it. A caller may only shorten the
frontend's own `timeout_s`, never lengthen it.
"""
from __future__ import annotations

import math
from typing import Any

import falcon.asgi

from broker.errors import BadInput

from .headers import header

HEADER = "X-Request-Timeout"
_NAME = HEADER.lower().encode()


def header_timeout_s(req: falcon.asgi.Request, default_s: float) -> float:
    """`X-Request-Timeout` in seconds (a decimal number > 0), capped at `default_s`; `default_s` without
    the header. Raises BadInput for any other value."""
    text = header(req, _NAME)
    if text is None:
        return default_s
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise BadInput(f"{HEADER} must be a number of seconds > 0, such as 2.5; got {text[:40]!r}")
    return min(value, default_s)


def parameter_timeout_s(value: Any, default_s: float) -> float:
    """A v2 request's `parameters.timeout` (microseconds, as Triton reads it: a positive integer), in
    seconds and capped at `default_s`; `default_s` when it is None. Raises BadInput otherwise."""
    if value is None:
        return default_s
    if value.__class__ is not int or value <= 0:
        raise BadInput(f"'parameters.timeout' must be a positive integer of microseconds, such as 2500000; "
                       f"got {str(value)[:40]}")
    return min(value / 1e6, default_s)
