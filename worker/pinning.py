"""Pinned models: the sidecar's `replicas` policy, and warming a session with a sample input.

A model's sidecar may say `"replicas": {"min": 1, "max": 2}`. A worker cannot know the others
(the broker hands it requests, not a census), so it honours `min` the one way it can alone: every
worker pins every model whose `min` is at least 1, which gives `min` replicas whenever `min` workers
run. Pinned models load and are warmed at worker start, before it registers with the broker (with
repository polling, also once a scan has validated their file), and are never evicted. `max` is
checked and advertised in the status reply (`model_replicas`) for the broker's routing; a worker
alone cannot enforce it.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np

from .sessions import LoadedModel, TensorSpec

log = logging.getLogger(__name__)
_WARNED: set[tuple[str, str]] = set()  # (model, replicas) already logged as malformed


@dataclass(frozen=True)
class Replicas:
    min: int = 0   # replicas kept loaded at all times; >= 1 pins the model on every worker
    max: int = 0   # most replicas the broker should place; 0: no limit


def replicas_of(sidecar: dict, name: str) -> Replicas:
    """The sidecar's replicas policy; a malformed one is logged and read as none (a typo in a
    sidecar must not stop a worker from starting)."""
    options = sidecar.get("replicas")
    if options is None:
        return Replicas()
    lo = options.get("min", 0) if isinstance(options, dict) else None
    hi = options.get("max", 0) if isinstance(options, dict) else None
    if (type(lo) is not int or type(hi) is not int or lo < 0 or hi < 0 or (hi and hi < lo)
            or set(options) - {"min", "max"}):
        if (name, repr(options)) not in _WARNED:  # NOTE: poll mode asks on every scan: say it once
            _WARNED.add((name, repr(options)))
            log.warning("ignoring replicas %r in the sidecar of %s: expected {\"min\": N, \"max\": M} with "
                        "0 <= N <= M (M 0: no limit)", options, name)
        return Replicas()
    return Replicas(lo, hi)


def sample_feed(spec: TensorSpec) -> np.ndarray:
    """A zero (or empty-string) tensor of the input's shape, 1 for every dynamic dimension."""
    if spec.dtype is None:
        raise ValueError(f"input {spec.name!r} is of type {spec.type}, which has no sample")
    shape = tuple(1 if d is None else d for d in spec.shape)
    return np.full(shape, "", dtype=object) if spec.dtype.kind == "U" else np.zeros(shape, spec.dtype)


def warm(model: LoadedModel) -> bool:
    """Run the session once on sample inputs, so the first request does not pay for ONNX Runtime's
    first-run allocations; True when it ran. A model that refuses zeros stays pinned, only cold."""
    started = time.perf_counter()
    try:
        model.session.run(None, {spec.name: sample_feed(spec) for spec in model.inputs})
    except Exception as exc:  # ORT's own types, or no sample for the input's type
        log.warning("pinned model %s loaded but not warmed: %s", model.name, str(exc).strip()[:300])
        return False
    log.info("pinned %s: loaded and warmed in %.1f ms", model.name, (time.perf_counter() - started) * 1e3)
    return True
