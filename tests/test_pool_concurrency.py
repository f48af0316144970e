"""Concurrent upload, delete and predict of one model across two workers: never torn, never stale."""
from __future__ import annotations

import threading

import numpy as np
import pytest

from broker.client import Client
from broker.errors import ModelNotFound

from .onnx_models import constant_model

pytestmark = pytest.mark.slow  # starts real processes

A, B = constant_model(1.0), constant_model(2.0)
NAME = "flip.onnx"


def _value(client: Client) -> float:
    return float(client.predict(NAME, {"x": np.zeros((1, 1), np.float32)})["y"][0, 0])


def test_readers_see_whole_models_and_writers_never_see_stale_answers(cluster):
    url, stop, seen, problems = cluster.url, threading.Event(), set(), []

    def reader():
        with Client(url, timeout_s=10) as client:
            while not stop.is_set():
                try:
                    seen.add(_value(client))
                except ModelNotFound:
                    seen.add("missing")
                except Exception as exc:  # a torn file would surface here as a load failure
                    problems.append(repr(exc))

    readers = [threading.Thread(target=reader) for _ in range(3)]
    for t in readers:
        t.start()
    try:
        with Client(url, timeout_s=10) as writer:
            for _ in range(15):
                writer.upload(NAME, A)
                assert [_value(writer) for _ in range(2)] == [1.0, 1.0]  # both workers, fresh
                writer.upload(NAME, B)
                assert [_value(writer) for _ in range(2)] == [2.0, 2.0]
                writer.delete(NAME)
                for _ in range(2):
                    try:
                        _value(writer)
                        raise AssertionError("a deleted model still answered")
                    except ModelNotFound:
                        pass
    finally:
        stop.set()
        for t in readers:
            t.join(10)
    assert problems == []
    assert seen <= {1.0, 2.0, "missing"} and len(seen) >= 2


def test_no_temp_files_are_left_in_the_pool(cluster):
    with Client(cluster.url, timeout_s=10) as client:
        client.upload(NAME, A, description="first")
        client.describe(NAME, "second")
        client.delete(NAME)
    leftovers = [p.name for p in cluster.model_dir.iterdir() if p.name.endswith(".tmp")]
    assert leftovers == []
