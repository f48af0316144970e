"""The broker's service and queue logic in process, with an explicit clock (majortomo's
tests/test_broker.py is the model): one Broker on an inproc endpoint, peers as DEALER sockets in
the same context, the loop stepped by hand and time moved by the test, not waited for."""
from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any, Iterator

import pytest
import zmq
from prometheus_client import CollectorRegistry

from broker import protocol as p
from broker.broker import Broker, BrokerSettings
from broker.errors import NoWorkerAvailable, Overloaded, Timeout, WorkerLost
from broker.protocol import MDPC, MDPW
from broker.rejections import Rejection
from broker.sockets import wait
from metrics import BrokerMetrics

from .harness import Clock

SERVICE = b"modelhost"
_endpoints = itertools.count()


class Rig:
    """A Broker on inproc://, its peers, and a step() that handles everything they sent."""

    def __init__(self, clock: Clock, **settings: Any):
        self.clock = clock
        self.context = zmq.Context()
        self.endpoint = f"inproc://broker-logic-{next(_endpoints)}"
        defaults: dict[str, Any] = {"metrics_port": 0, "heartbeat_interval_s": 1.0, "heartbeat_liveness": 3,
                                    "queue_timeout_s": 10.0}
        self.broker = Broker(BrokerSettings(bind=self.endpoint, **{**defaults, **settings}), context=self.context)
        self.broker.bind()
        self.peers: list[zmq.Socket] = []

    def peer(self) -> zmq.Socket:
        sock = self.context.socket(zmq.DEALER)
        sock.linger = 0
        sock.connect(self.endpoint)
        self.peers.append(sock)
        return sock

    def step(self) -> None:
        """Let the broker handle every message waiting for it (inproc delivers at once)."""
        sock = self.broker._socket
        for _ in range(100):
            if not wait(sock, 20):
                return
            self.broker._drain(sock)
        raise AssertionError("the broker never ran out of messages")

    def worker(self) -> zmq.Socket:
        sock = self.peer()
        sock.send_multipart([p.WORKER_HEADER, MDPW.READY, SERVICE])
        self.step()
        return sock

    def close(self) -> None:
        for sock in self.peers:
            sock.close(linger=0)
        self.broker._socket.close(linger=0)
        self.context.term()


@pytest.fixture
def rig(clock: Clock) -> Iterator[Rig]:
    r = Rig(clock)
    yield r
    r.close()


def request(client: zmq.Socket, rid: int, service: bytes = SERVICE) -> None:
    client.send_multipart([p.CLIENT_HEADER, MDPC.REQUEST, service, *p.request_body(rid, "echo", {"data": rid})])


def received(sock: zmq.Socket) -> list[bytes] | None:
    """The next message for `sock`, or None when there is none."""
    return sock.recv_multipart() if wait(sock, 20) else None


def take_request(worker: zmq.Socket) -> tuple[bytes, int]:
    """The (client address, request id) of the REQUEST the broker handed `worker`."""
    frames = received(worker)
    assert frames is not None and frames[:2] == [p.WORKER_HEADER, MDPW.REQUEST] and frames[3] == b""
    return frames[2], p.unpack_request(frames[4:])["id"]


def answer(worker: zmq.Socket, client: bytes, rid: int) -> None:
    worker.send_multipart([p.WORKER_HEADER, MDPW.FINAL, client, b"", *p.ok_body(rid, "node", {"id": rid})])


def sent(rig: Rig, *rids: int) -> zmq.Socket:
    """A new client that has sent requests `rids`, handled by the broker."""
    client = rig.peer()
    for rid in rids:
        request(client, rid)
    rig.step()
    return client


def reply_of(client: zmq.Socket) -> Any:
    """The result of the client's next reply; raises the FractalError it carries."""
    frames = received(client)
    assert frames is not None, "no reply"
    command, service, body = p.parse_client_reply(frames)
    assert command == MDPC.FINAL and service == SERVICE
    return p.result_of(p.unpack_body(body))


def test_requests_go_to_the_least_recently_used_idle_worker_then_queue(rig: Rig) -> None:
    first, second = rig.worker(), rig.worker()
    client = sent(rig, 1, 2, 3)
    address, rid_a = take_request(first)
    _, rid_b = take_request(second)
    assert (rid_a, rid_b) == (1, 2)
    assert received(first) is None and received(second) is None  # the third waits in the queue
    answer(first, address, rid_a)
    rig.step()
    assert reply_of(client) == {"id": 1}
    assert take_request(first)[1] == 3  # the worker that came back first takes the queued one


def test_a_full_queue_answers_overloaded(clock: Clock) -> None:
    rig = Rig(clock, max_queue=1)
    try:
        busy = rig.worker()
        client = sent(rig, 1, 2, 3)
        assert take_request(busy)[1] == 1
        with pytest.raises(Overloaded):
            reply_of(client)  # 2 queued, 3 refused
    finally:
        rig.close()


