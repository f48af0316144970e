"""`fractal serve`: broker, N workers, the REST and gRPC frontends on one machine, bundled models.

Before it starts anything it checks that every port it will bind is free, and it declares itself
ready only when the processes it started answer: the broker by its pid, each worker by its pid, the
HTTP server by the broker pid it reports, and the gRPC server by its port.
"""
from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from broker.client import Client
from broker.curve import PeerKeys
from broker.errors import FractalError
from broker.settings import env_name, flag_name, load, log_format_setting, setting

from .addresses import connect_host
from .gunicorn_args import WORKER_CLASS, gunicorn_argv
from .health import http_json
from .supervisor import Child, Supervisor

log = logging.getLogger("fractal.serve")

BROKER_HOST, BROKER_PORT = "127.0.0.1", 5555  # also the defaults of the client commands (fractal predict)
CHECK_INTERVAL_S = 0.1  # how often the supervisor looks for dead children: a dead broker stalls every call


@dataclass(frozen=True)
class ServeSettings:
    http_host: str = setting("127.0.0.1", "address the REST API listens on (0.0.0.0 for all)")
    http_port: int = setting(8002, "REST API port (the seed's)")
    grpc_port: int = setting(8001, "gRPC (Open Inference Protocol) port, on http_host; 0: no gRPC frontend")
    broker_host: str = setting(BROKER_HOST, "address the broker binds (0.0.0.0 to let remote workers in)")
    broker_port: int = setting(BROKER_PORT, "broker port for workers and direct clients")
    workers: int = setting(2, "worker processes (each serves the models over the broker)")
    model_dir: str = setting("./models", "model pool; created with the bundled models if missing")
    threads: int = setting(0, "ONNX Runtime threads per worker; 0 = cores / workers")
    poll_s: float = setting(0.0, "repository polling: each worker rescans the pool every poll_s seconds "
                                 "for models copied in, changed or removed by other means; 0 = off")
    http_workers: int = setting(0, "gunicorn worker processes, each an event loop with any number of requests; "
                                   "0 = one per two cores (fewer processes pack more calls per broker message)")
    http_worker_class: str = setting(WORKER_CLASS, "gunicorn worker class; an ASGI one (the default sends a "
                                                   "response in one write and cancels a request whose client "
                                                   "hangs up; uvicorn_worker.UvicornWorker does neither)")
    # NOTE: a restarted broker knows no worker until each sends its next heartbeat (then READY), and a worker
    # busy with a long run sends READY when the run ends: meanwhile requests wait for them rather than fail.
    broker_grace_s: float = setting(10.0, "how long a (re)started broker holds requests while no worker has "
                                          "registered yet (workers busy with a long run register when it ends)")
    metrics_port: int = setting(9150, "broker /metrics port; workers take the next ones; 0: no metrics at all")
    ready_timeout_s: float = setting(60.0, "how long to wait for every part to come up")
    log_level: str = setting("INFO", "logging level of every part")
    log_format: str = log_format_setting()

    def __post_init__(self) -> None:
        if self.workers < 1 or min(self.http_workers, self.threads, self.poll_s, self.broker_grace_s) < 0:
            raise ValueError("workers must be >= 1; http_workers, threads, poll_s and broker_grace_s >= 0")
        if not 0 <= self.grpc_port < 65536:
            raise ValueError("grpc_port must be a TCP port number, or 0 for no gRPC frontend")


@dataclass(frozen=True)
class FrontendAccess:
    """What the readiness check needs of the frontend's settings, read here without importing it:
    its CURVE keys (FRACTAL_FRONTEND_CURVE_*) and a token to read /api/v1/status with."""
    curve_secret_key: str = ""
    curve_broker_key: str = ""
    api_token: str = setting("", "", env="FRACTAL_API_TOKEN", secret=True)
    admin_token: str = setting("", "", env="FRACTAL_ADMIN_TOKEN", secret=True)


class PortInUse(Exception):
    """A port `fractal serve` needs is taken; the message is the one line the user sees."""


