"""The worker's run-time estimate (worker/runtimes.py) and how a worker uses it before a run, in
process: a request alone, and a batch about to run, whose deadline is nearer than the model's
expected run time is answered Timeout without running. Real ONNX Runtime sessions; no sockets (the
ModelHost is built, never run). Through real processes: test_admission.py."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
import zmq

from broker.errors import Timeout
from worker.batching import prepare
from worker.jobs import Job
from worker.modelhost import ModelHost
from worker.runtimes import RunTimes
from worker.settings import WorkerSettings

from .onnx_models import identity_model

MS = 1_000_000  # ns


def test_no_run_yet_means_no_estimate() -> None:
    times = RunTimes()
    assert times.expected_s("m.onnx") == 0.0 and times.expected_s("m.onnx", 64) == 0.0


def test_the_estimate_is_the_smallest_recent_time_per_row_times_the_rows() -> None:
    times = RunTimes()
    times.observe("m.onnx", 1, 200 * MS)
    assert times.expected_s("m.onnx") == pytest.approx(0.2)
    times.observe("m.onnx", 1, 500 * MS)  # a run slowed by a busy machine does not raise it
    assert times.expected_s("m.onnx") == pytest.approx(0.2)
    times.observe("m.onnx", 8, 800 * MS)  # a batch: 100 ms a row
    assert times.expected_s("m.onnx") == pytest.approx(0.1)
    assert times.expected_s("m.onnx", 4) == pytest.approx(0.4)
    assert times.expected_s("m.onnx@2") == 0.0  # versions learn apart
    times.observe("m.onnx", 0, 5 * MS)  # no rows, no lesson
    assert times.expected_s("m.onnx") == pytest.approx(0.1)


def test_the_estimate_follows_the_last_window_of_runs() -> None:
    times = RunTimes(window=3)
    times.observe("m.onnx", 1, 10 * MS)  # e.g. the model before it was replaced by a slower one
    for _ in range(3):
        times.observe("m.onnx", 1, 300 * MS)
    assert times.expected_s("m.onnx") == pytest.approx(0.3)


def test_models_remembered_are_bounded() -> None:
    times = RunTimes(max_models=2)
    for name in ("a", "b", "c"):
        times.observe(name, 1, 100 * MS)
    assert times.expected_s("a") == 0.0  # the oldest went
    assert times.expected_s("b") == times.expected_s("c") == pytest.approx(0.1)


@pytest.fixture
def host(tmp_path: Path) -> Iterator[ModelHost]:
    (tmp_path / "id.onnx").write_bytes(identity_model([None, 3]))
    context = zmq.Context()
    yield ModelHost(WorkerSettings(model_dir=str(tmp_path), metrics_port=0, log_requests=False), context=context)
    context.destroy(linger=0)


def job(expires_in_s: float, rows: int = 1, model: str = "id.onnx", **fields: object) -> Job:
    request = {"op": "predict", "model": model, "inputs": {"x": np.zeros((rows, 3), np.float32)}, **fields}
    made = Job.of(request, b"client", time.monotonic(), time.perf_counter(), time.monotonic() + expires_in_s)
    made.in_pack = True  # answered into a pack's reply: nothing is sent
    return made


def test_a_request_alone_runs_unless_its_deadline_is_nearer_than_the_models_run(host: ModelHost) -> None:
    first = job(0.05)
    outcome = host.run_alone(first)  # no estimate yet: it runs
    assert not isinstance(outcome, Exception)
    assert first.ran is not None and first.ran.entry == "id.onnx" and first.ran.rows == 1  # the run it took part in
    host.answer(first, outcome)
    host.run_times.observe("id.onnx", 1, 100 * MS)  # as if its runs took 100 ms
    runs = host.pool.load("id.onnx").stats.execution_count
    short = job(0.05)
    outcome = host.run_alone(short)
    assert isinstance(outcome, Timeout) and "did not run it" in str(outcome) and short.dropped
    assert host.pool.load("id.onnx").stats.execution_count == runs  # not run
    long = job(5.0)
    assert not isinstance(host.run_alone(long), Exception) and not long.dropped
    passed = job(-1.0)
    assert isinstance(host.run_alone(passed), Timeout) and passed.dropped
    other = job(0.05)
    other.op = "info"  # only predictions are weighed against a run time
    assert not isinstance(host.run_alone(other), Exception)


def test_a_batch_keeps_the_requests_that_can_wait_for_its_rows(host: ModelHost) -> None:
    model = host.pool.load("id.onnx")
    host.run_times.observe("id.onnx", 1, 100 * MS)  # 100 ms a row: 3 rows take about 300 ms
    jobs = [job(0.2), job(1.0, rows=2), job(float("inf"))]
    batch = []
    for each in jobs:
        pending = prepare(model, each.fields["inputs"], None, lambda outcome: None, 0.0)
        pending.expires_at, pending.job = each.expires_at, each
        batch.append(pending)
    failed = model.stats.counts[1]
    live = host.live(batch)
    assert [p.job for p in live] == jobs[1:]
    assert jobs[0].dropped and isinstance(jobs[0].outcome, Timeout) and model.stats.counts[1] == failed + 1
    assert not jobs[1].dropped and jobs[1].outcome is None


def test_every_way_of_naming_a_model_version_learns_one_estimate(host: ModelHost) -> None:
    """A request naming no version, version "1" or version 1 of a flat file means one model version
    (entry "id.onnx"): what runs under one name teach weighs the requests under every other."""
    ran = job(5.0, version="1")
    assert not isinstance(host.run_alone(ran), Exception)
    assert ran.ran is not None and ran.ran.entry == "id.onnx"  # what the estimate learns under, once answered
    host.run_times.observe(*ran.ran._replace(ns=100 * MS))  # as if its run took 100 ms
    for fields in ({}, {"version": "1"}, {"version": 1}):
        short = job(0.05, **fields)
        outcome = host.run_alone(short)
        assert isinstance(outcome, Timeout) and short.dropped, fields
        assert short.ran is None  # not run
