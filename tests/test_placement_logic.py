"""The broker's placement rule in process, with an explicit clock (docs/protocol.md, "Placement"): an idle
holder of the model first; while only busy workers hold it, the request waits for one until its model's
oldest request has waited placement_wait_s, then the least loaded idle worker takes it; with no holder at
all, the least loaded idle worker takes it at once."""
from __future__ import annotations

import argparse
from typing import Iterator

import pytest
import zmq

from broker import protocol as p
from broker.protocol import MDPC, MDPW

from .harness import Clock
from .test_broker_queue_logic import SERVICE, Rig, received

WAIT_S = 0.05


@pytest.fixture
def rig(clock: Clock) -> Iterator[Rig]:
    r = Rig(clock, placement=True, placement_wait_s=WAIT_S)
    yield r
    r.close()


def ask(rig: Rig, client: zmq.Socket, rid: int, model: str) -> None:
    client.send_multipart([p.CLIENT_HEADER, MDPC.REQUEST, SERVICE,
                           *p.request_body(rid, "predict", {"model": model}, 10_000)])
    rig.step()


def taken(worker: zmq.Socket) -> tuple[bytes, int, str] | None:
    """(client, request id, model) of the REQUEST the broker handed `worker`, or None."""
    frames = received(worker)
    if frames is None:
        return None
    assert frames[:2] == [p.WORKER_HEADER, MDPW.REQUEST]
    body = p.unpack_request(frames[4:])
    return frames[2], body["id"], body["model"]


def answer(rig: Rig, worker: zmq.Socket, job: tuple[bytes, int, str] | None) -> None:
    assert job is not None
    worker.send_multipart([p.WORKER_HEADER, MDPW.FINAL, job[0], b"", *p.ok_body(job[1], "node", {"id": job[1]})])
    rig.step()


def tick(rig: Rig, clock: Clock, seconds: float) -> None:
    """Move time on and run what the broker's loop runs each tick for placement."""
    rig.broker._place_waiting(clock.advance(seconds))


def loaded_a(rig: Rig) -> tuple[zmq.Socket, zmq.Socket, zmq.Socket]:
    """Two workers, the first holding model A (it served one), and a client."""
    first, second = rig.worker(), rig.worker()
    client = rig.peer()
    ask(rig, client, 1, "a.onnx")
    job = taken(first)
    assert job is not None and job[2] == "a.onnx" and taken(second) is None
    answer(rig, first, job)
    return first, second, client


def test_an_idle_holder_takes_its_model_even_when_it_is_not_the_least_recently_used(rig: Rig) -> None:
    first, second, client = loaded_a(rig)  # second is now the least recently used idle worker
    for rid in range(2, 6):
        ask(rig, client, rid, "a.onnx")
        job = taken(first)
        assert job is not None and job[1] == rid and taken(second) is None
        answer(rig, first, job)


def test_a_request_waits_for_a_busy_holder_that_comes_back_within_the_wait(rig: Rig, clock: Clock) -> None:
    first, second, client = loaded_a(rig)
    ask(rig, client, 2, "a.onnx")
    busy = taken(first)
    ask(rig, client, 3, "a.onnx")  # the holder is busy, second is idle: 3 waits for the holder
    tick(rig, clock, WAIT_S / 2)
    assert taken(second) is None
    answer(rig, first, busy)
    assert taken(first) is not None and taken(second) is None  # the holder took it, nobody loaded A again


def test_past_the_wait_the_least_loaded_idle_worker_takes_it_and_then_holds_it(rig: Rig, clock: Clock) -> None:
    first, second, client = loaded_a(rig)
    ask(rig, client, 2, "a.onnx")
    busy = taken(first)
    ask(rig, client, 3, "a.onnx")
    tick(rig, clock, WAIT_S / 2)
    assert taken(second) is None
    tick(rig, clock, WAIT_S)
    spread = taken(second)
    assert spread is not None and spread[1] == 3
    answer(rig, second, spread)
    answer(rig, first, busy)
    ask(rig, client, 4, "a.onnx")  # both hold A now: the least recently used holder takes it
    assert taken(second) is not None and taken(first) is None


def test_a_model_no_worker_holds_goes_to_an_idle_worker_at_once(rig: Rig) -> None:
    first, second, client = loaded_a(rig)
    ask(rig, client, 2, "a.onnx")
    taken(first)
    ask(rig, client, 3, "b.onnx")  # no holder of B anywhere: no wait
    job = taken(second)
    assert job is not None and job[2] == "b.onnx"


def test_the_least_loaded_idle_worker_loads_a_new_model(rig: Rig, clock: Clock) -> None:
    first, second, client = loaded_a(rig)
    rig.broker._board._placement[first_identity(rig, 0)] = (frozenset({b"a.onnx"}), 3e7)
    ask(rig, client, 2, "b.onnx")  # second holds nothing (load 0), first holds 30 MB
    assert taken(second) is not None and taken(first) is None


