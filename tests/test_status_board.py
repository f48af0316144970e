"""The broker's status board in process (broker/status.py): when a worker is asked, what its answer
changes, and the mmi.workers report built from it, at times the test chooses."""
from __future__ import annotations

import os

from broker import protocol as p
from broker.broker import Request, Service, Worker
from broker.errors import BadInput
from broker.protocol import Dialect
from broker.status import StatusBoard
from metrics import BrokerMetrics

EXPIRY_S = 3.0
A, B = b"\x00a", b"\x00b"


def service_with_workers() -> tuple[Service, Worker, Worker]:
    service = Service(b"modelhost", BrokerMetrics(None, enabled=False))
    a, b = Worker(A, service, Dialect.RFC, 100.0 + EXPIRY_S), Worker(B, service, Dialect.MAJORTOMO, 99.0 + EXPIRY_S)
    service.workers = 2
    service.idle.append(a)
    return service, a, b


def test_a_worker_is_due_when_never_asked_and_again_one_interval_after_asking() -> None:
    board = StatusBoard(interval_s=5.0)
    assert board.due(A, 100.0)
    board.asked(A, 100.0)
    assert not board.due(A, 104.9) and board.due(A, 105.0)
    board.forget(A)
    assert board.due(A, 100.0)


def test_an_answer_fills_the_report_and_an_error_or_garbage_leaves_it_empty() -> None:
    board = StatusBoard(interval_s=5.0)
    service, a, b = service_with_workers()
    b.request = Request(b"client", Dialect.MAJORTOMO, b"modelhost", [b""], 100.0, 130.0)
    b.served = 7
    residency = {"resident_bytes": {"total": 4096, "models": {"iris.onnx": 4096}}, "memory_budget_bytes": 1 << 30,
                 "models_pinned": ["iris.onnx"], "model_replicas": {"iris.onnx": {"min": 1, "max": 2}}}
    status = {"node": "host-1-abc", "pid": 42, "models_resident": ["iris.onnx"], "memory_rss_bytes": 1 << 20,
              **residency}
    board.answered(A, p.ok_body(0, "host-1-abc", status), 101.0)
    board.answered(B, p.error_body(0, "x", BadInput("unknown op 'status'")), 101.0)
    report = board.report([a, b], {service.name: service}, now=102.5, expiry_s=EXPIRY_S)
    assert report["broker"]["pid"] == os.getpid() and report["broker"]["up"]
    assert report["broker"]["services"] == {"modelhost": {"workers": 2, "idle": 1, "queued": 0}}
    row_a, row_b = report["workers"]
    assert row_a == {"identity": A.hex(), "service": "modelhost", "node": "host-1-abc", "state": "idle",
                     "dialect": "rfc", "heartbeat_age_s": 2.5, "requests_served": 0,
                     "models_resident": ["iris.onnx"], "pid": 42, "memory_rss_bytes": 1 << 20,
                     "model_stats": None, "status_age_s": 1.5, **residency}
    assert (row_b["state"], row_b["dialect"], row_b["node"], row_b["requests_served"]) == ("busy", "majortomo",
                                                                                          None, 7)
    assert row_b["heartbeat_age_s"] == 3.5 and row_b["status_age_s"] == 1.5
    board.answered(A, [b"\xc1not msgpack"], 103.0)  # a worker of another implementation
    assert board.report([a], {}, 103.0, EXPIRY_S)["workers"][0]["node"] is None


def test_a_worker_never_asked_has_no_status_age() -> None:
    board = StatusBoard(interval_s=5.0)
    service, a, _ = service_with_workers()
    assert board.report([a], {service.name: service}, 100.0, EXPIRY_S)["workers"][0]["status_age_s"] is None


def test_to_ask_picks_the_idle_rfc_workers_whose_status_is_stale_and_marks_them_asked() -> None:
    board = StatusBoard(interval_s=5.0)
    service, a, b = service_with_workers()  # a: RFC, b: majortomo (it would not know the op)
    assert board.to_ask([a, b], 100.0) == [a]
    assert board.to_ask([a, b], 104.9) == [] and not board.due(A, 104.9)
    assert board.to_ask([b, a], 105.0) == [a]
