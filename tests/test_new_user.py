"""What a new user trips over (issue 12): each case run as the user ran it, against a real `fractal
serve` started with its default model directory, through curl, the direct client and the CLI."""
from __future__ import annotations

import io
import json
import re
import shlex
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from broker.client import Client
from broker.errors import BadInput, ModelNotFound
from frontend import api

from .harness import BUNDLED, Served, free_port, free_ports, wait_for, wait_workers

pytestmark = pytest.mark.slow  # starts real processes

PNG = (BUNDLED / "digits_sample.png").read_bytes()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    # NOTE: --model-dir models: the default ./models, relative to where the user stands (cwd).
    served = Served(tmp_path_factory.mktemp("newuser"), None, "--model-dir", "models")
    served.cwd = served.log_path.parent
    yield served
    assert served.stop() == 0


def request(server: Served, method: str, path: str, body: bytes | None = None,
            content_type: str = "application/json") -> tuple[int, dict, bytes]:
    req = urllib.request.Request(server.base + path, data=body, method=method,
                                 headers={"Content-Type": content_type})
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            raw = resp.read()
            return resp.status, json.loads(raw), raw
    except urllib.error.HTTPError as err:
        raw = err.read()
        return err.code, json.loads(raw), raw


def description(answer: tuple) -> str:
    return answer[1]["http_status"]["description"]


def run_curl(server: Served, command: str) -> tuple[int, dict]:
    """A documented curl line, word for word but for the port, run where the user started the server."""
    argv = shlex.split(command.replace(api.BASE, server.base).replace(f"http://localhost:{server.http_port}",
                                                                      server.base))
    out = subprocess.run([*argv, "-s", "-w", "\n%{http_code}"], capture_output=True, timeout=30,
                         cwd=server.cwd, check=True).stdout.decode()
    body, code = out.rsplit("\n", 1)
    return int(code), json.loads(body)


