"""`run_search`: the whole NASC loop behind `nasc-search`, as one documented Python call.

Estimate accuracies (supernet or table), score every (arch, cut) pair on the link, pick under the
constraint, compare with the baselines, export the chosen subnet with its split, write the
output directory atomically.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np

from nasc.errors import NascError
from nasc.search.nas import defaults as D
from nasc.search.nas import search as S
from nasc.search.nas.latency_table import LatencyTable, Scores, build_latency_table, nasc_node_cost
from nasc.search.nas.space import NB201_TABLE_CONFIG, SPACES, SpaceConfig, get_space
from nasc.types import HardwareProfile, Link

if TYPE_CHECKING:
    from nasc.backends.profile import KernelProfile

OBJECTIVES = ("accuracy", "pareto")
ONNX_FILE = "chosen.onnx"
REPORT_FILE = "search.json"
PLOT_FILE = "accuracy_vs_latency.png"
ORT_TOLERANCE = 1e-3


@dataclass(frozen=True)
class SearchSettings:
    """Everything one search needs; defaults are the small CPU setting."""

    link: Link
    space: str = "nb201"
    data: str = "digits"
    latency_budget_ms: float | None = None
    latency_budget_ratio: float | None = None
    min_accuracy: float | None = None
    objective: str = "accuracy"
    memory_limit_bytes: float | None = None
    tabular: str | None = None
    epochs: int = D.DEFAULT_EPOCHS
    channels: int = D.DEFAULT_CHANNELS
    cells_per_stage: int = D.DEFAULT_CELLS_PER_STAGE  # NB201 cells, or mbv2 searchable blocks, per stage
    resolution: int | None = None
    int8: bool = False
    seed: int = D.DEFAULT_SEED
    evo_cycles: int = D.DEFAULT_EVO_CYCLES
    evo_population: int = D.DEFAULT_EVO_POPULATION
    bn_recal_batches: int = D.DEFAULT_BN_RECAL_BATCHES
    # A HardwareProfile (analytic) or a KernelProfile from nasc-profile (measured kernels) per side.
    device_profile: HardwareProfile | KernelProfile | None = None
    server_profile: HardwareProfile | KernelProfile | None = None

    def check(self) -> None:
        if self.space not in SPACES:
            raise NascError(f"unknown search space {self.space!r}; known: {', '.join(sorted(SPACES))}")
        if self.objective not in OBJECTIVES:
            raise NascError(f"objective {self.objective!r}: expected one of {', '.join(OBJECTIVES)}")
        given = [x is not None for x in (self.latency_budget_ms, self.latency_budget_ratio, self.min_accuracy)]
        if sum(given) > 1:
            raise NascError("give at most one of --latency-budget, --latency-budget-ratio, --min-accuracy")
        if self.objective == "accuracy" and not any(given):
            raise NascError("give --latency-budget MS, --latency-budget-ratio R or --min-accuracy A")
        for name in ("latency_budget_ms", "latency_budget_ratio", "memory_limit_bytes"):
            v = getattr(self, name)
            if v is not None and not v > 0:
                raise NascError(f"{name.replace('_', '-')} must be positive, got {v}")


@dataclass
class SearchReport:
    settings: dict
    chosen: dict
    baseline: dict
    baseline_no_split: dict | None
    budget_ms: float | None
    latency_source: str
    accuracy_source: str
    pairs_scored: int
    archs_estimated: int
    search_seconds: float
    scoring_seconds: float
    train_seconds: float | None
    latency_reduction_pct: float
    accuracy_delta_pt: float
    pareto: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        return asdict(self)


def _settings_json(settings: SearchSettings) -> dict:
    """The settings as JSON; a kernel profile is named by its file and what it holds, not dumped whole."""
    from nasc.backends.profile import KernelProfile

    out = {}
    for f in fields(settings):
        v = getattr(settings, f.name)
        if isinstance(v, KernelProfile):
            v = {"kernel_profile": v.path, "kernels": len(v.kernels), "target": v.target}
        elif is_dataclass(v):
            v = asdict(v)
        out[f.name] = v
    return out


def pick_json(p: S.Pick | None, space, table: LatencyTable, split_tensor: str | None = None) -> dict | None:
    if p is None:
        return None
    d = asdict(p)
    d.update(arch=space.arch_str(p.arch_index), split=table.structure.cut_names[p.cut_index])
    if split_tensor is not None:
        d["split_tensor"] = split_tensor
    return d


def _estimate_all(settings, space, table: LatencyTable, scores: Scores, estimator, rng, progress) -> np.ndarray:
    """Accuracies of the archs the evolution visits (NaN elsewhere): unconstrained for baseline (a),
    then under the budget with and without splitting."""
    A = space.num_archs
    runs = [("unconstrained", np.ones(A, dtype=bool))]
    budget = _budget(settings, None)
    if budget is not None or settings.memory_limit_bytes is not None:
        mem = settings.memory_limit_bytes or np.inf
        b = budget if budget is not None else np.inf
        runs.append(("split", S.feasible_mask(scores, b, mem).any(axis=1)))
        runs.append(("no split", S.feasible_mask(scores, b, mem, S.end_cuts(scores)).any(axis=1)))
    for name, allowed in runs:
        S.evolve(space, estimator, allowed, rng, population=settings.evo_population, cycles=settings.evo_cycles,
                 progress=(lambda c, n, name=name: progress("evolution " + name, c, n)) if progress else None)
    if settings.latency_budget_ratio is not None:
        # The budget depends on baseline (a), known only now: search under it too.
        acc = _acc_array(A, estimator.cache)
        a = S.baseline_accuracy_best(acc, scores)
        b = settings.latency_budget_ratio * a.latency_ms
        mem = settings.memory_limit_bytes or np.inf
        for name, cuts in (("split", None), ("no split", S.end_cuts(scores))):
            allowed = S.feasible_mask(scores, b, mem, cuts).any(axis=1)
            S.evolve(space, estimator, allowed, rng, population=settings.evo_population, cycles=settings.evo_cycles,
                     progress=(lambda c, n, name=name: progress("evolution " + name, c, n)) if progress else None)
    return _acc_array(A, estimator.cache)


def _acc_array(n: int, cache: dict[int, float]) -> np.ndarray:
    acc = np.full(n, np.nan)
    if cache:
        idx = np.fromiter(cache.keys(), dtype=int)
        acc[idx] = np.fromiter(cache.values(), dtype=float)
    return acc


def _budget(settings: SearchSettings, baseline: S.Pick | None) -> float | None:
    if settings.latency_budget_ms is not None:
        return settings.latency_budget_ms
    if settings.latency_budget_ratio is not None and baseline is not None:
        return settings.latency_budget_ratio * baseline.latency_ms
    return None


def write_dir_atomically(out_dir: Path, write: Callable[[Path], None]) -> None:
    """Fill a fresh temp dir next to `out_dir`, then rename it into place (replacing an old one)."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it owner-only; the output is an ordinary folder
    try:
        write(tmp)
        if out_dir.exists():
            old = out_dir.with_name(f".{out_dir.name}.old.{os.getpid()}")
            os.replace(out_dir, old)
            os.replace(tmp, out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def run_search(
    settings: SearchSettings, out_dir: str | Path, progress: Callable[[str, int, int], None] | None = None
) -> SearchReport:
    """Search architecture and split together; write chosen.onnx, search.json and the plot to `out_dir`.

    Raises NascError for bad settings, unreadable data, or a budget nothing meets.
    """
    settings.check()
    rng = np.random.default_rng(settings.seed)
    notes: list[str] = []
    supernet = data = None
    train_seconds = None
    t_search = time.perf_counter()
    if settings.tabular is not None:
        if settings.space != "nb201":
            raise NascError(f"tabular mode needs the nb201 space, not {settings.space!r}")
        from nasc.search.nas.tabular import load_table

        cfg = NB201_TABLE_CONFIG
        space = get_space(settings.space, cfg)
        tab = load_table(settings.tabular or None, space)
        accuracy_source = f"table {tab.path.name}:{tab.column} (NB201 C=16 N=5, CIFAR-10)"
        notes.append("tabular mode: chosen.onnx has the chosen architecture with seeded untrained weights")
    else:
        from nasc.search.nas import train as TR
        from nasc.search.nas.data import load_data

        data = load_data(settings.data, settings.resolution, seed=settings.seed)
        cfg = SpaceConfig(settings.channels, settings.cells_per_stage, data.resolution, data.num_classes)
        space = get_space(settings.space, cfg)
        result = TR.train_supernet(
            space, cfg, data, settings.epochs, seed=settings.seed,
            progress=(lambda e, n, _loss: progress("supernet training", e, n)) if progress else None,
        )
        supernet, train_seconds = result.supernet, result.seconds
        accuracy_source = (
            f"supernet ({data.name}, {settings.epochs} epochs, uniform single-path, "
            f"BN recalibration {settings.bn_recal_batches} batches), validation accuracy"
        )
    t0 = time.perf_counter()
    cost, source = nasc_node_cost(settings.device_profile, settings.server_profile)
    table = build_latency_table(space, cfg, cost, source)
    scores = table.score(settings.link, settings.int8)
    scoring_seconds = time.perf_counter() - t0
    if supernet is not None:
        estimator = TR.SupernetEstimator(supernet, data, settings.bn_recal_batches, settings.seed)
        acc = _estimate_all(settings, space, table, scores, estimator, rng, progress)
    else:
        acc = tab.accuracy

    base_a = S.baseline_accuracy_best(acc, scores)
    budget = _budget(settings, base_a)
    mem = settings.memory_limit_bytes if settings.memory_limit_bytes is not None else np.inf
    front = None
    if settings.objective == "pareto":
        front = S.pareto_pairs(acc, scores)
        chosen = S.pick_from_front(acc, scores, front, mem, budget if budget is not None else np.inf)
    elif settings.min_accuracy is not None:
        chosen = S.min_latency(acc, scores, S.feasible_mask(scores, memory_limit_bytes=mem), settings.min_accuracy)
        if chosen is None:
            raise NascError(f"no architecture reaches accuracy >= {settings.min_accuracy} (best: {np.nanmax(acc):.2f})")
    else:
        chosen = S.max_accuracy(acc, scores, S.feasible_mask(scores, budget, mem))
        if chosen is None:
            fastest = float(np.nanmin(np.where(np.isnan(acc)[:, None], np.inf, scores.latency_ms)))
            raise NascError(f"no (architecture, split) meets latency <= {budget:.3f} ms (fastest: {fastest:.3f} ms)")
    base_b = S.baseline_no_split(acc, scores, budget if budget is not None else np.inf, mem)
    search_seconds = time.perf_counter() - t_search - (train_seconds or 0.0)

    model, split_tensor = _export_chosen(space, cfg, chosen, supernet, data, settings)
    chosen_json = pick_json(chosen, space, table, split_tensor)
    chosen_json["device_memory_bytes_partitioner"] = partitioner_device_memory(model, chosen)
    report = SearchReport(
        settings=_settings_json(settings),
        chosen=chosen_json,
        baseline=pick_json(base_a, space, table),
        baseline_no_split=pick_json(base_b, space, table),
        budget_ms=budget,
        latency_source=table.source,
        accuracy_source=accuracy_source,
        pairs_scored=int(scores.latency_ms.size),
        archs_estimated=int(np.sum(~np.isnan(acc))),
        search_seconds=search_seconds,
        scoring_seconds=scoring_seconds,
        train_seconds=train_seconds,
        latency_reduction_pct=100.0 * (1.0 - chosen.latency_ms / base_a.latency_ms),
        accuracy_delta_pt=chosen.accuracy - base_a.accuracy,
        pareto=[pick_json(S.make_pick(acc, scores, a, k), space, table) for a, k in
                zip(front.arch_index, front.cut_index)] if front is not None else [],
        notes=notes,
    )

    def write(tmp: Path) -> None:
        import onnx

        from nasc.search.nas.plot import plot_search

        onnx.save(model, str(tmp / ONNX_FILE))
        best = scores.latency_ms.min(axis=1)
        title = f"{space.name} on {settings.link.bandwidth_mbit:g} Mbit/s, {settings.link.rtt_ms:g} ms RTT ({table.source})"
        plot_search(tmp / PLOT_FILE, acc, best, {"chosen": chosen, "baseline (a)": base_a, "baseline (b)": base_b},
                    budget, title)
        (tmp / REPORT_FILE).write_text(json.dumps(report.to_json(), indent=2, default=float) + "\n")

    write_dir_atomically(Path(out_dir), write)
    return report


def partitioner_device_memory(model, chosen: S.Pick) -> int:
    """Device peak memory nasc's partitioner computes for the annotated cut of the exported model.

    The table uses the partitioner's definition (weights of the head + peak live activations in
    execution order), so the two agree exactly; the exporter merging equal weight tensors can only
    make the partitioner's figure smaller. A larger one means the table under-counts: a bug.
    """
    from nasc.compile import plan

    got = plan(model, split="annotated").cut.device_peak_memory_bytes
    if got > chosen.device_memory_bytes:
        raise NascError(
            f"internal: the partitioner puts the chosen cut at {got} device bytes, the latency table at "
            f"{chosen.device_memory_bytes}; the table under-counts device memory (please report)"
        )
    return int(got)


def _export_chosen(space, cfg: SpaceConfig, chosen: S.Pick, supernet, data, settings: SearchSettings):
    """ONNX of the chosen subnet with `nasc.split` set, checked against torch through ORT."""
    import torch

    from nasc.search.nas import supernet as SN
    from nasc.search.nas import train as TR
    from nasc.search.nas.export import export_subnet, run_onnx, split_metadata

    if supernet is not None:
        net = TR.subnet_for(supernet, chosen.arch_index, data, settings.bn_recal_batches, settings.seed)
        weights = "inherited from the supernet, BN recalibrated"
    else:
        torch.manual_seed(settings.seed)
        net = SN.distinct_weights(space.build_supernet(cfg).subnet(chosen.arch_index), settings.seed).eval()
        weights = "seeded random (tabular mode: accuracy from the table)"
    model, tensors = export_subnet(
        net, cfg.input_shape,
        {"nasc.arch": space.arch_str(chosen.arch_index), "nasc.space": space.name, "nasc.weights": weights},
    )
    split = split_metadata(chosen.cut_index, len(net.blocks), tensors)
    from nasc.search.nas.export import set_metadata

    set_metadata(model, D.SPLIT_METADATA_KEY, split)
    x = np.random.default_rng(settings.seed).standard_normal(cfg.input_shape).astype(np.float32)
    with torch.no_grad():
        want = net(torch.from_numpy(x)).numpy()
    got = run_onnx(model, x)
    err = float(np.max(np.abs(got - want)))
    if not err <= ORT_TOLERANCE * max(1.0, float(np.max(np.abs(want)))):
        raise AssertionError(f"exported subnet differs from torch by {err}")
    return model, split
