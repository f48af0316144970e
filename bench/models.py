"""The benchmark model set, made with the onnx helper API (random weights: speed is the point).

    python bench/models.py OUT_DIR

iris.onnx    the bundled classifier (tiny).
convnet.onnx ResNet-style: 1x3x224x224 -> stem conv 7x7/2 + pool, three stages of residual blocks
             (3x3 convs, 64 -> 128 -> 256 channels, stride 2 between stages), global pool, FC to 1000
             classes, softmax. Batch dimension dynamic, so the worker can batch it.
mlp.onnx     8 dense layers of 256 (per row ~1 MFLOP): where a run's fixed cost dominates one row.

matmul_chain() (not in the set: bench/hot_model.py sizes it to this machine) is compute-bound with tiny
input and output: a 1 x width vector spreads into a width x width matrix that a chain of products runs.
"""
from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

REPO = Path(__file__).resolve().parent.parent


class _Graph:
    def __init__(self) -> None:
        self.nodes, self.inits, self.rng, self.n = [], [], np.random.default_rng(0), 0

    def name(self, prefix: str) -> str:
        self.n += 1
        return f"{prefix}{self.n}"

    def weight(self, shape: tuple, scale: float) -> str:
        name = self.name("w")
        self.inits.append(numpy_helper.from_array((self.rng.standard_normal(shape) * scale).astype(np.float32), name))
        return name

    def conv(self, x: str, cin: int, cout: int, k: int, stride: int = 1, relu: bool = True) -> str:
        w, b = self.weight((cout, cin, k, k), (2 / (cin * k * k)) ** 0.5), self.weight((cout,), 0.0)
        y = self.name("conv")
        self.nodes.append(helper.make_node("Conv", [x, w, b], [y], kernel_shape=[k, k], strides=[stride, stride],
                                           pads=[k // 2] * 4))
        if not relu:
            return y
        out = self.name("relu")
        self.nodes.append(helper.make_node("Relu", [y], [out]))
        return out

    def block(self, x: str, cin: int, cout: int, stride: int) -> str:
        h = self.conv(self.conv(x, cin, cout, 3, stride), cout, cout, 3, relu=False)
        skip = x if stride == 1 and cin == cout else self.conv(x, cin, cout, 1, stride, relu=False)
        added, out = self.name("add"), self.name("relu")
        self.nodes += [helper.make_node("Add", [h, skip], [added]), helper.make_node("Relu", [added], [out])]
        return out


def convnet() -> bytes:
    g = _Graph()
    x = g.conv("image", 3, 64, 7, 2)
    pooled = g.name("pool")
    g.nodes.append(helper.make_node("MaxPool", [x], [pooled], kernel_shape=[3, 3], strides=[2, 2], pads=[1] * 4))
    x, channels = pooled, 64
    for cout, stride in ((64, 1), (128, 2), (256, 2)):
        x = g.block(x, channels, cout, stride)
        channels = cout
    gap, flat, logits = g.name("gap"), g.name("flat"), g.name("fc")
    w, b = g.weight((channels, 1000), (1 / channels) ** 0.5), g.weight((1000,), 0.0)
    g.nodes += [helper.make_node("GlobalAveragePool", [x], [gap]), helper.make_node("Flatten", [gap], [flat]),
                helper.make_node("Gemm", [flat, w, b], [logits]),
                helper.make_node("Softmax", [logits], ["probabilities"], axis=1)]
    graph = helper.make_graph(g.nodes, "convnet", [helper.make_tensor_value_info("image", TensorProto.FLOAT,
                                                                                 [None, 3, 224, 224])],
                              [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, [None, 1000])],
                              g.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString()


def mlp(layers: int = 8, width: int = 256) -> bytes:
    g = _Graph()
    x = "x"
    for _ in range(layers):
        y, out = g.name("mm"), g.name("relu")
        g.nodes += [helper.make_node("MatMul", [x, g.weight((width, width), (2 / width) ** 0.5)], [y]),
                    helper.make_node("Relu", [y], [out])]
        x = out
    g.nodes.append(helper.make_node("Identity", [x], ["y"]))
    graph = helper.make_graph(g.nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, width])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, width])], g.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString()


CHAIN_WIDTH = 512  # one product is 2 x 512^3 = 268 MFLOP: compute-bound, its 1 MiB weight stays in L2/L3


def _chain_weights(layers: int, width: int) -> tuple[np.ndarray, list[np.ndarray]]:
    """The spread matrix and `layers` orthogonal matrices (so any product of them stays bounded)."""
    rng = np.random.default_rng(0)
    spread = (rng.standard_normal((width, width)) / width ** 0.5).astype(np.float32)
    return spread, [np.linalg.qr(rng.standard_normal((width, width)))[0].astype(np.float32) for _ in range(layers)]


def matmul_chain(layers: int, width: int = CHAIN_WIDTH) -> bytes:
    """y = sum over rows of ((x * S) @ Q1 @ ... @ Q_layers): x [1, width] -> y [1, width] (fixed batch of 1,
    so a worker never batches it). Each layer is one width^3 matrix product with its own weight."""
    spread, chain = _chain_weights(layers, width)
    nodes = [helper.make_node("Mul", ["x", "spread"], ["h0"])]
    inits = [numpy_helper.from_array(spread, "spread"), numpy_helper.from_array(np.array([0], np.int64), "axes")]
    for i, q in enumerate(chain, 1):
        inits.append(numpy_helper.from_array(q, f"q{i}"))
        nodes.append(helper.make_node("MatMul", [f"h{i - 1}", f"q{i}"], [f"h{i}"]))
    nodes.append(helper.make_node("ReduceSum", [f"h{layers}", "axes"], ["y"], keepdims=1))
    vector = [1, width]
    graph = helper.make_graph(nodes, "matmul_chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, vector)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, vector)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString()


def matmul_chain_expected(layers: int, x: np.ndarray, width: int = CHAIN_WIDTH) -> np.ndarray:
    """What matmul_chain(layers, width) answers for x, computed in float64 without ONNX Runtime."""
    spread, chain = _chain_weights(layers, width)
    h = x.astype(np.float64) * spread
    for q in chain:
        h = h @ q
    return h.sum(axis=0, keepdims=True)


def run_cpu_s(model: bytes, feed: dict, runs: int = 5) -> float:
    """The fewest CPU seconds one run of `model` took in a one-thread session (the thread's CPU time:
    other load on the machine can make a run slower than this, never faster)."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
    best = float("inf")
    for _ in range(runs):
        started = time.thread_time()
        session.run(None, feed)
        best = min(best, time.thread_time() - started)
    return best


def write(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(REPO / "worker" / "models" / "iris.onnx", out / "iris.onnx")
    (out / "convnet.onnx").write_bytes(convnet())
    (out / "mlp.onnx").write_bytes(mlp())


if __name__ == "__main__":
    write(Path(sys.argv[1] if len(sys.argv) > 1 else "bench-models"))
