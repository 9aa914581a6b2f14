"""Supernet training, standalone training (ranking ground truth) and candidate accuracy estimates.

Training samples one path per step uniformly at random (single-path one-shot, Guo et al. 2020):
every choice gets the same share of updates, with no controller to bias the inherited weights
and no extra hyper-parameters. A candidate's accuracy is the validation accuracy of its subnet
with inherited weights, after BN recalibration on a few training batches.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

import numpy as np
import torch
from torch import nn

from nasc.search.nas import defaults as D
from nasc.search.nas.data import Dataset
from nasc.search.nas.space import SpaceConfig


@contextlib.contextmanager
def torch_threads(n: int = D.TORCH_THREADS) -> Iterator[None]:
    """Run torch on `n` intra-op threads inside the block, restoring the previous count after."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


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


def _optimizer(net: nn.Module, lr: float, steps: int):
    """SGD (Nesterov momentum, weight decay) with a cosine schedule over `steps` updates."""
    opt = torch.optim.SGD(
        net.parameters(), lr=lr, momentum=D.DEFAULT_MOMENTUM, weight_decay=D.DEFAULT_WEIGHT_DECAY, nesterov=True
    )
    return opt, torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, steps))


def _step(net: nn.Module, opt, sched, loss) -> None:
    opt.zero_grad(set_to_none=True)
    loss.backward()
    nn.utils.clip_grad_norm_(net.parameters(), D.GRAD_CLIP_NORM)
    opt.step()
    sched.step()


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
    with torch_threads():
        torch.manual_seed(seed)
        rng = np.random.default_rng(seed)
        net = space.build_supernet(cfg)
        opt, sched = _optimizer(net, lr, epochs * -(-len(data.train_x) // batch_size))
        x_all, y_all = torch.from_numpy(data.train_x), torch.from_numpy(data.train_y)
        losses: list[float] = []
        start = time.perf_counter()
        net.train()
        for epoch in range(epochs):
            total, count = 0.0, 0
            for idx in _batches(len(x_all), batch_size, rng):
                arch = space.random_arch(rng)
                loss = nn.functional.cross_entropy(net(x_all[idx], arch), y_all[idx])
                _step(net, opt, sched, loss)
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
    with torch.no_grad(), torch_threads():
        for i, idx in enumerate(_batches(len(x_all), batch_size, rng)):
            if i >= batches:
                break
            model(x_all[idx])
    model.eval()


def accuracy(model: nn.Module, x: np.ndarray, y: np.ndarray, batch_size: int = D.EVAL_BATCH_SIZE) -> float:
    """Top-1 accuracy in percent."""
    model.eval()
    correct = 0
    with torch.no_grad(), torch_threads():
        for i in range(0, len(x), batch_size):
            pred = model(torch.from_numpy(x[i : i + batch_size])).argmax(1).numpy()
            correct += int((pred == y[i : i + batch_size]).sum())
    return 100.0 * correct / max(len(y), 1)


def subnet_for(
    supernet, index: int, data: Dataset, bn_recal_batches: int = D.DEFAULT_BN_RECAL_BATCHES, seed: int = D.DEFAULT_SEED
) -> nn.Module:
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
    with torch_threads():
        torch.manual_seed(seed)
        rng = np.random.default_rng(seed)
        net = space.build_supernet(cfg).subnet(index)
        opt, sched = _optimizer(net, lr, epochs * -(-len(data.train_x) // batch_size))
        x_all, y_all = torch.from_numpy(data.train_x), torch.from_numpy(data.train_y)
        net.train()
        for _ in range(epochs):
            for idx in _batches(len(x_all), batch_size, rng):
                _step(net, opt, sched, nn.functional.cross_entropy(net(x_all[idx]), y_all[idx]))
        return accuracy(net, data.val_x, data.val_y)
