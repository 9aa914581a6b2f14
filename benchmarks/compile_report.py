"""Compile-path report: cut counts and verification per model, ResNet-18 nasc-compile wall time,
cross-target artifacts, and the int8 bottleneck's payload ratio and output error.

Run: python benchmarks/compile_report.py [-o benchmarks/results/compile_report.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from nasc.backends import ort
from nasc.compile import compile_model, plan, sample_inputs
from nasc.examples import build
from nasc.partitioner import SPLIT
from nasc.passes import dequantize_tail, quant_params, quantize_head, split_model

MODELS = {  # real architectures at sizes where every cut can be run through ORT quickly
    "resnet18": {"resolution": 224},
    "inception": {"resolution": 64},
    "densenet": {"resolution": 32},
    "mobilenetv2": {"resolution": 96},
    "shufflenet": {"resolution": 64},
    "vit": {"resolution": 32},
}
CALIB, HELD_OUT = 16, 16


def mid_bottleneck(p):
    """The smallest-payload split whose head does 20-80% of the model's MACs."""
    total = max(int(p.analysis.macs.sum()), 1)
    mids = [c for c in p.cuts if c.kind == SPLIT and 0.2 <= c.head_macs / total <= 0.8]
    return min(mids or [c for c in p.cuts if c.kind == SPLIT], key=lambda c: (c.payload_bytes, c.index))


def every_cut(p) -> dict:
    feeds = sample_inputs(p.original, 1)[0]
    ref = ort.run(p.original, feeds)
    worst = 0.0
    for c in p.cuts:
        head, tail = split_model(p.analysis, c)
        outs = {}
        if head is not None:
            outs.update(ort.run(head, feeds))
        if tail is not None:
            outs.update(ort.run(tail, {**feeds, **outs}))
        worst = max(worst, max(float(np.abs(outs[k] - v).max()) for k, v in ref.items()))
    return {"cuts": len(p.cuts), "max_tensors_in_a_cut": max(len(c.tensors) for c in p.cuts),
            "max_abs_error_all_cuts_ort": worst}


def int8(p, per_channel: bool) -> dict:
    c = mid_bottleneck(p)
    head, tail = split_model(p.analysis, c)
    samples = sample_inputs(p.original, CALIB + HELD_OUT, seed=1)
    calib, test = samples[:CALIB], samples[CALIB:]
    vals = [ort.run(head, s) for s in calib]
    qs = [quant_params(t, [v[t] for v in vals], per_channel) for t in c.tensors]
    qh, qt = quantize_head(head, qs), dequantize_tail(tail, qs)
    errs, agree, rel = [], 0, []
    for s in test:
        ref = ort.run(p.original, s)
        wire = ort.run(qh, s)
        got = ort.run(qt, {**s, **wire})
        for k, v in ref.items():
            errs.append(float(np.abs(got[k] - v).max()))
            rel.append(float(np.abs(got[k] - v).max() / max(np.abs(v).max(), 1e-12)))
            agree += int(got[k].argmax() == v.argmax())
    return {"cut": c.index, "tensors": list(c.tensors), "payload_bytes": c.payload_bytes,
            "payload_bytes_int8": c.payload_bytes_int8, "payload_ratio": c.payload_bytes_int8 / c.payload_bytes,
            "max_abs_error": max(errs), "max_rel_error": max(rel), "top1_agreement": agree / len(test),
            "calibration": f"{CALIB} random-normal inputs, evaluated on {HELD_OUT} others"}


def resnet18_cli(tmp: Path) -> dict:
    env = {**os.environ, "COLUMNS": "160"}
    t = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "nasc.cli.compile", "--split", "auto", "-o", str(tmp / "r18"), "--json", "-q"],
                       capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t
    if r.returncode:
        raise SystemExit(r.stderr)
    m = json.loads(r.stdout)["manifest"]
    return {"command": "nasc-compile --split auto -o OUT (bundled ResNet-18, 224x224)", "wall_s": round(wall, 2),
            "chosen": m["split"], "predicted": m["predicted"], "timings_s": m["timings_s"],
            "verification": m["verification"]}


def cross_targets(tmp: Path) -> dict:
    model = build("resnet18")
    c = mid_bottleneck(plan(model))
    out = {}
    for device, server in (("llvm", "cuda:sm_90"), ("aarch64", "cuda:sm_80")):
        t = time.perf_counter()
        m = compile_model(model, tmp / f"{device}-{server}", split=c.index, device_target=device, server_target=server)
        out[f"{device}+{server}"] = {
            "wall_s": round(time.perf_counter() - t, 2), "split": m["split"], "payload_bytes": m["payload_bytes"],
            "files": {f: (tmp / f"{device}-{server}" / f).stat().st_size for f in m["files"]},
            "tvm_max_abs_error": m["verification"]["tvm"]["max_abs_error"], "via": m["verification"]["tvm"]["via"],
        }
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("-o", "--output", default="benchmarks/results/compile_report.json")
    args = ap.parse_args()
    report = {"host": os.uname().machine, "cores": os.cpu_count(), "models": {}}
    for name, kw in MODELS.items():
        t = time.perf_counter()
        p = plan(build(name, **kw))
        entry = {"nodes": len(p.analysis.nodes), "macs": int(p.analysis.macs.sum()), **every_cut(p)}
        entry["int8_per_tensor"] = int8(p, False)
        entry["int8_per_channel"] = int8(p, True)
        entry["seconds"] = round(time.perf_counter() - t, 1)
        report["models"][name] = entry
        print(f"{name:12s} {entry['cuts']:4d} cuts, all-cut ORT err {entry['max_abs_error_all_cuts_ort']:.2e}, "
              f"int8 x{1 / entry['int8_per_tensor']['payload_ratio']:.2f} payload, "
              f"top-1 {entry['int8_per_tensor']['top1_agreement']:.2f}/{entry['int8_per_channel']['top1_agreement']:.2f} "
              f"(tensor/channel), max err {entry['int8_per_tensor']['max_abs_error']:.3g}/{entry['int8_per_channel']['max_abs_error']:.3g}",
              flush=True)
    with tempfile.TemporaryDirectory() as d:
        report["resnet18_cli"] = resnet18_cli(Path(d))
        print(f"nasc-compile --split auto (ResNet-18): {report['resnet18_cli']['wall_s']} s wall", flush=True)
        report["cross_targets"] = cross_targets(Path(d))
        for k, v in report["cross_targets"].items():
            print(f"ResNet-18 cut {v['split']['index']} for {k}: {v['wall_s']} s, files {v['files']}", flush=True)
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
