"""In-process tests of the pieces of admission: the routing header and the broker's fair per-model queue,
with an explicit clock (the behaviour through real processes is in test_admission.py)."""
from __future__ import annotations

import msgpack
import numpy as np

from broker import protocol as p
from broker.queues import FairQueue


class Req:
    def __init__(self, model: bytes, count: int = 1, expires_at: float = float("inf"), tag: str = ""):
        self.model, self.count, self.expires_at, self.tag = model, count, expires_at, tag


def test_the_routing_header_is_read_at_fixed_offsets_and_the_body_stays_ordinary_msgpack():
    x = np.arange(4, dtype=np.float32).reshape(1, 4)
    frames = p.request_body(7, "predict", {"model": "iris.onnx", "inputs": {"x": x}, "request_id": "r"}, 1500)
    assert p.route_of(frames[0]) == (b"iris.onnx", 1500, 1)
    body = p.unpack_body(frames)
    assert body["deadline_ms"] == 1500 and body["model"] == "iris.onnx" and body["op"] == "predict"
    assert body["inputs"]["x"].tolist() == x.tolist()
    rewritten = p.with_deadline(frames[0], 20)
    assert p.route_of(rewritten) == (b"iris.onnx", 20, 1) and p.unpack(rewritten)["inputs"]["x"].tolist() == x.tolist()
    assert p.route_of(p.with_deadline(frames[0], -5))[1] == 0  # past: clamped, never negative


def test_a_request_without_a_model_or_header_routes_as_model_empty():
    assert p.route_of(p.request_body(1, "models", {}, 10)[0]) == (b"", 10, 1)
    assert p.route_of(p.request_body(1, "models", {})[0]) == (b"", None, 1)  # RFC 18 / majortomo peers
    assert p.route_of(msgpack.packb({"op": "predict", "model": "iris.onnx"})) == (b"", None, 1)
    assert p.route_of(b"") == (b"", None, 1) and p.route_of(b"\xde\x00") == (b"", None, 1)
    # a model name no header can hold travels without one, and fails at the worker as before
    frames = p.request_body(1, "predict", {"model": 5}, 10)
    assert p.route_of(frames[0]) == (b"", None, 1) and p.unpack_body(frames)["model"] == 5


def test_a_pack_carries_its_model_its_latest_deadline_and_its_count():
    writer = p.PackWriter()
    for i, deadline_ms in enumerate([300, 900, 500]):
        assert writer.add({"id": i, "op": "predict", "model": "iris.onnx", "inputs": [1, 2, 3, 4]}, None, deadline_ms)
    frames = writer.request(99)
    assert p.route_of(frames[0]) == (b"iris.onnx", 900, 3) and p.request_count(frames[0]) == 3
    body = p.unpack_body(frames)
    assert body["op"] == "pack" and body["id"] == 99
    assert [sub["deadline_ms"] for sub in p.unpack_pack(body)] == [300, 900, 500]
    legacy = p.PackWriter()
    for i in range(2):
        legacy.add({"id": i, "op": "echo", "data": i})
    assert p.route_of(legacy.request(5)[0]) == (b"", None, 2)


def test_the_queue_serves_models_round_robin_and_each_model_in_order():
    queue: FairQueue[Req] = FairQueue()
    for i in range(6):
        queue.push(Req(b"A", tag=f"A{i}"))
    queue.push(Req(b"B", tag="B0"))
    queue.push(Req(b"B", tag="B1"))
    queue.push(Req(b"C", count=3, tag="C0"))
    assert len(queue) == 9 and queue.queued == 11 and queue.queued_for(b"C") == 3 and queue.queued_for(b"D") == 0
    order = [queue.pop().tag for _ in range(9)]
    assert order == ["A0", "B0", "C0", "A1", "B1", "A2", "A3", "A4", "A5"]
    assert not queue and queue.queued == 0 and queue.models() == {}


def test_a_model_arriving_behind_a_flood_waits_one_turn_not_the_flood():
    queue: FairQueue[Req] = FairQueue()
    for i in range(1000):
        queue.push(Req(b"A", tag=f"A{i}"))
    queue.pop()
    queue.push(Req(b"B", tag="B"))
    assert [queue.pop().tag for _ in range(2)] == ["A1", "B"]


def test_a_redispatched_request_goes_first():
    queue: FairQueue[Req] = FairQueue()
    queue.push(Req(b"A", tag="A0"))
    queue.push(Req(b"B", tag="B0"))
    queue.push(Req(b"B", tag="B-again"), first=True)
    assert [queue.pop().tag for _ in range(3)] == ["B-again", "A0", "B0"]


def test_expire_takes_every_expired_request_wherever_it_waits():
    queue: FairQueue[Req] = FairQueue()
    now = 100.0  # the clock is ours
    queue.push(Req(b"A", expires_at=now + 10, tag="A-late"))
    queue.push(Req(b"A", count=2, expires_at=now + 1, tag="A-soon"))  # behind a later one: still found
    queue.push(Req(b"B", expires_at=now + 1, tag="B-soon"))
    assert queue.expire(now) == []
    gone = queue.expire(now + 2)
    assert sorted(r.tag for r in gone) == ["A-soon", "B-soon"]
    assert len(queue) == 1 and queue.queued == 1 and queue.models() == {b"A": 1}
    assert queue.pop().tag == "A-late" and not queue


def test_pop_eligible_skips_models_that_hold_their_share_and_keeps_their_order():
    queue: FairQueue[Req] = FairQueue()
    for tag in ["A0", "A1", "B0", "C0"]:
        queue.push(Req(tag[:1].encode(), tag=tag))
    assert queue.pop_eligible(lambda model: model != b"A").tag == "B0"
    assert queue.pop_eligible(lambda model: False) is None and len(queue) == 3
    assert [queue.pop().tag for _ in range(3)] == ["C0", "A0", "A1"]


def test_queue_full_is_429_on_rest_and_resource_exhausted_on_grpc():
    import grpc

    from broker.errors import NoWorkerAvailable, Overloaded, QueueFull, error_from_wire
    from frontend.oip_grpc.calls import status_code

    error = error_from_wire("QueueFull", "3 requests already queued")  # as a client rebuilds it
    assert isinstance(error, QueueFull) and isinstance(error, Overloaded)
    assert error.http_status == 429 and error.retry_after_s == 1.0
    assert status_code(error) == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert status_code(NoWorkerAvailable()) == grpc.StatusCode.UNAVAILABLE  # 503 stays "no worker"
