"""Supernet ranking quality on CPU: Kendall tau of the supernet's accuracy estimates against
standalone-trained accuracy (a small sample) and against the NB201 table (a larger sample), for
each training recipe, all in one run on digits (NB201 space, C=8, N=2, 16x16).

Standalone training on digits is itself a noisy ground truth (nearly every NB201 arch reaches
97-99%), so the standalone sample is trained with two seeds: tau between the seeds is the most
any estimate can reach against it. The table (CIFAR-10, 200 epochs) is noise-free but measures
another task and skeleton.

    python benchmarks/nas_ranking.py [--out results/nas_ranking.json] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np

from nasc.search.nas import defaults as D
from nasc.search.nas import train as TR
from nasc.search.nas.data import load_digits
from nasc.search.nas.space import NB201Space, SpaceConfig
from nasc.search.nas.tabular import kendall_tau, load_table

# Training recipes compared side by side: the one measured before (10 epochs), the former default
# (30 epochs at lr 0.1) and the current default, the latter with a second supernet seed to show how
# much of a difference in tau is seed noise.
RECIPES = {
    "10 ep, lr 0.1 (measured before)": {"epochs": 10, "lr": 0.1, "seed": 0},
    "30 ep, lr 0.1 (former default)": {"epochs": 30, "lr": 0.1, "seed": 0},
    "default": {"epochs": D.DEFAULT_EPOCHS, "lr": D.DEFAULT_LR, "seed": 0},
    "default, seed 1": {"epochs": D.DEFAULT_EPOCHS, "lr": D.DEFAULT_LR, "seed": 1},
}
TABLE_SAMPLE = 100
STANDALONE_SAMPLE = 10
STANDALONE_EPOCHS = 3
STANDALONE_SEEDS = (0, 1)
QUICK = {"table_sample": 10, "standalone_sample": 3, "standalone_epochs": 1, "epochs": 1}


def estimates(supernet, data, archs, bn_recal_batches: int) -> tuple[np.ndarray, float]:
    est = TR.SupernetEstimator(supernet, data, bn_recal_batches, D.DEFAULT_SEED)
    t0 = time.perf_counter()
    acc = np.array([est(int(a)) for a in archs])
    return acc, (time.perf_counter() - t0) / len(archs)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="results/nas_ranking.json")
    p.add_argument("--quick", action="store_true", help="tiny settings, for a smoke run")
    args = p.parse_args()
    q = QUICK if args.quick else {}
    n_table = q.get("table_sample", TABLE_SAMPLE)
    n_alone = q.get("standalone_sample", STANDALONE_SAMPLE)
    alone_epochs = q.get("standalone_epochs", STANDALONE_EPOCHS)

    space = NB201Space()
    table = load_table(None, space)
    data = load_digits(D.DEFAULT_RESOLUTION, seed=D.DEFAULT_SEED)
    cfg = SpaceConfig(D.DEFAULT_CHANNELS, D.DEFAULT_CELLS_PER_STAGE, data.resolution, data.num_classes)
    archs = np.random.default_rng(D.DEFAULT_SEED).choice(space.num_archs, size=n_table, replace=False)
    # A zero-output cell (2% of the space) scores chance everywhere; ranking the rest is the hard part.
    connected = space.live[archs][:, 3:6].any(axis=1)
    alone = archs[:n_alone]
    truth_table = table.accuracy[archs]

    t0 = time.perf_counter()
    seeds = {s: np.array([TR.train_standalone(space, cfg, int(a), data, alone_epochs, seed=s) for a in alone])
             for s in STANDALONE_SEEDS}
    truth = np.mean([seeds[s] for s in STANDALONE_SEEDS], axis=0)
    result = {
        "setting": {
            "space": space.name, "data": data.name, "channels": cfg.channels, "cells_per_stage": cfg.cells_per_stage,
            "resolution": cfg.resolution, "train_images": int(len(data.train_y)), "val_images": int(len(data.val_y)),
            "torch_threads": D.TORCH_THREADS, "table": f"{table.path.name}:{table.column}",
        },
        "table_sample": int(n_table),
        "table_sample_connected": int(connected.sum()),
        "standalone": {
            "archs": [space.arch_str(int(a)) for a in alone],
            "epochs": alone_epochs,
            "seconds_per_arch_and_seed": (time.perf_counter() - t0) / (len(alone) * len(STANDALONE_SEEDS)),
            "accuracy_by_seed": {str(s): seeds[s].tolist() for s in STANDALONE_SEEDS},
            "tau_between_seeds": kendall_tau(*(seeds[s] for s in STANDALONE_SEEDS)),
            "tau_vs_table": kendall_tau(truth, table.accuracy[alone]),
        },
        "recipes": {},
    }
    print(json.dumps(result["standalone"], indent=1), flush=True)
    for name, r in RECIPES.items():
        epochs = q.get("epochs", r["epochs"])
        res = TR.train_supernet(space, cfg, data, epochs, lr=r["lr"], seed=r["seed"])
        acc, per_arch = estimates(res.supernet, data, archs, D.DEFAULT_BN_RECAL_BATCHES)
        row = {
            **r, "epochs": epochs, "bn_recal_batches": D.DEFAULT_BN_RECAL_BATCHES, "train_seconds": res.seconds,
            "eval_seconds_per_arch": per_arch,
            "tau_vs_table": kendall_tau(acc, truth_table),
            "tau_vs_table_connected": kendall_tau(acc[connected], truth_table[connected]),
            "tau_vs_standalone": kendall_tau(acc[:n_alone], truth),
            "supernet_accuracy_connected": [float(acc[connected].min()), float(np.median(acc[connected])),
                                            float(acc[connected].max())],
        }
        if name == "default":
            no_recal, _ = estimates(res.supernet, data, archs, 0)
            row["tau_vs_table_no_bn_recal"] = kendall_tau(no_recal, truth_table)
        result["recipes"][name] = row
        print(name, json.dumps(row), flush=True)

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    os.replace(tmp, out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
