"""Prometheus metrics of every component, checked with promtool and a real Prometheus; status page."""
from __future__ import annotations

import http.client
import json
import re
import shutil
import signal
import struct
import subprocess
import urllib.parse
import urllib.request
import uuid
from pathlib import Path

import grpc
import pytest
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc

from .harness import REPO, Served, dealer, debian_tool, free_port, free_ports, start_frontend, wait_for, wait_workers

pytestmark = pytest.mark.slow  # starts real processes

N = 25
PREDICTION_ROUTE = "/api/v1/models/{name}/prediction"


@pytest.fixture(scope="session")
def promtool() -> str:
    debian_tool("prometheus", "prometheus")
    return debian_tool("promtool", "prometheus")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    base = free_ports(4)  # broker, 2 workers, then the gRPC frontend
    served = Served(tmp_path_factory.mktemp("metrics"), {"FRACTAL_BROKER_STATUS_INTERVAL_S": "0.5"},
                    "--metrics-port", str(base))
    served.metrics_urls = {"frontend": f"{served.base}/metrics", "broker": f"http://127.0.0.1:{base}/metrics",
                           "worker-1": f"http://127.0.0.1:{base + 1}/metrics",
                           "worker-2": f"http://127.0.0.1:{base + 2}/metrics",
                           "grpc": f"http://127.0.0.1:{base + 3}/metrics"}
    yield served
    assert served.stop() == 0


def get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as resp:
        return resp.read().decode()


def predict(server: Served, times: int = 1) -> None:
    for _ in range(times):
        req = urllib.request.Request(f"{server.base}/api/v1/models/iris.onnx/prediction", method="POST",
                                     data=b'{"values": [2, 5, 1, 4]}', headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=10) as resp:
            assert resp.status == 200


def sample_sum(text: str, name: str, **labels: str) -> float:
    """Sum of the samples of `name` whose labels include `labels`."""
    total = 0.0
    for line in text.splitlines():
        match = re.match(rf"^{re.escape(name)}(?:{{(.*)}})? (\S+)$", line)
        if not match:
            continue
        found = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', match.group(1) or ""))
        if all(found.get(k) == v for k, v in labels.items()):
            total += float(match.group(2))
    return total


def test_every_metrics_endpoint_passes_promtool(server, promtool):
    predict(server)
    for component, url in server.metrics_urls.items():
        text = get(url)
        check = subprocess.run([promtool, "check", "metrics"], input=text.encode(), capture_output=True)
        assert check.returncode == 0, f"{component}: {check.stdout.decode()} {check.stderr.decode()}"
        assert f"fractal_{component.split('-')[0]}_" in text


def test_prometheus_config_passes_promtool(promtool):
    check = subprocess.run([promtool, "check", "config", str(REPO / "deploy" / "prometheus.yml")],
                           capture_output=True)
    assert check.returncode == 0, check.stdout.decode() + check.stderr.decode()


def _counts(server: Served) -> tuple[float, float, float]:
    front = sample_sum(get(server.metrics_urls["frontend"]), "fractal_frontend_requests_total",
                       route=PREDICTION_ROUTE, status="200")
    broker = sample_sum(get(server.metrics_urls["broker"]), "fractal_broker_requests_completed_total",
                        service="modelhost")
    workers = sum(sample_sum(get(server.metrics_urls[w]), "fractal_worker_requests_total", op="predict",
                             outcome="ok") for w in ("worker-1", "worker-2"))
    return front, broker, workers


def test_n_predictions_raise_each_tier_by_n(server):
    before = _counts(server)
    predict(server, N)
    after = _counts(server)
    assert [a - b for a, b in zip(after, before, strict=True)] == [N, N, N]
    text = get(server.metrics_urls["frontend"])  # several gunicorn processes, one sum
    assert sample_sum(text, "fractal_frontend_request_duration_seconds_count", route=PREDICTION_ROUTE) >= N


