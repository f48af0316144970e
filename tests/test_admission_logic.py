"""The broker's flood-safe defaults in process, with an explicit clock (docs/protocol.md, "Admission"):
a slow model leaves `reserve_workers` workers free while another model is active, and a model's queue
is full (429) when what waits before a new request would outlast its deadline at the model's measured
run time. The same through real processes is in test_admission.py."""
from __future__ import annotations

from typing import Any, Iterator

import pytest
import zmq

from broker import protocol as p
from broker.errors import BadInput, FractalError, QueueFull, Timeout
from broker.protocol import MDPC, MDPW

from .harness import Clock
from .test_broker_queue_logic import SERVICE, Rig, received, reply_of

# NOTE: the admission rules with and without placement; with it, placement_wait_s 0 lets a model's
# requests spread at once, as they do without it, so that each test sees the admission rule alone.
PLACEMENT = [{"placement": False}, {"placement": True, "placement_wait_s": 0.0}]


@pytest.fixture(params=PLACEMENT, ids=["lru", "placement"])
def rig(clock: Clock, request: pytest.FixtureRequest) -> Iterator[Rig]:
    r = Rig(clock, **request.param)  # the defaults under test: reserve_workers 1, reserve_above_s 0.1, bound on
    yield r
    r.close()


def ask(rig: Rig, client: zmq.Socket, rid: int, model: str, deadline_ms: int = 60_000) -> None:
    client.send_multipart([p.CLIENT_HEADER, MDPC.REQUEST, SERVICE,
                           *p.request_body(rid, "predict", {"model": model}, deadline_ms)])
    rig.step()


def ask_pack(rig: Rig, client: zmq.Socket, rid: int, model: str, n: int, deadline_ms: int) -> None:
    writer = p.PackWriter()
    for i in range(n):
        assert writer.add({"id": rid * 100 + i, "op": "predict", "model": model}, None, deadline_ms)
    client.send_multipart([p.CLIENT_HEADER, MDPC.REQUEST, SERVICE, *writer.request(rid)])
    rig.step()


def taken(worker: zmq.Socket) -> tuple[bytes, int] | None:
    """(client, request id) of the REQUEST the broker handed `worker`, or None."""
    frames = received(worker)
    if frames is None:
        return None
    assert frames[:2] == [p.WORKER_HEADER, MDPW.REQUEST]
    return frames[2], p.unpack_request(frames[4:])["id"]


def answer(rig: Rig, worker: zmq.Socket, job: tuple[bytes, int] | None) -> None:
    assert job is not None
    worker.send_multipart([p.WORKER_HEADER, MDPW.FINAL, job[0], b"", *p.ok_body(job[1], "node", {"id": job[1]})])
    rig.step()


def fail(rig: Rig, worker: zmq.Socket, job: tuple[bytes, int] | None, error: FractalError,
         body: list | None = None) -> None:
    """Answer `job` with `error` in our reply's shape (or with `body`, another implementation's)."""
    assert job is not None
    worker.send_multipart([p.WORKER_HEADER, MDPW.FINAL, job[0], b"", *(body or p.error_body(job[1], "node", error))])
    rig.step()


def timed(rig: Rig, clock: Clock, worker: zmq.Socket, client: zmq.Socket, model: str, run_s: float) -> None:
    """One call of `model` that runs `run_s` on `worker`: the broker now knows its run time."""
    ask(rig, client, 1, model)
    job = taken(worker)
    clock.advance(run_s)
    answer(rig, worker, job)
    assert reply_of(client) == {"id": 1}


def flooded(rig: Rig, clock: Clock, run_s: float, other_ago_s: float) -> tuple[Any, Any, Any]:
    """Two workers; slow.onnx timed at `run_s`, iris.onnx last asked `other_ago_s` ago; then three
    slow calls. Returns (the worker running the first, the other, the client)."""
    first, second = rig.worker(), rig.worker()
    client = rig.peer()
    timed(rig, clock, first, client, "slow.onnx", run_s)  # each worker takes one (least recently used)
    timed(rig, clock, second, client, "iris.onnx", 0.001)
    clock.advance(other_ago_s)
    for rid in (2, 3, 4):
        ask(rig, client, rid, "slow.onnx")
    return first, second, client


