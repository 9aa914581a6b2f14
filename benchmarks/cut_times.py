"""Measured head and tail times of every cut of a model: both halves compiled with TVM and timed.

The host CPU stands in for the device and for the server (no GPU here). Results are cached per
model in results/cut_times/<model>-t<threads>-<cpu>.json, keyed by model, target, host CPU and
threads, and written after each cut, so a rerun (say after Ctrl-C) measures only the cuts still
missing.

    python benchmarks/cut_times.py [resnet18 mobilenetv2 ...] [--limit-cuts N] [--save-onnx DIR]
"""

from __future__ import annotations

import os

# TVM's thread pool reads this once, at first use: set it before tvm is imported. The default
# is both cores; TVM_NUM_THREADS=1 emulates a one-core device (and stays steady beside other work).
THREADS = int(os.environ.setdefault("TVM_NUM_THREADS", "2"))

import argparse  # noqa: E402
import contextlib  # noqa: E402
import fcntl  # noqa: E402
import hashlib  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Callable  # noqa: E402

import numpy as np  # noqa: E402
import onnx  # noqa: E402
from onnx import ModelProto  # noqa: E402

from nasc import defaults  # noqa: E402
from nasc.errors import NascError, TargetError, VerificationError  # noqa: E402

# ImageNet-style configurations of the bundled examples. Compiling the two halves of a cut
# (3-7 s each on this host, whatever the resolution) dominates; the resolutions keep the
# timing of each half to a second or two.
MODELS: dict[str, dict] = {
    "resnet18": {"resolution": 224, "classes": 1000},
    "mobilenetv2": {"resolution": 160, "width": 1.0, "classes": 1000},
    "inception": {"resolution": 128, "classes": 1000},
    "densenet": {"resolution": 64, "classes": 1000},
    "shufflenet": {"resolution": 128, "classes": 1000},
}

FORMAT = "nasc-cut-times/1"
CACHE_DIR = Path(__file__).resolve().parent / "results" / "cut_times"
STAND_IN = "host llvm"
ROLES = ("head", "tail")
CACHE_MODE = 0o644
# sessions each half is timed in after the first (see time_again)
AGAIN_SESSIONS = 3

Log = Callable[[str], None]


def _quiet(_msg: str) -> None:
    pass


def build_model(name: str) -> ModelProto:
    """A benchmark model by name, at its configured size (see MODELS)."""
    from nasc.examples import build

    if name not in MODELS:
        raise NascError(f"cut times: unknown model '{name}'; configured models: {', '.join(MODELS)}")
    return build(name, **MODELS[name])


def cache_file(name: str, cache_dir: Path = CACHE_DIR) -> Path:
    """Where the times of a model at the current thread count on this host's CPU live: each host
    keeps its own (a shared machine may come up on another CPU)."""
    from nasc.backends.targets import host_cpu

    return cache_dir / f"{name}-t{THREADS}-{host_cpu()}.json"


def _sha256(model: ModelProto) -> str:
    return hashlib.sha256(model.SerializeToString()).hexdigest()


def cache_key(p, target) -> dict:
    """What the times depend on: source and prepared model, target, host CPU, threads and the code
    that compiles and times the halves."""
    from nasc.backends.targets import host_cpu
    from nasc.backends.tvm import COMPILE_MODULES, pipeline_fingerprint

    return {
        "pipeline": pipeline_fingerprint(COMPILE_MODULES),
        "source_sha256": p.source_sha256,
        "prepared_sha256": _sha256(p.model),
        "target": target.to_json(),
        "host_cpu": host_cpu(),
        "threads": int(os.environ.get("TVM_NUM_THREADS", THREADS)),
    }


def cut_id(kind: str, tensors) -> str:
    """A cut's identity across runs: its kind and the tensors it sends (cuts are deduplicated by them)."""
    return kind + ":" + ",".join(tensors)


