"""A tiny ONNX graph builder for the bundled example models (seeded random weights).

Weights are He-initialised and BatchNorm statistics are random but sane, so activations
stay O(1) through deep nets and numeric checks are meaningful.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17


class Net:
    """Appends nodes and initializers; every method returns the name of its output tensor."""

    def __init__(self, name: str, seed: int = 0):
        self.name = name
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.inputs: list[onnx.ValueInfoProto] = []
        self.count: dict[str, int] = {}

    def _name(self, kind: str) -> str:
        k = self.count.get(kind, 0)
        self.count[kind] = k + 1
        return f"{kind}{k}"

    def const(self, value: np.ndarray, kind: str = "w") -> str:
        name = self._name(kind)
        self.inits.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def node(self, op: str, inputs: list[str], n_out: int = 1, prefix: str | None = None, **attrs) -> str | list[str]:
        base = self._name(prefix or op.lower())
        outs = [base] if n_out == 1 else [f"{base}_{i}" for i in range(n_out)]
        self.nodes.append(helper.make_node(op, inputs, outs, name=base, **attrs))
        return outs[0] if n_out == 1 else outs

    def input(self, name: str, shape: tuple[int, ...]) -> str:
        self.inputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, list(shape)))
        return name

    # layers -----------------------------------------------------------------------------
    def conv(self, x: str, cin: int, cout: int, k: int = 3, stride: int = 1, groups: int = 1,
             bn: bool = True, act: str | None = "relu", bias: bool = False) -> str:
        fan_in = cin // groups * k * k
        w = self.const((self.rng.standard_normal((cout, cin // groups, k, k)) * np.sqrt(2.0 / fan_in)).astype(np.float32))
        ins = [x, w]
        if bias:
            ins.append(self.const((self.rng.standard_normal(cout) * 0.1).astype(np.float32), "b"))
        p = k // 2
        y = self.node("Conv", ins, prefix="conv", kernel_shape=[k, k], strides=[stride, stride], pads=[p, p, p, p], group=groups)
        if bn:
            y = self.batchnorm(y, cout)
        return self.act(y, act)

    def batchnorm(self, x: str, c: int) -> str:
        r = self.rng
        scale = self.const((1.0 + 0.1 * r.standard_normal(c)).astype(np.float32), "bn_scale")
        beta = self.const((0.1 * r.standard_normal(c)).astype(np.float32), "bn_bias")
        mean = self.const((0.1 * r.standard_normal(c)).astype(np.float32), "bn_mean")
        var = self.const((1.0 + 0.1 * np.abs(r.standard_normal(c))).astype(np.float32), "bn_var")
        return self.node("BatchNormalization", [x, scale, beta, mean, var], prefix="bn", epsilon=1e-5)

    def act(self, x: str, act: str | None) -> str:
        if act is None:
            return x
        if act == "relu":
            return self.node("Relu", [x])
        if act == "relu6":
            lo = self.const(np.array(0.0, np.float32), "lo")
            hi = self.const(np.array(6.0, np.float32), "hi")
            return self.node("Clip", [x, lo, hi], prefix="relu6_")
        if act == "gelu":
            # the erf form torch exports: 0.5 * x * (1 + erf(x / sqrt(2)))
            d = self.node("Div", [x, self.const(np.array(np.sqrt(2.0), np.float32), "c")])
            e = self.node("Erf", [d])
            a = self.node("Add", [e, self.const(np.array(1.0, np.float32), "c")])
            m = self.node("Mul", [x, a])
            return self.node("Mul", [m, self.const(np.array(0.5, np.float32), "c")])
        raise ValueError(act)

    def add(self, a: str, b: str) -> str:
        return self.node("Add", [a, b])

    def maxpool(self, x: str, k: int = 3, s: int = 2) -> str:
        p = k // 2
        return self.node("MaxPool", [x], kernel_shape=[k, k], strides=[s, s], pads=[p, p, p, p])

    def avgpool(self, x: str, k: int = 3, s: int = 1) -> str:
        p = k // 2
        return self.node("AveragePool", [x], kernel_shape=[k, k], strides=[s, s], pads=[p, p, p, p], count_include_pad=0)

    def concat(self, xs: list[str], axis: int = 1) -> str:
        return self.node("Concat", xs, axis=axis)

    def head(self, x: str, c: int, classes: int) -> str:
        """Global average pool, flatten, linear classifier."""
        g = self.node("GlobalAveragePool", [x], prefix="gap")
        f = self.node("Flatten", [g], axis=1)
        return self.linear(f, c, classes, prefix="logits")

    def linear(self, x: str, cin: int, cout: int, prefix: str = "fc") -> str:
        w = self.const((self.rng.standard_normal((cin, cout)) * np.sqrt(1.0 / cin)).astype(np.float32))
        b = self.const((0.01 * self.rng.standard_normal(cout)).astype(np.float32), "b")
        return self.node("Gemm", [x, w, b], prefix=prefix)

    def matmul(self, x: str, cin: int, cout: int) -> str:
        w = self.const((self.rng.standard_normal((cin, cout)) * np.sqrt(1.0 / cin)).astype(np.float32))
        b = self.const((0.01 * self.rng.standard_normal(cout)).astype(np.float32), "b")
        return self.node("Add", [self.node("MatMul", [x, w]), b])

    def layernorm(self, x: str, c: int) -> str:
        g = self.const((1.0 + 0.1 * self.rng.standard_normal(c)).astype(np.float32), "ln_scale")
        b = self.const((0.1 * self.rng.standard_normal(c)).astype(np.float32), "ln_bias")
        return self.node("LayerNormalization", [x, g, b], prefix="ln", axis=-1, epsilon=1e-5)

    def shape_const(self, shape: list[int]) -> str:
        return self.const(np.array(shape, np.int64), "shape")

    def build(self, output: str, doc: str = "") -> onnx.ModelProto:
        out = helper.make_tensor_value_info(output, TensorProto.FLOAT, None)
        graph = helper.make_graph(self.nodes, self.name, self.inputs, [out], self.inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="nasc.examples")
        model.ir_version = 8
        model.doc_string = doc
        model = onnx.shape_inference.infer_shapes(model)
        onnx.checker.check_model(model)
        return model
