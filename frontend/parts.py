"""What the REST resources are built from: one set per process, made by app.create_app after the fork."""
from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import CollectorRegistry

from broker.client import AsyncClient
from metrics import FrontendMetrics

from .settings import FrontendSettings


@dataclass(frozen=True)
class Parts:
    """Every resource class of api.ENDPOINTS takes this one argument, so the table can name the class
    and app.py build it without knowing what each one needs."""

    client: AsyncClient               # the process's one broker client: every request in flight
    settings: FrontendSettings
    registry: CollectorRegistry | None  # None: prometheus-client's multiprocess files (gunicorn)
    metrics: FrontendMetrics            # metrics off: its no-op twin (FrontendMetrics.disabled())
    version: str                        # this package's version, for GET /v2 and /openapi.json
