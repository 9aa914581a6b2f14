"""Re-price the cuts a `nasc-profile --json` run measured, with this nasc's latency model.

A GPU may be lent for minutes: its kernel times and measured halves are kept as JSON
(results/cuda_profile_h100.json: per-kernel times, per-cut measured head and tail) and read
again here, offline, whenever the way halves are composed from kernels changes. Kernels are
matched to the model by signature; in-place times by the model's key (the profile file, -o).

  python benchmarks/cuda_profile.py [--results results/cuda_profile_h100.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from nasc.backends.profile import CALL_KEY, KernelProfile
from nasc.compile import plan
from nasc.defaults import DEFAULT_DEVICE, DEFAULT_SERVER
from nasc.examples import build
from nasc.search.latency import DEVICE, SERVER, AnalyticLatencyModel, MeasuredLatencyModel, half_ms

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cpu_schedules import IMAGE_PX, write_json  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "cuda_profile_h100.json"
KERNELS = Path(__file__).resolve().parent / "results" / "h100_resnet18_kernels.json"
# the models as nasc-profile measured them (ImageNet-sized examples)
SOURCES = {"resnet18": lambda: build("resnet18", resolution=IMAGE_PX),
           "inception": lambda: build("inception", resolution=IMAGE_PX, classes=1000)}


def reprice(name: str, summary: dict, contexts: dict) -> dict:
    """{in_context_ms, from_kernels_ms: accuracy} of the measured halves, priced again."""
    a = plan(SOURCES[name]()).analysis
    kernels = {k["signature"]: k["ms"] for k in summary["kernels"]}
    kernels[CALL_KEY] = summary["call_overhead_ms"]
    models = {"from_kernels_ms": KernelProfile({}, kernels, {}, None)}
    from nasc.backends.context import model_key

    if model_key(a.model) in contexts:
        models["in_context_ms"] = KernelProfile({}, kernels, {}, None, contexts=contexts)
    analytic = AnalyticLatencyModel(DEFAULT_DEVICE, DEFAULT_SERVER)
    cuts = {c.index: c for c in plan(SOURCES[name]()).cuts}
    errors: dict[str, list[float]] = {k: [] for k in models}
    for row in summary["cuts"]:
        mask = cuts[row["index"]].head_mask[None, :]
        for half, side_mask, side in (("head", mask, DEVICE), ("tail", ~mask, SERVER)):
            if half not in row:
                continue
            row[half] = {k: v for k, v in row[half].items() if not k.endswith("_now")}
            for k, prof in models.items():
                lm = MeasuredLatencyModel(analytic, prof, prof)
                ms = float(half_ms(lm, a, side_mask, side)[0]) + kernels[CALL_KEY]
                row[half][f"{k}_now"] = ms
                errors[k].append(100.0 * (ms - row[half]["measured_ms"]) / row[half]["measured_ms"])
    return {k: {"halves": len(e), "mape_pct": float(np.mean(np.abs(e))), "within_10pct": float(np.mean(np.abs(e) <= 10))}
            for k, e in errors.items()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--results", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    doc = json.loads(args.results.read_text())
    contexts = json.loads(KERNELS.read_text()).get("contexts", {}) if KERNELS.is_file() else {}
    for name, summary in doc["models"].items():
        summary["accuracy_now"] = reprice(name, summary, contexts)
        for k, acc in summary["accuracy_now"].items():
            print(f"{name:10s} {k:16s} MAPE {acc['mape_pct']:6.1f}%  within ±10%: {acc['within_10pct'] * 100:.0f}% "
                  f"({acc['halves']} halves)")
    write_json(args.results, doc)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