def select_cuts(cuts: list, limit: int | None) -> list:
    """All cuts, or `limit` of them spread evenly from server-only to device-only."""
    if limit is None or limit >= len(cuts):
        return list(cuts)
    if limit <= 0:
        return []
    picks = np.unique(np.linspace(0, len(cuts) - 1, limit).round().astype(int))
    return [cuts[int(i)] for i in picks]


def load_cache(path: Path, key: dict) -> dict:
    """Cached records by cut id, with the whole-model time under None; empty when stale or absent."""
    if not path.exists():
        return {}
    try:
        doc = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise NascError(f"{path}: cut-times cache is not valid JSON ({e}); delete it to re-measure") from None
    if doc.get("format") != FORMAT or doc.get("key") != key:
        return {}
    found = {cut_id(r["kind"], r["tensors"]): r for r in doc.get("cuts", [])}
    if doc.get("whole_model"):
        found[None] = doc["whole_model"]
    return found


def write_atomic(path: Path, doc: dict) -> None:
    """Write JSON through a temp file in the same folder, so a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, suffix=".tmp") as f:
        json.dump(doc, f, indent=1)
        f.write("\n")
    os.chmod(f.name, CACHE_MODE)
    os.replace(f.name, path)


@contextlib.contextmanager
def _locked(path: Path):
    """Exclusive lock on the cache folder, so two runs measuring other cuts of one model both keep theirs."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path.parent, os.O_RDONLY)  # a folder lock leaves no lock files behind
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def save_cache(path: Path, about: dict, key: dict, whole: dict | None, records: dict[str, dict]) -> tuple[dict | None, dict[str, dict]]:
    """Merge with what other runs wrote meanwhile and write atomically; returns the merged (whole, records)."""
    with _locked(path):
        on_disk = load_cache(path, key)
        whole = whole or on_disk.pop(None, None)
        on_disk.pop(None, None)
        merged = {**on_disk, **records}
        write_atomic(path, _document(about, key, whole, list(merged.values())))
    return whole, merged


def _check_against_ort(half: ModelProto, executable, where: str) -> float:
    """Max abs difference of the compiled half from ONNX Runtime on one seeded input."""
    from nasc.backends import ort
    from nasc.backends import tvm as tvm_backend
    from nasc.compile import sample_inputs

    feeds = sample_inputs(half, 1, seed=defaults.SEED)[0]
    ref = ort.Runner(half)
    got = tvm_backend.Runner(executable, "cpu", ref.input_names, ref.output_names)(feeds)
    want = ref(feeds)
    err = max(float(np.abs(np.asarray(want[n], np.float64) - got[n]).max(initial=0.0)) for n in want)
    scale = max(float(np.abs(np.asarray(v, np.float64)).max(initial=0.0)) for v in want.values())
    bound = defaults.VERIFY_TVM_ATOL * max(1.0, scale)
    if err > bound:
        raise VerificationError(f"{where}: compiled half differs from ONNX Runtime by {err:.3g} (> {bound:.3g})")
    return err


def time_half(half: ModelProto, target, where: str, kept: list | None = None) -> dict:
    """Compile one half, check it against ORT, and time it: ms, compile seconds, error vs ORT.
    With `kept`, (half, executable) is appended to it, to be timed again later (`time_again`)."""
    from nasc.backends import tvm as tvm_backend
    from nasc.backends.tvm import time_model_ms

    start = time.perf_counter()
    ex = tvm_backend.compile_model(half, target, where=where)
    compile_s = time.perf_counter() - start
    err = _check_against_ort(half, ex, where)
    if kept is not None:
        kept.append((half, ex))
    return {"ms": time_model_ms(half, target, ex), "compile_s": round(compile_s, 3), "max_abs_err_vs_ort": err}


