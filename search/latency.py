"""Latency models: predict device (head) and server (tail) time for every cut at once.

A model maps an Analysis to per-node times on one processor; a cut's half time is the sum
over its nodes, so all cuts are scored with one matrix product. `AnalyticLatencyModel` is a
roofline over the hardware profile (labelled `analytic` wherever it is reported); a
measured model plugs in through the same `LatencyModel` protocol.
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


def predict(a: Analysis, cuts: list[Cut], model: LatencyModel, link: Link, compress: bool = False) -> list[Prediction]:
    """Predicted latency of every cut: device(head) + transfer(payload) + server(tail).

    Device-only sends nothing; server-only sends the raw input uncompressed.
    """
    if not cuts:
        return []
    masks = np.stack([c.head_mask for c in cuts]).astype(np.float64)
    call = getattr(model, "call_ms", lambda side: 0.0)
    dev = masks @ model.node_ms(a, DEVICE) + np.where(masks.any(axis=1), call(DEVICE), 0.0)
    srv = (1.0 - masks) @ model.node_ms(a, SERVER) + np.where(masks.all(axis=1), 0.0, call(SERVER))
    payload = np.array([c.payload_bytes_int8 if compress else c.payload_bytes for c in cuts], np.float64)
    transfer = np.asarray(link.transfer_ms(payload), np.float64)
    preds = []
    for i, c in enumerate(cuts):
        t = 0.0 if c.kind == DEVICE_ONLY else float(transfer[i])
        if c.kind == SERVER_ONLY:
            t = float(link.transfer_ms(c.payload_bytes))
        preds.append(Prediction(float(dev[i]), t, float(srv[i])))
    return preds


class MeasuredLatencyModel:
    """Per-node times from kernels measured on the real target (see backends.profile).

    Kernels a profile lacks, and a side with no profile, fall back to the analytic model;
    `source` says how much of each side was measured.
    """

    def __init__(self, fallback: AnalyticLatencyModel, device_kernels: dict[str, float] | None = None,
                 server_kernels: dict[str, float] | None = None):
        self.fallback = fallback
        self.kernels = {DEVICE: device_kernels, SERVER: server_kernels}
        self.coverage: dict[str, tuple[int, int]] = {}

    @property
    def source(self) -> str:
        parts = []
        for side in (DEVICE, SERVER):
            if self.kernels[side] is None:
                parts.append(f"{side} analytic")
            else:
                k, n = self.coverage.get(side, (0, 0))
                parts.append(f"{side} measured ({k}/{n} kernels)")
        return "; ".join(parts)

    def call_ms(self, side: str) -> float:
        """Fixed cost of running a half once (VM call, allocation), measured with the kernels."""
        from nasc.backends.profile import CALL_KEY

        return float((self.kernels[side] or {}).get(CALL_KEY, 0.0))

    def node_ms(self, a: Analysis, side: str) -> np.ndarray:
        from nasc.backends.profile import kernel_groups, node_ms_from_kernels

        base = self.fallback.node_ms(a, side)
        kernels = self.kernels[side]
        if kernels is None:
            return base
        ms, known = node_ms_from_kernels(a, kernels)
        groups = kernel_groups(a)
        self.coverage[side] = (sum(g.signature in kernels for g in groups), len(groups))
        return np.where(known, ms, base)
