"""Least-recently-used dispatch: work spreads over idle workers and never reaches a busy one."""
from __future__ import annotations

import asyncio

import pytest

from broker.client import AsyncClient

from .harness import wait_busy
from .onnx_models import SLOW_ATOL, slow_expected, slow_input, slow_model

pytestmark = pytest.mark.slow  # starts real processes


def test_sequential_requests_alternate_between_two_workers(client):
    nodes = [client.echo(i)["node"] for i in range(6)]
    assert len(set(nodes)) == 2
    assert all(a != b for a, b in zip(nodes, nodes[1:], strict=False))  # LRU: each call goes to the other worker


def test_a_busy_worker_gets_no_new_work(client, cluster):
    client.upload("slow.onnx", slow_model())
    feed = slow_input(2.0)

    async def scenario():
        async with AsyncClient(cluster.url, timeout_s=60) as aclient:
            slow = asyncio.ensure_future(aclient.call("predict", {"model": "slow.onnx", "inputs": feed}))
            await asyncio.to_thread(wait_busy, cluster.url)
            echoes = [await aclient.echo(i) for i in range(10)]
            assert not slow.done()  # the premise: every echo was sent while the other worker computed
            return await slow, echoes

    slow_reply, echoes = asyncio.run(scenario())
    echo_nodes = {e["node"] for e in echoes}
    assert len(echo_nodes) == 1  # all on the idle worker while the other computes
    assert abs(slow_reply["outputs"]["y"].item() - slow_expected(int(feed["k"][0]))) < SLOW_ATOL
