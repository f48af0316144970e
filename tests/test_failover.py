"""Worker and broker deaths: re-dispatch once, then an error reply, never silence; re-registration."""
from __future__ import annotations

import asyncio
import os
import signal

import pytest

from broker.client import AsyncClient, Client
from broker.errors import NoWorkerAvailable, WorkerLost

from .harness import LIVENESS_WINDOW_S, wait_busy, wait_for, wait_workers
from .onnx_models import SLOW_ATOL, slow_expected, slow_input, slow_model

pytestmark = pytest.mark.slow  # starts real processes


def pid_of(node: str) -> int:
    return int(node.rsplit("-", 2)[1])  # node ids are host-pid-suffix


async def _start_slow(aclient: AsyncClient, url: str, feed: dict) -> asyncio.Future:
    """A slow call, returned once the broker has handed it to a worker."""
    future = asyncio.ensure_future(aclient.predict("slow.onnx", feed))
    await asyncio.to_thread(wait_busy, url)
    return future


def test_killing_the_busy_worker_redispatches_to_the_other(client, cluster):
    client.upload("slow.onnx", slow_model())
    feed = slow_input(3 * LIVENESS_WINDOW_S)  # still computing when it is killed

    async def scenario():
        async with AsyncClient(cluster.url, timeout_s=120) as aclient:
            slow = await _start_slow(aclient, cluster.url, feed)
            idle_pid = pid_of((await aclient.echo("who is idle"))["node"])
            busy = next(w for w in cluster.workers if w.pid != idle_pid)
            os.kill(busy.pid, signal.SIGKILL)
            return await slow

    outputs = asyncio.run(scenario())
    assert abs(outputs["y"].item() - slow_expected(int(feed["k"][0]))) < SLOW_ATOL


def test_killing_both_workers_gives_an_error_not_silence(client, cluster):
    client.upload("slow.onnx", slow_model())
    feed = slow_input(3 * LIVENESS_WINDOW_S)

    async def scenario():
        async with AsyncClient(cluster.url, timeout_s=120) as aclient:
            slow = await _start_slow(aclient, cluster.url, feed)
            idle_pid = pid_of((await aclient.echo("who is idle"))["node"])
            busy = next(w.pid for w in cluster.workers if w.pid != idle_pid)
            os.kill(busy, signal.SIGKILL)
            # Detected after the liveness window and re-dispatched: the survivor is busy with it.
            await asyncio.to_thread(wait_for, lambda: broker_view(cluster.url) == [("busy", 1)], 30,
                                    "the re-dispatch to the surviving worker")
            os.kill(idle_pid, signal.SIGKILL)
            with pytest.raises((WorkerLost, NoWorkerAvailable)):  # an answer, not the client's Timeout
                await slow

    asyncio.run(scenario())


def broker_view(url: str) -> list[tuple[str, int]]:
    """(state, count) of the workers the broker lists."""
    with Client(url, timeout_s=5) as client:
        status = client.broker_status(timeout_s=5) or {"workers": []}
    states = [w["state"] for w in status["workers"]]
    return sorted((s, states.count(s)) for s in set(states))


def test_workers_reregister_after_a_broker_restart(procs, cluster):
    url = cluster.url
    broker = next(p for p in procs.procs if "broker" in p.args[2])
    broker.send_signal(signal.SIGKILL)
    broker.wait()
    with Client(url, timeout_s=2) as client:
        with pytest.raises(NoWorkerAvailable):
            client.models()  # nobody listening: a fast 503-style error, not a hang
        procs.broker(url)
        wait_workers(url, 2)
        assert client.predict("iris.onnx", {"float_input": [[2, 5, 1, 4]]})["label"].tolist() == [1]
    assert all(w.poll() is None for w in cluster.workers)  # the same worker processes


def test_requests_longer_than_the_liveness_window_keep_workers_registered(client, cluster):
    client.upload("slow.onnx", slow_model())
    feed = slow_input(2 * LIVENESS_WINDOW_S)  # the broker hears no FINAL for twice its liveness window
    for _ in range(2):
        assert abs(client.predict("slow.onnx", feed, timeout_s=60)["y"].item()
                   - slow_expected(int(feed["k"][0]))) < SLOW_ATOL
    nodes = [client.echo(i)["node"] for i in range(4)]  # no WorkerLost, no stale identity
    assert len(set(nodes)) == 2
