"""Load an ONNX model, validate it, fix dynamic input dims and make every shape static.

The result is the one graph type the rest of nasc works on: an `onnx.ModelProto` whose
nodes are named, topologically ordered and whose every activation has a static shape.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from google.protobuf.message import DecodeError
from onnx import ModelProto, TensorProto, helper, shape_inference

from nasc.errors import ModelError


def _read(path: Path) -> ModelProto:
    if not path.exists():
        raise ModelError(f"{path}: no such file")
    if path.is_dir():
        raise ModelError(f"{path}: is a directory, expected an .onnx file")
    data = path.read_bytes()
    if not data:
        raise ModelError(f"{path}: empty file, not an ONNX model")
    model = ModelProto()
    try:
        model.ParseFromString(data)
    except (DecodeError, RuntimeError, ValueError) as e:
        raise ModelError(f"{path}: not an ONNX model or truncated protobuf ({e})") from None
    if not model.HasField("graph") or not model.opset_import:
        raise ModelError(f"{path}: not an ONNX model (no graph or opset)")
    if any(t.data_location == TensorProto.EXTERNAL for t in model.graph.initializer):
        try:
            onnx.load_external_data_for_model(model, str(path.parent))
        except (OSError, ValueError) as e:
            raise ModelError(f"{path}: cannot load external weights ({e})") from None
    return model


def parse_shape(text: str) -> tuple[str, tuple[int, ...]]:
    """Parse `NAME=1x3x224x224` (as given to --input-shape)."""
    name, sep, dims = text.rpartition("=")
    try:
        shape = tuple(int(d) for d in dims.lower().split("x"))
    except ValueError:
        shape = ()
    if not sep or not name or not shape or any(d <= 0 for d in shape):
        raise ModelError(f"--input-shape '{text}': expected NAME=DIMS such as input=1x3x224x224")
    return name, shape


def activation_inputs(model: ModelProto) -> list[onnx.ValueInfoProto]:
    """Graph inputs that are not initializers (older exporters list weights as inputs too)."""
    inits = {t.name for t in model.graph.initializer}
    return [i for i in model.graph.input if i.name not in inits]


def _fix_input_shapes(model: ModelProto, shapes: dict[str, tuple[int, ...]], where: str) -> None:
    inputs = activation_inputs(model)
    names = [i.name for i in inputs]
    for name in shapes:
        if name not in names:
            raise ModelError(f"--input-shape names '{name}', which is not an input of {where} (inputs: {', '.join(names)})")
    for vi in inputs:
        dims = vi.type.tensor_type.shape.dim
        if vi.name in shapes:
            shape = shapes[vi.name]
            if len(dims) and len(dims) != len(shape):
                raise ModelError(f"--input-shape {vi.name}: model input has rank {len(dims)}, got {len(shape)} dims")
            for d, known in zip(dims, shape):
                if d.HasField("dim_value") and d.dim_value > 0 and d.dim_value != known:
                    raise ModelError(f"--input-shape {vi.name}: dim {d.dim_value} is fixed by the model, got {known}")
            vi.type.tensor_type.ClearField("shape")
            for v in shape:
                vi.type.tensor_type.shape.dim.add().dim_value = v
        else:
            dynamic = [d.dim_param or "?" for d in dims if not (d.HasField("dim_value") and d.dim_value > 0)]
            if dynamic or not vi.type.tensor_type.HasField("shape"):
                shown = "x".join(str(d.dim_value) if d.dim_value > 0 else (d.dim_param or "?") for d in dims)
                raise ModelError(
                    f"{where}: input '{vi.name}' has dynamic shape [{shown or 'unknown rank'}]; "
                    f"fix it with --input-shape {vi.name}=" + "x".join(str(d.dim_value) if d.dim_value > 0 else "N" for d in dims)
                )


def _name_nodes(model: ModelProto) -> None:
    seen: set[str] = set()
    for i, node in enumerate(model.graph.node):
        if not node.name or node.name in seen:
            node.name = f"{node.op_type}_{i}"
        seen.add(node.name)


def _subgraph_inputs(node: onnx.NodeProto) -> set[str]:
    """Outer-scope tensors a control-flow node's subgraphs read implicitly."""
    names: set[str] = set()
    for attr in node.attribute:
        graphs = [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)
        for g in graphs:
            local = {i.name for i in g.input} | {t.name for t in g.initializer}
            for n in g.node:
                local.update(n.output)
            for n in g.node:
                names.update(x for x in n.input if x and x not in local)
                names.update(_subgraph_inputs(n) - local)
    return names


def node_inputs(node: onnx.NodeProto) -> list[str]:
    """All tensors a node reads: its listed inputs plus implicit subgraph captures."""
    explicit = [x for x in node.input if x]
    extra = sorted(_subgraph_inputs(node) - set(explicit))
    return explicit + extra


