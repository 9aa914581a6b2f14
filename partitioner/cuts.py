"""Enumerate the cuts of a model's DAG and measure each one.

A cut is a set of head nodes closed under predecessors (an ideal of the DAG); the tensors
it sends are the activations produced on the head side (or graph inputs) that a tail node
reads. Enumerating every ideal is exponential, so nasc takes three linear families whose
union covers the cuts worth shipping, in O(N * (N + E)) with bitsets:

  1. every prefix of the execution order (the order the compiled head runs, so memory and
     latency of these cuts are exactly what the device will see);
  2. for every node v, the smallest ideal holding v: ancestors(v) + v. It finishes one branch
     and nothing else, e.g. one Inception branch, the shortcut path of a residual block;
  3. for every node v, the largest ideal without v: all nodes that are not v's descendants.
     It runs everything that does not wait on v, e.g. all branches but one.

Every ideal is a union of family-2 ideals, and for series-parallel nets (residual, Inception,
DenseNet blocks) the minimal antichains at block boundaries appear in families 1-3. Cuts
that send the same tensors are deduplicated, keeping the smaller head.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from nasc.errors import CutError
from nasc.partitioner.analysis import Analysis
from nasc.partitioner.load import node_inputs

SERVER_ONLY = "server-only"
DEVICE_ONLY = "device-only"
SPLIT = "split"

# int8 payload overhead per compressed tensor: one float32 scale + one uint8 zero point
# (per-channel cuts send one pair per channel).
_QPARAM_BYTES = 5


@dataclass(frozen=True)
class Cut:
    """One way to split the model, with what it costs the device and the link."""

    index: int
    kind: str                                  # server-only | split | device-only
    tensors: tuple[str, ...]                   # sent device -> server, in execution order
    payload_bytes: int
    payload_bytes_int8: int
    head_macs: int
    tail_macs: int
    head_flops: int
    tail_flops: int
    head_param_bytes: int
    tail_param_bytes: int
    device_peak_memory_bytes: int
    head_mask: np.ndarray = field(repr=False, compare=False, hash=False)
    node_names: tuple[str, ...] = field(repr=False, compare=False, hash=False, default=())

    @property
    def head_nodes(self) -> frozenset[str]:
        """Names of the nodes that run on the device."""
        return frozenset(n for n, h in zip(self.node_names, self.head_mask) if h)

    @property
    def label(self) -> str:
        if self.kind != SPLIT:
            return self.kind
        shown = ", ".join(self.tensors[:3])
        return shown + (f" (+{len(self.tensors) - 3})" if len(self.tensors) > 3 else "")

    def to_json(self) -> dict:
        return {
            "index": self.index,
            "kind": self.kind,
            "tensors": list(self.tensors),
            "payload_bytes": self.payload_bytes,
            "payload_bytes_int8": self.payload_bytes_int8,
            "head_macs": self.head_macs,
            "tail_macs": self.tail_macs,
            "head_flops": self.head_flops,
            "tail_flops": self.tail_flops,
            "head_param_bytes": self.head_param_bytes,
            "tail_param_bytes": self.tail_param_bytes,
            "device_peak_memory_bytes": self.device_peak_memory_bytes,
            "head_nodes": int(self.head_mask.sum()),
        }


class _Tensors:
    """Activation tensors as arrays: producer position (-1 = graph input), consumer edges, sizes."""

    def __init__(self, a: Analysis):
        names = list(a.inputs) + [o for n in a.nodes for o in n.output if o in a.specs]
        self.names = list(dict.fromkeys(names))
        self.index = {n: i for i, n in enumerate(self.names)}
        self.prod = np.array([a.producer.get(n, -1) for n in self.names], np.int64)
        self.size = np.array([a.specs[n].nbytes for n in self.names], np.int64)
        self.is_output = np.array([n in set(a.outputs) for n in self.names], bool)
        self.is_float = np.array([a.specs[n].dtype in ("float32", "float16", "float64", "bfloat16") for n in self.names], bool)
        self.numel = np.array([int(np.prod(a.specs[n].shape, dtype=np.int64)) for n in self.names], np.int64)
        e_t, e_c = [], []
        for n in self.names:
            for c in a.consumers.get(n, []):
                e_t.append(self.index[n])
                e_c.append(c)
        self.edge_t = np.array(e_t, np.int64)
        self.edge_c = np.array(e_c, np.int64)


def quant_axis(shape: tuple[int, ...]) -> int | None:
    """Per-channel quantization axis for a cut tensor of this shape (None: per-tensor only)."""
    if len(shape) in (2, 4):
        return 1
    if len(shape) == 3:
        return 2
    return None


def _ideals(a: Analysis) -> list[int]:
    """Candidate head sets as Python-int bitsets over node positions (see module docstring)."""
    N = len(a.nodes)
    # node_inputs includes implicit subgraph captures of control-flow nodes
    preds = [sorted({a.producer[x] for x in node_inputs(n) if x in a.producer}) for n in a.nodes]
    anc = [0] * N
    for i in range(N):
        m = 1 << i
        for p in preds[i]:
            m |= anc[p]
        anc[i] = m
    succs: list[list[int]] = [[] for _ in range(N)]
    for i, ps in enumerate(preds):
        for p in ps:
            succs[p].append(i)
    desc = [0] * N
    for i in range(N - 1, -1, -1):
        m = 1 << i
        for s in succs[i]:
            m |= desc[s]
        desc[i] = m
    full = (1 << N) - 1
    ideals = [(1 << k) - 1 for k in range(N + 1)]
    ideals += anc
    ideals += [full & ~d for d in desc]
    return ideals


def _masks(ideals: list[int], N: int) -> np.ndarray:
    """Bitsets -> (K, N) bool matrix."""
    width = (N + 7) // 8 or 1
    raw = np.frombuffer(b"".join(b.to_bytes(width, "little") for b in ideals), np.uint8).reshape(len(ideals), width)
    return np.unpackbits(raw, axis=1, bitorder="little")[:, :N].astype(bool)


class _Edges:
    """Consumer edges of activation tensors and of initializers, sorted for segment reductions."""

    def __init__(self, a: Analysis, T: _Tensors):
        order = np.argsort(T.edge_t, kind="stable")
        self.t = T.edge_t[order]
        self.c = T.edge_c[order]
        self.tensors, self.starts = np.unique(self.t, return_index=True)
        inits = sorted(a.initializer_bytes)
        index = {w: i for i, w in enumerate(inits)}
        pairs = sorted((index[w], i) for i, ws in enumerate(a.node_inits) for w in ws)
        self.w = np.array([p[0] for p in pairs], np.int64)
        self.wc = np.array([p[1] for p in pairs], np.int64)
        self.weights, self.wstarts = np.unique(self.w, return_index=True)
        self.wbytes = np.array([a.initializer_bytes[w] for w in inits], np.int64)
        self.device_wbytes = np.array([a.device_weight_bytes[w] for w in inits], np.int64)


def _crossing(T: _Tensors, E: _Edges, M: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(made on the device side, sent) per cut x tensor, for head masks M (K x N)."""
    K = len(M)
    in_head = np.ones((K, len(T.names)), bool)
    made = T.prod >= 0
    in_head[:, made] = M[:, T.prod[made]]
    needed = np.zeros_like(in_head)
    if len(E.c):
        needed[:, E.tensors] = np.logical_or.reduceat(~M[:, E.c], E.starts, axis=1)
    return in_head, in_head & needed


