"""Answer a pack (docs/protocol.md, "Packs"): its predicts for one batchable model run as one
InferenceSession.run, every other sub-request runs alone, and each gets its own reply, in order.

The rows of a pack are all here already, so they batch with no delay whenever the model is batchable
(every input and output has a dynamic first dimension) and its sidecar does not turn batching off
(`"dynamic_batching": false`), even when the worker's own dynamic batching is off: that setting
bounds how long a request may *wait* for others, and a pack's rows do not wait. With batching on,
its `max_batch_size` also bounds the rows of one run.
"""
from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

from broker import protocol as p
from broker.errors import BadInput, FractalError
from broker.protocol import model_file_name
from metrics import tracing

from .batching import BatchPolicy, Queue, batchable, prepare, run_batch
from .inference import worker_time

if TYPE_CHECKING:
    from .modelhost import ModelHost
    from .sessions import LoadedModel

log = logging.getLogger(__name__)

PACK_MAX_ROWS = 4096  # rows of one run when the worker's own batching is off (and sets no bound)


def run_pack(host: "ModelHost", request: dict, received_at: float | None = None,
             arrived: float | None = None) -> list:
    """Reply body frames for a decoded pack request; raises ProtocolError when it is malformed (the
    caller answers the whole pack with that error). With `received_at` (monotonic), a sub-request
    whose deadline has passed by its turn is answered Timeout without running. Every request's
    worker_ms counts from `arrived` (the pack's receipt, a perf_counter; None: now), batched or not,
    as a request's alone does."""
    subs = p.unpack_pack(request)
    started = time.perf_counter() if arrived is None else arrived
    outcomes: list = [None] * len(subs)
    queues: dict[str, Queue] = {}
    models: dict[str, Any] = {}  # each model is checked once per pack: its calls arrived together
    deadlines = _deadlines(request, subs, received_at)
    for index, sub in enumerate(subs):
        if not _queued(host, sub, index, outcomes, queues, models, started, deadlines[index]):
            outcomes[index] = host.answer(sub, deadlines[index], started)
    for queue in queues.values():
        while queue.items:
            batch = host.live(queue.take())
            if batch:
                run_batch(batch)
    writer = p.PackWriter()
    for rid, outcome in outcomes:
        writer.add_reply(rid, host.node, outcome)
    body = writer.reply(request.get("id"), host.node)
    if tracing.ENABLED:
        tracing.pack_done(request, subs, host.node)
    return body


def _deadlines(request: dict, subs: list, received_at: float | None) -> list[float]:
    """Each sub-request's deadline on our monotonic clock. A sub's deadline_ms was written when the
    client sent the pack, the pack's (their latest) again when the broker dispatched it: the
    difference is the time the pack spent on the way, which every sub has spent too."""
    if received_at is None:
        return [float("inf")] * len(subs)
    sent = [d for d in (s.get("deadline_ms") for s in subs if isinstance(s, dict)) if type(d) is int]
    head = request.get("deadline_ms")
    shift = max(0, max(sent) - head) if sent and type(head) is int else 0
    return [p.deadline_of(s, received_at, shift) if isinstance(s, dict) else float("inf") for s in subs]


def _policy(default: BatchPolicy, options: Any, model: LoadedModel) -> BatchPolicy | None:
    """The batching a pack applies to `model`'s predicts; None runs them alone."""
    if options is False or not batchable(model):
        return None
    policy = default.override(options)
    return policy if policy.enabled else BatchPolicy(PACK_MAX_ROWS, 0)


def _queued(host: "ModelHost", sub: Any, index: int, outcomes: list, queues: dict, models: dict,
            started: float, expires_at: float) -> bool:
    """Queue a predict for a batchable model (True), or leave the sub-request to run alone (False)."""
    if not isinstance(sub, dict) or sub.get("op") != "predict":
        return False
    name, version = sub.get("model"), sub.get("version")
    key = (name, version) if isinstance(name, str) and isinstance(version, (str, int, type(None))) else None
    found = models.get(key) if key is not None else None
    if found is None:
        try:
            model = host.pool.load(model_file_name(name), version)
            options = host.pool.sidecar(model.name).get("dynamic_batching")
        except Exception:
            return False  # answer() gives it the same error, alone
        found = models[key] = (model, _policy(host.policy, options, model))
    model, policy = found
    if policy is None:
        return False
    reply = _replier(host, sub, index, outcomes, model.name, started)
    try:
        pending = prepare(model, sub.get("inputs"), sub.get("outputs"), reply, 0.0)
    except Exception as exc:
        reply(exc if isinstance(exc, FractalError) else BadInput(f"cannot use this request: {exc}"))
        return True
    pending.expires_at = expires_at
    queue = queues.get(model.name)
    if queue is None:
        queue = queues[model.name] = Queue(policy)
    queue.items.append(pending)
    return True


def _replier(host: "ModelHost", sub: dict, index: int, outcomes: list, model: str, started: float):
    rid, trace = sub.get("id"), sub.get("request_id")

    def reply(outcome: Any) -> None:
        if tracing.ENABLED:
            tracing.answered(sub, outcome)
        worker_time(outcome, started)  # NOTE: from the pack's arrival: its rows waited for the run together
        outcomes[index] = (rid, outcome)
        host.request_done("predict", trace, model, outcome, started, batched=True)
    return reply