def test_a_real_prometheus_scrapes_every_target(server, promtool, tmp_path):
    port = free_port()
    targets = {name: url.removeprefix("http://").removesuffix("/metrics") for name, url in server.metrics_urls.items()}
    config = tmp_path / "prometheus.yml"
    config.write_text("global:\n  scrape_interval: 1s\nscrape_configs:\n" + "".join(
        f"  - job_name: {name}\n    static_configs:\n      - targets: ['{target}']\n"
        for name, target in targets.items()))
    proc = subprocess.Popen([shutil.which("prometheus"), f"--config.file={config}",
                             f"--storage.tsdb.path={tmp_path / 'data'}", f"--web.listen-address=127.0.0.1:{port}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    api = f"http://127.0.0.1:{port}/api/v1"

    def query(expr: str) -> list:
        try:
            return json.loads(get(f"{api}/query?query={urllib.parse.quote(expr)}"))["data"]["result"]
        except OSError:
            return []

    try:
        wait_for(lambda: len(query("up")) == len(targets) and all(r["value"][1] == "1" for r in query("up")), 40,
                 "Prometheus to scrape every target")
        expr = f'sum(fractal_frontend_requests_total{{route="{PREDICTION_ROUTE}"}})'
        wait_for(lambda: bool(query(expr)), 20, "the request counter in Prometheus")
        start = float(query(expr)[0]["value"][1])
        predict(server, 10)
        wait_for(lambda: float(query(expr)[0]["value"][1]) >= start + 10, 20, "the counter to rise by 10")
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=20)


def test_a_killed_worker_is_counted_dead(procs, model_dir):
    url, metrics_port = f"tcp://127.0.0.1:{free_port()}", free_port()
    procs.broker(url, "--metrics-port", str(metrics_port))
    workers = [procs.worker(url, model_dir) for _ in range(2)]
    wait_workers(url, 2)
    metrics = f"http://127.0.0.1:{metrics_port}/metrics"
    wait_for(lambda: sample_sum(get(metrics), "fractal_broker_workers", service="modelhost") == 2, 5, "2 workers")
    workers[0].send_signal(signal.SIGKILL)
    wait_for(lambda: sample_sum(get(metrics), "fractal_broker_worker_deaths_total") == 1, 5, "a death counted")
    wait_for(lambda: sample_sum(get(metrics), "fractal_broker_workers", service="modelhost") == 1, 5,
             "live workers to drop to 1")


def test_status_json_and_page_show_every_worker(server):
    def nodes() -> list:
        status = json.loads(get(f"{server.base}/api/v1/status"))
        return [w["node"] for w in status["workers"] if w["node"]] if status["broker"]["up"] else []
    wait_for(lambda: len(nodes()) == 2, 10, "both workers' status")
    status = json.loads(get(f"{server.base}/api/v1/status"))
    assert status["broker"]["services"]["modelhost"]["workers"] == 2
    assert all(w["heartbeat_age_s"] < 10 and w["state"] in ("idle", "busy") for w in status["workers"])
    with urllib.request.urlopen(f"{server.base}/status", timeout=10) as resp:
        page = resp.read().decode()
        assert resp.headers["Content-Type"].startswith("text/html")
    assert 'http-equiv="refresh"' in page and all(node in page for node in nodes())


def test_status_says_when_the_broker_is_down(procs):
    base = start_frontend(procs, f"tcp://127.0.0.1:{free_port()}")
    status = json.loads(get(f"{base}/api/v1/status"))
    assert status["broker"] == {"up": False} and status["workers"] == []
    assert "unreachable" in get(f"{base}/status")


def test_dashboard_queries_only_metrics_that_exist(server):
    use_iris(server, "nope.onnx")  # NOTE: the frontend's multiprocess files declare a metric with its first sample
    exposed = "\n".join(get(url) for url in server.metrics_urls.values())
    dashboard = json.loads((REPO / "deploy" / "grafana" / "fractal-ml-server.json").read_text())
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel.get("targets", [])]  # a row has none
    exprs += [v["query"] for v in dashboard["templating"]["list"] if v["type"] == "query"]
    names = {n for e in exprs for n in re.findall(r"\bfractal_[a-z_]+", e)}
    assert len(names) >= 10
    def family(name: str) -> str:
        return re.sub(r"_(total|bucket|count|sum)$", "", name)
    declared = {family(n) for n in re.findall(r"^# TYPE (\S+) ", exposed, re.M)}  # even before a sample
    missing = [n for n in names if family(n) not in declared]
    assert missing == []


