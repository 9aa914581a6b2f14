"""Shared fixtures: small example models (prepared and loaded) and an ORT runner."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from nasc.backends import ort
from nasc.examples import build
from nasc.partitioner import analyze, enumerate_cuts, load_model
from nasc.passes import prepare

# Small resolutions keep every-cut checks fast while keeping each model's structure.
SMALL = {
    "tiny": {},
    "resnet8": {},
    "inception": {"resolution": 32},
    "densenet": {"resolution": 16},
    "mobilenetv2": {"resolution": 32},
    "shufflenet": {"resolution": 32},
    "vit": {"resolution": 16},
}


def small_model(name: str) -> onnx.ModelProto:
    return build(name, **SMALL[name])


def prepared(name: str):
    original = load_model(small_model(name))
    model = load_model(prepare(original))
    a = analyze(model)
    return original, a, enumerate_cuts(a)


def random_feeds(model: onnx.ModelProto, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    feeds = {}
    inits = {t.name for t in model.graph.initializer}
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        shape = [d.dim_value for d in vi.type.tensor_type.shape.dim]
        feeds[vi.name] = rng.standard_normal(shape).astype(np.float32)
    return feeds


def run_pair(head, tail, feeds):
    outs, head_out = {}, {}
    if head is not None:
        head_out = ort.run(head, feeds)
        outs.update(head_out)
    if tail is not None:
        outs.update(ort.run(tail, {**feeds, **head_out}))
    return outs


def random_dag(seed: int, n_nodes: int, width: int = 4) -> onnx.ModelProto:
    """A random DAG of Add/Mul/Relu/Concat+Slice nodes over [1, width] tensors, several outputs."""
    rng = np.random.default_rng(seed)
    tensors = ["x"]
    nodes = []
    used = set()
    for i in range(n_nodes):
        kind = rng.integers(0, 3)
        a = tensors[rng.integers(0, len(tensors))]
        out = f"t{i}"
        if kind == 0:
            nodes.append(helper.make_node("Relu", [a], [out], name=f"n{i}"))
            used.add(a)
        else:
            b = tensors[rng.integers(0, len(tensors))]
            nodes.append(helper.make_node("Add" if kind == 1 else "Mul", [a, b], [out], name=f"n{i}"))
            used.update((a, b))
        tensors.append(out)
    outputs = [t for t in tensors[1:] if t not in used] or [tensors[-1]]
    g = helper.make_graph(
        nodes, f"dag{seed}",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, width])],
        [helper.make_tensor_value_info(o, TensorProto.FLOAT, [1, width]) for o in outputs],
    )
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m


@pytest.fixture(scope="session")
def tmp_root(tmp_path_factory):
    return tmp_path_factory.mktemp("nasc")
