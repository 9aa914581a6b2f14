"""`nasc-profile`: measure every kernel of a model on a target; check per-cut predictions."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from rich.table import Table

from nasc.cli.common import command, stdout_write
from nasc.errors import NascError

DEFAULT_CHECKED_CUTS = 6


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="nasc-profile", description="Measure the kernels of a model on a target (TVM "
                                "time_evaluator) and compare per-cut head times predicted from them with measured heads.")
    p.add_argument("model", help="ONNX file or example:NAME")
    p.add_argument("--target", default="llvm", help="target that runs on this machine (default llvm)")
    p.add_argument("-o", "--output", metavar="PROFILE.json", help="write (or extend) a kernel profile for --device-profile")
    p.add_argument("--cuts", type=int, default=DEFAULT_CHECKED_CUTS, help="how many cuts to compile and measure as whole heads")
    p.add_argument("--input-shape", action="append", default=[], metavar="NAME=DIMS")
    p.add_argument("--json", action="store_true")
    p.add_argument("-q", "--quiet", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    return command(build_parser(), _run, argv)


def checked_cuts(cuts, k: int):
    """k split cuts spread evenly over the model, plus the whole model (device-only)."""
    splits = [c for c in cuts if c.kind == "split"]
    picks = [splits[int(i)] for i in np.linspace(0, len(splits) - 1, min(k, len(splits)))] if splits else []
    return list(dict.fromkeys(picks + [cuts[-1]]))


def _run(args, out) -> int:
    from nasc.backends.profile import CALL_KEY, kernel_groups, measure_kernels, node_ms_from_kernels, save_profile, time_model_ms
    from nasc.backends.targets import resolve_target
    from nasc.compile import plan
    from nasc.partitioner import parse_shape
    from nasc.passes import extract_head

    target = resolve_target(args.target)
    if not target.runs_here():
        raise NascError(f"--target {target.name}: cannot run on this machine; profile on the device itself")
    known = {}
    if args.output and Path(args.output).exists():
        doc = json.loads(Path(args.output).read_text())
        if doc.get("target") == target.to_json():
            known = doc.get("kernels", {})
    with out.status("loading") as status:
        p = plan(args.model, input_shapes=dict(parse_shape(s) for s in args.input_shape), log=status.update)
        a = p.analysis
        kernels = measure_kernels(a, target, known, log=status.update)
        node_ms, _ = node_ms_from_kernels(a, kernels)
        rows = []
        for c in checked_cuts(p.cuts, args.cuts):
            status.update(f"measuring head of cut {c.index}")
            predicted = float(node_ms[c.head_mask].sum()) + kernels[CALL_KEY]
            measured = time_model_ms(extract_head(a, c), target)
            rows.append({"index": c.index, "kind": c.kind, "tensors": list(c.tensors), "predicted_ms": predicted,
                         "measured_ms": measured, "error_pct": 100.0 * (predicted - measured) / measured})
    groups = kernel_groups(a)
    kernel_rows = [{"signature": g.signature, "ops": "+".join(a.nodes[i].op_type for i in g.nodes),
                    "nodes": [a.nodes[i].name for i in g.nodes], "ms": kernels[g.signature]} for g in groups]
    errs = np.abs([r["error_pct"] for r in rows])
    summary = {"model": p.source_name, "target": target.to_json(), "call_overhead_ms": kernels[CALL_KEY], "kernels": kernel_rows,
               "kernel_sum_ms": float(sum(r["ms"] for r in kernel_rows)), "cuts": rows,
               "mape_pct": float(errs.mean()), "within_10pct": float((errs <= 10).mean())}
    if args.output:
        save_profile(Path(args.output), target, kernels, {"models": sorted({p.source_name} | set(json.loads(Path(args.output).read_text()).get("models", []) if Path(args.output).exists() else []))})
    t = Table(title=f"{p.source_name} on {target.name}: {len(groups)} kernels ({len(set(g.signature for g in groups))} distinct), sum {summary['kernel_sum_ms']:.2f} ms", title_justify="left")
    for col in ("cut", "sends", "predicted ms", "measured ms", "error"):
        t.add_column(col, justify="left" if col == "sends" else "right")
    for r in rows:
        t.add_row(str(r["index"]), r["kind"] if r["kind"] != "split" else ", ".join(r["tensors"][:3]),
                  f"{r['predicted_ms']:.3f}", f"{r['measured_ms']:.3f}", f"{r['error_pct']:+.1f}%")
    out.print(t)
    out.print(f"head time predicted from measured kernels: MAPE {summary['mape_pct']:.1f}%, "
              f"{summary['within_10pct'] * 100:.0f}% of cuts within ±10%")
    if args.output:
        out.print(f"wrote {args.output} (use it with nasc-compile --device-profile)")
    if args.json:
        stdout_write(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
