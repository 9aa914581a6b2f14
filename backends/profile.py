"""Measure kernels on a target: every fused kernel group of a model, compiled alone and timed in place.

A group is an anchor node plus the elementwise nodes a compiler fuses into it (the same
rule the analysis uses). Each group is extracted as a small ONNX model, compiled with the
target's pipeline and timed call by call (backends/context.py): its own calls are its time,
the layout transforms around it are samples of their own. Identical groups (same ops,
shapes and attributes) are measured once. The predictor is fitted on these; halves are
composed from them in search/latency.py. Also: the calibration suite and profile files.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import zlib
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np
from onnx import ModelProto, helper

from nasc.backends.cpu_rules import winograd
from nasc.partitioner.analysis import Analysis
from nasc.partitioner.load import node_inputs

if TYPE_CHECKING:
    from nasc.search.predictor import KernelPredictor

# /2: kernels are timed in place (their own calls only), layout transforms and call costs apart
PROFILE_FORMAT = "nasc-kernel-profile/3"


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


def _identity_conv(x: str, y: str, channels: int) -> tuple:
    """A depthwise 1x1 Conv of ones from x to y, and its weight."""
    ones = helper.make_tensor(f"{x}.ones", 1, [channels, 1, 1, 1], np.ones(channels, np.float32))
    return helper.make_node("Conv", [x, ones.name], [y], name=f"{x}.identity", group=channels, kernel_shape=[1, 1]), ones


def _float_4d(vi) -> list[int] | None:
    dims = [d.dim_value for d in vi.type.tensor_type.shape.dim]
    return dims if len(dims) == 4 and vi.type.tensor_type.elem_type == 1 and min(dims) > 0 else None


def in_blocked_layout(model: ModelProto, names: set[str] | None = None, outputs: bool = False) -> ModelProto:
    """`model` with an identity depthwise 1x1 Conv (weights of ones) in front of each 4-D input
    (of those in `names`, if given) and, with `outputs`, after each 4-D output.

    A kernel compiled alone runs in the layout its own convs allow, and a conv-free one or a
    3-channel stem in plain NCHW. In a CNN on a CPU a pool's inputs arrive NCHW{c}c and a
    stem writes NCHW{c}c, 1.5-10x faster. An identity conv gives the layout pass a conv to block
    at each such tensor; the CPU lowering turns it into a layout transform (timed as such,
    apart from the kernel), so the kernel runs as in the CNN."""
    m = ModelProto()
    m.CopyFrom(model)
    g = m.graph
    before, after = [], []
    for vi in g.input:
        dims = _float_4d(vi)
        if dims is None or (names is not None and vi.name not in names):
            continue
        blocked = f"{vi.name}.blocked"
        for node in g.node:
            node.input[:] = [blocked if x == vi.name else x for x in node.input]
        conv, ones = _identity_conv(vi.name, blocked, dims[1])
        before.append(conv)
        g.initializer.append(ones)
    for vi in g.output if outputs else ():
        dims = _float_4d(vi)
        if dims is None:
            continue
        computed = f"{vi.name}.computed"
        for node in g.node:
            node.output[:] = [computed if y == vi.name else y for y in node.output]
        conv, ones = _identity_conv(computed, vi.name, dims[1])
        after.append(conv)
        g.initializer.append(ones)
    nodes = [*before, *g.node, *after]
    del g.node[:]
    g.node.extend(nodes)
    return m


def planned_layouts(a: Analysis, groups: list[KernelGroup], target) -> list[tuple[set[str], bool]]:
    """For each group, the tensors it reads in NCHW{c}c inside `a` on `target` and whether it
    writes NCHW{c}c, as the CPU layout pass places them (search.latency.planned_record);
    plain everywhere off a CPU."""
    if target.device != "cpu":
        return [(set(), False) for _ in groups]
    from nasc.search.latency import planned_record

    plan = planned_record(a, groups, np.zeros(len(groups)), channel_block(target), lambda _nbytes, _to_blocked: 0.0)
    return [({x for x, b in k["reads"] if b}, bool(k["blocked"])) for k in plan["kernels"]]


CALL_KEY = "call_overhead"
# layout transforms are kernels too: their samples are keyed by the bytes they move
LAYOUT_PREFIX = "layout:"
SPECIAL_KEYS = (CALL_KEY,)


def layout_key(nbytes: int, to_blocked: bool) -> str:
    return f"{LAYOUT_PREFIX}{'blocked' if to_blocked else 'plain'}:{int(nbytes)}"


def layout_sample(key: str) -> tuple[int, bool]:
    """(bytes, to blocked) of a `layout_key`."""
    to, nbytes = key[len(LAYOUT_PREFIX):].split(":")
    return int(nbytes), to == "blocked"


def layout_features(nbytes: float, to_blocked: bool) -> dict:
    """Predictor features of a layout transform moving `nbytes` into NCHW{c}c (`to_blocked`) or
    out of it (a class for each direction: bytes and a fixed cost)."""
    from nasc.search.predictor import LAYOUT_CLASSES

    return {"class": LAYOUT_CLASSES[0 if to_blocked else 1], "flops": 0.0, "in_bytes": float(nbytes),
            "out_bytes": float(nbytes), "weight_bytes": 0.0, "out_channels": 1.0, "in_channels_per_group": 1.0,
            "out_pixels": 1.0, "window": 1.0, "stride": 1.0, "ops": 1.0, "plain_layout": 0.0, "padding": 1.0,
            "block_cost": 1.0}


def trivial_model() -> ModelProto:
    """A one-element Relu: a model whose time is all call overhead."""
    g = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "call",
                          [helper.make_tensor_value_info("x", 1, [1])], [helper.make_tensor_value_info("y", 1, [1])])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m


@lru_cache(maxsize=None)
def trivial_executable(target):
    """The trivial model compiled for `target` (once per target)."""
    from nasc.backends import tvm as tvm_backend

    return tvm_backend.compile_model(trivial_model(), target)


@lru_cache(maxsize=None)
def call_overhead_ms(target) -> float:
    """What one VM call costs beyond its kernels: the trivial model, timed like any kernel (once per target)."""
    from nasc.backends.tvm import time_model_ms

    return time_model_ms(trivial_model(), target, executable=trivial_executable(target))


def measure_kernels(a: Analysis, target, known: dict[str, float] | None = None,
                    log: Callable[[str], None] | None = None, database=None,
                    blocked: bool = False) -> dict[str, float]:
    """Milliseconds per kernel signature on `target`, measuring only signatures not in `known`;
    with a MetaSchedule `database`, tuned kernels.

    Each distinct kernel is compiled alone and timed in place (backends/context.py): its time is
    its own calls only. The layout transforms around it are kept as samples of their own
    (`layout:<bytes>`), and the cost of a call under CALL_KEY. On a CPU a conv-free kernel is
    timed in the layout it has in `a`: the inputs `planned_layouts` names (with `blocked`, all
    its 4-D inputs, as in a CNN) arrive NCHW{c}c through `in_blocked_layout`, and its output
    leaves so where it writes blocked; a conv that reads plain and writes blocked there (a stem)
    writes blocked alone too.
    """
    from nasc.backends import tvm as tvm_backend
    from nasc.backends.context import measure_in_context

    tvm_backend.set_threads()
    times = dict(known or {})
    if CALL_KEY not in times:
        times[CALL_KEY] = call_overhead_ms(target)
    groups = kernel_groups(a)
    todo = {g.signature: g for g in groups if g.signature not in times}
    # (tensors read blocked, writes blocked) per kernel; reads None: every 4-D input, as in a CNN.
    # Off a CPU everything is plain, and identity convs would be kernels of their own.
    if target.device != "cpu" or not todo:
        as_in_cnn = {}
    elif blocked:
        as_in_cnn = {sig: (None, True) for sig in todo}
    else:
        as_in_cnn = {g.signature: layout for g, layout in zip(groups, planned_layouts(a, groups, target))}
    for k, (sig, g) in enumerate(todo.items()):
        if log:
            log(f"kernel {k + 1}/{len(todo)}: " + "+".join(a.nodes[i].op_type for i in g.nodes))
        alone = group_model(a, g)
        reads, writes = as_in_cnn.get(sig, (set(), False))
        if any(a.nodes[i].op_type == "Conv" for i in g.nodes):
            if writes and not reads:
                alone = in_blocked_layout(alone, set(), outputs=True)
        elif reads is None or reads:
            # written blocked too, as the CNN's next conv reads it: a trailing transform to plain
            # would fuse with an elementwise kernel into one call, timed as a transform (a suite
            # Add+Relu of 2 x 30 MB read 0 ms, and its transform twice the Add)
            alone = in_blocked_layout(alone, reads, outputs=writes)
        ga = prepared_analysis(alone)
        doc = measure_in_context(ga, target, database=database)
        times[sig] = float(sum(c["ms"] for c in doc["kernels"]))
        for t in doc["transforms"]:
            if t["tensor"] in ga.specs:
                times.setdefault(layout_key(ga.specs[t["tensor"]].nbytes, t["to_blocked"]), t["ms"])
    return times


def kernel_features(a: Analysis, channel_block: int | None = None, spec=None) -> dict[str, dict]:
    """{signature: features} of every kernel group (what the predictor is fitted on), its convs as a
    CPU with vectors of `channel_block` lanes runs them (None: as in `a`), their register tiles
    as one of vector spec `spec` (`vector_spec`) tiles them."""
    from nasc.backends.cpu_schedules import conv_runs
    from nasc.search.predictor import group_features

    runs = conv_runs(a.model, channel_block)
    return {g.signature: group_features(a, g.nodes, runs, spec) for g in kernel_groups(a)}


def vector_spec(target):
    """The SIMD shape of `target`'s CPU pipeline (backends/cpu_rules/vector_spec.py; None off a CPU)."""
    if target.device != "cpu":
        return None
    from nasc.backends.cpu_schedules import cpu_vector_spec

    return cpu_vector_spec(target.tvm())


