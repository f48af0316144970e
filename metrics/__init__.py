"""Prometheus metrics of every component: the definitions in one place, and the exporter."""
from .definitions import (
    LATENCY_BUCKETS,
    BrokerMetrics,
    CallerModelMetrics,
    FrontendMetrics,
    GrpcMetrics,
    ModelSeries,
    WorkerMetrics,
    observe_many,
)
from .exporter import exposition, multiprocess, new_registry, serve_metrics

__all__ = ["LATENCY_BUCKETS", "BrokerMetrics", "CallerModelMetrics", "FrontendMetrics", "GrpcMetrics", "ModelSeries",
           "WorkerMetrics", "exposition", "multiprocess", "new_registry", "observe_many", "serve_metrics"]
