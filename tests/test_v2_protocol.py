"""The Open Inference Protocol (KServe v2) through Triton's own HTTP client, against `fractal serve`."""
from __future__ import annotations

import json
import time
import urllib.request

import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.http as triton
from PIL import Image
from tritonclient.utils import InferenceServerException

from broker.client import Client

from .harness import BUNDLED, Served, free_port, start_frontend, wait_for
from .onnx_models import string_identity_model

pytestmark = pytest.mark.slow  # starts real processes

IRIS = ort.InferenceSession(str(BUNDLED / "iris.onnx"), providers=["CPUExecutionProvider"])
DIGITS = ort.InferenceSession(str(BUNDLED / "digits.onnx"), providers=["CPUExecutionProvider"])
ROWS = np.random.default_rng(5).uniform(0, 8, (5, 4)).astype(np.float32)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    # NOTE: statistics are as fresh as the broker's status polls: poll often here
    served = Served(tmp_path_factory.mktemp("v2"), {"FRACTAL_BROKER_STATUS_INTERVAL_S": "0.2"})
    yield served
    assert served.stop() == 0


@pytest.fixture(scope="module")
def client(server):
    c = triton.InferenceServerClient(f"127.0.0.1:{server.http_port}")
    yield c
    c.close()


def infer(client, model, array, input_name, outputs, binary):
    tensor = triton.InferInput(input_name, list(array.shape), "FP32")
    tensor.set_data_from_numpy(array, binary_data=binary)
    wanted = [triton.InferRequestedOutput(name, binary_data=binary) for name in outputs]
    return client.infer(model, [tensor], outputs=wanted, request_id="req-7")


def test_health_and_server_metadata(client):
    assert client.is_server_live() and client.is_server_ready()
    meta = client.get_server_metadata()
    assert meta["name"] == "fractal-ml-server" and "binary_tensor_data" in meta["extensions"]


def test_model_ready_and_metadata_in_v2_terms(client):
    assert client.is_model_ready("iris.onnx") and client.is_model_ready("iris.onnx", "1")
    assert not client.is_model_ready("nope.onnx")
    meta = client.get_model_metadata("iris.onnx")
    assert meta["platform"] == "onnxruntime_onnx" and meta["versions"] == ["1"]
    assert meta["inputs"] == [{"name": "float_input", "datatype": "FP32", "shape": [-1, 4]}]
    assert meta["outputs"][0] == {"name": "label", "datatype": "INT64", "shape": [-1]}
    assert client.get_model_metadata("digits", "1")["inputs"][0]["shape"] == [-1, 1, 8, 8]  # bare name


@pytest.mark.parametrize("binary", [False, True])
def test_infer_iris_matches_onnx_runtime(client, binary):
    label, proba = IRIS.run(None, {"float_input": ROWS})
    result = infer(client, "iris.onnx", ROWS, "float_input", ["label", "probabilities"], binary)
    np.testing.assert_array_equal(result.as_numpy("label"), label)
    np.testing.assert_allclose(result.as_numpy("probabilities"), proba)
    assert result.get_response()["id"] == "req-7"


@pytest.mark.parametrize("binary", [False, True])
def test_infer_digits_matches_onnx_runtime(client, binary):
    image = np.asarray(Image.open(BUNDLED / "digits_sample.png").convert("L").resize((8, 8)), np.float32)
    batch = np.stack([image, image[::-1]])[:, None] / 255
    expected = DIGITS.run(["probabilities"], {"image": batch})[0]
    result = infer(client, "digits", batch, "image", ["probabilities"], binary)
    np.testing.assert_allclose(result.as_numpy("probabilities"), expected, rtol=1e-5)


def test_all_outputs_binary_when_none_are_named(client):
    tensor = triton.InferInput("float_input", [5, 4], "FP32")
    tensor.set_data_from_numpy(ROWS, binary_data=True)
    result = client.infer("iris.onnx", [tensor])
    np.testing.assert_array_equal(result.as_numpy("label"), IRIS.run(["label"], {"float_input": ROWS})[0])


@pytest.mark.parametrize("binary", [False, True])
def test_bytes_tensors_both_ways(server, client, binary):
    with Client(server.broker_url) as direct:
        direct.upload("strings.onnx", string_identity_model())
    tensor = triton.InferInput("x", [3], "BYTES")
    tensor.set_data_from_numpy(np.array([b"a", "ünï".encode(), b""], dtype=object), binary_data=binary)
    result = client.infer("strings.onnx", [tensor], outputs=[triton.InferRequestedOutput("y", binary_data=binary)])
    values = [v.decode() if isinstance(v, bytes) else v for v in result.as_numpy("y").tolist()]
    assert values == ["a", "ünï", ""]


