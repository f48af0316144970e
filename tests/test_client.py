"""The direct clients as users call them: results, many in flight, deadlines and typed errors."""
from __future__ import annotations

import asyncio
import time

import numpy as np
import onnxruntime as ort
import pytest

from broker.client import AsyncClient, Client
from broker.errors import BadInput, ModelNotFound, NoWorkerAvailable, Timeout

from .harness import BUNDLED, busy_workers, free_port
from .onnx_models import slow_input, slow_model, two_input_model

pytestmark = pytest.mark.slow  # starts real processes

IRIS = ort.InferenceSession(str(BUNDLED / "iris.onnx"), providers=["CPUExecutionProvider"])


def test_predict_matches_onnx_runtime_in_process(client):
    rows = np.random.default_rng(1).uniform(0, 8, (16, 4)).astype(np.float32)
    label, proba = IRIS.run(None, {"float_input": rows})
    outputs = client.predict("iris.onnx", {"float_input": rows})
    assert list(outputs) == ["label", "probabilities"]
    np.testing.assert_array_equal(outputs["label"], label)
    np.testing.assert_allclose(outputs["probabilities"], proba)


def test_inputs_by_name_by_position_and_chosen_outputs(client):
    client.upload("pair.onnx", two_input_model())
    a, b = np.array([[1, 2]], np.float32), np.array([[3, 4]], np.float32)
    assert client.predict("pair.onnx", {"a": a, "b": b}, outputs=["prod"])["prod"].tolist() == [[3, 8]]
    assert client.predict("pair.onnx", [a, b])["sum"].tolist() == [[4, 6]]
    with pytest.raises(BadInput, match="unknown input 'c'"):
        client.predict("pair.onnx", {"a": a, "c": b})
    with pytest.raises(BadInput, match="unknown output"):
        client.predict("pair.onnx", {"a": a, "b": b}, outputs=["nope"])


def test_shape_and_dtype_errors_name_what_the_model_expects(client):
    with pytest.raises(BadInput, match=r"expects shape \[N, 4\]"):
        client.predict("iris.onnx", {"float_input": np.zeros((1, 3), np.float32)})
    with pytest.raises(BadInput, match="expects float32"):
        client.predict("iris.onnx", {"float_input": np.array([["a", "b", "c", "d"]])})


def test_model_not_found_and_bad_names(client):
    with pytest.raises(ModelNotFound):
        client.predict("nope.onnx", {"x": [1.0]})
    with pytest.raises(BadInput, match="plain file name"):
        client.model_info("../etc/passwd.onnx")


def test_model_lifecycle_and_invalid_uploads_leave_the_pool_unchanged(client, cluster):
    before = client.models()
    with pytest.raises(BadInput, match="ONNX Runtime"):
        client.upload("junk.onnx", b"this is not onnx")
    with pytest.raises(BadInput):
        client.upload("half.onnx", (BUNDLED / "iris.onnx").read_bytes()[:100])
    assert client.models() == before
    client.upload("copy.onnx", (BUNDLED / "iris.onnx").read_bytes(), description="a copy")
    info = client.model_info("copy.onnx")
    assert info["description"] == "a copy" and info["inputs"][0] == {
        "name": "float_input", "dtype": "float32", "shape": [None, 4]}
    assert info["size_bytes"] == (BUNDLED / "iris.onnx").stat().st_size
    client.describe("copy.onnx", "described")
    assert {"model": "copy.onnx", "description": "described"} in client.information()
    client.delete("copy.onnx")
    assert client.models() == before
    with pytest.raises(ModelNotFound):
        client.delete("copy.onnx")


def test_many_requests_in_flight_on_one_async_connection(cluster):
    rows = np.random.default_rng(2).uniform(0, 8, (64, 4)).astype(np.float32)
    expected = IRIS.run(None, {"float_input": rows})[0]

    async def scenario():
        async with AsyncClient(cluster.url, timeout_s=10) as aclient:
            return await asyncio.gather(*(aclient.predict("iris.onnx", {"float_input": rows[i:i + 1]})
                                          for i in range(64)))

    labels = [o["label"][0] for o in asyncio.run(scenario())]
    assert labels == expected.tolist()


def test_sync_pipelining_keeps_order(client):
    results = client.call_many([("echo", {"data": i}) for i in range(200)], window=32)
    assert [r["data"] for r in results] == list(range(200))


def test_a_call_past_its_deadline_raises_timeout_and_the_late_reply_is_ignored(client, cluster):
    client.upload("slow.onnx", slow_model())
    deadline_s = 0.3
    feed = slow_input(3 * deadline_s)
    started = time.monotonic()
    with pytest.raises(Timeout):
        client.predict("slow.onnx", feed, timeout_s=deadline_s)
    assert time.monotonic() - started >= deadline_s - 0.01  # (the client counts whole milliseconds)
    assert busy_workers(cluster.url) == 1  # raised while the call still computes: the deadline did it
    assert client.echo("next")["data"] == "next"  # not confused by the slow call's late reply


def test_unreachable_broker_is_a_fast_no_worker_error():
    with Client(f"tcp://127.0.0.1:{free_port()}", timeout_s=30) as client:
        started = time.monotonic()
        with pytest.raises(NoWorkerAvailable, match="cannot reach the broker"):
            client.models()
        assert time.monotonic() - started < client.timeout_s / 2  # fails fast, never waits the deadline out
        assert client.service_ready(timeout_s=0.2) is False
