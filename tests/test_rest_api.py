"""The seed's REST API against a real `fractal serve`: its curl commands word for word, the model
lifecycle, and every error code, each triggered by a real request."""
from __future__ import annotations

import http.client
import io
import json
import shlex
import subprocess
import urllib.request
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from PIL import Image

from frontend import api

from .harness import BUNDLED, Served, start_frontend, wait_workers
from .onnx_models import slow_model, slow_steps

pytestmark = pytest.mark.slow  # starts real processes

MAX_BODY = 2_000_000
OK = {"code": 200, "description": "OK", "name": "OK"}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    served = Served(tmp_path_factory.mktemp("rest"), {"FRACTAL_FRONTEND_MAX_BODY_BYTES": str(MAX_BODY)})
    yield served
    assert served.stop() == 0


def curl(server: Served, command: str) -> tuple[int, dict]:
    """Run a curl command line as the seed README writes it, against this server's port."""
    argv = shlex.split(command.replace("http://localhost:8002", server.base))
    out = subprocess.run([*argv, "-s", "-w", "\n%{http_code}"], capture_output=True, timeout=30,
                         cwd=BUNDLED, check=True).stdout.decode()
    body, code = out.rsplit("\n", 1)
    return int(code), json.loads(body)


def call(server: Served, method: str, path: str, body: bytes | None = None,
         content_type: str | None = "application/json", headers: dict | None = None):
    req = urllib.request.Request(server.base + path, data=body, method=method, headers=dict(headers or {}))
    if content_type:
        req.add_header("Content-Type", content_type)
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, json.loads(resp.read()), resp.headers
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read()), err.headers


def pool_files(server: Served) -> list[str]:
    return sorted(p.name for p in server.pool.iterdir() if p.is_file())  # NOTE: not .unloaded/, .validated/


# -- the seed README's commands -------------------------------------------------------------------

def test_seed_welcome(server):
    assert curl(server, "curl http://localhost:8002/") == (200, {"http_status": {
        "code": 200, "description": "Greetings from Fractal - ML Server - Inferrer, the Machine Learning "
        "model server. For more information, visit /help", "name": "OK"}})


def test_seed_help_lists_every_endpoint_with_an_example(server):
    status, body = curl(server, "curl http://localhost:8002/help")
    assert status == 200 and body["http_status"] == OK
    assert [(e["method"], e["path"]) for e in body["endpoints"]] == [(e.method, e.path) for e in api.ENDPOINTS]
    assert all(e["example"].startswith("curl ") and e["description"] for e in body["endpoints"])


def test_seed_sendtomodelhost_shows_both_workers(server):
    status, body = curl(server, """curl -X POST -H "Content-Type: application/json" --data '{"data": ["ONE", "TWO", "THREE", "FOUR"]}'  http://localhost:8002/api/test/sendtomodelhost""")  # noqa: E501  (the seed's curl line, word for word)
    assert status == 200
    assert [d["data"] for d in body["data"]] == ["ONE", "TWO", "THREE", "FOUR"]
    assert len({d["node"] for d in body["data"]}) == 2


def test_seed_model_list_and_information(server):
    status, body = curl(server, "curl -X GET http://localhost:8002/api/v1/models")
    assert (status, body["http_status"]) == (200, OK)
    assert body["model_list"] == sorted(body["model_list"]) and "iris.onnx" in body["model_list"]
    status, body = curl(server, "curl -X GET http://localhost:8002/api/v1/models/information")
    assert status == 200 and all(set(m) == {"description", "model"} for m in body["model_list"])
    assert any(m["model"] == "iris.onnx" and m["description"].startswith("Clasificación")
               for m in body["model_list"])


def test_seed_model_information(server):
    status, body = curl(server, "curl -X GET http://localhost:8002/api/v1/models/iris.onnx")
    assert (status, body["http_status"]) == (200, OK)
    assert body["model"] == "iris.onnx" and body["description"]
    assert body["inputs"] == [{"name": "float_input", "dtype": "float32", "shape": [None, 4]}]
    assert [o["name"] for o in body["outputs"]] == ["label", "probabilities"]
    assert body["size_bytes"] == (server.pool / "iris.onnx").stat().st_size and body["last_modified"]


def test_seed_update_description(server):
    text = "This model classifies a 4 element array input between different species of Iris flowers."
    status, body = curl(server, """curl -X POST -H "Content-Type: application/json" --data '{"model_description":"This model classifies a 4 element array input between different species of Iris flowers."}' http://localhost:8002/api/v1/models/iris.onnx""")  # noqa: E501  (the seed's curl line, word for word)
    assert status == 200 and body["description"] == text
    assert call(server, "GET", "/api/v1/models/iris.onnx")[1]["description"] == text


