"""Split quality: the cut `--split auto` chooses against the fastest cut as measured, per latency model.

Measured latency of a cut is head + link transfer of its payload + tail, with both halves timed
by cut_times.py (the host CPU stands in for device and server). For each model, link, compression
and latency model it reports measured(chosen) / measured(oracle) and the share within GOOD_RATIO.

    python benchmarks/split_quality.py [MODELS] [--device-profile P --server-profile P] [--limit-cuts N]
"""

from __future__ import annotations

import cut_times  # noqa: I001  (sets TVM_NUM_THREADS before anything imports tvm)

import argparse  # noqa: E402
import math  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from nasc import defaults  # noqa: E402
from nasc.backends.profile import SUITE_SIZE  # noqa: E402
from nasc.errors import NascError  # noqa: E402
from nasc.types import Link, Prediction  # noqa: E402

# 1 Mbit/s 50 ms, 20 Mbit/s 10 ms, 200 Mbit/s 2 ms
LINKS = ("slow", "wifi", "fast")
COMPRESS = ("none", "int8")
# a choice within 5 % of the fastest measured cut counts as good
GOOD_RATIO = 1.05
RESULTS = Path(__file__).resolve().parent / "results" / f"split_quality_t{cut_times.THREADS}.json"
# the server emulated as the host (1) and as a machine 10x faster than the 2-core host (a GPU
# server is faster still; with equal speeds a split rarely beats running everything on the device)
SERVER_SPEEDUPS = (1.0, 10.0)
# int8 halves add a QuantizeLinear to the head and a DequantizeLinear to the tail; the timed
# halves are the float ones, so int8 changes only the payload here.
INT8_NOTE = "int8: float halves timed (quantize/dequantize of the cut tensors not included); payload is the int8 one"


def measured_ms(rec: dict, link: Link, compress: str) -> float:
    """End-to-end milliseconds of one measured cut: device-only sends nothing, server-only the raw input."""
    if rec["kind"] == "device-only":
        return rec["head_ms"]
    payload = rec["payload_bytes_int8"] if compress == "int8" and rec["kind"] == "split" else rec["payload_bytes"]
    return rec["head_ms"] + float(link.transfer_ms(payload)) + rec["tail_ms"]


def measured_prediction(rec: dict, link: Link, compress: str) -> Prediction:
    """A measured cut as a Prediction: what a perfect latency model would predict."""
    transfer = measured_ms(rec, link, compress) - rec["head_ms"] - rec["tail_ms"]
    return Prediction(rec["head_ms"], transfer, rec["tail_ms"])


def evaluate(cuts: list, preds: list[Prediction], records: dict[int, dict], link: Link, compress: str) -> dict:
    """The `--split auto` choice among the measured cuts vs the measured fastest: one case's row.

    `records` maps cut index -> cut_times record; cuts without a record are left out of both.
    """
    from nasc.search.choose import choose_fastest

    pos = [i for i, c in enumerate(cuts) if c.index in records]
    if not pos:
        raise NascError("split quality: no measured cuts for this model; run benchmarks/cut_times.py first")
    ms = {i: measured_ms(records[cuts[i].index], link, compress) for i in pos}
    chosen = pos[choose_fastest([cuts[i] for i in pos], [preds[i] for i in pos])]
    oracle = min(pos, key=lambda i: (ms[i], cuts[i].index))
    return {
        "chosen": {"index": cuts[chosen].index, "kind": cuts[chosen].kind, "measured_ms": round(ms[chosen], 4),
                   "predicted_ms": round(preds[chosen].total_ms, 4)},
        "oracle": {"index": cuts[oracle].index, "kind": cuts[oracle].kind, "measured_ms": round(ms[oracle], 4)},
        "ratio": ms[chosen] / ms[oracle] if ms[oracle] > 0 else 1.0,
        "cuts_compared": len(pos),
    }


def latency_models(device_profile: str | None, server_profile: str | None) -> dict:
    """Named latency models, built the way the CLI builds them.

    `analytic` is the default of `--split auto` (an H100-class server); `analytic-host-server`
    gives the server the device's profile, since the host CPU runs the tails here. Explicit
    profiles add `profile`; `predicted` and `measured` are added per model (see model_cases).
    """
    from nasc.cli.common import latency_model, load_profile

    dev, srv = defaults.DEFAULT_DEVICE, defaults.DEFAULT_SERVER
    models = {
        "analytic": latency_model(load_profile(None, dev), load_profile(None, srv)),
        "analytic-host-server": latency_model(load_profile(None, dev), load_profile(None, dev)),
    }
    if device_profile or server_profile:
        models["profile"] = latency_model(load_profile(device_profile, dev), load_profile(server_profile, srv))
    return models


