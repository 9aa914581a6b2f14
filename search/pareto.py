"""Pareto fronts over cut (or architecture) objectives, all minimised (LMOS)."""

from __future__ import annotations

import numpy as np


def pareto_front(points: np.ndarray) -> np.ndarray:
    """Indices of the non-dominated rows of `points` (n x k, every column minimised), ascending.

    A row is dominated when another is <= in every column and < in one. Ties (equal rows)
    keep the first. O(n^2 k) in numpy, fine for thousands of cuts.
    """
    p = np.asarray(points, np.float64)
    if p.ndim != 2:
        raise ValueError("points must be 2-D")
    n = len(p)
    keep = np.ones(n, bool)
    for i in range(n):
        if not keep[i]:
            continue
        le = np.all(p <= p[i], axis=1)
        lt = np.any(p < p[i], axis=1)
        dominated_by = le & lt
        same = np.all(p == p[i], axis=1)
        same[: i + 1] = False
        if dominated_by.any():
            keep[i] = False
        keep &= ~same
    return np.flatnonzero(keep)
