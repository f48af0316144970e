"""Bounded queue, queue expiry, no-worker replies, and garbage that must not hurt the broker."""
from __future__ import annotations

import asyncio
import os
import random
import time

import pytest
import zmq

from broker.client import AsyncClient, Client
from broker.protocol import unpack
from broker.errors import NoWorkerAvailable, Overloaded, Timeout

from .conftest import free_port, wait_workers
from .onnx_models import slow_input, slow_model


@pytest.fixture
def one_worker(procs, model_dir, request):
    url = f"tcp://127.0.0.1:{free_port()}"
    procs.broker(url, *request.param)
    procs.worker(url, model_dir)
    wait_workers(url, 1)
    with Client(url) as client:
        client.upload("slow.onnx", slow_model())
    return url


async def _while_busy(url: str, calls: int, apart_s: float = 0.0) -> tuple[list, float]:
    """`calls` echoes while the only worker runs a slow predict; made together they leave as one pack,
    made `apart_s` apart as one message each."""
    async with AsyncClient(url, timeout_s=30) as aclient:
        slow = asyncio.ensure_future(aclient.predict("slow.onnx", {"x": slow_input()}))
        await asyncio.sleep(0.3)
        started = time.monotonic()
        tasks = []
        for i in range(calls):
            tasks.append(asyncio.ensure_future(aclient.echo(i)))
            if apart_s:
                await asyncio.sleep(apart_s)
        results = await asyncio.gather(*tasks, return_exceptions=True)
        elapsed = time.monotonic() - started
        await slow
        return results, elapsed


@pytest.mark.parametrize("one_worker", [["--max-queue", "2"]], indirect=True)
def test_past_the_queue_bound_clients_get_overloaded_at_once(one_worker):
    results, _ = asyncio.run(_while_busy(one_worker, 5, apart_s=0.01))
    overloaded = [r for r in results if isinstance(r, Overloaded)]
    served = [r for r in results if isinstance(r, dict)]
    assert len(overloaded) == 3 and len(served) == 2
    # Made together, the five leave as one pack: one message, one place in the queue.
    results, _ = asyncio.run(_while_busy(one_worker, 5))
    assert all(isinstance(r, dict) for r in results)


@pytest.mark.parametrize("one_worker", [["--queue-timeout-s", "0.3"]], indirect=True)
def test_queued_requests_expire_with_a_timeout_reply(one_worker):
    results, elapsed = asyncio.run(_while_busy(one_worker, 2))
    assert all(isinstance(r, Timeout) for r in results)
    assert elapsed < 0.9  # the broker's expiry, not the slow request finishing


def test_no_registered_worker_is_an_immediate_error(broker_url):
    with Client(broker_url, timeout_s=10) as client:
        started = time.monotonic()
        with pytest.raises(NoWorkerAvailable):
            client.models()
        assert time.monotonic() - started < 1


GARBAGE = [
    [b""], [b"x"], [b"MDPC02"], [b"MDPC02", b"\x09", b"svc"], [b"MDPC02", b"\x01"],
    [b"MDPW02", b"\x07"], [b"MDPW02", b"\x04", b"nobody", b"", b"body"], [b"MDPW02", b"\x01"],
    [b"", b"", b""], [b"MDPC02", b"\x01", b"modelhost", b"\xc1not msgpack"],
    [b"MDPC02", b"\x01", b"modelhost", b"\x81\xa2op\xa7predict"],
]


@pytest.fixture
def raw_socket(cluster):
    """A bare DEALER on the cluster's broker, for frames our client would never send."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.linger = 0
    sock.connect(cluster["url"])
    yield sock
    ctx.destroy(linger=0)


def test_garbage_frames_leave_broker_and_workers_serving(cluster, raw_socket):
    rng = random.Random(7)
    for frames in GARBAGE:
        raw_socket.send_multipart(frames)
    for _ in range(300):
        raw_socket.send_multipart([os.urandom(rng.randint(0, 40)) for _ in range(rng.randint(1, 6))])
    with Client(cluster["url"], timeout_s=5) as client:
        assert client.predict("iris.onnx", {"float_input": [[2, 5, 1, 4]]})["label"].tolist() == [1]
        assert len({client.echo(i)["node"] for i in range(4)}) == 2


def test_a_request_without_body_gets_an_error_and_wedges_no_worker(cluster, raw_socket):
    for _ in range(4):  # more than there are workers
        raw_socket.send_multipart([b"MDPC02", b"\x01", b"modelhost"])
        assert raw_socket.poll(3000), "no reply to a body-less REQUEST"
        assert unpack(raw_socket.recv_multipart()[3])["error"]["type"] == "ProtocolError"
    with Client(cluster["url"], timeout_s=5) as client:
        assert len({client.echo(i)["node"] for i in range(4)}) == 2
