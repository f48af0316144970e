"""Metrics off is a no-op twin, not a None (metrics/definitions.py): a twin has every metric and method of
its real class and keeps nothing, and a session cache, a pool and dynamic batching built with the worker's
behave as with real metrics (the frontend's: tests/test_frontend_in_process.py). Real ONNX Runtime sessions
of tiny models; no processes, no sockets."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.metrics import MetricWrapperBase

from broker.errors import FractalError, ModelTooLarge
from metrics import (
    NO_SERIES,
    NO_WORKER_METRICS,
    CallerModelMetrics,
    FrontendMetrics,
    ModelSeries,
    NullCallerModelMetrics,
    NullFrontendMetrics,
    NullWorkerMetrics,
    WorkerMetrics,
)
from worker import inference
from worker.batching import prepare, run_batch
from worker.pool import ModelPool
from worker.sessions import LoadedModel, SessionCache, SessionFactory

from .onnx_models import constant_model, identity_model

KEY = (0, 0, 0, 0)
NODE = "node-1"


def _metric(value: object) -> bool:
    return isinstance(value, MetricWrapperBase)


def _noop(value: object) -> bool:
    """Takes every call a metric or label child takes, and is no prometheus metric."""
    return not _metric(value) and all(callable(getattr(value, m, None))
                                      for m in ("labels", "inc", "dec", "set", "observe", "remove"))


# (the real metrics on a registry, its no-op twin, the twin's class): every component whose code takes a twin
TWINS: dict[str, tuple[Callable[[CollectorRegistry], Any], Callable[[], Any], type]] = {
    "worker": (lambda r: WorkerMetrics(r, NODE), lambda: WorkerMetrics.disabled(NODE), NullWorkerMetrics),
    "frontend": (FrontendMetrics, FrontendMetrics.disabled, NullFrontendMetrics),
    "caller models": (lambda r: CallerModelMetrics("fractal_x", r), lambda: NullCallerModelMetrics("fractal_x"),
                      NullCallerModelMetrics),
}


@pytest.mark.parametrize("component", TWINS)
def test_the_twin_has_every_metric_of_the_real_one_as_a_no_op(component: str) -> None:
    make_real, make_null, null_class = TWINS[component]
    real, null = make_real(CollectorRegistry()), make_null()
    assert type(null) is null_class and isinstance(null, type(real))
    assert vars(null).keys() == vars(real).keys()
    metrics = [name for name, value in vars(real).items() if _metric(value)]
    assert len(metrics) >= 3, metrics  # the test sees the metrics it guards
    for name in metrics:
        assert _noop(getattr(null, name)), name


@pytest.mark.parametrize("component", TWINS)
def test_the_twin_overrides_every_method(component: str) -> None:
    """A method added to the real class needs its twin's version, so metrics off stays one no-op call:
    inherited, it would keep state or build label children for nothing."""
    real_class = type(TWINS[component][0](CollectorRegistry()))
    null_class = TWINS[component][2]
    methods = {name for name, value in vars(real_class).items()
               if callable(value) and not name.startswith("_") and name != "disabled"}
    assert methods, real_class
    missing = methods - set(vars(null_class))
    assert not missing, f"{null_class.__name__} lacks {sorted(missing)}"


def test_the_twin_counts_nothing_and_keeps_nothing() -> None:
    null = NullWorkerMetrics(NODE)
    series = null.model_series("m.onnx@2", "m.onnx", "2")
    assert isinstance(series, ModelSeries) and series.labels == (NODE, "m.onnx", "2")
    assert all(_noop(getattr(series, slot)) for slot in ModelSeries.__slots__ if slot not in ("labels", "_failed"))
    series.failed("BadInput")
    null.model_done("m.onnx", "BadInput", "2")
    null.request_done("predict", "ok", 0.001)
    null.forget_model("m.onnx@2")
    null.dropped_deadline.inc(3)
    assert (null._models, null._newest, null._bound) == ({}, {}, {})
    assert NO_SERIES.labels == ("", "", "1") and _noop(NO_SERIES.inference)
    assert type(NO_WORKER_METRICS) is NullWorkerMetrics


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> LoadedModel:
    path = tmp_path_factory.mktemp("tiny") / "c.onnx"
    path.write_bytes(constant_model(1.0))
    return SessionFactory(1).build("c.onnx", path.read_bytes(), os.stat(path))


def test_a_session_no_cache_holds_has_the_no_op_series(tiny: LoadedModel) -> None:
    assert tiny.series is NO_SERIES and tiny.timer is NO_SERIES.inference
    outputs, _ = inference.run(tiny, {"x": [[5.0]]}, None)  # observes through them: no branch, no error
    np.testing.assert_array_equal(outputs["y"], [[1.0]])


def _cache_story(tiny: LoadedModel, metrics: WorkerMetrics) -> tuple[list[Any], SessionCache]:
    """Hits, a miss, an eviction past a pin, a refusal, an offer and a drop; what a caller sees of each."""
    def sized(name: str, cost: int) -> LoadedModel:
        return LoadedModel(name, KEY, tiny.session, tiny.inputs, tiny.outputs, 1, 0.0, cost_bytes=cost)

    cache = SessionCache(3, metrics, budget_bytes=100)
    seen: list[Any] = []
    for name in ("a.onnx", "b.onnx"):
        cache.put(sized(name, 40), cold=True)
    seen.append(cache.get("a.onnx", KEY) is not None)
    seen.append(cache.get("a.onnx", (1, 1, 1, 1)))    # another file version: a miss
    cache.pin("b.onnx")
    cache.put(sized("c.onnx", 40))                     # a goes: b is pinned
    seen.append(cache.names())
    seen.append(cache.offer(sized("d.onnx", 50)))      # no room without evicting
    with pytest.raises(ModelTooLarge):
        cache.put(sized("e.onnx", 70))                 # 40 pinned: 60 left, never enough
    seen.append(cache.drop("c.onnx"))
    seen.append((cache.names(), cache.sizes(), cache.resident_bytes))
    for name in cache.names():
        model = cache.peek(name)
        assert model is not None and isinstance(model.series, ModelSeries)
        assert model.timer is model.series.inference and model.series.labels == (metrics.node, name, "1")
    return seen, cache


def test_a_session_cache_behaves_the_same_with_metrics_off_and_on(tiny: LoadedModel) -> None:
    registry = CollectorRegistry()
    on, _ = _cache_story(tiny, WorkerMetrics(registry, NODE))
    off, _ = _cache_story(tiny, WorkerMetrics.disabled(NODE))
    default, _ = _cache_story(tiny, NO_WORKER_METRICS)
    legacy, _ = _cache_story(tiny, WorkerMetrics(None, NODE, enabled=False))  # all no-op metrics, no twin
    assert on == off == default == legacy
    assert on == [True, None, ["b.onnx", "c.onnx"], False, True, (["b.onnx"], {"b.onnx": 40}, 40)]

    def value(name: str, **labels: str) -> float | None:
        return registry.get_sample_value(name, {"node": NODE, **labels})

    assert (value("fractal_worker_session_cache_hits_total"), value("fractal_worker_session_cache_misses_total"),
            value("fractal_worker_session_cache_evictions_total"), value("fractal_worker_cold_loads_total")) == (
        1, 1, 1, 2)
    assert (value("fractal_worker_models_resident"), value("fractal_worker_resident_bytes"),
            value("fractal_worker_memory_budget_bytes")) == (1, 40, 100)
    assert value("fractal_worker_model_resident", model="b.onnx", version="1") == 1
    assert value("fractal_worker_model_resident", model="a.onnx", version="1") is None  # left with its session


def _pool_story(directory: Path, metrics: WorkerMetrics) -> list[Any]:
    """Loads (cold, then cached), a predict, a batched run of two requests; their answers."""
    pool = ModelPool(directory, SessionFactory(1, metrics), SessionCache(4, metrics), max_model_bytes=1 << 20)
    seen: list[Any] = [pool.names()]
    constant = pool.load("c.onnx")
    seen.append(pool.load("c.onnx") is constant)
    outputs, _ = inference.run(constant, {"x": [[2.0], [3.0]]}, None)
    seen.append(outputs["y"].tolist())
    identity = pool.load("id.onnx")
    answers: dict[int, Any] = {}
    rows = ([[1.0, 2.0, 3.0]], [[4.0, 5.0, 6.0], [7.0, 8.0, 9.0]])
    run_batch([prepare(identity, {"x": r}, None, lambda outcome, i=i: answers.__setitem__(i, outcome), 0.0)
               for i, r in enumerate(rows)])
    assert not any(isinstance(a, FractalError) for a in answers.values()), answers
    seen.append([answers[i]["outputs"]["y"].tolist() for i in range(len(rows))])
    seen.append({name: (s["inference_count"], s["execution_count"]) for name, s in pool.statistics().items()})
    seen.append(pool.resident())
    return seen


def test_a_pool_answers_the_same_with_metrics_off_and_on(tmp_path: Path) -> None:
    (tmp_path / "c.onnx").write_bytes(constant_model(7.0))
    (tmp_path / "id.onnx").write_bytes(identity_model([None, 3]))
    registry = CollectorRegistry()
    on = _pool_story(tmp_path, WorkerMetrics(registry, NODE))
    off = _pool_story(tmp_path, WorkerMetrics.disabled(NODE))
    assert on == off == _pool_story(tmp_path, WorkerMetrics(None, NODE, enabled=False))
    assert on[:4] == [["c.onnx", "id.onnx"], True, [[7.0], [7.0]],
                      [[[1.0, 2.0, 3.0]], [[4.0, 5.0, 6.0], [7.0, 8.0, 9.0]]]]

    def value(name: str, model: str) -> float | None:
        return registry.get_sample_value(name, {"node": NODE, "model": model, "version": "1"})

    assert value("fractal_worker_inference_seconds_count", "c.onnx") == 1
    assert value("fractal_worker_batch_rows_sum", "c.onnx") == 2
    assert value("fractal_worker_inference_seconds_count", "id.onnx") == 1  # the two requests ran as one
    assert value("fractal_worker_batch_rows_sum", "id.onnx") == 3
    assert value("fractal_worker_model_queue_wait_seconds_count", "id.onnx") == 2
    assert registry.get_sample_value("fractal_worker_model_loads_total", {"node": NODE}) == 2
