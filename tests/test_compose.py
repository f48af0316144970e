"""The real docker-compose.yml, run for real: the image built by deploy/build_local_image.py, the Debian
docker-compose client, podman's Docker-compatible service on a socket in a temporary folder.

Only compose's own variables change: the images (FRACTAL_IMAGE, FRACTAL_PROMETHEUS_IMAGE, the local
builds: no registry here) and the published ports (free ones). Root only: podman needs it on this
machine kind, and the build installs Debian packages; skipped, with the reason, when podman cannot run.

Podman runs HEALTHCHECKs from systemd timers, and this machine kind has no systemd, so the test does
the timer's job: every TICK_S it runs `podman healthcheck run` on each container of the project,
which executes the image's or compose file's own HEALTHCHECK command and records the result.
"""
from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest

from .harness import REPO, free_port, wait_for
from .onnx_models import SLOW_ATOL, slow_expected, slow_model, slow_steps

# NOTE: a cold build (Debian packages, base image) takes minutes
pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

SERVICES = ("broker", "broker2", "worker", "frontend", "prometheus")
TICK_S = 2.0
UP_TIMEOUT_S = 240
IRIS_ROW = {"values": [2, 5, 1, 4]}


def _load_builder():
    spec = importlib.util.spec_from_file_location("build_local_image", REPO / "deploy" / "build_local_image.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@dataclass
class Stack:
    project: str
    env: dict  # podman's (CONTAINERS_CONF) plus compose's (DOCKER_HOST, images, ports)
    http_port: int
    prometheus_port: int
    up_to_healthy_s: float = 0.0
    figures: dict = field(default_factory=dict)

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def compose(self, *args: str, timeout_s: float = UP_TIMEOUT_S) -> str:
        result = subprocess.run(["docker-compose", "-p", self.project, "-f", str(REPO / "docker-compose.yml"),
                                 *args], env=self.env, cwd=REPO, capture_output=True, text=True, timeout=timeout_s)
        assert result.returncode == 0, f"docker-compose {' '.join(args)}: {result.stdout}\n{result.stderr}"
        return result.stdout

    def podman(self, *args: str, check: bool = True, timeout_s: float = 60) -> str:
        result = subprocess.run(["podman", *args], env=self.env, capture_output=True, text=True, timeout=timeout_s)
        if check:
            assert result.returncode == 0, f"podman {' '.join(args)}: {result.stderr}"
        return result.stdout

    def containers(self) -> list[dict]:
        """Every container of the project: name, service, state and health."""
        ids = self.podman("ps", "-aq", "--filter", f"label=com.docker.compose.project={self.project}").split()
        if not ids:
            return []
        found = []
        for info in json.loads(self.podman("inspect", *ids, check=False) or "[]"):
            state = info["State"]
            health = (state.get("Health") or state.get("Healthcheck") or {}).get("Status", "")
            found.append({"id": info["Id"], "name": info["Name"].lstrip("/"), "state": state["Status"],
                          "health": health, "hostname": info["Config"]["Hostname"],
                          "service": info["Config"]["Labels"].get("com.docker.compose.service")})
        return found

    def healthy(self, service: str, count: int) -> bool:
        mine = [c for c in self.containers() if c["service"] == service]
        return len(mine) == count and all(c["state"] == "running" and c["health"] == "healthy" for c in mine)

    def all_healthy(self, workers: int) -> bool:
        return all(self.healthy(s, workers if s == "worker" else 1) for s in SERVICES)


class HealthTicker(threading.Thread):
    """systemd's healthcheck timer for the project's containers (see the module docstring)."""

    def __init__(self, stack: Stack):
        super().__init__(daemon=True)
        self.stack, self.stopped = stack, threading.Event()

    def run(self) -> None:
        while not self.stopped.wait(TICK_S):
            for container in self.stack.containers():
                if container["state"] == "running":
                    self.stack.podman("healthcheck", "run", container["id"], check=False, timeout_s=30)


def request(stack: Stack, method: str, path: str, body: bytes | None = None,
            content_type: str = "application/json", timeout_s: float = 40) -> tuple[int, dict]:
    req = urllib.request.Request(stack.base + path, data=body, method=method, headers={"Content-Type": content_type})
    try:
        with urllib.request.urlopen(req, timeout=timeout_s) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"{}")


