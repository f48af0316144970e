"""Answer a pack (docs/protocol.md, "Packs"): its predicts for one batchable model run as one
InferenceSession.run, every other sub-request runs alone, and each gets its own reply, in order.

The rows of a pack are all here already, so they batch with no delay whenever the model is batchable
(every input and output has a dynamic first dimension) and its sidecar does not turn batching off
(`"dynamic_batching": false`), even when the worker's own dynamic batching is off: that setting
bounds how long a request may *wait* for others, and a pack's rows do not wait. With batching on,
its `max_batch_size` also bounds the rows of one run.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from broker import protocol as p
from broker.protocol import model_file_name

from .batching import BatchPolicy, Queue, policy_for, run_batch
from .jobs import Job

if TYPE_CHECKING:
    from .modelhost import ModelHost
    from .sessions import LoadedModel

PACK_MAX_ROWS = 4096  # rows of one run when the worker's own batching is off (and sets no bound)
UNBATCHED = BatchPolicy(PACK_MAX_ROWS, 0)


def run_pack(host: "ModelHost", pack: Job) -> list[Job]:
    """Run a pack's requests, each a job answered through host.answer into the pack (in order), and
    return them; raises ProtocolError when the pack is malformed (the caller answers it as a whole).
    A member whose deadline cannot be met by its turn is answered Timeout without running. Every
    member's worker_ms counts from the pack's arrival, batched or not, as a request's alone does."""
    subs = p.unpack_pack(pack.fields)
    deadlines = _deadlines(pack.fields, subs, pack.received)
    members = [Job.of(sub, pack.client, pack.received, pack.arrived, deadline)
               for sub, deadline in zip(subs, deadlines, strict=True)]
    queues: dict[str, Queue] = {}
    models: dict[Any, Any] = {}  # each model is checked once per pack: its calls arrived together
    for member in members:
        member.in_pack = True
        joined = _batching(host, member, models)
        if joined is None:
            host.answer(member, host.run_alone(member))
            continue
        model, policy = joined
        queue = queues.get(model.name)
        if queue is None:
            queue = queues[model.name] = Queue(policy)
        host.join(member, model, queue)
    for queue in queues.values():
        while queue.items:
            batch = host.live(queue.take())
            if batch:
                run_batch(batch)
    return members


def reply_body(pack: Job, members: list[Job], node: str) -> list:
    """Body frames of the pack's one reply: each member's, in the pack's order."""
    writer = p.PackWriter()
    for member in members:
        writer.add_reply(member.rid, node, member.outcome)
    return writer.reply(pack.rid, node)


def _deadlines(request: dict, subs: list, received_at: float) -> list[float]:
    """Each sub-request's deadline on our monotonic clock. A sub's deadline_ms was written when the
    client sent the pack, the pack's (their latest) again when the broker dispatched it: the
    difference is the time the pack spent on the way, which every sub has spent too."""
    sent = [d for d in (s.get("deadline_ms") for s in subs if isinstance(s, dict)) if type(d) is int]
    head = request.get("deadline_ms")
    shift = max(0, max(sent) - head) if sent and type(head) is int else 0
    return [p.deadline_of(s, received_at, shift) if isinstance(s, dict) else float("inf") for s in subs]


def _batching(host: "ModelHost", member: Job, models: dict) -> "tuple[LoadedModel, BatchPolicy] | None":
    """Whether a member joins a batch of the pack, and with which model and policy: a predict for a
    batchable model whose sidecar does not turn batching off. None: it runs alone (also when its model
    does not load: running alone answers it the same error)."""
    if member.op != "predict":
        return None
    name, version = member.model, member.version
    key = (name, version) if isinstance(name, str) and isinstance(version, (str, int, type(None))) else None
    found = models.get(key) if key is not None else None
    if found is None:
        try:
            model = host.pool.load(model_file_name(name), version)
            options = host.pool.sidecar(model.name).get("dynamic_batching")
        except Exception:
            return None
        found = models[key] = (model, policy_for(model, host.policy, options, UNBATCHED))
    model, policy = found
    return None if policy is None else (model, policy)
