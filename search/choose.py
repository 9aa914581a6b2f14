"""Choose a cut: minimum predicted end-to-end latency under an optional device-memory limit."""

from __future__ import annotations

import numpy as np

from nasc.errors import CutError
from nasc.partitioner.cuts import Cut
from nasc.search.pareto import pareto_front
from nasc.types import Prediction


def choose_fastest(cuts: list[Cut], preds: list[Prediction], device_memory_bytes: int | None = None) -> int:
    """Position (in `cuts`) of the fastest cut whose device peak memory fits the limit.

    Ties go to the smaller payload, then the lower index, so the choice is deterministic.
    """
    fits = [i for i, c in enumerate(cuts) if device_memory_bytes is None or c.device_peak_memory_bytes <= device_memory_bytes]
    if not fits:
        least = min(cuts, key=lambda c: c.device_peak_memory_bytes)
        raise CutError(
            f"--device-memory {device_memory_bytes}: no cut fits; the smallest device footprint is "
            f"{least.device_peak_memory_bytes} bytes (cut {least.index}, {least.label})"
        )
    return min(fits, key=lambda i: (round(preds[i].total_ms, 9), cuts[i].payload_bytes, cuts[i].index))


def pareto_cuts(cuts: list[Cut], preds: list[Prediction]) -> list[int]:
    """LMOS: positions of the cuts on the (total latency, device memory) Pareto front."""
    pts = np.array([[p.total_ms, c.device_peak_memory_bytes] for c, p in zip(cuts, preds)])
    return [int(i) for i in pareto_front(pts)]
