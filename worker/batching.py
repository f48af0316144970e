"""Dynamic batching: predict requests for the same model whose inputs have a dynamic first dimension
are concatenated, run in one InferenceSession.run, and the outputs split back by rows.

Each request is checked on its own first (names, dtypes, shapes), so a bad one fails alone; if the
batched run itself fails, its requests run one by one, so only the guilty one sees the error.
Knobs, per model in its sidecar JSON ({"dynamic_batching": {...}} or false) over the worker's
defaults, are Triton's: max_batch_size (rows), max_queue_delay_us, preferred_batch_sizes.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from broker.errors import BadInput, FractalError, InternalError
from metrics import tracing

from . import inference
from .sessions import LoadedModel

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BatchPolicy:
    max_batch_size: int = 0           # rows; 0 or 1 turns batching off
    max_queue_delay_us: int = 500
    preferred_batch_sizes: tuple[int, ...] = ()

    @property
    def enabled(self) -> bool:
        return self.max_batch_size > 1

    def override(self, options: Any) -> "BatchPolicy":
        """This policy with a model's sidecar options applied (False: off for that model).

        Options that do not parse are ignored (logged): a typo in a sidecar must not stop serving.
        """
        if options is False:
            return BatchPolicy(0)
        if not isinstance(options, dict):
            return self
        try:
            sizes = options.get("preferred_batch_sizes", self.preferred_batch_sizes)
            return BatchPolicy(int(options.get("max_batch_size", self.max_batch_size)),
                               int(options.get("max_queue_delay_us", self.max_queue_delay_us)),
                               tuple(int(s) for s in sizes))
        except (TypeError, ValueError) as exc:
            log.warning("ignoring dynamic_batching options %r: %s", options, exc)
            return self


def policy_for(model: LoadedModel, default: BatchPolicy, options: Any,
               unbatched: BatchPolicy | None = None) -> BatchPolicy | None:
    """The batching `model`'s predicts join: `default` with its sidecar's `options` applied, when that
    is on and the model is batchable; else `unbatched` (a pack's rows, which need not wait: packs.py),
    unless the sidecar turns batching off. None: they run alone."""
    if options is False or not batchable(model):
        return None
    policy = default.override(options)
    return policy if policy.enabled else unbatched


def batchable(model: LoadedModel) -> bool:
    """Every input and output has a dynamic first dimension (the batch axis)."""
    return all(spec.shape and spec.shape[0] is None and spec.dtype is not None
               for spec in (*model.inputs, *model.outputs))


@dataclass
class Pending:
    """One predict request waiting to join a batch."""
    model: LoadedModel
    feeds: dict[str, np.ndarray]
    wanted: list[str] | None
    rows: int
    arrived: float
    reply: Callable[[dict | FractalError], None]   # sends this request's answer
    signature: tuple = ()                          # only requests with equal signatures share a run
    input_ns: int = 0                              # checking and converting its inputs (statistics)
    queued_ns: int = 0                             # perf_counter_ns() when it joined the queue
    expires_at: float = float("inf")               # monotonic: the caller's deadline (protocol.deadline_of)
    job: Any = None                                # the worker's job it answers (worker/jobs.py): it carries the run


@dataclass
class Queue:
    """Requests for one model waiting to be batched."""
    policy: BatchPolicy
    items: list[Pending] = field(default_factory=list)

    @property
    def rows(self) -> int:
        return sum(p.rows for p in self.items)

    def due(self, now: float) -> bool:
        if not self.items:
            return False
        rows = self.rows
        return (rows >= self.policy.max_batch_size or rows in self.policy.preferred_batch_sizes
                or now - self.items[0].arrived >= self.policy.max_queue_delay_us / 1e6)

    def deadline(self) -> float:
        return self.items[0].arrived + self.policy.max_queue_delay_us / 1e6 if self.items else float("inf")

    def take(self) -> list[Pending]:
        """The oldest request and those after it that can share its run (same model object, same
        trailing shapes and dtypes), up to max_batch_size rows."""
        first = self.items.pop(0)
        batch, rows, rest = [first], first.rows, []
        for item in self.items:
            if (item.signature == first.signature and item.model is first.model
                    and rows + item.rows <= self.policy.max_batch_size):
                batch.append(item)
                rows += item.rows
            else:
                rest.append(item)
        self.items = rest
        return batch


def prepare(model: LoadedModel, inputs: Any, wanted: list[str] | None, reply, now: float) -> Pending:
    """Check one request against the model; raises BadInput for this request alone."""
    started = time.perf_counter_ns()
    if wanted is not None and not (isinstance(wanted, list) and all(isinstance(w, str) for w in wanted)):
        raise BadInput("'outputs' must be a list of output names")
    feeds = inference.feeds_for(model, inputs)
    signature: tuple
    if len(feeds) == 1:  # NOTE: the usual case, without the set and the sort
        ((name, array),) = feeds.items()
        count, signature = array.shape[0], ((name, array.shape[1:], array.dtype.str),)
    else:
        rows = {a.shape[0] for a in feeds.values()}
        if len(rows) != 1:
            raise BadInput(f"inputs of {model.name} disagree on the number of rows: {sorted(rows)}")
        count, signature = rows.pop(), tuple((name, a.shape[1:], a.dtype.str) for name, a in sorted(feeds.items()))
    if wanted is not None:
        inference.check_outputs(model, wanted)
    queued = time.perf_counter_ns()
    return Pending(model, feeds, wanted, count, now, reply, signature, queued - started, queued)


def split_late(batch: list[Pending], now: float, need_s: float) -> tuple[list[Pending], list[Pending]]:
    """(live, late): the requests of `batch` that still have more than `need_s` (the run's expected
    time) before their caller's deadline at `now`, and those that have not: to be answered Timeout
    without running, since an abandoned request costs no compute. One pass: a request dropped
    here is not weighed against the smaller batch its dropping leaves."""
    live = [pending for pending in batch if pending.expires_at - now > need_s]
    if len(live) == len(batch):
        return batch, []
    return live, [pending for pending in batch if pending.expires_at - now <= need_s]


def run_batch(batch: list[Pending]) -> None:
    """Run the requests as one batch and answer each; on failure fall back to one by one."""
    model = batch[0].model
    if len(batch) == 1:
        _run_alone(batch[0])
        return
    names = model.output_names
    run_start = time.perf_counter_ns()
    try:
        feeds = {name: np.concatenate([p.feeds[name] for p in batch]) for name in batch[0].feeds}
        started = time.perf_counter_ns()
        values = model.run(names, feeds, None)
    except Exception:
        for pending in batch:
            _run_alone(pending)
        return
    ran = time.perf_counter_ns()
    total = sum(p.rows for p in batch)
    model.timer.observe((ran - started) / 1e9)
    series = model.series
    series.batch_rows.observe(total)
    for pending in batch:
        series.queue_wait.observe((run_start - pending.queued_ns) / 1e9)
    if any(not isinstance(v, np.ndarray) or v.ndim == 0 or v.shape[0] != total for v in values):
        for pending in batch:  # an output that is not per row: the model is not batchable after all
            _run_alone(pending)
        return
    model.stats.executed()
    run = inference.Run(model.name, total, ran - started)  # NOTE: one object, shared: learned once
    for pending in batch:
        if pending.job is not None:
            pending.job.ran = run
    batch_span = tracing.batch_span(model, started, ran, total, len(batch)) if tracing.ENABLED else None
    offset = 0
    for pending in batch:
        end = offset + pending.rows
        if batch_span is not None:
            tracing.RUN = (pending.queued_ns, started, ran, total, batch_span)
        replying = time.perf_counter_ns()
        outputs = {n: v[offset:end] for n, v in zip(names, values, strict=True)}
        pending.reply(inference.result(pending.model, outputs if pending.wanted is None
                                       else {n: outputs[n] for n in pending.wanted},
                                       (ran - started) / 1e6, pending.rows / total))  # the batch's run, shared
        done = time.perf_counter_ns()
        pending.model.stats.succeeded(pending.rows, done - pending.queued_ns + pending.input_ns,
                                      run_start - pending.queued_ns, pending.input_ns + started - run_start,
                                      ran - started, done - replying)
        offset = end


def _run_alone(pending: Pending) -> None:
    run_start = time.perf_counter_ns()
    pending.model.series.queue_wait.observe((run_start - pending.queued_ns) / 1e9)
    infer_ns = output_ns = 0
    try:
        outputs, ran, output_ns = inference.run_timed(pending.model, pending.feeds, pending.wanted)
        infer_ns = ran.ns
        if pending.job is not None:
            pending.job.ran = ran
        outcome: dict | FractalError = inference.result(pending.model, outputs, infer_ns / 1e6)
    except FractalError as exc:
        outcome = exc
    except Exception:
        log.exception("a batched request failed unexpectedly")
        outcome = InternalError("unexpected failure while running the model")
    run = tracing.RUN
    if run is not None:  # set by inference.run_timed when tracing is on: add the wait for the batch
        tracing.RUN = (pending.queued_ns, run[1], run[2], run[3], None)
    replying = time.perf_counter_ns()
    pending.reply(outcome)
    done = time.perf_counter_ns()
    total_ns = done - pending.queued_ns + pending.input_ns
    if isinstance(outcome, FractalError):
        pending.model.stats.failed(total_ns)
    else:
        pending.model.stats.succeeded(pending.rows, total_ns, run_start - pending.queued_ns, pending.input_ns,
                                      infer_ns, output_ns + done - replying)
