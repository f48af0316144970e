"""Request packing (issue 13): concurrent AsyncClient calls leave as packs, and nothing else changes.

Each call still gets its own right answer or error, a killed worker loses nothing, deadlines and the
broker's own errors reach each call, and every counter moves by user requests, packed or not.
"""
from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
import urllib.request

import numpy as np
import onnxruntime as ort
import pytest
import zmq

from broker import protocol as p
from broker.client import AsyncClient, Client
from broker.errors import BadInput, ModelNotFound, NoWorkerAvailable, Overloaded, ProtocolError, Timeout

from .harness import BUNDLED, dealer, free_port, nodes_answering, wait_busy, wait_for, wait_workers
from .onnx_models import SLOW_ATOL, slow_expected, slow_input, slow_model
from .test_metrics import sample_sum

pytestmark = pytest.mark.slow  # starts real processes

RNG = np.random.default_rng(13)


def session(name: str) -> ort.InferenceSession:
    return ort.InferenceSession(str(BUNDLED / name), providers=["CPUExecutionProvider"])


def mixed_calls(client: AsyncClient, count: int) -> tuple[list, list]:
    """`count` calls over iris and diabetes with distinct rows; every 25th is bad in its own way.
    Returns the coroutines and, for each, its model and row (None for a bad one)."""
    calls, expected = [], []
    for i in range(count):
        if i % 25 == 24:
            model, inputs = [("iris.onnx", {"wrong_name": np.zeros((1, 4), np.float32)}),
                             ("iris.onnx", {"float_input": np.zeros((1, 7), np.float32)}),
                             ("missing.onnx", {"x": np.zeros((1, 4), np.float32)})][i // 25 % 3]
            calls.append(client.predict(model, inputs))
            expected.append(None)
        elif i % 2:
            row = RNG.random((1, 4), dtype=np.float32) * 8
            calls.append(client.predict("iris.onnx", {"float_input": row}))
            expected.append(("iris", row))
        else:
            row = RNG.standard_normal((1, 10), dtype=np.float32) / 10
            calls.append(client.predict("diabetes.onnx", {"float_input": row}))
            expected.append(("diabetes", row))
    return calls, expected


def check_answers(results: list, expected: list) -> None:
    iris, diabetes = session("iris.onnx"), session("diabetes.onnx")
    for i, (result, want) in enumerate(zip(results, expected, strict=True)):
        if want is None:
            assert isinstance(result, (BadInput, ModelNotFound)), (i, result)
            continue
        assert isinstance(result, dict), (i, result)
        model, row = want
        if model == "iris":
            label, probabilities = iris.run(None, {"float_input": row})
            assert result["label"].tolist() == label.tolist(), i
            np.testing.assert_allclose(result["probabilities"], probabilities, rtol=1e-5, atol=1e-6)
        else:
            (value,) = diabetes.run(None, {"float_input": row})
            np.testing.assert_allclose(result["variable"], value, rtol=1e-5, atol=1e-4)


def test_2000_concurrent_calls_over_two_models_each_get_their_own_answer(cluster):
    async def run() -> tuple[list, list]:
        async with AsyncClient(cluster.url, timeout_s=60) as client:
            calls, expected = mixed_calls(client, 2000)
            return await asyncio.gather(*calls, return_exceptions=True), expected
    results, expected = asyncio.run(run())
    check_answers(results, expected)
    assert sum(isinstance(r, BadInput) for r in results) >= 50  # the bad ones failed, and alone


def test_a_pack_carries_large_tensors_out_of_band(cluster):
    big = RNG.random((300, 300), dtype=np.float32)  # 360 KB: its own frame, inside a pack

    async def run() -> list:
        async with AsyncClient(cluster.url, timeout_s=30) as client:
            return await asyncio.gather(client.echo(big), client.predict("iris.onnx", [[2, 5, 1, 4]]),
                                        client.echo({"small": 1}), client.echo(big[:7]))
    echoed, iris, small, part = asyncio.run(run())
    np.testing.assert_array_equal(echoed["data"], big)
    assert iris["label"].tolist() == [1] and small["data"] == {"small": 1}
    np.testing.assert_array_equal(part["data"], big[:7])


def test_calls_of_a_slow_model_leave_one_per_message_and_run_on_every_worker(cluster):
    """Once a reply says a model runs a millisecond or more, the AsyncClient stops packing its calls: a
    pack goes to one worker, which would leave the other replicas idle (client.SOLO_ABOVE_MS)."""
    with Client(cluster.url, timeout_s=60) as sync:
        sync.upload("slow.onnx", slow_model())
    steps = [int(slow_input(0.5)["k"][0]) + i for i in range(3)]

    async def main() -> list:
        client = AsyncClient(cluster.url, timeout_s=120)
        try:
            await client.predict("slow.onnx", {"k": np.array([steps[0]], np.int64)})  # it learns the run time
            calls = [asyncio.ensure_future(client.predict("slow.onnx", {"k": np.array([k], np.int64)}))
                     for k in steps[1:]]
            # NOTE: made in one loop turn: as a pack both would go to one worker
            await asyncio.get_running_loop().run_in_executor(None, wait_busy, cluster.url, 2)
            return await asyncio.gather(*calls)
        finally:
            await client.aclose()
    for k, answer in zip(steps[1:], asyncio.run(main()), strict=True):
        np.testing.assert_allclose(answer["y"], [[slow_expected(k)]], atol=SLOW_ATOL)


def test_a_raw_pack_is_one_mdp_request_answered_by_one_final(cluster):
    """What a peer in another language sends: frames per docs/protocol.md, a lone FINAL back."""
    writer = p.PackWriter()
    writer.add({"id": 11, "op": "predict", "model": "iris.onnx", "inputs": {"float_input": [[2, 5, 1, 4]]}})
    writer.add({"id": 12, "op": "no_such_op"})
    writer.add({"id": 13, "op": "echo", "data": "x"})
    body = writer.request(10)
    assert p.request_count(body[0]) == 3
    with dealer(cluster.url) as sock:
        sock.send_multipart([p.CLIENT_HEADER, p.MDPC.REQUEST, b"modelhost", *body])
        assert sock.poll(10_000)
        command, service, reply_body = p.parse_client_reply(sock.recv_multipart())
        assert (command, service) == (p.MDPC.FINAL, b"modelhost")
        reply = p.unpack_body(reply_body)
        assert reply["id"] == 10 and reply["status"] == 200
        assert [r["id"] for r in reply["replies"]] == [11, 12, 13]
        first, second, third = p.pack_results(reply, 3)
        assert first["outputs"]["label"].tolist() == [1]
        assert isinstance(second, BadInput) and "unknown op 'no_such_op'" in str(second)
        assert third["data"] == "x"
        assert not sock.poll(300)  # one FINAL for the whole pack, nothing more

        # A sub-request that is not a map fails alone; a pack whose n is wrong fails as a whole.
        body = [p.PACK_PREFIX + b"\x00\x02" + b"\xa2id\x14\xa8requests\x92\x05"
                + p.pack({"id": 21, "op": "echo", "data": 1})]
        sock.send_multipart([p.CLIENT_HEADER, p.MDPC.REQUEST, b"modelhost", *body])
        assert sock.poll(10_000)
        reply = p.unpack_body(p.parse_client_reply(sock.recv_multipart())[2])
        bad, good = p.pack_results(reply, 2)
        assert isinstance(bad, ProtocolError) and good["data"] == 1
        body = [p.PACK_PREFIX + b"\x00\x03" + b"\xa2id\x16\xa8requests\x91" + p.pack({"id": 23, "op": "echo"})]
        sock.send_multipart([p.CLIENT_HEADER, p.MDPC.REQUEST, b"modelhost", *body])
        assert sock.poll(10_000)
        reply = p.unpack_body(p.parse_client_reply(sock.recv_multipart())[2])
        assert reply["id"] == 22 and reply["status"] == 400 and "'n' request maps" in reply["error"]["message"]
    with Client(cluster.url, timeout_s=10) as client:
        assert nodes_answering(client, 4)  # the workers serve on


def test_an_unreachable_broker_fails_every_call_fast():
    async def run() -> list:
        async with AsyncClient(f"tcp://127.0.0.1:{free_port()}", timeout_s=10) as client:
            return await asyncio.gather(*(client.echo(i) for i in range(1000)), return_exceptions=True)
    started = time.monotonic()
    results = asyncio.run(run())
    assert all(isinstance(r, NoWorkerAvailable) and "cannot reach the broker" in str(r) for r in results)
    assert time.monotonic() - started < 10 / 2  # after CONNECT_WAIT_S, well before the calls' timeout


def test_sigkill_of_a_worker_under_packed_load_loses_nothing(procs, broker_url, model_dir):
    workers = [procs.worker(broker_url, model_dir) for _ in range(2)]
    wait_workers(broker_url, 2)
    slots, per_slot = 64, 40
    done = []

    async def run() -> tuple[list, list]:
        async with AsyncClient(broker_url, timeout_s=60) as client:
            async def slot(i: int) -> list:
                out = []
                for j in range(per_slot):
                    row = np.array([[i % 8, j % 5, (i * j) % 7, 1 + (i + j) % 3]], np.float32)
                    out.append((row, await client.predict("iris.onnx", {"float_input": row})))
                    done.append(1)
                return out
            return await asyncio.gather(*(slot(i) for i in range(slots)))

    killer = threading.Thread(target=lambda: (wait_for(lambda: len(done) >= 400, 60, "load"),
                                              os.kill(workers[0].pid, signal.SIGKILL)))
    killer.start()
    results = asyncio.run(run())
    killer.join()
    assert workers[0].wait(5) == -signal.SIGKILL and workers[1].poll() is None
    iris = session("iris.onnx")
    answers = [pair for slot in results for pair in slot]
    assert len(answers) == slots * per_slot
    for row, result in answers:
        label, _ = iris.run(None, {"float_input": row})
        assert result["label"].tolist() == label.tolist()


def test_a_deadline_times_out_one_call_of_a_pack_and_no_other(procs, broker_url, model_dir):
    procs.worker(broker_url, model_dir)
    wait_workers(broker_url, 1)
    slow_x = slow_input(1.0)
    with Client(broker_url, timeout_s=60) as sync:
        sync.upload("slow.onnx", slow_model())
        started = time.monotonic()
        sync.predict("slow.onnx", slow_x)
        deadline_s = (time.monotonic() - started) / 4  # its pack takes at least the slow call's time

    async def timed(coro) -> tuple[float, object]:
        started = time.monotonic()
        try:
            result = await coro
        except Exception as exc:
            result = exc
        return time.monotonic() - started, result

    async def run() -> list:
        async with AsyncClient(broker_url, timeout_s=60) as client:
            rows = [RNG.random((1, 4), dtype=np.float32) for _ in range(10)]
            out = await asyncio.gather(
                *(timed(client.predict("iris.onnx", {"float_input": r})) for r in rows),
                # NOTE: a pack holds one model's calls: this one leaves with the slow call after it
                timed(client.predict("slow.onnx", slow_x, timeout_s=deadline_s)),
                timed(client.predict("slow.onnx", slow_x)))
            after = await client.echo("next")  # not confused by the late reply
            return rows, out, after
    rows, out, after = asyncio.run(run())
    (timed_out_s, timed_out), (slow_s, slow) = out[10], out[11]
    assert isinstance(timed_out, Timeout), (slow_s, timed_out)
    assert isinstance(slow, dict) and abs(slow["y"].item() - slow_expected(int(slow_x["k"][0]))) < SLOW_ATOL
    assert timed_out_s < slow_s  # it did not wait for its pack's reply
    iris = session("iris.onnx")
    for row, (_s, result) in zip(rows, out[:10], strict=False):
        assert result["label"].tolist() == iris.run(None, {"float_input": row})[0].tolist()
    assert after["data"] == "next"


class SilentWorker:
    """A registered worker that never answers: what is dispatched to it stays there. It heartbeats
    until `mute()`, then the broker declares it dead."""

    def __init__(self, url: str):
        self.url = url
        self.beating, self.stopping = threading.Event(), threading.Event()
        self.beating.set()
        self.thread = threading.Thread(target=self._run)
        self.thread.start()

    def _run(self) -> None:
        sock = zmq.Context.instance().socket(zmq.DEALER)
        sock.linger = 0
        sock.connect(self.url)
        sock.send_multipart([p.WORKER_HEADER, p.MDPW.READY, b"modelhost"])
        while not self.stopping.wait(0.05):
            if self.beating.is_set():
                sock.send_multipart([p.WORKER_HEADER, p.MDPW.HEARTBEAT])
        sock.close()

    def mute(self) -> None:
        self.beating.clear()

    def stop(self) -> None:
        self.stopping.set()
        self.thread.join()


def metric(url: str, name: str, **labels: str) -> float:
    with urllib.request.urlopen(url, timeout=10) as resp:
        return sample_sum(resp.read().decode(), name, **labels)


def test_every_call_of_a_pack_gets_the_brokers_own_error(procs):
    url, port = f"tcp://127.0.0.1:{free_port()}", free_port()
    procs.broker(url, "--max-queue", "1", "--metrics-port", str(port))
    metrics_url = f"http://127.0.0.1:{port}/metrics"
    wait_for(lambda: _answers(url), 20, "the broker")
    n = p.PACK_MAX_REQUESTS

    async def run() -> tuple[list, dict]:
        async with AsyncClient(url, timeout_s=30) as client:
            worker = SilentWorker(url)
            try:
                wait_registered(url)
                # 3 packs of PACK_MAX_REQUESTS: one dispatched to the silent worker, one queued (a pack takes
                # one place), one over max_queue (Overloaded at once). The queue depth counts requests.
                calls = [asyncio.ensure_future(client.echo(i)) for i in range(3 * n)]
                await asyncio.wait(calls[2 * n:])
                wait_for(lambda: metric(metrics_url, "fractal_broker_queue_depth") == n, 10, "the queue gauge")
                seen = {"overloaded": metric(metrics_url, "fractal_broker_requests_rejected_total",
                                             reason="overloaded"),
                        "dispatched": metric(metrics_url, "fractal_broker_requests_dispatched_total"),
                        "still_waiting": sum(not c.done() for c in calls[:2 * n])}
                worker.mute()  # declared dead: its pack and the queued one get NoWorkerAvailable
                return await asyncio.gather(*calls, return_exceptions=True), seen
            finally:
                worker.stop()
    results, seen = asyncio.run(run())
    assert all(isinstance(r, Overloaded) for r in results[2 * n:]), results[2 * n:]
    assert seen == {"overloaded": n, "dispatched": n, "still_waiting": 2 * n}
    assert all(isinstance(r, NoWorkerAvailable) for r in results[:2 * n]), results[:2 * n]
    assert len({id(r) for r in results}) == len(results)  # each call raised its own error object


def wait_registered(url: str) -> None:
    with Client(url, timeout_s=5) as client:
        wait_for(lambda: client.service_ready(timeout_s=1), 20, "the worker's READY")


def _answers(url: str) -> bool:
    with Client(url, timeout_s=1) as client:
        try:
            client.echo(1)
        except NoWorkerAvailable as exc:
            return "no worker is registered" in str(exc)
    return False


def test_a_worker_that_does_not_know_packs_fails_each_call_with_its_error(procs):
    url = f"tcp://127.0.0.1:{free_port()}"
    procs.broker(url)
    wait_for(lambda: _answers(url), 20, "the broker")
    stop = threading.Event()

    def other_implementation() -> None:  # answers every request with "unknown op", as a foreign worker would
        sock = zmq.Context.instance().socket(zmq.DEALER)
        sock.linger = 0
        sock.connect(url)
        sock.send_multipart([p.WORKER_HEADER, p.MDPW.READY, b"modelhost"])
        try:
            while not stop.is_set():
                sock.send_multipart([p.WORKER_HEADER, p.MDPW.HEARTBEAT])
                if sock.poll(50):
                    frames = sock.recv_multipart()
                    if frames[1] == p.MDPW.REQUEST:
                        request = p.unpack_request(frames[4:])
                        error = BadInput(f"unknown op {request['op']!r}")
                        sock.send_multipart([p.WORKER_HEADER, p.MDPW.FINAL, frames[2], b"",
                                             *p.error_body(request.get("id"), "other", error)])
        finally:
            sock.close()
    thread = threading.Thread(target=other_implementation)
    thread.start()
    try:
        wait_registered(url)

        async def run() -> list:
            async with AsyncClient(url, timeout_s=10) as client:
                return await asyncio.gather(*(client.echo(i) for i in range(5)), return_exceptions=True)
        results = asyncio.run(run())
    finally:
        stop.set()
        thread.join()
    assert all(isinstance(r, BadInput) and "unknown op 'pack'" in str(r) for r in results), results


def test_counters_move_by_user_requests_packed_or_not(procs, broker_url, model_dir):
    base = free_port()
    broker_port, worker_ports = base, [free_port(), free_port()]
    url = f"tcp://127.0.0.1:{free_port()}"
    procs.broker(url, "--metrics-port", str(broker_port))
    for port in worker_ports:
        procs.worker(url, model_dir, "--metrics-port", str(port))
    wait_workers(url, 2)
    broker_metrics = f"http://127.0.0.1:{broker_port}/metrics"
    worker_metrics = [f"http://127.0.0.1:{port}/metrics" for port in worker_ports]

    def counts() -> dict[str, float]:
        return {
            "dispatched": metric(broker_metrics, "fractal_broker_requests_dispatched_total"),
            "completed": metric(broker_metrics, "fractal_broker_requests_completed_total"),
            "duration": metric(broker_metrics, "fractal_broker_request_duration_seconds_count"),
            "queue_wait": metric(broker_metrics, "fractal_broker_queue_wait_seconds_count"),
            "worker_ok": sum(metric(u, "fractal_worker_requests_total", op="predict", outcome="ok")
                             for u in worker_metrics),
            "worker_error": sum(metric(u, "fractal_worker_requests_total", op="predict", outcome="error")
                                for u in worker_metrics),
            "worker_seconds": sum(metric(u, "fractal_worker_request_duration_seconds_count", op="predict")
                                  for u in worker_metrics)}

    before = counts()

    async def run() -> list:
        async with AsyncClient(url, timeout_s=60) as client:
            calls, expected = mixed_calls(client, 500)
            return await asyncio.gather(*calls, return_exceptions=True), expected
    results, expected = asyncio.run(run())
    check_answers(results, expected)
    with Client(url, timeout_s=30) as client:  # and 37 unpacked ones
        for i in range(37):
            client.predict("iris.onnx", [[i % 8, 1, 2, 3]])
    errors = sum(1 for r in results if isinstance(r, (BadInput, ModelNotFound)))
    after = counts()
    delta = {k: after[k] - before[k] for k in before}
    assert delta["dispatched"] == delta["completed"] == delta["duration"] == delta["queue_wait"] == 537
    assert delta["worker_ok"] == 537 - errors and delta["worker_error"] == errors
    assert delta["worker_seconds"] == 537


def test_each_call_times_out_at_its_own_deadline_whatever_order_they_came_in(procs):
    """One timer expires every call (AsyncClient's deadline sweep): a call with a shorter timeout made
    after a longer one still fails at its own deadline, never before it, and the longer one waits on."""
    url = f"tcp://127.0.0.1:{free_port()}"
    procs.broker(url)
    wait_for(lambda: _answers(url), 20, "the broker")
    short_s = 0.3

    async def run() -> tuple[list, bool]:
        async with AsyncClient(url, timeout_s=60) as client:
            worker = SilentWorker(url)  # takes every call and never answers
            try:
                wait_registered(url)
                started = time.monotonic()

                async def ended(timeout_s: float) -> tuple[float, object]:
                    try:
                        result: object = await client.echo(timeout_s, timeout_s=timeout_s)
                    except Timeout as exc:
                        result = exc
                    return time.monotonic() - started, result
                longest = asyncio.ensure_future(client.echo("long"))  # the client's 60 s
                await asyncio.sleep(0)
                ends = await asyncio.gather(ended(3 * short_s), ended(short_s), ended(2 * short_s))
                still_waiting = not longest.done()
                longest.cancel()
                return ends, still_waiting
            finally:
                worker.stop()
    ends, still_waiting = asyncio.run(run())
    assert all(isinstance(result, Timeout) for _s, result in ends), ends
    (third_s, _), (first_s, _), (second_s, _) = ends
    assert short_s <= first_s < second_s < third_s, ends  # each at its own deadline, in deadline order
    assert second_s >= 2 * short_s and third_s >= 3 * short_s, ends
    assert still_waiting


def test_a_tiny_models_calls_wait_behind_a_window_of_two_messages_and_then_leave_together(procs, model_dir):
    """Once replies say a model runs in well under 0.1 ms, at most two messages of it are in flight
    (broker/pacing.py): calls made meanwhile wait in the client and leave as one pack when a place
    frees, instead of one small message per loop turn. Seen from the broker: with its one worker busy,
    only the first two calls queue there."""
    url = f"tcp://127.0.0.1:{free_port()}"
    procs.broker(url, "--reserve-workers", "0")
    procs.worker(url, model_dir)
    wait_workers(url, 1)
    with Client(url, timeout_s=60) as sync:
        sync.upload("slow.onnx", slow_model())
    rows = RNG.random((12, 1, 4), dtype=np.float32) * 8

    async def main() -> tuple[int, list]:
        client = AsyncClient(url, timeout_s=60)
        try:
            for _ in range(200):  # until a reply's run time makes iris tiny (one usually does)
                await client.predict("iris.onnx", [[2, 5, 1, 4]])
                if "iris.onnx" in client._pacing.tiny:
                    break
            assert "iris.onnx" in client._pacing.tiny
            loop = asyncio.get_running_loop()
            with Client(url, timeout_s=60) as blocker:  # the one worker runs a slow call meanwhile
                slow = loop.run_in_executor(None, blocker.predict, "slow.onnx", slow_input(1.0))
                await loop.run_in_executor(None, wait_busy, url, 1)
                calls = []
                for wave in (rows[:1], rows[1:2], rows[2:]):  # three loop turns: three messages without the window
                    calls += [asyncio.ensure_future(client.predict("iris.onnx", {"float_input": r})) for r in wave]
                    await asyncio.sleep(0.05)
                status = await client.broker_status(timeout_s=10)
                assert status is not None
                queued = status["broker"]["services"]["modelhost"]["queued"]
                results = await asyncio.gather(*calls)
                await slow
            return queued, results
        finally:
            await client.aclose()
    queued, results = asyncio.run(main())
    assert queued == 2, f"{queued} calls queued at the broker: the window did not hold the third message"
    iris = session("iris.onnx")
    for row, result in zip(rows, results, strict=True):
        label, probabilities = iris.run(None, {"float_input": row})
        assert result["label"].tolist() == label.tolist()
        np.testing.assert_allclose(result["probabilities"], probabilities, rtol=1e-5, atol=1e-6)
