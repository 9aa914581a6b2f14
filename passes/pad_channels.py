"""Pad conv channels to a multiple of a block with zero filters, so that every conv can run blocked.

A CPU conv runs in NCHW{c}c only when c divides its channel counts, so a model with 12- or
24-channel convs runs all its convs in a narrow block (or plain). `pad_channels` widens each
dense conv's output to a multiple of the block with zero filters. A widened tensor has a
*layout*: the padded index of each real channel (concatenating widened tensors interleaves
padding). A graph input whose channels the block does not divide (a tail's cut tensor) is
widened once on entry, unless it is as narrow as an image. Per-channel readers (depthwise
convs, pooling, elementwise ops) keep the layout; dense convs read the real channels through
zero-padded weights; every other reader, and every graph output, gets the real channels
gathered back. Padded channels stay finite and no real channel reads them, so the model
computes what it did.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import ModelProto, helper, numpy_helper

from nasc.passes.util import checked, copy_model

Layout = tuple[int, np.ndarray]  # (padded channel count, padded index of each real channel)

# graph inputs narrower than this (an RGB image) are left as they are: the convs reading them
# would do several times the work for channels that are all zeros
MIN_INPUT_CHANNELS = 4

# per-channel ops, finite on finite input, whose output keeps their input's layout; their
# other inputs must be constants without a channel axis (Clip's bounds, LeakyRelu has none)
_PER_CHANNEL = frozenset({
    "Relu", "Clip", "Sigmoid", "Tanh", "HardSwish", "HardSigmoid", "LeakyRelu", "Elu", "Neg", "Abs", "Erf",
    "Gelu", "Softplus", "Mish", "Identity", "Dropout", "MaxPool", "AveragePool", "GlobalAveragePool",
    "GlobalMaxPool",
})
# broadcasting elementwise ops; a constant operand is padded with the value that keeps padded channels finite
_BROADCAST_FILL = {"Add": 0.0, "Sub": 0.0, "Mul": 0.0, "Max": 0.0, "Min": 0.0, "PRelu": 0.0, "Div": 1.0}
# BatchNormalization's scale, bias, mean and variance in padded channels
_BATCHNORM_FILL = (0.0, 0.0, 0.0, 1.0)


def _round_up(c: int, block: int) -> int:
    return -(-c // block) * block


def _identity(c: int) -> Layout:
    return c, np.arange(c)


def _attr(node: onnx.NodeProto, name: str, default):
    a = next((a for a in node.attribute if a.name == name), None)
    return default if a is None else helper.get_attribute_value(a)


def _channel_axis(rank: int, out_rank: int = 4) -> int | None:
    """The axis of a `rank`-d operand that broadcasts against the channel axis of the output."""
    axis = 1 - (out_rank - rank)
    return axis if axis >= 0 else None


def _padded(values: np.ndarray, axis: int, layout: Layout, fill: float) -> np.ndarray:
    """`values` with its real channels along `axis` moved to `layout`, `fill` elsewhere."""
    shape = list(values.shape)
    shape[axis] = layout[0]
    out = np.full(shape, fill, dtype=values.dtype)
    index = [slice(None)] * values.ndim
    index[axis] = layout[1]
    out[tuple(index)] = values
    return out


class _Padder:
    """One walk over the nodes in order: each is kept, widened, or made to read real channels."""

    def __init__(self, model: ModelProto, block: int):
        self.block = block
        inferred = onnx.shape_inference.infer_shapes(model)
        g = inferred.graph
        self.shapes = {vi.name: [d.dim_value for d in vi.type.tensor_type.shape.dim]
                       for vi in [*g.input, *g.value_info, *g.output] if vi.type.HasField("tensor_type")}
        self.inits = {t.name: t for t in model.graph.initializer}
        self.layouts: dict[str, Layout] = {}
        self.nodes: list[onnx.NodeProto] = []
        self.new_inits: list[onnx.TensorProto] = []
        self.real: dict[str, str] = {}
        self.entry: dict[str, str] = {}  # widened graph input -> the input
        self.widened_input: dict[str, str] = {}  # and back
        self.opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 1)

    def pad_input(self, x: str) -> None:
        """Widen graph input `x` on entry (a Pad of zero channels), when the block does not divide it."""
        shape = self.shapes.get(x, [])
        if len(shape) != 4 or shape[1] < MIN_INPUT_CHANNELS or shape[1] % self.block == 0:
            return
        width, wide = _round_up(shape[1], self.block), f"{x}.padded"
        pads = [0, 0, 0, 0, 0, width - shape[1], 0, 0]
        if self.opset >= 11:
            self.nodes.append(helper.make_node("Pad", [x, self.const(f"{x}.channel_pads", np.array(pads, np.int64))],
                                               [wide], name=f"{x}.pad_channels"))
        else:
            self.nodes.append(helper.make_node("Pad", [x], [wide], name=f"{x}.pad_channels", pads=pads))
        self.entry[wide], self.widened_input[x] = x, wide
        self.shapes[wide] = [shape[0], width, *shape[2:]]
        self.layouts[wide] = (width, np.arange(shape[1]))

    def const(self, name: str, values: np.ndarray) -> str:
        self.new_inits.append(numpy_helper.from_array(values, name))
        return name

    def real_channels(self, t: str) -> str:
        """`t` with only its real channels, in their order (a Gather after its producer)."""
        if t in self.entry:
            return self.entry[t]
        if t not in self.layouts:
            return t
        if t not in self.real:
            self.real[t] = f"{t}.real"
            index = self.const(f"{t}.real_channels", self.layouts[t][1].astype(np.int64))
            self.nodes.append(helper.make_node("Gather", [t, index], [self.real[t]], name=f"{t}.gather_real", axis=1))
        return self.real[t]

    def keep(self, node: onnx.NodeProto) -> None:
        """`node` as it was, reading the real channels of every widened input."""
        out = onnx.NodeProto()
        out.CopyFrom(node)
        for i, x in enumerate(out.input):
            out.input[i] = self.real_channels(x) if x else x
        self.nodes.append(out)

    def with_inputs(self, node: onnx.NodeProto, inputs: list[str], append: bool = True, **attrs) -> onnx.NodeProto:
        out = onnx.NodeProto()
        out.CopyFrom(node)
        del out.input[:]
        out.input.extend(inputs)
        for a in out.attribute:
            if a.name in attrs:
                a.CopyFrom(helper.make_attribute(a.name, attrs.pop(a.name)))
        out.attribute.extend(helper.make_attribute(k, v) for k, v in attrs.items())
        if append:
            self.nodes.append(out)
        return out

    def visit(self, node: onnx.NodeProto) -> None:
        if any(x in self.widened_input for x in node.input):
            node = self.with_inputs(node, [self.widened_input.get(x, x) for x in node.input], append=False)
        ins = [x for x in node.input if x]
        if node.op_type == "Conv":
            return self.conv(node)
        if node.op_type == "Concat":
            return self.concat(node)
        if node.op_type == "BatchNormalization":
            return self.batchnorm(node)
        if node.op_type in _BROADCAST_FILL:
            return self.broadcast(node)
        if (node.op_type in _PER_CHANNEL and ins[0] in self.layouts and len(node.output) == 1
                and all(x in self.inits and not self._channel_size(x) for x in ins[1:])):
            self.keep_layout(node, self.layouts[ins[0]])
            return None
        return self.keep(node)

    def keep_layout(self, node: onnx.NodeProto, layout: Layout, inputs: list[str] | None = None, **attrs) -> None:
        self.with_inputs(node, list(node.input) if inputs is None else inputs, **attrs)
        self.layouts[node.output[0]] = layout

    def _channel_size(self, x: str) -> int:
        """The size of `x` along the axis that broadcasts against the channels (0: it has none)."""
        shape = list(self.inits[x].dims) if x in self.inits else self.shapes.get(x, [])
        axis = _channel_axis(len(shape))
        return shape[axis] if axis is not None else 0

    def conv(self, node: onnx.NodeProto) -> None:
        x, w, b = (list(node.input) + ["", ""])[:3]
        if w not in self.inits or (b and b not in self.inits) or len(self.inits[w].dims) != 4:
            return self.keep(node)
        weight = numpy_helper.to_array(self.inits[w])
        bias = numpy_helper.to_array(self.inits[b]) if b else None
        cout, per_group = weight.shape[:2]
        group = int(_attr(node, "group", 1))
        layout = self.layouts.get(x)
        if group == 1:
            cin = layout or _identity(per_group)
            padded_out = _round_up(cout, self.block)
            if layout is None and padded_out == cout:
                return self.keep(node)
            out_layout = _identity(cout) if padded_out == cout else (padded_out, np.arange(cout))
            weight = _padded(_padded(weight, 1, cin, 0.0), 0, out_layout, 0.0)
            bias = None if bias is None else _padded(bias, 0, out_layout, 0.0)
        elif group == cout == per_group * group and per_group == 1 and layout is not None:  # depthwise
            out_layout = layout
            weight = _padded(weight, 0, layout, 0.0)
            bias = None if bias is None else _padded(bias, 0, layout, 0.0)
            group = layout[0]
        else:
            return self.keep(node)
        inputs = [x, self.const(f"{w}.padded", weight)] + ([self.const(f"{b}.padded", bias)] if b else [])
        self.with_inputs(node, inputs, group=group)
        if out_layout[0] != len(out_layout[1]):
            self.layouts[node.output[0]] = out_layout

    def concat(self, node: onnx.NodeProto) -> None:
        ranks = {len(self.shapes.get(x, [])) for x in node.input}
        axis = int(_attr(node, "axis", 0))
        if (not any(x in self.layouts for x in node.input) or ranks != {4} or axis not in (1, -3)
                or any(x in self.inits for x in node.input)):
            return self.keep(node)
        pieces = [self.layouts.get(x) or _identity(self.shapes[x][1]) for x in node.input]
        offsets = np.cumsum([0] + [p[0] for p in pieces[:-1]])
        self.keep_layout(node, (sum(p[0] for p in pieces), np.concatenate([p[1] + o for p, o in zip(pieces, offsets)])))

    def batchnorm(self, node: onnx.NodeProto) -> None:
        x, *params = node.input
        layout = self.layouts.get(x)
        if layout is None or len(node.output) != 1 or not all(p in self.inits for p in params):
            return self.keep(node)
        padded = [self.const(f"{p}.padded", _padded(numpy_helper.to_array(self.inits[p]), 0, layout, fill))
                  for p, fill in zip(params, _BATCHNORM_FILL)]
        self.keep_layout(node, layout, [x, *padded])

    def broadcast(self, node: onnx.NodeProto) -> None:
        out_shape = self.shapes.get(node.output[0], [])
        widened = {self.layouts[x][0]: self.layouts[x] for x in node.input if x in self.layouts}
        if len(out_shape) != 4 or len(widened) != 1:
            return self.keep(node)
        (layout,) = widened.values()
        inputs = []
        for i, x in enumerate(node.input):
            size = self._channel_size(x)
            if x in self.layouts:
                if not np.array_equal(self.layouts[x][1], layout[1]):
                    return self.keep(node)
                if node.op_type == "Div" and i == 1:  # padded divisors would be zero
                    return self.keep(node)
                inputs.append(x)
            elif size <= 1:
                inputs.append(x)
            elif x in self.inits:
                values = numpy_helper.to_array(self.inits[x])
                inputs.append(self.const(f"{x}.padded", _padded(values, _channel_axis(values.ndim), layout,
                                                                _BROADCAST_FILL[node.op_type])))
            else:  # an activation with real channels only
                return self.keep(node)
        self.keep_layout(node, layout, inputs)


def _pad(model: ModelProto, block: int) -> tuple[ModelProto, dict[str, Layout]]:
    p = _Padder(model, block)
    for x in model.graph.input:
        if x.name not in p.inits:
            p.pad_input(x.name)
    for node in model.graph.node:
        p.visit(node)
    read = {x for n in p.nodes for x in n.input}
    for wide in [w for w in p.entry if w not in read]:  # an input only ops outside the padding read
        p.nodes = [n for n in p.nodes if wide not in n.output]
        del p.layouts[wide]
    out = copy_model(model)
    g = out.graph
    # graph outputs keep their names and real channels: the widened value is renamed, and the
    # gather of its real channels (one some reader may already have) computes the output
    renamed = {}
    for o in [o.name for o in g.output if o.name in p.layouts]:
        renamed[o] = f"{o}.padded"
        renamed[p.real_channels(o)] = o
    for node in p.nodes:
        for field in (node.input, node.output):
            for i, x in enumerate(field):
                field[i] = renamed.get(x, x)
    del g.node[:]
    g.node.extend(p.nodes)
    used = {x for n in g.node for x in n.input}
    inits = [t for t in model.graph.initializer if t.name in used] + p.new_inits
    del g.initializer[:]
    g.initializer.extend(inits)
    del g.value_info[:]  # widened tensors changed shape: infer them all again
    layouts = {p.entry.get(t, t): lay for t, lay in p.layouts.items()}
    return checked(onnx.shape_inference.infer_shapes(out, strict_mode=True)), layouts


def pad_channels(model: ModelProto, block: int) -> ModelProto:
    """`model` with every dense conv's output channels padded to a multiple of `block` (see the
    module docstring); it computes the same outputs. Returns a new model."""
    return _pad(model, block)[0]


def channel_layouts(model: ModelProto, block: int) -> dict[str, Layout]:
    """The tensors of `model` that `pad_channels(model, block)` widens: for each, (padded channel
    count, the padded index of each real channel). A widened graph input or output keeps its
    name for its real channels; the widened value is `{name}.padded`."""
    return _pad(model, block)[1]
