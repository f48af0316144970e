"""`fractal serve`: broker, N modelhost workers and the REST frontend on one machine, bundled models."""
from __future__ import annotations

import logging
import os
import shutil
import signal
import sys
import threading
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from broker.client import Client
from broker.curve import PeerKeys
from broker.settings import env_name, load, setting

from .gunicorn_args import gunicorn_argv
from .health import http_ok
from .supervisor import Child, Supervisor

log = logging.getLogger("fractal.serve")

BROKER_HOST, BROKER_PORT = "127.0.0.1", 5555  # also the defaults of the client commands (fractal predict)


@dataclass(frozen=True)
class ServeSettings:
    http_host: str = setting("127.0.0.1", "address the REST API listens on (0.0.0.0 for all)")
    http_port: int = setting(8002, "REST API port (the seed's)")
    broker_host: str = setting(BROKER_HOST, "address the broker binds (0.0.0.0 to let remote workers in)")
    broker_port: int = setting(BROKER_PORT, "broker port for workers and direct clients")
    workers: int = setting(2, "modelhost worker processes")
    model_dir: str = setting("./models", "model pool; created with the bundled models if missing")
    threads: int = setting(0, "ONNX Runtime threads per worker; 0 = cores / workers")
    http_workers: int = setting(2, "gunicorn worker processes")
    http_threads: int = setting(8, "threads per gunicorn worker (gthread); they mostly wait on the broker")
    http_worker_class: str = setting("gthread", "gunicorn worker class (gthread, sync, ...)")
    metrics_port: int = setting(9150, "broker /metrics port; workers take the next ones; 0: no metrics at all")
    ready_timeout_s: float = setting(60.0, "how long to wait for every part to come up")
    log_level: str = setting("INFO", "logging level of every part")

    def __post_init__(self) -> None:
        if self.workers < 1 or self.http_workers < 1 or self.http_threads < 1 or self.threads < 0:
            raise ValueError("workers, http_workers and http_threads must be >= 1; threads >= 0")


@dataclass(frozen=True)
class FrontendCurve:
    """The frontend's CURVE settings (FRACTAL_FRONTEND_CURVE_*), read here without importing it."""
    curve_secret_key: str = ""
    curve_broker_key: str = ""


def prepare_model_dir(model_dir: Path) -> None:
    """Create the pool with the bundled models the first time; never touch an existing one."""
    if model_dir.exists():
        return
    model_dir.mkdir(parents=True)
    bundled = resources.files("worker") / "models"
    for item in bundled.iterdir():
        if item.name.endswith((".onnx", ".onnx.json", ".png")):  # the PNG: /help's image example
            with resources.as_file(item) as src:
                shutil.copyfile(src, model_dir / item.name)
    log.info("created %s with the bundled models", model_dir)


def _children(s: ServeSettings) -> list[Child]:
    broker_url = f"tcp://{s.broker_host}:{s.broker_port}"
    connect_url = f"tcp://{'127.0.0.1' if s.broker_host in ('0.0.0.0', '*') else s.broker_host}:{s.broker_port}"
    threads = s.threads or max(1, (os.cpu_count() or 1) // s.workers)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    common = ["--log-level", s.log_level]
    children = [Child("broker", [sys.executable, "-m", "broker", "--bind", broker_url, *common,
                                 "--metrics-port", str(s.metrics_port)], env)]
    for i in range(s.workers):
        children.append(Child(f"worker-{i + 1}", [
            sys.executable, "-m", "worker", "--connect", connect_url, "--model-dir", s.model_dir,
            "--threads", str(threads), "--metrics-port", str(s.metrics_port and s.metrics_port + 1 + i),
            *common], env, restart=True))
    frontend_env = dict(env, **{env_name("frontend", "broker"): connect_url,
                                env_name("frontend", "log_level"): s.log_level,
                                env_name("frontend", "metrics"): "true" if s.metrics_port else "false"})
    children.append(Child("frontend", gunicorn_argv(f"{s.http_host}:{s.http_port}", s.http_workers,
                                                   s.http_threads, s.log_level, s.http_worker_class), frontend_env))
    return children


def _wait_ready(s: ServeSettings, supervisor: Supervisor, stopping: threading.Event) -> bool:
    deadline = time.monotonic() + s.ready_timeout_s
    host = "127.0.0.1" if s.http_host in ("0.0.0.0", "") else s.http_host
    broker = f"tcp://{'127.0.0.1' if s.broker_host in ('0.0.0.0', '*') else s.broker_host}:{s.broker_port}"
    keys = load(FrontendCurve, "frontend")  # with CURVE on, the readiness check uses the frontend's keys
    with Client(broker, curve=PeerKeys.from_files(keys.curve_secret_key, keys.curve_broker_key)) as client:
        while time.monotonic() < deadline and not stopping.is_set():
            if supervisor.check() is not None:
                return False
            if client.service_ready(timeout_s=0.5) and http_ok(f"http://{host}:{s.http_port}/"):
                return True
            stopping.wait(0.1)
    return False


def _metrics_line(s: ServeSettings) -> str:
    line = f"metrics: frontend http://{s.http_host}:{s.http_port}/metrics"
    if s.metrics_port:
        workers = ", ".join(f"http://127.0.0.1:{s.metrics_port + 1 + i}/metrics" for i in range(s.workers))
        line += f", broker http://127.0.0.1:{s.metrics_port}/metrics, workers {workers}"
    return line + f"; status http://{s.http_host}:{s.http_port}/status"


def serve(s: ServeSettings) -> int:
    """Run everything until SIGINT/SIGTERM; returns the exit code."""
    prepare_model_dir(Path(s.model_dir))
    stopping = threading.Event()
    signal.signal(signal.SIGINT, lambda *_: stopping.set())
    signal.signal(signal.SIGTERM, lambda *_: stopping.set())
    supervisor = Supervisor()
    code = 0
    try:
        for child in _children(s):
            supervisor.start(child)
        if not _wait_ready(s, supervisor, stopping):
            if not stopping.is_set():
                log.error("FRACTAL ML Server did not come up within %.0f s", s.ready_timeout_s)
                code = 1
            return code
        print(f"FRACTAL ML Server ready: http://{s.http_host}:{s.http_port}/  "
              f"(broker tcp://{s.broker_host}:{s.broker_port}, {s.workers} workers, models in "
              f"{Path(s.model_dir).resolve()}). Ctrl-C stops it.\n{_metrics_line(s)}", flush=True)
        while not stopping.wait(0.5):
            dead = supervisor.check()
            if dead is not None:
                log.error("%s is down: stopping FRACTAL ML Server", dead)
                code = 1
                break
        return code
    finally:
        log.info("stopping")
        supervisor.stop()
        log.info("stopped")
