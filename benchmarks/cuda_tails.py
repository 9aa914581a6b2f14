"""The server half on a GPU: nasc's CUDA tails, default and tuned, beside PyTorch eager (cuDNN).

For each model (ImageNet-sized ResNet-18, MobileNetV2, Inception style, as nasc compiles them)
the whole model and its tails at three cuts are compiled for the CUDA target, each checked
against ONNX Runtime on the same graph, and timed on the GPU with TVM's time_evaluator beside
PyTorch running the same graph (fp32, TF32 off: the precision nasc's kernels keep). Then the
whole model is tuned with MetaSchedule under a time budget (starting from the default
schedules) and every graph is compiled and timed again with the tuned database. Ratios are
torch_ms / nasc_ms (above 1: nasc is faster). Graphs compile in parallel worker processes;
timing is sequential.

Run on a machine with a CUDA GPU and nvcc:
  python benchmarks/cuda_tails.py --arch sm_90 --budget-s 120 -o benchmarks/results/cuda_tails.json
(`--target llvm` runs the same flow on this CPU, for checking the script itself.)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

from nasc.backends import tuning
from nasc.backends import tvm as tvm_backend
from nasc.backends.targets import resolve_target
from nasc.compile import plan, sample_inputs
from nasc.partitioner import DEVICE_ONLY, SPLIT
from nasc.passes import split_model

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cpu_schedules import MODELS, write_json  # noqa: E402
from torch_onnx import TorchGraph  # noqa: E402

TAIL_FRACTIONS = (0.25, 0.5, 0.75)   # tails at cuts this far through the model's split cuts
BUDGET_S = 120.0                     # MetaSchedule time per model
TIME_SHARE = 0.9
TRIALS_PER_KERNEL = 64               # more than the budget reaches: the budget ends each run
NUMBER, REPEAT, MIN_REPEAT_MS = 10, 7, 50
ATOL = 1e-3
RESULTS = Path(__file__).resolve().parent / "results" / "cuda_tails.json"


def graphs(model) -> list[tuple[str, object]]:
    """[(label, graph)]: the whole model (server-only) and its tails at TAIL_FRACTIONS."""
    p = plan(model, split=DEVICE_ONLY)
    whole, _ = split_model(p.analysis, p.cut)
    splits = [c for c in p.cuts if c.kind == SPLIT]
    picked = sorted({splits[int(f * (len(splits) - 1))].index for f in TAIL_FRACTIONS})
    tails = [(f"tail@{i}", split_model(p.analysis, next(c for c in splits if c.index == i))[1]) for i in picked]
    return [("whole", whole)] + tails


def _compile_to(args) -> tuple[str, float]:
    """Worker: compile one graph (with the tuning DB if given) and export it; (library path, seconds)."""
    graph_bytes, target_text, db, path = args
    import onnx

    target = resolve_target(target_text)
    t0 = time.perf_counter()
    database = tuning.open_database(db, target) if db else None
    ex = tvm_backend.compile_model(onnx.load_from_string(graph_bytes), target, database=database)
    tvm_backend.export(ex, Path(path), target)
    return path, time.perf_counter() - t0


def compile_all(items: list, target, db: str | None, workdir: Path, workers: int) -> list[tuple[str, float]]:
    import multiprocessing as mp

    workdir.mkdir(parents=True, exist_ok=True)
    jobs = [(g.SerializeToString(), json.dumps(target.spec), db, str(workdir / f"{i}.so")) for i, g in enumerate(items)]
    with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) as pool:
        return list(pool.map(_compile_to, jobs))


def time_tvm(lib_path: str, graph, target, feeds) -> tuple[float, dict]:
    """(ms per call, outputs) of a compiled library on the target's device."""
    import tvm

    runner = tvm_backend.Runner(tvm_backend.load_library(Path(lib_path)), target.device,
                                [i.name for i in graph.graph.input], [o.name for o in graph.graph.output])
    got = runner(feeds)
    args = [tvm.runtime.tensor(np.ascontiguousarray(feeds[n]), runner.dev) for n in runner.input_names]
    f = runner.vm.time_evaluator("main", runner.dev, number=NUMBER, repeat=REPEAT, min_repeat_ms=MIN_REPEAT_MS)
    return float(np.min(f(*args).results) * 1e3), got


def time_torch(graph, device: str, feeds) -> tuple[float, dict]:
    """(ms per call, outputs) of PyTorch eager on the same graph: min over REPEAT of the mean of NUMBER calls."""
    import torch

    tg = TorchGraph(graph, device)
    x = tg.inputs(feeds)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    with torch.inference_mode():
        outs = tg(x)
        for _ in range(3):
            tg(x)
        best = float("inf")
        for _ in range(REPEAT):
            sync()
            t0 = time.perf_counter()
            n = 0
            while n < NUMBER or time.perf_counter() - t0 < MIN_REPEAT_MS / 1e3:
                tg(x)
                n += 1
            sync()
            best = min(best, (time.perf_counter() - t0) / n)
    return best * 1e3, {o: v.cpu().numpy() for o, v in zip(tg.outputs, outs)}


