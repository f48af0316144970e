"""Bounded queue, queue expiry, no-worker replies, and garbage that must not hurt the broker."""
from __future__ import annotations

import asyncio
import os
import random
import time

import pytest
import zmq

from broker.client import AsyncClient, Client
from broker.errors import NoWorkerAvailable, Overloaded, Timeout
from broker.protocol import unpack

from .harness import free_port, wait_busy, wait_workers
from .onnx_models import slow_input, slow_model

pytestmark = pytest.mark.slow  # starts real processes

QUEUE_TIMEOUT_S = 0.3


@pytest.fixture
def one_worker(procs, model_dir, request):
    url = f"tcp://127.0.0.1:{free_port()}"
    procs.broker(url, *request.param)
    procs.worker(url, model_dir)
    wait_workers(url, 1)
    with Client(url) as client:
        client.upload("slow.onnx", slow_model())
    return url


async def _while_busy(url: str, calls: int, apart: bool = False) -> tuple[list, float, bool]:
    """`calls` echoes sent while the only worker computes a call that outlasts the queue timeout 3x;
    returns their outcomes, how long they took, and whether the slow call was still running then.
    Made together they leave as one pack; `apart`, as one message each (each call yields to the
    event loop, whose next turn sends what is waiting)."""
    async with AsyncClient(url, timeout_s=60) as aclient:
        slow = asyncio.ensure_future(aclient.predict("slow.onnx", slow_input(3 * QUEUE_TIMEOUT_S)))
        await asyncio.to_thread(wait_busy, url)
        started = time.monotonic()
        tasks = []
        for i in range(calls):
            tasks.append(asyncio.ensure_future(aclient.echo(i, timeout_s=30)))
            if apart:
                await asyncio.sleep(0.01)
        results = await asyncio.gather(*tasks, return_exceptions=True)
        elapsed = time.monotonic() - started
        still_busy = not slow.done()
        await slow
        return results, elapsed, still_busy


@pytest.mark.parametrize("one_worker", [["--max-queue", "2"]], indirect=True)
def test_past_the_queue_bound_clients_get_overloaded_at_once(one_worker):
    results, _, _ = asyncio.run(_while_busy(one_worker, 5, apart=True))
    overloaded = [r for r in results if isinstance(r, Overloaded)]
    served = [r for r in results if isinstance(r, dict)]
    assert len(overloaded) == 3 and len(served) == 2
    # Made together, the five leave as one pack: one message, one place in the queue.
    results, _, _ = asyncio.run(_while_busy(one_worker, 5))
    assert all(isinstance(r, dict) for r in results)


@pytest.mark.parametrize("one_worker", [["--queue-timeout-s", str(QUEUE_TIMEOUT_S)]], indirect=True)
def test_queued_requests_expire_with_a_timeout_reply(one_worker):
    results, elapsed, still_busy = asyncio.run(_while_busy(one_worker, 2))
    assert all(isinstance(r, Timeout) for r in results), results
    # The broker's expiry, not the slow call finishing: the replies came while it still computed.
    assert still_busy and elapsed >= QUEUE_TIMEOUT_S


def test_no_registered_worker_is_an_immediate_error(broker_url):
    with Client(broker_url, timeout_s=30) as client:
        started = time.monotonic()
        with pytest.raises(NoWorkerAvailable):  # the broker's answer: a lost call would raise Timeout
            client.models()
        assert time.monotonic() - started < client.timeout_s / 2


GARBAGE = [
    [b""], [b"x"], [b"MDPC02"], [b"MDPC02", b"\x09", b"svc"], [b"MDPC02", b"\x01"],
    [b"MDPW02", b"\x07"], [b"MDPW02", b"\x04", b"nobody", b"", b"body"], [b"MDPW02", b"\x01"],
    [b"", b"", b""], [b"MDPC02", b"\x01", b"modelhost", b"\xc1not msgpack"],
    [b"MDPC02", b"\x01", b"modelhost", b"\x81\xa2op\xa7predict"],
]


def serving_nodes(client: Client, most: int = 50) -> int:
    """How many workers answer echoes, at most `most` of them sent one at a time. Not "4 echoes reach
    2 workers": the broker's status poll (every status_interval_s) may hold one worker while they run."""
    nodes: set[str] = set()
    for i in range(most):
        nodes.add(client.echo(i)["node"])
        if len(nodes) == 2:
            break
    return len(nodes)


@pytest.fixture
def raw_socket(cluster):
    """A bare DEALER on the cluster's broker, for frames our client would never send."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.linger = 0
    sock.connect(cluster.url)
    yield sock
    ctx.destroy(linger=0)


def test_garbage_frames_leave_broker_and_workers_serving(cluster, raw_socket):
    rng = random.Random(7)
    for frames in GARBAGE:
        raw_socket.send_multipart(frames)
    for _ in range(300):
        raw_socket.send_multipart([os.urandom(rng.randint(0, 40)) for _ in range(rng.randint(1, 6))])
    with Client(cluster.url, timeout_s=5) as client:
        assert client.predict("iris.onnx", {"float_input": [[2, 5, 1, 4]]})["label"].tolist() == [1]
        assert serving_nodes(client) == 2


def test_a_request_without_body_gets_an_error_and_wedges_no_worker(cluster, raw_socket):
    for _ in range(4):  # more than there are workers
        raw_socket.send_multipart([b"MDPC02", b"\x01", b"modelhost"])
        assert raw_socket.poll(3000), "no reply to a body-less REQUEST"
        assert unpack(raw_socket.recv_multipart()[3])["error"]["type"] == "ProtocolError"
    with Client(cluster.url, timeout_s=5) as client:
        assert serving_nodes(client) == 2
