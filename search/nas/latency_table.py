"""Latency, payload and device memory of every (architecture, cut) pair, vectorised.

Each probed term (an op at one stage or a block choice, the stem, a reduction, the head) is
exported to ONNX once and priced by nasc's latency model; a block costs the sum of its terms, so
all A x K pairs are scored with one matrix product and cumulative sums per link. Device memory is
the partitioner's `device_peak_memory_bytes`: head weights plus peak live activations.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
from onnx import ModelProto

from nasc.search.nas import defaults as D
from nasc.search.nas.space import BlockStructure, SearchSpace, SpaceConfig
from nasc.types import Link

DEVICE, SERVER = "device", "server"
# cost(model, side) -> per-node milliseconds of `model` on "device" or "server".
NodeCost = Callable[[ModelProto, str], np.ndarray]


def nasc_node_cost(device=None, server=None) -> tuple[NodeCost, str]:
    """nasc's own latency model and its label: analytic roofline for a hardware profile (or none),
    measured kernels for a kernel profile from nasc-profile, per side."""
    from nasc.defaults import DEFAULT_DEVICE, DEFAULT_SERVER
    from nasc.partitioner import analyze, load_model
    from nasc.search.latency import latency_model_for

    model = latency_model_for(device or DEFAULT_DEVICE, server or DEFAULT_SERVER)

    def cost(onnx_model: ModelProto, side: str) -> np.ndarray:
        return model.node_ms(analyze(load_model(onnx_model)), side)

    return cost, model.source


def param_bytes(model: ModelProto) -> int:
    """Device weight bytes as the partitioner counts them: initializers after nasc's PREPARE passes
    (which turn constants such as a Mul's scalar into initializers), as compiled for the device
    (a Winograd conv's transformed weights are larger than its ONNX ones)."""
    from nasc.partitioner import analyze, load_model
    from nasc.passes import prepare

    return int(sum(analyze(load_model(prepare(load_model(model)))).device_weight_bytes.values()))


@dataclass(frozen=True)
class TermCosts:
    device_ms: np.ndarray  # (T,)
    server_ms: np.ndarray  # (T,)
    param_bytes: np.ndarray  # (T,)


def probe_terms(space: SearchSpace, cfg: SpaceConfig, structure: BlockStructure, cost: NodeCost) -> TermCosts:
    """Export every term of the space to ONNX (seeded weights) and price it on both sides."""
    import torch

    from nasc.search.nas.export import INPUT_NAME, export_onnx
    from nasc.search.nas.supernet import AfterProducer, distinct_weights

    torch.manual_seed(D.DEFAULT_SEED)
    dev, srv, params = [], [], []
    for term in structure.terms:
        module = distinct_weights(space.term_module(cfg, term))
        if term.after_producer:
            module = AfterProducer(module)
        m = export_onnx(module, [term.input_shape] * term.num_inputs)
        priced = np.array([not (term.after_producer and INPUT_NAME in n.input) for n in _ordered_nodes(m)])
        dev.append(float(np.sum(cost(m, DEVICE)[priced])))
        srv.append(float(np.sum(cost(m, SERVER)[priced])))
        params.append(param_bytes(m))
    return TermCosts(np.array(dev), np.array(srv), np.array(params, dtype=np.float64))


def _ordered_nodes(model: ModelProto):
    from nasc.partitioner import load_model

    return list(load_model(model).graph.node)


@dataclass(frozen=True)
class Scores:
    """Every (arch, cut) pair on one link: arrays of shape (A, K) unless noted."""

    latency_ms: np.ndarray
    device_ms: np.ndarray
    transfer_ms: np.ndarray
    server_ms: np.ndarray
    payload_bytes: np.ndarray  # (K,)
    device_memory_bytes: np.ndarray
    link: Link

    @property
    def best_cut(self) -> np.ndarray:
        """(A,) the cut of least latency for each arch."""
        return self.latency_ms.argmin(axis=1)


@dataclass(frozen=True)
class LatencyTable:
    """Per-block device/server time and weights of every arch (A, B), plus the block structure."""

    structure: BlockStructure
    block_device_ms: np.ndarray
    block_server_ms: np.ndarray
    block_param_bytes: np.ndarray
    source: str

    @property
    def num_cuts(self) -> int:
        return self.structure.num_blocks + 1

    def payload_bytes(self, int8: bool = False) -> np.ndarray:
        """(K,) bytes sent at each cut: the raw input server-only, nothing device-only."""
        inner = self.structure.out_bytes[:-1]
        if int8:
            inner = np.ceil(inner * D.INT8_PAYLOAD_FRACTION) + D.INT8_QPARAM_BYTES
        return np.concatenate([[self.structure.input_bytes], inner, [0.0]])

    def score(self, link: Link, int8: bool = False) -> Scores:
        """Latency = device(head) + transfer(payload) + server(tail) for every (arch, cut)."""
        zero = np.zeros((self.block_device_ms.shape[0], 1))
        head = np.concatenate([zero, np.cumsum(self.block_device_ms, axis=1)], axis=1)
        srv_done = np.concatenate([zero, np.cumsum(self.block_server_ms, axis=1)], axis=1)
        tail = srv_done[:, -1:] - srv_done
        payload = self.payload_bytes(int8)
        transfer = np.asarray(link.transfer_ms(payload), dtype=np.float64)
        transfer[-1] = 0.0
        transfer = np.broadcast_to(transfer, head.shape)
        weights = np.concatenate([zero, np.cumsum(self.block_param_bytes, axis=1)], axis=1)
        work = np.concatenate(
            [np.full_like(zero, self.structure.input_bytes), np.maximum.accumulate(self.structure.peak_act_bytes, axis=1)],
            axis=1,
        )
        return Scores(
            latency_ms=head + transfer + tail, device_ms=head, transfer_ms=transfer, server_ms=tail,
            payload_bytes=payload, device_memory_bytes=weights + work, link=link,
        )


def build_latency_table(space: SearchSpace, cfg: SpaceConfig, cost: NodeCost | None = None, source: str = "") -> LatencyTable:
    """Probe the space's terms once and expand them to per-block costs of all archs."""
    if cost is None:
        cost, source = nasc_node_cost()
    structure = space.structure(cfg)
    tc = probe_terms(space, cfg, structure, cost)
    counts = structure.term_counts.astype(np.float64)
    return LatencyTable(
        structure=structure,
        block_device_ms=counts @ tc.device_ms,
        block_server_ms=counts @ tc.server_ms,
        block_param_bytes=counts @ tc.param_bytes,
        source=source or "custom cost function",
    )