def test_a_request_for_a_service_without_workers_answers_no_worker(rig: Rig) -> None:
    client = sent(rig, 1)
    with pytest.raises(NoWorkerAvailable):
        reply_of(client)


def test_a_queued_request_times_out_only_once_its_deadline_passed(rig: Rig, clock: Clock) -> None:
    busy = rig.worker()
    client = sent(rig, 1, 2)
    take_request(busy)
    rig.broker._expire_requests(clock.advance(9.9))
    assert received(client) is None
    rig.broker._expire_requests(clock.advance(0.2))  # past queue_timeout_s = 10
    with pytest.raises(Timeout):
        reply_of(client)


def test_a_silent_worker_is_dropped_and_its_request_goes_to_another(rig: Rig, clock: Clock) -> None:
    silent = rig.worker()
    client = sent(rig, 1)
    take_request(silent)
    clock.advance(2.0)
    spare = rig.worker()  # registered later: its liveness runs from now
    rig.broker._purge_workers(clock.advance(1.5))  # silent for 3.5 s > 3 x 1 s; spare for 1.5 s
    address, rid = take_request(spare)
    assert rid == 1
    answer(spare, address, rid)
    rig.step()
    assert reply_of(client) == {"id": 1}


def test_a_request_whose_second_worker_dies_answers_worker_lost(rig: Rig, clock: Clock) -> None:
    first = rig.worker()
    client = sent(rig, 1)
    take_request(first)
    second = rig.worker()
    first.send_multipart([p.WORKER_HEADER, MDPW.DISCONNECT])
    rig.step()
    take_request(second)  # re-dispatched once
    second.send_multipart([p.WORKER_HEADER, MDPW.DISCONNECT])
    rig.step()
    with pytest.raises(WorkerLost):
        reply_of(client)


def test_heartbeats_keep_a_worker_alive_past_the_liveness_window(rig: Rig, clock: Clock) -> None:
    worker = rig.worker()
    for _ in range(5):
        clock.advance(2.0)
        worker.send_multipart([p.WORKER_HEADER, MDPW.HEARTBEAT])
        rig.step()
        rig.broker._purge_workers(clock.now)
    sent(rig, 7)
    assert take_request(worker)[1] == 7


def test_mmi_service_says_whether_a_service_has_workers(rig: Rig) -> None:
    client = rig.peer()
    client.send_multipart([p.CLIENT_HEADER, MDPC.REQUEST, p.MMI_SERVICE, SERVICE])
    rig.step()
    assert received(client) == [p.CLIENT_HEADER, MDPC.FINAL, p.MMI_SERVICE, b"404"]
    rig.worker()
    client.send_multipart([p.CLIENT_HEADER, MDPC.REQUEST, p.MMI_SERVICE, SERVICE])
    rig.step()
    assert received(client) == [p.CLIENT_HEADER, MDPC.FINAL, p.MMI_SERVICE, b"200"]


def test_a_second_ready_is_answered_with_disconnect(rig: Rig) -> None:
    worker = rig.worker()
    worker.send_multipart([p.WORKER_HEADER, MDPW.READY, SERVICE])
    rig.step()
    assert received(worker) == [p.WORKER_HEADER, MDPW.DISCONNECT]


@pytest.mark.parametrize("broken", [[MDPW.FINAL, b"address only"], [MDPW.PARTIAL, b"x", b"not empty", b"body"],
                                    [b"\x07"], [MDPW.READY]])
def test_a_worker_that_breaks_mdp_is_disconnected_and_its_request_goes_to_another(rig: Rig, broken: list) -> None:
    first, second = rig.worker(), rig.worker()
    client = sent(rig, 1)
    take_request(first)
    first.send_multipart([p.WORKER_HEADER, *broken])
    rig.step()
    assert received(first) == [p.WORKER_HEADER, MDPW.DISCONNECT]
    address, rid = take_request(second)
    answer(second, address, rid)
    rig.step()
    assert reply_of(client) == {"id": 1}


def sample(rig: Rig, name: str, **labels: str) -> float | None:
    """A broker metric's sample (None: no such series); the rig's metrics must be on."""
    return rig.broker.registry.get_sample_value(name, {"service": SERVICE.decode(), **labels})


def status_request(worker: zmq.Socket) -> tuple[bytes, dict]:
    """(return address, decoded request) of the status REQUEST the broker sent `worker`."""
    frames = received(worker)
    assert frames is not None and frames[:2] == [p.WORKER_HEADER, MDPW.REQUEST] and frames[3] == b""
    return frames[2], p.unpack_request(frames[4:])


