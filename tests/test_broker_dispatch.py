"""Least-recently-used dispatch: work spreads over idle workers and never reaches a busy one."""
from __future__ import annotations

import asyncio

from broker.client import AsyncClient

from .onnx_models import slow_input, slow_model


def test_sequential_requests_alternate_between_two_workers(client):
    nodes = [client.echo(i)["node"] for i in range(6)]
    assert len(set(nodes)) == 2
    assert all(a != b for a, b in zip(nodes, nodes[1:]))  # LRU: each call goes to the other worker


def test_a_busy_worker_gets_no_new_work(client, cluster):
    client.upload("slow.onnx", slow_model())

    async def scenario():
        async with AsyncClient(cluster["url"], timeout_s=30) as aclient:
            slow = asyncio.ensure_future(aclient.call("predict", {"model": "slow.onnx",
                                                                 "inputs": {"x": slow_input()}}))
            await asyncio.sleep(0.3)
            echoes = [await aclient.echo(i) for i in range(10)]
            return await slow, echoes

    slow_reply, echoes = asyncio.run(scenario())
    echo_nodes = {e["node"] for e in echoes}
    assert len(echo_nodes) == 1  # all on the idle worker while the other computes
    assert slow_reply["outputs"]["y"].shape == (1000, 1000)
