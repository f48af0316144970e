"""Model versions in the pool (NAME/VERSION/model.onnx beside flat NAME.onnx), through the direct client."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from broker.client import Client
from broker.errors import BadInput, ModelNotFound, ModelUnloaded

from .harness import Served, free_port, start_frontend, wait_for, wait_workers
from .onnx_models import constant_model

pytestmark = pytest.mark.slow  # starts real processes

X = {"x": np.zeros((1, 1), np.float32)}


def _put(pool: Path, name: str, version: int, value: float) -> None:
    target = pool / name / str(version) / "model.onnx"
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / ".model.onnx.part"
    tmp.write_bytes(constant_model(value))
    os.replace(tmp, target)


def _policy(pool: Path, name: str, policy: dict) -> None:
    tmp = pool / f".{name}.onnx.json.part"
    tmp.write_text(json.dumps({"version_policy": policy}))
    os.replace(tmp, pool / f"{name}.onnx.json")


def _value(client: Client, name: str, version=None) -> float:
    return float(client.predict(name, X, version=version)["y"][0, 0])


def _both(client: Client, name: str, version=None) -> set:
    return {_value(client, name, version) for _ in range(2)}  # NOTE: two calls: both workers answer


@pytest.fixture
def versioned(cluster, client):
    pool = cluster.model_dir
    for v in (1, 2, 3):
        _put(pool, "m", v, float(v))
    return pool


def test_the_newest_version_serves_by_default_and_others_are_404(versioned, client):
    assert "m.onnx" in client.models()
    assert _both(client, "m") == {3.0} and _both(client, "m", 3) == {3.0}
    for version in (1, 2, 4, "0", "abc", "-1"):
        with pytest.raises(ModelNotFound, match="version"):
            client.predict("m", X, version=version)
    index = {(m["name"], m["version"]): (m["state"], m["reason"]) for m in client.repository()}
    assert index[("m.onnx", "3")] == ("READY", "")
    assert index[("m.onnx", "1")] == ("UNAVAILABLE", "not served by the model's version_policy")
    assert index[("iris.onnx", "1")] == ("READY", "")
    info = client.model_info("m")
    assert info["version"] == "3" and info["versions"] == ["3"]


@pytest.mark.parametrize("policy, served", [
    ({"all": {}}, [1, 2, 3]),
    ({"latest": {"num_versions": 2}}, [2, 3]),
    ({"specific": {"versions": [1, 3]}}, [1, 3]),
    ({"specific": {"versions": [1]}}, [1]),
])
def test_the_sidecar_version_policy_picks_the_versions_served(versioned, client, policy, served):
    _policy(versioned, "m", policy)
    for v in (1, 2, 3):
        if v in served:
            assert _both(client, "m", v) == {float(v)}
        else:
            with pytest.raises(ModelNotFound, match=f"no version {v}"):
                client.predict("m", X, version=v)
    assert _both(client, "m") == {float(served[-1])}
    assert client.model_info("m", version=served[0])["versions"] == [str(v) for v in served]


def test_a_flat_file_is_version_1_beside_a_directory(cluster, client):
    pool = cluster.model_dir
    (pool / "f.onnx").write_bytes(constant_model(1.0))
    assert _both(client, "f") == {1.0} and _both(client, "f", 1) == {1.0}
    with pytest.raises(ModelNotFound, match="no version 2"):
        client.predict("f", X, version=2)
    _put(pool, "f", 2, 2.0)
    _policy(pool, "f", {"all": {}})
    assert _both(client, "f") == {2.0} and _both(client, "f", 1) == {1.0}
    row = [np.array([[2, 5, 1, 4]], np.float32)]
    assert client.predict("iris", row, version=1)["label"].tolist() == client.predict("iris", row)["label"].tolist()
    with pytest.raises(ModelNotFound):
        client.predict("iris", row, version=7)


def test_upload_unload_load_and_delete_take_a_version(cluster, client):
    pool = cluster.model_dir
    client.upload("u", constant_model(1.0))
    assert (pool / "u.onnx").is_file()
    stored = client.upload("u", constant_model(2.0), "two versions", version=2)
    assert stored["version"] == "2" and (pool / "u" / "2" / "model.onnx").is_file()
    assert _both(client, "u") == {2.0}  # the default policy serves the newest
    _policy(pool, "u", {"all": {}})
    assert _both(client, "u", 1) == {1.0} and _both(client, "u", 2) == {2.0}
    with pytest.raises(BadInput, match="name the version"):
        client.upload("u", constant_model(9.0))
    client.unload("u", version=2)
    with pytest.raises(ModelUnloaded):
        client.predict("u", X, version=2)
    assert _both(client, "u", 1) == {1.0}
    index = {(m["name"], m["version"]): m["state"] for m in client.repository()}
    assert index[("u.onnx", "2")] == "UNAVAILABLE" and index[("u.onnx", "1")] == "READY"
    client.load("u", version=2)
    assert _both(client, "u", 2) == {2.0}
    with pytest.raises(ModelNotFound, match="no version 5"):
        client.unload("u", version=5)
    client.delete("u", version=2)
    assert not (pool / "u").exists()
    assert _both(client, "u") == {1.0}
    client.delete("u")
    assert not (pool / "u.onnx").exists() and not (pool / "u.onnx.json").exists()
    with pytest.raises(ModelNotFound):
        client.predict("u", X)


def test_polling_serves_a_version_directory_copied_in(procs, broker_url, tmp_path):
    pool = tmp_path / "pool"
    _put(pool, "p", 1, 1.0)
    for _ in range(2):
        procs.worker(broker_url, pool, "--poll-s", "0.2")
    wait_workers(broker_url, 2)

    def answers() -> set:
        seen = set()
        with Client(broker_url, timeout_s=10) as c:
            for outcome in c.call_many([("predict", {"model": "p.onnx", "inputs": X})] * 2, return_exceptions=True):
                seen.add(type(outcome).__name__ if isinstance(outcome, Exception)
                         else float(outcome["outputs"]["y"][0, 0]))
        return seen

    wait_for(lambda: answers() == {1.0}, 30, "version 1 to be served")
    _put(pool, "p", 2, 2.0)
    wait_for(lambda: answers() == {2.0}, 30, "version 2 to be served")


def test_versions_over_tritonclient_http_and_grpc(tmp_path):
    """/versions/V on infer, metadata, ready, config and stats, REST and gRPC, as Triton's clients send it."""
    import tritonclient.grpc as tg
    import tritonclient.http as th
    from tritonclient.utils import InferenceServerException

    pool = tmp_path / "pool"
    for v in (1, 2, 3):
        _put(pool, "m", v, float(v))
    _policy(pool, "m", {"latest": {"num_versions": 2}})
    served = Served(tmp_path, {"FRACTAL_BROKER_STATUS_INTERVAL_S": "0.2"})
    rest, rpc = th.InferenceServerClient(f"127.0.0.1:{served.http_port}"), tg.InferenceServerClient(
        served.grpc_target)
    try:
        def infer(module, client, version: str = ""):
            given = module.InferInput("x", [1, 1], "FP32")
            given.set_data_from_numpy(X["x"])
            result = client.infer("m", [given], model_version=version)
            answered = result.get_response()
            answered = answered["model_version"] if isinstance(answered, dict) else answered.model_version
            return float(result.as_numpy("y")[0, 0]), answered

        for module, client in ((th, rest), (tg, rpc)):
            assert infer(module, client) == (3.0, "3")
            assert infer(module, client, "2") == (2.0, "2")
            for unknown in ("1", "7", "x"):
                with pytest.raises(InferenceServerException, match="version"):
                    infer(module, client, unknown)
            assert client.is_model_ready("m", "2") and not client.is_model_ready("m", "1")
            assert not client.is_model_ready("m", "9")
        assert rest.get_model_metadata("m", "2")["versions"] == ["2", "3"]
        assert list(rpc.get_model_metadata("m", "3").versions) == ["2", "3"]
        assert rest.get_model_config("m", "2")["name"] == "m"
        assert rest.get_model_config("m", "2")["version_policy"] == {"latest": {"num_versions": 2}}
        grpc_config = rpc.get_model_config("m", "2", as_json=True)["config"]
        assert grpc_config["name"] == "m" and grpc_config["version_policy"] == {"latest": {"num_versions": 2}}
        with pytest.raises(InferenceServerException, match="version"):
            rest.get_model_config("m", "1")
        with pytest.raises(InferenceServerException) as caught:
            rpc.get_model_config("m", "7")
        assert caught.value.status() == "StatusCode.NOT_FOUND"

        def counts(version: str) -> int:
            stats = rest.get_inference_statistics("m", version)["model_stats"]
            assert [s["version"] for s in stats] == [version]
            return stats[0]["inference_count"]

        wait_for(lambda: counts("2") >= 2 and counts("3") >= 2, 30, "per-version statistics")
        grpc_stats = rpc.get_inference_statistics("m", "2", as_json=True)["model_stats"]
        assert grpc_stats[0]["version"] == "2" and int(grpc_stats[0]["inference_count"]) >= 2
        every = {(s["name"], s["version"]) for s in rest.get_inference_statistics()["model_stats"]}
        assert {("m.onnx", "2"), ("m.onnx", "3")} <= every
    finally:
        rest.close()
        rpc.close()
        assert served.stop() == 0


