"""Latency models: predict device (head) and server (tail) time for every cut at once.

A model maps an Analysis to per-node times on one processor; a cut's half time is the sum
over its nodes, so all cuts are scored with one matrix product. `AnalyticLatencyModel` is a
roofline over the hardware profile (labelled `analytic` wherever it is reported).
`MeasuredLatencyModel` sums kernels measured on the target, predicts the ones never measured
with the profile's fitted predictor, and prices a fused kernel that a cut breaks in two as
the two kernels each half really runs.
"""

from __future__ import annotations

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


class MeasuredLatencyModel:
    """Kernel times from a measured profile of the target (see backends.profile).

    Each fused kernel costs its measured time when the profile has its signature, the
    profile's fitted predictor otherwise, and the analytic roofline when the profile has no
    predictor; a side without a profile is analytic. A cut through a fused kernel leaves a
    kernel on each side: each part is priced on its own. `source` says how each side was priced.
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
            how = PREDICTED if prof.predictor is not None and not cov.get(MEASURED) else MEASURED
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
            elif prof.predictor is not None:
                how[k] = PREDICTED
        unknown = [k for k, h in enumerate(how) if h == PREDICTED]
        if unknown:
            ms[unknown] = prof.predictor.predict_ms([group_features(a, parts[k]) for k in unknown])
        rest = [k for k, h in enumerate(how) if h == ANALYTIC]
        if rest:
            base = self.fallback.node_ms(a, side)
            ms[rest] = [base[list(parts[k])].sum() for k in rest]
        return ms, how

    def _groups(self, a: Analysis, side: str):
        from nasc.backends.profile import kernel_groups

        groups = kernel_groups(a)
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
        groups, ms = self._groups(a, side)
        member = np.zeros((len(groups), len(a.nodes)))
        for k, g in enumerate(groups):
            member[k, list(g.nodes)] = 1.0
        cover = masks.astype(np.float64) @ member.T                      # (C, G) nodes of each kernel here
        whole = cover == member.sum(axis=1)
        total = whole.astype(np.float64) @ ms
        broken = np.argwhere((cover > 0) & ~whole)
        if len(broken):
            parts = [tuple(i for i in groups[g].nodes if masks[c, i]) for c, g in broken]
            from nasc.backends.profile import part_signature

            uniq = list(dict.fromkeys(parts))
            part_ms, _ = self._parts_ms(a, side, uniq, [part_signature(a, q) for q in uniq])
            lookup = dict(zip(uniq, part_ms))
            np.add.at(total, broken[:, 0], [lookup[p] for p in parts])
        return total


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
