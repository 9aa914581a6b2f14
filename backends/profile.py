"""Measure kernels on a target: every fused kernel group of a model, compiled and timed alone.

A group is an anchor node plus the elementwise nodes a compiler fuses into it (the same
rule the analysis uses). Each group is extracted as a standalone ONNX model, compiled with
the target's pipeline and timed with TVM's time_evaluator; identical groups (same ops,
shapes and attributes) are measured once. Summing group times over a half predicts the
half: that is the measured latency model.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from onnx import ModelProto, helper

from nasc.partitioner.analysis import Analysis
from nasc.partitioner.load import node_inputs
from nasc.types import TensorSpec

PROFILE_FORMAT = "nasc-kernel-profile/1"
# time_evaluator settings: enough repeats for a stable median on a shared machine
NUMBER, REPEAT, MIN_REPEAT_MS = 5, 5, 20


@dataclass(frozen=True)
class KernelGroup:
    nodes: tuple[int, ...]       # positions in the analysis' execution order
    signature: str               # identical kernels share it

    def anchor(self) -> int:
        return self.nodes[0]


def kernel_groups(a: Analysis) -> list[KernelGroup]:
    """Partition nodes into fused kernel groups (shape-only nodes are left out: they cost nothing)."""
    group_of: dict[int, list[int]] = {}
    groups: list[list[int]] = []
    for i, n in enumerate(a.nodes):
        if a.shape_only[i]:
            continue
        if a.fused[i] and a.producer.get(n.input[0]) in group_of:
            g = group_of[a.producer[n.input[0]]]
        else:
            g = []
            groups.append(g)
        g.append(i)
        group_of[i] = g
    return [KernelGroup(tuple(g), _signature(a, g)) for g in groups]


def _signature(a: Analysis, nodes: list[int]) -> str:
    parts = []
    for i in nodes:
        n = a.nodes[i]
        shapes = [list(a.specs[x].shape) if x in a.specs else [f"w{list(_init_shape(a, x))}"] for x in node_inputs(n)]
        attrs = sorted((at.name, str(helper.get_attribute_value(at))) for at in n.attribute)
        parts.append([n.op_type, shapes, attrs, [list(a.specs[o].shape) for o in n.output if o in a.specs]])
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:20]


def _init_shape(a: Analysis, name: str) -> tuple[int, ...]:
    t = next(t for t in a.model.graph.initializer if t.name == name)
    return tuple(t.dims)


def group_model(a: Analysis, group: KernelGroup) -> ModelProto:
    """The group as a standalone ONNX model: external activations in, its last output out."""
    nodes = [a.nodes[i] for i in group.nodes]
    produced = {o for n in nodes for o in n.output}
    inputs = list(dict.fromkeys(x for n in nodes for x in node_inputs(n) if x in a.specs and x not in produced))
    outputs = [o for o in nodes[-1].output if o in a.specs]
    reads = {x for n in nodes for x in node_inputs(n)}
    inits = [t for t in a.model.graph.initializer if t.name in reads]
    vi = lambda s: helper.make_tensor_value_info(s.name, helper.np_dtype_to_tensor_dtype(np.dtype(s.dtype)), list(s.shape))  # noqa: E731
    g = helper.make_graph(nodes, "kernel", [vi(a.specs[x]) for x in inputs], [vi(a.specs[o]) for o in outputs], inits)
    m = helper.make_model(g, opset_imports=list(a.model.opset_import))
    m.ir_version = a.model.ir_version
    return m


def time_model_ms(model: ModelProto, target, executable=None) -> float:
    """Median milliseconds of one call of a compiled model on `target` (which must run here)."""
    import tvm
    from tvm import relax

    from nasc.backends import tvm as tvm_backend

    ex = executable or tvm_backend.compile_model(model, target)
    dev = tvm.cuda(0) if target.kind == "cuda" else tvm.cpu(0)
    vm = relax.VirtualMachine(ex, dev)
    rng = np.random.default_rng(0)
    args = []
    inits = {t.name for t in model.graph.initializer}
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        spec = TensorSpec(vi.name, tuple(d.dim_value for d in vi.type.tensor_type.shape.dim),
                          np.dtype(helper.tensor_dtype_to_np_dtype(vi.type.tensor_type.elem_type)).name)
        x = rng.standard_normal(spec.shape).astype(spec.dtype) if np.dtype(spec.dtype).kind == "f" else np.zeros(spec.shape, spec.dtype)
        args.append(tvm.runtime.tensor(x, dev))
    f = vm.time_evaluator("main", dev, number=NUMBER, repeat=REPEAT, min_repeat_ms=MIN_REPEAT_MS)
    return float(np.median(f(*args).results) * 1e3)


CALL_KEY = "call_overhead"


def call_overhead_ms(target) -> float:
    """What one VM call costs beyond its kernels: a one-element Relu, timed like any kernel."""
    g = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "call",
                          [helper.make_tensor_value_info("x", 1, [1])], [helper.make_tensor_value_info("y", 1, [1])])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return time_model_ms(m, target)


def measure_kernels(a: Analysis, target, known: dict[str, float] | None = None,
                    log: Callable[[str], None] | None = None) -> dict[str, float]:
    """Milliseconds per kernel signature on `target` (net of call overhead, stored under CALL_KEY),
    measuring only signatures not in `known`."""
    from nasc.backends import tvm as tvm_backend

    tvm_backend.set_threads()
    times = dict(known or {})
    if CALL_KEY not in times:
        times[CALL_KEY] = call_overhead_ms(target)
    groups = kernel_groups(a)
    todo = {g.signature: g for g in groups if g.signature not in times}
    for k, (sig, g) in enumerate(todo.items()):
        if log:
            log(f"kernel {k + 1}/{len(todo)}: " + "+".join(a.nodes[i].op_type for i in g.nodes))
        # each standalone measurement pays one call's overhead; a half pays it once
        times[sig] = max(time_model_ms(group_model(a, g), target) - times[CALL_KEY], 0.0)
    return times


def node_ms_from_kernels(a: Analysis, kernels: dict[str, float]) -> tuple[np.ndarray, np.ndarray]:
    """(per-node ms, measured mask): each group's time sits on its anchor node."""
    ms = np.zeros(len(a.nodes))
    known = np.zeros(len(a.nodes), bool)
    for g in kernel_groups(a):
        if g.signature in kernels:
            ms[g.anchor()] = kernels[g.signature]
            known[list(g.nodes)] = True
    known |= a.shape_only
    return ms, known


def save_profile(path: Path, target, kernels: dict[str, float], meta: dict) -> dict:
    from nasc.backends.targets import host_cpu

    doc = {"format": PROFILE_FORMAT, "source": "measured", "target": target.to_json(), "host_cpu": host_cpu(),
           "threads": int(os.environ.get("TVM_NUM_THREADS", os.cpu_count() or 1)),
           "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **meta, "kernels": kernels}
    tmp = Path(str(path) + ".tmp")
    tmp.write_text(json.dumps(doc, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, path)
    return doc
