"""`fractal health [ROLE [HTTP_PORT]]`: exit 0 when this host's ROLE answers, 1 when not (healthchecks).

The role defaults to the one the container entrypoint recorded. Each check uses the component's own
settings (flags' env variables and defaults), so it probes the port the component really uses, and
it prints what it checked and, when unhealthy, why.
"""
from __future__ import annotations

import json
import socket
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import NamedTuple

from broker.settings import load

from .addresses import connect_endpoint

ROLE_FILE = Path("/tmp/fractal-role")
TIMEOUT_S = 3.0


class Outcome(NamedTuple):
    healthy: bool
    checked: str        # what was asked, e.g. "GET http://127.0.0.1:8002/v2/health/ready"
    reason: str = ""    # why it is unhealthy, in words


def _tcp(endpoint: str) -> str:
    """"" when a TCP connection to endpoint opens, else why not."""
    host, _, port = endpoint.removeprefix("tcp://").rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=TIMEOUT_S):
            return ""
    except ConnectionRefusedError:
        return "connection refused: nothing listens there"
    except (OSError, ValueError) as exc:
        return f"cannot connect: {exc}"


def http_get(url: str, token: str = "") -> tuple[int | None, bytes, str]:
    """(status, body, "") when url answers within TIMEOUT_S, else (None, b"", why not)."""
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(req, timeout=TIMEOUT_S) as resp:
            return resp.status, resp.read(), ""
    except urllib.error.HTTPError as err:
        return err.code, err.read(), ""
    except urllib.error.URLError as err:
        if isinstance(err.reason, ConnectionRefusedError):
            return None, b"", "connection refused: nothing listens there"
        return None, b"", f"no answer: {err.reason}"
    except OSError as exc:  # a timeout reading the answer
        return None, b"", f"no answer within {TIMEOUT_S:g} s ({exc})"


def http_ok(url: str) -> bool:
    """True when GET url answers 200 within TIMEOUT_S."""
    return http_get(url)[0] == 200


def http_json(url: str, token: str = "") -> dict | None:
    """The JSON object GET url answers with 200, else None."""
    status, body, _ = http_get(url, token)
    if status != 200:
        return None
    try:
        value = json.loads(body)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def _http_outcome(url: str, hint: str) -> Outcome:
    status, body, why = http_get(url)
    checked = f"GET {url}"
    if status == 200:
        return Outcome(True, checked)
    if status is None:
        return Outcome(False, checked, f"{why}; {hint}")
    try:
        detail = json.loads(body)
        detail = detail.get("error") or detail.get("http_status", {}).get("description") or ""
    except (ValueError, AttributeError):
        detail = ""
    return Outcome(False, checked, f"answered {status}" + (f": {detail}" if detail else ""))


def check(role: str, http_port: int | None = None) -> Outcome:
    """Ask ROLE on this host; `http_port` is the frontend's or serve's (default: 8002, or serve's setting)."""
    if role == "broker":
        from broker.broker import BrokerSettings
        from broker.client import Client
        broker_settings = load(BrokerSettings, "broker")
        endpoint = connect_endpoint(broker_settings.bind)
        hint = "is the broker running? (its address: FRACTAL_BROKER_BIND)"
        if broker_settings.curve_secret_key:  # a CURVE broker admits only listed keys: an open port will do
            why = _tcp(endpoint)
            return Outcome(not why, f"TCP {endpoint}", f"{why}; {hint}" if why else "")
        with Client(endpoint, timeout_s=TIMEOUT_S) as client:
            answered = client.broker_status(timeout_s=TIMEOUT_S) is not None  # any MMI answer: the loop is alive
        if answered:
            return Outcome(True, f"MMI mmi.workers at {endpoint}")
        why = _tcp(endpoint) or "the port is open but no broker answered"
        return Outcome(False, f"MMI mmi.workers at {endpoint}", f"no answer within {TIMEOUT_S:g} s: {why}; {hint}")
    if role == "worker":
        from worker.settings import WorkerSettings
        settings = load(WorkerSettings, "worker")
        if settings.metrics_port == 0:  # nothing to ask; the container runtime knows the process is alive
            return Outcome(True, "nothing (FRACTAL_WORKER_METRICS_PORT=0)")
        return _http_outcome(f"http://127.0.0.1:{settings.metrics_port}/metrics",
                             "is the worker running? (its metrics port: FRACTAL_WORKER_METRICS_PORT)")
    if role == "frontend":
        return _http_outcome(f"http://127.0.0.1:{http_port or 8002}/v2/health/live",
                             "is the frontend running? (its port: fractal health frontend PORT)")
    if role == "serve":
        from .serve import ServeSettings
        port = http_port or load(ServeSettings, "serve").http_port
        return _http_outcome(f"http://127.0.0.1:{port}/v2/health/ready",
                             "is fractal serve running? (its port: fractal health serve PORT, or "
                             "FRACTAL_SERVE_HTTP_PORT)")
    raise SystemExit(f"fractal health: unknown role {role!r} (broker, worker, frontend, serve)")


def main(argv: list[str]) -> int:
    if argv and argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0
    role = argv[0] if argv else (ROLE_FILE.read_text().strip() if ROLE_FILE.exists() else "serve")
    try:
        port = int(argv[1]) if len(argv) > 1 else None
    except ValueError:
        print(f"fractal health: {argv[1]!r} is not a port number", file=sys.stderr)
        return 2
    outcome = check(role, port)
    if outcome.healthy:
        print(f"{role}: healthy ({outcome.checked})")
    else:
        print(f"{role}: unhealthy: {outcome.checked}: {outcome.reason}")
    return 0 if outcome.healthy else 1