def tolerant(predicate):
    """predicate, with a connection error (a service still starting) meaning False."""
    def wrapped() -> bool:
        try:
            return predicate()
        except OSError:
            return False
    return wrapped


def prometheus(stack: Stack, path: str) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{stack.prometheus_port}{path}", timeout=10) as resp:
        return json.loads(resp.read())["data"]


def query(stack: Stack, promql: str) -> list[dict]:
    return prometheus(stack, "/api/v1/query?query=" + urllib.request.quote(promql))["result"]


@contextlib.contextmanager
def podman_service(env: dict, folder: Path) -> Iterator[str]:
    """`podman system service` on a socket in folder; ended by its PID."""
    sock = folder / "podman.sock"
    log = open(folder / "podman-service.log", "wb")
    proc = subprocess.Popen(["podman", "system", "service", "--time=0", f"unix://{sock}"], env=env,
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    log.close()
    try:
        def answers() -> bool:
            with socket.socket(socket.AF_UNIX) as s:
                try:
                    s.connect(str(sock))
                    return True
                except OSError:
                    return False
        wait_for(answers, 30, "podman's API socket", interval_s=0.2)
        yield f"unix://{sock}"
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def remove_leftovers(stack: Stack) -> None:
    """What `down -v` should have removed, removed by label, whatever state the test left it in."""
    label = f"label=com.docker.compose.project={stack.project}"
    ids = stack.podman("ps", "-aq", "--filter", label, check=False).split()
    if ids:
        stack.podman("rm", "-f", "-t", "0", *ids, check=False)
    for kind in ("volume", "network"):
        names = stack.podman(kind, "ls", "-q", "--filter", label, check=False).split()
        if names:
            stack.podman(kind, "rm", "-f", *names, check=False)


def remove_stale_projects(env: dict) -> None:
    """Stacks of earlier runs whose test process died before its clean-up (SIGKILL, power loss)."""
    out = subprocess.run(["podman", "ps", "-a", "--filter", "label=com.docker.compose.project",
                          "--format", '{{index .Labels "com.docker.compose.project"}}'], env=env,
                         capture_output=True, text=True, timeout=60).stdout
    for project in set(out.split()):
        match = re.fullmatch(r"fractaltest(\d+)", project)
        if match and not Path(f"/proc/{match.group(1)}").exists():
            remove_leftovers(Stack(project=project, env=env, http_port=0, prometheus_port=0))


@pytest.fixture(scope="module")
def stack(tmp_path_factory) -> Iterator[Stack]:
    if os.geteuid() != 0:
        pytest.skip("podman needs root on this machine kind (runc, netavark, Debian packages)")
    builder = _load_builder()
    folder = tmp_path_factory.mktemp("compose")
    started = time.monotonic()
    try:
        built = builder.build_all(folder)
    except builder.Unavailable as exc:
        pytest.skip(f"podman cannot run here: {exc}")
    build_s = time.monotonic() - started
    env = builder.containers_conf(folder)
    remove_stale_projects(env)
    with podman_service(env, folder) as docker_host:
        s = Stack(project=f"fractaltest{os.getpid()}", http_port=free_port(), prometheus_port=free_port(),
                  env=dict(env, DOCKER_HOST=docker_host, FRACTAL_IMAGE=built.image,
                           FRACTAL_PROMETHEUS_IMAGE=built.prometheus_image))
        s.env.update(FRACTAL_HTTP_PORT=str(s.http_port), FRACTAL_PROMETHEUS_PORT=str(s.prometheus_port),
                     COMPOSE_HTTP_TIMEOUT="120")
        s.figures.update(image_mb=round(built.image_bytes / 1e6), build_s=round(build_s, 1),
                         base_s=built.base_seconds, wheelhouse_s=built.wheelhouse_seconds,
                         podman_build_s=built.build_seconds)
        ticker = HealthTicker(s)
        ticker.start()
        try:
            started = time.monotonic()
            s.compose("up", "-d", "--no-build")
            wait_for(lambda: s.all_healthy(workers=2), UP_TIMEOUT_S, "every service healthy", interval_s=1)
            s.up_to_healthy_s = time.monotonic() - started
            yield s
        finally:
            with contextlib.suppress(Exception):
                s.compose("down", "-v", "--remove-orphans", "-t", "5", timeout_s=120)
            ticker.stopped.set()
            ticker.join(timeout=60)
            remove_leftovers(s)
            print(f"\ncompose figures: {json.dumps(dict(s.figures, up_to_healthy_s=round(s.up_to_healthy_s, 1)))}")
    shutil.rmtree(folder, ignore_errors=True)


def test_every_service_comes_up_healthy(stack):
    names = sorted(c["name"] for c in stack.containers())
    p = stack.project
    assert names == sorted([f"{p}_broker_1", f"{p}_broker2_1", f"{p}_frontend_1", f"{p}_prometheus_1",
                            f"{p}_worker_1", f"{p}_worker_2"])
    assert stack.all_healthy(workers=2)
    user = stack.podman("exec", f"{p}_worker_1", "id", "-u").strip()
    assert user != "0"  # the image is non-root


def test_the_image_can_trace(stack):
    """The image has the otel extra: in a running container, tracing switches on with the OTLP exporter
    (what FRACTAL_TRACING=true does in a worker or frontend), then off again; nothing is sent."""
    check = ("from metrics import tracing; on = tracing.configure('check', True, env={}); tracing.shutdown(); "
             "print(on)")
    assert stack.podman("exec", f"{stack.project}_worker_1", "python3", "-c", check).strip() == "True"


def test_the_seeds_curls_and_a_triton_client_answer_through_the_published_port(stack):
    def curl(*args: str) -> dict:
        out = subprocess.run(["curl", "-s", "--fail", *args], capture_output=True, timeout=30, check=True)
        return json.loads(out.stdout)

    welcome = curl(stack.base + "/")  # the seed's: curl http://localhost:8002/
    assert welcome["http_status"]["code"] == 200 and welcome["http_status"]["name"] == "OK"
    assert curl("-X", "GET", "-H", "Content-Type: application/json", "--data", '{"values":[2, 5, 1, 4]}',
                f"{stack.base}/api/v1/models/iris.onnx/prediction")["values"] == [1]

    import tritonclient.http as triton
    client = triton.InferenceServerClient(f"127.0.0.1:{stack.http_port}")
    try:
        x = triton.InferInput("float_input", [1, 4], "FP32")
        x.set_data_from_numpy(np.array([[2, 5, 1, 4]], np.float32), binary_data=True)
        assert client.infer("iris.onnx", [x]).as_numpy("label").tolist() == [1]
    finally:
        client.close()


def test_prometheus_in_the_stack_scrapes_every_component(stack):
    def targets() -> list[dict]:
        return prometheus(stack, "/api/v1/targets?state=active")["activeTargets"]

    def all_up() -> bool:
        found = targets()
        jobs = sorted(t["labels"]["job"] for t in found)
        return jobs == ["fractal-broker", "fractal-broker", "fractal-frontend", "fractal-worker",
                        "fractal-worker", "prometheus"] and all(t["health"] == "up" for t in found)

    wait_for(tolerant(all_up), 60, "every Prometheus target up", interval_s=1)
    assert len(query(stack, "fractal_worker_memory_rss_bytes")) == 2  # one series per worker replica


def test_a_model_uploaded_through_the_frontend_is_served_by_every_worker(stack):
    """The pool is one shared volume: a model uploaded through one worker is served by the other too.
    With the broker's placement the worker that stored it holds it and takes its calls while idle;
    two calls at once, each longer than placement_wait_s, make the other one load it from the volume."""
    name = "uploaded-slow.onnx"
    status, body = request(stack, "PUT", f"/api/v1/models/{name}", slow_model(),
                           content_type="application/octet-stream")
    assert status in (200, 201), body
    steps = [slow_steps(0.6) + i for i in range(2)]  # NOTE: past placement_wait_s (0.5 s), well within 30 s
    answers: dict = {}

    def predict(k: int) -> None:
        started = time.monotonic()
        answers[k] = request(stack, "POST", f"/api/v1/models/{name}/prediction", json.dumps({"values": [k]}).encode())
        answers[k] = (*answers[k], round(time.monotonic() - started, 2))
    calls = [threading.Thread(target=predict, args=(k,)) for k in steps]
    for t in calls:
        t.start()
    for t in calls:
        t.join(timeout=60)
    for k in steps:
        status, body, took_s = answers[k]
        assert status == 200, (body, took_s, steps)
        np.testing.assert_allclose(np.ravel(body["values"]), [slow_expected(k)], atol=SLOW_ATOL)

    def every_worker_ran_it() -> bool:
        series = query(stack, f'fractal_worker_inference_seconds_count{{model="{name}"}}')
        return len(series) == 2 and all(float(s["value"][1]) > 0 for s in series)
    wait_for(tolerant(every_worker_ran_it), 30, f"both workers' metrics showing {name}", interval_s=1)


def test_scaling_to_three_workers_adds_one_that_takes_requests(stack):
    before = {c["name"]: c["id"] for c in stack.containers()}
    stack.compose("up", "-d", "--no-build", "--scale", "worker=3")
    wait_for(lambda: stack.all_healthy(workers=3), UP_TIMEOUT_S, "three healthy workers", interval_s=1)
    after = {c["name"]: c["id"] for c in stack.containers()}
    assert {n: after[n] for n in before} == before  # nothing was recreated, one worker was added
    hosts = {c["hostname"] for c in stack.containers() if c["service"] == "worker"}

    def nodes() -> set[str]:
        echo = json.dumps({"data": list(range(12))}).encode()
        status, body = request(stack, "POST", "/api/test/sendtomodelhost", echo)
        assert status == 200, body
        return {item["node"].split("-")[0] for item in body["data"]}  # node ids start with the hostname
    wait_for(tolerant(lambda: nodes() == hosts), 30, "echoes answered by all three workers", interval_s=0.5)


def kill_under_load(stack, container: str, settle_s: float) -> tuple[int, int, list]:
    """Three threads of iris predictions; SIGKILL `container` 2 s in, load on for `settle_s` more.
    Returns (answered before the kill, answered right in all, what failed)."""
    stop, results, lock = threading.Event(), {"ok": 0, "failed": []}, threading.Lock()

    def load() -> None:
        for _ in range(5000):  # bounded in count, and in time by `stop`
            if stop.is_set():
                return
            try:
                outcome = request(stack, "POST", "/api/v1/models/iris.onnx/prediction",
                                  json.dumps(IRIS_ROW).encode())
            except OSError as exc:
                outcome = (0, {"error": repr(exc)})
            with lock:
                if outcome[0] == 200 and outcome[1].get("values") == [1]:
                    results["ok"] += 1
                else:
                    results["failed"].append(outcome)

    threads = [threading.Thread(target=load) for _ in range(3)]
    for t in threads:
        t.start()
    try:
        time.sleep(2)
        with lock:
            before_kill = results["ok"]
        stack.podman("kill", "--signal", "KILL", f"{stack.project}_{container}")
        time.sleep(settle_s)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=60)
    return before_kill, results["ok"], results["failed"]


