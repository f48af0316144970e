"""Process fixtures: real brokers, workers and servers on free local ports, cleaned up after each test."""
from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Callable, Iterator

import pytest

from broker.client import Client

REPO = Path(__file__).resolve().parent.parent
BUNDLED = REPO / "worker" / "models"
# Fast heartbeats so failure detection takes well under a second in tests.
HEARTBEAT = ["--heartbeat-interval-s", "0.2", "--heartbeat-liveness", "3"]
# No metrics ports (tests that want /metrics pass free ones); status polls only where a test waits for them.
QUIET_BROKER = ["--metrics-port", "0", "--status-interval-s", "3600"]
QUIET_WORKER = ["--metrics-port", "0"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def debian_tool(command: str, package: str) -> str:
    """Path of `command`, installing Debian's `package` when it is missing (root only).

    The tests that need it fail, not skip, when it cannot be had: the checks are the point.
    """
    if shutil.which(command) is None:
        if os.geteuid() != 0:
            pytest.fail(f"{command} missing; install Debian's '{package}' package (needs root)")
        for argv in (["apt-get", "update", "-qq"],
                     ["apt-get", "install", "-y", "-qq", "--no-install-recommends", package]):
            subprocess.run(argv, check=True, capture_output=True, timeout=600,
                           env=dict(os.environ, DEBIAN_FRONTEND="noninteractive"))
    return shutil.which(command)


@contextlib.contextmanager
def dealer(url: str) -> Iterator:
    """A bare DEALER socket on `url`, for frames our client would never send."""
    import zmq
    ctx = zmq.Context()
    try:
        sock = ctx.socket(zmq.DEALER)
        sock.linger = 0
        sock.connect(url)
        yield sock
    finally:
        ctx.destroy(linger=0)


def free_ports(count: int) -> int:
    """The first of `count` consecutive free ports (fractal serve gives workers base + 1, + 2, ...)."""
    for _ in range(50):
        base = free_port()
        if base + count < 65536 and all(_port_free(base + i) for i in range(1, count)):
            return base
    raise RuntimeError(f"no {count} consecutive free ports")


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def wait_for(predicate: Callable[[], bool], timeout_s: float, what: str, interval_s: float = 0.05) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval_s)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


class Processes:
    """Starts components as subprocesses with logs in tmp_path; stops every one of them at teardown."""

    def __init__(self, tmp_path: Path):
        self.tmp_path = tmp_path
        self.procs: list[subprocess.Popen] = []

    def start(self, name: str, argv: list[str], env: dict | None = None) -> subprocess.Popen:
        log = open(self.tmp_path / f"{name}-{len(self.procs)}.log", "wb")
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, cwd=self.tmp_path,
                                env=dict(os.environ, **(env or {})), start_new_session=True)
        log.close()
        proc.log_path = log.name
        self.procs.append(proc)
        return proc

    def broker(self, url: str, *flags: str) -> subprocess.Popen:
        return self.start("broker", [sys.executable, "-m", "broker", "--bind", url, *HEARTBEAT, *QUIET_BROKER,
                                     *flags])

    def worker(self, url: str, model_dir: Path, *flags: str) -> subprocess.Popen:
        return self.start("worker", [sys.executable, "-m", "worker", "--connect", url,
                                     "--model-dir", str(model_dir), *HEARTBEAT, *QUIET_WORKER, *flags])

    def stop_all(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[Processes]:
    p = Processes(tmp_path)
    yield p
    p.stop_all()


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    target = tmp_path / "models"
    target.mkdir()
    for item in BUNDLED.iterdir():
        if item.name.endswith((".onnx", ".onnx.json")):
            shutil.copyfile(item, target / item.name)
    return target


@pytest.fixture
def broker_url(procs: Processes) -> str:
    url = f"tcp://127.0.0.1:{free_port()}"
    procs.broker(url)
    return url


def nodes_answering(client: Client, count: int) -> set[str]:
    from broker.errors import NoWorkerAvailable
    try:
        replies = client.call_many([("echo", {"data": i}) for i in range(count)], timeout_s=5,
                                   return_exceptions=True)
    except NoWorkerAvailable:  # NOTE: a broker still starting on a loaded machine: not up yet, ask again
        return set()
    return {r["node"] for r in replies if isinstance(r, dict)}


def wait_workers(url: str, n: int, timeout_s: float = 20) -> None:
    """Until n distinct workers answer echoes (the broker's LRU spreads sequential calls)."""
    with Client(url, timeout_s=5) as client:
        wait_for(lambda: len(nodes_answering(client, 2 * n)) >= n, timeout_s, f"{n} workers to register")


@pytest.fixture
def cluster(procs: Processes, broker_url: str, model_dir: Path) -> dict:
    """A broker and two workers over a copy of the bundled models."""
    workers = [procs.worker(broker_url, model_dir) for _ in range(2)]
    wait_workers(broker_url, 2)
    return {"url": broker_url, "workers": workers, "model_dir": model_dir}


@pytest.fixture
def client(cluster: dict) -> Iterator[Client]:
    with Client(cluster["url"], timeout_s=10) as c:
        yield c


class Served:
    """`fractal serve` on free ports, logging to a file (a pipe nobody drains would block it)."""

    def __init__(self, workdir: Path, env: dict | None = None, *flags: str):
        self.http_port, self.broker_port = free_port(), free_port()
        self.pool = workdir / "pool"
        self.log_path = workdir / "serve.log"
        self.base = f"http://127.0.0.1:{self.http_port}"
        self.broker_url = f"tcp://127.0.0.1:{self.broker_port}"
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "fractal", "serve", "--http-port", str(self.http_port),
                 "--broker-port", str(self.broker_port), "--model-dir", str(self.pool),
                 "--metrics-port", "0", *flags],  # NOTE: a later --metrics-port in flags wins
                cwd=workdir, stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ, **(env or {})))
        wait_for(lambda: "ready:" in self.log() or self.proc.poll() is not None, 60, "fractal serve")
        assert self.proc.poll() is None, self.log()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        try:
            return self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise


def start_frontend(procs: Processes, broker_url: str, **env: str) -> str:
    """gunicorn running the frontend alone, pointed at `broker_url`; returns its base URL."""
    port = free_port()
    procs.start("frontend", [sys.executable, "-m", "fractal", "frontend", "--bind", f"127.0.0.1:{port}",
                             "--workers", "1", "--worker-class", "gthread", "--threads", "4"],
                env={"FRACTAL_FRONTEND_BROKER": broker_url, **env})
    base = f"http://127.0.0.1:{port}"

    def up() -> bool:
        try:
            with urllib.request.urlopen(base + "/", timeout=1):
                return True
        except OSError:
            return False
    wait_for(up, 30, "gunicorn")
    return base