def test_the_seed_api_takes_a_version_parameter(cluster, procs):
    import urllib.error
    import urllib.request

    base = start_frontend(procs, cluster.url)

    def call(method: str, path: str, data: bytes | None = None, kind: str = "application/json"):
        req = urllib.request.Request(base + path, data=data, method=method, headers={"Content-Type": kind})
        try:
            with urllib.request.urlopen(req, timeout=10) as resp:
                return resp.status, json.loads(resp.read())
        except urllib.error.HTTPError as err:
            return err.code, json.loads(err.read())

    octet = "application/octet-stream"
    assert call("PUT", "/api/v1/models/s.onnx?version=2", constant_model(2.0), octet)[0] == 200
    assert call("PUT", "/api/v1/models/s.onnx?version=5", constant_model(5.0), octet)[0] == 200
    assert (cluster.model_dir / "s" / "5" / "model.onnx").is_file()
    row = json.dumps({"values": [[0.0]]}).encode()
    status, body = call("POST", "/api/v1/models/s.onnx/prediction", row)
    assert status == 200 and body["values"] == [[5.0]]
    status, body = call("POST", "/api/v1/models/s.onnx/prediction?version=2", row)
    assert status == 404 and "no version 2" in body["http_status"]["description"]
    _policy(cluster.model_dir, "s", {"all": {}})
    assert call("POST", "/api/v1/models/s.onnx/prediction?version=2", row)[1]["values"] == [[2.0]]
    status, body = call("GET", "/api/v1/models/s.onnx?version=2")
    assert status == 200 and body["version"] == "2" and body["versions"] == ["2", "5"]
    assert call("GET", "/api/v1/models/s.onnx?version=3")[0] == 404
    assert call("DELETE", "/api/v1/models/s.onnx?version=5")[0] == 200
    assert call("POST", "/api/v1/models/s.onnx/prediction", row)[1]["values"] == [[2.0]]
    assert call("DELETE", "/api/v1/models/s.onnx")[0] == 200
    assert call("POST", "/api/v1/models/s.onnx/prediction", row)[0] == 404
    # the frontend's per-model series carry the version that answered; a failure (no worker's answer names
    # a version) counts under the version that last answered for the model
    assert _model_samples(base + "/metrics", "fractal_frontend_model_requests_total", "s.onnx") == {
        ("5", None): 2.0, ("2", None): 3.0}
    assert _model_samples(base + "/metrics", "fractal_frontend_model_failures_total", "s.onnx") == {
        ("5", "ModelNotFound"): 1.0, ("2", "ModelNotFound"): 1.0}


