"""NASC: choose architecture and split point together; LMOS: Pareto front of latency and memory.

Accuracies are an (A,) array (NaN = not estimated); latencies come from `Scores` (A, K). All
selection rules are vectorised over every (arch, cut) pair; ties go to the lower arch index.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from nasc.errors import NascError
from nasc.search.nas import defaults as D
from nasc.search.nas.latency_table import Scores
from nasc.search.pareto import pareto_front


@dataclass(frozen=True)
class Pick:
    """One (arch, cut) decision with its predicted cost."""

    arch_index: int
    cut_index: int
    accuracy: float
    latency_ms: float
    device_ms: float
    transfer_ms: float
    server_ms: float
    payload_bytes: int
    device_memory_bytes: int


def make_pick(acc: np.ndarray, s: Scores, a: int, k: int) -> Pick:
    return Pick(
        int(a), int(k), float(acc[a]), float(s.latency_ms[a, k]), float(s.device_ms[a, k]),
        float(s.transfer_ms[a, k]), float(s.server_ms[a, k]), int(s.payload_bytes[k]),
        int(s.device_memory_bytes[a, k]),
    )


def feasible_mask(
    s: Scores, budget_ms: float = np.inf, memory_limit_bytes: float = np.inf, cuts: np.ndarray | None = None
) -> np.ndarray:
    """(A, K) pairs meeting the latency budget, the device-memory limit and the allowed cuts."""
    ok = (s.latency_ms <= budget_ms) & (s.device_memory_bytes <= memory_limit_bytes)
    if cuts is not None:
        allowed = np.zeros(ok.shape[1], dtype=bool)
        allowed[cuts] = True
        ok &= allowed
    return ok


def _fastest(s: Scores, ok: np.ndarray) -> np.ndarray:
    """(A,) cut of least latency among the feasible ones of each arch."""
    return np.where(ok, s.latency_ms, np.inf).argmin(axis=1)


def max_accuracy(acc: np.ndarray, s: Scores, ok: np.ndarray) -> Pick | None:
    """Most accurate arch with a feasible cut, at its fastest feasible cut (ties: lower latency)."""
    k = _fastest(s, ok)
    rows = np.arange(len(acc))
    lat = s.latency_ms[rows, k]
    valid = ok[rows, k] & ~np.isnan(acc)
    if not valid.any():
        return None
    order = np.lexsort((lat, -np.where(valid, acc, -np.inf)))
    a = int(order[0])
    return make_pick(acc, s, a, int(k[a]))


def min_latency(acc: np.ndarray, s: Scores, ok: np.ndarray, min_accuracy: float) -> Pick | None:
    """Converse NASC: the fastest feasible pair whose arch reaches `min_accuracy` (ties: more accurate)."""
    good = ok & (np.nan_to_num(acc, nan=-np.inf) >= min_accuracy)[:, None]
    if not good.any():
        return None
    lat = np.where(good, s.latency_ms, np.inf)
    k = lat.argmin(axis=1)
    rows = np.arange(len(acc))
    order = np.lexsort((-np.nan_to_num(acc, nan=-np.inf), lat[rows, k]))
    a = int(order[0])
    return make_pick(acc, s, a, int(k[a]))


def end_cuts(s: Scores) -> np.ndarray:
    """Cuts of a model that is not split: server-only (0) and device-only (K-1)."""
    return np.array([0, s.latency_ms.shape[1] - 1])


def baseline_accuracy_best(acc: np.ndarray, s: Scores) -> Pick:
    """(a) Neurosurgeon-style: the most accurate arch, split at its fastest point."""
    p = max_accuracy(acc, s, np.ones_like(s.latency_ms, dtype=bool))
    if p is None:
        raise NascError("no architecture has an accuracy estimate")
    return p


def baseline_no_split(acc: np.ndarray, s: Scores, budget_ms: float, memory_limit_bytes: float = np.inf) -> Pick | None:
    """(b) Latency-constrained NAS that ignores splitting: all on the device or all on the server."""
    return max_accuracy(acc, s, feasible_mask(s, budget_ms, memory_limit_bytes, end_cuts(s)))


# --------------------------------------------------------------------------- LMOS Pareto

PARETO_OBJECTIVES = ("latency_ms", "device_memory_bytes", "payload_bytes", "accuracy")


def _objectives(acc: np.ndarray, s: Scores, with_payload: bool) -> np.ndarray:
    cols = [s.latency_ms, s.device_memory_bytes]
    if with_payload:
        cols.append(np.broadcast_to(s.payload_bytes, s.latency_ms.shape))
    cols.append(np.broadcast_to(-np.nan_to_num(acc, nan=-np.inf)[:, None], s.latency_ms.shape))
    return np.stack(cols, axis=-1)  # (A, K, M), all minimised


@dataclass(frozen=True)
class ParetoFront:
    """Non-dominated (arch, cut) pairs over PARETO_OBJECTIVES (payload optional)."""

    arch_index: np.ndarray
    cut_index: np.ndarray
    objectives: tuple[str, ...]


def pareto_pairs(acc: np.ndarray, s: Scores, with_payload: bool = True) -> ParetoFront:
    """LMOS front over every (arch, cut) pair whose arch has an accuracy estimate.

    Within one arch the accuracy is constant, so pairs dominated inside their own arch are
    dropped first (vectorised over archs); the global sweep then sees a few per arch.
    """
    obj = _objectives(acc, s, with_payload)
    known = np.flatnonzero(~np.isnan(acc))
    o = obj[known]  # (a, K, M)
    le = np.all(o[:, None, :, :] <= o[:, :, None, :], axis=3)  # le[a, i, j]: cut j <= cut i
    lt = np.any(o[:, None, :, :] < o[:, :, None, :], axis=3)
    dominated = np.any(le & lt, axis=2)
    a_idx, k_idx = np.nonzero(~dominated)
    arch = known[a_idx]
    rows = pareto_front(obj[arch, k_idx])
    names = tuple(n for n in PARETO_OBJECTIVES if with_payload or n != "payload_bytes")
    return ParetoFront(arch[rows], k_idx[rows], names)


def pick_from_front(
    acc: np.ndarray, s: Scores, front: ParetoFront, memory_limit_bytes: float = np.inf, budget_ms: float = np.inf
) -> Pick:
    """LMOS pick rule: among front pairs within the device-memory limit (and latency budget),
    the most accurate; ties go to lower latency, then lower memory."""
    a, k = front.arch_index, front.cut_index
    mem, lat = s.device_memory_bytes[a, k], s.latency_ms[a, k]
    ok = (mem <= memory_limit_bytes) & (lat <= budget_ms)
    if not ok.any():
        raise NascError(
            f"no Pareto point fits device memory <= {memory_limit_bytes:.0f} B and latency <= {budget_ms:.3f} ms "
            f"(smallest device memory on the front: {mem.min():.0f} B, least latency: {lat.min():.3f} ms)"
        )
    i = np.flatnonzero(ok)
    best = i[np.lexsort((mem[i], lat[i], -acc[a[i]]))[0]]
    return make_pick(acc, s, int(a[best]), int(k[best]))


# --------------------------------------------------------------------------- evolution


def evolve(
    space,
    estimate: Callable[[int], float],
    allowed: np.ndarray,
    rng: np.random.Generator,
    population: int = D.DEFAULT_EVO_POPULATION,
    sample: int = D.DEFAULT_EVO_SAMPLE,
    cycles: int = D.DEFAULT_EVO_CYCLES,
    progress: Callable[[int, int], None] | None = None,
) -> None:
    """Regularised evolution (Real et al. 2019) over the archs marked `allowed` (A,).

    Fitness is `estimate(arch)` (memoised by the caller); mutants outside `allowed` are redrawn
    from the allowed set, so every evaluation is spent on a feasible candidate.
    """
    pool = np.flatnonzero(allowed)
    if not len(pool):
        return
    alive = [int(a) for a in rng.choice(pool, size=min(population, len(pool)), replace=False)]
    scores = [estimate(a) for a in alive]
    for c in range(cycles):
        pick = rng.choice(len(alive), size=min(sample, len(alive)), replace=False)
        parent = alive[max(pick, key=lambda i: scores[i])]
        child = space.mutate(parent, rng)
        if not allowed[child]:
            child = int(rng.choice(pool))
        alive.append(child)
        scores.append(estimate(child))
        alive.pop(0)
        scores.pop(0)
        if progress:
            progress(c + 1, cycles)
