"""Latency models: predict device (head) and server (tail) time for every cut at once.

`AnalyticLatencyModel` is a roofline over the hardware profile (labelled `analytic` wherever
it is reported): a half is the sum of its nodes. `MeasuredLatencyModel` prices a half from a
kernel profile of the target: from the model's own kernels timed in place when the profile
has them (measured mode), otherwise from a planned record of predicted kernels and the layout
transforms the CPU pipeline will insert (predicted mode). Both are composed by `ContextTimes`,
which also prices a fused kernel that a cut breaks as the two kernels each half then runs.
"""

from __future__ import annotations

import json
from functools import lru_cache
from typing import Protocol

import numpy as np

from nasc.partitioner.analysis import Analysis
from nasc.partitioner.cuts import DEVICE_ONLY, SERVER_ONLY, Cut
from nasc.types import HardwareProfile, Link, Prediction

DEVICE = "device"
SERVER = "server"


class LatencyModel(Protocol):
    """Anything that predicts per-node milliseconds for one side of the link."""

    source: str

    def node_ms(self, a: Analysis, side: str) -> np.ndarray: ...


class AnalyticLatencyModel:
    """Roofline per node: max(compute, memory) + per-kernel overhead.

    Nodes that only reshape metadata cost nothing; elementwise nodes a compiler fuses into
    their producer's kernel pay neither overhead nor a round trip of their main input.
    """

    def __init__(self, device: HardwareProfile, server: HardwareProfile):
        self.profiles = {DEVICE: device, SERVER: server}
        self.source = f"analytic ({device.source}: {device.name}; {server.source}: {server.name})"

    def node_ms(self, a: Analysis, side: str) -> np.ndarray:
        p = self.profiles[side]
        compute = a.flops / (p.peak_gflops * 1e6)
        moved = a.bytes_moved.astype(np.float64)
        first_in = np.array([_first_input_bytes(a, n) for n in a.nodes], np.float64)
        moved = np.where(a.fused, np.maximum(moved - 2 * first_in, 0.0), moved)
        memory = moved / (p.mem_bandwidth_gbs * 1e6)
        overhead = np.where(a.fused, 0.0, p.kernel_overhead_us / 1e3)
        return np.where(a.shape_only, 0.0, np.maximum(compute, memory) + overhead)


def _first_input_bytes(a: Analysis, node) -> int:
    return a.specs[node.input[0]].nbytes if node.input and node.input[0] in a.specs else 0


def half_ms(model: LatencyModel, a: Analysis, masks: np.ndarray, side: str) -> np.ndarray:
    """(C,) predicted milliseconds of the nodes each row of `masks` (C, N) puts on `side`."""
    if hasattr(model, "half_ms"):
        return model.half_ms(a, masks, side)
    return masks.astype(np.float64) @ model.node_ms(a, side)


def predict(a: Analysis, cuts: list[Cut], model: LatencyModel, link: Link, compress: bool = False) -> list[Prediction]:
    """Predicted latency of every cut: device(head) + transfer(payload) + server(tail).

    Device-only sends nothing; server-only sends the raw input uncompressed.
    """
    if not cuts:
        return []
    masks = np.stack([c.head_mask for c in cuts]).astype(bool)
    call = getattr(model, "call_ms", lambda side: 0.0)
    dev = half_ms(model, a, masks, DEVICE) + np.where(masks.any(axis=1), call(DEVICE), 0.0)
    srv = half_ms(model, a, ~masks, SERVER) + np.where(masks.all(axis=1), 0.0, call(SERVER))
    payload = np.array([c.payload_bytes_int8 if compress else c.payload_bytes for c in cuts], np.float64)
    transfer = np.asarray(link.transfer_ms(payload), np.float64)
    preds = []
    for i, c in enumerate(cuts):
        t = 0.0 if c.kind == DEVICE_ONLY else float(transfer[i])
        if c.kind == SERVER_ONLY:
            t = float(link.transfer_ms(c.payload_bytes))
        preds.append(Prediction(float(dev[i]), t, float(srv[i])))
    return preds


