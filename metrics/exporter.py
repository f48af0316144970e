"""/metrics over HTTP for the broker and workers (the frontend serves it from its own Falcon app)."""
from __future__ import annotations

import logging
import os

from prometheus_client import CollectorRegistry, generate_latest, start_http_server
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.process_collector import ProcessCollector

log = logging.getLogger(__name__)


def new_registry(namespace: str) -> CollectorRegistry:
    """A registry with this process's CPU, memory and file descriptor metrics (namespace_process_*)."""
    registry = CollectorRegistry()
    ProcessCollector(namespace=namespace, registry=registry)
    return registry


def multiprocess() -> bool:
    """True in prometheus-client's multiprocess mode (the frontend under gunicorn)."""
    return bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))


def exposition(registry: CollectorRegistry | None) -> bytes:
    """The text exposition of `registry`, or of every process's files in multiprocess mode."""
    if registry is None:
        registry = CollectorRegistry()
        MultiProcessCollector(registry)
    return generate_latest(registry)


def serve_metrics(host: str, port: int, registry: CollectorRegistry, component: str) -> str | None:
    """Expose `registry` on http://host:port/metrics in a daemon thread; None when port is 0 or taken.

    A busy port costs the metrics, never the component: it logs an error and serves on.
    """
    if port == 0:
        return None
    try:
        start_http_server(port, addr=host, registry=registry)
    except OSError as exc:
        log.error("%s metrics not exported: cannot listen on %s:%d (%s)", component, host, port, exc)
        return None
    url = f"http://{host}:{port}/metrics"
    log.info("%s metrics at %s", component, url)
    return url
