"""FRACTAL_LOG_FORMAT=json: every component of `fractal serve` writes one JSON object per line, with the
request's id, model and latency on the lines about a request; text stays the default."""
from __future__ import annotations

import json
import subprocess
import sys
import urllib.request

import grpc
import numpy as np
import pytest
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc

from broker.errors import ConfigError
from broker.settings import load
from frontend.settings import FrontendSettings

from .harness import Served, free_port, wait_for

pytestmark = pytest.mark.slow  # starts real processes

ROW = b'{"values": [2, 5, 1, 4]}'


def post(url: str, body: bytes, request_id: str) -> int:
    req = urllib.request.Request(url, data=body, method="POST",
                                 headers={"Content-Type": "application/json", "X-Request-ID": request_id})
    try:
        with urllib.request.urlopen(req, timeout=20) as resp:
            resp.read()
            return resp.status
    except urllib.error.HTTPError as err:
        err.read()
        return err.code


def records(text: str) -> list[dict]:
    """Every line of the log as an object: a line that is not JSON fails the test, naming it."""
    parsed = []
    for line in text.splitlines():
        try:
            parsed.append(json.loads(line))
        except ValueError:
            pytest.fail(f"not a JSON line: {line!r}")
    return parsed


def test_every_component_logs_json_objects_with_request_fields(tmp_path):
    server = Served(tmp_path, {"FRACTAL_LOG_FORMAT": "json"})
    try:
        assert post(server.base + "/api/v1/models/iris.onnx/prediction", ROW, "json-seed-1") == 200
        assert post(server.base + "/api/v1/models/nope.onnx/prediction", ROW, "json-seed-404") == 404
        request = pb.ModelInferRequest(model_name="iris.onnx")
        request.inputs.add(name="float_input", datatype="FP32", shape=[1, 4])
        request.raw_input_contents.append(np.array([[2, 5, 1, 4]], np.float32).tobytes())
        with grpc.insecure_channel(server.grpc_target) as channel:
            service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(
                request, timeout=20, metadata=(("x-request-id", "json-grpc-1"),))
        # the worker's line and the access lines are both written after the answer left: wait for them
        wait_for(lambda: server.log().count('"json-') >= 5, 20, "the request lines")
    finally:
        assert server.stop() == 0
    logged = records(server.log())
    for record in logged:
        assert {"time", "level", "component", "node", "pid", "logger", "message"} <= set(record), record
    components = {r["component"] for r in logged}
    assert {"serve", "broker", "worker-1", "worker-2", "frontend", "grpc"} <= components, components
    assert any(r["logger"].startswith("gunicorn") for r in logged)  # gunicorn's own lines too

    by_id = {}
    for record in logged:
        by_id.setdefault(record.get("request_id"), []).append(record)
    access = next(r for r in by_id["json-seed-1"] if r["logger"] == "frontend.access")
    assert (access["status"], access["method"], access["model"]) == (200, "POST", "iris.onnx")
    assert access["latency_ms"] > 0
    worker = next(r for r in by_id["json-seed-1"] if r["logger"] == "worker.modelhost")
    assert (worker["op"], worker["model"]) == ("predict", "iris.onnx") and worker["latency_ms"] > 0
    assert worker["node"].startswith(worker["component"] + "-")  # worker-1-PID-XXXX, its node id
    failed = next(r for r in by_id["json-seed-404"] if r["logger"] == "worker.modelhost")
    assert (failed["model"], failed["error"]) == ("nope.onnx", "ModelNotFound")
    assert next(r for r in by_id["json-seed-404"] if r["logger"] == "frontend.access")["status"] == 404
    rpc = next(r for r in by_id["json-grpc-1"] if r["component"] == "grpc")
    assert (rpc["rpc"], rpc["code"], rpc["model"]) == ("ModelInfer", "OK", "iris.onnx") and rpc["latency_ms"] > 0
    assert any(r["component"].startswith("worker-") for r in by_id["json-grpc-1"])


def test_text_stays_the_default(procs, broker_url):
    log_path = procs.procs[0].log_path
    wait_for(lambda: "bound to" in open(log_path).read(), 20, "the broker's first line")
    line = next(line for line in open(log_path) if "bound to" in line)
    assert not line.startswith("{") and " INFO broker[" in line


def test_an_unknown_log_format_is_refused_by_every_component():
    with pytest.raises(ConfigError, match="log_format must be one of text, json"):
        load(FrontendSettings, "frontend", env={"FRACTAL_LOG_FORMAT": "xml"})
    assert load(FrontendSettings, "frontend", env={"FRACTAL_LOG_FORMAT": "json"}).log_format == "json"
    url = f"tcp://127.0.0.1:{free_port()}"
    for module in ("broker", "worker"):
        done = subprocess.run([sys.executable, "-m", module, "--connect" if module == "worker" else "--bind", url,
                               "--log-format", "xml"], capture_output=True, text=True, timeout=60)
        assert done.returncode == 2 and "log_format must be one of text, json, not 'xml'" in done.stderr
