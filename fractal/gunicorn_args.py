"""The gunicorn command line for the frontend, shared by `fractal serve` and `fractal frontend`."""
from __future__ import annotations

import sys

APP = "frontend.app:create_app()"
# NOTE: the app is ASGI, so the worker class must be an ASGI one; ours is uvicorn_worker's on uvloop and
# httptools, with the protocol of frontend/http_worker.py (one write per response, cancel on hang-up).
WORKER_CLASS = "frontend.http_worker.Worker"
DEFAULTS = ["--bind", "127.0.0.1:8002", "--worker-class", WORKER_CLASS, "--workers", "2"]


def _control_socket_flags() -> list[str]:
    # NOTE: gunicorn >= 25 opens a control socket in $HOME by default; we do not use it and it would
    # outlive a killed server as a stale socket, so turn it off where the option exists.
    try:
        from gunicorn.config import ControlSocketDisable  # noqa: F401
    except ImportError:
        return []
    return ["--no-control-socket"]


def gunicorn_base() -> list[str]:
    """gunicorn on the app factory with our config file; append gunicorn flags."""
    return [sys.executable, "-m", "gunicorn", APP, "--config", "python:frontend.gunicorn_conf",
            *_control_socket_flags()]


def gunicorn_argv(bind: str, workers: int, log_level: str = "info", worker_class: str = WORKER_CLASS) -> list[str]:
    return [*gunicorn_base(), "--bind", bind, "--workers", str(workers), "--worker-class", worker_class,
            "--log-level", log_level.lower(), "--graceful-timeout", "5"]
