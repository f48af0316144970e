"""Placement with real processes (docs/protocol.md, "Placement"): a broker with `--placement`, workers on
free local ports, calls from the direct client. A request for a model whose only holder is busy waits for
it while its wait is under `placement_wait_s`, and goes to an idle worker (which loads the model) after;
a worker SIGKILLed under mixed load loses no request."""
from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from broker.client import Client

from .harness import Processes, free_port, metered_workers, wait_busy, wait_for, wait_workers
from .onnx_models import SLOW_ATOL, slow_expected, slow_input, slow_model, slow_steps
from .test_admission import Background, metrics, runs
from .test_metrics import sample_sum

pytestmark = pytest.mark.slow  # every test here starts processes


def two_workers(procs: Processes, model_dir: Path, wait_s: float) -> tuple[str, list[int]]:
    (model_dir / "slow.onnx").write_bytes(slow_model())
    url = f"tcp://127.0.0.1:{free_port()}"
    procs.broker(url, "--placement", "--placement-wait-s", str(wait_s))
    ports = metered_workers(procs, url, model_dir, 2)
    return url, ports


def check(outcome: object, seconds: float) -> None:
    assert not isinstance(outcome, Exception), outcome
    assert isinstance(outcome, dict)
    value = float(np.asarray(next(iter(outcome.values()))).ravel()[0])
    assert abs(value - slow_expected(slow_steps(seconds))) < SLOW_ATOL


@pytest.mark.parametrize("wait_s, spreads", [(60.0, False), (0.05, True)])
def test_a_request_waits_for_its_busy_holder_until_placement_wait_s(procs: Processes, model_dir: Path,
                                                                    wait_s: float, spreads: bool) -> None:
    url, ports = two_workers(procs, model_dir, wait_s)
    with Client(url, timeout_s=60) as client:
        check(client.predict("slow.onnx", slow_input(0.01)), 0.01)  # one worker loads it: the holder
    before = [runs(port, "slow.onnx") for port in ports]
    holder = before.index(1)
    busy = Background(url, "slow.onnx", slow_input(1.0))
    wait_busy(url)
    second = Background(url, "slow.onnx", slow_input(0.01))
    check(second.join(), 0.01)
    check(busy.join(), 1.0)
    after = [runs(port, "slow.onnx") for port in ports]
    gained = [a - b for a, b in zip(after, before, strict=True)]
    if spreads:  # the wait ended while the holder computed: the idle worker loaded the model and ran it
        assert gained[holder] == 1 and gained[1 - holder] == 1, gained
        assert second.ended < busy.ended
    else:  # the holder ran both, one after the other; the other worker never loaded the model
        assert gained[holder] == 2 and gained[1 - holder] == 0, gained
        assert second.ended > busy.ended


