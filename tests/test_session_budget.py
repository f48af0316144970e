"""The session cache's memory budget in process: LRU by measured bytes (injected here), pins, refusals;
the sidecar's replicas policy; what a load measures; the setting through the shared loader."""
from __future__ import annotations

import os
from pathlib import Path

import grpc
import numpy as np
import pytest

from broker.errors import ConfigError, ModelTooLarge, PayloadTooLarge
from broker.settings import load
from frontend.oip_grpc.calls import status_code
from worker.memory import rss_bytes, trim
from worker.pinning import Replicas, replicas_of, sample_feed, warm
from worker.sessions import LoadedModel, SessionCache, SessionFactory, TensorSpec
from worker.settings import WorkerSettings

from .onnx_models import constant_model, sized_model, sized_table, string_identity_model

MIB = 1 << 20


@pytest.fixture(scope="module")
def factory() -> SessionFactory:
    return SessionFactory(1)


@pytest.fixture(scope="module")
def tiny(factory: SessionFactory, tmp_path_factory: pytest.TempPathFactory) -> LoadedModel:
    path = tmp_path_factory.mktemp("tiny") / "c.onnx"
    path.write_bytes(constant_model(1.0))
    return factory.build("c.onnx", path.read_bytes(), os.stat(path))


def sized(tiny: LoadedModel, name: str, cost: int) -> LoadedModel:
    """A real session under another name with an injected cost: the cache only reads name and cost."""
    return LoadedModel(name, (0, 0, 0, 0), tiny.session, tiny.inputs, tiny.outputs, 1, 0.0, cost_bytes=cost)


def test_least_recently_used_leave_first_and_the_budget_always_holds(tiny: LoadedModel) -> None:
    cache = SessionCache(32, budget_bytes=100)
    for name in ("a", "b"):
        cache.put(sized(tiny, name, 40))
    assert cache.get("a", (0, 0, 0, 0)) is not None  # a is now the most recently used
    cache.put(sized(tiny, "c", 40))
    assert cache.names() == ["a", "c"] and cache.resident_bytes == 80
    cache.put(sized(tiny, "d", 90))                   # needs both a and c gone
    assert cache.names() == ["d"] and cache.resident_bytes == 90
    cache.put(sized(tiny, "d", 30))                   # a new version replaces the old one's bytes
    assert cache.sizes() == {"d": 30} and cache.resident_bytes == 30


def test_a_model_larger_than_the_budget_is_refused_and_nothing_is_evicted(tiny: LoadedModel) -> None:
    cache = SessionCache(32, budget_bytes=100)
    cache.put(sized(tiny, "a", 60))
    with pytest.raises(ModelTooLarge, match=r"big needs at least 101 bytes.*budget.*is 100 bytes") as info:
        cache.put(sized(tiny, "big", 101))
    assert info.value.http_status == 507 and isinstance(info.value, PayloadTooLarge)
    assert status_code(info.value) == grpc.StatusCode.RESOURCE_EXHAUSTED  # what gRPC callers see
    assert cache.names() == ["a"]
    with pytest.raises(ModelTooLarge):
        cache.admit("big", 101)   # what the pool asks with the file size, before loading anything
    cache.admit("fits", 100)


def test_pinned_sessions_are_never_evicted_and_count_against_the_room(tiny: LoadedModel) -> None:
    cache = SessionCache(32, budget_bytes=100)
    cache.put(sized(tiny, "pinned", 50))
    cache.pin("pinned")
    cache.put(sized(tiny, "b", 30))
    cache.put(sized(tiny, "c", 40))                   # evicts b, the only unpinned one
    assert cache.names() == ["pinned", "c"]
    with pytest.raises(ModelTooLarge, match="pinned models hold 50"):
        cache.put(sized(tiny, "d", 60))
    assert cache.names() == ["pinned", "c"]
    cache.put(sized(tiny, "pinned", 70))              # a new version of a pinned model stays pinned
    assert cache.names() == ["pinned"] and "pinned" in cache.pinned


