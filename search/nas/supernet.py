"""One-shot weight-sharing supernets (NB201 cells, MobileNetV2 blocks), their fixed subnets and
the modules probed for latency; `train` trains them and estimates candidate accuracy.
"""

from __future__ import annotations

import copy

import numpy as np
import torch
from torch import nn

from nasc.search.nas import defaults as D
from nasc.search.nas.space import CONV1, CONV3, EDGE_DST, EDGE_SRC, MBV2_CONV_CHOICES, POOL, SKIP, SpaceConfig


class ReLUConvBN(nn.Sequential):
    def __init__(self, c_in: int, c_out: int, kernel: int, stride: int = 1):
        super().__init__(
            nn.ReLU(inplace=False),
            nn.Conv2d(c_in, c_out, kernel, stride=stride, padding=kernel // 2, bias=False),
            nn.BatchNorm2d(c_out),
        )


def avg_pool_3x3() -> nn.Module:
    return nn.AvgPool2d(3, stride=1, padding=1, count_include_pad=False)


class Stem(nn.Sequential):
    def __init__(self, c_in: int, c_out: int):
        super().__init__(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out))


class ResNetReduction(nn.Module):
    """NB201's residual reduction block: two 3x3 ReLU-conv-BN (first stride 2) + pooled 1x1 shortcut."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.conv_a = ReLUConvBN(c_in, c_out, 3, stride=2)
        self.conv_b = ReLUConvBN(c_out, c_out, 3)
        self.shortcut = nn.Sequential(nn.AvgPool2d(2, 2), nn.Conv2d(c_in, c_out, 1, bias=False))

    def forward(self, x):
        return self.shortcut(x) + self.conv_b(self.conv_a(x))


class Head(nn.Module):
    def __init__(self, c: int, num_classes: int):
        super().__init__()
        self.bn = nn.BatchNorm2d(c)
        self.fc = nn.Linear(c, num_classes)

    def forward(self, x):
        return self.fc(torch.relu(self.bn(x)).mean((2, 3)))


class Cell(nn.Module):
    """A 4-node NB201 cell. `edges[e]` maps op name -> module; only live edges are evaluated."""

    def __init__(self, edges: list[dict[int, nn.Module]]):
        super().__init__()
        self.edges = nn.ModuleList(nn.ModuleDict({str(k): m for k, m in e.items()}) for e in edges)
        self.pool = avg_pool_3x3()

    def forward(self, x, ops: tuple[int, ...], live: np.ndarray):
        nodes = [x]
        for j in (1, 2, 3):
            acc = None
            for e in np.flatnonzero((EDGE_DST == j) & live):
                y = self._apply(e, ops[e], nodes[EDGE_SRC[e]])
                acc = y if acc is None else acc + y
            nodes.append(acc)
        # An unreachable output node is zero; multiplying keeps the graph connected on export.
        return nodes[3] if nodes[3] is not None else x.mul(0.0)

    def _apply(self, e: int, op: int, x):
        if op == SKIP:
            return x
        if op == POOL:
            return self.pool(x)
        return self.edges[e][str(op)](x)


class FixedCell(nn.Module):
    """A cell frozen to one genotype, holding only the modules of its live edges."""

    def __init__(self, cell: Cell, ops: tuple[int, ...], live: np.ndarray):
        super().__init__()
        self.ops, self.live = tuple(ops), np.asarray(live, dtype=bool)
        edges = [
            {op: copy.deepcopy(cell.edges[e][str(op)])} if live[e] and op in (CONV1, CONV3) else {}
            for e, op in enumerate(ops)
        ]
        self.cell = Cell(edges)

    def forward(self, x):
        return self.cell(x, self.ops, self.live)


class Subnet(nn.Module):
    """A fixed architecture as a chain of blocks; `block_outputs` exposes every split point."""

    def __init__(self, blocks: list[nn.Module], block_names: list[str]):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.block_names = list(block_names)

    def block_outputs(self, x) -> list:
        outs = []
        for b in self.blocks:
            x = b(x)
            outs.append(x)
        return outs

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        return x


class NB201Supernet(nn.Module):
    """All 15,625 NB201 networks in one module; `forward(x, index)` runs one path."""

    def __init__(self, space, cfg: SpaceConfig):
        super().__init__()
        self.space, self.cfg = space, cfg
        shapes = space.stage_shapes(cfg)
        self.stem = Stem(cfg.in_channels, cfg.channels)
        self.cells = nn.ModuleList()
        self.reductions = nn.ModuleList()
        self.order: list[tuple[str, int]] = [("stem", 0)]
        for s, shape in enumerate(shapes):
            c = shape[1]
            for _ in range(cfg.cells_per_stage):
                self.order.append(("cell", len(self.cells)))
                self.cells.append(Cell([{CONV1: ReLUConvBN(c, c, 1), CONV3: ReLUConvBN(c, c, 3)} for _ in EDGE_SRC]))
            if s < 2:
                self.order.append(("reduce", len(self.reductions)))
                self.reductions.append(ResNetReduction(c, 2 * c))
        self.order.append(("head", 0))
        self.head = Head(shapes[2][1], cfg.num_classes)

    def forward(self, x, index: int):
        ops, live = self.space.arch_ops(index), self.space.live[index]
        for kind, i in self.order:
            if kind == "cell":
                x = self.cells[i](x, ops, live)
            else:
                x = self._fixed(kind, i)(x)
        return x

    def _fixed(self, kind: str, i: int) -> nn.Module:
        if kind == "stem":
            return self.stem
        if kind == "head":
            return self.head
        return self.reductions[i]

    def subnet(self, index: int) -> Subnet:
        """A standalone copy of arch `index` with the inherited weights (the supernet is untouched)."""
        ops, live = self.space.arch_ops(index), self.space.live[index]
        blocks = [
            FixedCell(self.cells[i], ops, live) if kind == "cell" else copy.deepcopy(self._fixed(kind, i))
            for kind, i in self.order
        ]
        return Subnet(blocks, self.space.block_names(self.cfg))


def nb201_term_module(cfg: SpaceConfig, name: str) -> nn.Module:
    """The module whose ONNX export is probed for latency term `name` (see NB201Space.terms)."""
    channels = [cfg.channels * 2**s for s in range(3)]
    if name == "stem":
        return Stem(cfg.in_channels, cfg.channels)
    if name == "head":
        return Head(channels[2], cfg.num_classes)
    if name.startswith("reduce"):
        s = int(name[-1])
        return ResNetReduction(channels[s - 1], channels[s])
    stage, op = name.split(".")
    c = channels[int(stage[1:])]
    return {
        "nor_conv_1x1": lambda: nn.Sequential(*list(ReLUConvBN(c, c, 1))[1:]),
        "nor_conv_3x3": lambda: nn.Sequential(*list(ReLUConvBN(c, c, 3))[1:]),
        "avg_pool_3x3": avg_pool_3x3,
        "relu": nn.ReLU,
        "relu_fused": nn.ReLU,
        "add": _Add,
        "add_unfused": _Add,
        "zero": _Zero,
    }[op]()


# --------------------------------------------------------------------------- MobileNetV2 / FBNet
#
# Weight sharing: every block holds one separate module per (kernel, expansion) choice, as in
# SPOS and FBNet, rather than slicing the largest kernel/expansion as OFA does. Slicing makes the
# 3x3 kernel the centre of the 5x5 one and the e=3 channels a prefix of the e=6 ones, which OFA
# only untangles with kernel-transform matrices and a long progressive-shrinking schedule; with a
# few CPU epochs the coupling would blur exactly the differences the ranking must see. Separate
# candidates cost memory (4 per block) that is negligible at these widths, and a subnet is then a
# plain copy of the chosen modules.


class MBV2Stem(nn.Sequential):
    def __init__(self, c_in: int, c_out: int):
        super().__init__(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU())


class InvertedResidual(nn.Module):
    """MobileNetV2 block: 1x1 expand, k x k depthwise (stride), 1x1 linear project; residual if shape kept."""

    def __init__(self, c_in: int, c_out: int, kernel: int, expansion: int, stride: int):
        super().__init__()
        hidden = c_in * expansion
        self.expand = nn.Sequential(nn.Conv2d(c_in, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU())
        self.depthwise = nn.Sequential(
            nn.Conv2d(hidden, hidden, kernel, stride=stride, padding=kernel // 2, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU(),
        )
        self.project = nn.Sequential(nn.Conv2d(hidden, c_out, 1, bias=False), nn.BatchNorm2d(c_out))
        self.residual = stride == 1 and c_in == c_out

    def forward(self, x):
        y = self.project(self.depthwise(self.expand(x)))
        return y + x if self.residual else y


class MBV2Head(nn.Module):
    def __init__(self, c: int, num_classes: int):
        super().__init__()
        wide = c * D.MBV2_HEAD_EXPANSION
        self.conv = nn.Sequential(nn.Conv2d(c, wide, 1, bias=False), nn.BatchNorm2d(wide), nn.ReLU())
        self.fc = nn.Linear(wide, num_classes)

    def forward(self, x):
        return self.fc(self.conv(x).mean((2, 3)))


def _mbv2_candidate(block, choice: str) -> nn.Module:
    kernel, expansion, _ = next(c for c in MBV2_CONV_CHOICES if c[2] == choice)
    return InvertedResidual(block.c_in, block.c_out, kernel, expansion, block.stride)


class MBV2Supernet(nn.Module):
    """Every arch of an MBV2Space in one module; `forward(x, index)` runs one path."""

    def __init__(self, space, cfg: SpaceConfig):
        super().__init__()
        self.space, self.cfg = space, cfg
        self.layout = space.blocks(cfg)
        self.stem = MBV2Stem(cfg.in_channels, cfg.channels)
        self.blocks = nn.ModuleList(
            nn.ModuleDict({c: _mbv2_candidate(b, c) for c in b.choices if c != D.MBV2_SKIP}) for b in self.layout
        )
        self.head = MBV2Head(self.layout[-1].c_out, cfg.num_classes)

    def forward(self, x, index: int):
        x = self.stem(x)
        for candidates, choice in zip(self.blocks, self.space.arch_choices(index)):
            if choice != D.MBV2_SKIP:
                x = candidates[choice](x)
        return self.head(x)

    def subnet(self, index: int) -> Subnet:
        """A standalone copy of arch `index` with the inherited weights (a skipped block is an Identity)."""
        chosen = [
            nn.Identity() if c == D.MBV2_SKIP else copy.deepcopy(candidates[c])
            for candidates, c in zip(self.blocks, self.space.arch_choices(index))
        ]
        blocks = [copy.deepcopy(self.stem), *chosen, copy.deepcopy(self.head)]
        return Subnet(blocks, self.space.block_names(self.cfg))


def mbv2_term_module(space, cfg: SpaceConfig, name: str) -> nn.Module:
    """The module whose ONNX export is probed for latency term `name` (see MBV2Space.terms)."""
    layout = space.blocks(cfg)
    if name == "stem":
        return MBV2Stem(cfg.in_channels, cfg.channels)
    if name == "head":
        return MBV2Head(layout[-1].c_out, cfg.num_classes)
    block, choice = name.rsplit(".", 1)
    return _mbv2_candidate(next(b for b in layout if b.name == block), choice)


def distinct_weights(module: nn.Module, seed: int = D.DEFAULT_SEED) -> nn.Module:
    """Seeded small positive offsets on every BN's affine parameters and statistics (in place, returned).

    Freshly built BNs are all alike (weight 1, bias 0, mean 0, var 1) and fold into equal conv
    biases, which the ONNX exporter merges into one initializer; a trained network has no equal
    tensors, so probes and untrained exports use this to carry the weights a trained one would.
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                for t in (m.weight, m.bias, m.running_mean, m.running_var):
                    if t is not None:
                        t.add_(D.DISTINCT_BN_OFFSET * torch.rand(t.shape, generator=g))
    return module


class AfterProducer(nn.Module):
    """Feeds the first input through a ReLU: the producer a probed term has inside a network."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x, *rest):
        return self.inner(torch.relu(x), *rest)


class _Add(nn.Module):
    def forward(self, x, y):
        return x + y


class _Zero(nn.Module):
    def forward(self, x):
        return x.mul(0.0)
