"""The frontend's settings, read in each gunicorn process by the shared loader (FRACTAL_FRONTEND_*)."""
from __future__ import annotations

from dataclasses import dataclass

from broker.settings import (
    admin_token_setting,
    api_token_setting,
    client_broker_setting,
    client_service_setting,
    curve_broker_key_setting,
    curve_secret_key_setting,
    log_format_setting,
    log_level_setting,
    setting,
    tracing_setting,
)


@dataclass(frozen=True)
class FrontendSettings:
    broker: str = client_broker_setting()
    service: str = client_service_setting()
    timeout_s: float = setting(30.0, "deadline of one request through the broker (504 past it)")
    max_body_bytes: int = setting(64 << 20, "largest request body accepted (413 past it)")
    admin_token: str = admin_token_setting("upload, describe, delete, load and unload")
    api_token: str = api_token_setting("every other endpoint but health checks")
    curve_secret_key: str = curve_secret_key_setting("the frontend's")
    curve_broker_key: str = curve_broker_key_setting()
    server_timing: bool = setting(True, "a Server-Timing header on every prediction: frontend, queue, worker, "
                                        "inference and total in ms (false: none, for comparison)")
    metrics: bool = setting(True, "count requests for /metrics (false: no metrics, for comparison)")
    metrics_dir: str = setting("", "prometheus multiprocess directory for gunicorn's workers; empty: a "
                                   "temporary one, removed on exit")
    public_url: str = setting("", "base URL of the curl examples in GET /help (empty: http://localhost:8002); "
                                  "fractal serve sets its own address")
    log_level: str = log_level_setting()
    log_format: str = log_format_setting()
    tracing: bool = tracing_setting()

    def __post_init__(self) -> None:
        if self.timeout_s <= 0 or self.max_body_bytes <= 0:
            raise ValueError("timeout_s and max_body_bytes must be > 0")