def kernel_models(name: str, p, suite_size: int | None) -> dict:
    """`predicted` (suite-fitted predictor only), `in_place` (the model's kernels timed in place: the
    measured mode), `replayed` (its halves replayed too) and `standalone` (its kernels timed alone),
    as in latency_model.py, for the model planned as `p`."""
    if not suite_size:
        return {}
    import latency_model as LM

    from nasc.backends.targets import resolve_target
    from nasc.partitioner.cuts import half_masks

    target = resolve_target("llvm")
    return LM.kernel_models(name, p.analysis, target, LM.suite_profile(target, suite_size), half_masks(p.cuts))


def model_cases(name: str, doc: dict, lms: dict, suite_size: int | None = None, speedups=SERVER_SPEEDUPS) -> list[dict]:
    """Every (server speed, link, compress, latency model) case of one model with measured cut times `doc`.

    With speedup S the server is emulated as S times faster than the host: measured tails and
    the tails predicted by every model that prices the host (all but `analytic`) are divided by S.
    """
    from nasc.compile import plan
    from nasc.search.latency import predict

    p = plan(cut_times.build_model(name))
    lms = {**lms, **kernel_models(name, p, suite_size)}
    by_id = {cut_times.cut_id(r["kind"], r["tensors"]): r for r in doc["cuts"]}
    records = {c.index: by_id[cut_times.cut_id(c.kind, c.tensors)] for c in p.cuts if cut_times.cut_id(c.kind, c.tensors) in by_id}
    cases = []
    for speedup in speedups:
        scaled = {i: {**r, "tail_ms": r["tail_ms"] / speedup} for i, r in records.items()}
        for link_name in LINKS:
            link = defaults.LINK_PRESETS[link_name]
            for compress in COMPRESS:
                for lm_name, lm in lms.items():
                    preds = predict(p.analysis, p.cuts, lm, link, compress=compress == "int8")
                    if lm_name != "analytic":
                        preds = [Prediction(q.device_ms, q.transfer_ms, q.server_ms / speedup) for q in preds]
                    row = evaluate(p.cuts, preds, scaled, link, compress)
                    cases.append({"model": name, "server_speedup": speedup, "link": link_name, "bandwidth_mbit": link.bandwidth_mbit,
                                  "rtt_ms": link.rtt_ms, "compress": compress, "latency_model": lm_name, **row})
    return cases


def _stats(ratios: list[float]) -> dict:
    return {"cases": len(ratios), "share_within_good_ratio": sum(r <= GOOD_RATIO for r in ratios) / len(ratios),
            "geomean_ratio": math.exp(sum(math.log(r) for r in ratios) / len(ratios)), "max_ratio": max(ratios)}


def summarize(cases: list[dict]) -> dict:
    """Per latency model: cases, share with ratio <= GOOD_RATIO, geometric-mean and worst ratio (also per server speed)."""
    out = {}
    for lm in dict.fromkeys(c["latency_model"] for c in cases):
        mine = [c for c in cases if c["latency_model"] == lm]
        out[lm] = _stats([c["ratio"] for c in mine])
        speeds = dict.fromkeys(c.get("server_speedup", 1.0) for c in mine)
        if len(speeds) > 1:
            out[lm]["by_server_speedup"] = {f"{s:g}x": _stats([c["ratio"] for c in mine if c.get("server_speedup", 1.0) == s])
                                            for s in speeds}
    return out