def _measure(a: Analysis, T: _Tensors, E: _Edges, M: np.ndarray) -> dict[str, np.ndarray]:
    """Payloads, weights and device peak memory of every head mask in M (K x N)."""
    K, N = M.shape
    in_head, cross = _crossing(T, E, M)
    qbytes = np.where(T.is_float, T.numel + _QPARAM_BYTES, T.size)
    # Live intervals over head execution positions. A tensor lives from its producer (graph
    # inputs: from the start) to its last head consumer; cut tensors and head-side graph
    # outputs live until the head finishes, when they are sent or returned.
    end = np.full((K, len(T.names)), -1, np.int64)
    if len(E.c):
        end[:, E.tensors] = np.maximum.reduceat(np.where(M[:, E.c], E.c, -1), E.starts, axis=1)
    end[cross | (T.is_output & in_head)] = N
    start = np.broadcast_to(np.maximum(T.prod, 0), end.shape)
    rows, cols = np.nonzero(in_head & (end >= 0))
    first = start[rows, cols]
    diff = np.zeros((K, N + 2), np.int64)
    np.add.at(diff, (rows, first), T.size[cols])
    np.add.at(diff, (rows, np.maximum(end[rows, cols], first) + 1), -T.size[cols])
    peak_act = np.cumsum(diff, axis=1).max(axis=1)
    head_w = np.zeros((K, len(E.wbytes)), bool)
    tail_w = np.zeros_like(head_w)
    if len(E.wc):
        head_w[:, E.weights] = np.logical_or.reduceat(M[:, E.wc], E.wstarts, axis=1)
        tail_w[:, E.weights] = np.logical_or.reduceat(~M[:, E.wc], E.wstarts, axis=1)
    head_params = head_w.astype(np.int64) @ E.wbytes
    sent = cross.astype(np.int64)
    Mi = M.astype(np.int64)
    return {
        "head_macs": Mi @ a.macs,
        "tail_macs": (1 - Mi) @ a.macs,
        "head_flops": Mi @ a.flops,
        "tail_flops": (1 - Mi) @ a.flops,
        "cross": cross,
        "payload": sent @ T.size,
        "payload8": sent @ qbytes,
        "head_params": head_params,
        "tail_params": tail_w.astype(np.int64) @ E.wbytes,
        # server-only: the device only holds the raw input it sends; otherwise its weights as
        # compiled (Winograd convs' transformed) and its live activations
        "peak": np.where(M.any(axis=1), head_w.astype(np.int64) @ E.device_wbytes + peak_act, sent @ T.size),
    }


