"""gunicorn configuration for the frontend (`-c python:frontend.gunicorn_conf`): logging per worker."""
from __future__ import annotations

from broker.logs import setup_logging
from broker.settings import load

from frontend.settings import FrontendSettings


def post_fork(server: object, worker: object) -> None:
    # NOTE: gunicorn configures only its own loggers; the app's request lines need a root handler.
    setup_logging("frontend", load(FrontendSettings, "frontend").log_level)
