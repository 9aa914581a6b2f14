"""`nasc-profile`: measure kernels on a target, fit the kernel-time predictor, check per-cut predictions."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from rich.table import Table

from nasc.cli.common import command, stdout_write
from nasc.errors import NascError

DEFAULT_CHECKED_CUTS = 6
PROFILE_IN_DB = "profile.json"
# how each checked half is predicted, and how the report names it
PREDICTIONS = {"in_context_ms": "from this model's kernels timed in place (measured mode)",
               "from_kernels_ms": "from this model's kernels timed standalone",
               "from_predictor_ms": "from the predictor fitted before them (predicted mode)"}


def build_parser() -> argparse.ArgumentParser:
    from nasc.backends.profile import SUITE_SIZE

    p = argparse.ArgumentParser(prog="nasc-profile", description="Measure the kernels of a model (and/or a sampled "
                                "calibration suite) on a target with TVM's time_evaluator, fit the kernel-time predictor "
                                "the search uses for unseen kernels, and compare per-cut head and tail times predicted "
                                "from kernels with whole halves measured.")
    p.add_argument("model", nargs="?", help="ONNX file or example:NAME (optional with --calibrate)")
    p.add_argument("--target", default="llvm", help="target that runs on this machine (default llvm)")
    p.add_argument("-o", "--output", metavar="PROFILE.json", help="write (or extend) a kernel profile for "
                   "nasc-compile --device-profile/--server-profile")
    p.add_argument("--db", metavar="DIR", help="nasc-tune database: measure tuned kernels, and keep the profile in DIR "
                   "(nasc-compile --tuning-db DIR then uses it) unless -o is given")
    p.add_argument("--calibrate", nargs="?", type=int, const=-1, metavar="N",
                   help=f"also measure N sampled standalone kernels (default {SUITE_SIZE}) so the predictor covers "
                   "every kernel class")
    p.add_argument("--cuts", type=int, default=DEFAULT_CHECKED_CUTS, help="how many cuts to compile and measure as whole "
                   "heads and tails (0: none)")
    p.add_argument("--replay", action="store_true", help="also replay each cut's head and tail alone in the compiled "
                   "model and scale its kernels by how much faster they ran there (off: every half at its kernels' "
                   "times in the whole model)")
    p.add_argument("--input-shape", action="append", default=[], metavar="NAME=DIMS")
    p.add_argument("--json", action="store_true")
    p.add_argument("-q", "--quiet", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    return command(build_parser(), _run, argv)


def checked_cuts(cuts, k: int):
    """k split cuts spread evenly over the model, plus the whole model (device-only)."""
    if k <= 0:
        return []
    splits = [c for c in cuts if c.kind == "split"]
    picks = [splits[int(i)] for i in np.linspace(0, len(splits) - 1, min(k, len(splits)))] if splits else []
    return list(dict.fromkeys(picks + [cuts[-1]]))


def profile_path(args, target) -> Path | None:
    if args.output:
        return Path(args.output)
    if args.db:
        from nasc.backends.tuning import db_path

        return db_path(args.db, target) / PROFILE_IN_DB
    return None


def _existing(path: Path | None, target) -> dict:
    if path is None or not path.exists():
        return {}
    try:
        doc = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise NascError(f"{path}: not valid JSON ({e}); remove it or pick another -o") from None
    from nasc.backends.profile import PROFILE_FORMAT

    # another target's kernels, or kernels timed the way an older nasc did, are measured afresh
    return doc if doc.get("target") == target.to_json() and doc.get("format") == PROFILE_FORMAT else {}


def _run(args, out) -> int:
    from nasc.backends import profile as prof
    from nasc.backends.targets import resolve_target
    from nasc.backends.tuning import open_database

    if not args.model and args.calibrate is None:
        raise NascError("give a MODEL to profile, or --calibrate to measure the calibration suite")
    target = resolve_target(args.target)
    if not target.runs_here():
        raise NascError(f"--target {target.name}: cannot run on this machine; profile on the device itself")
    path = profile_path(args, target)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
    old = _existing(path, target)
    kernels = {k: float(v) for k, v in old.get("kernels", {}).items()}
    features = dict(old.get("features", {}))
    contexts = dict(old.get("contexts", {}))
    models = set(old.get("models", []))
    database = open_database(args.db, target) if args.db else None
    summary: dict = {"target": target.to_json(), "tuning_db": str(args.db) if args.db else None}
    with out.status("loading") as status:
        if args.calibrate is not None:
            size = prof.SUITE_SIZE if args.calibrate < 0 else args.calibrate
            kernels, suite_features = prof.measure_suite(target, size, known=kernels, log=status.update, database=database)
            features.update(suite_features)
            models.add(f"calibration-suite:{size}")
            summary["calibration_kernels"] = len(suite_features)
        if args.model:
            summary.update(_profile_model(args, target, kernels, features, contexts, database, status, out))
            models.add(summary["model"])
    doc = None
    if path is not None:
        doc = prof.save_profile(path, target, kernels, features, {"models": sorted(models)}, contexts)
        fitted = (doc.get("predictor") or {}).get("samples", {})
        out.print(f"wrote {path}: {len(kernels) - 1} kernels, predictor fitted on "
                  + (", ".join(f"{v} {k}" for k, v in sorted(fitted.items())) or "nothing (too few kernels)")
                  + (" (nasc-compile --tuning-db uses it)" if not args.output else " (use with nasc-compile --device-profile)"))
        summary["profile"] = str(path)
        summary["predictor_samples"] = fitted
    if args.json:
        stdout_write(json.dumps(summary, indent=2))
    return 0


def _profile_model(args, target, kernels: dict, features: dict, contexts: dict, database, status, out) -> dict:
    """Measure the model's kernels standalone into `kernels`/`features` (the predictor's data) and in place
    into `contexts` (the measured mode); measure the checked cuts and predict them all three ways."""
    from nasc.backends import profile as prof
    from nasc.backends.context import measure_in_context, model_key
    from nasc.backends.profile import KernelProfile
    from nasc.backends.tvm import time_model_ms
    from nasc.compile import plan
    from nasc.defaults import DEFAULT_DEVICE, DEFAULT_SERVER
    from nasc.partitioner import parse_shape
    from nasc.partitioner.cuts import half_masks
    from nasc.passes import extract_head, extract_tail
    from nasc.search.latency import DEVICE, SERVER, AnalyticLatencyModel, MeasuredLatencyModel, half_ms

    p = plan(args.model, input_shapes=dict(parse_shape(s) for s in args.input_shape), log=status.update)
    a = p.analysis
    analytic = AnalyticLatencyModel(DEFAULT_DEVICE, DEFAULT_SERVER)
    # predicted mode: the predictor fitted before this model's kernels were measured (held out)
    prior = prof.fit_profile_predictor(kernels, features)
    before = MeasuredLatencyModel(analytic, *[KernelProfile({}, {prof.CALL_KEY: kernels.get(prof.CALL_KEY, 0.0)}, {}, prior)] * 2) if prior else None
    kernels.update(prof.measure_kernels(a, target, kernels, log=status.update, database=database))
    features.update(prof.kernel_features(a, prof.channel_block(target), prof.vector_spec(target)))
    status.update("timing every kernel in place")
    key = model_key(a.model)
    contexts[key] = measure_in_context(a, target, database=database, log=status.update, halves=half_masks(p.cuts),
                                       replay=args.replay)
    standalone = KernelProfile({}, kernels, features, None)
    in_place = KernelProfile({}, kernels, features, None, contexts={key: contexts[key]})
    models = {"in_context_ms": MeasuredLatencyModel(analytic, in_place, in_place),
              "from_kernels_ms": MeasuredLatencyModel(analytic, standalone, standalone)}
    if before is not None:
        models["from_predictor_ms"] = before
    call = kernels[prof.CALL_KEY]
    rows = []
    for c in checked_cuts(p.cuts, args.cuts):
        mask = c.head_mask[None, :]
        row = {"index": c.index, "kind": c.kind, "tensors": list(c.tensors)}
        for half, side_mask, extract, side in (("head", mask, extract_head, DEVICE), ("tail", ~mask, extract_tail, SERVER)):
            if not side_mask.any():
                continue
            status.update(f"measuring {half} of cut {c.index}")
            r = {"measured_ms": time_model_ms(extract(a, c), target, database=database)}
            for k, lm in models.items():
                r[k] = float(half_ms(lm, a, side_mask, side)[0]) + call
            row[half] = r
        rows.append(row)
    groups = prof.kernel_groups(a)
    kernel_rows = [{"signature": g.signature, "ops": "+".join(a.nodes[i].op_type for i in g.nodes),
                    "nodes": [a.nodes[i].name for i in g.nodes], "ms": kernels[g.signature]} for g in groups]
    summary = {"model": p.source_name, "call_overhead_ms": call, "kernels": kernel_rows,
               "kernel_sum_ms": float(sum(r["ms"] for r in kernel_rows)), "cuts": rows,
               "whole_model_in_context_ms": contexts[key]["whole_ms"],
               "accuracy": {k: _accuracy(rows, k) for k in PREDICTIONS if _accuracy(rows, k)}}
    _print_model(out, p.source_name, target, groups, summary)
    return summary


def _accuracy(rows: list[dict], key: str) -> dict | None:
    errs = [100.0 * (h[key] - h["measured_ms"]) / h["measured_ms"] for r in rows for h in (r.get("head"), r.get("tail"))
            if h and key in h and h["measured_ms"] > 0]
    if not errs:
        return None
    e = np.abs(errs)
    return {"halves": len(e), "mape_pct": float(e.mean()), "within_10pct": float((e <= 10).mean())}


def _print_model(out, name: str, target, groups, summary: dict) -> None:
    t = Table(title=f"{name} on {target.name}: {len(groups)} kernels ({len({g.signature for g in groups})} distinct), "
              f"sum {summary['kernel_sum_ms']:.2f} ms", title_justify="left")
    for col in ("cut", "sends", "half", "measured ms", "in place", "standalone", "predictor"):
        t.add_column(col, justify="left" if col in ("sends", "half") else "right")
    for r in summary["cuts"]:
        sends = r["kind"] if r["kind"] != "split" else ", ".join(r["tensors"][:3])
        for half in ("head", "tail"):
            h = r.get(half)
            if h is None:
                continue
            cells = [f"{h['measured_ms']:.3f}"]
            for k in PREDICTIONS:
                cells.append(f"{h[k]:.3f} ({100 * (h[k] - h['measured_ms']) / h['measured_ms']:+.0f}%)" if k in h else "-")
            t.add_row(str(r["index"]), sends, half, *cells)
    out.print(t)
    for k, label in PREDICTIONS.items():
        acc = summary["accuracy"].get(k)
        if acc:
            out.print(f"halves predicted {label}: MAPE {acc['mape_pct']:.1f}%, {acc['within_10pct'] * 100:.0f}% within ±10% "
                      f"({acc['halves']} halves)")


if __name__ == "__main__":
    raise SystemExit(main())
