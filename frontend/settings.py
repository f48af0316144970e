"""The frontend's settings, read in each gunicorn process by the shared loader (FRACTAL_FRONTEND_*)."""
from __future__ import annotations

from dataclasses import dataclass

from broker.settings import log_format_setting, setting, tracing_setting


@dataclass(frozen=True)
class FrontendSettings:
    broker: str = setting("tcp://127.0.0.1:5555", "broker endpoint the frontend's client connects to; "
                                                  "several, comma-separated: fail over between them")
    service: str = setting("modelhost", "MDP service the models are served under")
    timeout_s: float = setting(30.0, "deadline of one request through the broker (504 past it)")
    max_body_bytes: int = setting(64 << 20, "largest request body accepted (413 past it)")
    admin_token: str = setting("", "bearer token required for upload, describe, delete, load and unload; "
                                   "empty: open", env="FRACTAL_ADMIN_TOKEN", secret=True)
    api_token: str = setting("", "bearer token required for every other endpoint but health checks; empty: "
                                 "open", env="FRACTAL_API_TOKEN", secret=True)
    curve_secret_key: str = setting("", "CURVE: the frontend's .key_secret file (empty: no CURVE)")
    curve_broker_key: str = setting("", "CURVE: the broker's public .key file")
    server_timing: bool = setting(True, "a Server-Timing header on every prediction: frontend, queue, worker, "
                                        "inference and total in ms (false: none, for comparison)")
    metrics: bool = setting(True, "count requests for /metrics (false: no metrics, for comparison)")
    metrics_dir: str = setting("", "prometheus multiprocess directory for gunicorn's workers; empty: a "
                                   "temporary one, removed on exit")
    public_url: str = setting("", "base URL of the curl examples in GET /help (empty: http://localhost:8002); "
                                  "fractal serve sets its own address")
    log_level: str = setting("INFO", "logging level")
    log_format: str = log_format_setting()
    tracing: bool = tracing_setting()

    def __post_init__(self) -> None:
        if self.timeout_s <= 0 or self.max_body_bytes <= 0:
            raise ValueError("timeout_s and max_body_bytes must be > 0")
