"""`fractal health [ROLE]`: exit 0 when this host's ROLE answers, 1 when not (container healthchecks).

The role defaults to the one the container entrypoint recorded. Each check uses the component's own
settings (flags' env variables and defaults), so it probes the port the component really uses.
"""
from __future__ import annotations

import socket
import urllib.request
from pathlib import Path

from broker.settings import load

ROLE_FILE = Path("/tmp/fractal-role")


def _local(endpoint: str) -> str:
    """A bind endpoint (tcp://0.0.0.0:5555, tcp://*:5555) as an address to connect to on this host."""
    return endpoint.replace("0.0.0.0", "127.0.0.1").replace("*", "127.0.0.1")


def _tcp_open(endpoint: str) -> bool:
    host, _, port = endpoint.removeprefix("tcp://").rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=3):
            return True
    except (OSError, ValueError):
        return False


def http_ok(url: str) -> bool:
    """True when GET url answers 200 within 3 s."""
    try:
        with urllib.request.urlopen(url, timeout=3) as resp:
            return resp.status == 200
    except OSError:
        return False


def check(role: str, http_port: int = 8002) -> bool:
    if role == "broker":
        from broker.broker import BrokerSettings
        from broker.client import Client
        settings = load(BrokerSettings, "broker")
        if settings.curve_secret_key:
            return _tcp_open(_local(settings.bind))  # a CURVE broker admits only listed keys
        with Client(_local(settings.bind), timeout_s=3) as client:
            return client.broker_status(timeout_s=3) is not None  # any MMI answer: the loop is alive
    if role == "worker":
        from worker.modelhost import WorkerSettings
        settings = load(WorkerSettings, "worker")
        if settings.metrics_port == 0:
            return True  # nothing to ask; the container runtime already knows the process is alive
        return http_ok(f"http://127.0.0.1:{settings.metrics_port}/metrics")
    if role == "frontend":
        return http_ok(f"http://127.0.0.1:{http_port}/v2/health/live")
    if role == "serve":
        from .serve import ServeSettings
        return http_ok(f"http://127.0.0.1:{load(ServeSettings, 'serve').http_port}/v2/health/ready")
    raise SystemExit(f"fractal health: unknown role {role!r} (broker, worker, frontend, serve)")


def main(argv: list[str]) -> int:
    if argv and argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0
    role = argv[0] if argv else (ROLE_FILE.read_text().strip() if ROLE_FILE.exists() else "serve")
    port = int(argv[1]) if len(argv) > 1 else 8002
    healthy = check(role, port)
    print(f"{role}: {'healthy' if healthy else 'unhealthy'}")
    return 0 if healthy else 1
