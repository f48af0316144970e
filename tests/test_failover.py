"""Worker and broker deaths: re-dispatch once, then an error reply, never silence; re-registration."""
from __future__ import annotations

import asyncio
import os
import signal
import time

import numpy as np
import onnxruntime as ort
import pytest

from broker.client import AsyncClient, Client
from broker.errors import NoWorkerAvailable, WorkerLost

from .conftest import wait_workers
from .onnx_models import slow_input, slow_model


def pid_of(node: str) -> int:
    return int(node.rsplit("-", 2)[1])  # node ids are host-pid-suffix


async def _start_slow(aclient: AsyncClient) -> asyncio.Future:
    future = asyncio.ensure_future(aclient.predict("slow.onnx", {"x": slow_input()}))
    await asyncio.sleep(0.3)
    return future


def test_killing_the_busy_worker_redispatches_to_the_other(client, cluster):
    client.upload("slow.onnx", slow_model())
    expected = ort.InferenceSession(slow_model(), providers=["CPUExecutionProvider"]).run(
        None, {"x": slow_input()})[0]

    async def scenario():
        async with AsyncClient(cluster["url"], timeout_s=30) as aclient:
            slow = await _start_slow(aclient)
            idle_pid = pid_of((await aclient.echo("who is idle"))["node"])
            busy = next(w for w in cluster["workers"] if w.pid != idle_pid)
            os.kill(busy.pid, signal.SIGKILL)
            return await slow

    outputs = asyncio.run(scenario())
    np.testing.assert_allclose(outputs["y"], expected, rtol=1e-4)


def test_killing_both_workers_gives_an_error_not_silence(client, cluster):
    client.upload("slow.onnx", slow_model())

    async def scenario():
        async with AsyncClient(cluster["url"], timeout_s=30) as aclient:
            slow = await _start_slow(aclient)
            idle_pid = pid_of((await aclient.echo("who is idle"))["node"])
            started = time.monotonic()
            busy = next(w.pid for w in cluster["workers"] if w.pid != idle_pid)
            os.kill(busy, signal.SIGKILL)
            await asyncio.sleep(0.8)  # past the 0.6 s liveness window: detected, re-dispatched
            os.kill(idle_pid, signal.SIGKILL)  # now busy with the re-dispatched request
            with pytest.raises((WorkerLost, NoWorkerAvailable)):
                await slow
            return time.monotonic() - started

    assert asyncio.run(scenario()) < 5  # well inside the call's 30 s deadline


def test_workers_reregister_after_a_broker_restart(procs, cluster):
    url = cluster["url"]
    broker = next(p for p in procs.procs if "broker" in p.args[2])
    broker.send_signal(signal.SIGKILL)
    broker.wait()
    with Client(url, timeout_s=2) as client:
        with pytest.raises(NoWorkerAvailable):
            client.models()  # nobody listening: a fast 503-style error, not a hang
        procs.broker(url)
        wait_workers(url, 2)
        assert client.predict("iris.onnx", {"float_input": [[2, 5, 1, 4]]})["label"].tolist() == [1]
    assert all(w.poll() is None for w in cluster["workers"])  # the same worker processes


def test_requests_longer_than_the_liveness_window_keep_workers_registered(client, cluster):
    client.upload("slow.onnx", slow_model())
    for _ in range(2):  # each takes ~1.2 s, twice the 0.6 s liveness window of these tests
        assert client.predict("slow.onnx", {"x": slow_input()})["y"].shape == (1000, 1000)
    nodes = [client.echo(i)["node"] for i in range(4)]  # no WorkerLost, no stale identity
    assert len(set(nodes)) == 2
