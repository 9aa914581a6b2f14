"""Pareto fronts over cut (or architecture x cut) objectives, all minimised (LMOS)."""

from __future__ import annotations

import numpy as np

# Rows compared per block: (chunk x front x objectives) booleans stay small.
_CHUNK = 2048


def pareto_front(points: np.ndarray, chunk: int = _CHUNK) -> np.ndarray:
    """Indices (ascending) of the non-dominated rows of `points` (n x k, every column minimised).

    A row is dominated when another is <= in every column and < in one; of equal rows the
    first is kept. After a stable lexicographic sort a row can only be dominated by a row
    before it, so one sweep in chunks does it: hundreds of thousands of rows take seconds.
    """
    p = np.asarray(points, np.float64)
    if p.ndim != 2:
        raise ValueError("points must be 2-D")
    order = np.lexsort(tuple(p[:, i] for i in reversed(range(p.shape[1]))))
    sp = p[order]
    front = np.empty((0, p.shape[1]))
    kept: list[np.ndarray] = []
    for start in range(0, len(sp), chunk):
        c = sp[start:start + chunk]
        dead = np.zeros(len(c), bool)
        if len(front):
            dead = np.any(np.all(front[None, :, :] <= c[:, None, :], axis=2), axis=1)
        earlier = np.all(c[None, :, :] <= c[:, None, :], axis=2)  # [i, j]: row j <= row i
        earlier &= np.tri(len(c), k=-1, dtype=bool)                # only rows sorted before i
        earlier &= ~dead[None, :]
        dead |= earlier.any(axis=1)
        kept.append(start + np.flatnonzero(~dead))
        front = np.concatenate([front, c[~dead]])
    return np.sort(order[np.concatenate(kept)]) if kept else np.empty(0, np.int64)
