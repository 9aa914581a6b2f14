"""Split a model at a cut into a standalone head and tail ONNX model.

The head's outputs are the cut tensors (plus any graph outputs it computes); the tail's
inputs are the same cut tensors by name, so provenance from the original graph is kept.
Opset, IR version, producer and doc carry over; `nasc.half` and `nasc.cut` metadata record
which half and which cut each file is.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import ModelProto, helper

from nasc.partitioner.analysis import Analysis
from nasc.partitioner.cuts import Cut
from nasc.partitioner.load import node_inputs
from nasc.passes.util import checked, set_metadata
from nasc.types import TensorSpec


def value_info(spec: TensorSpec) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(spec.name, helper.np_dtype_to_tensor_dtype(np.dtype(spec.dtype)), list(spec.shape))


def _half(a: Analysis, nodes: list[onnx.NodeProto], inputs: list[str], outputs: list[str], role: str,
          sent: tuple[str, ...]) -> ModelProto:
    src = a.model
    reads = {x for n in nodes for x in node_inputs(n)}
    inits = [t for t in src.graph.initializer if t.name in reads]
    produced = {o for n in nodes for o in n.output}
    vis = [vi for vi in src.graph.value_info if vi.name in produced and vi.name not in outputs]
    graph = helper.make_graph(
        nodes,
        f"{src.graph.name or 'model'}_{role}",
        [value_info(a.specs[x]) for x in inputs],
        [value_info(a.specs[x]) for x in outputs],
        inits,
        value_info=vis,
        doc_string=src.graph.doc_string,
    )
    m = helper.make_model(graph, opset_imports=list(src.opset_import))
    m.ir_version = src.ir_version
    for field in ("producer_name", "producer_version", "domain", "model_version", "doc_string"):
        setattr(m, field, getattr(src, field))
    m.metadata_props.extend(src.metadata_props)
    set_metadata(m, "nasc.half", role)
    set_metadata(m, "nasc.cut", ",".join(sent))
    return checked(m)


def head_outputs(a: Analysis, cut: Cut) -> list[str]:
    """What the head returns: cut tensors, then graph outputs computed on the device."""
    head = set(cut.head_nodes)
    local = [o for o in a.outputs if o in a.producer and a.nodes[a.producer[o]].name in head and o not in cut.tensors]
    return list(cut.tensors) + local


def tail_outputs(a: Analysis, cut: Cut) -> list[str]:
    head = set(cut.head_nodes)
    return [o for o in a.outputs if not (o in a.producer and a.nodes[a.producer[o]].name in head)]


def extract_head(a: Analysis, cut: Cut) -> ModelProto | None:
    """The device half of the cut, or None for a server-only cut."""
    head = cut.head_nodes
    if not head:
        return None
    nodes = [n for n in a.nodes if n.name in head]
    reads = {x for n in nodes for x in node_inputs(n)}
    outs = head_outputs(a, cut)
    # Graph inputs the tail needs pass through the head unchanged (they are head outputs too).
    inputs = [x for x in a.inputs if x in reads or x in outs]
    return _half(a, nodes, inputs, outs, "head", cut.tensors)


def extract_tail(a: Analysis, cut: Cut) -> ModelProto | None:
    """The server half of the cut, or None for a device-only cut."""
    head = cut.head_nodes
    nodes = [n for n in a.nodes if n.name not in head]
    if not nodes:
        return None
    return _half(a, nodes, list(cut.tensors), tail_outputs(a, cut), "tail", cut.tensors)


def extract_half(a: Analysis, mask: np.ndarray) -> ModelProto | None:
    """The nodes `mask` selects (a cut's head or tail, as partitioner.cuts.half_masks gives them) as
    a standalone model, None if it selects none: it reads the graph inputs and the tensors made
    outside it that its nodes read, and returns what it makes for nodes outside it or for the
    graph, in execution order. A head reads only graph inputs; anything else is a tail."""
    mask = np.asarray(mask, bool)
    nodes = [n for n, here in zip(a.nodes, mask) if here]
    if not nodes:
        return None
    made = {o for n in nodes for o in n.output}
    reads = list(dict.fromkeys(x for n in nodes for x in node_inputs(n) if x in a.specs and x not in made))
    inputs = [x for x in a.inputs if x in reads] + [x for x in reads if x not in a.inputs]
    outside = {x for n, here in zip(a.nodes, mask) if not here for x in node_inputs(n)}
    outputs = [o for n in nodes for o in n.output if o in a.specs and (o in outside or o in a.outputs)]
    role = "head" if set(inputs) <= set(a.inputs) else "tail"
    sent = tuple(o for o in outputs if o in outside) if role == "head" else tuple(x for x in inputs if x not in a.inputs)
    return _half(a, nodes, inputs, outputs, role, sent)


def split_model(a: Analysis, cut: Cut) -> tuple[ModelProto | None, ModelProto | None]:
    """(head, tail) for a cut; either is None when the cut puts everything on one side."""
    return extract_head(a, cut), extract_tail(a, cut)
