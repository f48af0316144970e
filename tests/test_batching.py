"""Dynamic batching in the worker: concurrent requests with different row counts get exactly their
own rows back, a bad request fails alone, and batching really happens (fewer runs than requests)."""
from __future__ import annotations

import asyncio
import json
import re
import urllib.request

import numpy as np
import onnxruntime as ort
import pytest

from broker.client import AsyncClient, Client
from broker.errors import BadInput

from .harness import BUNDLED, free_port, wait_workers
from .onnx_models import identity_model, sized_model, sized_table, two_input_model

pytestmark = pytest.mark.slow  # starts real processes

IRIS = ort.InferenceSession(str(BUNDLED / "iris.onnx"), providers=["CPUExecutionProvider"])
BATCHING = ["--connections", "16", "--batch-max-size", "64", "--batch-max-delay-us", "3000"]


@pytest.fixture
def batching_worker(procs, broker_url, model_dir):
    port = free_port()
    procs.worker(broker_url, model_dir, *BATCHING, "--metrics-port", str(port))
    wait_workers(broker_url, 1)
    return broker_url, f"http://127.0.0.1:{port}/metrics"


def runs_and_requests(metrics_url: str, model: str) -> tuple[float, float]:
    with urllib.request.urlopen(metrics_url, timeout=5) as resp:
        text = resp.read().decode()
    runs = sum(float(v) for v in re.findall(
        rf'^fractal_worker_inference_seconds_count{{model="{re.escape(model)}",[^}}]*}} (\S+)$', text, re.M))
    requests = sum(float(v) for v in re.findall(
        r'^fractal_worker_requests_total{node="[^"]*",op="predict",outcome="[a-z]+"} (\S+)$', text, re.M))
    return runs, requests


async def _gather(url: str, calls: list) -> list:
    async with AsyncClient(url, timeout_s=30) as client:
        return await asyncio.gather(*(client.predict(*call) for call in calls), return_exceptions=True)


def test_concurrent_requests_get_exactly_their_own_rows(batching_worker):
    url, metrics = batching_worker
    rng = np.random.default_rng(11)
    batches = [rng.uniform(0, 8, (int(n), 4)).astype(np.float32) for n in rng.integers(1, 8, 120)]
    results = asyncio.run(_gather(url, [("iris.onnx", {"float_input": rows}) for rows in batches]))
    for rows, outputs in zip(batches, results, strict=True):
        label, proba = IRIS.run(None, {"float_input": rows})
        np.testing.assert_array_equal(outputs["label"], label)
        np.testing.assert_allclose(outputs["probabilities"], proba)
    runs, requests = runs_and_requests(metrics, "iris.onnx")
    assert requests >= 120 and runs < requests / 2  # batched for real


def test_a_bad_request_in_a_batch_fails_alone(batching_worker):
    url, _ = batching_worker
    with Client(url) as client:
        client.upload("pair.onnx", two_input_model())
    good = [("pair.onnx", {"a": np.full((2, 2), i, np.float32), "b": np.ones((2, 2), np.float32)})
            for i in range(20)]
    bad = [("pair.onnx", {"a": np.ones((2, 2), np.float32), "b": np.ones((3, 2), np.float32)}),  # rows disagree
           ("pair.onnx", {"a": np.ones((2, 3), np.float32), "b": np.ones((2, 3), np.float32)}),  # wrong width
           ("pair.onnx", {"a": np.ones((1, 2), np.float32)})]                                    # missing input
    calls = good[:10] + bad + good[10:]
    results = asyncio.run(_gather(url, calls))
    errors = [r for r in results if isinstance(r, Exception)]
    assert len(errors) == 3 and all(isinstance(e, BadInput) for e in errors)
    answers = [r for r in results if not isinstance(r, Exception)]
    for (_, inputs), outputs in zip(good, answers, strict=True):
        np.testing.assert_array_equal(outputs["sum"], inputs["a"] + inputs["b"])


