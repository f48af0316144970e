"""A broker SIGKILLed and started again: calls in flight through the direct clients get their one right
answer when they are safe to repeat, and a 503 (BrokerLost) at once when they are not."""
from __future__ import annotations

import asyncio
import signal
import threading
from pathlib import Path

import numpy as np
import pytest

from broker.client import AsyncClient, Client
from broker.errors import BrokerLost, RetryLater

from .harness import Processes, free_port, wait_busy, wait_for, wait_workers
from .onnx_models import SLOW_ATOL, slow_expected, slow_model, slow_steps

pytestmark = pytest.mark.slow  # starts real processes

SLOW = "slow.onnx"
GRACE = ["--startup-grace-s", "20"]  # as fractal serve runs it: a restarted broker waits for its workers


@pytest.fixture
def restartable(procs: Processes, model_dir: Path) -> dict:
    """A broker (with the start-up grace fractal serve gives it), two workers and the slow model."""
    url = f"tcp://127.0.0.1:{free_port()}"
    state = {"url": url, "broker": procs.broker(url, *GRACE)}
    for _ in range(2):
        procs.worker(url, model_dir)
    wait_workers(url, 2)
    with Client(url, timeout_s=30) as client:
        client.upload(SLOW, slow_model())
    return state


def kill_broker(state: dict) -> None:
    state["broker"].send_signal(signal.SIGKILL)
    state["broker"].wait(timeout=10)


def start_broker(procs: Processes, state: dict) -> None:
    state["broker"] = procs.broker(state["url"], *GRACE)


def queued(url: str) -> int:
    with Client(url, timeout_s=5) as client:
        status = client.broker_status(timeout_s=5) or {}
    return sum(s["queued"] for s in status.get("broker", {}).get("services", {}).values())


def ks(count: int) -> list[int]:
    """Distinct step counts of about a second each: each call has its own right answer."""
    base = slow_steps(1.0)
    return [base + i for i in range(count)]


def check_slow(result: dict, k: int) -> None:
    np.testing.assert_allclose(result["y"], [[slow_expected(k)]], atol=SLOW_ATOL)


def test_client_calls_in_flight_survive_a_broker_restart(procs: Processes, restartable: dict) -> None:
    url = restartable["url"]
    steps = ks(4)
    results: dict[int, object] = {}
    with Client(url, timeout_s=60) as client:
        def predict(i: int) -> None:
            try:
                results[i] = client.predict(SLOW, {"k": np.array([steps[i]], np.int64)})
            except Exception as exc:  # noqa: BLE001 - the assertion below names it
                results[i] = exc

        def read() -> None:
            try:
                results["models"] = client.models()
            except Exception as exc:  # noqa: BLE001
                results["models"] = exc

        def upload() -> None:
            try:
                results["upload"] = client.upload("late.onnx", slow_model())
            except Exception as exc:  # noqa: BLE001
                results["upload"] = exc

        threads = [threading.Thread(target=predict, args=(i,)) for i in range(len(steps))]
        for t in threads:
            t.start()
        wait_busy(url, 2)
        wait_for(lambda: queued(url) >= len(steps) - 2, 20, "the other predictions queued in the broker")
        extra = [threading.Thread(target=read), threading.Thread(target=upload)]
        for t in extra:
            t.start()
        wait_for(lambda: queued(url) >= len(steps), 20, "the read and the upload queued in the broker")
        kill_broker(restartable)
        # NOTE: the upload is not safe to repeat: it fails while the broker is still down, never hangs.
        wait_for(lambda: "upload" in results, 10, "the upload to fail")
        assert isinstance(results["upload"], BrokerLost), results["upload"]
        start_broker(procs, restartable)
        for t in [*threads, *extra]:
            t.join(timeout=90)
    for i, k in enumerate(steps):
        assert isinstance(results[i], dict), results[i]
        check_slow(results[i], k)
    assert SLOW in results["models"], results["models"]


def test_client_call_many_survives_a_broker_restart(procs: Processes, restartable: dict) -> None:
    url = restartable["url"]
    steps = ks(3)
    out: list = []
    with Client(url, timeout_s=60) as client:
        worker = threading.Thread(target=lambda: out.extend(client.call_many(
            [("predict", {"model": SLOW, "inputs": {"k": np.array([k], np.int64)}}) for k in steps]
            + [("echo", {"data": "after"})], return_exceptions=True)))
        worker.start()
        wait_busy(url, 2)
        kill_broker(restartable)
        start_broker(procs, restartable)
        worker.join(timeout=90)
    assert len(out) == len(steps) + 1, out
    for result, k in zip(out, steps, strict=False):
        assert isinstance(result, dict), result
        check_slow(result["outputs"], k)
    assert out[-1]["data"] == "after"


