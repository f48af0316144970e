"""Tokens on the REST API, and uploads that try to read files outside the model pool."""
from __future__ import annotations

import json
import urllib.request

import numpy as np
import pytest

from broker.client import Client
from broker.errors import BadInput, PayloadTooLarge

from .harness import BUNDLED, start_frontend, wait_workers
from .onnx_models import external_data_model

pytestmark = pytest.mark.slow  # starts real processes

ADMIN, API = "admin-secret-1", "reader-secret-2"


def call(base: str, method: str, path: str, body: bytes | None = None, token: str | None = None,
         content_type: str = "application/json") -> tuple[int, dict, object]:
    req = urllib.request.Request(base + path, data=body, method=method, headers={"Content-Type": content_type})
    if token is not None:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, json.loads(resp.read() or b"{}"), resp.headers
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"{}"), err.headers


@pytest.fixture
def guarded(procs, cluster):
    return start_frontend(procs, cluster.url, FRACTAL_ADMIN_TOKEN=ADMIN)


def test_mutations_need_the_admin_token_and_reads_stay_open(guarded):
    iris = (BUNDLED / "iris.onnx").read_bytes()
    status, body, headers = call(guarded, "PUT", "/api/v1/models/new.onnx", iris,
                                 content_type="application/octet-stream")
    assert status == 401 and body["http_status"]["code"] == 401 and headers["WWW-Authenticate"].startswith("Bearer")
    assert call(guarded, "PUT", "/api/v1/models/new.onnx", iris, "wrong", "application/octet-stream")[0] == 403
    assert call(guarded, "PUT", "/api/v1/models/new.onnx", iris, ADMIN, "application/octet-stream")[0] == 200
    assert call(guarded, "POST", "/api/v1/models/new.onnx", b'{"model_description": "x"}')[0] == 401
    assert call(guarded, "DELETE", "/api/v1/models/new.onnx", token="wrong")[0] == 403
    status, body, _ = call(guarded, "POST", "/v2/repository/models/iris.onnx/unload")
    assert status == 401 and set(body) == {"error"}  # the v2 shape under /v2
    assert call(guarded, "GET", "/api/v1/models")[0] == 200  # reads and predictions stay open
    assert call(guarded, "POST", "/api/v1/models/iris.onnx/prediction", b'{"values": [2, 5, 1, 4]}')[0] == 200
    assert call(guarded, "DELETE", "/api/v1/models/new.onnx", token=ADMIN)[0] == 200


def test_with_only_an_api_token_changing_models_needs_it_too(procs, cluster):
    base = start_frontend(procs, cluster.url, FRACTAL_API_TOKEN=API)
    assert call(base, "DELETE", "/api/v1/models/iris.onnx")[0] == 401
    assert call(base, "POST", "/v2/repository/models/iris.onnx/unload", token="nope")[0] == 403
    assert call(base, "POST", "/api/v1/models/iris.onnx", b'{"model_description": "x"}', API)[0] == 200


def test_the_usual_variable_names_work_too():
    from broker.settings import load
    from frontend.settings import FrontendSettings
    settings = load(FrontendSettings, "frontend", env={"FRACTAL_FRONTEND_ADMIN_TOKEN": "a", "FRACTAL_API_TOKEN": "b"})
    assert (settings.admin_token, settings.api_token) == ("a", "b")


def test_the_api_token_guards_the_rest_but_not_health(procs, cluster):
    base = start_frontend(procs, cluster.url, FRACTAL_ADMIN_TOKEN=ADMIN, FRACTAL_API_TOKEN=API)
    assert call(base, "GET", "/api/v1/models")[0] == 401
    assert call(base, "GET", "/api/v1/models", token="nope")[0] == 403
    assert call(base, "GET", "/api/v1/models", token=API)[0] == 200
    assert call(base, "GET", "/api/v1/models", token=ADMIN)[0] == 200  # admins may read
    assert call(base, "POST", "/api/v1/models/iris.onnx", b'{"model_description": "x"}', API)[0] == 403
    for path in ("/", "/v2/health/live", "/v2/health/ready", "/openapi.json"):
        assert call(base, "GET", path)[0] == 200, path


def test_openapi_marks_the_guarded_operations(guarded):
    doc = call(guarded, "GET", "/openapi.json")[1]
    assert doc["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
    assert doc["paths"]["/api/v1/models/{name}"]["put"]["security"] == [{"bearer": []}]
    assert "security" not in doc["paths"]["/api/v1/models/{name}/prediction"]["post"]


@pytest.mark.parametrize("location", ["/etc/hostname", "../outside.bin", "sub/../../outside.bin"])
def test_uploads_whose_external_data_leaves_the_pool_are_refused(client, cluster, location):
    (cluster.model_dir.parent / "outside.bin").write_bytes(b"S" * 16)
    before = sorted(p.name for p in cluster.model_dir.iterdir())
    with pytest.raises(BadInput, match="ONNX Runtime"):
        client.upload("sneaky.onnx", external_data_model(location))
    assert sorted(p.name for p in cluster.model_dir.iterdir()) == before


def test_external_data_inside_the_pool_is_allowed(client, cluster):
    weights = np.arange(16, dtype=np.uint8)
    (cluster.model_dir / "weights.bin").write_bytes(weights.tobytes())
    client.upload("external.onnx", external_data_model("weights.bin"))
    np.testing.assert_array_equal(client.predict("external.onnx", [])["y"], weights)


def test_oversized_models_are_refused(procs, broker_url, model_dir):
    procs.worker(broker_url, model_dir, "--max-model-bytes", "1000")
    wait_workers(broker_url, 1)
    with Client(broker_url) as c:
        with pytest.raises(PayloadTooLarge):
            c.upload("big.onnx", (BUNDLED / "digits.onnx").read_bytes())
