"""The gunicorn command line for the frontend, shared by `fractal serve` and `fractal frontend`."""
from __future__ import annotations

import sys

APP = "frontend.app:create_app()"


def _control_socket_flags() -> list[str]:
    # NOTE: gunicorn >= 25 opens a control socket in $HOME by default; we do not use it and it would
    # outlive a killed server as a stale socket, so turn it off where the option exists.
    try:
        from gunicorn.config import ControlSocketDisable  # noqa: F401
    except ImportError:
        return []
    return ["--no-control-socket"]


def gunicorn_argv(bind: str, workers: int, threads: int, log_level: str = "info") -> list[str]:
    return [sys.executable, "-m", "gunicorn", APP, "--bind", bind, "--workers", str(workers),
            "--worker-class", "gthread", "--threads", str(threads), "--log-level", log_level.lower(),
            "--graceful-timeout", "5", *_control_socket_flags()]
