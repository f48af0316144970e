"""Where a prediction's time went: the Server-Timing header (REST seed and v2 routes, gRPC trailing
metadata) through `fractal serve`, and the worker's timing map in replies and packs."""
from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.request

import grpc
import numpy as np
import pytest
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc

from broker.client import AsyncClient
from frontend.timing import server_timing

from .harness import Served, start_frontend

pytestmark = pytest.mark.slow  # starts real processes

PARTS = ["frontend", "queue", "worker", "inference", "total"]
ROW = b'{"values": [2, 5, 1, 4]}'


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    served = Served(tmp_path_factory.mktemp("timing"))
    yield served
    assert served.stop() == 0


def parse(header: str) -> dict[str, float]:
    """{name: ms} of a Server-Timing value, as a browser reads it (name;dur=ms, comma separated)."""
    parts = {}
    for metric in header.split(","):
        name, _, params = metric.strip().partition(";")
        assert params.startswith("dur="), header
        parts[name] = float(params[4:])
    return parts


def assert_consistent(header: str | None) -> dict[str, float]:
    assert header, "no Server-Timing header"
    parts = parse(header)
    assert list(parts) == PARTS, header
    assert all(ms >= 0 for ms in parts.values()), header
    assert sum(parts[p] for p in PARTS[:-1]) <= parts["total"], header
    assert 0 < parts["inference"] <= parts["total"], header  # a run takes some µs
    return parts


def request(method: str, url: str, body: bytes, content_type: str = "application/json") -> tuple[int, object]:
    req = urllib.request.Request(url, data=body, method=method, headers={"Content-Type": content_type})
    try:
        with urllib.request.urlopen(req, timeout=20) as resp:
            resp.read()
            return resp.status, resp.headers  # NOTE: a Message: header names match in any case
    except urllib.error.HTTPError as err:
        err.read()
        return err.code, err.headers


def test_seed_predictions_say_where_their_time_went(server):
    for method in ("GET", "POST"):
        status, headers = request(method, server.base + "/api/v1/models/iris.onnx/prediction", ROW)
        assert status == 200
        assert_consistent(headers.get("Server-Timing"))
    image = (server.pool / "digits_sample.png").read_bytes()
    status, headers = request("POST", server.base + "/api/v1/models/digits/prediction", image, "image/png")
    assert status == 200
    assert_consistent(headers.get("Server-Timing"))


def test_v2_infer_says_where_its_time_went(server):
    body = json.dumps({"inputs": [{"name": "float_input", "shape": [2, 4], "datatype": "FP32",
                                   "data": [2, 5, 1, 4, 5.1, 3.5, 1.4, 0.2]}]}).encode()
    status, headers = request("POST", server.base + "/v2/models/iris/infer", body)
    assert status == 200
    assert_consistent(headers.get("Server-Timing"))


def test_a_failed_prediction_and_other_routes_carry_no_timing(server):
    status, headers = request("POST", server.base + "/api/v1/models/nope.onnx/prediction", ROW)
    assert status == 404 and "Server-Timing" not in headers
    status, headers = request("POST", server.base + "/api/v1/models/iris.onnx/prediction", b'{"values": "x"}')
    assert status == 400 and "Server-Timing" not in headers
    with urllib.request.urlopen(server.base + "/api/v1/models", timeout=20) as resp:
        assert "Server-Timing" not in resp.headers


def test_grpc_model_infer_has_server_timing_in_its_trailing_metadata(server):
    request_ = pb.ModelInferRequest(model_name="iris.onnx")
    request_.inputs.add(name="float_input", datatype="FP32", shape=[1, 4])
    request_.raw_input_contents.append(np.array([[2, 5, 1, 4]], np.float32).tobytes())
    with grpc.insecure_channel(server.grpc_target) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        _response, call = stub.ModelInfer.with_call(request_, timeout=20)
        trailing = dict(call.trailing_metadata())
        assert_consistent(trailing.get("server-timing"))
        _response, call = stub.ServerLive.with_call(pb.ServerLiveRequest(), timeout=20)
        assert "server-timing" not in dict(call.trailing_metadata())


def test_each_call_of_a_pack_gets_its_own_worker_timing(cluster):
    async def main() -> list[dict]:
        async with AsyncClient(cluster.url, timeout_s=20) as client:
            timings: list[dict] = [{} for _ in range(8)]
            rows = [np.array([[2, 5, 1, 4]], np.float32)] * 8
            # NOTE: started in one turn of the loop, the eight calls leave as one pack
            await asyncio.gather(*(client.predict("iris", [row], timing=t)
                                   for row, t in zip(rows, timings, strict=True)))
            alone: dict = {}
            await client.predict("iris", [rows[0]], timing=alone)
            return [*timings, alone]
    timings = asyncio.run(main())
    for timing in timings:
        assert set(timing) - {"share"} == {"worker_ms", "inference_ms"}, timing
        assert 0 < timing["inference_ms"] <= timing["worker_ms"], timing
    assert "share" not in timings[-1]  # alone: the whole run was its own
    for timing in timings[:-1]:  # one row each: 1/n of a run of n rows (n >= 2), when the pack ran batched
        if "share" in timing:
            runs_rows = 1 / timing["share"]
            assert runs_rows >= 2 and abs(runs_rows - round(runs_rows)) < 1e-9, timing
    assert any("share" in timing for timing in timings[:-1]), timings  # the pack's rows ran together


def test_server_timing_can_be_turned_off(procs, cluster):
    base = start_frontend(procs, cluster.url, FRACTAL_FRONTEND_SERVER_TIMING="false")
    status, headers = request("POST", base + "/api/v1/models/iris.onnx/prediction", ROW)
    assert status == 200 and "Server-Timing" not in headers


def test_the_parts_never_add_up_to_more_than_the_total():
    """Rounding: parts down, the total up; a worker reporting more than the wait is clamped."""
    for total, timing in [(1.0004, {"call_ms": 0.7, "worker_ms": 0.3, "inference_ms": 0.1}),
                          (0.3333333, {"call_ms": 0.1111111, "worker_ms": 0.1111111, "inference_ms": 0.1111111}),
                          (1.0, {"call_ms": 0.5, "worker_ms": 0.9, "inference_ms": 2.0}),
                          (1.0, {"call_ms": 0.5, "worker_ms": "x", "inference_ms": float("nan")})]:
        parts = parse(server_timing(total, timing))
        assert list(parts) == PARTS and all(v >= 0 for v in parts.values())
        assert sum(parts[p] for p in PARTS[:-1]) <= parts["total"]
