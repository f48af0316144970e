"""What the broker knows about each worker, for `mmi.workers` (the status page's source).

MDP gives the broker no way to ask a worker about itself, so the broker sends an ordinary REQUEST
{"op": "status"} to an idle worker every `status_interval_s`, from a client address no ZeroMQ peer
has; the worker's FINAL updates the board instead of going to a client. Workers see plain MDP. The
broker sends it as one of its own requests (broker.Request.internal), whose answer goes to
`StatusBoard.answered`: which workers to ask, what to ask and what the answer means live here.
"""
from __future__ import annotations

import logging
import os
import time
from typing import Any, Iterable

from . import protocol as p

log = logging.getLogger(__name__)

# NOTE: libzmq's generated routing ids are 5 bytes starting with 0; this one cannot be a peer's.
STATUS_CLIENT = b"\x00fractal-broker-status"
STATUS_BODY = p.request_body(0, "status", {})


class StatusBoard:
    def __init__(self, interval_s: float):
        self.interval_s = interval_s
        self.started = time.time()
        self._status: dict[bytes, tuple[float, dict]] = {}   # identity -> (when, worker's status)
        # identity -> (the models it holds, as the routing header names them; its load), for placement
        self._placement: dict[bytes, tuple[frozenset[bytes], float]] = {}
        self._held_by: dict[bytes, set[bytes]] = {}  # model -> identities holding it, for placement's wait
        # identity -> the models its last status reported resident; their union, for per-model metrics
        self._reported: dict[bytes, frozenset[bytes]] = {}
        self.resident: frozenset[bytes] = frozenset()
        # identity -> {model: max replicas} its last status advertised (model_replicas); merged, for placement
        self._limits: dict[bytes, dict[bytes, int]] = {}
        self._max: dict[bytes, int] = {}

    def due(self, identity: bytes, now: float) -> bool:
        entry = self._status.get(identity)
        return entry is None or now - entry[0] >= self.interval_s

    def to_ask(self, idle: Iterable[Any], now: float) -> list[Any]:
        """The workers among `idle` to ask now (RFC-dialect ones whose status is stale: a majortomo one
        would run no op it does not know), marked asked."""
        chosen = [w for w in idle if w.dialect is p.Dialect.RFC and self.due(w.identity, now)]
        for worker in chosen:
            self.asked(worker.identity, now)
        return chosen

    def asked(self, identity: bytes, now: float) -> None:
        """Remember the time of asking, so a worker that never answers is not asked every tick."""
        entry = self._status.get(identity)
        self._status[identity] = (now, entry[1] if entry else {})

    def answered(self, identity: bytes, body: list, now: float) -> None:
        try:
            reply = p.unpack_body(body)
            status = p.result_of(reply) if isinstance(reply, dict) else None
        except Exception as exc:  # a worker that does not know the op (another implementation)
            log.debug("worker %s gave no status: %s", identity.hex(), exc)
            status = None
        status = status if isinstance(status, dict) else {}
        if status.get("node") and not self._status.get(identity, (0, {}))[1].get("node"):
            # NOTE: READY carries no name; this line ties the routing id in the broker's log to the node id.
            log.info("worker %s is node %s (pid %s)", identity.hex(), status["node"], status.get("pid"))
        self._status[identity] = (now, status)
        entry = _placement(status)
        self._set_placement(identity, entry)
        self._reported[identity] = entry[0]
        self.resident = frozenset().union(*self._reported.values())
        limits = _limits(status)
        if limits or self._limits.pop(identity, {}):
            if limits:
                self._limits[identity] = limits
            self._merge_limits()

    def forget(self, identity: bytes) -> None:
        self._status.pop(identity, None)
        self._set_placement(identity, None)
        if self._reported.pop(identity, None):
            self.resident = frozenset().union(*self._reported.values())
        if self._limits.pop(identity, {}):
            self._merge_limits()

    def _merge_limits(self) -> None:
        """Each model's `max` replicas: the smallest any worker advertises (they read one pool's sidecars;
        the smallest is the safe reading while a changed sidecar reaches them one scan at a time)."""
        merged: dict[bytes, int] = {}
        for limits in self._limits.values():
            for model, limit in limits.items():
                merged[model] = min(limit, merged.get(model, limit))
        self._max = merged

    def limit(self, model: bytes) -> int:
        """`model`'s `max` replicas as workers advertise it; 0: no limit."""
        return self._max.get(model, 0)

    def full(self, model: bytes) -> bool:
        """Whether `model` has its sidecar's `max` replicas held already (placement places it on no further
        worker): workers holding it by their last status or by what they were sent since (`loading`)."""
        limit = self._max.get(model)
        return limit is not None and len(self._held_by.get(model, ())) >= limit

    def loading(self, identity: bytes, model: bytes) -> None:
        """Note that `model` was sent to this worker, which holds it once it answers: placement counts
        it as a holder at once, not only at the next status poll (polls wait while requests queue)."""
        held, load = self._placement.get(identity, (frozenset(), 0.0))
        if model not in held:
            self._set_placement(identity, (held | {model}, load))

    def holds(self, identity: bytes, model: bytes) -> bool:
        entry = self._placement.get(identity)
        return entry is not None and model in entry[0]

    def held(self, model: bytes) -> bool:
        """Whether any worker (idle or busy) holds `model`, by its last status or what it was sent."""
        return bool(self._held_by.get(model))

    def holders(self, model: bytes) -> Iterable[bytes]:
        """The identities of the workers that hold `model` (as held() counts them)."""
        return self._held_by.get(model, ())

    def _set_placement(self, identity: bytes, entry: tuple[frozenset[bytes], float] | None) -> None:
        old = self._placement.pop(identity, None)
        for model in old[0] if old else ():
            holders = self._held_by[model]
            holders.discard(identity)
            if not holders:
                del self._held_by[model]
        if entry is not None:
            self._placement[identity] = entry
            for model in entry[0]:
                self._held_by.setdefault(model, set()).add(identity)

    def pick(self, idle: Iterable[Any], model: bytes) -> int:
        """The index in `idle` (workers, least recently used first) of the worker a request for `model`
        goes to: the first that holds it (by its last status), else the least loaded one (resident
        bytes when it reports them, else resident models; the least recently used among equals)."""
        best, best_load = 0, float("inf")
        unknown: tuple[frozenset[bytes], float] = (frozenset(), 0.0)
        for index, worker in enumerate(idle):
            holds, load = self._placement.get(worker.identity, unknown)
            if model in holds:
                return index
            if load < best_load:
                best, best_load = index, load
        return best

    def report(self, workers: list, services: dict, now: float, expiry_s: float) -> dict[str, Any]:
        rows = []
        for w in workers:
            when, status = self._status.get(w.identity, (None, {}))
            rows.append({
                "identity": w.identity.hex(), "service": w.service.name.decode(errors="replace"),
                "node": status.get("node"), "state": "busy" if w.request is not None else "idle",
                "dialect": w.dialect.value,
                "heartbeat_age_s": round(max(0.0, now - (w.expires_at - expiry_s)), 3),
                "requests_served": w.served, "models_resident": status.get("models_resident"),
                "resident_bytes": status.get("resident_bytes"),
                "memory_budget_bytes": status.get("memory_budget_bytes"),
                "models_pinned": status.get("models_pinned"), "model_replicas": status.get("model_replicas"),
                "pid": status.get("pid"), "memory_rss_bytes": status.get("memory_rss_bytes"),
                "model_stats": status.get("model_stats"),
                "status_age_s": None if when is None else round(now - when, 3),
            })
        return {"broker": {"up": True, "pid": os.getpid(), "uptime_s": round(time.time() - self.started, 3),
                           "services": {s.name.decode(errors="replace"): {
                               "workers": s.workers, "idle": len(s.idle), "queued": s.queued}
                               for s in services.values()}},
                "workers": rows}


def _limits(status: dict) -> dict[bytes, int]:
    """{model: max replicas} from a worker's `model_replicas` (max 0: no limit, left out); garbage is none."""
    found: dict[bytes, int] = {}
    replicas = status.get("model_replicas")
    if isinstance(replicas, dict):
        for name, policy in replicas.items():
            limit = policy.get("max") if isinstance(policy, dict) else None
            if isinstance(name, str) and type(limit) is int and limit > 0:
                found[name.encode("utf-8", "replace")] = limit
    return found


def _placement(status: dict) -> tuple[frozenset[bytes], float]:
    """(models held, load) from a worker's status answer; garbage counts as holding nothing."""
    names = status.get("models_resident")
    held: frozenset[bytes] = frozenset()
    if isinstance(names, list):
        held = frozenset(n.encode("utf-8", "replace") for n in names if isinstance(n, str))
    resident = status.get("resident_bytes")
    if isinstance(resident, (int, float)) and not isinstance(resident, bool):
        return held, float(resident)
    return held, float(len(held))