def test_async_client_calls_in_flight_survive_a_broker_restart(procs: Processes, restartable: dict) -> None:
    url = restartable["url"]
    # NOTE: the first call runs ~4 s: its worker must stay busy while the pack waits placement_wait_s for
    # the model's holder, the other worker loads it, and the next calls queue (under load too)
    steps = [slow_steps(4.0), *ks(5)]

    async def scenario() -> None:
        async with AsyncClient(url, timeout_s=60) as client:
            # NOTE: made in one loop turn, the predictions leave as packs; the pack a worker holds and the
            # queued ones all go back to the outbox, and leave again re-packed.
            def predict(k: int) -> asyncio.Future:
                return asyncio.ensure_future(client.predict(SLOW, {"k": np.array([k], np.int64)}))
            predictions = [predict(steps[0])]
            await asyncio.to_thread(wait_busy, url, 1)
            predictions += [predict(k) for k in steps[1:]]  # one pack, to the other worker
            await asyncio.to_thread(wait_busy, url, 2)
            # One more pack, queued in the broker: two reads, and an upload and a delete.
            reads = [asyncio.ensure_future(client.repository()), asyncio.ensure_future(client.echo(7))]
            upload = asyncio.ensure_future(client.upload("late.onnx", slow_model()))
            delete = asyncio.ensure_future(client.delete("iris.onnx"))
            await asyncio.to_thread(wait_for, lambda: queued(url) >= 4, 20, "the reads, upload and delete queued")
            await asyncio.to_thread(kill_broker, restartable)
            # Not safe to repeat: both fail with a 503 while the broker is down.
            for call in (upload, delete):
                with pytest.raises(BrokerLost) as caught:
                    await asyncio.wait_for(call, 10)
                assert isinstance(caught.value, RetryLater) and caught.value.http_status == 503
            # A delete while the broker is away is refused at once; a read waits for it.
            with pytest.raises(RetryLater):
                await client.delete("iris.onnx")
            late_read = asyncio.ensure_future(client.models())
            await asyncio.to_thread(start_broker, procs, restartable)
            for prediction, k in zip(predictions, steps, strict=True):
                check_slow(await asyncio.wait_for(prediction, 90), k)
            repository, echo = [await asyncio.wait_for(r, 90) for r in reads]
            assert SLOW in {m["name"] for m in repository}
            assert echo["data"] == 7
            assert "iris.onnx" in await asyncio.wait_for(late_read, 90)

    asyncio.run(scenario())
    with Client(restartable["url"], timeout_s=30) as client:
        assert "late.onnx" not in client.models()  # the upload was never carried out, nor repeated


def test_a_broker_that_stays_away_fails_calls_in_time(procs: Processes, restartable: dict) -> None:
    """Each call's own timeout still bounds it while the broker is away."""
    url = restartable["url"]

    async def scenario() -> None:
        async with AsyncClient(url, timeout_s=30) as client:
            assert await client.echo(1)
            await asyncio.to_thread(kill_broker, restartable)
            with pytest.raises(Exception) as caught:
                await asyncio.wait_for(client.echo(2, timeout_s=1.0), 10)
            assert caught.type.__name__ in ("Timeout", "NoWorkerAvailable")

    asyncio.run(scenario())
    with Client(url, timeout_s=30) as client:
        with pytest.raises(Exception) as caught:
            client.echo(3, timeout_s=1.0)
        assert caught.type.__name__ in ("Timeout", "NoWorkerAvailable")


def test_a_broker_in_its_start_up_grace_holds_requests_until_a_worker_registers(procs: Processes,
                                                                                model_dir: Path) -> None:
    url = f"tcp://127.0.0.1:{free_port()}"
    procs.broker(url, *GRACE)
    answers: list = []
    with Client(url, timeout_s=60) as client:
        asking = threading.Thread(target=lambda: answers.append(client.echo("held")))
        asking.start()
        wait_for(lambda: queued(url) >= 1, 20, "the echo queued with no worker registered")
        procs.worker(url, model_dir)
        asking.join(timeout=60)
    assert answers and answers[0]["data"] == "held"