MEASURED, PREDICTED, ANALYTIC = "measured", "predicted", "analytic"
MEASURED_IN_CONTEXT = "measured in context"
# A half replayed alone finds in cache what the whole model evicted; one that reads slower than in
# place is the replay's own noise (the fastest of fewer runs, microsecond kernels on a shared host).
# Capped at 1, on the Zen 5 runs' records: measured mode 75% -> 78% within ±10% (MAPE 7.6 -> 6.5%),
# and on the run before's 81% -> 82% (6.5 -> 6.3%); ShuffleNetV2's 0.01-0.04 ms tails had read
# 1.3-1.6x slow.
MAX_REPLAY_RATIO = 1.0


def _channel_block(target: dict) -> int | None:
    """The NCHW{c}c block the CPU pipeline of a profile's target uses (None: no blocked layouts)."""
    spec = _vector_spec(target)
    return spec.channel_block if spec is not None else None


def _vector_spec(target: dict):
    """The SIMD shape of a profile's CPU target (backends.profile.vector_spec; None off a CPU)."""
    spec = (target or {}).get("tvm")
    if not spec or spec.get("kind") != "llvm":
        return None
    return _llvm_vector_spec(json.dumps(spec, sort_keys=True))


@lru_cache(maxsize=None)
def _llvm_vector_spec(spec_json: str):
    from nasc.backends.profile import vector_spec
    from nasc.backends.targets import resolve_target

    return vector_spec(resolve_target(json.loads(spec_json)))


def _part_signature(a: Analysis, nodes: tuple[int, ...]) -> str:
    from nasc.backends.profile import part_signature

    return part_signature(a, nodes)


