"""Search spaces: what an architecture is, how it is indexed and which blocks it is made of.

A space turns an architecture index into a chain of blocks whose costs are sums of a few probed
*terms*; the latency table, the supernet and the search only speak to the `SearchSpace` protocol.
"""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass
from functools import cached_property
from typing import Callable, Protocol

import numpy as np

from nasc.errors import NascError
from nasc.search.nas import defaults as D


@dataclass(frozen=True)
class SpaceConfig:
    """Macro-skeleton sizes: stem width, cells per stage, input resolution, classes."""

    channels: int = D.DEFAULT_CHANNELS
    cells_per_stage: int = D.DEFAULT_CELLS_PER_STAGE
    resolution: int = D.DEFAULT_RESOLUTION
    num_classes: int = 10
    in_channels: int = 3

    @property
    def input_shape(self) -> tuple[int, int, int, int]:
        return (1, self.in_channels, self.resolution, self.resolution)


NB201_TABLE_CONFIG = SpaceConfig(
    channels=D.NB201_TABLE_CHANNELS,
    cells_per_stage=D.NB201_TABLE_CELLS,
    resolution=D.NB201_TABLE_RESOLUTION,
    num_classes=D.NB201_TABLE_CLASSES,
)


@dataclass(frozen=True)
class Term:
    """One piece whose latency and weights are probed once: a module at a fixed input shape."""

    name: str
    input_shape: tuple[int, ...]
    num_inputs: int = 1
    # Price the term as it sits in a network: its first input comes from an (unpriced) producer,
    # so elementwise ops a compiler fuses into that producer are priced fused.
    after_producer: bool = False


@dataclass(frozen=True)
class BlockStructure:
    """Every architecture of a space as a chain of B blocks built from T probed terms.

    `term_counts[a, b, t]` says how often term t runs in block b of arch a; a cut may follow any
    block but the last. Byte counts are float32 activations at batch 1.
    """

    block_names: tuple[str, ...]
    terms: tuple[Term, ...]
    term_counts: np.ndarray  # (A, B, T) uint8
    out_bytes: np.ndarray  # (B,) bytes of each block's output tensor
    input_bytes: int
    peak_act_bytes: np.ndarray  # (A, B) peak live activation bytes of each block (see live_peak)

    @property
    def num_blocks(self) -> int:
        return len(self.block_names)

    @property
    def cut_names(self) -> tuple[str, ...]:
        """K = B + 1 split points: server-only, after each block but the last, device-only."""
        return ("server-only",) + tuple(f"after {n}" for n in self.block_names[:-1]) + ("device-only",)


class SearchSpace(Protocol):
    """What the search needs from a space; a new space implements these and nothing else.

    A space is built for a macro skeleton (`get_space(name, cfg)`), so one whose set of archs
    depends on depth (mbv2) fits as well as one that does not (nb201).
    """

    name: str
    num_archs: int

    def arch_str(self, index: int) -> str: ...

    def arch_index(self, arch: str) -> int: ...

    def random_arch(self, rng: np.random.Generator) -> int: ...

    def mutate(self, index: int, rng: np.random.Generator) -> int: ...

    def structure(self, cfg: SpaceConfig) -> BlockStructure: ...

    def term_module(self, cfg: SpaceConfig, term: Term): ...

    def build_supernet(self, cfg: SpaceConfig): ...


# --------------------------------------------------------------------------- NB201

# Edge e of the 4-node cell connects node EDGE_SRC[e] to node EDGE_DST[e], in NB201 string order.
EDGE_SRC = np.array([0, 0, 1, 0, 1, 2])
EDGE_DST = np.array([1, 2, 2, 3, 3, 3])
NONE, SKIP, CONV1, CONV3, POOL = range(len(D.NB201_OPS))
# Ops that cost something when live (skip_connect exports to nothing).
COSTED_OPS = (CONV1, CONV3, POOL)


