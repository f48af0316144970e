"""The gRPC frontend's settings, read by the shared loader (FRACTAL_GRPC_*)."""
from __future__ import annotations

from dataclasses import dataclass

from broker.settings import log_format_setting, setting, tracing_setting


@dataclass(frozen=True)
class GrpcSettings:
    host: str = setting("127.0.0.1", "address the gRPC server listens on (0.0.0.0 for all)")
    port: int = setting(8001, "gRPC port (Triton's convention)")
    broker: str = setting("tcp://127.0.0.1:5555", "broker endpoint the frontend's client connects to; "
                                                  "several, comma-separated: fail over between them")
    service: str = setting("modelhost", "MDP service the models are served under")
    timeout_s: float = setting(30.0, "longest a call may take through the broker; a shorter gRPC deadline "
                                     "wins (DEADLINE_EXCEEDED past it)")
    max_message_bytes: int = setting(64 << 20, "largest request or response message (RESOURCE_EXHAUSTED past it)")
    admin_token: str = setting("", "bearer token required for RepositoryModelLoad and RepositoryModelUnload; "
                                   "empty: open", env="FRACTAL_ADMIN_TOKEN", secret=True)
    api_token: str = setting("", "bearer token required for every other call but ServerLive and ServerReady; "
                                 "empty: open", env="FRACTAL_API_TOKEN", secret=True)
    curve_secret_key: str = setting("", "CURVE: this frontend's .key_secret file (empty: no CURVE)")
    curve_broker_key: str = setting("", "CURVE: the broker's public .key file")
    metrics_host: str = setting("127.0.0.1", "address of the /metrics endpoint")
    metrics_port: int = setting(9149, "port of the /metrics endpoint; 0: no metrics at all")
    log_level: str = setting("INFO", "logging level")
    log_format: str = log_format_setting()
    tracing: bool = tracing_setting()

    def __post_init__(self) -> None:
        if self.timeout_s <= 0 or self.max_message_bytes <= 0:
            raise ValueError("timeout_s and max_message_bytes must be > 0")
        if not 0 <= self.port < 65536:
            raise ValueError("port must be a TCP port number")