def test_seed_upload_and_delete(server):
    status, body = curl(server, 'curl -X PUT -F "path=@diabetes.onnx" http://localhost:8002/api/v1/models/uploaded.onnx')
    assert status == 200 and body["model"] == "uploaded.onnx"
    assert body["inputs"][0]["shape"] == [None, 10]
    status, body = curl(server, "curl -X DELETE http://localhost:8002/api/v1/models/uploaded.onnx")
    assert (status, body["model"]) == (200, "uploaded.onnx")
    assert "uploaded.onnx" not in pool_files(server)


def test_seed_prediction(server):
    assert curl(server, """curl -X GET -H "Content-Type: application/json" --data '{"values":[2, 5, 1, 4]}' http://localhost:8002/api/v1/models/iris.onnx/prediction""") == (200, {  # noqa: E501  (the seed's curl line, word for word)
        "http_status": {"code": 200, "description": "Prediction successful", "name": "OK"}, "values": [1]})


def test_seed_image_prediction_gives_the_label_and_with_outputs_the_probabilities(server):
    status, body = curl(server, 'curl -X GET -F "file=@digits_sample.png" http://localhost:8002/api/v1/models/digits.onnx/prediction')
    assert (status, body["values"], "outputs" in body) == (200, [8], False)  # the first output: the label
    image = Image.open(BUNDLED / "digits_sample.png").convert("L").resize((8, 8), Image.Resampling.BILINEAR)
    pixels = (np.asarray(image, np.float32) / 255)[None, None]
    session = ort.InferenceSession(str(BUNDLED / "digits.onnx"), providers=["CPUExecutionProvider"])
    expected = session.run(["probabilities"], {"image": pixels})[0]
    status, body = curl(server, 'curl -X POST -F "file=@digits_sample.png" -F outputs=all http://localhost:8002/api/v1/models/digits.onnx/prediction')
    assert (status, body["values"], list(body["outputs"])) == (200, [8], ["label", "probabilities"])
    np.testing.assert_allclose(body["outputs"]["probabilities"], expected, rtol=1e-5)
    assert int(np.argmax(body["outputs"]["probabilities"][0])) == 8


# -- more ways in ---------------------------------------------------------------------------------

def test_rows_named_inputs_and_outputs_by_name(server):
    status, body, _ = call(server, "POST", "/api/v1/models/iris.onnx/prediction",
                           b'{"values": [[2, 5, 1, 4], [5.1, 3.5, 1.4, 0.2]]}')
    assert (status, body["values"]) == (200, [1, 0])
    status, body, _ = call(server, "POST", "/api/v1/models/iris.onnx/prediction",
                           b'{"inputs": {"float_input": [[2, 5, 1, 4]]}, "outputs": ["probabilities"]}')
    assert status == 200 and body["outputs"] == {"probabilities": [[0.0, 1.0, 0.0]]}
    status, body, _ = call(server, "POST", "/api/v1/models/iris.onnx/prediction",
                           b'{"values": [2, 5, 1, 4], "outputs": "all"}', content_type=None)
    assert status == 200 and set(body["outputs"]) == {"label", "probabilities"}


def test_full_model_lifecycle(server):
    iris, diabetes = (BUNDLED / "iris.onnx").read_bytes(), (BUNDLED / "diabetes.onnx").read_bytes()
    path = "/api/v1/models/life.onnx"
    assert call(server, "PUT", path, iris, "application/octet-stream")[0] == 200
    assert "life.onnx" in call(server, "GET", "/api/v1/models")[1]["model_list"]
    assert call(server, "POST", path, b'{"model_description": "first life"}')[0] == 200
    assert {"description": "first life", "model": "life.onnx"} in call(
        server, "GET", "/api/v1/models/information")[1]["model_list"]
    assert call(server, "POST", path + "/prediction", b'{"values": [2, 5, 1, 4]}')[1]["values"] == [1]
    assert call(server, "PUT", path, diabetes, "application/octet-stream")[0] == 200  # replace
    status, body, _ = call(server, "POST", path + "/prediction", b'{"values": [0.01, 0.05, 0.06, 0.02, '
                           b'-0.04, -0.03, -0.04, -0.002, 0.02, -0.017]}')
    assert status == 200 and isinstance(body["values"][0][0], float)
    assert call(server, "GET", path)[1]["description"] == "first life"  # kept across the replace
    status, body, _ = call(server, "POST", path + "/prediction", b'{"values": [2, 5, 1, 4]}')
    assert status == 400 and "[N, 10]" in body["http_status"]["description"]
    assert call(server, "DELETE", path)[0] == 200
    assert call(server, "POST", path + "/prediction", b'{"values": [2, 5, 1, 4]}')[0] == 404
    assert call(server, "GET", path)[0] == 404


