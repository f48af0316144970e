"""bench/hot_model.py's run with real processes: a broker with placement, 1 then 2 workers pinning the
hot model, every answer right, and both replicas computing."""
from __future__ import annotations

import argparse

import numpy as np
import pytest

from bench.hot_model import COLD, COLD_BYTES, run, write_pool
from bench.models import CHAIN_WIDTH, matmul_chain_expected
from tests.onnx_models import sized_table

pytestmark = pytest.mark.slow  # starts real processes

LAYERS = 4


def test_one_then_two_replicas_answer_every_call_and_both_compute(tmp_path):
    write_pool(tmp_path / "pool", LAYERS)
    x = np.ones((1, CHAIN_WIDTH), np.float32)
    args = argparse.Namespace(callers=4, shared_client=False, cold_rate=4.0, duration_s=1.5)
    tables = [sized_table(COLD_BYTES, i) for i in range(COLD)]
    for replicas in (1, 2):
        r = run(tmp_path / "pool", tmp_path, replicas, args, x, matmul_chain_expected(LAYERS, x), tables)
        assert r["tally"].failed == [] and r["hot"] > 0, r
        assert len(r["tally"].cold) == 6  # 4 per second for 1.5 s, each checked against its model's table
        assert len(r["threads"]) == replicas and all(on > 0 for on, _wait in r["threads"]), r
        assert r["cores"]["client"] > 0 and r["worker_ms_per_hot"] > 0