class MeasuredLatencyModel:
    """Kernel times from a measured profile of the target (see backends.profile).

    Each fused kernel costs its measured time when the profile has its signature, the
    profile's fitted predictor otherwise, and the analytic roofline when the profile has no
    predictor; a side without a profile is analytic. A cut through a fused kernel leaves a
    kernel on each side: each part is priced on its own, the part keeping the anchor as the
    whole measured kernel when the part itself was not measured. `source` says how each side was priced.
    """

    def __init__(self, fallback: AnalyticLatencyModel, device=None, server=None):
        from nasc.backends.profile import KernelProfile

        def as_profile(p):
            if p is None or isinstance(p, KernelProfile):
                return p
            return KernelProfile({}, dict(p), {}, None)  # a bare {signature: ms} dict

        self.fallback = fallback
        self.profiles = {DEVICE: as_profile(device), SERVER: as_profile(server)}
        self.coverage: dict[str, dict[str, int]] = {}
        self._seen: tuple[Analysis, dict] | None = None   # what was derived from the last analysis priced

    @property
    def source(self) -> str:
        parts = []
        for side in (DEVICE, SERVER):
            prof = self.profiles[side]
            if prof is None:
                parts.append(f"{side} analytic")
                continue
            cov = self.coverage.get(side, {})
            n = sum(cov.values())
            how = PREDICTED if prof.predictor is not None and not (cov.get(MEASURED) or cov.get(MEASURED_IN_CONTEXT)) else MEASURED
            detail = ", ".join(f"{v} {k}" for k, v in cov.items() if v) or "no kernels priced yet"
            parts.append(f"{side} {how} ({detail} of {n} kernels)" if n else f"{side} {how}")
        return "; ".join(parts)

    def call_ms(self, side: str) -> float:
        """Fixed cost of running a half once (VM call, allocation), measured with the kernels."""
        prof = self.profiles[side]
        return prof.call_ms if prof is not None else 0.0

    def _parts_ms(self, a: Analysis, side: str, parts: list[tuple[int, ...]],
                  signatures: list[str]) -> tuple[np.ndarray, list[str]]:
        """Milliseconds of each run of nodes as one kernel (with its signature), and how each was priced."""
        from nasc.search.predictor import group_features

        prof = self.profiles[side]
        ms = np.zeros(len(parts))
        how = [ANALYTIC] * len(parts)
        for k, sig in enumerate(signatures):
            if sig in prof.kernels:
                ms[k], how[k] = prof.kernels[sig], MEASURED
            elif (whole := self._anchor_kernel_ms(a, prof, parts[k])) is not None:
                ms[k], how[k] = whole, MEASURED
            elif prof.predictor is not None:
                how[k] = PREDICTED
        unknown = [k for k, h in enumerate(how) if h == PREDICTED]
        if unknown:
            run = self._conv_runs(a, prof)
            spec = _vector_spec(prof.target)
            ms[unknown] = prof.predictor.predict_ms([group_features(a, parts[k], run, spec) for k in unknown])
        rest = [k for k, h in enumerate(how) if h == ANALYTIC]
        if rest:
            base = self.fallback.node_ms(a, side)
            ms[rest] = [base[list(parts[k])].sum() for k in rest]
        return ms, how

    def _anchor_kernel_ms(self, a: Analysis, prof, part: tuple[int, ...]) -> float | None:
        """A cut part that keeps its kernel's anchor costs the whole measured kernel (the epilogue
        it drops is elementwise, fused for free); None if the part lacks the anchor or the kernel
        was not measured."""
        g = self._derived(a)["group_of"].get(part[0])
        return prof.kernels.get(g.signature) if g is not None and part[0] == g.anchor() else None

    def _conv_runs(self, a: Analysis, prof) -> dict:
        """How the profile's target runs `a`'s convs (backends.cpu_schedules.conv_runs)."""
        block = _channel_block(prof.target)
        derived = self._derived(a)
        if ("conv_runs", block) not in derived:
            from nasc.backends.cpu_schedules import conv_runs

            derived["conv_runs", block] = conv_runs(a.model, block)
        return derived["conv_runs", block]

    def _derived(self, a: Analysis) -> dict:
        """What is derived from the analysis being priced (its kernel groups, node -> group, and,
        once asked for, its model key), computed once per analysis."""
        if self._seen is None or self._seen[0] is not a:
            from nasc.backends.profile import kernel_groups

            groups = kernel_groups(a)
            self._seen = (a, {"groups": groups, "group_of": {i: g for g in groups for i in g.nodes}})
        return self._seen[1]

    def _groups(self, a: Analysis, side: str):
        groups = self._derived(a)["groups"]
        ms, how = self._parts_ms(a, side, [g.nodes for g in groups], [g.signature for g in groups])
        self.coverage[side] = {k: how.count(k) for k in (MEASURED, PREDICTED, ANALYTIC)}
        return groups, ms

    def node_ms(self, a: Analysis, side: str) -> np.ndarray:
        """Each kernel's time on its anchor node (shape-only nodes cost nothing)."""
        if self.profiles[side] is None:
            return self.fallback.node_ms(a, side)
        groups, ms = self._groups(a, side)
        out = np.zeros(len(a.nodes))
        for g, t in zip(groups, ms):
            out[g.anchor()] = t
        return out

    def half_ms(self, a: Analysis, masks: np.ndarray, side: str) -> np.ndarray:
        if self.profiles[side] is None:
            return masks.astype(np.float64) @ self.fallback.node_ms(a, side)
        ctx = self._context(a, side)
        if ctx is not None:
            return ctx.half_ms(masks, lambda parts: self._parts_ms(a, side, parts, [_part_signature(a, q) for q in parts])[0])
        return self._kernel_sum_ms(a, masks, side)

    def _context(self, a: Analysis, side: str) -> "ContextTimes | None":
        """The profile's in-context times of exactly this model, if it has them."""
        contexts = self.profiles[side].contexts
        if not contexts:
            return None
        from nasc.backends.context import model_key

        derived = self._derived(a)
        if "model_key" not in derived:
            derived["model_key"] = model_key(a.model)
        doc = contexts.get(derived["model_key"])
        if doc is None:
            return None
        self.coverage[side] = {MEASURED_IN_CONTEXT: len(doc["kernels"])}
        return ContextTimes(doc, a, derived["groups"], self._layout_ms(side))

    def _layout_ms(self, side: str):
        """Milliseconds of a layout transform moving n bytes into NCHW{c}c or out of it
        (`layout_ms(nbytes, to_blocked)`), from the profile's predictor (None without one)."""
        prof = self.profiles[side]
        if prof.predictor is None:
            return None
        from nasc.backends.profile import layout_features

        return lambda nbytes, to_blocked: float(prof.predictor.predict_ms([layout_features(nbytes, to_blocked)])[0])

    def _kernel_sum_ms(self, a: Analysis, masks: np.ndarray, side: str) -> np.ndarray:
        """Halves composed like measured ones (ContextTimes) from a planned record of the kernels."""
        prof = self.profiles[side]
        groups, ms = self._groups(a, side)
        if prof.predictor is None:  # bare kernel times: their sum, nothing known about layouts or calls
            return self._plain_sum_ms(a, masks, side, groups, ms)
        layout_ms = self._layout_ms(side)
        doc = planned_record(a, groups, ms, _channel_block(prof.target), layout_ms)
        parts = lambda q: self._parts_ms(a, side, q, [_part_signature(a, x) for x in q])[0]  # noqa: E731
        return ContextTimes(doc, a, groups, layout_ms).half_ms(masks, parts)

    def _plain_sum_ms(self, a: Analysis, masks: np.ndarray, side: str, groups, ms: np.ndarray) -> np.ndarray:
        member = np.zeros((len(groups), len(a.nodes)))
        for k, g in enumerate(groups):
            member[k, list(g.nodes)] = 1.0
        cover = masks.astype(np.float64) @ member.T                      # (C, G) nodes of each kernel here
        whole = cover == member.sum(axis=1)
        total = whole.astype(np.float64) @ ms
        broken = np.argwhere((cover > 0) & ~whole)
        if len(broken):
            parts = [tuple(i for i in groups[g].nodes if masks[c, i]) for c, g in broken]
            uniq = list(dict.fromkeys(parts))
            part_ms, _ = self._parts_ms(a, side, uniq, [_part_signature(a, q) for q in uniq])
            lookup = dict(zip(uniq, part_ms))
            np.add.at(total, broken[:, 0], [lookup[p] for p in parts])
        return total