def test_a_worker_killed_under_load_loses_no_request(stack):
    """SIGKILL, no goodbye: the broker notices the silence (heartbeat 2.5 s x 3) and re-sends."""
    # 12 s: past the broker's liveness window, so the lost worker's request was re-sent
    before_kill, ok, failed = kill_under_load(stack, "worker_1", 12)
    stack.figures.update(load_requests=ok + len(failed), lost_requests=len(failed))
    assert failed == []
    assert before_kill > 0 and ok > before_kill

    def broker_saw_the_death() -> bool:  # the kill really took a registered worker away
        return sum(float(s["value"][1]) for s in query(stack, "fractal_broker_worker_deaths_total")) >= 1
    wait_for(tolerant(broker_saw_the_death), 30, "the broker counting the dead worker", interval_s=1)
    resent = query(stack, "sum(fractal_broker_requests_redispatched_total)")
    stack.figures["redispatched"] = float(resent[0]["value"][1]) if resent else 0.0


def test_the_first_broker_killed_under_load_loses_no_request(stack):
    """The frontend's current broker SIGKILLed: it fails over to broker2, where the workers are registered."""
    before_kill, ok, failed = kill_under_load(stack, "broker_1", 5)
    stack.figures.update(broker_kill_requests=ok + len(failed))
    assert failed == []
    assert before_kill > 0 and ok > before_kill  # answered through broker2 after the kill


def test_down_removes_every_container_and_volume(stack):
    label = f"label=com.docker.compose.project={stack.project}"
    assert stack.podman("volume", "ls", "-q", "--filter", label).split()  # there is something to remove
    stack.compose("down", "-v", "-t", "5")
    assert stack.containers() == []
    assert stack.podman("volume", "ls", "-q", "--filter", label).split() == []
    assert stack.podman("network", "ls", "-q", "--filter", label).split() == []
