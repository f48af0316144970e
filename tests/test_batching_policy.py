"""Dynamic batching's queue and policy in process (worker/batching.py): when a queue is due, what
one run takes, what a sidecar changes, and that run_batch answers each request with its own rows.
Real ONNX Runtime sessions of tiny models; no processes, no sockets."""
from __future__ import annotations

import os
import tempfile
from typing import Any

import numpy as np
import pytest

from broker.errors import BadInput, FractalError
from worker.batching import BatchPolicy, Pending, Queue, batchable, policy_for, prepare, run_batch, split_late
from worker.sessions import LoadedModel, SessionFactory

from .onnx_models import constant_model, identity_model


def loaded(name: str, data: bytes) -> LoadedModel:
    """A LoadedModel as the pool builds it, from model bytes."""
    with tempfile.NamedTemporaryFile(suffix=".onnx") as f:
        f.write(data)
        f.flush()
        return SessionFactory(1).build(name, data, os.stat(f.name))


IDENTITY = loaded("id.onnx", identity_model([None, 3]))


def pending(rows: int, arrived: float, model: LoadedModel = IDENTITY, width: int = 3) -> Pending:
    feeds = {"x": np.zeros((rows, width), np.float32)}
    return Pending(model, feeds, None, rows, arrived, lambda outcome: None, (("x", (width,), "<f4"),))


def test_the_policy_is_on_above_one_row_and_a_sidecar_overrides_it() -> None:
    base = BatchPolicy(8, 500, (4,))
    assert base.enabled and not BatchPolicy(1).enabled and not BatchPolicy().enabled
    assert base.override(False) == BatchPolicy(0)
    assert base.override(None) is base
    assert base.override({"max_batch_size": 16}) == BatchPolicy(16, 500, (4,))
    assert base.override({"preferred_batch_sizes": [2, 6], "max_queue_delay_us": 10}) == BatchPolicy(8, 10, (2, 6))
    assert base.override({"max_batch_size": "many"}) is base  # a typo must not stop serving


def test_a_queue_is_due_at_its_size_a_preferred_size_or_its_delay() -> None:
    queue = Queue(BatchPolicy(8, 1000, (3,)))
    assert not queue.due(0.0) and queue.deadline() == float("inf")
    queue.items.append(pending(2, arrived=10.0))
    assert not queue.due(10.0005)
    assert queue.deadline() == pytest.approx(10.001)
    assert queue.due(10.0011)                      # the delay passed
    queue.items.append(pending(1, arrived=10.0))
    assert queue.due(10.0)                         # 3 rows: a preferred size
    queue.items.append(pending(5, arrived=10.0))
    assert queue.due(10.0)                         # 8 rows: full


def test_take_keeps_order_and_the_row_bound_and_leaves_unlike_requests() -> None:
    queue = Queue(BatchPolicy(4))
    first, wide, second, too_many = pending(2, 0.0), pending(1, 0.0, width=5), pending(2, 0.0), pending(1, 0.0)
    queue.items = [first, wide, second, too_many]
    assert queue.take() == [first, second]         # 4 rows; the wide one has another signature
    assert queue.items == [wide, too_many]
    assert queue.take() == [wide] and queue.take() == [too_many]


def test_batchable_needs_a_dynamic_first_dimension_everywhere() -> None:
    assert batchable(IDENTITY)
    assert not batchable(loaded("fixed.onnx", identity_model([2, 3])))
    assert batchable(loaded("const.onnx", constant_model(1.0)))
    assert not batchable(loaded("one.onnx", identity_model([1, 3])))


def test_prepare_checks_each_request_alone() -> None:
    with pytest.raises(BadInput, match="outputs"):
        prepare(IDENTITY, {"x": [[1, 2, 3]]}, "y", lambda outcome: None, 0.0)  # type: ignore[arg-type]
    with pytest.raises(BadInput):
        prepare(IDENTITY, {"x": [[1, 2]]}, None, lambda outcome: None, 0.0)
    one = prepare(IDENTITY, {"x": [[1, 2, 3], [4, 5, 6]]}, None, lambda outcome: None, 5.0)
    assert (one.rows, one.arrived, one.signature) == (2, 5.0, (("x", (3,), "<f4"),))


def test_run_batch_answers_each_request_with_its_own_rows() -> None:
    answers: dict[int, Any] = {}
    rows = [np.arange(3 * n, dtype=np.float32).reshape(n, 3) + 100 * i for i, n in enumerate((1, 3, 2))]
    batch = [prepare(IDENTITY, {"x": r.tolist()}, None, lambda outcome, i=i: answers.__setitem__(i, outcome), 0.0)
             for i, r in enumerate(rows)]
    runs_before = IDENTITY.stats.execution_count
    run_batch(batch)
    assert IDENTITY.stats.execution_count == runs_before + 1  # one session run for the three
    for i, r in enumerate(rows):
        assert not isinstance(answers[i], FractalError)
        np.testing.assert_array_equal(answers[i]["outputs"]["y"], r)


def test_split_late_keeps_the_requests_with_more_time_left_than_the_run_needs() -> None:
    soon, later, none = pending(1, 0.0), pending(1, 0.0), pending(1, 0.0)
    soon.expires_at, later.expires_at = 10.05, 10.5  # `none` has no deadline (infinity)
    batch = [soon, later, none]
    assert split_late(batch, 10.0, 0.0) == (batch, [])
    assert split_late(batch, 10.0, 0.1) == ([later, none], [soon])  # 50 ms left, the run needs 100 ms
    assert split_late(batch, 10.6, 0.0) == ([none], [soon, later])  # both deadlines passed
    assert split_late(batch, 10.05, 0.0) == ([later, none], [soon])  # no time left at all is late


def test_policy_for_says_which_batch_a_models_predicts_join() -> None:
    on = BatchPolicy(8, 500)
    assert policy_for(IDENTITY, on, None) is on
    assert policy_for(IDENTITY, on, {"max_batch_size": 4}) == BatchPolicy(4, 500)
    assert policy_for(IDENTITY, on, False) is None                           # the sidecar turns it off
    assert policy_for(IDENTITY, BatchPolicy(0), None) is None                # the worker's batching is off
    assert policy_for(IDENTITY, BatchPolicy(0), None, on) is on              # ... a pack's rows still batch
    assert policy_for(IDENTITY, BatchPolicy(0), False, on) is None           # ... unless the sidecar says no
    assert policy_for(loaded("fixed.onnx", identity_model([2, 3])), on, None) is None  # not batchable