def planned_record(a: Analysis, groups, kernel_ms: np.ndarray, channel_block: int | None, layout_ms) -> dict:
    """The record backends/context.py would measure, planned instead: each kernel at its predicted
    time, layouts as the CPU layout pass chooses them (backends.cpu_schedules.runs_blocked), a
    transform wherever a kernel reads a tensor in the other layout, priced by
    `layout_ms(bytes, to_blocked)`."""
    from nasc.backends.cpu_schedules import conv_channels, model_conv_block, pad_for_cpu, runs_blocked, writes_blocked
    from nasc.partitioner.analysis import analyze
    from nasc.partitioner.load import node_inputs

    # the layout pass sees the graph the CPU pipeline compiles: conv channels padded to the block
    widened = a
    if channel_block and (padded := pad_for_cpu(a.model, channel_block))[1]:
        widened = analyze(padded[0])
    widened_node = {n.name: n for n in widened.nodes}
    blocked = {x: False for x in a.inputs}
    kernels, transforms = [], []
    model_block = model_conv_block(widened, channel_block)
    for g, ms in zip(groups, kernel_ms):
        anchor = a.nodes[g.nodes[0]]
        produced = [o for i in g.nodes for o in a.nodes[i].output]
        ins = list(dict.fromkeys(x for i in g.nodes for x in node_inputs(a.nodes[i]) if x in a.specs and x not in produced))
        out = next((o for o in reversed(produced) if o in a.specs), produced[-1])
        cin, cout, group = conv_channels(widened, widened_node.get(anchor.name, anchor), out)
        want = runs_blocked(anchor.op_type, cin, cout, group, [blocked.get(x, False) for x in ins], model_block)
        # a conv the block cannot hold (a 3-channel stem) may still write blocked output
        writes = want or bool(anchor.op_type == "Conv" and model_block
                              and writes_blocked(model_block, (cin, cout, group)))
        for x in ins:
            if blocked.get(x, False) != want:
                transforms.append({"tensor": x, "ms": layout_ms(a.specs[x].nbytes, want), "to_blocked": want, "reader": out})
        kernels.append({"tensor": out, "ms": float(ms), "blocked": writes, "reads": [[x, want] for x in ins]})
        blocked.update({o: writes for o in produced})
    for o in a.outputs:
        if blocked.get(o, False):
            transforms.append({"tensor": o, "ms": layout_ms(a.specs[o].nbytes, False), "to_blocked": False, "reader": None})
    return {"kernels": kernels, "transforms": transforms}


