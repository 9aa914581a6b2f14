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


def _half(a: Analysis, nodes: list[onnx.NodeProto], inputs: list[str], outputs: list[str], role: str, cut: Cut) -> ModelProto:
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
    set_metadata(m, "nasc.cut", ",".join(cut.tensors))
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
    return _half(a, nodes, inputs, outs, "head", cut)


def extract_tail(a: Analysis, cut: Cut) -> ModelProto | None:
    """The server half of the cut, or None for a device-only cut."""
    head = cut.head_nodes
    nodes = [n for n in a.nodes if n.name not in head]
    if not nodes:
        return None
    return _half(a, nodes, list(cut.tensors), tail_outputs(a, cut), "tail", cut)


def split_model(a: Analysis, cut: Cut) -> tuple[ModelProto | None, ModelProto | None]:
    """(head, tail) for a cut; either is None when the cut puts everything on one side."""
    return extract_head(a, cut), extract_tail(a, cut)