def test_offer_keeps_a_session_only_when_it_fits_without_evicting(tiny: LoadedModel) -> None:
    cache = SessionCache(32, budget_bytes=100)
    cache.put(sized(tiny, "a", 60))
    assert not cache.offer(sized(tiny, "b", 50))
    assert cache.offer(sized(tiny, "b", 40))
    assert cache.offer(sized(tiny, "a", 55))          # replacing a's own bytes
    assert cache.sizes() == {"b": 40, "a": 55}


def test_unlimited_budget_still_keeps_the_session_count(tiny: LoadedModel) -> None:
    cache = SessionCache(2, budget_bytes=0)
    for name in ("a", "b", "c"):
        cache.put(sized(tiny, name, 10 * MIB * 1024))
    assert cache.names() == ["b", "c"]
    assert cache.drop("b") and cache.resident_bytes == 10 * MIB * 1024 and not cache.drop("b")


def test_a_load_measures_at_least_the_file_and_about_its_tensor(factory: SessionFactory, tmp_path: Path) -> None:
    path = tmp_path / "m.onnx"
    path.write_bytes(sized_model(8 * MIB, seed=1))
    model = factory.build("m.onnx", path.read_bytes(), os.stat(path))
    assert model.cost_bytes >= model.size_bytes
    assert model.cost_bytes < 2 * model.size_bytes    # the table is held once, not per copy
    y = model.session.run(None, {"i": np.array([3], np.int64)})[0]
    np.testing.assert_array_equal(y, sized_table(8 * MIB, 1)[[3]])


def test_a_session_does_not_keep_a_second_copy_of_its_model(factory: SessionFactory, tmp_path: Path) -> None:
    """ONNX Runtime's Python wrapper would keep the model's bytes beside its tensors: twice the memory."""
    path = tmp_path / "m.onnx"
    path.write_bytes(sized_model(8 * MIB, seed=2))
    trim()
    before = rss_bytes()
    kept = [factory.build(f"m{i}.onnx", path.read_bytes(), os.stat(path)) for i in range(3)]  # bytes dropped
    trim()
    grown = rss_bytes() - before
    assert 3 * 8 * MIB * 0.9 < grown < 3 * 8 * MIB * 1.4, grown / MIB
    assert sum(m.cost_bytes for m in kept) >= 3 * 8 * MIB


def test_replicas_policy_of_the_sidecar() -> None:
    assert replicas_of({}, "m.onnx") == Replicas(0, 0)
    assert replicas_of({"replicas": {"min": 1, "max": 3}}, "m.onnx") == Replicas(1, 3)
    assert replicas_of({"replicas": {"min": 2}}, "m.onnx") == Replicas(2, 0)
    for bad in ({"min": -1}, {"min": 3, "max": 2}, {"min": "1"}, {"min": True}, {"mni": 1}, [1], 1):
        assert replicas_of({"replicas": bad}, "m.onnx") == Replicas(0, 0), bad


def test_sample_inputs_follow_the_input_shapes(factory: SessionFactory, tmp_path: Path) -> None:
    spec = TensorSpec("x", "tensor(float)", np.dtype(np.float32), (None, 3, 8))
    assert sample_feed(spec).shape == (1, 3, 8) and sample_feed(spec).dtype == np.float32
    for data in (constant_model(2.0), string_identity_model(), sized_model(1024)):
        path = tmp_path / "w.onnx"
        path.write_bytes(data)
        assert warm(factory.build("w.onnx", data, os.stat(path)))


def test_the_budget_setting_comes_through_the_shared_loader() -> None:
    assert WorkerSettings().memory_budget_bytes == 2 << 30
    assert load(WorkerSettings, "worker", env={"FRACTAL_WORKER_MEMORY_BUDGET_BYTES": "62914560"}) \
        .memory_budget_bytes == 60 * MIB
    assert load(WorkerSettings, "worker", {"memory_budget_bytes": "0"}, env={}).memory_budget_bytes == 0
    with pytest.raises(ConfigError, match="memory_budget_bytes"):
        load(WorkerSettings, "worker", env={"FRACTAL_WORKER_MEMORY_BUDGET_BYTES": "-1"})
