"""The Open Inference Protocol over gRPC, through Triton's own clients (sync and asyncio) and raw
messages, against `fractal serve`; answers compared with ONNX Runtime and with the REST answers."""
from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import urllib.request

import grpc
import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.grpc as tg
import tritonclient.grpc.aio as tga
import tritonclient.http as th
from google.protobuf import json_format
from tritonclient.grpc import model_config_pb2, service_pb2_grpc
from tritonclient.grpc import service_pb2 as pb
from tritonclient.utils import InferenceServerException

from broker.client import Client

from .harness import BUNDLED, Served, free_port, free_ports, tcp_open, wait_for
from .onnx_models import slow_input, slow_model, string_identity_model

pytestmark = pytest.mark.slow  # starts real processes

IRIS = ort.InferenceSession(str(BUNDLED / "iris.onnx"), providers=["CPUExecutionProvider"])
ROWS = np.random.default_rng(11).uniform(0, 8, (5, 4)).astype(np.float32)
OK_ROW = np.array([[2, 5, 1, 4]], np.float32)
OK_RAW = (OK_ROW.tobytes(),)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    metrics = free_ports(4)  # broker, 2 workers, then the gRPC frontend
    # NOTE: statistics are as fresh as the broker's status polls: poll often here
    served = Served(tmp_path_factory.mktemp("grpc"), {"FRACTAL_BROKER_STATUS_INTERVAL_S": "0.2"},
                    "--metrics-port", str(metrics))
    served.grpc_metrics = f"http://127.0.0.1:{metrics + 3}/metrics"
    yield served
    assert served.stop() == 0


@pytest.fixture(scope="module")
def client(server):
    c = tg.InferenceServerClient(server.grpc_target)
    yield c
    c.close()


@pytest.fixture(scope="module")
def rest(server):
    c = th.InferenceServerClient(f"127.0.0.1:{server.http_port}")
    yield c
    c.close()


@pytest.fixture(scope="module")
def stub(server):
    with grpc.insecure_channel(server.grpc_target) as channel:
        yield service_pb2_grpc.GRPCInferenceServiceStub(channel)


def upload(server, name: str, data: bytes) -> None:
    with Client(server.broker_url, timeout_s=10) as direct:
        direct.upload(name, data)


def fp32_input(array: np.ndarray, name: str = "float_input"):
    tensor = tg.InferInput(name, list(array.shape), "FP32")
    tensor.set_data_from_numpy(array)
    return tensor


def raw_request(model="iris.onnx", shape=(1, 4), datatype="FP32", raw=OK_RAW, version="",
                name="float_input", **contents) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name=model, model_version=version)
    tensor = request.inputs.add(name=name, datatype=datatype, shape=list(shape))
    for field, values in contents.items():
        getattr(tensor.contents, field).extend(values)
    request.raw_input_contents.extend(raw)
    return request


