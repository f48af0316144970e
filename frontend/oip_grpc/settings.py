"""The gRPC frontend's settings, read by the shared loader (FRACTAL_GRPC_*)."""
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
    metrics_host_setting,
    metrics_port_setting,
    setting,
    tracing_setting,
)


@dataclass(frozen=True)
class GrpcSettings:
    host: str = setting("127.0.0.1", "address the gRPC server listens on (0.0.0.0 for all)")
    port: int = setting(8001, "gRPC port (Triton's convention)")
    broker: str = client_broker_setting()
    service: str = client_service_setting()
    timeout_s: float = setting(30.0, "longest a call may take through the broker; a shorter gRPC deadline "
                                     "wins (DEADLINE_EXCEEDED past it)")
    max_message_bytes: int = setting(64 << 20, "largest request or response message (RESOURCE_EXHAUSTED past it)")
    admin_token: str = admin_token_setting("RepositoryModelLoad and RepositoryModelUnload")
    api_token: str = api_token_setting("every other call but ServerLive and ServerReady")
    curve_secret_key: str = curve_secret_key_setting("this frontend's")
    curve_broker_key: str = curve_broker_key_setting()
    metrics_host: str = metrics_host_setting()
    metrics_port: int = metrics_port_setting(9149)
    log_level: str = log_level_setting()
    log_format: str = log_format_setting()
    tracing: bool = tracing_setting()

    def __post_init__(self) -> None:
        if self.timeout_s <= 0 or self.max_message_bytes <= 0:
            raise ValueError("timeout_s and max_message_bytes must be > 0")
        if not 0 <= self.port < 65536:
            raise ValueError("port must be a TCP port number")