def test_requests_waiting_for_a_holder_keep_their_order(rig: Rig, clock: Clock) -> None:
    first, second, client = loaded_a(rig)
    ask(rig, client, 2, "a.onnx")
    busy = taken(first)
    for rid in (3, 4, 5):
        ask(rig, client, rid, "a.onnx")
    answer(rig, first, busy)
    order = []
    for _ in range(3):
        job = taken(first)
        assert job is not None
        order.append(job[1])
        answer(rig, first, job)
    assert order == [3, 4, 5] and taken(second) is None


def test_placement_wait_zero_spreads_at_once(clock: Clock) -> None:
    rig = Rig(clock, placement=True, placement_wait_s=0.0)
    try:
        first, second, client = loaded_a(rig)
        ask(rig, client, 2, "a.onnx")
        taken(first)
        ask(rig, client, 3, "a.onnx")
        assert taken(second) is not None
    finally:
        rig.close()


def first_identity(rig: Rig, index: int) -> bytes:
    return list(rig.broker._workers)[index]


def test_placement_is_on_by_default_and_off_by_flag_or_env():
    from broker.broker import BrokerSettings
    from broker.settings import add_arguments, load

    parser = argparse.ArgumentParser()
    add_arguments(parser, BrokerSettings, "broker")
    assert load(BrokerSettings, "broker", parser.parse_args([]), env={}).placement is True
    assert load(BrokerSettings, "broker", parser.parse_args(["--no-placement"]), env={}).placement is False
    off = {"FRACTAL_BROKER_PLACEMENT": "0"}
    assert load(BrokerSettings, "broker", parser.parse_args([]), env=off).placement is False
    assert load(BrokerSettings, "broker", parser.parse_args(["--placement"]), env=off).placement is True  # flag wins


def limit(rig: Rig, clock: Clock, model: str, most: int) -> None:
    """Every worker answers a status poll advertising `model`'s sidecar `max` (model_replicas); what
    each holds stays as the broker knew it."""
    board = rig.broker._board
    for identity in rig.broker._workers:
        held = [m.decode() for m in board._placement.get(identity, (frozenset(), 0.0))[0]]
        board.answered(identity, p.ok_body(0, "node", {"models_resident": held, "model_replicas": {
            model: {"min": 0, "max": most}}}), clock.now)


def test_a_model_at_its_max_replicas_waits_for_a_holder_however_long(rig: Rig, clock: Clock) -> None:
    first, second, client = loaded_a(rig)
    limit(rig, clock, "a.onnx", 1)
    ask(rig, client, 2, "a.onnx")
    busy = taken(first)
    ask(rig, client, 3, "a.onnx")  # second is idle, but A has its one replica
    for _ in range(5):
        tick(rig, clock, WAIT_S)  # far past placement_wait_s
    assert taken(second) is None
    answer(rig, first, busy)
    assert taken(first) is not None and taken(second) is None
    ask(rig, client, 4, "b.onnx")  # other models still go anywhere
    assert taken(second) is not None


def test_max_replicas_counts_the_workers_a_model_was_sent_to(rig: Rig, clock: Clock) -> None:
    first, second, client = loaded_a(rig)
    third = rig.worker()
    limit(rig, clock, "a.onnx", 2)
    ask(rig, client, 2, "a.onnx")
    ask(rig, client, 3, "a.onnx")  # first busy: waits, then spreads to a second replica
    tick(rig, clock, 2 * WAIT_S)
    jobs = [taken(first), taken(second), taken(third)]
    assert sum(job is not None for job in jobs) == 2, jobs
    ask(rig, client, 4, "a.onnx")  # two workers hold A now (one only by what it was sent): no third
    tick(rig, clock, 5 * WAIT_S)
    assert taken(first) is None and taken(second) is None and taken(third) is None


def test_max_replicas_hold_with_placement_wait_zero_and_free_up_when_a_holder_leaves(clock: Clock) -> None:
    rig = Rig(clock, placement=True, placement_wait_s=0.0)
    try:
        first, second, client = loaded_a(rig)
        limit(rig, clock, "a.onnx", 1)
        ask(rig, client, 2, "a.onnx")
        taken(first)
        ask(rig, client, 3, "a.onnx")
        assert taken(second) is None  # no wait to spread after, yet it does not spread
        first.send_multipart([p.WORKER_HEADER, MDPW.DISCONNECT])  # the holder leaves: 2 goes again, to second
        rig.step()
        job = taken(second)
        assert job is not None and job[1] == 2
    finally:
        rig.close()


def test_a_model_without_max_and_garbage_replicas_spread_as_before(rig: Rig, clock: Clock) -> None:
    first, second, client = loaded_a(rig)
    board = rig.broker._board
    for identity in rig.broker._workers:
        board.answered(identity, p.ok_body(0, "node", {"models_resident": [], "model_replicas": {
            "a.onnx": {"min": 0, "max": 0}, "b.onnx": {"max": "1"}, "c.onnx": 3}}), clock.now)
    assert not board.full(b"a.onnx") and not board.full(b"b.onnx") and not board.full(b"c.onnx")
    ask(rig, client, 2, "a.onnx")
    ask(rig, client, 3, "a.onnx")  # no max: past placement_wait_s it spreads to a second replica
    tick(rig, clock, 2 * WAIT_S)
    assert taken(first) is not None and taken(second) is not None