def _toposort(model: ModelProto, where: str) -> None:
    """Stable topological order (ties keep file order), so cut indices diff cleanly."""
    g = model.graph
    available = {i.name for i in g.input} | {t.name for t in g.initializer}
    nodes = list(g.node)
    producers = {o: i for i, n in enumerate(nodes) for o in n.output if o}
    deps = []
    for n in nodes:
        d = set()
        for x in node_inputs(n):
            if x in producers:
                d.add(producers[x])
            elif x not in available:
                raise ModelError(f"{where}: node '{n.name}' ({n.op_type}) reads '{x}', which nothing produces")
        deps.append(d)
    import heapq

    indeg = [len(d) for d in deps]
    users: list[list[int]] = [[] for _ in nodes]
    for i, d in enumerate(deps):
        for j in d:
            users[j].append(i)
    ready = [i for i, k in enumerate(indeg) if k == 0]
    heapq.heapify(ready)
    order = []
    while ready:
        i = heapq.heappop(ready)
        order.append(i)
        for u in users[i]:
            indeg[u] -= 1
            if indeg[u] == 0:
                heapq.heappush(ready, u)
    if len(order) != len(nodes):
        stuck = next(nodes[i].name for i, k in enumerate(indeg) if k > 0)
        raise ModelError(f"{where}: graph has a cycle through node '{stuck}'")
    if order != list(range(len(nodes))):
        sorted_nodes = [nodes[i] for i in order]
        del g.node[:]
        g.node.extend(sorted_nodes)


def _static_shape(vi: onnx.ValueInfoProto) -> tuple[int, ...] | None:
    t = vi.type.tensor_type
    if not vi.type.HasField("tensor_type") or not t.HasField("shape"):
        return None
    dims = tuple(d.dim_value if d.HasField("dim_value") else -1 for d in t.shape.dim)
    return dims if all(d >= 0 for d in dims) else None


def _shapes_by_running(model: ModelProto, missing: list[str]) -> dict[str, tuple[tuple[int, ...], int]]:
    """Resolve shapes that static inference leaves open by running ORT once on zeros."""
    import onnxruntime as ort

    probe = ModelProto()
    probe.CopyFrom(model)
    del probe.graph.value_info[:]
    existing = {o.name for o in probe.graph.output}
    for name in missing:
        if name not in existing:
            probe.graph.output.append(helper.ValueInfoProto(name=name))
    feeds = {}
    for vi in activation_inputs(model):
        shape = _static_shape(vi)
        dtype = helper.tensor_dtype_to_np_dtype(vi.type.tensor_type.elem_type)
        feeds[vi.name] = np.zeros(shape, dtype=dtype)
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.log_severity_level = 3
    sess = ort.InferenceSession(probe.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    outs = sess.run(missing, feeds)
    return {
        n: (tuple(int(d) for d in np.shape(v)), helper.np_dtype_to_tensor_dtype(np.asarray(v).dtype))
        for n, v in zip(missing, outs)
    }


def _infer_static_shapes(model: ModelProto, where: str) -> ModelProto:
    try:
        inferred = shape_inference.infer_shapes(model, strict_mode=True, data_prop=True)
    except (onnx.shape_inference.InferenceError, RuntimeError) as e:
        raise ModelError(f"{where}: shape inference failed: {str(e).splitlines()[0]}") from None
    g = inferred.graph
    known = {vi.name: vi for vi in list(g.value_info) + list(g.output) + list(g.input)}
    inits = {t.name for t in g.initializer}
    activations = [o for n in g.node for o in n.output if o and o not in inits]
    missing = [n for n in activations if n not in known or _static_shape(known[n]) is None]
    if missing:
        try:
            resolved = _shapes_by_running(inferred, missing)
        except Exception as e:  # ORT rejects the model: report the model, not ORT internals
            raise ModelError(
                f"{where}: cannot resolve static shapes of {len(missing)} tensors (first: '{missing[0]}'): "
                f"{str(e).splitlines()[0]}"
            ) from None
        outputs = {o.name for o in g.output}
        for name, (shape, elem) in resolved.items():
            vi = helper.make_tensor_value_info(name, elem, shape)
            if name in outputs:
                for o in g.output:
                    if o.name == name:
                        o.CopyFrom(vi)
            else:
                existing = [v for v in g.value_info if v.name == name]
                if existing:
                    existing[0].CopyFrom(vi)
                else:
                    g.value_info.append(vi)
    for o in g.output:
        if _static_shape(o) is None:
            raise ModelError(f"{where}: output '{o.name}' has no static shape")
    return inferred


def load_model(source: str | Path | ModelProto, input_shapes: dict[str, tuple[int, ...]] | None = None) -> ModelProto:
    """Read and validate a model; returns a new ModelProto with named, ordered nodes and static shapes.

    Raises ModelError naming the file/input/tensor when the model is unreadable, invalid,
    or has dynamic dims that `input_shapes` does not fix.
    """
    if isinstance(source, ModelProto):
        where = source.graph.name or "model"
        model = ModelProto()
        model.CopyFrom(source)
    else:
        path = Path(source)
        where = str(path)
        model = _read(path)
    if not model.graph.node:
        raise ModelError(f"{where}: graph has no nodes")
    _name_nodes(model)
    _toposort(model, where)
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as e:
        raise ModelError(f"{where}: invalid ONNX model: {str(e).splitlines()[0]}") from None
    _fix_input_shapes(model, dict(input_shapes or {}), where)
    # Stale intermediate shapes would contradict the fixed inputs; infer them afresh.
    del model.graph.value_info[:]
    for o in model.graph.output:
        if _static_shape(o) is None:
            o.type.tensor_type.ClearField("shape")
    return _infer_static_shapes(model, where)
