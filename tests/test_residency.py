"""Worker memory residency with real processes: a budget in bytes with LRU eviction, pinned models loaded
and warmed at start, a model larger than the budget answered with a clear error, and status and metrics
saying where each model is resident (broker, workers and the gunicorn frontend on free local ports)."""
from __future__ import annotations

import json
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from broker.client import Client

from .harness import Processes, free_port, start_frontend, wait_for, wait_workers
from .onnx_models import sized_model, sized_table
from .test_metrics import get, sample_sum

pytestmark = pytest.mark.slow  # every test here starts processes

MIB = 1 << 20
SIZE = 4 * MIB          # each generated model: a 4 MiB float32 table
BUDGET = 14 * MIB       # room for three of them (the first load also carries ONNX Runtime's set-up)


def write_models(pool: Path, count: int, size: int = SIZE) -> list[str]:
    pool.mkdir(exist_ok=True)
    names = []
    for seed in range(count):
        (pool / f"m{seed}.onnx").write_bytes(sized_model(size, seed))
        names.append(f"m{seed}.onnx")
    return names


def rest(base: str, path: str, body: dict) -> tuple[int, dict]:
    req = urllib.request.Request(base + path, data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def predict_row(base: str, name: str, row: int, size: int = SIZE) -> None:
    """One REST prediction, checked against the model's table: the answer came from `name`."""
    status, body = rest(base, f"/api/v1/models/{name}/prediction", {"values": [row]})
    assert status == 200, body
    seed = int(name[1:].split(".")[0])
    np.testing.assert_array_equal(np.array(body["values"], np.float32), sized_table(size, seed)[[row]])


def worker_status(url: str) -> dict:
    with Client(url, timeout_s=10) as client:
        return client.call("status")


def start(procs: Processes, pool: Path, workers: int, *flags: str) -> tuple[str, list[str], str]:
    """Broker (status polled every 0.2 s), `workers` workers with metrics on free ports, one frontend."""
    url = f"tcp://127.0.0.1:{free_port()}"
    procs.broker(url, "--status-interval-s", "0.2")
    metrics = []
    for _ in range(workers):
        port = free_port()
        procs.worker(url, pool, "--metrics-port", str(port), *flags)
        metrics.append(f"http://127.0.0.1:{port}/metrics")
    wait_workers(url, workers)
    return url, metrics, start_frontend(procs, url)


def test_eviction_keeps_resident_bytes_within_the_budget(procs: Processes, tmp_path: Path) -> None:
    names = write_models(tmp_path / "pool", 5)
    url, [metrics], base = start(procs, tmp_path / "pool", 1, "--memory-budget-bytes", str(BUDGET))
    for round_ in range(2):
        for i, name in enumerate(names):
            predict_row(base, name, round_ * 7 + i)
            status = worker_status(url)
            assert status["memory_budget_bytes"] == BUDGET
            sizes = status["resident_bytes"]["models"]
            assert status["resident_bytes"]["total"] == sum(sizes.values()) <= BUDGET
            assert sorted(sizes) == sorted(status["models_resident"]) and name in sizes
            assert all(b >= SIZE for b in sizes.values())  # measured, never below the file
            text = get(metrics)
            assert 0 < sample_sum(text, "fractal_worker_resident_bytes") <= BUDGET
            assert sample_sum(text, "fractal_worker_memory_budget_bytes") == BUDGET
            per_model = {m: sample_sum(text, "fractal_worker_model_resident_bytes", model=m) for m in names}
            assert {m for m, b in per_model.items() if b} == set(sizes)  # series only for resident models
    text = get(metrics)
    evictions = sample_sum(text, "fractal_worker_session_cache_evictions_total")
    cold = sample_sum(text, "fractal_worker_cold_loads_total")
    assert evictions >= 5 and cold == sample_sum(text, "fractal_worker_model_loads_total") >= 7
    assert cold - evictions == len(worker_status(url)["models_resident"])


def test_pinned_models_are_loaded_and_warm_at_start_and_never_evicted(procs: Processes, tmp_path: Path) -> None:
    pool = tmp_path / "pool"
    names = write_models(pool, 4)
    (pool / "m0.onnx.json").write_text(json.dumps({"replicas": {"min": 1, "max": 2}}))
    url, [metrics], base = start(procs, pool, 1, "--memory-budget-bytes", str(BUDGET))
    status = worker_status(url)
    assert status["models_resident"] == ["m0.onnx"] and status["models_pinned"] == ["m0.onnx"]
    assert status["model_replicas"] == {"m0.onnx": {"min": 1, "max": 2}}
    text = get(metrics)
    assert sample_sum(text, "fractal_worker_model_loads_total") == 1
    assert sample_sum(text, "fractal_worker_cold_loads_total") == 0
    predict_row(base, "m0.onnx", 5)  # the first request finds its session loaded and warmed
    text = get(metrics)
    assert sample_sum(text, "fractal_worker_model_loads_total") == 1
    assert sample_sum(text, "fractal_worker_cold_loads_total") == 0
    for _ in range(2):
        for name in names[1:]:
            predict_row(base, name, 1)
    status = worker_status(url)
    assert "m0.onnx" in status["models_resident"] and status["resident_bytes"]["total"] <= BUDGET
    assert sample_sum(get(metrics), "fractal_worker_session_cache_evictions_total") >= 3
    log = Path(procs.procs[1].log_path).read_text()
    assert "pinned m0.onnx: loaded and warmed" in log


def test_in_poll_mode_a_pinned_model_loads_once_its_file_is_validated(procs: Processes, tmp_path: Path) -> None:
    pool = tmp_path / "pool"
    write_models(pool, 2)
    (pool / "m1.onnx.json").write_text(json.dumps({"replicas": {"min": 2}}))
    url, [metrics], _ = start(procs, pool, 1, "--poll-s", "0.2")
    wait_for(lambda: worker_status(url)["models_pinned"] == ["m1.onnx"], 20, "m1 pinned after two scans")
    assert "m1.onnx" in worker_status(url)["models_resident"]
    assert sample_sum(get(metrics), "fractal_worker_cold_loads_total") == 0


def test_a_model_larger_than_the_budget_is_a_clear_error_and_the_worker_stays_up(procs: Processes,
                                                                                 tmp_path: Path) -> None:
    pool = tmp_path / "pool"
    write_models(pool, 1)
    (pool / "m9.onnx").write_bytes(sized_model(3 * BUDGET, 9))
    url, [metrics], base = start(procs, pool, 1, "--memory-budget-bytes", str(BUDGET))
    status, body = rest(base, "/api/v1/models/m9.onnx/prediction", {"values": [1]})
    assert status == 507, body
    assert body["http_status"]["name"] == "Insufficient Storage"
    assert "memory budget" in body["http_status"]["description"] and str(BUDGET) in body["http_status"]["description"]
    status, body = rest(base, "/v2/models/m9.onnx/infer",
                        {"inputs": [{"name": "i", "shape": [1], "datatype": "INT64", "data": [1]}]})
    assert status == 507 and "memory budget" in body["error"]
    predict_row(base, "m0.onnx", 2)  # the same worker answers on, and never loaded the big one
    assert procs.procs[1].poll() is None
    assert sample_sum(get(metrics), "fractal_worker_model_loads_total") == 1
    with open(pool / "m9.onnx", "rb") as f, Client(url, timeout_s=30) as client:
        from broker.errors import ModelTooLarge
        with pytest.raises(ModelTooLarge):
            client.upload("m8.onnx", f.read())
    assert not (pool / "m8.onnx").exists()


def test_status_shows_where_each_model_is_resident(procs: Processes, tmp_path: Path) -> None:
    pool = tmp_path / "pool"
    names = write_models(pool, 3)
    (pool / "m0.onnx.json").write_text(json.dumps({"replicas": {"min": 1}}))
    url, _, base = start(procs, pool, 2, "--memory-budget-bytes", str(BUDGET))
    for name in names[1:]:
        predict_row(base, name, 0)

    def view() -> dict:
        return json.loads(get(f"{base}/api/v1/status"))

    def complete() -> bool:
        where = view()["residency"]
        return len(where.get("m0.onnx", [])) == 2 and all(where.get(n) for n in names[1:])
    wait_for(complete, 20, "both workers' residency in the status")
    status = view()
    nodes = {w["node"] for w in status["workers"]}
    assert {e["node"] for e in status["residency"]["m0.onnx"]} == nodes
    assert all(e["pinned"] and e["bytes"] >= SIZE for e in status["residency"]["m0.onnx"])
    for w in status["workers"]:
        assert w["memory_budget_bytes"] == BUDGET and w["resident_bytes"]["total"] <= BUDGET
        assert w["models_pinned"] == ["m0.onnx"] and w["model_replicas"] == {"m0.onnx": {"min": 1, "max": 0}}
    page = get(f"{base}/status")
    assert "Models resident" in page and "(pinned)" in page and all(n in page for n in names)
