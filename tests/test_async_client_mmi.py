"""AsyncClient's MMI questions (service_ready, broker_status) answer as the sync Client's do, alongside
requests in flight on the same client, and say no in time while the broker is unreachable."""
from __future__ import annotations

import asyncio
import time

import pytest

from broker.client import AsyncClient, Client

from .harness import free_port

pytestmark = pytest.mark.slow  # starts real processes


def test_mmi_answers_match_the_sync_client(cluster):
    with Client(cluster.url, timeout_s=10) as sync:
        expected = (sync.service_ready(), sync.service_ready("nobody"), sync.broker_status())

    async def scenario():
        async with AsyncClient(cluster.url, timeout_s=10) as aclient:
            echoes = [aclient.echo(i) for i in range(32)]  # requests in flight while MMI is asked
            ready, nobody, status, *replies = await asyncio.gather(
                aclient.service_ready(), aclient.service_ready("nobody"), aclient.broker_status(), *echoes)
            return ready, nobody, status, replies

    ready, nobody, status, replies = asyncio.run(scenario())
    assert (ready, nobody) == expected[:2] == (True, False)
    assert status["broker"]["up"] and status["broker"]["services"]["modelhost"]["workers"] == 2
    assert len(status["workers"]) == len(expected[2]["workers"]) == 2
    assert sorted(r["data"] for r in replies) == list(range(32))


def test_mmi_says_no_in_time_while_the_broker_is_away():
    async def scenario():
        async with AsyncClient(f"tcp://127.0.0.1:{free_port()}", timeout_s=10) as aclient:
            started = time.monotonic()
            answers = await asyncio.gather(aclient.service_ready(timeout_s=0.5),
                                           aclient.broker_status(timeout_s=0.5))
            return answers, time.monotonic() - started

    (ready, status), took_s = asyncio.run(scenario())
    assert ready is False and status is None
    assert took_s < 10  # bounded by the questions' own timeouts, never the client's 10 s
