"""Per-node costs of a loaded model: MACs, FLOPs, parameter and activation bytes.

`analyze` wraps a loaded ModelProto with its execution order, producer/consumer maps and
per-node numpy arrays; cuts, the latency model and the search all read from it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import ModelProto, helper

from nasc.backends.cpu_rules import winograd
from nasc.partitioner.load import activation_inputs, node_inputs
from nasc.types import TensorSpec

# Ops that only reinterpret or move metadata: no kernel of their own after compilation.
SHAPE_OPS = frozenset(
    {"Reshape", "Flatten", "Squeeze", "Unsqueeze", "Identity", "Dropout", "Shape", "Constant", "Size"}
)
# Elementwise/injective ops a compiler fuses into the producer's kernel when it has one consumer.
FUSABLE_OPS = frozenset(
    {
        "Relu", "Clip", "Sigmoid", "Tanh", "Add", "Mul", "Sub", "Div", "Erf", "HardSwish", "HardSigmoid",
        "LeakyRelu", "Gelu", "Neg", "Sqrt", "Pow", "Exp", "Cast", "BatchNormalization", "PRelu",
        "QuantizeLinear", "DequantizeLinear", "Where", "Max", "Min", "Abs", "Elu", "Softplus", "Mish",
    }
)
# FLOPs per output element for ops that are not MAC-dominated.
_ELEMENT_FLOPS = {"Softmax": 5, "LayerNormalization": 8, "BatchNormalization": 2, "Erf": 8, "Gelu": 8,
                  "Sigmoid": 4, "Tanh": 4, "HardSwish": 3, "InstanceNormalization": 8}


def _spec(vi: onnx.ValueInfoProto) -> TensorSpec:
    t = vi.type.tensor_type
    return TensorSpec(
        vi.name,
        tuple(int(d.dim_value) for d in t.shape.dim),
        np.dtype(helper.tensor_dtype_to_np_dtype(t.elem_type)).name,
    )


@dataclass
class Analysis:
    """A loaded model with its execution order and per-node costs (arrays indexed by node position)."""

    model: ModelProto
    nodes: list[onnx.NodeProto]
    specs: dict[str, TensorSpec]            # every activation (graph inputs + node outputs)
    initializer_bytes: dict[str, int]
    inputs: list[str]                        # activation graph inputs
    outputs: list[str]
    producer: dict[str, int]                 # tensor -> node position
    consumers: dict[str, list[int]]          # tensor -> node positions reading it
    node_inits: list[list[str]]              # initializers each node reads
    macs: np.ndarray = field(repr=False)
    flops: np.ndarray = field(repr=False)
    param_bytes: np.ndarray = field(repr=False)   # each initializer counted at its first reader
    bytes_moved: np.ndarray = field(repr=False)   # activations in + out + weights, per node
    fused: np.ndarray = field(repr=False)         # node would be fused into its producer's kernel
    shape_only: np.ndarray = field(repr=False)
    # each initializer as a CPU device holds it compiled: a Winograd conv's weight transformed (4x)
    device_weight_bytes: dict[str, int] = field(repr=False)
    # integer initializers: shapes, axes, split sizes, indices; parameters of an op, not data it streams
    index_initializers: frozenset[str] = field(default=frozenset(), repr=False)

    @property
    def node_names(self) -> list[str]:
        return [n.name for n in self.nodes]

    @property
    def op_types(self) -> list[str]:
        return [n.op_type for n in self.nodes]

    @property
    def total_param_bytes(self) -> int:
        return int(sum(self.initializer_bytes.values()))


def _attr(node: onnx.NodeProto, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _numel(shape) -> int:
    return int(np.prod(shape, dtype=np.int64)) if shape is not None else 0


def _node_macs(node: onnx.NodeProto, shape_of) -> int:
    op = node.op_type
    out = shape_of(node.output[0])
    if op == "Conv":
        w = shape_of(node.input[1])
        return _numel(out) * _numel(w[1:]) if w else 0
    if op == "ConvTranspose":
        w = shape_of(node.input[1])
        # weight is [Cin, Cout/group, k...]: every input element meets Cout/group * k filters
        return _numel(shape_of(node.input[0])) * _numel(w[1:]) if w else 0
    if op in ("Gemm", "MatMul", "MatMulInteger"):
        a = shape_of(node.input[0])
        if not a:
            return 0
        k = a[0] if (op == "Gemm" and _attr(node, "transA", 0)) else a[-1]
        return _numel(out) * k
    if op == "Einsum":
        return _numel(out) * max(_numel(shape_of(node.input[0])) // max(_numel(out), 1), 1)
    return 0


def _node_flops(node: onnx.NodeProto, macs: int, shape_of) -> int:
    if macs:
        return 2 * macs
    op = node.op_type
    if op in SHAPE_OPS:
        return 0
    out = _numel(shape_of(node.output[0])) if node.output else 0
    if op in ("MaxPool", "AveragePool"):
        return out * _numel(_attr(node, "kernel_shape", [1]))
    if op.startswith("Global") or op.startswith("Reduce"):
        return _numel(shape_of(node.input[0]))
    return out * _ELEMENT_FLOPS.get(op, 1)


def runs_winograd(node: onnx.NodeProto, weight_shape, out_shape) -> bool:
    """Whether a CPU device runs this node as a Winograd conv (backends/cpu_rules/winograd.py)."""
    if node.op_type != "Conv" or not weight_shape or len(weight_shape) != 4 or not out_shape or len(out_shape) != 4:
        return False
    group = int(_attr(node, "group", 1))
    return winograd.fits(tuple(weight_shape[2:]), tuple(_attr(node, "strides", [1, 1])),
                         tuple(_attr(node, "dilations", [1, 1])), tuple(_attr(node, "pads", [0, 0, 0, 0])), group,
                         (out_shape[2], out_shape[3]), (weight_shape[1] * group, weight_shape[0]))


def analyze(model: ModelProto) -> Analysis:
    """Index a model loaded by `load_model` (static shapes, ordered nodes). Never mutates it."""
    g = model.graph
    init_bytes = {t.name: int(np.prod(t.dims, dtype=np.int64)) * np.dtype(helper.tensor_dtype_to_np_dtype(t.data_type)).itemsize for t in g.initializer}
    specs: dict[str, TensorSpec] = {}
    for vi in list(g.input) + list(g.value_info) + list(g.output):
        if vi.name not in init_bytes and vi.type.HasField("tensor_type"):
            specs[vi.name] = _spec(vi)
    inputs = [vi.name for vi in activation_inputs(model)]
    nodes = list(g.node)
    producer: dict[str, int] = {}
    consumers: dict[str, list[int]] = {}
    node_inits: list[list[str]] = []
    for i, n in enumerate(nodes):
        for o in n.output:
            if o:
                producer[o] = i
        reads = node_inputs(n)
        node_inits.append([x for x in dict.fromkeys(reads) if x in init_bytes])
        for x in dict.fromkeys(reads):
            if x not in init_bytes:
                consumers.setdefault(x, []).append(i)

    init_shapes = {t.name: tuple(t.dims) for t in g.initializer}

    def shape_of(name):
        if name in specs:
            return specs[name].shape
        return init_shapes.get(name)

    N = len(nodes)
    macs = np.zeros(N, np.int64)
    flops = np.zeros(N, np.int64)
    params = np.zeros(N, np.int64)
    moved = np.zeros(N, np.int64)
    fused = np.zeros(N, bool)
    shape_only = np.zeros(N, bool)
    counted: set[str] = set()
    device_bytes = dict(init_bytes)
    for i, n in enumerate(nodes):
        if n.op_type == "Conv" and len(n.input) > 1 and n.input[1] in init_bytes and runs_winograd(
                n, shape_of(n.input[1]), shape_of(n.output[0])):
            device_bytes[n.input[1]] = init_bytes[n.input[1]] * winograd.WEIGHT_GROWTH
        macs[i] = _node_macs(n, shape_of)
        flops[i] = _node_flops(n, int(macs[i]), shape_of)
        for w in node_inits[i]:
            if w not in counted:
                counted.add(w)
                params[i] += init_bytes[w]
        act_in = sum(specs[x].nbytes for x in node_inputs(n) if x in specs)
        act_out = sum(specs[o].nbytes for o in n.output if o in specs)
        moved[i] = act_in + act_out + sum(init_bytes[w] for w in node_inits[i])
        shape_only[i] = n.op_type in SHAPE_OPS
        first = n.input[0] if n.input else ""
        fused[i] = (
            n.op_type in FUSABLE_OPS
            and first in producer
            and len(consumers.get(first, [])) == 1
            and first not in g.output
        )
    return Analysis(
        model=model, nodes=nodes, specs=specs, initializer_bytes=init_bytes, inputs=inputs,
        outputs=[o.name for o in g.output], producer=producer, consumers=consumers, node_inits=node_inits,
        macs=macs, flops=flops, param_bytes=params, bytes_moved=moved, fused=fused, shape_only=shape_only,
        device_weight_bytes=device_bytes,
        index_initializers=frozenset(t.name for t in g.initializer if np.issubdtype(
            helper.tensor_dtype_to_np_dtype(t.data_type), np.integer)),
    )
