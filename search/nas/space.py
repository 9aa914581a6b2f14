"""Search spaces: what an architecture is, how it is indexed and which blocks it is made of.

A space turns an architecture index into a chain of blocks whose costs are sums of a few probed
*terms*; the latency table, the supernet and the search only speak to the `SearchSpace` protocol.
"""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass
from functools import cached_property
from typing import Protocol

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
    peak_act_bytes: np.ndarray  # (A, B) working-set estimate of each block

    @property
    def num_blocks(self) -> int:
        return len(self.block_names)

    @property
    def cut_names(self) -> tuple[str, ...]:
        """K = B + 1 split points: server-only, after each block but the last, device-only."""
        return ("server-only",) + tuple(f"after {n}" for n in self.block_names[:-1]) + ("device-only",)


class SearchSpace(Protocol):
    """What the search needs from a space; a new space implements these and nothing else."""

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


def nb201_cell_terms(ops, live) -> dict[str, int]:
    """How often each kernel term runs in one cell of the exported graph.

    Mirrors what the exporter emits: a conv edge is ReLU -> Conv (BN folded); identical nodes
    on the same tensor are merged (one ReLU and one AvgPool per source, whatever the number of
    edges); a node fed by one edge is that edge's tensor. A ReLU, or a node's first Add, is fused
    into its input's producer when it is that tensor's only reader (nasc's analysis rule).
    """
    counts = dict.fromkeys(CELL_TERMS, 0)
    value = {0: "x"}  # node -> id of the tensor holding it
    readers: dict[str, set[str]] = {}
    firsts: list[str] = []  # first input of every node's first Add
    relus: list[str] = []
    for j in (1, 2, 3):
        ins = []
        for e in np.flatnonzero((EDGE_DST == j) & np.asarray(live, dtype=bool)):
            src, op = value.get(int(EDGE_SRC[e])), ops[e]
            if op in (CONV1, CONV3):
                counts[D.NB201_OPS[op]] += 1
                if f"r{src}" not in readers:
                    relus.append(src)
                readers.setdefault(src, set()).add(f"r{src}")
                readers.setdefault(f"r{src}", set())
                ins.append(f"c{e}")
            elif op == POOL:
                readers.setdefault(src, set()).add(f"p{src}")
                readers.setdefault(f"p{src}", set())
                ins.append(f"p{src}")
            else:
                ins.append(src)
        if not ins:
            continue
        acc = ins[0]
        if len(ins) >= 2:
            firsts.append(acc)
        for k, v in enumerate(ins[1:]):
            add = f"a{j}.{k}"
            readers.setdefault(acc, set()).add(add)
            readers.setdefault(v, set()).add(add)
            acc = add
        counts["add"] += max(len(ins) - 2, 0)
        value[j] = acc
    counts["avg_pool_3x3"] = sum(1 for v in readers if v.startswith("p"))
    for src in relus:
        counts["relu_fused" if len(readers[src]) == 1 else "relu"] += 1
    for v in firsts:
        counts["add" if len(readers.get(v, ())) == 1 else "add_unfused"] += 1
    counts["zero"] = int(3 not in value)
    return counts


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

        live = self.live
        into3 = live[:, 3:6].sum(1)
        into2 = live[:, 1:3].sum(1)
        inner_nodes = live[:, 0].astype(int) + (into2 > 0)
        # A cell holds its input, the live inner nodes, one op output and the accumulator.
        cell_peak_units = np.where(into3 > 0, 3 + inner_nodes, 2)
        input_bytes = int(np.prod(cfg.input_shape)) * D.FLOAT_BYTES
        class_bytes = cfg.num_classes * D.FLOAT_BYTES
        for b, name in enumerate(names):
            if name == "stem":
                counts[:, b, t_index["stem"]] = 1
                peak[:, b] = input_bytes + act[0]
                out_bytes[b] = act[0]
            elif name.startswith("reduce"):
                s = int(name[-1])
                counts[:, b, t_index[name]] = 1
                peak[:, b] = act[s - 1] + 2 * act[s]
                out_bytes[b] = act[s]
            elif name == "head":
                counts[:, b, t_index["head"]] = 1
                peak[:, b] = act[2] + class_bytes
                out_bytes[b] = class_bytes
            else:
                s = int(name[4])
                cols = [t_index[f"s{s}.{name}"] for name in CELL_TERMS]
                counts[:, b, cols] = self.cell_terms
                peak[:, b] = cell_peak_units * act[s]
                out_bytes[b] = act[s]
        return BlockStructure(tuple(names), terms, counts, out_bytes, input_bytes, peak)

    def term_module(self, cfg: SpaceConfig, term: Term):
        from nasc.search.nas import supernet

        return supernet.nb201_term_module(cfg, term.name)

    def build_supernet(self, cfg: SpaceConfig):
        from nasc.search.nas import supernet

        return supernet.NB201Supernet(self, cfg)


SPACES: dict[str, type] = {"nb201": NB201Space}


def get_space(name: str) -> SearchSpace:
    """The registered space called `name` (NascError listing the known ones otherwise)."""
    try:
        return SPACES[name]()
    except KeyError:
        raise NascError(f"unknown search space {name!r}; known: {', '.join(sorted(SPACES))}") from None
