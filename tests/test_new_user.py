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

from .conftest import BUNDLED, Served, free_port, free_ports, wait_for

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
    argv = shlex.split(command.replace(api.BASE, server.base))
    out = subprocess.run([*argv, "-s", "-w", "\n%{http_code}"], capture_output=True, timeout=30,
                         cwd=server.cwd, check=True).stdout.decode()
    body, code = out.rsplit("\n", 1)
    return int(code), json.loads(body)


def fractal(*args: str, env: dict | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    import os
    return subprocess.run([sys.executable, "-m", "fractal", *args], capture_output=True, text=True, timeout=60,
                          env=dict(os.environ, **(env or {})), cwd=cwd)


# -- 7. errors in words -------------------------------------------------------------------------------

def test_fractal_health_says_what_it_checked_and_why_it_failed(server):
    port = free_port()
    out = fractal("health", "serve", env={"FRACTAL_SERVE_HTTP_PORT": str(port)})
    assert out.returncode == 1
    assert out.stdout.strip() == (f"serve: unhealthy: GET http://127.0.0.1:{port}/v2/health/ready: connection "
                                  f"refused: nothing listens there; is fractal serve running? (its port: "
                                  f"FRACTAL_SERVE_HTTP_PORT)")
    out = fractal("health", "serve", env={"FRACTAL_SERVE_HTTP_PORT": str(server.http_port)})
    assert (out.returncode, out.stdout.strip()) == (
        0, f"serve: healthy (GET http://127.0.0.1:{server.http_port}/v2/health/ready)")


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


# -- 2. a second server on taken ports -----------------------------------------------------------------

def _serve_again(cwd: Path, *flags: str) -> subprocess.CompletedProcess:
    return fractal("serve", "--model-dir", str(cwd / "second-pool"), *flags, cwd=cwd)
