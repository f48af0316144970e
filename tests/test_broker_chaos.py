"""`fractal serve` restarts a killed broker: steady load through the frontend loses no prediction, and
an upload or delete inside the dead broker answers 503 + Retry-After at once, never hangs. Killed
frontends are started again too."""
from __future__ import annotations

import json
import os
import signal
import sys
import threading
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from bench.broker_chaos import run_broker_chaos
from bench.chaos import FAST_HEARTBEATS
from broker.client import Client

from .harness import REPO, Served, child_pids, tcp_open, wait_busy, wait_for
from .onnx_models import SLOW_ATOL, slow_expected, slow_model, slow_steps

pytestmark = pytest.mark.slow  # starts real processes

sys.path.insert(0, str(REPO / "deploy" / "lab"))
import load  # noqa: E402


def test_broker_killed_under_load_through_the_frontend_loses_no_prediction(tmp_path: Path) -> None:
    result = run_broker_chaos(tmp_path, duration_s=24, rate=50, kill_every_s=8)
    assert result["kills"] >= 2 and result["brokers_killed"] == result["kills"], result
    assert result["requests"] == sum(map(len, load.schedule(50, 24))), result
    assert result["failed"] == 0, result
    assert result["server_alive"], result


def http(method: str, url: str, body: bytes | None = None) -> tuple[int, str | None, dict]:
    request = urllib.request.Request(url, body, method=method, headers={"Content-Type": "application/octet-stream"})
    try:
        with urllib.request.urlopen(request, timeout=60) as resp:
            return resp.status, resp.headers.get("Retry-After"), json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, err.headers.get("Retry-After"), json.loads(err.read())


def broker_pid(url: str) -> int | None:
    with Client(url, timeout_s=5) as client:
        status = client.broker_status(timeout_s=2)
    return status["broker"]["pid"] if status else None


def queued(url: str) -> int:
    with Client(url, timeout_s=5) as client:
        status = client.broker_status(timeout_s=2) or {}
    return sum(s["queued"] for s in status.get("broker", {}).get("services", {}).values())


def test_upload_and_delete_inside_a_killed_broker_answer_503_and_predictions_their_result(tmp_path: Path) -> None:
    # NOTE: the workers register with the new broker only once their 3 s runs end, which under CPU
    # contention takes several times longer: the new broker holds the re-sent predictions until then.
    served = Served(tmp_path, {**FAST_HEARTBEATS, "FRACTAL_SERVE_BROKER_GRACE_S": "120"}, "--grpc-port", "0")
    try:
        url, models = served.broker_url, f"{served.base}/api/v1/models"
        assert http("PUT", f"{models}/slow.onnx", slow_model())[0] == 200
        # NOTE: 3 s: the HTTP upload and delete must reach the broker while both still run, under load too
        steps = [slow_steps(3.0) + i for i in range(2)]
        answers: dict = {}
        with Client(url, timeout_s=90) as client:
            def predict(i: int) -> None:
                answers[i] = client.predict("slow.onnx", {"k": np.array([steps[i]], np.int64)})

            def change(key: str, method: str, path: str, body: bytes | None = None) -> None:
                answers[key] = http(method, f"{models}/{path}", body)

            busy = [threading.Thread(target=predict, args=(i,)) for i in range(2)]
            for t in busy:
                t.start()
            wait_busy(url, 2)  # both workers compute: what comes next waits inside the broker
            changes = [threading.Thread(target=change, args=("upload", "PUT", "late.onnx", slow_model())),
                       threading.Thread(target=change, args=("delete", "DELETE", "iris.onnx"))]
            for t in changes:
                t.start()
            wait_for(lambda: queued(url) >= 2, 20, "the upload and the delete queued in the broker")
            old = broker_pid(url)
            os.kill(old, signal.SIGKILL)
            for t in changes:
                t.join(timeout=30)
            for key in ("upload", "delete"):
                status, retry_after, body = answers[key]
                assert (status, retry_after) == (503, "1"), answers[key]
                assert "may or may not have been done" in body["http_status"]["description"], body
            # The supervisor starts a new broker; the predictions inside the old one are re-sent to it.
            wait_for(lambda: broker_pid(url) not in (None, old), 30, "a new broker")
            for t in busy:
                t.join(timeout=90)
        for i, k in enumerate(steps):
            np.testing.assert_allclose(answers[i]["y"], [[slow_expected(k)]], atol=SLOW_ATOL)
        names = http("GET", models)[2]
        assert "iris.onnx" in json.dumps(names) and "late.onnx" not in json.dumps(names)  # neither happened
        assert "restarting" in served.log() and served.proc.poll() is None
    finally:
        served.stop()


def test_killed_frontends_are_started_again(tmp_path: Path) -> None:
    served = Served(tmp_path, FAST_HEARTBEATS)
    try:
        models = f"{served.base}/api/v1/models"
        (gunicorn,) = child_pids(served.proc.pid, "gunicorn")
        (grpc,) = child_pids(served.proc.pid, "frontend.oip_grpc")
        os.kill(gunicorn, signal.SIGKILL)  # NOTE: its uvicorn workers too are ended before the restart
        os.kill(grpc, signal.SIGKILL)
        wait_for(lambda: child_pids(served.proc.pid, "gunicorn") not in ([], [gunicorn])
                 and child_pids(served.proc.pid, "frontend.oip_grpc") not in ([], [grpc]), 30, "new frontends")
        wait_for(lambda: answers(models), 60, "the REST API to answer again")
        wait_for(lambda: tcp_open(f"tcp://{served.grpc_target}"), 60, "the gRPC port to listen again")
        assert served.proc.poll() is None
    finally:
        served.stop()


def answers(url: str) -> bool:
    try:
        return http("GET", url)[0] == 200
    except OSError:
        return False