def test_a_slow_model_leaves_a_worker_free_while_another_model_is_active(rig: Rig, clock: Clock) -> None:
    first, second, client = flooded(rig, clock, 0.5, 0.5)
    running = [taken(first), taken(second)]
    assert sum(job is not None for job in running) == 1, running  # 3 and 4 wait, one worker stays free
    idle, busy = (first, second) if running[0] is None else (second, first)
    ask(rig, client, 5, "iris.onnx")
    job = taken(idle)
    assert job is not None and job[1] == 5  # iris waits for no slow call
    clock.advance(0.5)
    answer(rig, busy, running[0] or running[1])
    assert taken(busy) is not None and taken(idle) is None  # the slow model's next, on its one worker


def test_with_no_other_model_active_a_slow_model_takes_every_worker(rig: Rig, clock: Clock) -> None:
    first, second, _client = flooded(rig, clock, 0.5, 2.5)  # iris last asked 2.5 s ago (reserve_active_s 2)
    assert taken(first) is not None and taken(second) is not None


def test_a_fast_model_takes_every_worker_even_while_another_is_active(rig: Rig, clock: Clock) -> None:
    first, second, _client = flooded(rig, clock, 0.05, 0.1)  # below reserve_above_s
    assert taken(first) is not None and taken(second) is not None


@pytest.mark.parametrize("placement", PLACEMENT, ids=["lru", "placement"])
@pytest.mark.parametrize("settings", [{"reserve_workers": 0}, {"reserve_above_s": 1.0}])
def test_the_reserve_can_be_turned_off_or_raised(clock: Clock, settings: dict, placement: dict) -> None:
    rig = Rig(clock, **settings, **placement)
    try:
        first, second, _client = flooded(rig, clock, 0.5, 0.1)
        assert taken(first) is not None and taken(second) is not None
    finally:
        rig.close()


def test_with_one_worker_there_is_no_reserve(rig: Rig, clock: Clock) -> None:
    worker, client = rig.worker(), rig.peer()
    timed(rig, clock, worker, client, "slow.onnx", 0.5)
    timed(rig, clock, worker, client, "iris.onnx", 0.001)
    ask(rig, client, 2, "slow.onnx")
    assert taken(worker) is not None


def test_a_request_that_would_wait_past_its_deadline_hears_429_at_once(rig: Rig, clock: Clock) -> None:
    worker, client = rig.worker(), rig.peer()
    timed(rig, clock, worker, client, "slow.onnx", 0.5)
    ask(rig, client, 2, "slow.onnx", 4500)
    assert taken(worker) is not None
    for rid in (3, 4, 5):  # 0.5 s for the running one, then 0.5 s each: 1.0, 1.5, 2.0 s <= 50 % of 4.5 s
        ask(rig, client, rid, "slow.onnx", 4500)
    ask(rig, client, 6, "slow.onnx", 4500)  # 2.5 s
    with pytest.raises(QueueFull, match="more than 50% of the 4.5 s left of its deadline"):
        reply_of(client)
    ask(rig, client, 7, "slow.onnx", 5000)  # a longer deadline still fits
    ask(rig, client, 8, "iris.onnx", 100)  # another model's queue is its own (and iris is not timed)
    assert received(client) is None
    assert rig.broker._services[SERVICE].queued == 5


def test_a_pack_is_bounded_whole_even_into_an_empty_queue(rig: Rig, clock: Clock) -> None:
    worker, client = rig.worker(), rig.peer()
    timed(rig, clock, worker, client, "slow.onnx", 0.5)
    ask(rig, client, 2, "slow.onnx", 4500)
    ask_pack(rig, client, 3, "slow.onnx", 4, 4500)  # 0.5 + 4 x 0.5 s > 50 % of 4.5 s
    with pytest.raises(QueueFull):
        reply_of(client)
    ask_pack(rig, client, 4, "slow.onnx", 2, 4500)  # 0.5 + 2 x 0.5 s
    ask(rig, client, 5, "slow.onnx", 3000)  # a lone request into a queue that is not empty: 2.0 s > 1.5 s
    with pytest.raises(QueueFull):
        reply_of(client)
    assert rig.broker._services[SERVICE].queued == 2