def nb201_ops_table() -> np.ndarray:
    """(15625, 6) op ids in the NAS-Bench-201 index order.

    NB201 enumerated cells lexicographically (first edge most significant, ops in NB201_OPS order)
    and shuffled the list with Python's `random.seed(88); random.shuffle(...)`; we do the same.
    """
    archs = list(itertools.product(range(len(D.NB201_OPS)), repeat=D.NB201_NUM_EDGES))
    random.Random(D.NB201_SHUFFLE_SEED).shuffle(archs)
    return np.asarray(archs, dtype=np.int8)


def nb201_live_edges(ops: np.ndarray) -> np.ndarray:
    """Bool mask (..., 6): edges on a path from node 0 to node 3 through non-`none` ops.

    Other edges never change the cell output, so neither the subnet nor the latency counts them.
    """
    nz = ops != NONE
    reach1 = nz[..., 0]
    reach2 = nz[..., 1] | (nz[..., 2] & reach1)
    useful2 = nz[..., 5]
    useful1 = nz[..., 4] | (nz[..., 2] & useful2)
    return np.stack(
        [
            nz[..., 0] & useful1,
            nz[..., 1] & useful2,
            nz[..., 2] & reach1 & useful2,
            nz[..., 3],
            nz[..., 4] & reach1,
            nz[..., 5] & reach2,
        ],
        axis=-1,
    )


# Kernel terms of one cell, as they appear in its exported graph (see nb201_cell_terms).
CELL_TERMS = ("nor_conv_1x1", "nor_conv_3x3", "avg_pool_3x3", "relu", "relu_fused", "add", "add_unfused", "zero")

# One node of a block's exported graph: (kind, input tensor ids, output tensor id).
Node = tuple[str, tuple[str, ...], str]
BLOCK_INPUT = "x"


def nb201_cell_nodes(ops, live) -> list[Node]:
    """The nodes the exporter emits for one cell, in execution order, over tensor ids ("x" = input).

    A conv edge is ReLU -> Conv (BN folded); a node fed by one edge is that edge's tensor, one fed
    by several adds them up in edge order; identical nodes on the same tensors (the ReLU or AvgPool
    of a source, a repeated sum) are merged at their first use, as the exporter's CSE does; an
    unreachable output node is `x * 0`.
    """
    nodes: list[Node] = []
    made: dict[tuple, str] = {}

    def once(kind: str, *inputs: str) -> str:
        key = (kind, *inputs)
        if key not in made:
            made[key] = f"{kind}({','.join(inputs)})"
            nodes.append((kind, inputs, made[key]))
        return made[key]

    value = {0: BLOCK_INPUT}  # cell node -> tensor holding it
    for j in (1, 2, 3):
        acc = None
        for e in np.flatnonzero((EDGE_DST == j) & np.asarray(live, dtype=bool)):
            src, op = value[int(EDGE_SRC[e])], int(ops[e])
            if op in (CONV1, CONV3):
                y = f"conv{e}"
                nodes.append((D.NB201_OPS[op], (once("relu", src),), y))
            elif op == POOL:
                y = once("avg_pool_3x3", src)
            else:
                y = src
            acc = y if acc is None else once("add", acc, y)
        if acc is not None:
            value[j] = acc
    if 3 not in value:
        once("zero", BLOCK_INPUT)
    return nodes


def _readers(nodes: list[Node]) -> dict[str, int]:
    count: dict[str, int] = {}
    for _, inputs, _ in nodes:
        for t in set(inputs):
            count[t] = count.get(t, 0) + 1
    return count


def nb201_cell_terms(ops, live) -> dict[str, int]:
    """How often each kernel term runs in one cell of the exported graph (see nb201_cell_nodes).

    A ReLU or Add is fused into its first input's producer when it is that tensor's only reader
    (nasc's analysis rule); the cell input always has a producer (the block before).
    """
    nodes = nb201_cell_nodes(ops, live)
    readers = _readers(nodes)
    counts = dict.fromkeys(CELL_TERMS, 0)
    for kind, inputs, _ in nodes:
        if kind in ("relu", "add"):
            fused = readers[inputs[0]] == 1
            kind = {"relu": "relu_fused" if fused else "relu", "add": "add" if fused else "add_unfused"}[kind]
        counts[kind] += 1
    return counts