def test_v2_load_and_unload_take_a_version_over_rest_and_grpc(tmp_path):
    """A version in the load/unload parameters ({"parameters": {"version": "2"}}); none: every version."""
    import tritonclient.grpc as tg
    import tritonclient.http as th
    from tritonclient.grpc import service_pb2 as pb
    from tritonclient.utils import InferenceServerException

    pool = tmp_path / "pool"
    for v in (1, 2):
        _put(pool, "m", v, float(v))
    _policy(pool, "m", {"all": {}})
    served = Served(tmp_path)
    rest, rpc = th.InferenceServerClient(f"127.0.0.1:{served.http_port}"), tg.InferenceServerClient(
        served.grpc_target)

    def states() -> dict:
        return {m["version"]: m["state"] for m in rest.get_model_repository_index() if m["name"] == "m.onnx"}

    def post(action: str, version: str) -> int:  # NOTE: tritonclient's http load/unload send no parameters
        import urllib.error
        import urllib.request
        body = json.dumps({"parameters": {"version": version}}).encode()
        req = urllib.request.Request(f"{served.base}/v2/repository/models/m/{action}", data=body, method="POST")
        try:
            with urllib.request.urlopen(req, timeout=10) as resp:
                return resp.status
        except urllib.error.HTTPError as err:
            assert "no version" in json.loads(err.read())["error"]
            return err.code

    try:
        assert post("unload", "2") == 200
        assert states() == {"1": "READY", "2": "UNAVAILABLE"}
        assert rest.is_model_ready("m", "1") and not rest.is_model_ready("m", "2")
        assert post("load", "2") == 200
        assert states() == {"1": "READY", "2": "READY"}
        rpc._client_stub.RepositoryModelUnload(pb.RepositoryModelUnloadRequest(
            model_name="m", parameters={"version": pb.ModelRepositoryParameter(string_param="1")}))
        assert states() == {"1": "UNAVAILABLE", "2": "READY"}
        rpc._client_stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(
            model_name="m", parameters={"version": pb.ModelRepositoryParameter(int64_param=1)}))
        assert states() == {"1": "READY", "2": "READY"}
        rpc.unload_model("m")  # no version: every version
        assert states() == {"1": "UNAVAILABLE", "2": "UNAVAILABLE"}
        rest.load_model("m")
        assert states() == {"1": "READY", "2": "READY"}
        assert post("unload", "7") == 404
        with pytest.raises(InferenceServerException) as caught:
            rpc.load_model("m", config='{"max_batch_size": 8}')
        assert caught.value.status() == "StatusCode.INVALID_ARGUMENT"
        assert states() == {"1": "READY", "2": "READY"}
    finally:
        rest.close()
        rpc.close()
        assert served.stop() == 0


