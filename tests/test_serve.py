"""`fractal serve` as a user runs it: the seed's curl commands, then Ctrl-C with nothing left behind."""
from __future__ import annotations

import json
import os
import signal
import urllib.request
from pathlib import Path

import pytest

from .harness import Served, alive, descendants, process_table, start_frontend, wait_for

pytestmark = pytest.mark.slow  # starts real processes

WELCOME = {"http_status": {
    "code": 200, "name": "OK",
    "description": "Greetings from Fractal - ML Server - Inferrer, the Machine Learning model server. "
                   "For more information, visit /help"}}


def http(method: str, url: str, body: bytes | None = None) -> tuple[int, dict]:
    req = urllib.request.Request(url, data=body, method=method, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


@pytest.fixture
def served(tmp_path):
    server = Served(tmp_path)
    yield server.proc, server.base, server.pool
    if server.proc.poll() is None:
        server.proc.kill()


def test_seed_welcome_and_prediction_then_clean_ctrl_c(served):
    proc, base, pool = served
    assert sorted(p.name for p in pool.glob("*.onnx")) == ["diabetes.onnx", "digits.onnx", "iris.onnx"]
    assert http("GET", base + "/") == (200, WELCOME)
    status, body = http("GET", base + "/api/v1/models/iris.onnx/prediction", b'{"values":[2, 5, 1, 4]}')
    assert (status, body) == (200, {"http_status": {"code": 200, "description": "Prediction successful",
                                                    "name": "OK"}, "values": [1]})
    status, body = http("POST", base + "/api/v1/models/iris.onnx/prediction",
                        b'{"values": [[2, 5, 1, 4], [5.1, 3.5, 1.4, 0.2]]}')
    assert (status, body["values"]) == (200, [1, 0])
    ours = descendants(proc.pid)
    assert len(ours) >= 5  # broker, two workers, gunicorn master and at least one uvicorn worker
    with urllib.request.urlopen(base + "/", timeout=10) as resp:
        assert resp.headers["Server"] == "uvicorn"  # the ASGI worker class is the default
    table = process_table()
    workers = [pid for pid in ours if pid in table and "gunicorn" in table[pid].cmdline]
    assert any("frontend.http_worker.Worker" in table[pid].cmdline for pid in workers)
    masters = [pid for pid in workers if table[pid].ppid not in workers]
    assert len(masters) == 1
    # by default one HTTP process per two cores, at least one
    assert len(workers) - 1 == max(1, (os.cpu_count() or 1) // 2), workers

    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=20) == 0
    assert [pid for pid in ours if Path(f"/proc/{pid}").exists()] == [], "processes left behind"
    wait_for(lambda: http_refused(base), 5, "the HTTP port to close")


def http_refused(base: str) -> bool:
    try:
        urllib.request.urlopen(base + "/", timeout=1)
    except urllib.error.URLError as err:
        return isinstance(err.reason, ConnectionRefusedError)
    return False


def test_a_killed_gunicorn_master_takes_its_uvicorn_workers_with_it(procs, broker_url):
    """uvicorn workers do not notice that their master died; the kernel tells them (PDEATHSIG)."""
    base = start_frontend(procs, broker_url)
    master = procs.procs[-1].pid  # `fractal frontend` execs gunicorn in place
    workers = descendants(master)
    assert workers, "gunicorn started no workers"
    os.kill(master, signal.SIGKILL)
    wait_for(lambda: not any(alive(pid) for pid in workers), 30, "the orphaned workers to exit")
    wait_for(lambda: http_refused(base), 10, "the HTTP port to close")