def live_peak(nodes: list[Node], size: Callable[[str], int]) -> int:
    """Most activation bytes alive at once while a block's nodes run, by nasc's partitioner rule.

    A tensor lives from its producer to its last reader; the block input from before the block,
    the block output (read by no node here) to the end. In a chain of blocks nothing else is
    alive, so a head's peak is the largest peak of its blocks.
    """
    last: dict[str, int] = {}
    for p, (_, inputs, _) in enumerate(nodes):
        for t in inputs:
            last[t] = p
    n = len(nodes)
    spans = [(-1, last.get(BLOCK_INPUT, -1), size(BLOCK_INPUT))]
    spans += [(p, last.get(out, n), size(out)) for p, (_, _, out) in enumerate(nodes)]
    return max((sum(b for s, e, b in spans if s <= p <= e) for p in range(n)), default=0)


# Fixed blocks as exported (BN folded into the convs): the stem's conv; the residual reduction
# (shortcut first, as its forward computes it); the head's BN-ReLU-GAP-linear.
STEM_NODES: list[Node] = [("conv", (BLOCK_INPUT,), "out")]
NB201_REDUCTION_NODES: list[Node] = [
    ("avg_pool_2x2", (BLOCK_INPUT,), "pool"),
    ("conv_1x1", ("pool",), "shortcut"),
    ("relu", (BLOCK_INPUT,), "relu"),
    ("conv_a", ("relu",), "a"),
    ("relu", ("a",), "relu_a"),
    ("conv_b", ("relu_a",), "b"),
    ("add", ("shortcut", "b"), "out"),
]
NB201_HEAD_NODES: list[Node] = [
    ("batchnorm", (BLOCK_INPUT,), "bn"),
    ("relu", ("bn",), "relu"),
    ("mean", ("relu",), "mean"),
    ("linear", ("mean",), "logits"),
]


def nb201_arch_str(ops) -> str:
    o = [D.NB201_OPS[int(i)] for i in ops]
    return f"|{o[0]}~0|+|{o[1]}~0|{o[2]}~1|+|{o[3]}~0|{o[4]}~1|{o[5]}~2|"


def parse_nb201_arch(arch: str) -> tuple[int, ...]:
    """Op ids of an NB201 arch string; NascError naming the string if malformed."""
    try:
        nodes = arch.strip().strip("|").split("|+|")
        ops: list[int] = []
        for j, node in enumerate(nodes, start=1):
            edges = node.split("|")
            if len(edges) != j:
                raise ValueError
            for i, edge in enumerate(edges):
                name, src = edge.split("~")
                if int(src) != i:
                    raise ValueError
                ops.append(D.NB201_OPS.index(name))
        if len(ops) != D.NB201_NUM_EDGES:
            raise ValueError
    except ValueError:
        raise NascError(
            f"{arch!r}: not an NB201 arch string (expected |op~0|+|op~0|op~1|+|op~0|op~1|op~2| "
            f"with ops {', '.join(D.NB201_OPS)})"
        ) from None
    return tuple(ops)