def test_request_id_is_taken_returned_and_logged(server):
    status, _, headers = call(server, "GET", "/api/v1/models", headers={"X-Request-ID": "trace-me-42"})
    assert status == 200 and headers["X-Request-ID"] == "trace-me-42"
    assert "trace-me-42" in server.log()  # the frontend's line and the worker's
    assert server.log().count("trace-me-42") >= 2
    assert len(call(server, "GET", "/")[2]["X-Request-ID"]) == 32  # made when not given


def test_openapi_document_covers_every_endpoint(server):
    status, doc, _ = call(server, "GET", "/openapi.json")
    assert status == 200 and doc["openapi"].startswith("3.")
    for e in api.ENDPOINTS:
        assert "200" in doc["paths"][e.path][e.method.lower()]["responses"]
    ids = [operation["operationId"] for path in doc["paths"].values() for operation in path.values()]
    assert len(ids) == len(set(ids)) == len(api.ENDPOINTS)  # OpenAPI: operationIds are unique


# -- errors: the seed's shape, the right code -----------------------------------------------------

def error(status_body) -> tuple[int, str]:
    status, body, _ = status_body
    assert set(body) == {"http_status"} and body["http_status"]["code"] == status
    return status, body["http_status"]["description"]


@pytest.mark.parametrize("body, needle", [
    (b'{"values": [2, 5, 1', "not valid JSON"),
    (b'{"values": [[1, 2], [3]]}', "rectangular"),
    (b'{"values": [2, 5, 1]}', "expects shape [N, 4]"),
    (b'{"rows": [2, 5, 1, 4]}', '"values"'),
    (b"", "empty body"),
])
def test_bad_input_is_400_with_what_to_do(server, body, needle):
    status, text = error(call(server, "POST", "/api/v1/models/iris.onnx/prediction", body))
    assert status == 400 and needle in text


@pytest.mark.parametrize("name", ["x..y.onnx", ".hidden.onnx", "a%5Cb.onnx", "x..y"])
def test_bad_model_names_are_400(server, name):
    status, text = error(call(server, "GET", f"/api/v1/models/{name}"))
    assert status == 400 and "plain file name" in text


def test_unknown_model_and_route_are_404(server):
    assert error(call(server, "POST", "/api/v1/models/nope.onnx/prediction", b'{"values": [1]}'))[0] == 404
    assert error(call(server, "GET", "/api/v2/nothing"))[0] == 404


def test_wrong_method_is_405_with_allow(server):
    status, body, headers = call(server, "PATCH", "/api/v1/models")
    assert status == 405 and "GET" in headers["Allow"] and "PATCH" in body["http_status"]["description"]


def test_oversized_body_and_decompression_bomb_are_413(server):
    # The server answers from Content-Length, before the body: read the answer without sending it.
    conn = http.client.HTTPConnection("127.0.0.1", server.http_port, timeout=10)
    conn.putrequest("POST", "/api/v1/models/iris.onnx/prediction")
    conn.putheader("Content-Type", "application/json")
    conn.putheader("Content-Length", str(MAX_BODY + 1))
    conn.endheaders()
    resp = conn.getresponse()
    assert resp.status == 413 and json.loads(resp.read())["http_status"]["code"] == 413
    conn.close()
    bomb = io.BytesIO()
    Image.new("1", (12_000, 12_000)).save(bomb, "PNG")  # 144 M pixels in a few kB
    status, text = error(call(server, "POST", "/api/v1/models/digits.onnx/prediction", bomb.getvalue(),
                              "image/png"))
    assert status == 413 and "pixel" in text
    assert call(server, "GET", "/api/v1/models")[0] == 200


def test_unsupported_content_and_image_types_are_415(server):
    assert error(call(server, "POST", "/api/v1/models/iris.onnx/prediction", b"<v/>", "application/xml"))[0] == 415
    assert error(call(server, "PUT", "/api/v1/models/x.onnx", b"model", "text/html"))[0] == 415
    status, text = error(call(server, "POST", "/api/v1/models/digits.onnx/prediction", b"GIF89? no",
                              "image/gif"))
    assert status == 415 and "image format" in text