def channel_block(target) -> int | None:
    """The NCHW{c}c block of `target`'s CPU pipeline (None off a CPU)."""
    spec = vector_spec(target)
    return spec.channel_block if spec is not None else None


def part_signature(a: Analysis, nodes: tuple[int, ...]) -> str:
    """Signature of any run of a group's nodes (a group broken by a cut runs as two kernels)."""
    return _signature(a, list(nodes))


# ---------------------------------------------------------------------------------------
# calibration suite: sampled standalone kernels a predictor is fitted on

SUITE_SIZE = 320
# kernel mix of the suite (weights): CNN kernels dominate IoT models
SUITE_MIX = {"conv": 0.14, "winograd": 0.12, "conv-plain": 0.07, "conv1x1": 0.14, "conv1x1-plain": 0.06, "dwconv": 0.16, "matmul": 0.1,
             "classifier": 0.05, "pool": 0.1, "reduce": 0.05, "eltwise": 0.1, "other": 0.04, "stem": 0.04}
# map sides: ImageNet-sized inputs halve 224 (112 ... 7), CIFAR- and 64-pixel ones 64 (... 2); a suite
# without the second priced DenseNet's 1x1 convs on 64x64 to 4x4 maps 20-40% slow
SUITE_PIXELS = (2, 4, 7, 8, 14, 16, 28, 32, 56, 64, 112)
SUITE_STEM_PIXELS = (64, 96, 128, 160, 224)
SUITE_CHANNELS = (8, 1024)      # log-uniform, multiples of 8
# channels x map side of CNN stages (ResNet-18 3584 throughout, MobileNetV2 900-8000): half the
# convs are drawn there, where deep stages put wide layers on small maps and their weights outgrow
# the caches; the other half span SUITE_CHANNELS at any size
SUITE_STAGE_WIDTH = (900, 8000)
# the share of pools, reductions and elementwise kernels whose channels fill 8-channel blocks
SUITE_ALIGNED_SHARE = 0.7
# a CNN's classifier: features in (log-uniform) and classes out (CIFAR, CIFAR-100, ImageNet); its
# weights, up to 8 MB, stream from memory once a call, unlike the other matmuls'
SUITE_CLASSIFIER_IN = (64, 2048)
SUITE_CLASSES = (10, 100, 1000, 1000)
# keep each sampled kernel under ~10 ms on a small CPU so the suite stays a few minutes
SUITE_MAX_FLOPS = 4e8