def workers_report(rig: Rig) -> dict:
    """What mmi.workers answers (the status page's source)."""
    client = rig.peer()
    client.send_multipart([p.CLIENT_HEADER, MDPC.REQUEST, p.MMI_WORKERS])
    rig.step()
    frames = received(client)
    assert frames is not None and frames[:3] == [p.CLIENT_HEADER, MDPC.FINAL, p.MMI_WORKERS]
    return p.unpack(frames[3])


def test_a_status_poll_is_answered_into_the_board_and_reaches_no_client(clock: Clock) -> None:
    rig = Rig(clock, metrics_port=1)  # metrics on (run() is never called, so nothing listens)
    try:
        worker, client = rig.worker(), rig.peer()
        rig.broker._poll_status(clock.advance(5.0))  # one status_interval_s after READY
        address, asked = status_request(worker)
        assert asked["op"] == "status"
        request(client, 1)
        rig.step()
        assert received(worker) is None  # busy with the broker's question: the request waits
        node = {"node": "worker-1-abcd", "models_resident": ["iris.onnx"]}
        for command in (MDPW.PARTIAL, MDPW.FINAL):  # a PARTIAL goes nowhere; the FINAL to the board
            worker.send_multipart([p.WORKER_HEADER, command, address, b"", *p.ok_body(0, "worker-1-abcd", node)])
        rig.step()
        assert take_request(worker)[1] == 1  # idle again: the waiting request goes to it
        assert received(client) is None  # nothing of the poll reached a client
        row = workers_report(rig)["workers"][0]
        assert (row["node"], row["models_resident"], row["requests_served"]) == ("worker-1-abcd", ["iris.onnx"], 0)
        assert sample(rig, "fractal_broker_requests_dispatched_total") == 1  # the client's request alone
        rig.broker._poll_status(clock.advance(5.0))
        assert received(worker) is None  # busy with a client's request: not asked
    finally:
        rig.close()


def test_a_worker_that_dies_while_asked_leaves_nothing_to_retry(clock: Clock) -> None:
    rig = Rig(clock, metrics_port=1)
    try:
        asked = rig.worker()
        rig.broker._poll_status(clock.advance(5.0))
        status_request(asked)
        spare = rig.worker()  # registered after the poll: not asked
        asked.send_multipart([p.WORKER_HEADER, MDPW.DISCONNECT])
        rig.step()
        assert received(spare) is None  # the question is not re-dispatched
        assert sample(rig, "fractal_broker_requests_redispatched_total") is None
        client = sent(rig, 5)
        address, rid = take_request(spare)
        answer(spare, address, rid)
        rig.step()
        assert reply_of(client) == {"id": 5}
        assert len(workers_report(rig)["workers"]) == 1  # the dead one is gone from the board
    finally:
        rig.close()


def test_rejections_are_counted_by_reason_and_forgotten_with_their_service(clock: Clock) -> None:
    rig = Rig(clock, metrics_port=1, max_queue_per_model=1)
    try:
        worker, client = rig.worker(), rig.peer()
        client.send_multipart([p.CLIENT_HEADER, MDPC.REQUEST, SERVICE])  # no body frame
        client.send_multipart([p.CLIENT_HEADER, MDPC.REQUEST, SERVICE, *p.request_body(1, "echo", {}, 0)])
        for rid in (2, 3, 4):  # one runs, one waits, one finds the model's queue full
            client.send_multipart([p.CLIENT_HEADER, MDPC.REQUEST, SERVICE,
                                   *p.request_body(rid, "predict", {"model": "iris.onnx"}, 10_000)])
        rig.step()
        take_request(worker)
        counted = {reason: sample(rig, "fractal_broker_requests_rejected_total", reason=reason)
                   for reason in Rejection}
        assert counted == {**dict.fromkeys(Rejection), Rejection.BAD_REQUEST: 1, Rejection.DEADLINE: 1,
                           Rejection.QUEUE_FULL: 1}
        worker.send_multipart([p.WORKER_HEADER, MDPW.DISCONNECT])  # the last worker leaves: 2 and 3 get no_worker
        rig.step()
        assert [sample(rig, "fractal_broker_requests_rejected_total", reason=r) for r in Rejection] == [None] * 7
        replies = [received(client) for _ in range(5)]
        assert all(frames is not None for frames in replies) and received(client) is None
    finally:
        rig.close()


def test_every_rejection_reason_is_in_the_metric_help_and_the_readme() -> None:
    registry = CollectorRegistry()
    BrokerMetrics(registry)
    metric = next(m for m in registry.collect() if m.name == "fractal_broker_requests_rejected")
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    row = next(line for line in readme.splitlines() if line.startswith("| `fractal_broker_requests_rejected_total`"))
    for reason in Rejection:
        assert reason.value in metric.documentation and f"`{reason.value}`" in row, reason
