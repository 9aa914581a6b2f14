"""ORT vs nasc's default schedules vs MetaSchedule-tuned nasc, side by side in one run, 2 threads.

Each model (ImageNet-sized ResNet-18, MobileNetV2, Inception style) is tuned whole into a fresh
database under a time budget; tuning starts from the default schedules, measured first. Then
the whole model and its heads at three cuts are compiled both ways and timed interleaved with
ORT on the same graph; ratios are ORT_ms / nasc_ms (above 1: nasc is faster), the median over
rounds of back-to-back pairs, so load that drifts between rounds cancels.

Run: python benchmarks/tuning.py [--budget-s 600] [--only resnet18] [-o benchmarks/results/tuning.json]
"""

from __future__ import annotations

import os

THREADS = 2
# TVM's thread pool reads this once, at first use: set it before tvm is imported.
os.environ["TVM_NUM_THREADS"] = str(THREADS)

import argparse  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import onnxruntime as rt  # noqa: E402

from nasc.backends import tuning  # noqa: E402
from nasc.backends import tvm as tvm_backend  # noqa: E402
from nasc.backends.targets import resolve_target  # noqa: E402
from nasc.compile import plan, sample_inputs  # noqa: E402
from nasc.partitioner import DEVICE_ONLY  # noqa: E402
from nasc.passes import split_model  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cpu_schedules import IMAGE_PX, MODELS, heads, paired_ratio, sample_ms, write_json  # noqa: E402

BUDGET_S = 600.0              # tuning time per model; the goal allows 20 minutes
TRIALS_PER_KERNEL = 64        # more than the budget reaches: the budget ends each run
TIME_SHARE = 0.9              # search the kernels making up 90% of the measured default time
ROUNDS = 7
ATOL = 1e-3
RESULTS = Path(__file__).resolve().parent / "results" / "tuning.json"


def _graphs(model) -> tuple:
    """(prepared whole model, [(label, graph)]): the whole model for ORT, and heads at cpu_schedules.HEAD_FRACTIONS."""
    p = plan(model, split=DEVICE_ONLY)
    whole, _ = split_model(p.analysis, p.cut)
    return whole, [("whole", whole)] + heads(p)


def _runners(graph, target, db, feeds):
    """ORT, default-schedule and tuned callables for one graph, each checked against ORT."""
    so = rt.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads = THREADS, 1
    sess = rt.InferenceSession(graph.SerializeToString(), so, providers=["CPUExecutionProvider"])
    ins = [i.name for i in graph.graph.input]
    outs = [o.name for o in graph.graph.output]
    want = dict(zip(outs, sess.run(outs, feeds)))
    runs = {"ort": lambda: sess.run(outs, feeds)}
    errors = {}
    for kind, database in (("default", None), ("tuned", tuning.open_database(db, target))):
        runner = tvm_backend.Runner(tvm_backend.compile_model(graph, target, database=database), "cpu", ins, outs)
        got = runner(feeds)
        errors[kind] = max(float(np.abs(got[n] - want[n]).max()) for n in outs)
        scale = max(1.0, max(float(np.abs(w).max()) for w in want.values()))
        assert errors[kind] <= ATOL * scale, f"{kind} TVM differs from ORT by {errors[kind]}"
        runs[kind] = lambda r=runner: r(feeds)
    return runs, errors


def bench(name: str, model, budget_s: float, target, rounds: int, time_share: float) -> dict:
    whole, graphs = _graphs(model)
    with tempfile.TemporaryDirectory() as db:
        report = tuning.tune(whole, target, db, trials=TRIALS_PER_KERNEL, time_budget_s=budget_s, where=name,
                             time_share=time_share)
        kernels = [k for k in report.kernels if k.default_s and k.best_s]
        default_sum = sum(k.default_s * k.weight for k in kernels)
        tuned_sum = sum(k.best_s * k.weight for k in kernels)
        rows = []
        for label, graph in graphs:
            feeds = sample_inputs(graph, 1)[0]
            runs, errors = _runners(graph, target, db, feeds)
            cover = tuning.kernel_coverage(graph, target, db)
            samples = {k: [] for k in runs}
            for _ in range(rounds):
                for k, run in runs.items():
                    samples[k].append(sample_ms(run))
            ratio = lambda k: paired_ratio(samples["ort"], samples[k])  # noqa: E731
            row = {"graph": label, **{f"{k}_ms": round(min(v), 3) for k, v in samples.items()},
                   "ort_over_default": round(ratio("default"), 3), "ort_over_tuned": round(ratio("tuned"), 3),
                   "kernels_tuned": len(cover["tuned"]), "kernels_untuned": len(cover["untuned"]),
                   "max_abs_err_vs_ort": errors}
            rows.append(row)
            print(f"{name:12s} {label:9s} ORT {row['ort_ms']:8.2f} ms  default {row['default_ms']:8.2f} ms "
                  f"({row['ort_over_default']:.2f}x)  tuned {row['tuned_ms']:8.2f} ms ({row['ort_over_tuned']:.2f}x)  "
                  f"kernels tuned {row['kernels_tuned']}/{row['kernels_tuned'] + row['kernels_untuned']}", flush=True)
    return {
        "model": name, "tune_budget_s": budget_s, "time_share": time_share, "tune_s": round(report.elapsed_s, 1),
        "trials_measured": report.trials_measured, "stopped": report.stopped,
        "kernels": len(report.kernels), "kernels_deferred": sum(1 for k in report.kernels if k.deferred),
        "kernels_searched": sum(1 for k in report.kernels if k.trials > 1),
        "kernel_sum_default_ms": round(default_sum * 1e3, 3), "kernel_sum_tuned_ms": round(tuned_sum * 1e3, 3),
        "graphs": rows,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--budget-s", type=float, default=BUDGET_S, help="tuning time per model (default %(default)s)")
    ap.add_argument("--only", nargs="*", choices=sorted(MODELS), help="these models only")
    ap.add_argument("--rounds", type=int, default=ROUNDS)
    ap.add_argument("--time-share", type=float, default=TIME_SHARE, help="as nasc-tune --time-share")
    ap.add_argument("-o", "--output", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    target = resolve_target("llvm")
    results = []
    for name in args.only or list(MODELS):
        results.append(bench(name, MODELS[name](), args.budget_s, target, args.rounds, args.time_share))
        r = results[-1]
        print(f"{name}: tuned {r['tune_s']:.0f} s, {r['trials_measured']} trials ({r['stopped']}), "
              f"{r['kernels_deferred']}/{r['kernels']} kernels kept their defaults; "
              f"kernel sum {r['kernel_sum_default_ms']:.2f} -> {r['kernel_sum_tuned_ms']:.2f} ms", flush=True)
    out = {"target": target.spec, "host_cpu": tuning.host_cpu_model(), "threads": THREADS, "image_px": IMAGE_PX,
           "ratio": "ORT_ms / nasc_ms, median of back-to-back pairs", "models": results}
    write_json(args.output, out)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
