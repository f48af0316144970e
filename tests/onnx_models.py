"""Small ONNX models that tests build with the onnx helper API: real models, made on the spot."""
from __future__ import annotations

import numpy as np
from onnx import TensorProto, helper, numpy_helper


def _model(nodes: list, inputs: list, outputs: list, initializers: list = ()) -> bytes:
    graph = helper.make_graph(nodes, "test", inputs, outputs, list(initializers))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString()


def slow_model(matmuls: int = 50) -> bytes:
    """y = x @ x @ ... @ x: compute time grows with x's size, so a test picks how long a call takes."""
    nodes, last = [], "x"
    for i in range(matmuls):
        nodes.append(helper.make_node("MatMul", [last, "x"], [f"m{i}"]))
        last = f"m{i}"
    nodes.append(helper.make_node("Identity", [last], ["y"]))
    return _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, None])],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, None])])


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


def slow_input() -> np.ndarray:
    """An input for slow_model() that takes over a second with one thread on this machine kind."""
    n = 1000
    return (np.random.default_rng(0).random((n, n), dtype=np.float32) / n).astype(np.float32)


def slow_scalar_model(n: int = 1000, matmuls: int = 50) -> bytes:
    """Like slow_model, from a [1, 1] input expanded to [n, n]: slow to run, tiny to send as JSON."""
    nodes = [helper.make_node("Expand", ["x", "shape"], ["e"])]
    last = "e"
    for i in range(matmuls):
        nodes.append(helper.make_node("MatMul", [last, "e"], [f"m{i}"]))
        last = f"m{i}"
    nodes.append(helper.make_node("ReduceSum", [last], ["y"], keepdims=0))
    return _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1])],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [])],
                  [numpy_helper.from_array(np.array([n, n], np.int64), "shape")])


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