def test_a_deadline_shorter_than_one_run_is_no_queues_fault_it_hears_504(rig: Rig, clock: Clock) -> None:
    worker, client = rig.worker(), rig.peer()
    timed(rig, clock, worker, client, "slow.onnx", 0.5)
    ask(rig, client, 2, "slow.onnx")
    ask(rig, client, 3, "slow.onnx")
    ask(rig, client, 4, "slow.onnx", 300)  # no wait could make 300 ms enough for a 500 ms run
    assert received(client) is None
    rig.broker._expire_requests(clock.advance(0.4))
    with pytest.raises(Timeout):
        reply_of(client)


def test_the_bound_follows_the_measured_run_time_and_can_be_turned_off(clock: Clock) -> None:
    rig = Rig(clock, bound_by_deadline=False)
    try:
        worker, client = rig.worker(), rig.peer()
        timed(rig, clock, worker, client, "slow.onnx", 0.5)
        for rid in range(2, 12):
            ask(rig, client, rid, "slow.onnx", 2000)
        assert received(client) is None and rig.broker._services[SERVICE].queued == 9  # they wait for 504
    finally:
        rig.close()


def test_the_run_time_is_a_moving_average_per_request(rig: Rig, clock: Clock) -> None:
    worker, client = rig.worker(), rig.peer()
    timed(rig, clock, worker, client, "slow.onnx", 0.4)
    service = rig.broker._services[SERVICE]
    assert service.run_s[b"slow.onnx"] == pytest.approx(0.4)
    ask_pack(rig, client, 2, "slow.onnx", 4, 60_000)
    job = taken(worker)
    clock.advance(0.8)  # 0.2 s per request of the pack
    answer(rig, worker, job)
    assert service.run_s[b"slow.onnx"] == pytest.approx(0.4 + 0.25 * (0.2 - 0.4))


def test_a_model_stays_slow_until_its_runs_fall_under_half_the_line(rig: Rig, clock: Clock) -> None:
    worker, client = rig.worker(), rig.peer()
    service = rig.broker._services[SERVICE]
    timed(rig, clock, worker, client, "slow.onnx", 0.05)
    assert b"slow.onnx" not in service.slow
    timed(rig, clock, worker, client, "slow.onnx", 0.5)  # 0.05 + 0.25 x 0.45 >= 0.1 (reserve_above_s)
    assert b"slow.onnx" in service.slow
    for _ in range(8):  # the machine got faster: 80 ms runs, under the line but over half of it
        timed(rig, clock, worker, client, "slow.onnx", 0.08)
    assert service.run_s[b"slow.onnx"] < 0.1 and b"slow.onnx" in service.slow
    for _ in range(8):
        timed(rig, clock, worker, client, "slow.onnx", 0.01)
    assert b"slow.onnx" not in service.slow
    timed(rig, clock, worker, client, "", 0.5)  # ops without a model have no one run time
    assert b"" not in service.run_s


def test_requests_whose_deadline_passed_in_the_queue_count_for_no_wait(rig: Rig, clock: Clock) -> None:
    worker, client = rig.worker(), rig.peer()
    timed(rig, clock, worker, client, "slow.onnx", 0.5)
    ask(rig, client, 2, "slow.onnx")
    ask(rig, client, 3, "slow.onnx", 1000)
    clock.advance(1.01)  # 3's deadline passed; the broker's 0.1 s tick has not swept it yet
    ask(rig, client, 4, "slow.onnx", 2500)  # it finds 3 dead, not waiting (else 1.5 s > 1.25 s: 429)
    with pytest.raises(Timeout):
        reply_of(client)
    assert received(client) is None and rig.broker._services[SERVICE].queued == 1


