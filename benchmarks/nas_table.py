"""NASC table (tabular mode) plus supernet training time and ranking quality, in one run.

Part 1: for 3 links x 3 latency ratios R, the chosen (arch, split) vs baseline (a) (accuracy-best
arch at its best split) and (b) (latency-constrained NAS without splitting); NB201 accuracies from
the shared tables, latencies from nasc's analytic model (default profiles, and an IoT-class device).
Part 2: supernet on digits: training time on CPU; Kendall tau of its estimates (with and without BN
recalibration) against standalone-trained accuracy on a sample and against the NB201 table.

    python benchmarks/nas_table.py [--out results/nas_table.json] [--epochs 10] [--quick]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from nasc.defaults import DEFAULT_DEVICE, DEFAULT_SERVER
from nasc.search.nas import defaults as D
from nasc.search.nas import search as S
from nasc.search.nas.latency_table import build_latency_table, nasc_node_cost
from nasc.search.nas.space import NB201_TABLE_CONFIG, NB201Space, SpaceConfig
from nasc.search.nas.tabular import kendall_tau, load_table
from nasc.types import HardwareProfile

# A Raspberry-Pi-class device, analytic like the defaults: what NASC's setting assumes.
IOT_DEVICE = HardwareProfile(name="iot-class-cpu", peak_gflops=2.0, mem_bandwidth_gbs=2.0, kernel_overhead_us=20.0,
                             source="analytic")


def nasc_table(space, acc, device, int8: bool) -> tuple[list[dict], str]:
    cost, source = nasc_node_cost(device, DEFAULT_SERVER)
    table = build_latency_table(space, NB201_TABLE_CONFIG, cost, source)
    rows = []
    for link in D.TABLE_LINKS:
        scores = table.score(link, int8)
        a = S.baseline_accuracy_best(acc, scores)
        for ratio in D.TABLE_RATIOS:
            budget = ratio * a.latency_ms
            t0 = time.perf_counter()
            c = S.max_accuracy(acc, scores, S.feasible_mask(scores, budget))
            b = S.baseline_no_split(acc, scores, budget)
            seconds = time.perf_counter() - t0
            names = table.structure.cut_names
            rows.append({
                "link": link.name, "ratio": ratio, "budget_ms": budget, "int8": int8,
                "a_arch": a.arch_index, "a_split": names[a.cut_index], "a_acc": a.accuracy, "a_ms": a.latency_ms,
                "chosen_arch": c.arch_index if c else None, "chosen_split": names[c.cut_index] if c else None,
                "chosen_acc": c.accuracy if c else None, "chosen_ms": c.latency_ms if c else None,
                "latency_reduction_pct": 100 * (1 - c.latency_ms / a.latency_ms) if c else None,
                "acc_delta_pt": c.accuracy - a.accuracy if c else None,
                "b_acc": b.accuracy if b else None, "b_split": names[b.cut_index] if b else None,
                "b_ms": b.latency_ms if b else None,
                "search_seconds": seconds, "pairs": int(scores.latency_ms.size),
            })
    return rows, source


def ranking(space, table_acc, epochs: int, sample: int, standalone: int, standalone_epochs: int, seed: int) -> dict:
    from nasc.search.nas import supernet as SN
    from nasc.search.nas.data import load_data

    data = load_data("digits", D.DEFAULT_RESOLUTION, seed=seed)
    cfg = SpaceConfig(D.DEFAULT_CHANNELS, D.DEFAULT_CELLS_PER_STAGE, data.resolution, data.num_classes)
    res = SN.train_supernet(space, cfg, data, epochs, seed=seed)
    rng = np.random.default_rng(seed)
    archs = rng.choice(space.num_archs, size=sample, replace=False)
    t0 = time.perf_counter()
    with_recal = np.array([SN.SupernetEstimator(res.supernet, data, D.DEFAULT_BN_RECAL_BATCHES)(a) for a in archs])
    eval_seconds = (time.perf_counter() - t0) / sample
    no_recal = np.array([SN.SupernetEstimator(res.supernet, data, 0)(a) for a in archs])
    out = {
        "config": {"channels": cfg.channels, "cells_per_stage": cfg.cells_per_stage, "resolution": cfg.resolution,
                   "epochs": epochs, "train_images": int(len(data.train_y)), "val_images": int(len(data.val_y))},
        "train_seconds": res.seconds, "eval_seconds_per_arch": eval_seconds, "sample": int(sample),
        "tau_vs_table_bn_recal": kendall_tau(with_recal, table_acc[archs]),
        "tau_vs_table_no_recal": kendall_tau(no_recal, table_acc[archs]),
    }
    sub = archs[:standalone]
    t0 = time.perf_counter()
    truth = np.array([SN.train_standalone(space, cfg, int(a), data, standalone_epochs, seed=seed) for a in sub])
    out.update({
        "standalone_archs": int(len(sub)), "standalone_epochs": standalone_epochs,
        "standalone_seconds_each": (time.perf_counter() - t0) / max(len(sub), 1),
        "tau_vs_standalone_bn_recal": kendall_tau(with_recal[:standalone], truth),
        "tau_vs_standalone_no_recal": kendall_tau(no_recal[:standalone], truth),
        "tau_standalone_digits_vs_table": kendall_tau(truth, table_acc[sub]),
        "standalone_acc_range": [float(truth.min()), float(truth.max())],
    })
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="results/nas_table.json")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--sample", type=int, default=D.DEFAULT_TAU_SAMPLE)
    p.add_argument("--standalone", type=int, default=8)
    p.add_argument("--standalone-epochs", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="tiny settings, for a smoke run")
    args = p.parse_args()
    if args.quick:
        args.epochs, args.sample, args.standalone, args.standalone_epochs = 1, 8, 3, 1
    space = NB201Space()
    tab = load_table(None, space)
    result = {"accuracy_source": f"{tab.path.name}:{tab.column}", "tables": {}}
    for label, device in (("default-device", DEFAULT_DEVICE), ("iot-device", IOT_DEVICE)):
        for int8 in (False, True):
            rows, source = nasc_table(space, tab.accuracy, device, int8)
            result["tables"][f"{label}{'-int8' if int8 else ''}"] = {"latency_source": source, "rows": rows}
            print(f"\n== {label} payload={'int8' if int8 else 'fp32'}  ({source})")
            print(f"{'link':>12} {'R':>4} {'(a) acc/ms/split':>34} {'chosen acc/ms/split':>36} {'red%':>6} {'dAcc':>6} {'(b) acc/split':>24}")
            for r in rows:
                ch = f"{r['chosen_acc']:.2f}/{r['chosen_ms']:.2f}/{r['chosen_split']}" if r["chosen_arch"] is not None else "infeasible"
                bb = f"{r['b_acc']:.2f}/{r['b_split']}" if r["b_acc"] is not None else "infeasible"
                red = f"{r['latency_reduction_pct']:.1f}" if r["chosen_arch"] is not None else "-"
                da = f"{r['acc_delta_pt']:+.2f}" if r["chosen_arch"] is not None else "-"
                print(f"{r['link']:>12} {r['ratio']:>4} {r['a_acc']:.2f}/{r['a_ms']:.2f}/{r['a_split']:>18} {ch:>36} {red:>6} {da:>6} {bb:>24}")
            print(f"search wall time per (threshold, link): {np.mean([r['search_seconds'] for r in rows]) * 1e3:.1f} ms over {rows[0]['pairs']:,} pairs")
    result["ranking"] = ranking(space, tab.accuracy, args.epochs, args.sample, args.standalone, args.standalone_epochs,
                                D.DEFAULT_SEED)
    print("\n== supernet ranking", json.dumps(result["ranking"], indent=1))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