def metric(server, name: str, **labels: str) -> float:
    with urllib.request.urlopen(server.grpc_metrics, timeout=5) as resp:
        text = resp.read().decode()
    for line in text.splitlines():
        if line.startswith(f"{name}{{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return 0.0  # a series appears with its first observation


def test_live_ready_and_server_metadata(client):
    assert client.is_server_live() and client.is_server_ready()
    meta = client.get_server_metadata(as_json=True)
    assert meta["name"] == "fractal-ml-server"
    assert {"model_configuration", "statistics", "model_repository"} <= set(meta["extensions"])


def test_model_metadata_and_readiness_agree_with_rest(client, rest):
    meta = client.get_model_metadata("iris.onnx", as_json=True)
    by_rest = rest.get_model_metadata("iris.onnx")
    assert meta["platform"] == by_rest["platform"] == "onnxruntime_onnx" and meta["versions"] == ["1"]
    for kind in ("inputs", "outputs"):
        assert [(t["name"], t["datatype"], [int(d) for d in t["shape"]]) for t in meta[kind]] == \
               [(t["name"], t["datatype"], t["shape"]) for t in by_rest[kind]]
    assert client.is_model_ready("iris") and client.is_model_ready("iris.onnx", "1")
    assert not client.is_model_ready("nope.onnx") and not client.is_model_ready("iris.onnx", "2")


def test_infer_iris_matches_onnx_runtime_and_rest(client, rest):
    label, proba = IRIS.run(None, {"float_input": ROWS})
    result = client.infer("iris.onnx", [fp32_input(ROWS)], request_id="r-1",
                          outputs=[tg.InferRequestedOutput("label"), tg.InferRequestedOutput("probabilities")])
    np.testing.assert_array_equal(result.as_numpy("label"), label)
    np.testing.assert_allclose(result.as_numpy("probabilities"), proba, rtol=1e-6)
    assert result.get_response().id == "r-1" and result.get_response().model_version == "1"
    tensor = th.InferInput("float_input", list(ROWS.shape), "FP32")
    tensor.set_data_from_numpy(ROWS, binary_data=True)
    by_rest = rest.infer("iris.onnx", [tensor])
    np.testing.assert_array_equal(result.as_numpy("probabilities"), by_rest.as_numpy("probabilities"))
    np.testing.assert_array_equal(result.as_numpy("label"), by_rest.as_numpy("label"))
    only = client.infer("iris", [fp32_input(ROWS)], outputs=[tg.InferRequestedOutput("probabilities")])
    assert only.as_numpy("label") is None and only.as_numpy("probabilities").shape == (5, 3)


def test_typed_contents_work_like_raw_contents(stub):
    request = raw_request(shape=ROWS.shape, raw=(), fp32_contents=ROWS.reshape(-1).tolist())
    response = stub.ModelInfer(request, timeout=10)
    names = [o.name for o in response.outputs]
    proba = np.frombuffer(response.raw_output_contents[names.index("probabilities")], np.float32).reshape(5, 3)
    np.testing.assert_allclose(proba, IRIS.run(["probabilities"], {"float_input": ROWS})[0], rtol=1e-6)
    label = response.outputs[names.index("label")]
    assert label.datatype == "INT64" and list(label.shape) == [5]


def test_the_asyncio_client(server):
    async def session() -> None:
        c = tga.InferenceServerClient(server.grpc_target)
        try:
            assert await c.is_server_live() and await c.is_server_ready()
            assert await c.is_model_ready("iris.onnx")
            meta = await c.get_model_metadata("iris.onnx")
            assert meta.inputs[0].name == "float_input" and list(meta.inputs[0].shape) == [-1, 4]
            results = await asyncio.gather(*(c.infer("iris.onnx", [fp32_input(ROWS[i:i + 1])]) for i in range(5)))
            labels = np.concatenate([r.as_numpy("label") for r in results])
            np.testing.assert_array_equal(labels, IRIS.run(["label"], {"float_input": ROWS})[0])
            config = await c.get_model_config("iris.onnx")
            assert config.config.platform == "onnxruntime_onnx"
            index = await c.get_model_repository_index()
            assert "iris.onnx" in {m.name for m in index.models}
            stats = await c.get_inference_statistics("iris.onnx")
            assert stats.model_stats[0].name == "iris.onnx"
        finally:
            await c.close()
    asyncio.run(session())


def test_bytes_tensors_both_ways(server, client, stub):
    upload(server, "strings.onnx", string_identity_model())
    values = np.array([b"a", "ünï".encode(), b""], dtype=object)
    tensor = tg.InferInput("x", [3], "BYTES")
    tensor.set_data_from_numpy(values)
    assert client.infer("strings.onnx", [tensor]).as_numpy("y").tolist() == values.tolist()
    request = pb.ModelInferRequest(model_name="strings.onnx")
    request.inputs.add(name="x", datatype="BYTES", shape=[2]).contents.bytes_contents.extend([b"p", b"q"])
    response = stub.ModelInfer(request, timeout=10)
    assert response.outputs[0].datatype == "BYTES"
    assert response.raw_output_contents[0] == b"\x01\0\0\0p\x01\0\0\0q"


def test_repository_index_unload_and_load(server, client):
    upload(server, "iris_repo.onnx", (BUNDLED / "iris.onnx").read_bytes())
    index = {m["name"]: m for m in client.get_model_repository_index(as_json=True)["models"]}
    assert index["iris_repo.onnx"]["state"] == "READY" and "digits.onnx" in index
    client.unload_model("iris_repo.onnx")
    assert not client.is_model_ready("iris_repo.onnx")
    index = {m["name"]: m for m in client.get_model_repository_index(as_json=True)["models"]}
    assert index["iris_repo.onnx"]["state"] == "UNAVAILABLE" and index["iris_repo.onnx"]["reason"] == "unloaded"
    with pytest.raises(InferenceServerException, match="unloaded") as err:
        client.infer("iris_repo.onnx", [fp32_input(OK_ROW)])
    assert err.value.status() == "StatusCode.NOT_FOUND"
    client.load_model("iris_repo.onnx")
    assert client.is_model_ready("iris_repo.onnx")
    assert client.infer("iris_repo.onnx", [fp32_input(OK_ROW)]).as_numpy("label").tolist() == [1]
    with pytest.raises(InferenceServerException) as err:
        client.load_model("nope.onnx")
    assert err.value.status() == "StatusCode.NOT_FOUND"


def test_model_configuration_agrees_with_rest(server, client, rest):
    by_grpc = client.get_model_config("iris.onnx").config
    assert by_grpc == json_format.ParseDict(rest.get_model_config("iris.onnx"), model_config_pb2.ModelConfig())
    assert by_grpc.max_batch_size == 0 and list(by_grpc.input[0].dims) == [-1, 4]
    assert by_grpc.input[0].data_type == model_config_pb2.TYPE_FP32
    # a model the workers batch: dims leave out the batch dimension, as Triton's do
    upload(server, "iris_batch.onnx", (BUNDLED / "iris.onnx").read_bytes())
    (server.pool / "iris_batch.onnx.json").write_text(json.dumps({"dynamic_batching": {
        "max_batch_size": 8, "max_queue_delay_us": 1000, "preferred_batch_sizes": [4]}}))
    config = rest.get_model_config("iris_batch.onnx")
    assert config["max_batch_size"] == 8
    assert config["dynamic_batching"] == {"preferred_batch_size": [4], "max_queue_delay_microseconds": 1000}
    assert config["input"] == [{"name": "float_input", "data_type": "TYPE_FP32", "dims": [4]}]
    assert config["output"][0] == {"name": "label", "data_type": "TYPE_INT64", "dims": [1], "reshape": {"shape": []}}
    by_grpc = client.get_model_config("iris_batch.onnx", "1").config
    assert by_grpc == json_format.ParseDict(config, model_config_pb2.ModelConfig())
    assert client.infer("iris_batch.onnx", [fp32_input(OK_ROW)]).as_numpy("label").tolist() == [1]


def test_statistics_rise_by_exactly_the_inferences_made(server, client, rest):
    upload(server, "iris_gstats.onnx", (BUNDLED / "iris.onnx").read_bytes())
    assert client.get_inference_statistics("iris_gstats.onnx").model_stats[0].inference_count == 0
    for rows in (ROWS[:1], ROWS[:2], ROWS[:1]):
        client.infer("iris_gstats.onnx", [fp32_input(rows)])

    async def more() -> None:
        c = tga.InferenceServerClient(server.grpc_target)
        try:
            await asyncio.gather(*(c.infer("iris_gstats.onnx", [fp32_input(OK_ROW)]) for _ in range(3)))
        finally:
            await c.close()
    asyncio.run(more())

    def stats():
        return client.get_inference_statistics("iris_gstats.onnx").model_stats[0]
    wait_for(lambda: stats().inference_count == 7, 20, "the statistics of 7 inferences")
    got = stats()
    # Six requests; the three concurrent ones may share one run (packed, then batched): 4 to 6 runs.
    assert 4 <= got.execution_count <= 6 and got.inference_stats.success.count == 6 and got.version == "1"
    assert got.inference_stats.fail.count == 0 and got.inference_stats.compute_infer.ns > 0
    by_rest = rest.get_inference_statistics("iris_gstats.onnx")
    assert json_format.ParseDict(by_rest, pb.ModelStatisticsResponse()).model_stats[0] == got
    every = {m.name for m in client.get_inference_statistics().model_stats}
    assert {"iris.onnx", "iris_gstats.onnx"} <= every


@pytest.mark.parametrize("request_, needle", [
    (raw_request(shape=(1, 5), raw=(np.ones((1, 5), np.float32).tobytes(),)), "expects shape [N, 4]"),
    (raw_request(datatype="FP99"), "unknown datatype 'FP99'"),
    (raw_request(raw=(b"\0" * 12,)), "takes 16 bytes, its raw_input_contents has 12"),
    (raw_request(raw=(OK_ROW.tobytes(), OK_ROW.tobytes())), "2 raw_input_contents for 1 inputs"),
    (raw_request(raw=(), fp32_contents=[1.0, 2.0]), "needs 4 values"),
    (raw_request(raw=(), datatype="FP16", shape=(1, 4)), "FP16 has no typed contents"),
    (raw_request(shape=(1, -4)), "negative dimension"),
    (pb.ModelInferRequest(model_name="iris.onnx"), "at least one input"),
    (raw_request(name="petals"), "unknown input 'petals'"),
    (raw_request(datatype="BYTES", raw=(b"\x05\0\0\0ab",)), "BYTES element longer than the data"),
], ids=["shape", "datatype", "raw-size", "raw-count", "contents-count", "fp16-contents", "negative", "no-inputs",
        "name", "bytes"])
def test_malformed_requests_are_invalid_argument_and_the_server_serves_on(client, stub, request_, needle):
    with pytest.raises(grpc.RpcError) as err:
        stub.ModelInfer(request_, timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and needle in err.value.details()
    assert client.is_server_ready()
    assert client.infer("iris.onnx", [fp32_input(OK_ROW)]).as_numpy("label").tolist() == [1]


@pytest.mark.parametrize("call", ["ModelInfer", "ModelMetadata", "ModelConfig", "ModelStatistics"])
@pytest.mark.parametrize("model, version", [("nope.onnx", ""), ("iris.onnx", "2")], ids=["model", "version"])
def test_unknown_model_or_version_is_not_found(stub, call, model, version):
    request = {"ModelInfer": raw_request(model=model, version=version),
               "ModelMetadata": pb.ModelMetadataRequest(name=model, version=version),
               "ModelConfig": pb.ModelConfigRequest(name=model, version=version),
               "ModelStatistics": pb.ModelStatisticsRequest(name=model, version=version)}[call]
    with pytest.raises(grpc.RpcError) as err:
        getattr(stub, call)(request, timeout=10)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert ("version" if version else "not found") in err.value.details()


def test_calls_beyond_the_supported_set_are_unimplemented(server, client, stub):
    with pytest.raises(grpc.RpcError) as err:
        stub.SystemSharedMemoryStatus(pb.SystemSharedMemoryStatusRequest(), timeout=10)
    assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED and "shared memory" in err.value.details()
    with pytest.raises(grpc.RpcError) as err:
        list(stub.ModelStreamInfer(iter([raw_request()]), timeout=10))
    assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED and "streaming" in err.value.details()
    assert "Traceback" not in server.log() and client.is_server_ready()


def test_the_request_id_goes_to_the_worker_and_comes_back(server, stub):
    _, call = stub.ModelInfer.with_call(raw_request(), metadata=[("x-request-id", "trace-grpc-42")], timeout=10)
    assert ("x-request-id", "trace-grpc-42") in tuple(call.trailing_metadata())
    wait_for(lambda: "request trace-grpc-42: predict iris.onnx ok" in server.log(), 10, "the worker's log line")
    with pytest.raises(grpc.RpcError) as err:
        stub.ModelInfer(raw_request(model="nope.onnx"), metadata=[("x-request-id", "trace-grpc-43")], timeout=10)
    assert ("x-request-id", "trace-grpc-43") in tuple(err.value.trailing_metadata())
    _, call = stub.ServerLive.with_call(pb.ServerLiveRequest(), timeout=10)
    assert len(dict(call.trailing_metadata())["x-request-id"]) == 32  # made up when the caller sent none


def test_calls_are_counted_by_rpc_and_status_code(server, stub):
    ok = metric(server, "fractal_grpc_requests_total", rpc="ModelInfer", code="OK")
    missing = metric(server, "fractal_grpc_requests_total", rpc="ModelMetadata", code="NOT_FOUND")
    stub.ModelInfer(raw_request(), timeout=10)
    with pytest.raises(grpc.RpcError):
        stub.ModelMetadata(pb.ModelMetadataRequest(name="nope.onnx"), timeout=10)
    assert metric(server, "fractal_grpc_requests_total", rpc="ModelInfer", code="OK") == ok + 1
    assert metric(server, "fractal_grpc_requests_total", rpc="ModelMetadata", code="NOT_FOUND") == missing + 1
    assert metric(server, "fractal_grpc_request_duration_seconds_count", rpc="ModelInfer") >= ok + 1


def test_a_passed_deadline_is_deadline_exceeded_and_the_server_serves_on(server, client):
    upload(server, "slow.onnx", slow_model())
    codes = ("OK", "DEADLINE_EXCEEDED", "CANCELLED")

    def counts() -> dict[str, float]:
        return {c: metric(server, "fractal_grpc_requests_total", rpc="ModelInfer", code=c) for c in codes}
    before = counts()
    tensor = tg.InferInput("k", [1], "INT64")
    tensor.set_data_from_numpy(slow_input(3.0)["k"])
    with pytest.raises(InferenceServerException) as err:
        client.infer("slow.onnx", [tensor], client_timeout=0.5)
    assert err.value.status() == "StatusCode.DEADLINE_EXCEEDED"
    # The server gave up too, at the deadline, rather than answering OK seconds later. The client's deadline
    # starts earlier by the request's transit time and resets the stream; the server counts that reset as
    # DEADLINE_EXCEEDED when it comes within calls.DEADLINE_SLACK of the deadline (tests/test_grpc_codes.py),
    # and as CANCELLED if transit under heavy load took longer.
    def ended() -> bool:
        now = counts()
        return (now["DEADLINE_EXCEEDED"] + now["CANCELLED"] == before["DEADLINE_EXCEEDED"] + before["CANCELLED"] + 1
                and now["OK"] == before["OK"])
    wait_for(ended, 10, "the server to count the call as ended at its deadline")
    assert client.infer("iris.onnx", [fp32_input(OK_ROW)]).as_numpy("label").tolist() == [1]


@pytest.fixture(scope="module")
def guarded(tmp_path_factory):
    """A server with both tokens and a small message limit."""
    served = Served(tmp_path_factory.mktemp("grpc-guarded"), {
        "FRACTAL_ADMIN_TOKEN": "adm-secret", "FRACTAL_API_TOKEN": "api-secret",
        "FRACTAL_GRPC_MAX_MESSAGE_BYTES": "4096"}, "--workers", "1")
    yield served
    assert served.stop() == 0


def test_tokens_guard_calls_as_over_rest(guarded):
    c = tg.InferenceServerClient(guarded.grpc_target)
    api, admin = {"authorization": "Bearer api-secret"}, {"authorization": "Bearer adm-secret"}
    try:
        assert c.is_server_live() and c.is_server_ready()  # probes stay open
        for headers, status in ((None, "UNAUTHENTICATED"), ({"authorization": "Bearer wrong"}, "PERMISSION_DENIED"),
                                ({"authorization": "Basic api-secret"}, "UNAUTHENTICATED")):
            with pytest.raises(InferenceServerException) as err:
                c.get_model_metadata("iris.onnx", headers=headers)
            assert err.value.status() == f"StatusCode.{status}"
        for headers in (api, admin):
            assert c.infer("iris.onnx", [fp32_input(OK_ROW)], headers=headers).as_numpy("label").tolist() == [1]
        with pytest.raises(InferenceServerException) as err:
            c.unload_model("iris.onnx", headers=api)
        assert err.value.status() == "StatusCode.PERMISSION_DENIED"
        c.unload_model("iris.onnx", headers=admin)
        assert not c.is_model_ready("iris.onnx", headers=api)
        c.load_model("iris.onnx", headers=admin)
        assert c.is_model_ready("iris.onnx", headers=api)
    finally:
        c.close()


def test_a_message_over_the_limit_is_resource_exhausted_and_the_server_serves_on(guarded):
    c = tg.InferenceServerClient(guarded.grpc_target)
    api = {"authorization": "Bearer api-secret"}
    try:
        big = np.ones((300, 4), np.float32)  # 4.8 kB of raw contents, over the 4096-byte limit
        with pytest.raises(InferenceServerException) as err:
            c.infer("iris.onnx", [fp32_input(big)], headers=api)
        assert err.value.status() == "StatusCode.RESOURCE_EXHAUSTED"
        assert c.infer("iris.onnx", [fp32_input(OK_ROW)], headers=api).as_numpy("label").tolist() == [1]
    finally:
        c.close()


def test_grpc_port_0_runs_no_grpc_frontend(tmp_path):
    served = Served(tmp_path, None, "--workers", "1", "--grpc-port", "0")
    try:
        assert "gRPC" not in served.log().split("ready:")[1].splitlines()[0]
        assert "frontend.oip_grpc" not in served.log()
    finally:
        assert served.stop() == 0


def test_fractal_grpc_alone_without_a_broker_is_live_not_ready_and_unavailable(procs):
    port = free_port()
    procs.start("grpc", [sys.executable, "-m", "fractal", "grpc", "--port", str(port), "--metrics-port", "0",
                         "--broker", f"tcp://127.0.0.1:{free_port()}"])
    wait_for(lambda: tcp_open(f"tcp://127.0.0.1:{port}"), 60, "fractal grpc")
    c = tg.InferenceServerClient(f"127.0.0.1:{port}")
    try:
        assert c.is_server_live() and not c.is_server_ready()
        with pytest.raises(InferenceServerException) as err:
            c.infer("iris.onnx", [fp32_input(OK_ROW)], client_timeout=20)
        assert err.value.status() == "StatusCode.UNAVAILABLE"  # at once, not after the deadline
    finally:
        c.close()


def test_fractal_grpc_command_help():
    result = subprocess.run([sys.executable, "-m", "fractal", "grpc", "--help"], capture_output=True, timeout=60)
    assert result.returncode == 0 and b"FRACTAL_GRPC_PORT" in result.stdout
