"""Prometheus metrics of every component: the definitions in one place, and the exporter; and the optional
OpenTelemetry tracing (metrics/tracing.py)."""
from . import tracing
from .definitions import (
                          LATENCY_BUCKETS,
                          NO_SERIES,
                          NO_WORKER_METRICS,
                          BrokerMetrics,
                          CallerModelMetrics,
                          FrontendMetrics,
                          GrpcMetrics,
                          ModelSeries,
                          NullCallerModelMetrics,
                          NullFrontendMetrics,
                          NullWorkerMetrics,
                          WorkerMetrics,
                          observe_many,
)
from .exporter import exposition, multiprocess, new_registry, serve_metrics

__all__ = ["LATENCY_BUCKETS", "NO_SERIES", "NO_WORKER_METRICS", "BrokerMetrics", "CallerModelMetrics",
           "FrontendMetrics", "GrpcMetrics", "ModelSeries", "NullCallerModelMetrics", "NullFrontendMetrics",
           "NullWorkerMetrics", "WorkerMetrics", "exposition", "multiprocess", "new_registry", "observe_many",
           "serve_metrics", "tracing"]