@pytest.mark.parametrize("name, data", [
    ("junk.onnx", b"this is not an onnx model"),
    ("truncated.onnx", (BUNDLED / "iris.onnx").read_bytes()[:200]),
    ("iris.onnx", b"\x08\x07garbage that must not replace iris"),
])
def test_hostile_uploads_leave_the_pool_unchanged(server, name, data):
    before = {p: (server.pool / p).read_bytes() for p in pool_files(server)}
    status, text = error(call(server, "PUT", f"/api/v1/models/{name}", data, "application/octet-stream"))
    assert status == 400 and "ONNX Runtime" in text
    assert {p: (server.pool / p).read_bytes() for p in pool_files(server)} == before
    assert call(server, "POST", "/api/v1/models/iris.onnx/prediction", b'{"values": [2, 5, 1, 4]}')[0] == 200


def test_upload_with_a_path_in_its_name_is_refused(server):
    before = pool_files(server)
    req = subprocess.run(["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "--path-as-is", "-X", "PUT",
                          "--data-binary", "@iris.onnx", "-H", "Content-Type: application/octet-stream",
                          server.base + "/api/v1/models/..%2F..%2Fescaped.onnx"],
                         capture_output=True, cwd=BUNDLED, timeout=30)
    assert req.stdout.decode() in ("400", "404")
    assert pool_files(server) == before and not (server.pool.parent / "escaped.onnx").exists()


def test_unexpected_failure_is_500_with_a_logged_request_id(server):
    (server.pool / "broken.onnx").mkdir()  # an operator's mistake: a directory where a model should be
    try:
        status, body, headers = call(server, "POST", "/api/v1/models/broken.onnx/prediction",
                                     b'{"values": [1]}', headers={"X-Request-ID": "broken-1"})
    finally:
        (server.pool / "broken.onnx").rmdir()
    assert status == 500 and "broken-1" in body["http_status"]["description"]
    assert "Traceback" in server.log() and "broken-1" in server.log()


# -- without a broker, and past the deadline --------------------------------------------------------

def test_frontend_answers_503_without_a_broker_and_recovers_by_itself(procs, model_dir):
    from .harness import free_port
    url = f"tcp://127.0.0.1:{free_port()}"
    base = start_frontend(procs, url)
    req = urllib.request.Request(base + "/api/v1/models")
    try:
        urllib.request.urlopen(req, timeout=10)
        raise AssertionError("expected 503")
    except urllib.error.HTTPError as err:
        assert err.code == 503 and err.headers["Retry-After"] == "1"
        assert json.loads(err.read())["http_status"]["code"] == 503
    procs.broker(url)
    procs.worker(url, model_dir)
    wait_workers(url, 1)
    with urllib.request.urlopen(req, timeout=10) as resp:
        assert resp.status == 200


def test_past_the_deadline_is_504(procs, cluster):
    from broker.client import Client
    deadline_s = 0.5
    with Client(cluster.url) as client:
        client.upload("slow.onnx", slow_model())
    base = start_frontend(procs, cluster.url, FRACTAL_FRONTEND_TIMEOUT_S=str(deadline_s))
    steps = slow_steps(3 * deadline_s)
    req = urllib.request.Request(base + "/api/v1/models/slow.onnx/prediction", method="POST",
                                 data=json.dumps({"values": [steps]}).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        urllib.request.urlopen(req, timeout=10)
        raise AssertionError("expected 504")
    except urllib.error.HTTPError as err:
        assert err.code == 504 and json.loads(err.read())["http_status"]["code"] == 504


def test_pool_path_is_where_the_models_are(server):
    assert Path(server.pool).is_dir() and "iris.onnx" in pool_files(server)


@pytest.mark.parametrize("shape, layout", [([1, 4, 4, 3], "NHWC"), ([1, 3, 4, 4], "NCHW"),
                                           (["N", 1, 4, 4], "gray")])
@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_images_follow_the_models_layout_channels_and_size(server, shape, layout, fmt):
    from .onnx_models import identity_model
    name = f"identity-{layout}.onnx"
    assert call(server, "PUT", f"/api/v1/models/{name}", identity_model(shape), "application/octet-stream")[0] == 200
    rgb = np.random.default_rng(3).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    encoded = io.BytesIO()
    Image.fromarray(rgb, "RGB").save(encoded, fmt, **({"quality": 100} if fmt == "JPEG" else {}))
    status, body, _ = call(server, "POST", f"/api/v1/models/{name}/prediction", encoded.getvalue(),
                           f"image/{fmt.lower()}")
    assert status == 200
    decoded = Image.open(io.BytesIO(encoded.getvalue()))
    mode = "L" if layout == "gray" else "RGB"
    pixels = np.asarray(decoded.convert(mode).resize((4, 4), Image.Resampling.BILINEAR), np.float32) / 255
    expected = pixels[None, None] if layout == "gray" else (
        pixels[None] if layout == "NHWC" else pixels.transpose(2, 0, 1)[None])
    np.testing.assert_allclose(body["values"], expected, atol=1e-6)  # identity: the first output is the image
