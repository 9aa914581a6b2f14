"""Accuracy-vs-latency plot of a search: every arch at its fastest cut, the budget, the picks."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def plot_search(path: Path, acc: np.ndarray, best_latency_ms: np.ndarray, picks: dict, budget_ms: float | None,
                title: str) -> bool:
    """Write a PNG to `path`; False (and no file) when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    known = ~np.isnan(acc)
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    ax.scatter(best_latency_ms[known], acc[known], s=4, c="0.7", label="archs (fastest split)", rasterized=True)
    if budget_ms is not None and np.isfinite(budget_ms):
        ax.axvline(budget_ms, color="tab:red", ls="--", lw=1, label=f"budget {budget_ms:.2f} ms")
    markers = {"chosen": ("*", "tab:red", 160), "baseline (a)": ("o", "tab:blue", 60), "baseline (b)": ("s", "tab:green", 50)}
    for name, p in picks.items():
        if p is not None:
            m, c, size = markers.get(name, ("x", "k", 40))
            ax.scatter([p.latency_ms], [p.accuracy], marker=m, c=c, s=size, label=name, zorder=3)
    ax.set_xscale("log")
    ax.set_xlabel("end-to-end latency [ms] (nasc latency model)")
    ax.set_ylabel("accuracy [%]")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True
