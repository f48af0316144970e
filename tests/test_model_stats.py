"""Workers count inferences per model (Triton's statistics) and report them through the broker's
status polls; `config` tells the batching a worker applies to a model."""
from __future__ import annotations

import asyncio

import numpy as np
import pytest

from broker.client import AsyncClient, Client
from broker.errors import BadInput, ModelNotFound

from .harness import free_port, start_frontend, wait_for, wait_workers

pytestmark = pytest.mark.slow  # starts real processes

STATUS = ["--status-interval-s", "0.2"]
ROW = np.array([[2, 5, 1, 4]], np.float32)


def summed(url: str, model: str) -> dict:
    """The model's statistics summed over the workers, as the broker last heard them."""
    with Client(url, timeout_s=5) as c:
        status = c.broker_status(timeout_s=5) or {"workers": []}
    total = {"inference_count": 0, "execution_count": 0, "success": 0, "fail": 0, "queue": 0, "infer_ns": 0}
    freshest = {}  # NOTE: a worker process with N connections is N rows with one node and one pool
    for w in status["workers"]:
        if w.get("status_age_s") is not None and (w["node"] not in freshest
                                                  or w["status_age_s"] < freshest[w["node"]]["status_age_s"]):
            freshest[w["node"]] = w
    for w in freshest.values():
        stats = (w.get("model_stats") or {}).get(model)
        if stats:
            total["inference_count"] += stats["inference_count"]
            total["execution_count"] += stats["execution_count"]
            for phase in ("success", "fail", "queue"):
                total[phase] += stats["inference_stats"][phase]["count"]
            total["infer_ns"] += stats["inference_stats"]["compute_infer"]["ns"]
    return total


@pytest.fixture
def stats_cluster(procs, model_dir):
    url = f"tcp://127.0.0.1:{free_port()}"
    procs.broker(url, *STATUS)
    for _ in range(2):
        procs.worker(url, model_dir)
    wait_workers(url, 2)
    return url


def test_counts_rise_by_exactly_the_inferences_made_over_all_workers(stats_cluster):
    with Client(stats_cluster, timeout_s=10) as c:
        for _ in range(5):
            c.predict("iris.onnx", {"float_input": ROW})
        c.predict("iris.onnx", {"float_input": np.repeat(ROW, 3, axis=0)})  # 3 rows: 3 inferences
        with pytest.raises(BadInput):
            c.predict("iris.onnx", {"float_input": np.ones((1, 5), np.float32)})
    want = {"inference_count": 8, "execution_count": 6, "success": 6, "fail": 1}
    wait_for(lambda: {k: summed(stats_cluster, "iris.onnx")[k] for k in want} == want, 20, "statistics")
    total = summed(stats_cluster, "iris.onnx")
    assert total["queue"] == 6 and total["infer_ns"] > 0


def test_a_batching_worker_counts_rows_and_runs(procs, model_dir):
    url = f"tcp://127.0.0.1:{free_port()}"
    procs.broker(url, *STATUS)
    procs.worker(url, model_dir, "--connections", "8", "--batch-max-size", "8", "--batch-max-delay-us", "20000")
    wait_workers(url, 1)

    async def burst() -> None:
        async with AsyncClient(url, timeout_s=20) as c:
            await asyncio.gather(*(c.predict("iris.onnx", {"float_input": ROW}) for _ in range(16)))
    asyncio.run(burst())
    wait_for(lambda: summed(url, "iris.onnx")["inference_count"] == 16, 20, "statistics")
    total = summed(url, "iris.onnx")
    assert total["success"] == 16 and total["fail"] == 0
    assert 1 <= total["execution_count"] < 16  # some requests shared a run


def test_config_tells_the_batching_applied(procs, model_dir):
    url = f"tcp://127.0.0.1:{free_port()}"
    procs.broker(url)
    (model_dir / "diabetes.onnx.json").write_text('{"dynamic_batching": false}')
    procs.worker(url, model_dir, "--batch-max-size", "16", "--batch-preferred-sizes", "4,8")
    wait_workers(url, 1)
    with Client(url, timeout_s=10) as c:
        iris = c.model_config("iris.onnx")
        assert iris["max_batch_size"] == 16
        assert iris["dynamic_batching"] == {"max_queue_delay_us": 500, "preferred_batch_sizes": [4, 8]}
        assert iris["inputs"] == [{"name": "float_input", "dtype": "float32", "shape": [None, 4]}]
        off = c.model_config("diabetes.onnx")
        assert off["max_batch_size"] == 0 and off["dynamic_batching"] is None
        with pytest.raises(ModelNotFound):
            c.model_config("nope.onnx")


def test_rest_counts_a_worker_with_many_connections_once(procs, model_dir):
    import tritonclient.http as th
    url = f"tcp://127.0.0.1:{free_port()}"
    procs.broker(url, *STATUS)
    procs.worker(url, model_dir, "--connections", "4")
    wait_workers(url, 1)
    rest = th.InferenceServerClient(start_frontend(procs, url).removeprefix("http://"))
    try:
        for _ in range(3):
            tensor = th.InferInput("float_input", [1, 4], "FP32")
            tensor.set_data_from_numpy(ROW)
            rest.infer("iris.onnx", [tensor])

        def reporting() -> int:
            """Connections whose last status shows all 3 inferences (each reports the process's counts)."""
            with Client(url, timeout_s=5) as c:
                rows = c.broker_status(timeout_s=5)["workers"]
            return sum(((w.get("model_stats") or {}).get("iris.onnx") or {}).get("inference_count") == 3
                       for w in rows)
        wait_for(lambda: reporting() == 4, 20, "every connection's status to show the inferences")
        assert rest.get_inference_statistics("iris.onnx")["model_stats"][0]["inference_count"] == 3  # not 12
    finally:
        rest.close()