def fractal(*args: str, env: dict | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    import os
    return subprocess.run([sys.executable, "-m", "fractal", *args], capture_output=True, text=True, timeout=60,
                          env=dict(os.environ, **(env or {})), cwd=cwd)


# -- 1. an image for a model that takes no image ----------------------------------------------------

@pytest.mark.parametrize("model, shape", [("iris.onnx", "[N, 4]"), ("diabetes.onnx", "[N, 10]")])
def test_an_image_for_a_model_without_an_image_input_is_400_naming_its_input(server, model, shape):
    answer = request(server, "POST", f"/api/v1/models/{model}/prediction", PNG, "image/png")
    assert answer[0] == 400 and set(answer[1]) == {"http_status"}
    text = description(answer)
    assert "does not take images" in text and f"'float_input' is {shape} (float32)" in text
    assert '{"values": [' in text
    assert request(server, "POST", "/api/v1/models/digits.onnx/prediction", PNG, "image/png")[0] == 200


# -- 3. /help's image example, from where the user stands --------------------------------------------

def test_the_help_image_example_works_as_written_and_says_what_it_shows(server):
    assert (server.cwd / "models" / "digits_sample.png").is_file()
    entries = request(server, "GET", "/help")[1]["endpoints"]
    image = next(e for e in entries if "digits_sample.png" in e["example"])
    assert "handwritten 8" in image["description"]
    status, body = run_curl(server, image["example"])
    assert status == 200 and body["values"] == [8]
    probabilities = body["outputs"]["probabilities"][0]
    assert body["outputs"]["label"] == [8] and int(np.argmax(probabilities)) == 8 and len(probabilities) == 10


# -- 4. one rule for `values` and `outputs`, rows and images -----------------------------------------

def test_values_is_the_first_output_and_outputs_adds_names_for_rows_and_images(server):
    path = "/api/v1/models/digits.onnx/prediction"
    digit = np.asarray(Image.open(io.BytesIO(PNG)).convert("L").resize((8, 8), Image.Resampling.BILINEAR),
                       np.float32)[None] / 255
    rows = request(server, "POST", path, json.dumps({"values": digit.tolist(), "outputs": ["probabilities"]})
                   .encode())
    assert rows[0] == 200 and rows[1]["values"] == [8] and list(rows[1]["outputs"]) == ["probabilities"]
    raw = request(server, "POST", path + "?outputs=all", PNG, "image/png")
    assert raw[1]["values"] == [8] and list(raw[1]["outputs"]) == ["label", "probabilities"]
    np.testing.assert_allclose(raw[1]["outputs"]["probabilities"], rows[1]["outputs"]["probabilities"],
                               rtol=1e-5)
    status, body = run_curl(server, f'curl -X POST -F "file=@models/digits_sample.png" -F outputs=probabilities '
                                    f'-F outputs=label {api.BASE}{path}')
    assert status == 200 and body["values"] == [8] and list(body["outputs"]) == ["probabilities", "label"]
    status, body = run_curl(server, f'curl -X POST -F "file=@models/digits_sample.png" -F outputs=nope '
                                    f'{api.BASE}{path}')
    assert status == 400 and "unknown output 'nope'" in body["http_status"]["description"]


# -- 5. and 6. a bare array, a bare name: the same rule everywhere -----------------------------------

def test_the_direct_client_takes_a_bare_row_or_rows_like_rest_values(server):
    with Client(server.broker_url, timeout_s=10) as client:
        assert client.predict("iris.onnx", [2, 5, 1, 4])["label"].tolist() == [1]
        assert client.predict("iris.onnx", [[2, 5, 1, 4], [5.1, 3.5, 1.4, 0.2]])["label"].tolist() == [1, 0]
        assert client.predict("iris.onnx", [[2, 5, 1, 4]])["label"].tolist() == [1]


def test_a_bare_model_name_works_on_every_route_the_client_and_the_cli(server):
    rows = b'{"values": [2, 5, 1, 4]}'
    assert request(server, "POST", "/api/v1/models/iris/prediction", rows)[1]["values"] == [1]
    assert request(server, "GET", "/api/v1/models/iris")[1]["model"] == "iris.onnx"
    infer = {"inputs": [{"name": "float_input", "shape": [1, 4], "datatype": "FP32", "data": [2, 5, 1, 4]}]}
    answer = request(server, "POST", "/v2/models/iris/infer", json.dumps(infer).encode())
    assert answer[0] == 200 and answer[1]["model_name"] == "iris"  # v2 echoes the name as sent
    with Client(server.broker_url, timeout_s=10) as client:
        assert client.predict("iris", [2, 5, 1, 4])["label"].tolist() == [1]
        assert client.model_info("iris")["model"] == "iris.onnx"
    out = fractal("predict", "--broker-port", str(server.broker_port), "iris", "2", "5", "1", "4")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["label"] == [1]
    answer = request(server, "GET", "/api/v1/models/x..y")
    assert answer[0] == 400 and "invalid model name 'x..y'" in description(answer)


# -- 7. errors in words -------------------------------------------------------------------------------

def test_errors_say_what_was_sent_and_where_to_look(server):
    answer = request(server, "POST", "/api/v1/models/iris.onnx/prediction", b'{"values": ["a", "b", "c", "d"]}')
    assert answer[0] == 400 and "expects float32 values, got strings" in description(answer)
    assert "<U" not in description(answer)
    answer = request(server, "POST", "/api/v1/models/irs.onnx/prediction", b'{"values": [2, 5, 1, 4]}')
    assert answer[0] == 404
    assert "did you mean iris.onnx?" in description(answer) and "GET /api/v1/models" in description(answer)
    assert "`fractal models`" in description(answer)
    with Client(server.broker_url, timeout_s=10) as client:
        with pytest.raises(ModelNotFound, match="did you mean digits.onnx"):
            client.predict("digit", [0.0] * 64)
        with pytest.raises(BadInput, match="got strings"):
            client.predict("iris", [["a", "b", "c", "d"]])


def test_fractal_health_says_what_it_checked_and_why_it_failed(server):
    port = free_port()
    out = fractal("health", "serve", env={"FRACTAL_SERVE_HTTP_PORT": str(port)})
    assert out.returncode == 1
    assert out.stdout.strip() == (f"serve: unhealthy: GET http://127.0.0.1:{port}/v2/health/ready: connection "
                                  f"refused: nothing listens there; is fractal serve running? (its port: "
                                  f"fractal health serve PORT, or FRACTAL_SERVE_HTTP_PORT)")
    healthy = f"serve: healthy (GET http://127.0.0.1:{server.http_port}/v2/health/ready)"
    out = fractal("health", "serve", env={"FRACTAL_SERVE_HTTP_PORT": str(server.http_port)})
    assert (out.returncode, out.stdout.strip()) == (0, healthy)
    out = fractal("health", "serve", str(server.http_port))  # the port as fractal serve --http-port had it
    assert (out.returncode, out.stdout.strip()) == (0, healthy)


# -- 8. /help in a terminal ---------------------------------------------------------------------------

def test_help_is_indented_json_whose_examples_name_this_server(server):
    out = subprocess.run(["curl", "-s", server.base + "/help"], capture_output=True, timeout=30, check=True).stdout
    lines = out.decode().splitlines()
    assert len(lines) > 50 and max(map(len, lines)) < 600 and lines[1].startswith("  ")
    endpoints = json.loads(out)["endpoints"]
    assert endpoints[0] == {"method": "GET", "path": "/", "description": "Welcome message.",
                            "example": f"curl http://localhost:{server.http_port}/"}
    assert all(f"http://localhost:{server.http_port}/" in e["example"] and ":8002" not in e["example"]
               for e in endpoints)


# -- 9. the client commands find the server by the same flags and variables ---------------------------

def test_predict_and_models_follow_serves_broker_flags_and_variables(server):
    env = {"FRACTAL_SERVE_BROKER_PORT": str(server.broker_port)}
    out = fractal("models", env=env)
    assert out.returncode == 0, out.stderr
    assert [line.split("\t")[0] for line in out.stdout.splitlines()] == ["diabetes.onnx", "digits.onnx", "iris.onnx"]
    out = fractal("predict", "iris.onnx", "2", "5", "1", "4", env=env)
    assert (out.returncode, json.loads(out.stdout)["label"]) == (0, [1])
    out = fractal("models", "--broker", server.broker_url)
    assert out.returncode == 0 and "iris.onnx" in out.stdout
    out = fractal("models", "--broker-port", str(free_port()), "--timeout-s", "2")
    assert out.returncode == 1 and "--broker-host/--broker-port" in out.stderr


def test_client_commands_default_to_serves_broker():
    from fractal.cli import ClientSettings
    from fractal.serve import ServeSettings
    client, serve = ClientSettings(), ServeSettings()
    assert client.endpoint() == f"tcp://{serve.broker_host}:{serve.broker_port}"


# -- 10. one vocabulary: worker-N everywhere, and a request id on every request -----------------------

def test_node_ids_match_the_worker_names_and_every_request_has_an_id(server):
    answer = request(server, "POST", "/api/test/sendtomodelhost", b'{"data": [1, 2, 3, 4]}')
    nodes = {d["node"] for d in answer[1]["data"]}
    assert {re.sub(r"-\d+-[0-9a-f]{4}$", "", n) for n in nodes} == {"worker-1", "worker-2"}
    log = server.log()
    for node in nodes:
        name, pid = re.match(r"(worker-\d)-(\d+)-", node).groups()
        assert f"started {name} (pid {pid})" in log and f" {name}[{pid}] " in log
    with Client(server.broker_url, timeout_s=10) as client:
        client.predict("iris", [2, 5, 1, 4])
        client.call_many([("echo", {"data": 1})])
    wait_for(lambda: server.log().count("request client-") >= 2, 10, "the worker's log lines")
    assert "request None" not in server.log()


# -- 2. a second server on taken ports -----------------------------------------------------------------

def _serve_again(cwd: Path, *flags: str) -> subprocess.CompletedProcess:
    # NOTE: a free gRPC port unless flags name one (a later flag wins): 8001 may be anyone's
    return fractal("serve", "--model-dir", str(cwd / "second-pool"), "--grpc-port", str(free_port()), *flags,
                   cwd=cwd)


def test_a_second_serve_on_the_same_ports_exits_2_naming_the_port_and_how_to_change_it(server, tmp_path):
    before = Client(server.broker_url, timeout_s=5).broker_status()
    out = _serve_again(tmp_path, "--http-port", str(server.http_port), "--broker-port", str(server.broker_port),
                       "--metrics-port", "0")
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [
        f"fractal serve: port {server.http_port} on 127.0.0.1 (the REST API) is in use, perhaps by another "
        f"fractal serve: change it with --http-port or FRACTAL_SERVE_HTTP_PORT"]
    assert out.stdout == "" and not (tmp_path / "second-pool").exists()  # nothing was started
    out = _serve_again(tmp_path, "--http-port", str(free_port()), "--broker-port", str(server.broker_port),
                       "--metrics-port", "0")
    assert out.returncode == 2 and f"port {server.broker_port}" in out.stderr
    assert "--broker-port or FRACTAL_SERVE_BROKER_PORT" in out.stderr
    after = Client(server.broker_url, timeout_s=5).broker_status()
    assert len(after["workers"]) == len(before["workers"]) == 2  # no stranger registered with its broker


def test_a_taken_metrics_port_is_named_too(tmp_path):
    base = free_ports(3)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", base + 2))  # worker-2's metrics port
        taken.listen()
        out = _serve_again(tmp_path, "--http-port", str(free_port()), "--broker-port", str(free_port()),
                           "--metrics-port", str(base))
    assert out.returncode == 2
    assert f"port {base + 2} on 127.0.0.1 (worker-2's metrics) is in use" in out.stderr
    assert "--metrics-port or FRACTAL_SERVE_METRICS_PORT" in out.stderr


def test_ready_means_its_own_workers_answer_not_a_strangers(procs, model_dir, tmp_path):
    # A stranger's worker waits on the port this server's broker will bind, while this server's own
    # workers cannot start (their model directory is a file): the stranger must not make it "ready".
    broker_port = free_port()
    procs.worker(f"tcp://127.0.0.1:{broker_port}", model_dir, "--heartbeat-interval-s", "2.5")
    (tmp_path / "not-a-dir").write_text("")
    out = fractal("serve", "--http-port", str(free_port()), "--broker-port", str(broker_port), "--metrics-port", "0",
                  "--grpc-port", str(free_port()), "--model-dir", str(tmp_path / "not-a-dir"),
                  "--ready-timeout-s", "8", cwd=tmp_path)
    assert out.returncode == 1 and "ready:" not in out.stdout
    assert "did not come up within 8 s" in out.stderr


def test_ready_with_an_api_token_set(tmp_path):
    server = Served(tmp_path, {"FRACTAL_API_TOKEN": "s3cret"})
    try:
        assert "GET /api/v1/status 200" in server.log()  # the readiness check used the token
        with Client(server.broker_url, timeout_s=5) as client:
            assert client.predict("iris", [2, 5, 1, 4])["label"].tolist() == [1]
    finally:
        assert server.stop() == 0


def test_a_worker_on_an_empty_pool_says_how_to_fill_it(procs, broker_url, tmp_path):
    worker = procs.worker(broker_url, tmp_path / "empty-pool")
    log = Path(worker.log_path)
    wait_workers(broker_url, 1)
    assert "the model pool" in log.read_text() and "holds no models: copy .onnx files in" in log.read_text()
    with Client(broker_url, timeout_s=5) as client:
        assert client.models() == []


def test_the_direct_client_picks_image_outputs_by_name(server):
    with Client(server.broker_url, timeout_s=10) as client:
        assert list(client.predict_image("digits", PNG, ["probabilities"])) == ["probabilities"]
        assert client.predict_image("digits", PNG)["label"].tolist() == [8]
        with pytest.raises(BadInput, match="'outputs' must be a list of output names"):
            client.call("predict_image", {"model": "digits.onnx", "image": PNG, "outputs": "label"})
