"""Dead-node elimination: drop nodes, initializers and value infos no graph output needs."""

from __future__ import annotations

from onnx import ModelProto

from nasc.partitioner.load import node_inputs
from nasc.passes.util import checked, copy_model


def eliminate_dead_nodes(model: ModelProto) -> ModelProto:
    """Keep only what the graph outputs depend on. Returns a new model; inputs are kept."""
    out = copy_model(model)
    g = out.graph
    needed = {o.name for o in g.output}
    keep = []
    for node in reversed(g.node):
        if any(o in needed for o in node.output if o):
            keep.append(node)
            needed.update(node_inputs(node))
    keep.reverse()
    if len(keep) != len(g.node):
        del g.node[:]
        g.node.extend(keep)
    inits = [t for t in g.initializer if t.name in needed]
    if len(inits) != len(g.initializer):
        del g.initializer[:]
        g.initializer.extend(inits)
    produced = {o for n in g.node for o in n.output}
    vis = [vi for vi in g.value_info if vi.name in produced]
    del g.value_info[:]
    g.value_info.extend(vis)
    return checked(out)