def test_metrics_names_are_documented_in_the_readme():
    readme = (REPO / "README.md").read_text()
    from metrics import definitions
    source = Path(definitions.__file__).read_text()
    for name in set(re.findall(r'"(fractal_[a-z_]+)"', source)):
        assert name in readme, f"{name} is not in the README"


def test_clients_cannot_invent_label_values(server):
    from broker import protocol as p
    with dealer(server.broker_url) as sock:
        for i in range(20):  # requests to services nobody serves
            sock.send_multipart([b"MDPC02", b"\x01", f"made-up-{i}".encode(), *p.request_body(i, "echo", {})])
            assert sock.poll(3000)
            sock.recv_multipart()
    # NOTE: uvicorn's HTTP parser (httptools) refuses tokens it does not know (FOO) with its own 400
    # before the app; methods it parses but we do not route (PROPFIND, PURGE) reach the middleware.
    for method in ("FOO", "PROPFIND", "PURGE"):
        req = urllib.request.Request(f"{server.base}/", method=method)
        try:
            urllib.request.urlopen(req, timeout=5)
        except urllib.error.HTTPError:
            pass
    broker_text, frontend_text = get(server.metrics_urls["broker"]), get(server.metrics_urls["frontend"])
    assert "made-up" not in broker_text
    assert sample_sum(broker_text, "fractal_broker_requests_rejected_total", service="unknown") >= 20
    assert 'method="FOO"' not in frontend_text and 'method="PROPFIND"' not in frontend_text
    assert 'method="OTHER"' in frontend_text


def test_services_invented_by_peers_leave_no_series(server):
    with dealer(server.broker_url) as sock:
        sock.send_multipart([b"MDPW02", b"\x01", b"ghost-service"])  # READY
        wait_for(lambda: "ghost-service" in get(server.metrics_urls["broker"]), 5, "the ghost service's series")
        sock.send_multipart([b"MDPW02", b"\x06"])  # DISCONNECT
        wait_for(lambda: "ghost-service" not in get(server.metrics_urls["broker"]), 5, "its series to go")


def use_iris(server: Served, unknown: str, rounds: int = 1) -> None:
    """Per round, on one connection (so one gunicorn process, where iris answers before its failure is
    counted): a seed prediction, a bad one, one of an unknown model, a v2 one."""
    for _ in range(rounds):
        conn = http.client.HTTPConnection("127.0.0.1", server.http_port, timeout=10)
        for path, body, status in [("/api/v1/models/iris.onnx/prediction", b'{"values": [2, 5, 1, 4]}', 200),
                                   ("/api/v1/models/iris.onnx/prediction", b'{"values": [[1, 2]]}', 400),
                                   (f"/api/v1/models/{unknown}/prediction", b'{"values": [2, 5, 1, 4]}', 404),
                                   ("/v2/models/iris/infer", json.dumps({"inputs": [{
                                       "name": "float_input", "shape": [1, 4], "datatype": "FP32",
                                       "data": [2, 5, 1, 4]}]}).encode(), 200)]:
            conn.request("POST", path, body, {"Content-Type": "application/json"})
            response = conn.getresponse()
            response.read()
            assert response.status == status, path
        conn.close()


IRIS = {"model": "iris.onnx", "version": "1"}
PER_MODEL = [("worker", "fractal_worker_model_requests_total", {}),
             ("worker", "fractal_worker_model_failures_total", {"reason": "BadInput"}),
             ("worker", "fractal_worker_batch_rows_count", {}),
             ("worker", "fractal_worker_inference_seconds_count", {}),
             ("frontend", "fractal_frontend_model_requests_total", {}),
             ("frontend", "fractal_frontend_model_failures_total", {"reason": "BadInput"}),
             ("frontend", "fractal_frontend_model_queue_wait_seconds_count", {}),
             ("frontend", "fractal_frontend_model_inference_seconds_count", {}),
             ("grpc", "fractal_grpc_model_requests_total", {}),
             ("grpc", "fractal_grpc_model_queue_wait_seconds_count", {}),
             ("grpc", "fractal_grpc_model_inference_seconds_count", {})]


def per_model_counts(server: Served) -> dict[str, float]:
    texts = {name: get(url) for name, url in server.metrics_urls.items()}
    texts["worker"] = texts["worker-1"] + texts["worker-2"]
    return {name: sample_sum(texts[tier], name, **IRIS, **labels) for tier, name, labels in PER_MODEL}