def measure_cut(a, cut, target, where: str, kept: list | None = None) -> dict:
    """One cut's record: what it sends and both halves measured (0 ms for a half that does not exist).
    With `kept`, (record, role, half, executable) is appended for each half, as in `time_half`."""
    from nasc.passes import extract_head, extract_tail

    rec = {"index": cut.index, "kind": cut.kind, "tensors": list(cut.tensors),
           "payload_bytes": cut.payload_bytes, "payload_bytes_int8": cut.payload_bytes_int8}
    for role, extract in zip(ROLES, (extract_head, extract_tail)):
        half = extract(a, cut)
        built: list = []
        m = time_half(half, target, f"{where} cut {cut.index} ({role})", built) if half is not None else None
        rec[f"{role}_ms"] = m["ms"] if m else 0.0
        rec[f"{role}_compile_s"] = m["compile_s"] if m else 0.0
        rec[f"{role}_max_abs_err_vs_ort"] = m["max_abs_err_vs_ort"] if m else 0.0
        if kept is not None and built:
            kept.append((rec, f"{role}_ms", *built[0]))
    return rec


def time_again(kept: list, target, sessions: int = AGAIN_SESSIONS, between: Callable[[int], None] | None = None) -> None:
    """Times every kept half in `sessions` more sessions, in alternating order, and keeps its fastest time.

    Each half is timed as the fastest of several repeats, but a neighbour on this shared host
    can slow a core for seconds, every repeat with it (a ResNet-18 tail once measured 39.9 ms
    that takes 24.5; Inception's head at cut 24 measured 0.694 ms in both of two sessions and
    0.552 in six rounds an hour later). Sessions minutes apart, with the halves already
    compiled, cost seconds; every session's time is kept in the record (`<role>_ms_sessions`).
    `between(s)`, when given, runs after session s: what else is measured in the same minutes.
    """
    from nasc.backends.tvm import time_model_ms

    for s in range(sessions):
        for rec, key, half, ex in (reversed(kept) if s % 2 == 0 else kept):
            again = time_model_ms(half, target, ex)
            rec[f"{key}_sessions"] = rec.get(f"{key}_sessions", [rec[key]]) + [again]
            rec[key] = min(rec[key], again)
        if between is not None:
            between(s)


def _document(about: dict, key: dict, whole: dict | None, records: list[dict]) -> dict:
    from nasc.backends.tvm import MIN_REPEAT_MS, NUMBER, REPEAT

    return {
        "format": FORMAT,
        "model": about["model"],
        "config": about["config"],
        "key": key,
        "device_stand_in": STAND_IN,
        "server_stand_in": STAND_IN,
        "timer": (f"TVM time_evaluator, fastest repeat (number={NUMBER}, repeat={REPEAT}, min_repeat_ms={MIN_REPEAT_MS}),"
                  f" fastest of {1 + AGAIN_SESSIONS} sessions"),
        "cuts_total": about["cuts_total"],
        "complete": len(records) == about["cuts_total"],
        "whole_model": whole,
        "cuts": sorted(records, key=lambda r: r["index"]),
    }


def _current(records: dict[str, dict], cuts: list) -> dict[str, dict]:
    """Cached records of the model's current cuts, indexed as the current enumeration numbers them."""
    index = {cut_id(c.kind, c.tensors): c.index for c in cuts}
    return {cid: {**r, "index": index[cid]} for cid, r in records.items() if cid in index}


