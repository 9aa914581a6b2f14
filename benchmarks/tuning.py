"""ORT vs untuned TVM vs MetaSchedule-tuned TVM on this CPU, side by side in one run, 2 threads.

Each model is tuned into a fresh DB under a per-model time budget; the report gives the tuning
time and ORT_ms / nasc_ms for the untuned and tuned libraries (above 1: nasc is faster).

Run: python benchmarks/tuning.py [--budget-s 420] [-o benchmarks/results/tuning.json]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

THREADS = 2
os.environ["TVM_NUM_THREADS"] = str(THREADS)

import numpy as np  # noqa: E402
import onnxruntime as rt  # noqa: E402

from nasc.backends import tuning  # noqa: E402
from nasc.backends import tvm as tvm_backend  # noqa: E402
from nasc.backends.targets import resolve_target  # noqa: E402
from nasc.cli.tune import model_to_tune  # noqa: E402
from nasc.compile import sample_inputs  # noqa: E402

MODELS = {"resnet18": "example:resnet18", "resnet8": "example:resnet8"}
DEFAULT_BUDGET_S = {"resnet18": 540.0, "resnet8": 240.0}   # keeps the whole run near 20 minutes
TRIALS_PER_KERNEL = 32
WARMUP, REPEATS = 3, 20
ATOL = 1e-3


def _median_ms(fn, feeds) -> float:
    for _ in range(WARMUP):
        fn(feeds)
    times = []
    for _ in range(REPEATS):
        t = time.perf_counter()
        fn(feeds)
        times.append((time.perf_counter() - t) * 1e3)
    return float(np.median(times))


def _ort_session(model):
    so = rt.SessionOptions()
    so.intra_op_num_threads = THREADS
    so.inter_op_num_threads = 1
    return rt.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def _tvm_runner(model, target, db):
    ex = tvm_backend.compile_model(model, target, database=tuning.open_database(db, target) if db else None)
    ins = [i.name for i in model.graph.input if i.name not in {t.name for t in model.graph.initializer}]
    return tvm_backend.Runner(ex, "cpu", ins, [o.name for o in model.graph.output])


def bench(name: str, source: str, budget_s: float, target) -> dict:
    model = model_to_tune(source, None, "head")
    feeds = sample_inputs(model, 1)[0]
    sess = _ort_session(model)
    outs = [o.name for o in model.graph.output]
    ort_fn = lambda f: dict(zip(outs, sess.run(outs, f)))  # noqa: E731
    ref = ort_fn(feeds)
    untuned = _tvm_runner(model, target, None)
    with tempfile.TemporaryDirectory() as db:
        t0 = time.perf_counter()
        report = tuning.tune(model, target, db, trials=TRIALS_PER_KERNEL, time_budget_s=budget_s)
        tune_s = time.perf_counter() - t0
        tuned = _tvm_runner(model, target, db)
        cover = tuning.kernel_coverage(model, target, db)
    for run in (untuned, tuned):
        got = run(feeds)
        err = max(float(np.abs(got[n] - ref[n]).max()) for n in outs)
        assert err <= ATOL * max(1.0, float(np.abs(ref[outs[0]]).max())), f"{name}: TVM differs from ORT by {err}"
    # measured side by side, interleaved, in one process
    ort_ms = _median_ms(ort_fn, feeds)
    untuned_ms = _median_ms(untuned, feeds)
    tuned_ms = _median_ms(tuned, feeds)
    return {
        "model": name, "threads": THREADS, "tune_budget_s": budget_s, "tune_s": round(tune_s, 1),
        "trials_measured": report.trials_measured, "stopped": report.stopped,
        "kernels_tuned": len(cover["tuned"]), "kernels_untuned": len(cover["untuned"]),
        "ort_ms": round(ort_ms, 3), "tvm_untuned_ms": round(untuned_ms, 3), "tvm_tuned_ms": round(tuned_ms, 3),
        "ort_over_untuned": round(ort_ms / untuned_ms, 3), "ort_over_tuned": round(ort_ms / tuned_ms, 3),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--budget-s", type=float, help="tuning time per model (default: per-model, ~20 min in all)")
    ap.add_argument("-o", "--output", default=str(Path(__file__).parent / "results" / "tuning.json"))
    args = ap.parse_args()
    target = resolve_target("llvm")
    rows = []
    for name, source in MODELS.items():
        row = bench(name, source, args.budget_s or DEFAULT_BUDGET_S[name], target)
        rows.append(row)
        print(f"{name:10s} tune {row['tune_s']:6.0f} s ({row['kernels_tuned']} tuned / {row['kernels_untuned']} untuned)  "
              f"ORT {row['ort_ms']:8.2f} ms  TVM untuned {row['tvm_untuned_ms']:8.2f} ms ({row['ort_over_untuned']:.2f}x)  "
              f"tuned {row['tvm_tuned_ms']:8.2f} ms ({row['ort_over_tuned']:.2f}x)", flush=True)
    result = {"target": target.spec, "host_cpu": tuning.host_cpu_model(), "ratio": "ORT_ms / nasc_ms", "models": rows}
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=2))
    os.replace(tmp, out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