def _bindable(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        # NOTE: as gunicorn and ZeroMQ do, so a port in TIME_WAIT after a stop counts as free.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
            return True
        except OSError:
            return False


def ports(s: ServeSettings) -> list[tuple[str, int, str, str]]:
    """Every (host, port, what, setting) this server binds."""
    found = [(s.http_host, s.http_port, "the REST API", "http_port"),
             ("0.0.0.0" if s.broker_host == "*" else s.broker_host, s.broker_port, "the broker", "broker_port")]
    if s.metrics_port:
        found.append(("127.0.0.1", s.metrics_port, "the broker's metrics", "metrics_port"))
        found += [("127.0.0.1", s.metrics_port + 1 + i, f"worker-{i + 1}'s metrics", "metrics_port")
                  for i in range(s.workers)]
    if s.grpc_port:
        found.append((s.http_host, s.grpc_port, "the gRPC API", "grpc_port"))
        if s.metrics_port:
            found.append(("127.0.0.1", _grpc_metrics_port(s), "the gRPC server's metrics", "metrics_port"))
    return found


def check_ports(s: ServeSettings) -> None:
    """Raise PortInUse naming the first port that is taken (or used twice) and how to change it."""
    seen: dict[int, str] = {}
    for host, port, what, field in ports(s):
        how = f"{flag_name(field)} or {env_name('serve', field)}"
        if field == "metrics_port":
            how += " (workers take the ports after it; 0 turns metrics off)"
        if port in seen:
            raise PortInUse(f"port {port} is used twice, by {seen[port]} and {what}: change it with {how}")
        seen[port] = what
        if not 0 < port < 65536:
            raise PortInUse(f"port {port} for {what} is not a port number: change it with {how}")
        if not _bindable(host, port):
            raise PortInUse(f"port {port} on {host} ({what}) is in use, perhaps by another fractal serve: "
                            f"change it with {how}")


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


def http_workers(s: ServeSettings) -> int:
    """The frontend's process count: as set, or one per two cores.

    NOTE: calls made in one event-loop turn of one process leave as one pack (docs/protocol.md), so
    fewer, busier processes send fewer broker messages per request. Measured on 2 cores with
    bench/frontend_cpu.py at 16 connections, one process against two (alternating runs): frontend +
    broker + worker CPU per request 204-215 us against 398-404 us.
    """
    return s.http_workers or max(1, (os.cpu_count() or 1) // 2)


def _children(s: ServeSettings) -> list[Child]:
    broker_url = f"tcp://{s.broker_host}:{s.broker_port}"
    connect_url = f"tcp://{connect_host(s.broker_host)}:{s.broker_port}"
    threads = s.threads or max(1, (os.cpu_count() or 1) // s.workers)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    common = ["--log-level", s.log_level, "--log-format", s.log_format]
    children = [Child("broker", [sys.executable, "-m", "broker", "--bind", broker_url, *common,
                                 "--metrics-port", str(s.metrics_port),
                                 "--startup-grace-s", str(s.broker_grace_s)], env)]
    for i in range(s.workers):
        children.append(Child(f"worker-{i + 1}", [
            sys.executable, "-m", "worker", "--connect", connect_url, "--model-dir", s.model_dir,
            "--node-name", f"worker-{i + 1}", "--poll-s", str(s.poll_s),
            "--threads", str(threads), "--metrics-port", str(s.metrics_port and s.metrics_port + 1 + i),
            *common], env, restart=True))
    public = env_name("frontend", "public_url")  # /help's examples name this server, unless the user set it
    host = s.http_host if ":" not in s.http_host else f"[{s.http_host}]"
    host = "localhost" if s.http_host in ("127.0.0.1", "0.0.0.0", "") else host
    frontend_env = dict(env, **{public: env.get(public) or f"http://{host}:{s.http_port}",
                                env_name("frontend", "broker"): connect_url,
                                env_name("frontend", "log_level"): s.log_level,
                                "FRACTAL_LOG_FORMAT": s.log_format,
                                env_name("frontend", "metrics"): "true" if s.metrics_port else "false"})
    children.append(Child("frontend", gunicorn_argv(f"{s.http_host}:{s.http_port}", http_workers(s),
                                                   s.log_level, s.http_worker_class), frontend_env))
    if s.grpc_port:
        keys = load(FrontendAccess, "frontend")  # NOTE: the gRPC frontend is a frontend: same CURVE keys
        children.append(Child("grpc", [
            sys.executable, "-m", "frontend.oip_grpc", "--host", s.http_host, "--port", str(s.grpc_port),
            "--broker", connect_url, "--metrics-port", str(_grpc_metrics_port(s)), *common,
            "--curve-secret-key", keys.curve_secret_key, "--curve-broker-key", keys.curve_broker_key], env))
    return children


def _grpc_metrics_port(s: ServeSettings) -> int:
    """The port after the workers' (broker base, workers base + 1 ..., then gRPC)."""
    return s.metrics_port and s.metrics_port + 1 + s.workers


def _tcp_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def _ours(s: ServeSettings, supervisor: Supervisor, client: Client, token: str, seen: set[int]) -> bool:
    """True when the broker, every worker and the HTTP server that answer are the ones we started."""
    pids = {c.name: c.proc.pid for c in supervisor.children if c.proc is not None}
    status = client.broker_status(timeout_s=0.5)
    if status is None or status.get("broker", {}).get("pid") != pids["broker"]:
        return False
    workers = {pid for name, pid in pids.items() if name.startswith("worker-")}
    if not workers <= seen:
        try:
            replies = client.call_many([("status", {})] * (2 * s.workers), timeout_s=2, return_exceptions=True)
        except FractalError:  # no answer in time (a loaded machine): ask again on the next round
            return False
        seen.update(r["pid"] for r in replies if isinstance(r, dict) and "pid" in r)
        if not workers <= seen:
            return False
    answer = http_json(f"http://{connect_host(s.http_host)}:{s.http_port}/api/v1/status", token)
    return answer is not None and answer.get("broker", {}).get("pid") == pids["broker"]


def _wait_ready(s: ServeSettings, supervisor: Supervisor, stopping: threading.Event) -> bool:
    deadline = time.monotonic() + s.ready_timeout_s
    access = load(FrontendAccess, "frontend")  # with CURVE on, the readiness check uses the frontend's keys
    seen: set[int] = set()
    with Client(f"tcp://{connect_host(s.broker_host)}:{s.broker_port}",
                curve=PeerKeys.from_files(access.curve_secret_key, access.curve_broker_key)) as client:
        while time.monotonic() < deadline and not stopping.is_set():
            if supervisor.check() is not None:
                return False
            if (_ours(s, supervisor, client, access.api_token or access.admin_token, seen)
                    and (not s.grpc_port or _tcp_open(connect_host(s.http_host), s.grpc_port))):
                return True
            stopping.wait(0.1)
    return False


def _metrics_line(s: ServeSettings) -> str:
    line = f"metrics: frontend http://{s.http_host}:{s.http_port}/metrics"
    if s.metrics_port:
        workers = ", ".join(f"http://127.0.0.1:{s.metrics_port + 1 + i}/metrics" for i in range(s.workers))
        line += f", broker http://127.0.0.1:{s.metrics_port}/metrics, workers {workers}"
        if s.grpc_port:
            line += f", grpc http://127.0.0.1:{_grpc_metrics_port(s)}/metrics"
    return line + f"; status http://{s.http_host}:{s.http_port}/status"


def serve(s: ServeSettings) -> int:
    """Run everything until SIGINT/SIGTERM; returns the exit code (2: a port is taken)."""
    try:
        check_ports(s)
    except PortInUse as exc:
        print(f"fractal serve: {exc}", file=sys.stderr, flush=True)
        return 2
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
        grpc_text = f"gRPC {s.http_host}:{s.grpc_port}, " if s.grpc_port else ""
        banner = (f"FRACTAL ML Server ready: http://{s.http_host}:{s.http_port}/  ({grpc_text}"
                  f"broker tcp://{s.broker_host}:{s.broker_port}, {s.workers} workers, models in "
                  f"{Path(s.model_dir).resolve()}). Ctrl-C stops it.\n{_metrics_line(s)}")
        if s.log_format == "json":  # NOTE: every line one JSON object, as asked; the banner too
            log.info(banner)
        else:
            print(banner, flush=True)
        while not stopping.wait(CHECK_INTERVAL_S):
            supervisor.check(restart_all=True)
        return code
    finally:
        log.info("stopping")
        supervisor.stop()
        log.info("stopped")
