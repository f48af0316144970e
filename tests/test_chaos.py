"""Chaos: workers killed under load lose no request; a killed broker: 503 for changes, reads wait for it."""
from __future__ import annotations

import json
import signal
import sys
import threading
import urllib.error
import urllib.request

import pytest

from bench.chaos import run_chaos

from .harness import REPO, free_port, start_frontend, wait_for

pytestmark = pytest.mark.slow  # starts real processes

sys.path.insert(0, str(REPO / "deploy" / "lab"))
import load  # noqa: E402


def test_workers_killed_every_few_seconds_under_load_fail_no_request(tmp_path):
    result = run_chaos(tmp_path, duration_s=20, rate=50, kill_every_s=3)
    assert result["kills"] >= 5 and result["requests"] == sum(map(len, load.schedule(50, 20)))
    assert result["failed"] == 0, result


def status_of(url: str) -> tuple[int, str | None]:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.status, None
    except urllib.error.HTTPError as err:
        json.loads(err.read())  # the seed's error shape, never a traceback
        return err.code, err.headers.get("Retry-After")


def delete_status(url: str) -> tuple[int, str | None]:
    request = urllib.request.Request(url, method="DELETE")
    try:
        with urllib.request.urlopen(request, timeout=10) as resp:
            return resp.status, None
    except urllib.error.HTTPError as err:
        json.loads(err.read())
        return err.code, err.headers.get("Retry-After")


def test_a_killed_broker_means_503_for_changes_while_reads_wait_for_it_to_return(procs, model_dir):
    url = f"tcp://127.0.0.1:{free_port()}"
    broker = procs.broker(url)
    worker = procs.worker(url, model_dir)
    base = start_frontend(procs, url)
    models = f"{base}/api/v1/models"
    wait_for(lambda: status_of(models)[0] == 200, 15, "the server to serve")
    broker.send_signal(signal.SIGKILL)
    broker.wait()
    # NOTE: a model that does not exist: were the delete to reach a worker, it would change nothing.
    wait_for(lambda: delete_status(f"{models}/nothing.onnx") == (503, "1"), 10,
             "a delete refused with 503 and Retry-After while the broker is gone")
    read: list = []
    reader = threading.Thread(target=lambda: read.append(status_of(models)))
    reader.start()  # a read is safe to repeat: it waits for the broker instead of failing
    procs.broker(url, "--startup-grace-s", "20")  # as fractal serve starts it: it waits for its workers
    reader.join(timeout=30)
    assert read == [(200, None)]
    wait_for(lambda: status_of(models)[0] == 200, 15, "service to resume by itself")
    assert worker.poll() is None  # the same worker process re-registered
