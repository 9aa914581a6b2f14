"""One-shot weight-sharing NB201 supernet, its fixed subnets, training and accuracy estimation.

Training samples one path per step uniformly at random (single-path one-shot, Guo et al. 2020).
Uniform sampling gives every op the same share of updates, so the inherited weights are not
biased toward what an early controller happened to like (the failure mode of DARTS/ENAS-style
coupling); it has no extra hyper-parameters, and on NB201 it ranks about as well as the
alternatives studied (Yu et al. 2020, "Evaluating the search phase of NAS"; Dong & Yang 2020).
A candidate's accuracy is the validation accuracy of its subnet with inherited weights, after
BN recalibration on a few training batches (measured to help ranking: see benchmarks/nas_table.py).
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
from torch import nn

from nasc.search.nas import defaults as D
from nasc.search.nas.data import Dataset
from nasc.search.nas.space import CONV1, CONV3, EDGE_DST, EDGE_SRC, POOL, SKIP, SpaceConfig


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


# --------------------------------------------------------------------------- training


@dataclass
class TrainResult:
    supernet: nn.Module
    seconds: float
    epochs: int
    losses: list[float] = field(default_factory=list)


def _batches(n: int, batch_size: int, rng: np.random.Generator, shuffle: bool = True):
    order = rng.permutation(n) if shuffle else np.arange(n)
    for i in range(0, n, batch_size):
        yield order[i : i + batch_size]


def train_supernet(
    space,
    cfg: SpaceConfig,
    data: Dataset,
    epochs: int = D.DEFAULT_EPOCHS,
    batch_size: int = D.DEFAULT_BATCH_SIZE,
    lr: float = D.DEFAULT_LR,
    seed: int = D.DEFAULT_SEED,
    progress: Callable[[int, int, float], None] | None = None,
) -> TrainResult:
    """Train the supernet once with uniform single-path sampling (SGD + cosine schedule).

    Deterministic for a given seed; `progress(epoch, epochs, mean_loss)` is called after each epoch.
    """
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    net = space.build_supernet(cfg)
    steps = max(1, epochs * -(-len(data.train_x) // batch_size))
    opt = torch.optim.SGD(
        net.parameters(), lr=lr, momentum=D.DEFAULT_MOMENTUM, weight_decay=D.DEFAULT_WEIGHT_DECAY, nesterov=True
    )
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    x_all, y_all = torch.from_numpy(data.train_x), torch.from_numpy(data.train_y)
    losses: list[float] = []
    start = time.perf_counter()
    net.train()
    for epoch in range(epochs):
        total, count = 0.0, 0
        for idx in _batches(len(x_all), batch_size, rng):
            arch = space.random_arch(rng)
            loss = nn.functional.cross_entropy(net(x_all[idx], arch), y_all[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(net.parameters(), D.GRAD_CLIP_NORM)
            opt.step()
            sched.step()
            total, count = total + loss.item() * len(idx), count + len(idx)
        losses.append(total / max(count, 1))
        if progress:
            progress(epoch + 1, epochs, losses[-1])
    net.eval()
    return TrainResult(net, time.perf_counter() - start, epochs, losses)


def recalibrate_bn(model: nn.Module, data: Dataset, batches: int, batch_size: int, seed: int) -> None:
    """Replace BN running statistics by exact averages over `batches` fixed training batches."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns or batches <= 0:
        return
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average
    rng = np.random.default_rng(seed)
    x_all = torch.from_numpy(data.train_x)
    model.train()
    with torch.no_grad():
        for i, idx in enumerate(_batches(len(x_all), batch_size, rng)):
            if i >= batches:
                break
            model(x_all[idx])
    model.eval()


def accuracy(model: nn.Module, x: np.ndarray, y: np.ndarray, batch_size: int = 256) -> float:
    """Top-1 accuracy in percent."""
    model.eval()
    correct = 0
    with torch.no_grad():
        for i in range(0, len(x), batch_size):
            pred = model(torch.from_numpy(x[i : i + batch_size])).argmax(1).numpy()
            correct += int((pred == y[i : i + batch_size]).sum())
    return 100.0 * correct / max(len(y), 1)


def subnet_for(
    supernet, index: int, data: Dataset, bn_recal_batches: int = D.DEFAULT_BN_RECAL_BATCHES, seed: int = D.DEFAULT_SEED
) -> Subnet:
    """Arch `index` with inherited weights, BN recalibrated when `bn_recal_batches` > 0."""
    net = supernet.subnet(index)
    recalibrate_bn(net, data, bn_recal_batches, D.DEFAULT_BATCH_SIZE, seed)
    return net.eval()


class SupernetEstimator:
    """Candidate accuracy = validation accuracy of the inherited-weight subnet (memoised)."""

    def __init__(self, supernet, data: Dataset, bn_recal_batches: int = D.DEFAULT_BN_RECAL_BATCHES, seed: int = 0):
        self.supernet, self.data, self.bn_recal_batches, self.seed = supernet, data, bn_recal_batches, seed
        self.cache: dict[int, float] = {}

    def __call__(self, index: int) -> float:
        index = int(index)
        if index not in self.cache:
            net = subnet_for(self.supernet, index, self.data, self.bn_recal_batches, self.seed)
            self.cache[index] = accuracy(net, self.data.val_x, self.data.val_y)
        return self.cache[index]


def train_standalone(
    space, cfg: SpaceConfig, index: int, data: Dataset, epochs: int, batch_size: int = D.DEFAULT_BATCH_SIZE,
    lr: float = D.DEFAULT_LR, seed: int = D.DEFAULT_SEED,
) -> float:
    """Validation accuracy of arch `index` trained from scratch alone (ground truth for ranking)."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    net = space.build_supernet(cfg).subnet(index)
    steps = max(1, epochs * -(-len(data.train_x) // batch_size))
    opt = torch.optim.SGD(
        net.parameters(), lr=lr, momentum=D.DEFAULT_MOMENTUM, weight_decay=D.DEFAULT_WEIGHT_DECAY, nesterov=True
    )
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    x_all, y_all = torch.from_numpy(data.train_x), torch.from_numpy(data.train_y)
    net.train()
    for _ in range(epochs):
        for idx in _batches(len(x_all), batch_size, rng):
            loss = nn.functional.cross_entropy(net(x_all[idx]), y_all[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(net.parameters(), D.GRAD_CLIP_NORM)
            opt.step()
            sched.step()
    return accuracy(net, data.val_x, data.val_y)
