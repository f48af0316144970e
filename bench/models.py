"""The benchmark model set, made with the onnx helper API (random weights: speed is the point).

    python bench/models.py OUT_DIR

iris.onnx    the bundled classifier (tiny).
convnet.onnx ResNet-style: 1x3x224x224 -> stem conv 7x7/2 + pool, three stages of residual blocks
             (3x3 convs, 64 -> 128 -> 256 channels, stride 2 between stages), global pool, FC to 1000
             classes, softmax. Batch dimension dynamic, so the worker can batch it.
mlp.onnx     8 dense layers of 256 (per row ~1 MFLOP): where a run's fixed cost dominates one row.
"""
from __future__ import annotations

import shutil
import sys
from pathlib import Path

import numpy as np
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


def write(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(REPO / "worker" / "models" / "iris.onnx", out / "iris.onnx")
    (out / "convnet.onnx").write_bytes(convnet())
    (out / "mlp.onnx").write_bytes(mlp())


if __name__ == "__main__":
    write(Path(sys.argv[1] if len(sys.argv) > 1 else "bench-models"))