def test_models_with_a_fixed_first_dimension_or_batching_off_run_alone(batching_worker, model_dir):
    url, metrics = batching_worker
    with Client(url) as client:
        client.upload("fixed.onnx", identity_model([1, 4]))
        client.upload("solo.onnx", (BUNDLED / "iris.onnx").read_bytes())
    (model_dir / "solo.onnx.json").write_text(json.dumps({"dynamic_batching": False}))
    fixed = [("fixed.onnx", {"x": np.full((1, 4), i, np.float32)}) for i in range(30)]
    solo = [("solo.onnx", {"float_input": np.full((1, 4), i % 7, np.float32)}) for i in range(30)]
    results = asyncio.run(_gather(url, fixed + solo))
    for (_, inputs), outputs in zip(fixed, results[:30], strict=False):
        np.testing.assert_array_equal(outputs["y"], inputs["x"])
    assert runs_and_requests(metrics, "fixed.onnx")[0] == 30
    assert runs_and_requests(metrics, "solo.onnx")[0] == 30


def test_rows_of_different_widths_never_share_a_run(batching_worker):
    url, _ = batching_worker
    with Client(url) as client:
        client.upload("any.onnx", identity_model([None, None]))
    calls = [("any.onnx", {"x": np.full((1, width), width, np.float32)}) for width in (3, 5, 3, 7, 5) * 6]
    results = asyncio.run(_gather(url, calls))
    for (_, inputs), outputs in zip(calls, results, strict=True):
        np.testing.assert_array_equal(outputs["y"], inputs["x"])


def test_malformed_requests_and_sidecars_do_not_stop_a_batching_worker(batching_worker, model_dir):
    url, _ = batching_worker
    with Client(url) as client:
        with pytest.raises(BadInput, match="list of output names"):
            client.call("predict", {"model": "iris.onnx", "inputs": {"float_input": [[1, 2, 3, 4]]}, "outputs": 5})
        (model_dir / "iris.onnx.json").write_text(json.dumps(
            {"description": "x", "dynamic_batching": {"preferred_batch_sizes": 8, "max_batch_size": "many"}}))
        rows = np.array([[2, 5, 1, 4]], np.float32)
        assert client.predict("iris.onnx", {"float_input": rows})["label"].tolist() == [1]
    results = asyncio.run(_gather(url, [("iris.onnx", {"float_input": rows})] * 20))
    assert all(r["label"].tolist() == [1] for r in results)


def _load_seconds(metrics_url: str) -> float:
    with urllib.request.urlopen(metrics_url, timeout=5) as resp:
        text = resp.read().decode()
    return sum(float(v) for v in re.findall(r"^fractal_worker_model_load_seconds_sum{[^}]*} (\S+)$", text, re.M))


@pytest.mark.parametrize("batched", [True, False], ids=["batched", "alone"])
def test_worker_time_counts_a_cold_load_batched_or_not(batching_worker, model_dir, batched):
    """A first request's worker_ms (Server-Timing's worker part) counts from the worker's receipt of it, so
    it holds the model's load, batched or not, and the load never shows as queue time. The load's own time
    is the worker's model_load_seconds, read before and after."""
    url, metrics = batching_worker
    name = "cold.onnx"
    if not batched:
        (model_dir / "cold.onnx.json").write_text(json.dumps({"dynamic_batching": False}))
    (model_dir / ".cold.onnx.part").write_bytes(sized_model(32 << 20, seed=3))
    (model_dir / ".cold.onnx.part").replace(model_dir / name)
    runs_before = runs_and_requests(metrics, name)[0]
    loaded_before = _load_seconds(metrics)
    timing: dict = {}
    with Client(url, timeout_s=60) as client:
        outputs = client.predict(name, {"i": np.array([5], np.int64)}, timing=timing)
    np.testing.assert_array_equal(outputs["y"], sized_table(32 << 20, 3)[[5]])
    load_ms = (_load_seconds(metrics) - loaded_before) * 1e3
    assert load_ms > 0, "the model was not loaded by this request"
    assert timing["worker_ms"] >= load_ms + timing["inference_ms"], (timing, load_ms)
    assert runs_and_requests(metrics, name)[0] == runs_before + 1