# Candidates are measured this many at a time: (chunk x tensors) matrices stay small.
_CHUNK = 256


def _cut(index: int, kind: str, names: tuple[str, ...], T: _Tensors, H: np.ndarray, m: dict, j: int) -> Cut:
    device_only = kind == DEVICE_ONLY
    payload = 0 if device_only else int(m["payload"][j])
    return Cut(
        index=index,
        kind=kind,
        tensors=() if device_only else tuple(T.names[i] for i in np.flatnonzero(m["cross"][j])),
        payload_bytes=payload,
        payload_bytes_int8=int(m["payload8"][j]) if kind == SPLIT else payload,
        head_macs=int(m["head_macs"][j]),
        tail_macs=int(m["tail_macs"][j]),
        head_flops=int(m["head_flops"][j]),
        tail_flops=int(m["tail_flops"][j]),
        head_param_bytes=int(m["head_params"][j]),
        tail_param_bytes=int(m["tail_params"][j]),
        device_peak_memory_bytes=int(m["peak"][j]),
        head_mask=H,
        node_names=names,
    )


def _kind(size: int, N: int) -> str:
    return SERVER_ONLY if size == 0 else DEVICE_ONLY if size == N else SPLIT


def enumerate_cuts(a: Analysis) -> list[Cut]:
    """All candidate cuts, deduplicated by the tensors they send, ordered by head size.

    Index 0 is server-only (the raw input is sent); the last index is device-only. Candidates
    are scored as matrices in chunks, so graphs of thousands of nodes take seconds.
    """
    N = len(a.nodes)
    T = _Tensors(a)
    E = _Edges(a, T)
    ideals = list(dict.fromkeys(_ideals(a)))
    best: dict[tuple, tuple[int, int]] = {}  # (kind, sent tensors) -> (head size, ideal)
    for lo in range(0, len(ideals), _CHUNK):
        M = _masks(ideals[lo:lo + _CHUNK], N)
        _, cross = _crossing(T, E, M)
        sizes = M.sum(axis=1)
        packed = np.packbits(cross, axis=1)
        for j, size in enumerate(sizes.tolist()):
            key = (_kind(size, N), packed[j].tobytes())
            if key not in best or size < best[key][0]:
                best[key] = (size, lo + j)
    # stable order: head size, then the sent tensors' positions
    keyed = sorted(best.items(), key=lambda kv: (kv[1][0], np.flatnonzero(np.unpackbits(np.frombuffer(kv[0][1], np.uint8))).tolist()))
    picked = [ideals[i] for _, (_, i) in keyed]
    names = tuple(a.node_names)
    cuts: list[Cut] = []
    for lo in range(0, len(picked), _CHUNK):
        M = _masks(picked[lo:lo + _CHUNK], N)
        m = _measure(a, T, E, M)
        for j, H in enumerate(M):
            cuts.append(_cut(len(cuts), _kind(int(H.sum()), N), names, T, H, m, j))
    return cuts


def cut_from_tensors(a: Analysis, cuts: list[Cut], names: list[str]) -> Cut:
    """The cut that sends exactly `names` (any order). CutError for unknown names or non-cuts.

    A set of tensors that none of the enumerated cuts sends is checked directly: the head is
    every node that must run to produce the tensors; it is a cut only if the tail then needs
    nothing else from the device.
    """
    unknown = [n for n in names if n not in a.specs]
    if unknown:
        near = [t for t in a.specs if unknown[0].lower() in t.lower()][:5]
        hint = f" (similar: {', '.join(near)})" if near else ""
        raise CutError(f"--split: '{unknown[0]}' is not an activation tensor of the model{hint}")
    want = set(names)
    for c in cuts:
        if c.kind == SPLIT and set(c.tensors) == want:
            return c
    # Not enumerated: build the smallest head producing these tensors and check it.
    N = len(a.nodes)
    H = np.zeros(N, bool)
    stack = [a.producer[n] for n in names if n in a.producer]
    while stack:
        i = stack.pop()
        if H[i]:
            continue
        H[i] = True
        stack.extend(a.producer[x] for x in node_inputs(a.nodes[i]) if x in a.producer)
    T = _Tensors(a)
    m = _measure(a, T, _Edges(a, T), H[None])
    sent = {T.names[i] for i in np.flatnonzero(m["cross"][0])}
    if sent != want or not H.any() or H.all():
        extra = sorted(sent - want)
        why = f"the tail would also need {', '.join(extra[:4])}" if extra else "they do not separate the graph"
        raise CutError(f"--split {','.join(names)}: not a cut: {why}")
    return _cut(len(cuts), SPLIT, tuple(a.node_names), T, H, m, 0)


def half_masks(cuts: list[Cut]) -> np.ndarray:
    """(H, nodes) bool: the head and the tail of every cut that has nodes on that side, in cut order."""
    rows = [m for c in cuts for m in (c.head_mask, ~c.head_mask) if m.any()]
    return np.array(rows, bool) if rows else np.zeros((0, 0), bool)