def _channels(rng, aligned: bool = True, hw: int | None = None) -> int:
    """Log-uniform channels, a multiple of 8, or (not `aligned`) 4 off one (12, 36, 60: DenseNet's growth);
    given the map's side `hw`, within the widths CNN stages give maps of that side (SUITE_STAGE_WIDTH)."""
    lo, hi = SUITE_CHANNELS
    if hw is not None:
        lo, hi = max(lo, SUITE_STAGE_WIDTH[0] / hw), min(hi, SUITE_STAGE_WIDTH[1] / hw)
    c = int(max(8, round(float(np.exp(rng.uniform(np.log(lo), np.log(hi)))) / 8) * 8))
    return c if aligned else c - 4


def _suite_kernel(kind: str, rng, seed: int) -> ModelProto:
    from nasc.examples.builder import Net

    n = Net(f"suite_{kind}", seed)
    if kind == "stem":  # an RGB image in, read plain and written blocked
        k, cout, hw = int(rng.choice((3, 3, 7))), int(rng.choice((16, 24, 32, 48, 64))), int(rng.choice(SUITE_STEM_PIXELS))
        act = str(rng.choice(("relu", "relu6", "none")))
        return n.build(n.conv(n.input("input", (1, 3, hw, hw)), 3, cout, k, 2, act=None if act == "none" else act),
                       "suite stem")
    if kind == "classifier":
        lo, hi = np.log(SUITE_CLASSIFIER_IN)
        cin = int(round(float(np.exp(rng.uniform(lo, hi))) / 8) * 8)
        return n.build(n.linear(n.input("input", (1, cin)), cin, int(rng.choice(SUITE_CLASSES))), "suite classifier")
    hw = int(rng.choice(SUITE_PIXELS))
    if kind.startswith(("conv", "dwconv", "winograd")):
        plain, kind = kind.endswith("-plain"), kind.removesuffix("-plain")
        k = 1 if kind == "conv1x1" else 3 if kind == "winograd" else int(
            rng.choice((3, 3, 5, 7) if kind == "conv" else (3, 3, 5)))
        while True:
            # a narrow-block or plain-layout conv: one or both channel counts miss the 8-channel block
            odd = str(rng.choice(("in", "out", "both"))) if plain else ""
            stage = hw if rng.random() < 0.5 else None
            cin, cout = _channels(rng, odd not in ("in", "both"), stage), _channels(rng, odd not in ("out", "both"), stage)
            if kind == "dwconv":
                cout = cin
            stride = int(rng.choice((1, 1, 2)))
            if kind == "winograd":  # the 3x3 convs backends/cpu_rules/winograd.py runs as Winograd
                stride = 1
                if not winograd.fits((3, 3), (1, 1), (1, 1), (1, 1, 1, 1), 1, (hw, hw), (cin, cout)):
                    continue
            groups = cin if kind == "dwconv" else 1
            flops = 2.0 * (hw // stride) ** 2 * cout * (cin // groups) * k * k
            if flops <= SUITE_MAX_FLOPS:
                break
            hw = max(SUITE_PIXELS[0], hw // 2)
        x = n.input("input", (1, cin, hw, hw))
        act = str(rng.choice(("relu", "relu6", "none")))
        y = n.conv(x, cin, cout, k, stride, groups=groups, act=None if act == "none" else act)
        if stride == 1 and cin == cout and rng.random() < 0.4:
            y = n.act(n.add(y, x), "relu")
        return n.build(y, f"suite {kind}{' (plain layout)' if plain else ''}")
    if kind == "matmul":
        cin, cout = _channels(rng), _channels(rng)
        if rng.random() < 0.5:
            x = n.input("input", (1, cin))
            return n.build(n.linear(x, cin, cout), "suite gemm")
        tokens = int(rng.choice((16, 49, 64, 196)))
        x = n.input("input", (1, tokens, cin))
        y = n.matmul(x, cin, cout)
        return n.build(n.act(y, "gelu") if rng.random() < 0.5 else y, "suite matmul")
    # as DenseNet's (90 channels at its global pool, 36 at a transition), some not a block's multiple
    c = _channels(rng, rng.random() < SUITE_ALIGNED_SHARE) if kind in ("pool", "reduce", "eltwise") else _channels(rng)
    if kind in ("pool", "reduce"):
        x = n.input("input", (1, c, hw, hw))
        if kind == "reduce":
            return n.build(n.node("GlobalAveragePool", [x], prefix="gap"), "suite reduce")
        pool = str(rng.choice(("max3s2", "max3s2", "avg3s1", "avg3s2", "avg2s2")))
        if pool == "avg2s2":  # a DenseNet transition
            y = n.node("AveragePool", [x], kernel_shape=[2, 2], strides=[2, 2])
        else:
            y = n.maxpool(x, 3, 2) if pool == "max3s2" else n.avgpool(x, 3, int(pool[-1]))
        return n.build(y, "suite pool")
    if kind == "eltwise":
        x = n.input("input", (1, c, hw, hw))
        other = n.input("other", (1, c, hw, hw))
        y = n.concat([x, other]) if rng.random() < 0.3 else n.act(n.add(x, other), "relu")
        return n.build(y, "suite eltwise")
    tokens = int(rng.choice((16, 49, 64, 196)))
    x = n.input("input", (1, tokens, c))
    y = n.layernorm(x, c) if rng.random() < 0.5 else n.node("Softmax", [x], axis=-1)
    return n.build(y, "suite other")


def calibration_suite(size: int = SUITE_SIZE, seed: int = 0) -> list[ModelProto]:
    """`size` seeded single-kernel models spanning the kernel classes and sizes of IoT CNNs/ViTs."""
    rng = np.random.default_rng(seed)
    kinds = list(SUITE_MIX)
    weights = np.array([SUITE_MIX[k] for k in kinds])
    # one kernel of every class first, so even a small suite covers them all
    picks = list(range(min(size, len(kinds)))) + list(rng.choice(len(kinds), size=max(size - len(kinds), 0), p=weights / weights.sum()))
    # each kind draws its sizes from a stream of its own: a change to one kind's sampling (or to
    # the mix) leaves the kernels drawn for every other kind as they were
    streams = {k: np.random.default_rng([seed, zlib.crc32(k.encode())]) for k in kinds}
    return [_suite_kernel(kinds[int(k)], streams[kinds[int(k)]], seed * 100_003 + i) for i, k in enumerate(picks)]


def prepared_analysis(model: ModelProto) -> Analysis:
    """The analysis every nasc path cuts: loaded, PREPARE passes run, analysed."""
    from nasc.partitioner import analyze, load_model
    from nasc.passes import prepare

    return analyze(load_model(prepare(load_model(model))))


def measure_suite(target, size: int = SUITE_SIZE, seed: int = 0, known: dict[str, float] | None = None,
                  log: Callable[[str], None] | None = None, database=None) -> tuple[dict[str, float], dict[str, dict]]:
    """(kernel ms, kernel features) of the calibration suite on `target` (signatures in `known` are reused)."""
    times = dict(known or {})
    features: dict[str, dict] = {}
    for k, m in enumerate(calibration_suite(size, seed)):
        if log:
            log(f"calibration kernel {k + 1}/{size}: {m.doc_string}")
        a = prepared_analysis(m)
        # the suite's kernels stand for those of CNNs: conv-free ones are timed as they run in one
        times = measure_kernels(a, target, times, database=database, blocked=True)
        features.update(kernel_features(a, channel_block(target), vector_spec(target)))
    return times, features


# ---------------------------------------------------------------------------------------
# profile files


@dataclass(frozen=True)
class KernelProfile:
    """A measured profile of one target: kernel times, their features and the predictor fitted on them,
    plus in-context kernel times of whole models (backends/context.py) keyed by model."""

    target: dict
    kernels: dict[str, float]
    features: dict[str, dict]
    predictor: "KernelPredictor | None"
    path: str = ""
    contexts: dict[str, dict] = field(default_factory=dict)

    @property
    def call_ms(self) -> float:
        return float(self.kernels.get(CALL_KEY, 0.0))


def fit_profile_predictor(kernels: dict[str, float], features: dict[str, dict]):
    """The predictor over every kernel with features, or None when there are too few."""
    from nasc.search.predictor import fit_predictor

    sigs = [s for s in features if s in kernels and s not in SPECIAL_KEYS]
    layouts = [s for s in kernels if s.startswith(LAYOUT_PREFIX)]
    if len(sigs) < 2:
        return None
    feats = [features[s] for s in sigs] + [layout_features(*layout_sample(s)) for s in layouts]
    return fit_predictor(feats, [kernels[s] for s in sigs + layouts])


def save_profile(path: Path, target, kernels: dict[str, float], features: dict[str, dict], meta: dict,
                 contexts: dict[str, dict] | None = None) -> dict:
    """Write (atomically) a profile with a predictor refitted on all its kernels."""
    from nasc.backends.targets import host_cpu

    predictor = fit_profile_predictor(kernels, features)
    doc = {"format": PROFILE_FORMAT, "source": "measured", "target": target.to_json(), "host_cpu": host_cpu(),
           "threads": int(os.environ.get("TVM_NUM_THREADS", os.cpu_count() or 1)),
           "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **meta, "kernels": kernels,
           "features": features, "contexts": contexts or {}, "predictor": predictor.to_json() if predictor else None}
    tmp = Path(str(path) + ".tmp")
    tmp.write_text(json.dumps(doc, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, path)
    return doc


def is_kernel_profile(doc) -> bool:
    return isinstance(doc, dict) and str(doc.get("format", "")).startswith(PROFILE_FORMAT.split("/")[0] + "/")


def kernel_profile(doc: dict, path: str = "") -> KernelProfile:
    """A loaded profile document (see save_profile) as a KernelProfile; the predictor is refitted
    from the stored kernels and features (the stored one is for people to read)."""
    from nasc.errors import NascError
    from nasc.search.predictor import KernelPredictor

    if doc.get("format") != PROFILE_FORMAT:
        raise NascError(f"{path or 'profile'}: kernel profile format {doc.get('format')!r}, this nasc reads "
                        f"{PROFILE_FORMAT!r}; measure it again with nasc-profile")
    try:
        kernels = {k: float(v) for k, v in doc["kernels"].items()}
        features = dict(doc.get("features", {}))
        # refitting takes milliseconds and keeps a profile usable across predictor changes
        pred = fit_profile_predictor(kernels, features) if features else (
            KernelPredictor.from_json(doc["predictor"]) if doc.get("predictor") else None)
        return KernelProfile(doc["target"], kernels, features, pred, path, dict(doc.get("contexts", {})))
    except (KeyError, TypeError, ValueError) as e:
        raise NascError(f"{path or 'profile'}: malformed kernel profile ({type(e).__name__}: {e})") from None
