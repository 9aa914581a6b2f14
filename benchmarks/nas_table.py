"""NASC table (tabular mode): for 3 links x 3 latency ratios R, the chosen (arch, split) vs
baseline (a) (accuracy-best arch at its best split) and (b) (latency-constrained NAS without
splitting); NB201 accuracies from the shared tables, latencies from nasc's analytic model (default
profiles, and an IoT-class device) and, with --device-profile, from kernels measured on this host
(a nasc-profile kernel profile: every term priced by its measured kernels and fitted predictor).
Supernet ranking quality is measured by nas_ranking.py.

    python benchmarks/nas_table.py [--out results/nas_table.json] [--device-profile PROFILE.json]
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
from nasc.search.nas.space import NB201_TABLE_CONFIG, NB201Space
from nasc.search.nas.tabular import load_table
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


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="results/nas_table.json")
    p.add_argument("--device-profile", help="kernel profile of the device (nasc-profile --calibrate -o P.json)")
    args = p.parse_args()
    devices = [("default-device", DEFAULT_DEVICE), ("iot-device", IOT_DEVICE)]
    if args.device_profile:
        from nasc.cli.common import load_profile

        devices.append(("measured-host-device", load_profile(args.device_profile, DEFAULT_DEVICE)))
    space = NB201Space()
    tab = load_table(None, space)
    result = {"accuracy_source": f"{tab.path.name}:{tab.column}", "tables": {}}
    for label, device in devices:
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
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
