"""Kernel-time predictor: milliseconds of a fused kernel never measured, fitted on ones that were.

A kernel is a fused group (anchor node plus elementwise epilogue, see backends.profile). It is
described by a class (dense conv, 1x1 conv, depthwise conv, matmul, pooling, reduction,
elementwise, other) and a few sizes: FLOPs, bytes in and out, weight bytes, channels, pixels,
window, stride. Per class, time is a non-negative sum of cost terms (compute, compute lost
to narrow channels, bytes read, written and re-passed by the epilogue, compute and bytes read
a stride apart, per-pixel work, a fixed cost; compute counted as the target runs it, channels
padded to its block, Winograd maps to whole tiles, slower in a narrower block and in a register
tile that loads more operands per FMA), fitted for least *relative* error: a roofline whose rates
are learnt from the target. Additive terms extrapolate to unseen sizes where trees cannot, and
beat a log-linear fit in cross-validation on the calibration suite (median error 15% vs 34%).
Classes with a few samples fit the memory terms alone; fewer still share one pooled fit.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from nasc.backends.cpu_rules import winograd
from nasc.errors import NascError
from nasc.partitioner.analysis import Analysis, _attr, runs_winograd
from nasc.partitioner.load import node_inputs

if TYPE_CHECKING:
    from nasc.backends.cpu_rules.vector_spec import CpuVectorSpec

# a layout transform's direction is a class of its own: NCHW -> NCHW{c}c gathers strided channels
# and runs at 9-18 GB/s on Zen 5, the way back at 22-25 (a ShuffleNetV2 tail's 98 KB entry
# transform took 0.0094 ms, priced at 0.0047 when the two shared one class)
LAYOUT_CLASSES = ("layout_to_blocked", "layout_to_plain")
CLASSES = ("conv", "winograd", "conv1x1", "dwconv", "matmul", "pool", "reduce", "eltwise", "other", *LAYOUT_CLASSES)
# convs whose channel counts are not multiples of this run with the CPU layout pass's narrowest
# block (4 lanes) or in plain layout, several times slower per FLOP: a cost term of their own
CHANNEL_ALIGN = 8
# numeric features, in design-matrix order (after the intercept)
NUMERIC = ("flops", "in_bytes", "out_bytes", "weight_bytes", "out_channels", "in_channels_per_group",
           "out_pixels", "window", "stride", "ops", "plain_layout", "padding", "block_cost", "tile_padding",
           "tile_loads")
_POOL_OPS = {"MaxPool", "AveragePool", "LpPool"}
_MATMUL_OPS = {"Gemm", "MatMul", "Einsum"}
_ELTWISE_OPS = {"Add", "Mul", "Sub", "Div", "Relu", "Clip", "Sigmoid", "Tanh", "Concat", "Split", "Transpose",
                "Slice", "Pad", "Max", "Min", "Erf", "Cast", "Where", "Neg", "Sqrt", "Pow", "Exp",
                "HardSwish", "HardSigmoid", "LeakyRelu", "BatchNormalization", "Abs", "Gather", "Expand", "Tile"}
# relative errors are taken against max(ms, FLOOR_MS): a kernel measured at ~0 after call overhead
# must not dominate the fit
FLOOR_MS = 1e-3
# a class needs this many samples for a fit of its own, and this many for one of the memory
# terms alone; fewer share the pooled fit
MIN_CLASS_SAMPLES = 8
MIN_MEMORY_SAMPLES = 3
MEMORY_TERMS = ("in_bytes", "out_bytes", "weight_bytes", "constant")


def kernel_class(a: Analysis, anchor: int) -> str:
    n = a.nodes[anchor]
    op = n.op_type
    if op in ("Conv", "ConvTranspose"):
        group = int(_attr(n, "group", 1))
        w = _shape(a, n.input[1])
        if group > 1 and w and w[1] == 1:
            return "dwconv"
        k = int(np.prod(w[2:])) if w else 1
        if k == 1:
            return "conv1x1"
        # a different kernel, with its own rates, when its channels let it run blocked
        return "winograd" if _aligned(w, group) and runs_winograd(n, w, _shape(a, n.output[0])) else "conv"
    if op in _MATMUL_OPS:
        return "matmul"
    if op in _POOL_OPS:
        return "pool"
    if op.startswith("Global") or op.startswith("Reduce"):
        return "reduce"
    if op in _ELTWISE_OPS:
        return "eltwise"
    return "other"


def _aligned(w: tuple[int, ...], group: int) -> bool:
    """Whether a conv weight's output and input channels both fill CHANNEL_ALIGN blocks."""
    return bool(w) and w[0] % CHANNEL_ALIGN == 0 and (w[1] * group) % CHANNEL_ALIGN == 0