def test_v2_and_seed_prediction_give_the_same_numbers(server, client):
    result = infer(client, "iris.onnx", ROWS, "float_input", ["probabilities"], True)
    req = urllib.request.Request(f"{server.base}/api/v1/models/iris.onnx/prediction", method="POST",
                                 data=json.dumps({"values": ROWS.tolist(), "outputs": ["probabilities"]}).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        seed = json.loads(resp.read())
    np.testing.assert_array_equal(result.as_numpy("probabilities"),
                                  np.array(seed["outputs"]["probabilities"], np.float32))


def _holders(server, model: str) -> set[str]:
    """The nodes whose last status (every 0.2 s here) lists `model` as resident."""
    with Client(server.broker_url, timeout_s=10) as direct:
        status = direct.broker_status() or {"workers": []}
    return {w["node"] for w in status["workers"] if model in (w["models_resident"] or [])}


def _states_everywhere(server, client, model: str) -> str:
    """`model`'s state in the index, checked to be the same from every worker (the direct client's
    calls, two at a time, go to both idle workers; tritonclient's, one at a time, to each in turn)
    and its readiness over several calls; with the broker's placement only a holder answers those."""
    with Client(server.broker_url, timeout_s=10) as direct:
        answers = [{m["name"]: m["state"] for m in outcome["models"]}[model]
                   for _ in range(3) for outcome in direct.call_many([("repository", {})] * 2)]
    answers += [{m["name"]: m["state"] for m in client.get_model_repository_index()}[model] for _ in range(4)]
    ready = {client.is_model_ready(model) for _ in range(4)}
    assert len(set(answers)) == 1 and ready == {answers[0] == "READY"}, (answers, ready)
    return answers[0]


def test_repository_index_unload_and_load(server, client):
    for _ in range(4):
        assert client.is_model_ready("iris.onnx")
    assert _states_everywhere(server, client, "iris.onnx") == "READY"
    assert "digits.onnx" in {m["name"] for m in client.get_model_repository_index()}
    wait_for(lambda: _holders(server, "iris.onnx"), 10, "a worker to report iris resident")
    holders, dropped = _holders(server, "iris.onnx"), server.log().count("dropped unloaded model iris.onnx")
    client.unload_model("iris.onnx")
    try:
        assert _states_everywhere(server, client, "iris.onnx") == "UNAVAILABLE"
        with pytest.raises(InferenceServerException, match="unloaded"):
            infer(client, "iris.onnx", ROWS, "float_input", ["label"], False)
        # each worker that held iris drops its session: on its next request for iris or within a heartbeat
        wait_for(lambda: server.log().count("dropped unloaded model iris.onnx") >= dropped + len(holders), 6,
                 "each worker that held iris to drop it")
        wait_for(lambda: not _holders(server, "iris.onnx"), 6, "no worker to report iris resident")
    finally:
        client.load_model("iris.onnx")
    assert _states_everywhere(server, client, "iris.onnx") == "READY"
    assert infer(client, "iris.onnx", ROWS[:1], "float_input", ["label"], False).as_numpy("label").shape == (1,)


def post(server, path, body: bytes, headers: dict | None = None) -> tuple[int, dict]:
    req = urllib.request.Request(server.base + path, data=body, method="POST",
                                 headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def tensor_json(**overrides) -> bytes:
    tensor = {"name": "float_input", "shape": [1, 4], "datatype": "FP32", "data": [2, 5, 1, 4], **overrides}
    return json.dumps({"inputs": [tensor]}).encode()


@pytest.mark.parametrize("body, headers, needle", [
    (tensor_json(datatype="FP99"), None, "unknown datatype"),
    (tensor_json(data=[2, 5, 1]), None, "needs 4 values"),
    (tensor_json(name="petals"), None, "unknown input 'petals'"),
    (tensor_json(shape=[1, 3], data=[2, 5, 1]), None, "expects shape [N, 4]"),
    (tensor_json(data=["a", "b", "c", "d"]), None, "not a list of FP32"),
    (b'{"inputs": []}', None, "non-empty 'inputs'"),
    (b"{not json", None, "not valid JSON"),
])
def test_malformed_json_requests_are_400_and_the_server_serves_on(server, client, body, headers, needle):
    status, answer = post(server, "/v2/models/iris.onnx/infer", body, headers)
    assert status == 400 and needle in answer["error"] and set(answer) == {"error"}
    assert client.is_server_ready() and client.is_model_ready("iris.onnx")


def _binary_request(size_declared: int, data: bytes) -> tuple[bytes, dict]:
    head = json.dumps({"inputs": [{"name": "float_input", "shape": [1, 4], "datatype": "FP32",
                                   "parameters": {"binary_data_size": size_declared}}]}).encode()
    return head + data, {"Inference-Header-Content-Length": str(len(head))}


@pytest.mark.parametrize("declared, data, needle", [
    (16, b"\0" * 12, "does not fit"),          # fewer bytes than declared
    (12, b"\0" * 12, "takes 16 bytes"),        # declared size does not match the shape
    (16, b"\0" * 20, "belong to no input"),    # bytes left over
])
def test_bad_binary_sizes_are_400(server, client, declared, data, needle):
    body, headers = _binary_request(declared, data)
    status, answer = post(server, "/v2/models/iris.onnx/infer", body, headers)
    assert status == 400 and needle in answer["error"]
    status, answer = post(server, "/v2/models/iris.onnx/infer", body, {"Inference-Header-Content-Length": "999999"})
    assert status == 400 and "Inference-Header-Content-Length" in answer["error"]
    assert client.is_server_ready()


def test_unknown_model_and_version_are_404(server):
    assert post(server, "/v2/models/nope.onnx/infer", tensor_json())[0] == 404
    status, answer = post(server, "/v2/models/iris.onnx/versions/2/infer", tensor_json())
    assert status == 404 and "version" in answer["error"]


IRIS_CONFIG = {
    "name": "iris.onnx", "platform": "onnxruntime_onnx", "backend": "onnxruntime",
    "version_policy": {"latest": {"num_versions": 1}}, "max_batch_size": 0,
    "input": [{"name": "float_input", "data_type": "TYPE_FP32", "dims": [-1, 4]}],
    "output": [{"name": "label", "data_type": "TYPE_INT64", "dims": [-1]},
               {"name": "probabilities", "data_type": "TYPE_FP32", "dims": [-1, 3]}]}


def test_model_configuration_in_tritons_shape(server, client):
    assert client.get_model_config("iris.onnx") == IRIS_CONFIG
    assert client.get_model_config("iris.onnx", "1") == IRIS_CONFIG
    assert client.get_model_config("digits")["input"] == [
        {"name": "image", "data_type": "TYPE_FP32", "dims": [-1, 1, 8, 8]}]
    for model, version in (("nope.onnx", ""), ("iris.onnx", "2")):
        with pytest.raises(InferenceServerException) as err:
            client.get_model_config(model, version)
        assert err.value.status() == "404"


def test_statistics_rise_by_exactly_the_inferences_made(server, client):
    with Client(server.broker_url) as direct:  # a model of its own: no other test's inferences count
        direct.upload("iris_stats.onnx", (BUNDLED / "iris.onnx").read_bytes())
    assert client.get_inference_statistics("iris_stats.onnx")["model_stats"][0]["inference_count"] == 0
    for rows in (ROWS[:1], ROWS[:1], ROWS[:3]):
        infer(client, "iris_stats.onnx", rows, "float_input", ["label"], True)
    with pytest.raises(InferenceServerException):
        infer(client, "iris_stats.onnx", np.ones((1, 5), np.float32), "float_input", ["label"], True)

    def stats() -> dict:
        return client.get_inference_statistics("iris_stats.onnx")["model_stats"][0]
    # NOTE: statistics come from each worker's status poll: the failure may have been another worker's,
    # whose status arrives at its own next poll
    wait_for(lambda: stats()["inference_count"] == 5 and stats()["inference_stats"]["fail"]["count"] == 1, 20,
             "the statistics of 5 inferences and 1 failure")
    got = stats()
    assert got["name"] == "iris_stats.onnx" and got["version"] == "1" and got["execution_count"] == 3
    assert got["inference_stats"]["success"]["count"] == 3 and got["inference_stats"]["fail"]["count"] == 1
    assert got["inference_stats"]["compute_infer"]["ns"] > 0
    assert abs(got["last_inference"] / 1000 - time.time()) < 600
    every = {m["name"] for m in client.get_inference_statistics()["model_stats"]}
    assert {"iris.onnx", "iris_stats.onnx", "digits.onnx"} <= every
    for model, version in (("nope.onnx", ""), ("iris.onnx", "2")):
        with pytest.raises(InferenceServerException) as err:
            client.get_inference_statistics(model, version)
        assert err.value.status() == "404"


def test_not_ready_without_workers(procs):
    base = start_frontend(procs, f"tcp://127.0.0.1:{free_port()}")
    c = triton.InferenceServerClient(base.removeprefix("http://"))
    try:
        assert c.is_server_live() and not c.is_server_ready()
        started = time.monotonic()
        with pytest.raises(InferenceServerException) as err:
            c.get_model_metadata("iris.onnx")
        # NOTE: half the frontend's 30 s deadline: a prompt 503, not a call that waited its time out
        assert err.value.status() == "503" and time.monotonic() - started < 15
    finally:
        c.close()
