"""Small ONNX models that tests build with the onnx helper API: real models, made on the spot."""
from __future__ import annotations

import functools
import math
import time

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper


def _model(nodes: list, inputs: list, outputs: list, initializers: list = ()) -> bytes:
    graph = helper.make_graph(nodes, "test", inputs, outputs, list(initializers))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString()


SLOW_N = 256  # the loop state is SLOW_N x SLOW_N: one step is one matrix product


def _orthogonal(n: int) -> np.ndarray:
    q, _ = np.linalg.qr(np.random.default_rng(0).standard_normal((n, n)))
    return q.astype(np.float32)  # NOTE: orthogonal, so any power of it stays bounded


def slow_model() -> bytes:
    """y = sum(W^(k+1)) for an input k: k loop steps, each a matrix product, so k sets how long a call
    takes while the input ({"k": [k]}) and the output ([1, 1]) stay tiny. See slow_input()."""
    v = lambda name: helper.make_tensor_value_info(name, TensorProto.FLOAT, [SLOW_N, SLOW_N])  # noqa: E731
    body = helper.make_graph(
        [helper.make_node("Identity", ["cond_in"], ["cond_out"]), helper.make_node("MatMul", ["v_in", "w"], ["v_out"])],
        "step", [helper.make_tensor_value_info("i", TensorProto.INT64, []),
                 helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []), v("v_in")],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []), v("v_out")])
    return _model(
        [helper.make_node("Squeeze", ["k", "axes"], ["m"]), helper.make_node("Loop", ["m", "", "w"], ["v"], body=body),
         helper.make_node("ReduceSum", ["v"], ["y"], keepdims=1)],
        [helper.make_tensor_value_info("k", TensorProto.INT64, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1])],
        [numpy_helper.from_array(_orthogonal(SLOW_N), "w"), numpy_helper.from_array(np.array([0], np.int64), "axes")])


SLOW_ATOL = 0.05  # float32 products drift from the float64 reference by about 1e-3 over thousands of steps


def slow_expected(k: int) -> float:
    """What slow_model() answers for k, computed without ONNX Runtime (compare within SLOW_ATOL)."""
    return float(np.linalg.matrix_power(_orthogonal(SLOW_N).astype(np.float64), k + 1).sum())


@functools.cache
def _step_cpu_s() -> float:
    """CPU seconds of one loop step in a one-thread session, as the test workers run it.

    CPU time of the calling thread (ONNX Runtime computes on it with one intra-op thread), not wall
    time: other load on the machine can only make a call slower than this, never faster.
    """
    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    session = ort.InferenceSession(slow_model(), options, providers=["CPUExecutionProvider"])
    feed, steps, best = {"k": np.array([200], np.int64)}, 200, float("inf")
    for _ in range(5):
        started = time.thread_time()
        session.run(None, feed)
        best = min(best, time.thread_time() - started)
    return best / steps


SLACK = 1.5  # NOTE: a busy sibling hyperthread or a clock change can make the calibration run slower


def slow_steps(seconds: float) -> int:
    """Loop steps for a slow_model() call of at least `seconds`, calibrated on this machine."""
    return max(1, math.ceil(SLACK * seconds / _step_cpu_s()))


def slow_input(seconds: float) -> dict[str, np.ndarray]:
    """The input of a slow_model() call that computes for at least `seconds` on a one-thread worker."""
    return {"k": np.array([slow_steps(seconds)], np.int64)}


def constant_model(value: float) -> bytes:
    """y = x * 0 + value: tells which version of a model answered."""
    return _model(
        [helper.make_node("Mul", ["x", "zero"], ["z"]), helper.make_node("Add", ["z", "c"], ["y"])],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 1])],
        [numpy_helper.from_array(np.array(0, np.float32), "zero"),
         numpy_helper.from_array(np.array(value, np.float32), "c")])


def two_input_model() -> bytes:
    """sum = a + b, prod = a * b: named inputs and several outputs."""
    a = helper.make_tensor_value_info("a", TensorProto.FLOAT, [None, 2])
    b = helper.make_tensor_value_info("b", TensorProto.FLOAT, [None, 2])
    return _model([helper.make_node("Add", ["a", "b"], ["sum"]), helper.make_node("Mul", ["a", "b"], ["prod"])],
                  [a, b], [helper.make_tensor_value_info("sum", TensorProto.FLOAT, [None, 2]),
                           helper.make_tensor_value_info("prod", TensorProto.FLOAT, [None, 2])])


def identity_model(shape: list) -> bytes:
    """y = x for a float input of `shape`: shows exactly what preprocessing fed the model."""
    return _model([helper.make_node("Identity", ["x"], ["y"])],
                  [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)])


def string_identity_model() -> bytes:
    """y = x for a string tensor: BYTES in and out."""
    return _model([helper.make_node("Identity", ["x"], ["y"])],
                  [helper.make_tensor_value_info("x", TensorProto.STRING, [None])],
                  [helper.make_tensor_value_info("y", TensorProto.STRING, [None])])


def external_data_model(location: str, length: int = 16) -> bytes:
    """y = w, where w's bytes live in an external file at `location` (what a hostile upload abuses)."""
    w = TensorProto()
    w.name, w.data_type, w.data_location = "w", TensorProto.UINT8, TensorProto.EXTERNAL
    w.dims.extend([length])
    for key, value in (("location", location), ("offset", "0"), ("length", str(length))):
        entry = w.external_data.add()
        entry.key, entry.value = key, value
    return _model([helper.make_node("Identity", ["w"], ["y"])], [],
                  [helper.make_tensor_value_info("y", TensorProto.UINT8, [length])], [w])


SIZED_COLUMNS = 4


def sized_table(nbytes: int, seed: int) -> np.ndarray:
    """The float32 table of sized_model(nbytes, seed): nbytes // 16 rows of SIZED_COLUMNS."""
    rows = max(1, nbytes // (4 * SIZED_COLUMNS))
    return np.random.default_rng(seed).standard_normal((rows, SIZED_COLUMNS)).astype(np.float32)


def sized_model(nbytes: int, seed: int = 0) -> bytes:
    """y = table[i]: a model whose file and session weigh about `nbytes` (one float32 initializer,
    held once by ONNX Runtime: Gather neither prepacks nor folds it), answering rows of its table, so
    a caller can tell the model and check the answer (sized_table). Input i: int64 [N]; y: [N, 4]."""
    return _model([helper.make_node("Gather", ["table", "i"], ["y"], axis=0)],
                  [helper.make_tensor_value_info("i", TensorProto.INT64, [None])],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, SIZED_COLUMNS])],
                  [numpy_helper.from_array(sized_table(nbytes, seed), "table")])