def test_fractal_predict_takes_a_version(versioned, cluster):
    import subprocess
    import sys

    _policy(versioned, "m", {"specific": {"versions": [1, 3]}})

    def predict(*flags: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "fractal", "predict", "--broker", cluster.url, "m", "0",
                               *flags], capture_output=True, text=True, timeout=60)

    assert json.loads(predict().stdout) == {"y": [[3.0]]}
    assert json.loads(predict("--version", "1").stdout) == {"y": [[1.0]]}
    failed = predict("--version", "2")
    assert failed.returncode == 1 and "no version 2" in failed.stderr


def _model_samples(metrics_url: str, name: str, model: str) -> dict[tuple, float]:
    """{(version, reason): value} of the per-model samples of `name` for `model` at `metrics_url`."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families
    with urllib.request.urlopen(metrics_url, timeout=5) as resp:
        text = resp.read().decode()
    return {(s.labels["version"], s.labels.get("reason")): s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples if s.name == name and s.labels.get("model") == model}


def _worker_samples(metrics_url: str, name: str) -> dict[tuple, float]:
    """{(version, reason): value} of a worker's per-model samples of `name` for model m.onnx."""
    return _model_samples(metrics_url, name, "m.onnx")


@pytest.mark.parametrize("batching", [False, True], ids=["alone", "batched"])
def test_worker_per_model_metrics_carry_the_version_that_served(procs, broker_url, model_dir, batching):
    """The worker labels a prediction with the version that ran it (the newest when none is named), and
    only versions it loaded become series: an unknown version is no label value; unloading drops it."""
    for v in (1, 2, 3):
        _put(model_dir, "m", v, float(v))
    _policy(model_dir, "m", {"specific": {"versions": [1, 3]}})
    port = free_port()
    flags = ["--batch-max-size", "8", "--batch-max-delay-us", "500"] if batching else []
    procs.worker(broker_url, model_dir, "--metrics-port", str(port), *flags)
    wait_workers(broker_url, 1)
    metrics_url = f"http://127.0.0.1:{port}/metrics"
    with Client(broker_url, timeout_s=10) as client:
        assert _value(client, "m") == 3.0 and _value(client, "m.onnx") == 3.0
        assert _value(client, "m", 1) == 1.0
        with pytest.raises(BadInput):
            client.predict("m", {"x": np.zeros((1, 2), np.float32)}, version=1)
        with pytest.raises(BadInput):
            client.predict("m", {"x": np.zeros((1, 2), np.float32)})  # the newest, 3, failed it
        for version in (2, 7):
            with pytest.raises(ModelNotFound):
                client.predict("m", X, version=version)
        requests = _worker_samples(metrics_url, "fractal_worker_model_requests_total")
        assert requests == {("1", None): 2.0, ("3", None): 3.0}
        failures = _worker_samples(metrics_url, "fractal_worker_model_failures_total")
        assert failures == {("1", "BadInput"): 1.0, ("3", "BadInput"): 1.0}
        runs = _worker_samples(metrics_url, "fractal_worker_inference_seconds_count")
        assert runs == {("1", None): 1.0, ("3", None): 2.0}
        assert _worker_samples(metrics_url, "fractal_worker_model_resident") == {("1", None): 1.0, ("3", None): 1.0}
        client.unload("m", version=1)
        wait_for(lambda: ("1", None) not in _worker_samples(metrics_url, "fractal_worker_model_requests_total"),
                 10, "version 1's series to leave with its session")
        assert _worker_samples(metrics_url, "fractal_worker_model_requests_total") == {("3", None): 3.0}
        assert _worker_samples(metrics_url, "fractal_worker_model_failures_total") == {("3", "BadInput"): 1.0}