def test_a_sigkilled_worker_under_mixed_placement_load_loses_nothing(procs: Processes, model_dir: Path) -> None:
    (model_dir / "slow.onnx").write_bytes(slow_model())
    url = f"tcp://127.0.0.1:{free_port()}"
    procs.broker(url, "--placement", "--status-interval-s", "0.3")  # polls tell the broker the pids

    def status() -> list[dict]:
        with Client(url, timeout_s=10) as client:
            return (client.broker_status(timeout_s=5) or {"workers": []})["workers"]
    for _ in range(3):
        procs.worker(url, model_dir)
    wait_workers(url, 3)
    wait_for(lambda: sum(bool(w["pid"]) for w in status()) == 3, 20, "the broker to know every worker's pid")
    iris, diabetes = np.array([[2, 5, 1, 4]], np.float32), np.linspace(-0.1, 0.1, 10, dtype=np.float32)[None]
    with Client(url, timeout_s=60) as client:
        expected_diabetes = float(np.asarray(next(iter(client.predict("diabetes.onnx", diabetes).values()))).ravel()[0])
    calls = [("slow.onnx", slow_input(0.2)), ("iris.onnx", iris), ("diabetes.onnx", diabetes)]
    outcomes: list[tuple[str, object]] = []
    lock = threading.Lock()

    def caller(offset: int) -> None:
        with Client(url, timeout_s=60) as client:
            for i in range(12):
                model, inputs = calls[(offset + i) % len(calls)]
                try:
                    outcome: object = client.predict(model, inputs)
                except Exception as exc:  # counted as lost below
                    outcome = exc
                with lock:
                    outcomes.append((model, outcome))
    threads = [threading.Thread(target=caller, args=(n,), daemon=True) for n in range(6)]
    for thread in threads:
        thread.start()
    wait_busy(url, 2)  # NOTE: not 3: the slow model leaves one worker to the others (reserve_workers 1)
    busy = [w["pid"] for w in status() if w["state"] == "busy"]
    assert busy, "no busy worker"
    os.kill(busy[0], signal.SIGKILL)  # a worker with a request in flight
    for thread in threads:
        thread.join(timeout=120)
    assert len(outcomes) == 6 * 12
    for model, outcome in outcomes:
        assert isinstance(outcome, dict), (model, outcome)
        value = float(np.asarray(next(iter(outcome.values()))).ravel()[0])
        if model == "slow.onnx":
            assert abs(value - slow_expected(slow_steps(0.2))) < SLOW_ATOL
        elif model == "iris.onnx":
            assert value == 1  # the seed's label for [2, 5, 1, 4]
        else:
            assert value == pytest.approx(expected_diabetes, rel=1e-5)


@pytest.mark.parametrize("most", [1, 2])
def test_a_model_at_max_replicas_is_loaded_by_no_further_worker(procs: Processes, model_dir: Path, most: int) -> None:
    """Sidecar `replicas: {min: 0, max: 1}`: under concurrent load with two workers, only one ever loads
    the model (max 2: both may, and do: the test's control), and every answer is right."""
    (model_dir / "slow.onnx").write_bytes(slow_model())
    (model_dir / "slow.onnx.json").write_text(json.dumps({"replicas": {"min": 0, "max": most}}))
    url = f"tcp://127.0.0.1:{free_port()}"
    procs.broker(url, "--placement", "--placement-wait-s", "0.05", "--status-interval-s", "0.3")
    ports = metered_workers(procs, url, model_dir, 2)

    def workers() -> list[dict]:
        with Client(url, timeout_s=10) as client:
            return (client.broker_status(timeout_s=5) or {"workers": []})["workers"]
    wait_for(lambda: [w["model_replicas"] for w in workers()] == [{"slow.onnx": {"min": 0, "max": most}}] * 2,
             20, "the broker to learn the replicas policy from both workers")
    outcomes: list[object] = []
    lock = threading.Lock()

    def caller() -> None:
        with Client(url, timeout_s=60) as client:
            for _ in range(4):
                try:
                    outcome: object = client.predict("slow.onnx", slow_input(0.1))
                except Exception as exc:  # checked below
                    outcome = exc
                with lock:
                    outcomes.append(outcome)
    threads = [threading.Thread(target=caller, daemon=True) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert len(outcomes) == 16
    for outcome in outcomes:
        check(outcome, 0.1)
    ended = time.monotonic()
    loads = [sample_sum(metrics(port), "fractal_worker_cold_loads_total") for port in ports]  # only slow is asked
    ran = [runs(port, "slow.onnx") for port in ports]
    wait_for(lambda: all(w["status_age_s"] is not None and w["status_age_s"] < time.monotonic() - ended
                         for w in workers()), 20, "status from both workers given after the load")
    holders = [w for w in workers() if "slow.onnx" in (w["models_resident"] or [])]
    if most == 1:
        assert sorted(loads) == [0, 1] and sorted(ran) == [0, 16] and len(holders) == 1, (loads, ran, holders)
    else:  # the control: with room for two, the wait of 0.05 s spreads the load to both workers
        assert loads == [1, 1] and min(ran) > 0 and len(holders) == 2, (loads, ran, holders)
