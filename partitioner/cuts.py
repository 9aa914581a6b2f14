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
    head_nodes: frozenset[str]
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
            "head_nodes": len(self.head_nodes),
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
        self.channels = np.array([_channels(a.specs[n].shape) for n in self.names], np.int64)
        self.numel = np.array([int(np.prod(a.specs[n].shape, dtype=np.int64)) for n in self.names], np.int64)
        e_t, e_c = [], []
        for n in self.names:
            for c in a.consumers.get(n, []):
                e_t.append(self.index[n])
                e_c.append(c)
        self.edge_t = np.array(e_t, np.int64)
        self.edge_c = np.array(e_c, np.int64)


def _channels(shape: tuple[int, ...]) -> int:
    """The axis int8 per-channel quantization uses: NCHW channels, or the feature axis of tokens."""
    if len(shape) == 4 or len(shape) == 2:
        return shape[1]
    if len(shape) == 3:
        return shape[-1]
    return 1


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


def _mask(bits: int, N: int) -> np.ndarray:
    raw = np.frombuffer(bits.to_bytes((N + 7) // 8 or 1, "little"), np.uint8)
    return np.unpackbits(raw, bitorder="little")[:N].astype(bool)


def _measure(a: Analysis, T: _Tensors, H: np.ndarray) -> tuple:
    """Crossing tensors, payloads and device peak memory of head mask H."""
    N = len(a.nodes)
    in_head_t = np.where(T.prod < 0, True, H[np.clip(T.prod, 0, max(N - 1, 0))] if N else True)
    tail_edge = ~H[T.edge_c]
    needed_by_tail = np.zeros(len(T.names), bool)
    needed_by_tail[T.edge_t[tail_edge]] = True
    crossing = in_head_t & needed_by_tail
    payload = int(T.size[crossing].sum())
    qbytes = np.where(T.is_float, T.numel + _QPARAM_BYTES, T.size)
    payload8 = int(qbytes[crossing].sum())
    if not H.any():
        return crossing, payload, payload8, payload
    # Live intervals over head execution positions; crossing tensors and head-side graph
    # outputs stay alive until the head finishes (they are sent or returned then).
    end = np.full(len(T.names), -1, np.int64)
    head_edge = ~tail_edge
    np.maximum.at(end, T.edge_t[head_edge], T.edge_c[head_edge])
    keep = crossing | (T.is_output & in_head_t)
    end[keep] = N
    start = np.maximum(T.prod, 0)
    live = in_head_t & (end >= 0)
    end = np.maximum(end, start)
    diff = np.zeros(N + 2, np.int64)
    np.add.at(diff, start[live], T.size[live])
    np.add.at(diff, end[live] + 1, -T.size[live])
    peak_act = int(np.cumsum(diff).max())
    return crossing, payload, payload8, peak_act


def _param_bytes(a: Analysis, H: np.ndarray) -> tuple[int, int]:
    head, tail = set(), set()
    for i, ws in enumerate(a.node_inits):
        (head if H[i] else tail).update(ws)
    return sum(a.initializer_bytes[w] for w in head), sum(a.initializer_bytes[w] for w in tail)


def enumerate_cuts(a: Analysis) -> list[Cut]:
    """All candidate cuts, deduplicated by the tensors they send, ordered by head size.

    Index 0 is server-only (the raw input is sent); the last index is device-only.
    """
    N = len(a.nodes)
    T = _Tensors(a)
    by_tensors: dict[tuple, tuple[int, np.ndarray, tuple]] = {}
    for bits in dict.fromkeys(_ideals(a)):
        H = _mask(bits, N)
        crossing, payload, payload8, peak_act = _measure(a, T, H)
        size = int(H.sum())
        kind = SERVER_ONLY if size == 0 else DEVICE_ONLY if size == N else SPLIT
        key = (kind, tuple(np.flatnonzero(crossing)))
        if key not in by_tensors or size < by_tensors[key][0]:
            by_tensors[key] = (size, H, (crossing, payload, payload8, peak_act))
    ordered = sorted(by_tensors.items(), key=lambda kv: (kv[1][0], kv[0][1]))
    cuts = []
    for index, ((kind, _), (size, H, (crossing, payload, payload8, peak_act))) in enumerate(ordered):
        hp, tp = _param_bytes(a, H)
        tensors = tuple(T.names[i] for i in np.flatnonzero(crossing))
        if kind == DEVICE_ONLY:
            payload = payload8 = 0
        cuts.append(
            Cut(
                index=index,
                kind=kind,
                tensors=tensors if kind != DEVICE_ONLY else (),
                head_nodes=frozenset(a.nodes[i].name for i in np.flatnonzero(H)),
                payload_bytes=payload,
                payload_bytes_int8=payload8 if kind == SPLIT else payload,
                head_macs=int(a.macs[H].sum()),
                tail_macs=int(a.macs[~H].sum()),
                head_flops=int(a.flops[H].sum()),
                tail_flops=int(a.flops[~H].sum()),
                head_param_bytes=hp,
                tail_param_bytes=tp,
                device_peak_memory_bytes=hp + peak_act,
                head_mask=H,
            )
        )
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
    crossing, payload, payload8, peak_act = _measure(a, T, H)
    sent = {T.names[i] for i in np.flatnonzero(crossing)}
    if sent != want or not H.any() or H.all():
        extra = sorted(sent - want)
        why = f"the tail would also need {', '.join(extra[:4])}" if extra else "they do not separate the graph"
        raise CutError(f"--split {','.join(names)}: not a cut: {why}")
    hp, tp = _param_bytes(a, H)
    return Cut(
        index=len(cuts), kind=SPLIT, tensors=tuple(T.names[i] for i in np.flatnonzero(crossing)),
        head_nodes=frozenset(a.nodes[i].name for i in np.flatnonzero(H)), payload_bytes=payload,
        payload_bytes_int8=payload8, head_macs=int(a.macs[H].sum()), tail_macs=int(a.macs[~H].sum()),
        head_flops=int(a.flops[H].sum()), tail_flops=int(a.flops[~H].sum()), head_param_bytes=hp,
        tail_param_bytes=tp, device_peak_memory_bytes=hp + peak_act, head_mask=H,
    )