class ContextTimes:
    """Halves priced from one model's kernels timed in place (backends/context.py).

    A half costs the kernels computing its nodes, the layout transforms between them, and one
    transform for each tensor the half receives and some kernel reads blocked, and for each
    blocked tensor it sends. A fused kernel a cut breaks is priced as the two kernels each
    half then runs (by `parts_ms`, the profile's kernels or predictor); if it ran blocked, a
    tensor the cut sends from inside it costs a transform on each side. A transform the record
    did not time (a tensor in that direction, in the whole model or in its `crossing` model) is
    priced by `layout_ms(bytes, to_blocked)` (the profile's predictor), else at the record's
    median rate: a model run blocked end to end times none, and its cut tensors are not free.
    A half the record also replayed alone has its timed kernels and transforms scaled by how
    much faster they ran there (backends.context.replay_halves), never up (MAX_REPLAY_RATIO).
    A half whose convs the CPU pipeline runs in another block than the whole model's (or plain)
    costs its own time, compiled and timed apart (`own_layouts`).
    """

    def __init__(self, doc: dict, a: Analysis, groups=None, layout_ms=None):
        from nasc.backends.profile import kernel_groups

        self.a = a
        self.layout_ms = layout_ms
        self.groups = groups if groups is not None else kernel_groups(a)
        node = lambda t: a.producer.get(t, -1) if t is not None else -1  # noqa: E731  (-1: a graph input)
        # kernels no ONNX tensor matched (fused past a tensor ONNX Runtime keeps) go with the next one
        self.kernels: list[tuple[int, float]] = []
        pending = 0.0
        for k in doc["kernels"]:
            if node(k["tensor"]) < 0:
                pending += k["ms"]
                continue
            self.kernels.append((node(k["tensor"]), k["ms"] + pending))
            pending = 0.0
        # a half runs in the whole model's layouts: a tensor it receives that some reader there read
        # blocked is transformed once on entry (backends/cpu_rules/lowering.py, _ReceivedBlocker)
        self.reads_blocked = [(t, node(k["tensor"])) for k in doc["kernels"] for t, blocked in k.get("reads", [])
                              if blocked and node(k["tensor"]) >= 0]
        self.blocked_out = {k["tensor"] for k in doc["kernels"] if k["blocked"] and k["tensor"] is not None}
        self.transforms = [(t["tensor"], node(t["reader"]) if t["reader"] is not None else None, float(t["ms"]),
                            t["to_blocked"]) for t in doc["transforms"] if t["tensor"] is not None]
        rates = [ms / a.specs[t].nbytes for t, _, ms, _ in self.transforms if t in a.specs and a.specs[t].nbytes]
        self.rate_ms_per_byte = float(np.median(rates)) if rates else 0.0
        self.measured_transform: dict[tuple[str, bool], float] = {}   # (tensor, to blocked) -> ms
        for t, _, ms, to_blocked in self.transforms:
            self.measured_transform[t, to_blocked] = min(ms, self.measured_transform.get((t, to_blocked), np.inf))
        # the transforms of the tensors a half receives or sends, timed apart (backends.context.measure_crossings)
        for x in doc.get("crossing", []):
            self.measured_transform.setdefault((x["tensor"], bool(x["to_blocked"])), float(x["ms"]))
        # a half replayed alone (backends.context.replay_halves): its timed calls, scaled by how much
        # faster they ran there than in the whole model
        self.replayed: dict[str, float] = doc.get("halves", {})
        # a half whose convs run in another block than the whole model's, compiled and timed on its
        # own (its kernels are not the whole model's; backends.context.time_own_layouts)
        self.own_layouts: dict[str, float] = doc.get("own_layouts", {})
        self.units = self._units(doc)
        self.unit_of = {i: u for u, groups in enumerate(self.units) for g in groups for i in self.groups[g].nodes}
        # units that ran in NCHW{c}c: a tensor inside one that a cut sends is blocked too
        self.blocked_units = {self.unit_of[node(k["tensor"])] for k in doc["kernels"]
                              if k["blocked"] and node(k["tensor"]) in self.unit_of}

    def _units(self, doc: dict) -> list[list[int]]:
        """Kernel groups that ran as one call (backends.context.fused_units): priced together, and
        split by a cut as parts."""
        from nasc.backends.context import fused_units

        return fused_units(self.a, self.groups, {k["tensor"] for k in doc["kernels"]})

    def _transform_ms(self, t: str, to_blocked: bool) -> float:
        if (t, to_blocked) in self.measured_transform:
            return self.measured_transform[t, to_blocked]
        nbytes = self.a.specs[t].nbytes
        return self.layout_ms(nbytes, to_blocked) if self.layout_ms is not None else self.rate_ms_per_byte * nbytes

    def _made(self, here: np.ndarray, t: str) -> bool:
        return t in self.a.producer and bool(here[self.a.producer[t]])

    def half_ms(self, masks: np.ndarray, parts_ms) -> np.ndarray:
        """(C,) milliseconds of the nodes each row of `masks` puts in one half (call cost excluded)."""
        from nasc.backends.context import half_key

        a = self.a
        out = np.zeros(len(masks))
        unit_nodes = [[i for g in u for i in self.groups[g].nodes] for u in self.units]
        for row, here in enumerate(masks.astype(bool)):
            if self.own_layouts and (own := self.own_layouts.get(half_key(here))) is not None:
                out[row] = own
                continue
            broken = {u for u, nodes in enumerate(unit_nodes) if 0 < here[nodes].sum() < len(nodes)}
            timed = 0.0
            for n, ms in self.kernels:
                if here[n] and self.unit_of.get(n) not in broken:
                    timed += ms
            plain_sent = set()
            for t, reader, ms, to_blocked in self.transforms:
                if self._made(here, t) and (here[self.a.producer[t]] if reader is None else here[reader]):
                    timed += ms
                    if not to_blocked:
                        plain_sent.add(t)
            total = timed * min(self.replayed.get(half_key(here), 1.0), MAX_REPLAY_RATIO) if self.replayed else timed
            if broken:
                parts = [p for u in sorted(broken) for g in self.units[u]
                         if (p := tuple(i for i in self.groups[g].nodes if here[i]))]
                total += float(np.sum(parts_ms(parts)))
            received = {t for t, reader in self.reads_blocked if here[reader] and not self._made(here, t)}
            sent = {t for t in self.blocked_out if self._made(here, t) and t not in plain_sent
                    and any(not here[c] for c in a.consumers.get(t, []))}
            # a cut through a unit that ran blocked crosses in plain layout: one transform each side
            for u in broken & self.blocked_units:
                for i in unit_nodes[u]:
                    for t in a.nodes[i].output:
                        if t in a.specs and any(here[c] != here[i] for c in a.consumers.get(t, [])):
                            (sent if here[i] else received).add(t)
            total += sum(self._transform_ms(t, True) for t in received)   # a received tensor enters blocked
            total += sum(self._transform_ms(t, False) for t in sent)
            out[row] = total
        return out


def latency_model_for(device, server) -> LatencyModel:
    """The model for two loaded profiles (HardwareProfile or KernelProfile each): a side with a
    kernel profile is priced from measured kernels and its predictor, a hardware profile analytically."""
    from nasc.defaults import DEFAULT_DEVICE, DEFAULT_SERVER
    from nasc.types import HardwareProfile

    hw = [p if isinstance(p, HardwareProfile) else d for p, d in ((device, DEFAULT_DEVICE), (server, DEFAULT_SERVER))]
    analytic = AnalyticLatencyModel(*hw)
    if isinstance(device, HardwareProfile) and isinstance(server, HardwareProfile):
        return analytic
    return MeasuredLatencyModel(analytic, None if isinstance(device, HardwareProfile) else device,
                                None if isinstance(server, HardwareProfile) else server)
