"""gunicorn configuration for the frontend (`--config python:frontend.gunicorn_conf`).

Logging per worker process, and prometheus-client's multiprocess mode: every gunicorn worker writes
its metrics to files in one directory, which is emptied when the master starts (no counts from an
earlier run) and from which a dead worker's live gauges are removed when it exits.
"""
from __future__ import annotations

import logging
import os
import shutil
import tempfile
from typing import Any

from broker.logs import formatter, setup_logging
from broker.runner import die_with_parent
from broker.settings import load
from fractal.gunicorn_args import WORKER_CLASS
from frontend.settings import FrontendSettings

# NOTE: the app is ASGI: without a --worker-class flag, gunicorn runs it under the frontend's uvicorn worker.
worker_class = WORKER_CLASS

_settings = load(FrontendSettings, "frontend")
_created = not _settings.metrics_dir
_metrics_dir = _settings.metrics_dir or tempfile.mkdtemp(prefix="fractal-frontend-metrics-")
os.makedirs(_metrics_dir, exist_ok=True)
for _name in os.listdir(_metrics_dir):
    if _name.endswith(".db"):
        os.unlink(os.path.join(_metrics_dir, _name))
# NOTE: prometheus-client reads this when first imported, which happens in the workers, after fork.
os.environ["PROMETHEUS_MULTIPROC_DIR"] = _metrics_dir


if _settings.log_format == "json":
    from gunicorn.glogging import Logger

    class JsonLogger(Logger):
        """gunicorn's own lines (and uvicorn's, which reuse its handlers) as JSON objects too."""

        def setup(self, cfg: object) -> None:
            super().setup(cfg)
            for handler in (*self.error_log.handlers, *self.access_log.handlers):
                handler.setFormatter(formatter("frontend", "json"))

    logger_class = JsonLogger


def post_fork(server: object, worker: object) -> None:
    # NOTE: uvicorn workers do not notice a SIGKILLed master and would keep serving its port unseen.
    die_with_parent()
    # NOTE: gunicorn configures only its own loggers; the app's request lines need a root handler.
    setup_logging("frontend", _settings.log_level, _settings.log_format)
    # NOTE: what no line of ours prints, not gathered for every record (the logging docs' "Optimization"):
    # the caller's frame, the thread, the multiprocessing process name. A request's line costs less.
    logging._srcfile = None
    logging.logThreads = False
    logging.logMultiprocessing = False


def child_exit(server: object, worker: Any) -> None:
    from prometheus_client import multiprocess
    multiprocess.mark_process_dead(worker.pid)


def on_exit(server: object) -> None:
    if _created:
        shutil.rmtree(_metrics_dir, ignore_errors=True)
