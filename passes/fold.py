"""Constant folding and Conv+BatchNormalization folding.

Both are pure: they return a new checked ModelProto and never touch their input. Folding
before cut enumeration means cuts never fall between a conv and its BatchNorm, and constant
subgraphs (shape arithmetic, Constant nodes) never appear as activations to send.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import ModelProto, helper, numpy_helper

from nasc.passes.util import checked, copy_model

# Ops whose output is not a function of their inputs.
_NONDETERMINISTIC = frozenset({"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial", "Bernoulli"})
# Folding an op whose output is much larger than its inputs bloats the weights file.
_MAX_FOLDED_BYTES = 64 << 20


def _evaluate(node: onnx.NodeProto, values: dict[str, np.ndarray], opsets) -> list[np.ndarray]:
    from onnx.reference import ReferenceEvaluator

    ins = [helper.make_tensor_value_info(x, helper.np_dtype_to_tensor_dtype(values[x].dtype), values[x].shape) for x in node.input if x]
    outs = [helper.make_tensor_value_info(o, onnx.TensorProto.UNDEFINED, None) for o in node.output if o]
    g = helper.make_graph([node], "fold", ins, outs)
    m = helper.make_model(g, opset_imports=opsets)
    return ReferenceEvaluator(m).run(None, {x: values[x] for x in node.input if x})


def _has_subgraph(node: onnx.NodeProto) -> bool:
    return any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute)


def fold_constants(model: ModelProto) -> ModelProto:
    """Replace every node computable at compile time by initializers.

    A node folds when all its inputs are initializers or folded values, or when it is a
    Shape/Size of a tensor whose static shape is known. Returns a new model.
    """
    out = copy_model(model)
    g = out.graph
    values = {t.name: numpy_helper.to_array(t) for t in g.initializer}
    static = {}
    for vi in list(g.input) + list(g.value_info):
        dims = vi.type.tensor_type.shape.dim
        if vi.type.HasField("tensor_type") and vi.type.tensor_type.HasField("shape") and all(d.HasField("dim_value") for d in dims):
            static[vi.name] = tuple(d.dim_value for d in dims)
    graph_outputs = {o.name for o in g.output}
    kept, folded = [], {}
    for node in g.node:
        inputs = [x for x in node.input if x]
        result = None
        if node.op_type == "Constant":
            result = [numpy_helper.to_array(helper.get_attribute_value(node.attribute[0]))] if node.attribute and node.attribute[0].name == "value" else None
        elif node.op_type in ("Shape", "Size") and inputs and inputs[0] in static and not node.attribute:
            shape = np.array(static[inputs[0]], np.int64)
            result = [shape if node.op_type == "Shape" else np.array(np.prod(shape), np.int64)]
        elif (
            inputs
            and all(x in values for x in inputs)
            and node.op_type not in _NONDETERMINISTIC
            and not _has_subgraph(node)
            and node.domain in ("", "ai.onnx")
        ):
            try:
                result = _evaluate(node, values, out.opset_import)
            except Exception:  # the reference evaluator lacks this op: leave the node alone
                result = None
        if result is not None and not any(o in graph_outputs for o in node.output) and sum(np.asarray(r).nbytes for r in result) <= _MAX_FOLDED_BYTES:
            for o, v in zip(node.output, result):
                if o:
                    values[o] = np.asarray(v)
                    folded[o] = np.asarray(v)
        else:
            kept.append(node)
    if not folded:
        return checked(out)
    del g.node[:]
    g.node.extend(kept)
    g.initializer.extend(numpy_helper.from_array(v, n) for n, v in folded.items())
    drop = set(folded)
    vis = [vi for vi in g.value_info if vi.name not in drop]
    del g.value_info[:]
    g.value_info.extend(vis)
    from nasc.passes.dce import eliminate_dead_nodes

    return eliminate_dead_nodes(checked(out))


def fold_batchnorm(model: ModelProto) -> ModelProto:
    """Fold inference-mode BatchNormalization into the Conv that feeds it.

    Only when the Conv output feeds the BN alone and all BN/Conv parameters are initializers.
    The BN's output name is kept, so cut tensor names stay stable.
    """
    out = copy_model(model)
    g = out.graph
    inits = {t.name: t for t in g.initializer}
    consumers: dict[str, int] = {}
    for n in g.node:
        for x in n.input:
            consumers[x] = consumers.get(x, 0) + 1
    producer = {o: n for n in g.node for o in n.output}
    graph_outputs = {o.name for o in g.output}
    remove: set[int] = set()
    new_inits: list[onnx.TensorProto] = []
    for bn in g.node:
        if bn.op_type != "BatchNormalization" or len(bn.output) != 1 or len(bn.input) != 5:
            continue
        conv = producer.get(bn.input[0])
        if conv is None or conv.op_type != "Conv" or consumers.get(bn.input[0], 0) != 1 or bn.input[0] in graph_outputs:
            continue
        params = bn.input[1:] + [conv.input[1]] + ([conv.input[2]] if len(conv.input) > 2 and conv.input[2] else [])
        if not all(p in inits for p in params):
            continue
        eps = next((helper.get_attribute_value(a) for a in bn.attribute if a.name == "epsilon"), 1e-5)
        scale, beta, mean, var = (numpy_helper.to_array(inits[p]).astype(np.float64) for p in bn.input[1:])
        w = numpy_helper.to_array(inits[conv.input[1]]).astype(np.float64)
        b = numpy_helper.to_array(inits[conv.input[2]]).astype(np.float64) if len(conv.input) > 2 and conv.input[2] else np.zeros(w.shape[0])
        s = scale / np.sqrt(var + eps)
        dtype = numpy_helper.to_array(inits[conv.input[1]]).dtype
        wname, bname = f"{conv.name}.weight_bnfolded", f"{conv.name}.bias_bnfolded"
        new_inits.append(numpy_helper.from_array((w * s.reshape(-1, *([1] * (w.ndim - 1)))).astype(dtype), wname))
        new_inits.append(numpy_helper.from_array(((b - mean) * s + beta).astype(dtype), bname))
        data = conv.input[0]
        del conv.input[:]
        conv.input.extend([data, wname, bname])
        conv.output[0] = bn.output[0]
        remove.add(id(bn))
    if not remove:
        return checked(out)
    kept = [n for n in g.node if id(n) not in remove]
    del g.node[:]
    g.node.extend(kept)
    g.initializer.extend(new_inits)
    from nasc.passes.dce import eliminate_dead_nodes

    return eliminate_dead_nodes(checked(out))