def test_per_model_series_for_used_models_only(server):
    """Every tier labels a model it served, by model and version; a made-up name becomes no series."""
    unknown = f"made-up-{uuid.uuid4().hex[:8]}"
    before = per_model_counts(server)
    use_iris(server, unknown, rounds=5)
    with grpc.insecure_channel(server.grpc_target) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        for model in ("iris.onnx", unknown):
            request = pb.ModelInferRequest(model_name=model)
            request.inputs.add(name="float_input", datatype="FP32", shape=[1, 4])
            request.raw_input_contents.append(struct.pack("<4f", 2, 5, 1, 4))
            try:
                stub.ModelInfer(request, timeout=10)
            except grpc.RpcError as err:
                assert model == unknown and err.code() == grpc.StatusCode.NOT_FOUND
    after = per_model_counts(server)
    grew = {name: after[name] - before[name] for name in after}
    assert grew == {
        "fractal_worker_model_requests_total": 16,  # 5 x (seed, bad, v2) + 1 gRPC, the unknown ones not
        "fractal_worker_model_failures_total": 5, "fractal_worker_batch_rows_count": 11,
        "fractal_worker_inference_seconds_count": 11,
        "fractal_frontend_model_requests_total": 15, "fractal_frontend_model_failures_total": 5,
        "fractal_frontend_model_queue_wait_seconds_count": 10, "fractal_frontend_model_inference_seconds_count": 10,
        "fractal_grpc_model_requests_total": 1, "fractal_grpc_model_queue_wait_seconds_count": 1,
        "fractal_grpc_model_inference_seconds_count": 1}
    workers = get(server.metrics_urls["worker-1"]) + get(server.metrics_urls["worker-2"])
    assert sample_sum(workers, "fractal_worker_model_resident", **IRIS) >= 1
    assert all(unknown not in get(url) for url in server.metrics_urls.values())


def test_the_broker_counts_per_model_once_a_worker_holds_the_model(procs, model_dir):
    """The broker reads each request's model from its routing header: a model some worker reports
    resident gets dispatch and queue-wait series (`iris` and `iris.onnx` are one model); a name no
    worker holds never becomes a label value."""
    from broker.client import Client
    from broker.errors import ModelNotFound, Timeout

    port, url = free_port(), f"tcp://127.0.0.1:{free_port()}"
    procs.broker(url, "--metrics-port", str(port), "--status-interval-s", "0.1")
    procs.worker(url, model_dir)
    wait_workers(url, 1)
    row = {"float_input": [[2, 5, 1, 4]]}
    with Client(url, timeout_s=10) as client:
        client.predict("iris", row)  # loads it: the next status poll reports it resident

        def resident() -> bool:
            return any("iris.onnx" in (w.get("models_resident") or []) for w in client.broker_status()["workers"])
        wait_for(resident, 10, "the worker to report iris.onnx resident")
        for name in ("iris", "iris.onnx", "iris", "iris.onnx", "iris"):
            assert client.predict(name, row)["label"].tolist() == [1]
        for _ in range(3):
            with pytest.raises(ModelNotFound):
                client.predict("no-such-model", row)
        with pytest.raises(Timeout):
            client.predict("iris", row, timeout_s=0.0001)  # 0 ms left on arrival: the broker drops it
    # NOTE: the client gives up at once, before the broker has read the call: wait for the broker's count
    wait_for(lambda: sample_sum(get(f"http://127.0.0.1:{port}/metrics"), "fractal_broker_model_requests_rejected_total",
                                model="iris.onnx", reason="deadline") == 1, 10, "the broker to count the late call")
    text = get(f"http://127.0.0.1:{port}/metrics")
    dispatched = sample_sum(text, "fractal_broker_model_requests_dispatched_total", model="iris.onnx")
    waits = sample_sum(text, "fractal_broker_model_queue_wait_seconds_count", model="iris.onnx")
    assert dispatched == waits and dispatched >= 5  # every call after the status said so (the first maybe too)
    assert dispatched <= sample_sum(text, "fractal_broker_requests_dispatched_total")
    assert "no-such-model" not in text