def _table(cases: list[dict], lm_names: list[str]) -> Table:
    t = Table(title="chosen / oracle measured latency (oracle: fastest measured cut)", title_justify="left")
    for col in ("model", "server", "link", "compress", "oracle cut", "oracle ms"):
        t.add_column(col, justify="right" if "ms" in col or "cut" in col else "left")
    for lm in lm_names:
        t.add_column(f"{lm}: cut", justify="right")
        t.add_column("ratio", justify="right")
    keyed = {}
    for c in cases:
        keyed.setdefault((c["model"], c["server_speedup"], c["link"], c["compress"]), {})[c["latency_model"]] = c
    for (model, speedup, link, compress), row in keyed.items():
        first = next(iter(row.values()))
        cells = [model, f"{speedup:g}x", link, compress, f"{first['oracle']['index']} {first['oracle']['kind']}", f"{first['oracle']['measured_ms']:.2f}"]
        for lm in lm_names:
            c = row[lm]
            style = "" if c["ratio"] <= GOOD_RATIO else "[red]"
            cells += [f"{c['chosen']['index']} {c['chosen']['kind']}", f"{style}{c['ratio']:.2f}"]
        t.add_row(*cells)
    return t


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("models", nargs="*", default=list(cut_times.MODELS), help="models (default: all configured)")
    ap.add_argument("--device-profile", metavar="P", help="nasc-profile JSON (or hardware profile) for the device side")
    ap.add_argument("--server-profile", metavar="P", help="the same for the server side (the host runs both here)")
    ap.add_argument("--target", default="llvm", help="target the halves are timed on (default llvm)")
    ap.add_argument("--limit-cuts", type=int, metavar="N", help="measure at most N cuts per model (quick runs)")
    ap.add_argument("--cached-only", action="store_true", help="use the cut-times caches as they are; measure nothing")
    ap.add_argument("--cache-dir", type=Path, default=cut_times.CACHE_DIR)
    ap.add_argument("-o", "--output", type=Path, default=RESULTS)
    ap.add_argument("--suite", type=int, default=SUITE_SIZE, metavar="N",
                    help="calibration-suite size for the predicted/measured models, the latency benchmark's by default "
                         "(see latency_model.py; 0: leave them out)")
    ap.add_argument("--server-speedup", default=",".join(f"{x:g}" for x in SERVER_SPEEDUPS),
                    help="comma-separated: emulate the server as S times faster than the host")
    args = ap.parse_args(argv)
    out = Console(width=200)
    try:
        lms = latency_models(args.device_profile, args.server_profile)
        cases, coverage = [], {}
        for name in args.models:
            cache = cut_times.cache_file(name, args.cache_dir)
            if args.cached_only and not cache.exists():
                raise NascError(f"--cached-only: no cut times for {name} at {cache}; run benchmarks/cut_times.py {name}")
            doc = cut_times.measure_cut_times(name, args.target, cache,
                                              0 if args.cached_only else args.limit_cuts,
                                              log=lambda msg: out.print(msg, highlight=False))
            coverage[name] = {"cuts_measured": len(doc["cuts"]), "cuts_total": doc["cuts_total"], "config": doc["config"],
                              "whole_model_ms": doc["whole_model"]["ms"]}
            cases += model_cases(name, doc, lms, args.suite, [float(x) for x in args.server_speedup.split(",")])
    except NascError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    summary = summarize(cases)
    out.print(_table(cases, list(dict.fromkeys(c["latency_model"] for c in cases))))
    for lm, s in summary.items():
        out.print(f"{lm:22s} {s['share_within_good_ratio'] * 100:5.1f}% of {s['cases']} cases within {GOOD_RATIO:.2f}x "
                  f"of the oracle; geomean {s['geomean_ratio']:.3f}x, worst {s['max_ratio']:.2f}x", highlight=False)
        for speed, t in s.get("by_server_speedup", {}).items():
            out.print(f"{'':22s}   server {speed:>4s}: {t['share_within_good_ratio'] * 100:5.1f}% within, geomean "
                      f"{t['geomean_ratio']:.3f}x, worst {t['max_ratio']:.2f}x", highlight=False)
    partial = [n for n, c in coverage.items() if c["cuts_measured"] < c["cuts_total"]]
    if partial:
        out.print(f"[yellow]partial:[/] only the measured cuts are compared for {', '.join(partial)}")
    doc = {"format": "nasc-split-quality/1", "server_stand_in": cut_times.STAND_IN, "device_stand_in": cut_times.STAND_IN,
           "good_ratio": GOOD_RATIO, "int8": INT8_NOTE, "server_speedups": args.server_speedup,
           "links": {n: {"bandwidth_mbit": defaults.LINK_PRESETS[n].bandwidth_mbit, "rtt_ms": defaults.LINK_PRESETS[n].rtt_ms} for n in LINKS},
           "latency_models": {**{n: lm.source for n, lm in lms.items()},
                              "predicted": "kernel predictor fitted on the calibration suite only (models held out)",
                              "in_place": "each model's kernels timed in place in the compiled whole model, suite predictor for broken parts",
                              "replayed": "in_place, each half scaled by its kernels replayed alone in that model",
                              "standalone": "each model's own kernels measured standalone, suite predictor for broken parts"},
           "profiles": {"device": args.device_profile, "server": args.server_profile},
           "models": coverage, "summary": summary, "cases": cases}
    cut_times.write_atomic(args.output, doc)
    out.print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