def _err(got: dict, want: dict) -> float:
    err = max(float(np.abs(got[n] - want[n]).max()) for n in want)
    scale = max(1.0, max(float(np.abs(w).max()) for w in want.values()))
    return err / scale


def bench_model(name: str, model, target, budget_s: float, time_share: float, workers: int, work: Path, log) -> dict:
    from nasc.backends import ort

    items = graphs(model)
    feeds = [sample_inputs(g, 1)[0] for _, g in items]
    want = [ort.run(g, f) for (_, g), f in zip(items, feeds)]
    rows = [{"graph": label, "inputs": {k: list(v.shape) for k, v in f.items()}} for (label, _), f in zip(items, feeds)]
    t0 = time.perf_counter()
    built = compile_all([g for _, g in items], target, None, work / f"{name}-default", workers)
    log(f"{name}: compiled {len(items)} graphs (default schedules) in {time.perf_counter() - t0:.0f} s")
    for row, (label, g), f, w, (lib, secs) in zip(rows, items, feeds, want, built):
        row["compile_s"] = round(secs, 1)
        row["default_ms"], got = time_tvm(lib, g, target, f)
        row["default_rel_err"] = _err(got, w)
        assert row["default_rel_err"] <= ATOL, f"{name} {label}: nasc differs from ORT by {row['default_rel_err']}"
        row["torch_ms"], got = time_torch(g, target.device, f)
        row["torch_rel_err"] = _err(got, w)
        row["torch_over_default"] = round(row["torch_ms"] / row["default_ms"], 3)
        log(f"{name:12s} {label:9s} torch {row['torch_ms']:8.3f} ms  nasc default {row['default_ms']:8.3f} ms "
            f"({row['torch_over_default']:.2f}x)")
    out = {"model": name, "graphs": rows}
    if budget_s <= 0:
        return out
    db = str(work / f"{name}-db")
    report = tuning.tune(items[0][1], target, db, trials=TRIALS_PER_KERNEL, time_budget_s=budget_s, where=name,
                         time_share=time_share)
    kernels = [k for k in report.kernels if k.default_s and k.best_s]
    out.update(tune_s=round(report.elapsed_s, 1), trials_measured=report.trials_measured, stopped=report.stopped,
               kernels=len(report.kernels), kernels_searched=sum(1 for k in report.kernels if k.trials > 1),
               kernel_sum_default_ms=round(sum(k.default_s * k.weight for k in kernels) * 1e3, 4),
               kernel_sum_tuned_ms=round(sum(k.best_s * k.weight for k in kernels) * 1e3, 4))
    log(f"{name}: tuned {out['tune_s']:.0f} s, {out['trials_measured']} trials, kernel sum "
        f"{out['kernel_sum_default_ms']:.3f} -> {out['kernel_sum_tuned_ms']:.3f} ms")
    built = compile_all([g for _, g in items], target, db, work / f"{name}-tuned", workers)
    for row, (label, g), f, w, (lib, _) in zip(rows, items, feeds, want, built):
        row["tuned_ms"], got = time_tvm(lib, g, target, f)
        row["tuned_rel_err"] = _err(got, w)
        assert row["tuned_rel_err"] <= ATOL, f"{name} {label}: tuned nasc differs from ORT by {row['tuned_rel_err']}"
        row["torch_over_tuned"] = round(row["torch_ms"] / row["tuned_ms"], 3)
        log(f"{name:12s} {label:9s} torch {row['torch_ms']:8.3f} ms  nasc tuned {row['tuned_ms']:8.3f} ms "
            f"({row['torch_over_tuned']:.2f}x)")
    return out


def _device_name(target) -> str:
    if target.device != "cuda":
        return tuning.host_cpu_model()
    import torch

    return torch.cuda.get_device_name(0)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="sm_90", help="CUDA arch of the GPU (default %(default)s)")
    ap.add_argument("--target", help="compile for this target instead of cuda:ARCH (llvm: a CPU check run)")
    ap.add_argument("--budget-s", type=float, default=BUDGET_S, help="tuning time per model; 0 skips tuning")
    ap.add_argument("--time-share", type=float, default=TIME_SHARE)
    ap.add_argument("--only", nargs="*", choices=sorted(MODELS))
    ap.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="parallel compiles")
    ap.add_argument("-o", "--output", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    import torch

    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.benchmark = True
    target = resolve_target(args.target or f"cuda:{args.arch}")
    if not target.runs_here():
        raise SystemExit(f"target {target.name} cannot run on this machine")
    doc = {"target": target.spec, "device": _device_name(target), "torch": torch.__version__, "tf32": False,
           "ratio": "torch_ms / nasc_ms (PyTorch eager, cuDNN, on the same graph)", "models": []}
    log = lambda s: print(s, flush=True)  # noqa: E731
    with tempfile.TemporaryDirectory() as work:
        for name in args.only or list(MODELS):
            doc["models"].append(bench_model(name, MODELS[name](), target, args.budget_s, args.time_share,
                                             args.workers, Path(work), log))
            write_json(args.output, doc)
    log(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
