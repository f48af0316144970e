"""The hot-model bench's pieces, in process: the compute-bound model answers as its reference, and
/proc's schedstat counts a busy thread's time on a CPU."""
from __future__ import annotations

import os
import threading
import time

import numpy as np
import onnxruntime as ort

from bench.models import matmul_chain, matmul_chain_expected, run_cpu_s

from .harness import sched_s


def test_matmul_chain_answers_as_its_float64_reference():
    x = np.random.default_rng(3).standard_normal((1, 64)).astype(np.float32)
    session = ort.InferenceSession(matmul_chain(5, width=64), providers=["CPUExecutionProvider"])
    y, = session.run(None, {"x": x})
    assert y.shape == (1, 64)
    np.testing.assert_allclose(y, matmul_chain_expected(5, x, width=64), atol=1e-4)
    assert not np.allclose(y, matmul_chain_expected(4, x, width=64), atol=1e-2)  # every layer counts


def test_a_longer_chain_costs_more_cpu_per_run():
    x = {"x": np.ones((1, 128), np.float32)}
    assert run_cpu_s(matmul_chain(24, width=128), x) > 4 * run_cpu_s(matmul_chain(2, width=128), x)


def test_sched_s_counts_a_busy_threads_time_on_a_cpu():
    seen: dict[str, float] = {}

    def spin() -> None:
        tid = threading.get_native_id()
        before, cpu = sched_s(os.getpid(), tid), time.thread_time()
        while time.thread_time() - cpu < 0.2:
            pass
        seen["cpu"] = time.thread_time() - cpu
        after = sched_s(os.getpid(), tid)
        seen["on"], seen["waiting"] = after[0] - before[0], after[1] - before[1]
    thread = threading.Thread(target=spin)
    thread.start()
    thread.join()
    assert seen["on"] >= 0.9 * seen["cpu"] and seen["waiting"] >= 0