def measure_cut_times(model_name_or_proto: str | ModelProto, target: str = "llvm", cache_path: str | Path | None = None,
                      limit_cuts: int | None = None, log: Log = _quiet, between: Callable[[int], None] | None = None) -> dict:
    """Head and tail times of every cut of the model (or `limit_cuts` spread evenly), cached.

    Returns the cache document: all cuts measured so far for this model, target and host
    (`cuts`, sorted by index, including cuts other runs measured), the whole model's time,
    and `measured_now`, the number of halves and whole-model builds this call measured
    (0 when the cache had them all). `between` is passed to `time_again`.
    """
    from nasc.backends import tvm as tvm_backend
    from nasc.backends.targets import resolve_target
    from nasc.compile import plan

    t = resolve_target(target)
    if not t.runs_here():
        raise TargetError(f"cut times: target '{t.name}' cannot run on this machine; time it where it runs")
    tvm_backend.set_threads(THREADS)
    if isinstance(model_name_or_proto, ModelProto):
        model, config = model_name_or_proto, None
        name = model.graph.name or "model"
    else:
        name, config = str(model_name_or_proto), MODELS.get(str(model_name_or_proto))
        model = build_model(name)
    path = Path(cache_path) if cache_path else cache_file(name)
    p = plan(model)
    key = cache_key(p, t)
    about = {"model": name, "config": config, "cuts_total": len(p.cuts)}
    cached = load_cache(path, key)
    whole = cached.pop(None, None)
    records = _current(cached, p.cuts)
    measured = 0
    kept: list = []
    if whole is None:
        log(f"{name}: whole model")
        built: list = []
        m = time_half(p.model, t, f"{name} (whole model)", built)
        whole = {"ms": m["ms"], "compile_s": m["compile_s"], "max_abs_err_vs_ort": m["max_abs_err_vs_ort"]}
        kept.append((whole, "ms", *built[0]))
        measured += 1
        whole, records = save_cache(path, about, key, whole, records)
    todo = [c for c in select_cuts(p.cuts, limit_cuts) if cut_id(c.kind, c.tensors) not in records]
    for k, c in enumerate(todo):
        cid = cut_id(c.kind, c.tensors)
        fresh = load_cache(path, key)  # another run may have measured it meanwhile
        if cid in fresh:
            records[cid] = fresh[cid]
            continue
        log(f"{name}: cut {c.index} ({c.kind}, {k + 1}/{len(todo)})")
        records[cid] = measure_cut(p.analysis, c, t, name, kept)
        measured += (c.kind != "server-only") + (c.kind != "device-only")
        whole, records = save_cache(path, about, key, whole, records)
    if kept:
        log(f"{name}: timing the {len(kept)} halves again")
        time_again(kept, t, between=between)
        whole, records = save_cache(path, about, key, whole, records)
    doc = _document(about, key, whole, list(_current(records, p.cuts).values()))
    doc["measured_now"] = measured
    return doc


def save_onnx(names: list[str], out_dir: Path) -> list[Path]:
    """The configured models as ONNX files (for nasc-profile, which takes a file or example:NAME)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for name in names:
        path = out_dir / f"{name}.onnx"
        onnx.save(build_model(name), str(path))
        paths.append(path)
    return paths


def _row(r: dict) -> str:
    return (f"  cut {r['index']:4d} {r['kind']:12s} head {r['head_ms']:9.3f} ms  tail {r['tail_ms']:9.3f} ms  "
            f"payload {r['payload_bytes']:>10d} B  compile {r['head_compile_s'] + r['tail_compile_s']:5.1f} s")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("models", nargs="*", default=list(MODELS), help=f"models to measure (default: {' '.join(MODELS)})")
    ap.add_argument("--target", default="llvm", help="a target that runs here (default llvm)")
    ap.add_argument("--limit-cuts", type=int, metavar="N", help="measure only N cuts spread evenly (quick runs)")
    ap.add_argument("--cache-dir", type=Path, default=CACHE_DIR, help="where <model>-t<threads>-<cpu>.json caches live")
    ap.add_argument("--save-onnx", type=Path, metavar="DIR", help="write the configured models to DIR/<model>.onnx and exit")
    args = ap.parse_args(argv)
    try:
        if args.save_onnx:
            for path in save_onnx(args.models, args.save_onnx):
                print(f"wrote {path}")
            return 0
        for name in args.models:
            start = time.perf_counter()
            path = cache_file(name, args.cache_dir)
            doc = measure_cut_times(name, args.target, path, args.limit_cuts,
                                    log=lambda msg: print(msg, flush=True))
            print(f"{name}: whole model {doc['whole_model']['ms']:.3f} ms; {len(doc['cuts'])}/{doc['cuts_total']} cuts "
                  f"measured ({doc['measured_now']} builds now, {time.perf_counter() - start:.0f} s)")
            for r in doc["cuts"]:
                print(_row(r))
            print(f"wrote {path}", flush=True)
    except NascError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("interrupted: the cache keeps every cut measured so far; rerun to continue", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