class NB201Space:
    """NAS-Bench-201 cell space on the NB201 macro skeleton (stem, 3 stages of N cells,
    2 residual reduction blocks, BN-ReLU-GAP-linear head); all cells share one cell genotype."""

    name = "nb201"
    num_archs = len(D.NB201_OPS) ** D.NB201_NUM_EDGES

    @cached_property
    def ops(self) -> np.ndarray:
        return nb201_ops_table()

    @cached_property
    def live(self) -> np.ndarray:
        return nb201_live_edges(self.ops)

    @cached_property
    def cell_terms(self) -> np.ndarray:
        """(A, len(CELL_TERMS)) kernel-term counts of one cell of every arch."""
        rows = [nb201_cell_terms(o, l) for o, l in zip(self.ops.tolist(), self.live)]
        return np.array([[r[t] for t in CELL_TERMS] for r in rows], dtype=np.uint8)

    @cached_property
    def cell_peak_units(self) -> np.ndarray:
        """(A,) peak live activations of one cell, in cell-sized tensors (all of a cell's tensors
        have the shape of its input)."""
        return np.array(
            [live_peak(nb201_cell_nodes(o, l), lambda _t: 1) for o, l in zip(self.ops.tolist(), self.live)],
            dtype=np.int64,
        )

    @cached_property
    def _index_of(self) -> dict[tuple[int, ...], int]:
        return {tuple(int(v) for v in row): i for i, row in enumerate(self.ops)}

    def arch_str(self, index: int) -> str:
        return nb201_arch_str(self.ops[self._check(index)])

    def arch_index(self, arch: str) -> int:
        return self._index_of[parse_nb201_arch(arch)]

    def arch_ops(self, index: int) -> tuple[int, ...]:
        return tuple(int(v) for v in self.ops[self._check(index)])

    def random_arch(self, rng: np.random.Generator) -> int:
        return int(rng.integers(self.num_archs))

    def mutate(self, index: int, rng: np.random.Generator) -> int:
        """One edge changed to a different op (the NB201 regularised-evolution mutation)."""
        ops = list(self.arch_ops(index))
        e = int(rng.integers(D.NB201_NUM_EDGES))
        ops[e] = int((ops[e] + 1 + rng.integers(len(D.NB201_OPS) - 1)) % len(D.NB201_OPS))
        return self._index_of[tuple(ops)]

    def _check(self, index: int) -> int:
        if not 0 <= int(index) < self.num_archs:
            raise NascError(f"arch index {index} is outside the NB201 space (0..{self.num_archs - 1})")
        return int(index)

    # -- structure ---------------------------------------------------------------------------
    @staticmethod
    def stage_shapes(cfg: SpaceConfig) -> list[tuple[int, int, int, int]]:
        r = cfg.resolution
        return [(1, cfg.channels * 2**s, r // 2**s, r // 2**s) for s in range(3)]

    @staticmethod
    def block_names(cfg: SpaceConfig) -> list[str]:
        names = ["stem"]
        for s in range(3):
            names += [f"cell{s}.{i}" for i in range(cfg.cells_per_stage)]
            if s < 2:
                names.append(f"reduce{s + 1}")
        return names + ["head"]

    def terms(self, cfg: SpaceConfig) -> tuple[Term, ...]:
        shapes = self.stage_shapes(cfg)
        out: list[Term] = [Term("stem", cfg.input_shape)]
        for s, shape in enumerate(shapes):
            out += [Term(f"s{s}.{D.NB201_OPS[op]}", shape) for op in COSTED_OPS]
            out += [
                Term(f"s{s}.relu", shape),
                Term(f"s{s}.relu_fused", shape, after_producer=True),
                Term(f"s{s}.add", shape, num_inputs=2, after_producer=True),
                Term(f"s{s}.add_unfused", shape, num_inputs=2),
                Term(f"s{s}.zero", shape, after_producer=True),
            ]
        out += [Term("reduce1", shapes[0]), Term("reduce2", shapes[1]), Term("head", shapes[2], after_producer=True)]
        return tuple(out)

    def structure(self, cfg: SpaceConfig) -> BlockStructure:
        if cfg.resolution % 4:
            raise NascError(f"resolution {cfg.resolution}: NB201 needs a multiple of 4 (two stride-2 reductions)")
        terms = self.terms(cfg)
        t_index = {t.name: i for i, t in enumerate(terms)}
        shapes = self.stage_shapes(cfg)
        act = [int(np.prod(s)) * D.FLOAT_BYTES for s in shapes]
        A = self.num_archs
        names = self.block_names(cfg)
        counts = np.zeros((A, len(names), len(terms)), dtype=np.uint8)
        peak = np.zeros((A, len(names)), dtype=np.float64)
        out_bytes = np.zeros(len(names), dtype=np.float64)

        input_bytes = int(np.prod(cfg.input_shape)) * D.FLOAT_BYTES
        class_bytes = cfg.num_classes * D.FLOAT_BYTES
        for b, name in enumerate(names):
            if name == "stem":
                counts[:, b, t_index["stem"]] = 1
                peak[:, b] = live_peak(STEM_NODES, {BLOCK_INPUT: input_bytes, "out": act[0]}.get)
                out_bytes[b] = act[0]
            elif name.startswith("reduce"):
                s = int(name[-1])
                counts[:, b, t_index[name]] = 1
                sizes = {BLOCK_INPUT: act[s - 1], "relu": act[s - 1], "pool": act[s - 1] // 4}
                peak[:, b] = live_peak(NB201_REDUCTION_NODES, lambda t, sizes=sizes, s=s: sizes.get(t, act[s]))
                out_bytes[b] = act[s]
            elif name == "head":
                counts[:, b, t_index["head"]] = 1
                sizes = {"mean": shapes[2][1] * D.FLOAT_BYTES, "logits": class_bytes}
                peak[:, b] = live_peak(NB201_HEAD_NODES, lambda t, sizes=sizes: sizes.get(t, act[2]))
                out_bytes[b] = class_bytes
            else:
                s = int(name[4])
                cols = [t_index[f"s{s}.{name}"] for name in CELL_TERMS]
                counts[:, b, cols] = self.cell_terms
                peak[:, b] = self.cell_peak_units * act[s]
                out_bytes[b] = act[s]
        return BlockStructure(tuple(names), terms, counts, out_bytes, input_bytes, peak)

    def term_module(self, cfg: SpaceConfig, term: Term):
        from nasc.search.nas import supernet

        return supernet.nb201_term_module(cfg, term.name)

    def build_supernet(self, cfg: SpaceConfig):
        from nasc.search.nas import supernet

        return supernet.NB201Supernet(self, cfg)


# --------------------------------------------------------------------------- MobileNetV2 / FBNet


def mbv2_choice_name(kernel: int, expansion: int) -> str:
    return f"k{kernel}e{expansion}"


MBV2_CONV_CHOICES = tuple(
    (k, e, mbv2_choice_name(k, e)) for k in D.MBV2_KERNELS for e in D.MBV2_EXPANSIONS
)


@dataclass(frozen=True)
class MBV2Block:
    """One searchable inverted-residual position: its shapes and the choices it offers."""

    name: str
    c_in: int
    c_out: int
    stride: int
    resolution_in: int
    choices: tuple[str, ...]

    @property
    def residual(self) -> bool:
        return self.stride == 1 and self.c_in == self.c_out

    @property
    def input_shape(self) -> tuple[int, int, int, int]:
        return (1, self.c_in, self.resolution_in, self.resolution_in)

    @property
    def resolution_out(self) -> int:
        return self.resolution_in // self.stride


def mbv2_block_nodes(residual: bool) -> list[Node]:
    """An inverted residual as exported (BN folded): 1x1 expand, ReLU, depthwise, ReLU, 1x1 project,
    then the shortcut Add (project output first) when the block keeps its shape."""
    nodes: list[Node] = [
        ("conv_expand", (BLOCK_INPUT,), "expand"),
        ("relu", ("expand",), "relu1"),
        ("conv_depthwise", ("relu1",), "dw"),
        ("relu", ("dw",), "relu2"),
        ("conv_project", ("relu2",), "project"),
    ]
    return nodes + [("add", ("project", BLOCK_INPUT), "out")] if residual else nodes


MBV2_STEM_NODES: list[Node] = [("conv", (BLOCK_INPUT,), "conv"), ("relu", ("conv",), "out")]
MBV2_HEAD_NODES: list[Node] = [
    ("conv_1x1", (BLOCK_INPUT,), "conv"),
    ("relu", ("conv",), "relu"),
    ("mean", ("relu",), "mean"),
    ("linear", ("mean",), "logits"),
]


class MBV2Space:
    """MobileNetV2/FBNet-style chain: stem, 3 stages of N searchable inverted residuals, head.

    Every block chooses its depthwise kernel and expansion independently (plus skip where the
    block keeps its shape), so the space grows with depth: N=2 gives 6 blocks and 10,000 archs.
    An arch is written as its choices joined by '-', first block first (e.g. k3e6-skip-...).
    """

    name = "mbv2"

    def __init__(self, blocks_per_stage: int = D.DEFAULT_CELLS_PER_STAGE):
        if blocks_per_stage < 1:
            raise NascError(f"mbv2: blocks per stage must be >= 1, got {blocks_per_stage}")
        self.blocks_per_stage = int(blocks_per_stage)
        self.radices = tuple(len(self._choices(s, i)) for s in range(D.MBV2_STAGES) for i in range(blocks_per_stage))
        self.num_archs = int(np.prod(self.radices))
        if self.num_archs > D.MAX_DENSE_ARCHS:
            raise NascError(
                f"mbv2 with {blocks_per_stage} blocks per stage has {self.num_archs:,} archs; the dense "
                f"latency table holds at most {D.MAX_DENSE_ARCHS:,} (use fewer blocks per stage)"
            )

    @staticmethod
    def _choices(stage: int, i: int) -> tuple[str, ...]:
        convs = tuple(c[2] for c in MBV2_CONV_CHOICES)
        reduces = stage > 0 and i == 0
        return convs if reduces else convs + (D.MBV2_SKIP,)

    @cached_property
    def choices(self) -> np.ndarray:
        """(A, blocks) choice index of every block of every arch (mixed radix, first block most significant)."""
        return np.stack(np.unravel_index(np.arange(self.num_archs), self.radices), axis=1).astype(np.int8)

    def blocks(self, cfg: SpaceConfig) -> list[MBV2Block]:
        out = []
        for s in range(D.MBV2_STAGES):
            for i in range(self.blocks_per_stage):
                first = i == 0 and s > 0
                out.append(MBV2Block(
                    name=f"mb{s}.{i}", c_in=cfg.channels * 2 ** (s - 1 if first else s), c_out=cfg.channels * 2**s,
                    stride=2 if first else 1, resolution_in=cfg.resolution // 2 ** (s - 1 if first else s),
                    choices=self._choices(s, i),
                ))
        return out

    def arch_choices(self, index: int) -> tuple[str, ...]:
        row = self.choices[self._check(index)]
        return tuple(self._choices(s, i)[int(row[s * self.blocks_per_stage + i])]
                     for s in range(D.MBV2_STAGES) for i in range(self.blocks_per_stage))

    def arch_str(self, index: int) -> str:
        return "-".join(self.arch_choices(index))

    def arch_index(self, arch: str) -> int:
        names = arch.strip().split("-")
        positions = [self._choices(s, i) for s in range(D.MBV2_STAGES) for i in range(self.blocks_per_stage)]
        if len(names) != len(positions) or any(n not in opts for n, opts in zip(names, positions)):
            raise NascError(
                f"{arch!r}: not an mbv2 arch string ({len(positions)} blocks joined by '-', each one of "
                f"{', '.join(positions[0])}; no {D.MBV2_SKIP} where a block changes shape)"
            )
        return int(np.ravel_multi_index([opts.index(n) for n, opts in zip(names, positions)], self.radices))

    def random_arch(self, rng: np.random.Generator) -> int:
        return int(rng.integers(self.num_archs))

    def mutate(self, index: int, rng: np.random.Generator) -> int:
        """One block changed to a different choice."""
        row = [int(v) for v in self.choices[self._check(index)]]
        b = int(rng.integers(len(row)))
        row[b] = int((row[b] + 1 + rng.integers(self.radices[b] - 1)) % self.radices[b])
        return int(np.ravel_multi_index(row, self.radices))

    def _check(self, index: int) -> int:
        if not 0 <= int(index) < self.num_archs:
            raise NascError(f"arch index {index} is outside the mbv2 space (0..{self.num_archs - 1})")
        return int(index)

    # -- structure ---------------------------------------------------------------------------
    def _check_cfg(self, cfg: SpaceConfig) -> None:
        if cfg.cells_per_stage != self.blocks_per_stage:
            raise NascError(
                f"mbv2 space built for {self.blocks_per_stage} blocks per stage, config has {cfg.cells_per_stage}"
            )
        if cfg.resolution % 4:
            raise NascError(f"resolution {cfg.resolution}: mbv2 needs a multiple of 4 (two stride-2 stages)")

    def block_names(self, cfg: SpaceConfig) -> list[str]:
        return ["stem"] + [b.name for b in self.blocks(cfg)] + ["head"]

    def terms(self, cfg: SpaceConfig) -> tuple[Term, ...]:
        blocks = self.blocks(cfg)
        out = [Term("stem", cfg.input_shape)]
        out += [Term(f"{b.name}.{c}", b.input_shape) for b in blocks for c in b.choices if c != D.MBV2_SKIP]
        last = blocks[-1]
        return tuple(out + [Term("head", (1, last.c_out, last.resolution_out, last.resolution_out))])

    def structure(self, cfg: SpaceConfig) -> BlockStructure:
        self._check_cfg(cfg)
        terms = self.terms(cfg)
        t_index = {t.name: i for i, t in enumerate(terms)}
        blocks = self.blocks(cfg)
        names = self.block_names(cfg)
        A = self.num_archs
        counts = np.zeros((A, len(names), len(terms)), dtype=np.uint8)
        peak = np.zeros((A, len(names)), dtype=np.float64)
        out_bytes = np.zeros(len(names), dtype=np.float64)
        fb = D.FLOAT_BYTES
        input_bytes = int(np.prod(cfg.input_shape)) * fb
        stem_bytes = cfg.channels * cfg.resolution**2 * fb
        counts[:, 0, t_index["stem"]] = 1
        peak[:, 0] = live_peak(MBV2_STEM_NODES, lambda t: input_bytes if t == BLOCK_INPUT else stem_bytes)
        out_bytes[0] = stem_bytes
        for j, blk in enumerate(blocks):
            b = j + 1
            r_in, r_out = blk.resolution_in, blk.resolution_out
            out_bytes[b] = blk.c_out * r_out**2 * fb
            for c, choice in enumerate(blk.choices):
                rows = self.choices[:, j] == c
                if choice == D.MBV2_SKIP:
                    continue  # exports to nothing: no kernels, no new tensors
                k, e, _ = next(x for x in MBV2_CONV_CHOICES if x[2] == choice)
                hidden = blk.c_in * e
                sizes = {BLOCK_INPUT: blk.c_in * r_in**2, "expand": hidden * r_in**2, "relu1": hidden * r_in**2,
                         "dw": hidden * r_out**2, "relu2": hidden * r_out**2}
                out = blk.c_out * r_out**2
                counts[rows, b, t_index[f"{blk.name}.{choice}"]] = 1
                peak[rows, b] = live_peak(mbv2_block_nodes(blk.residual), lambda t, s=sizes, o=out: s.get(t, o) * fb)
        last = blocks[-1]
        wide = last.c_out * D.MBV2_HEAD_EXPANSION
        sizes = {BLOCK_INPUT: last.c_out * last.resolution_out**2, "mean": wide, "logits": cfg.num_classes}
        counts[:, -1, t_index["head"]] = 1
        peak[:, -1] = live_peak(MBV2_HEAD_NODES, lambda t: sizes.get(t, wide * last.resolution_out**2) * fb)
        out_bytes[-1] = cfg.num_classes * fb
        return BlockStructure(tuple(names), terms, counts, out_bytes, input_bytes, peak)

    def term_module(self, cfg: SpaceConfig, term: Term):
        from nasc.search.nas import supernet

        return supernet.mbv2_term_module(self, cfg, term.name)

    def build_supernet(self, cfg: SpaceConfig):
        from nasc.search.nas import supernet

        self._check_cfg(cfg)
        return supernet.MBV2Supernet(self, cfg)


# name -> factory from the macro skeleton (a space whose size depends on depth reads it here).
SPACES: dict[str, Callable[[SpaceConfig], SearchSpace]] = {
    "nb201": lambda cfg: NB201Space(),
    "mbv2": lambda cfg: MBV2Space(cfg.cells_per_stage),
}


def get_space(name: str, cfg: SpaceConfig | None = None) -> SearchSpace:
    """The registered space called `name` for the skeleton `cfg` (NascError listing the known ones otherwise)."""
    try:
        factory = SPACES[name]
    except KeyError:
        raise NascError(f"unknown search space {name!r}; known: {', '.join(sorted(SPACES))}") from None
    return factory(cfg or SpaceConfig())