@pytest.mark.parametrize("placement", PLACEMENT, ids=["lru", "placement"])
@pytest.mark.parametrize("other_active, admitted", [(False, 7), (True, 3)])
def test_the_bound_counts_the_workers_the_model_may_run_on(clock: Clock, other_active: bool, admitted: int,
                                                           placement: dict) -> None:
    rig = Rig(clock, reserve_active_s=60.0, **placement)
    try:
        first, second = rig.worker(), rig.worker()
        client = rig.peer()
        timed(rig, clock, first, client, "slow.onnx", 0.5)
        if other_active:  # the reserve applies: the slow model may run on one worker of two
            timed(rig, clock, second, client, "iris.onnx", 0.001)
        else:
            clock.advance(61)
        ask(rig, client, 2, "slow.onnx", 4500)
        ask(rig, client, 3, "slow.onnx", 4500)
        for rid in range(4, 20):  # 0.5 s of work each, shared by the workers it may use: up to 50 % of 4.5 s
            ask(rig, client, rid, "slow.onnx", 4500)
        refused = 0
        while received(client) is not None:
            refused += 1
        running = 1 if other_active else 2
        queued = rig.broker._services[SERVICE].queued
        assert queued == 18 - running - refused and queued == admitted, (queued, refused)
    finally:
        rig.close()


@pytest.mark.parametrize("busy_with, run_s, waits", [("slow.onnx", 0.5, False), ("fast.onnx", 0.001, True)])
def test_a_model_does_not_wait_for_holders_busy_with_another_slow_model(clock: Clock, busy_with: str, run_s: float,
                                                                         waits: bool) -> None:
    """Placement waits placement_wait_s for a busy holder, unless every holder runs another model's slow
    request: then the idle worker loads the model at once (a flood on a slow model would otherwise cost
    each of a fast model's callers that wait)."""
    rig = Rig(clock, placement=True, reserve_workers=0)
    try:
        first, second = rig.worker(), rig.worker()
        client = rig.peer()
        timed(rig, clock, first, client, busy_with, run_s)  # first holds it; the broker knows its run time
        ask(rig, client, 2, busy_with)
        assert taken(first) is not None  # first is busy with it
        rig.broker._board.loading(list(rig.broker._workers)[0], b"iris.onnx")  # and holds iris too
        ask(rig, client, 3, "iris.onnx")
        job = taken(second)
        assert (job is None) == waits, job
        if waits:  # a fast run frees the holder soon: iris waits, up to placement_wait_s, then spreads
            clock.advance(0.6)
            rig.broker._place_waiting(clock.now)
            job = taken(second)
            assert job is not None and job[1] == 3
    finally:
        rig.close()



def take_any(*workers: zmq.Socket) -> tuple[zmq.Socket, tuple[bytes, int]]:
    """The worker that was handed a REQUEST, and the request's (client, id)."""
    for worker in workers:
        job = taken(worker)
        if job is not None:
            return worker, job
    raise AssertionError("no worker was handed the request")


@pytest.mark.parametrize("error", [Timeout("dropped unrun: its deadline is shorter than the model's run"),
                                   BadInput("not an input of this model")])
def test_an_error_reply_is_no_run_so_drops_do_not_make_a_slow_model_look_fast(rig: Rig, clock: Clock,
                                                                            error: FractalError) -> None:
    """A worker answers a request it drops unrun (its deadline is shorter than the model's run) within a
    millisecond. Timed as runs, a flood's drops pulled a slow model's average under reserve_above_s:
    the reserve let it take every worker and the other models' calls waited for its runs."""
    first, second = rig.worker(), rig.worker()
    client = rig.peer()
    timed(rig, clock, first, client, "slow.onnx", 0.5)
    for rid in range(2, 22):
        ask(rig, client, rid, "slow.onnx", 300)
        worker, job = take_any(first, second)
        clock.advance(0.0005)
        fail(rig, worker, job, error)
        with pytest.raises(type(error)):
            reply_of(client)
    service = rig.broker._services[SERVICE]
    assert service.run_s[b"slow.onnx"] == pytest.approx(0.5) and b"slow.onnx" in service.slow
    ask(rig, client, 30, "iris.onnx")  # iris is active: the slow model keeps to one worker of two
    answer(rig, *take_any(first, second))
    reply_of(client)
    for rid in (31, 32):
        ask(rig, client, rid, "slow.onnx")
    assert (taken(first) is None) != (taken(second) is None)


