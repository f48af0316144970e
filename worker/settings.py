"""The worker's settings, built by `python -m worker` through the shared loader (FRACTAL_WORKER_*)."""
from __future__ import annotations

from dataclasses import dataclass

from broker.settings import (
    check_heartbeat,
    curve_broker_key_setting,
    curve_secret_key_setting,
    endpoint_list,
    heartbeat_interval_setting,
    heartbeat_liveness_setting,
    log_format_setting,
    log_level_setting,
    metrics_host_setting,
    metrics_port_setting,
    setting,
    tracing_setting,
)


@dataclass(frozen=True)
class WorkerSettings:
    connect: str = setting("tcp://127.0.0.1:5555", "broker endpoint to connect to; several, comma-separated "
                                                   "(tcp://a:5555,tcp://b:5555): register with every one")
    node_name: str = setting("", "start of this worker's node id and its log name (default: the host "
                                 "name); fractal serve passes worker-1, worker-2, ...")
    service: str = setting("modelhost", "MDP service name to register for")
    model_dir: str = setting("./models", "the shared model pool directory")
    cache_size: int = setting(32, "ONNX Runtime sessions kept loaded (least recently used evicted)")
    memory_budget_bytes: int = setting(2 << 30, "memory the loaded sessions may hold, measured at load (least "
                                                "recently used evicted; pinned never); 0 = unlimited")
    threads: int = setting(1, "ONNX Runtime intra-op threads; 1 suits N workers on N cores")
    heartbeat_interval_s: float = heartbeat_interval_setting("the broker")
    heartbeat_liveness: int = heartbeat_liveness_setting("reconnecting to the broker")
    reconnect_max_s: float = setting(5.0, "longest back-off between reconnect attempts")
    max_model_bytes: int = setting(512 << 20, "largest model file accepted for upload")
    poll_s: float = setting(0.0, "repository polling: seconds between scans of the pool for models added, "
                                 "changed or removed by other means; 0 = off (explicit mode)")
    max_image_pixels: int = setting(25_000_000, "largest image (width x height) decoded for prediction")
    log_requests: bool = setting(True, "one INFO line per request with its request id and time")
    connections: int = setting(1, "MDP connections to the broker: requests this process may hold at "
                                  "once; more than 1 lets it batch them")
    batch_max_size: int = setting(0, "dynamic batching: most rows per InferenceSession.run; 0 = off")
    batch_max_delay_us: int = setting(500, "dynamic batching: longest wait for a fuller batch")
    batch_preferred_sizes: str = setting("", "dynamic batching: row counts to run at once, e.g. '8,16'")
    curve_secret_key: str = curve_secret_key_setting("this worker's")
    curve_broker_key: str = curve_broker_key_setting()
    metrics_host: str = metrics_host_setting()
    metrics_port: int = metrics_port_setting(9151)
    log_level: str = log_level_setting()
    log_format: str = log_format_setting()
    tracing: bool = tracing_setting()

    def __post_init__(self) -> None:
        check_heartbeat(self.heartbeat_interval_s, self.heartbeat_liveness)
        if self.cache_size < 1 or self.threads < 1 or self.connections < 1:
            raise ValueError("cache_size, threads and connections must be >= 1")
        if self.memory_budget_bytes < 0:
            raise ValueError("memory_budget_bytes must be >= 0 (0: unlimited)")
        if self.poll_s < 0:
            raise ValueError("poll_s must be >= 0 (0 turns repository polling off)")
        if self.batch_max_size < 0 or self.batch_max_delay_us < 0:
            raise ValueError("batch_max_size and batch_max_delay_us must be >= 0")
        endpoint_list(self.connect)  # raises ConfigError when it names no endpoint