def _shape(a: Analysis, name: str) -> tuple[int, ...]:
    if name in a.specs:
        return tuple(a.specs[name].shape)
    for t in a.model.graph.initializer:
        if t.name == name:
            return tuple(t.dims)
    return ()


def group_features(a: Analysis, nodes: tuple[int, ...], runs: dict[str, tuple[int, int, int, float]] | None = None,
                   spec: "CpuVectorSpec | None" = None) -> dict:
    """The class and sizes of the kernel made of `nodes` (an anchor then its fused epilogue).

    `runs`: how the target runs each conv (backends.cpu_schedules.conv_runs); from it `padding`,
    the MACs a conv computes per MAC of the ONNX graph (channels padded to the block), whether it
    runs in plain layout (its output channels not widened to a block), and `block_cost`, its
    time per MAC in the block it runs in against a full-vector block. `spec`: the target's
    vectors, from which `tile_loads`, the operands its register tile loads per FMA."""
    anchor = a.nodes[nodes[0]]
    produced = {o for i in nodes for o in a.nodes[i].output}
    ext_in = dict.fromkeys(x for i in nodes for x in node_inputs(a.nodes[i]) if x in a.specs and x not in produced)
    last_out = [o for o in a.nodes[nodes[-1]].output if o in a.specs]
    out_shape = a.specs[last_out[0]].shape if last_out else ()
    in_shape = a.specs[anchor.input[0]].shape if anchor.input and anchor.input[0] in a.specs else ()
    window = int(np.prod(_attr(anchor, "kernel_shape", [1])))
    strides = _attr(anchor, "strides", [1])
    group = int(_attr(anchor, "group", 1))
    cin = in_shape[1] if len(in_shape) >= 2 else (in_shape[-1] if in_shape else 1)
    if anchor.op_type in _MATMUL_OPS and in_shape:
        cin = in_shape[0] if (anchor.op_type == "Gemm" and _attr(anchor, "transA", 0)) else in_shape[-1]
    if len(out_shape) == 4:
        cout, pixels = out_shape[1], out_shape[2] * out_shape[3]
    else:
        cout, pixels = (out_shape[-1] if out_shape else 1), int(np.prod(out_shape[:-1])) if len(out_shape) > 1 else 1
    cls = kernel_class(a, nodes[0])
    w = _shape(a, anchor.input[1]) if cls in ("conv", "conv1x1") else ()
    plain = bool(w) and not _aligned(w, group)
    padding = block_cost = tile_padding = tile_loads = 1.0
    if cls == "winograd":
        # whole tiles: a 7x7 or 14x14 map is computed as 8x8 or 16x16
        th, tw = winograd.tiles(out_shape[2], out_shape[3])
        tile_padding = th * tw * winograd.TILE ** 2 / max(pixels, 1)
    if runs and anchor.name in runs and len(in_shape) == 4 and len(out_shape) == 4:
        run_in, run_out, run_group, block_cost = runs[anchor.name]
        padding = (run_out * run_in / max(run_group, 1)) / max(out_shape[1] * in_shape[1] / max(group, 1), 1)
        # channels the CPU layout pass widened to its block run blocked, however the graph has them
        plain = plain and run_out % CHANNEL_ALIGN != 0
        if spec is not None and not plain:
            tile_loads = register_tile_loads(cls, run_out, out_shape, spec)
    return {
        "class": cls,
        "flops": float(sum(a.flops[i] for i in nodes)),
        "in_bytes": float(sum(a.specs[x].nbytes for x in ext_in)),
        "out_bytes": float(sum(a.specs[o].nbytes for o in last_out)),
        "weight_bytes": float(sum(a.initializer_bytes[w] for i in nodes for w in a.node_inits[i]
                                  if w not in a.index_initializers)),
        "out_channels": float(max(cout, 1)),
        "in_channels_per_group": float(max(cin // max(group, 1), 1)),
        "out_pixels": float(max(pixels, 1)),
        "window": float(max(window, 1)),
        "stride": float(max(strides) if strides else 1),
        "ops": float(len(nodes)),
        "plain_layout": float(plain),
        "padding": float(padding),
        "block_cost": float(block_cost),
        "tile_padding": float(tile_padding),
        "tile_loads": float(tile_loads),
    }


def register_tile_loads(cls: str, out_channels: int, out_shape, spec: "CpuVectorSpec") -> float:
    """Operands loaded per FMA by the register tile the CPU schedule gives a blocked conv of
    `out_channels` (widened to the block) and output `out_shape` (backends/cpu_rules/tir_rules.py):
    a rows x cols tile loads rows + cols operands for rows * cols FMAs, and a tile of few
    accumulators leaves the FMA units waiting on loads. A Winograd conv's tile is its matmuls'
    (tiles x out channels, one or two vectors wide). In the suite, Winograd convs whose out
    channels fill one vector but not two ran at 0.6x the GFLOP/s of those that fill two."""
    from nasc.backends.cpu_rules.tir_rules import matmul_row_tile

    if cls == "winograd":
        th, tw = winograd.tiles(out_shape[2], out_shape[3])
        rows = matmul_row_tile(th * tw)
        cols = 2 if out_channels % spec.matmul_cols == 0 else 1
    else:
        blocks = 1 if cls == "dwconv" else max(out_channels // spec.channel_block, 1)
        rows, cols = spec.conv_tile(blocks, out_shape[3])
    return (rows + cols) / (rows * cols)


# Kernel classes whose CPU schedule folds a fused elementwise epilogue (bias, ReLU, clip, residual
# add) into the register tile's write-back (backends/cpu_rules/tir_rules.py): the epilogue costs
# no pass over the output. The suite's convs, each left out in turn, with the epilogue term and
# without: 1x1 37% -> 52% within ±10%, depthwise 26% -> 32%, dense and Winograd as they were.
EPILOGUE_IN_REGISTERS = frozenset({"conv", "conv1x1", "dwconv", "winograd"})


def _terms(features: list[dict]) -> np.ndarray:
    """(K, T) cost terms of each kernel; time = terms @ rates with rates >= 0."""
    rows = []
    for f in features:
        # what runs: channels widened to the block, Winograd maps to whole tiles
        run = f["flops"] * f.get("padding", 1.0) * f.get("tile_padding", 1.0)
        compute = run * f.get("block_cost", 1.0)
        strided = float(f["stride"] > 1)
        rows.append([
            compute,                                              # compute, slower in a narrow block
            compute * f.get("tile_loads", 1.0),                   # and in a tile loading more per FMA
            run / max(f["in_channels_per_group"], 1.0),            # short reductions vectorise poorly
            run / max(f["out_channels"], 1.0),                     # so do narrow outputs
            f["in_bytes"], f["out_bytes"], f["weight_bytes"],      # memory traffic (and layout changes)
            # each fused epilogue op re-touches the output, except where the schedule applies it
            # to the register tile as it is written back
            0.0 if f["class"] in EPILOGUE_IN_REGISTERS else f["out_bytes"] * (f["ops"] - 1),
            run * f.get("plain_layout", 0.0),                      # convs left in plain layout
            # a strided conv or pool reads its input a stride apart: more cache lines per FMA,
            # fetched whole for the pixels it uses. The suite, each kernel left out in turn: 1x1
            # convs 51% -> 61% within ±10% (stride 2 had been priced 6% low), pools 21% -> 32%
            compute * strided, f["in_bytes"] * strided,
            f["out_pixels"],                                       # per-pixel loop overhead
            1.0,                                                   # fixed cost of a kernel
        ])
    return np.array(rows, np.float64).reshape(len(features), len(TERMS))


TERMS = ("flops", "operand_loads", "flops_per_in_channel", "flops_per_out_channel", "in_bytes", "out_bytes",
         "weight_bytes", "epilogue_bytes", "plain_layout_flops", "strided_flops", "strided_in_bytes",
         "out_pixels", "constant")


def nnls(a: np.ndarray, b: np.ndarray, max_iter: int = 500) -> np.ndarray:
    """min ||a x - b|| subject to x >= 0 (Lawson-Hanson active set)."""
    n = a.shape[1]
    x = np.zeros(n)
    passive = np.zeros(n, bool)
    for _ in range(max_iter):
        w = a.T @ (b - a @ x)
        if passive.all() or w[~passive].max(initial=-np.inf) <= 1e-12:
            break
        passive[np.argmax(np.where(passive, -np.inf, w))] = True
        while True:
            z = np.zeros(n)
            z[passive] = np.linalg.lstsq(a[:, passive], b, rcond=None)[0]
            if z[passive].min() > 0:
                x = z
                break
            neg = passive & (z <= 0)
            alpha = np.min(x[neg] / (x[neg] - z[neg]))
            x = x + alpha * (z - x)
            passive &= x > 1e-15
    return x


@dataclass(frozen=True)
class _Rates:
    """Non-negative milliseconds per unit of each cost term."""

    rates: np.ndarray

    def __call__(self, terms: np.ndarray) -> np.ndarray:
        return terms @ self.rates

    def to_json(self) -> list[float]:
        return self.rates.tolist()

    @classmethod
    def from_json(cls, d: list[float]) -> "_Rates":
        return cls(np.array(d, np.float64))


def _fit_rates(terms: np.ndarray, ms: np.ndarray) -> _Rates:
    """Least relative squared error: every row divided by its measured time; columns scaled to 1."""
    w = 1.0 / np.maximum(ms, FLOOR_MS)
    scale = np.abs(terms).max(axis=0)
    scale = np.where(scale > 0, scale, 1.0)
    x = nnls(terms / scale * w[:, None], ms * w)
    return _Rates(x / scale)


@dataclass(frozen=True)
class KernelPredictor:
    """Per-class cost-term rates plus a pooled fit; `samples` says what each was fitted on."""

    per_class: dict[str, _Rates]
    pooled: _Rates
    samples: dict[str, int] = field(default_factory=dict)

    def predict_ms(self, features: list[dict]) -> np.ndarray:
        if not features:
            return np.zeros(0)
        terms = _terms(features)
        out = np.empty(len(features))
        classes = np.array([f["class"] for f in features])
        for cls in set(classes.tolist()):
            rows = classes == cls
            out[rows] = self.per_class.get(cls, self.pooled)(terms[rows])
        return np.maximum(out, 0.0)

    def to_json(self) -> dict:
        return {"terms": list(TERMS), "classes": list(CLASSES), "samples": self.samples,
                "per_class": {k: v.to_json() for k, v in self.per_class.items()}, "pooled": self.pooled.to_json()}

    @classmethod
    def from_json(cls, d: dict) -> "KernelPredictor":
        if list(d.get("terms", [])) != list(TERMS):
            raise NascError("kernel predictor: fitted on other cost terms than this nasc uses; refit it with nasc-profile")
        return cls({k: _Rates.from_json(v) for k, v in d["per_class"].items()}, _Rates.from_json(d["pooled"]),
                   dict(d.get("samples", {})))


def fit_predictor(features: list[dict], ms: list[float] | np.ndarray) -> KernelPredictor:
    """Fit on measured kernels (features from `group_features`, times in ms)."""
    ms = np.asarray(ms, np.float64)
    if len(features) != len(ms) or len(ms) < 2:
        raise NascError(f"kernel predictor: need at least 2 measured kernels to fit, got {len(ms)}")
    terms = _terms(features)
    classes = [f["class"] for f in features]
    counts = {c: classes.count(c) for c in sorted(set(classes))}
    per_class = {}
    memory = np.array([t in MEMORY_TERMS for t in TERMS])
    for cls, k in counts.items():
        rows = np.array([c == cls for c in classes])
        if k >= MIN_CLASS_SAMPLES:
            per_class[cls] = _fit_rates(terms[rows], ms[rows])
        elif k >= MIN_MEMORY_SAMPLES:
            # too few for every term: a roofline's memory side of its own beats the pooled fit,
            # whose rates the compute-bound classes set (a global pool priced 0.6 us for 19)
            per_class[cls] = _fit_rates(terms[rows] * memory, ms[rows])
    return KernelPredictor(per_class, _fit_rates(terms, ms), counts)