def test_a_reply_whose_status_cannot_be_read_is_timed_as_before(rig: Rig, clock: Clock) -> None:
    """Another implementation's worker may answer in a body of its own: the broker times it as a run."""
    worker, client = rig.worker(), rig.peer()
    timed(rig, clock, worker, client, "slow.onnx", 0.5)
    ask(rig, client, 2, "slow.onnx")
    job = taken(worker)
    clock.advance(0.1)
    fail(rig, worker, job, Timeout("unused"), body=[b"a body in a format of its own"])
    assert received(client) is not None  # forwarded as it came
    assert rig.broker._services[SERVICE].run_s[b"slow.onnx"] == pytest.approx(0.5 + 0.25 * (0.1 - 0.5))


def test_a_model_not_timed_yet_counts_as_slow_until_its_first_reply(rig: Rig, clock: Clock) -> None:
    """A flood on a model the broker has not timed: its first calls would take every worker, and the
    other models' calls would wait for their runs. Its first reply tells: here it is fast, and may
    take every worker again."""
    first, second = rig.worker(), rig.worker()
    client = rig.peer()
    ask(rig, client, 1, "iris.onnx")  # iris is active
    answer(rig, *take_any(first, second))
    assert reply_of(client) == {"id": 1}
    for rid in (2, 3, 4):
        ask(rig, client, rid, "new.onnx")
    running = [taken(first), taken(second)]
    assert sum(job is not None for job in running) == 1, running  # a worker stays free for iris
    busy, idle = (first, second) if running[0] is not None else (second, first)
    ask(rig, client, 5, "iris.onnx")
    job = taken(idle)
    assert job is not None and job[1] == 5
    answer(rig, idle, job)
    clock.advance(0.002)
    answer(rig, busy, running[0] or running[1])  # new.onnx's first reply: 2 ms a call
    assert taken(busy) is not None  # its next call
    ask(rig, client, 6, "new.onnx")
    assert taken(idle) is not None  # fast: it may take the other worker too


@pytest.mark.parametrize("count", [1, 2])
def test_a_message_running_past_the_line_makes_its_model_slow(rig: Rig, clock: Clock, count: int) -> None:
    """A model timed fast by answers that were no runs of it (an upload, say) whose message has been
    running reserve_above_s per request is slow from then on, before its run ends; its reply is timed
    as usual, so a model that is fast on average is back to fast once the long run is over."""
    first, second = rig.worker(), rig.worker()
    client = rig.peer()
    timed(rig, clock, first, client, "slow.onnx", 0.01)
    timed(rig, clock, second, client, "iris.onnx", 0.001)  # iris is active
    service = rig.broker._services[SERVICE]
    if count == 1:
        ask(rig, client, 2, "slow.onnx")
    else:
        ask_pack(rig, client, 2, "slow.onnx", count, 60_000)
    worker, job = take_any(first, second)
    clock.advance(0.09 * count)
    rig.broker._note_long_runs(clock.now)
    assert b"slow.onnx" not in service.slow  # not yet reserve_above_s (0.1 s) per request
    clock.advance(0.02 * count)
    rig.broker._note_long_runs(clock.now)
    assert b"slow.onnx" in service.slow
    other = second if worker is first else first
    ask(rig, client, 3, "slow.onnx")
    assert taken(other) is None  # the reserve holds it to one worker of two
    answer(rig, worker, job)  # 0.11 s per request: the average, 0.01 + 0.25 x 0.1, is under half the line
    assert b"slow.onnx" not in service.slow
