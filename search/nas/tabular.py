"""Tabular mode: NB201 accuracies read from the benchmark CSVs (never copied into the repo).

The row order of every NB201 file is the NB201 arch index; `load_table` checks each row's arch
string against the space, so a reordered or foreign file fails loudly instead of mislabelling.
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from nasc.errors import NascError
from nasc.search.nas import defaults as D


@dataclass(frozen=True)
class AccuracyTable:
    accuracy: np.ndarray  # (A,) percent, row = arch index
    path: Path
    column: str


def find_data_dir(hint: str | Path | None = None) -> Path:
    """The NB201 data folder: `hint`, $NASC_NB201_DATA, or ../shared/data near cwd or the repo."""
    if hint:
        h = Path(hint)
        if h.is_file() or (h / D.NB201_DEFAULT_TABLE).is_file():
            return h
        raise NascError(f"{h}: no NB201 table there (expected a CSV or a folder with {D.NB201_DEFAULT_TABLE}); not found")
    candidates = []
    if os.environ.get(D.NB201_DATA_ENV):
        candidates.append(Path(os.environ[D.NB201_DATA_ENV]))
    repo = Path(__file__).resolve().parents[2]
    for rel in D.NB201_DATA_RELATIVE:
        candidates += [Path.cwd() / rel, repo / rel]
    for c in candidates:
        if c.is_file() or (c / D.NB201_DEFAULT_TABLE).is_file():
            return c
    raise NascError(
        f"NB201 tables not found (tried {', '.join(str(c) for c in candidates)}); "
        f"pass --tabular PATH or set {D.NB201_DATA_ENV}"
    )


def load_table(spec: str | Path | None, space) -> AccuracyTable:
    """Accuracy per arch from `PATH[:COLUMN]` (a CSV or a folder holding the default CSV)."""
    text = str(spec) if spec else ""
    column = None
    if ":" in text and not Path(text).exists():
        text, column = text.rsplit(":", 1)
    base = find_data_dir(text or None)
    path = base if base.is_file() else base / D.NB201_DEFAULT_TABLE
    arch_col, default_col = D.NB201_TABLE_COLUMNS.get(path.name, ("arch_str", None))
    column = column or default_col
    try:
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
    except OSError as e:
        raise NascError(f"{path}: cannot read NB201 table ({e})") from None
    if not rows or column not in rows[0] or arch_col not in rows[0]:
        raise NascError(f"{path}: needs columns {arch_col!r} and {column!r}; has {list(rows[0]) if rows else []}")
    if len(rows) != space.num_archs:
        raise NascError(f"{path}: {len(rows)} rows, the {space.name} space has {space.num_archs} archs")
    for i in (0, len(rows) // 2, len(rows) - 1):
        if rows[i][arch_col] != space.arch_str(i):
            raise NascError(f"{path}: row {i} is {rows[i][arch_col]!r}, arch {i} is {space.arch_str(i)!r}")
    try:
        acc = np.array([float(r[column]) for r in rows])
    except ValueError as e:
        raise NascError(f"{path}: column {column!r} is not numeric ({e})") from None
    return AccuracyTable(acc, path, column)


def kendall_tau(x, y) -> float:
    """Kendall's tau-b (ties in either ranking handled), O(n^2) in numpy."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    dx = np.sign(x[:, None] - x[None, :])
    dy = np.sign(y[:, None] - y[None, :])
    iu = np.triu_indices(len(x), k=1)
    dx, dy = dx[iu], dy[iu]
    denom = np.sqrt(np.sum(dx != 0) * np.sum(dy != 0))
    return float(np.sum(dx * dy) / denom) if denom else float("nan")
