"""The compile path as a Python API: plan a split, rewrite, compile, verify, write artifacts.

`plan` loads and analyses a model and predicts every cut; `compile_model` takes a plan's
choice through the passes and a backend and writes OUT atomically. The CLI is a thin shell
over these two functions.
"""

from __future__ import annotations

import hashlib
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
from onnx import ModelProto

import nasc
from nasc import defaults
from nasc.errors import CutError, NascError, VerificationError
from nasc.partitioner import DEVICE_ONLY, SERVER_ONLY, SPLIT, Analysis, Cut, analyze, cut_from_tensors, enumerate_cuts, load_model
from nasc.passes import dequantize_tail, prepare, quant_params, quantize_head, split_model
from nasc.passes.quantize import QuantParams, is_quantizable
from nasc.passes.util import get_metadata
from nasc.search.choose import choose_fastest, pareto_cuts
from nasc.search.latency import AnalyticLatencyModel, LatencyModel, predict
from nasc.types import HardwareProfile, Link, Prediction

SPLIT_METADATA_KEY = "nasc.split"
Log = Callable[[str], None]


def _quiet(_msg: str) -> None:
    pass


@dataclass
class Plan:
    """A model analysed and every cut predicted; `chosen` indexes `cuts`."""

    source_name: str
    source_sha256: str
    original: ModelProto          # loaded, shapes static: the reference for verification
    model: ModelProto             # after the PREPARE passes: what gets cut
    analysis: Analysis
    cuts: list[Cut]
    predictions: list[Prediction]
    chosen: int
    latency_model: LatencyModel
    link: Link
    compress: str
    pareto: list[int] = field(default_factory=list)

    @property
    def cut(self) -> Cut:
        return self.cuts[self.chosen]

    @property
    def prediction(self) -> Prediction:
        return self.predictions[self.chosen]

    def payload_bytes(self, cut: Cut | None = None) -> int:
        c = cut or self.cut
        return c.payload_bytes_int8 if self.compress == "int8" and c.kind == SPLIT else c.payload_bytes

    def candidates_json(self) -> dict:
        cands = []
        for i, (c, p) in enumerate(zip(self.cuts, self.predictions)):
            d = c.to_json()
            d["payload_bytes"] = self.payload_bytes(c)
            d["payload_bytes_uncompressed"] = c.payload_bytes
            d["predicted"] = p.to_json()
            d["pareto"] = i in self.pareto
            cands.append(d)
        return {
            "model": self.source_name,
            "source_sha256": self.source_sha256,
            "nodes": len(self.analysis.nodes),
            "total_macs": int(self.analysis.macs.sum()),
            "link": {"bandwidth_mbit": self.link.bandwidth_mbit, "rtt_ms": self.link.rtt_ms},
            "latency_model": self.latency_model.source,
            "compress": self.compress,
            "candidates": cands,
            "chosen": self.cut.index,
            "pareto": [self.cuts[i].index for i in self.pareto],
        }


def _source(source: str | Path | ModelProto) -> tuple[str, str, ModelProto | Path]:
    if isinstance(source, ModelProto):
        data = source.SerializeToString()
        return source.graph.name or "model", hashlib.sha256(data).hexdigest(), source
    text = str(source)
    if text.startswith("example:"):
        from nasc.examples import build

        m = build(text.split(":", 1)[1])
        return text, hashlib.sha256(m.SerializeToString()).hexdigest(), m
    path = Path(text)
    if path.is_file():
        return str(path), hashlib.sha256(path.read_bytes()).hexdigest(), path
    return str(path), "", path  # load_model reports the missing file


def _resolve_split(split: str | int, plan_cuts: list[Cut], a: Analysis, original: ModelProto) -> Cut | None:
    """None means `auto`; otherwise the cut named by index, keyword, metadata or tensor names."""
    s = str(split).strip()
    if s == "auto":
        return None
    if s == "annotated":
        note = get_metadata(original, SPLIT_METADATA_KEY)
        if note is None:
            raise CutError(f"--split annotated: the model has no '{SPLIT_METADATA_KEY}' metadata; use --split auto")
        s = note if note else SERVER_ONLY
    if s in (SERVER_ONLY, DEVICE_ONLY):
        return next(c for c in plan_cuts if c.kind == s)
    if s.isdigit():
        k = int(s)
        if k >= len(plan_cuts):
            raise CutError(f"--split {k}: no such cut; indices run 0..{len(plan_cuts) - 1} (see --dry-run)")
        return plan_cuts[k]
    names = [t.strip() for t in s.split(",") if t.strip()]
    if not names:
        raise CutError(f"--split '{split}': expected auto, annotated, a cut index or tensor names")
    return cut_from_tensors(a, plan_cuts, names)


def plan(
    source: str | Path | ModelProto,
    *,
    split: str | int = "auto",
    input_shapes: dict[str, tuple[int, ...]] | None = None,
    link: Link = defaults.DEFAULT_LINK,
    device_profile: HardwareProfile = defaults.DEFAULT_DEVICE,
    server_profile: HardwareProfile = defaults.DEFAULT_SERVER,
    latency_model: LatencyModel | None = None,
    compress: str = "none",
    device_memory_bytes: int | None = None,
    log: Log = _quiet,
) -> Plan:
    """Load, prepare, analyse, enumerate and predict every cut; choose one (`split`)."""
    if compress not in ("none", "int8"):
        raise NascError(f"--compress {compress}: expected none or int8")
    name, sha, src = _source(source)
    log("load + validate")
    original = load_model(src, input_shapes)
    log("prepare: " + ", ".join(n for n, _ in nasc.passes.PREPARE))
    model = load_model(prepare(original))
    log("analyse + enumerate cuts")
    a = analyze(model)
    cuts = enumerate_cuts(a)
    lm = latency_model or AnalyticLatencyModel(device_profile, server_profile)
    preds = predict(a, cuts, lm, link, compress=compress == "int8")
    chosen_cut = _resolve_split(split, cuts, a, original)
    if chosen_cut is None:
        chosen = choose_fastest(cuts, preds, device_memory_bytes)
    else:
        if chosen_cut not in cuts:  # a valid cut outside the enumerated families
            cuts = cuts + [chosen_cut]
            preds = predict(a, cuts, lm, link, compress=compress == "int8")
        chosen = cuts.index(chosen_cut)
        if device_memory_bytes is not None and chosen_cut.device_peak_memory_bytes > device_memory_bytes:
            raise CutError(
                f"--split {split}: cut {chosen_cut.index} needs {chosen_cut.device_peak_memory_bytes} bytes on the device, "
                f"over --device-memory {device_memory_bytes}"
            )
    return Plan(name, sha, original, model, a, cuts, preds, chosen, lm, link, compress, pareto_cuts(cuts, preds))


# ---------------------------------------------------------------------------------------
# sample inputs, calibration, verification


def sample_inputs(model: ModelProto, n: int, seed: int = defaults.SEED) -> list[dict[str, np.ndarray]]:
    """n seeded random-normal feeds (integers: small non-negative values) for the model's inputs."""
    from nasc.partitioner.analysis import _spec
    from nasc.partitioner.load import activation_inputs

    rng = np.random.default_rng(seed)
    specs = [_spec(vi) for vi in activation_inputs(model)]
    out = []
    for _ in range(n):
        feeds = {}
        for s in specs:
            dt = np.dtype(s.dtype)
            if dt.kind == "f":
                feeds[s.name] = rng.standard_normal(s.shape).astype(dt)
            elif dt.kind == "b":
                feeds[s.name] = rng.integers(0, 2, s.shape).astype(dt)
            else:
                feeds[s.name] = rng.integers(0, 8, s.shape).astype(dt)
        out.append(feeds)
    return out


def load_calibration(path: Path, model: ModelProto) -> list[dict[str, np.ndarray]]:
    """Samples from an .npz keyed by input name: arrays shaped (S, *input_shape) or input_shape."""
    from nasc.partitioner.analysis import _spec
    from nasc.partitioner.load import activation_inputs

    try:
        data = np.load(path)
    except (OSError, ValueError) as e:
        raise NascError(f"--calib {path}: cannot read .npz ({e})") from None
    specs = [_spec(vi) for vi in activation_inputs(model)]
    per_input = {}
    for s in specs:
        if s.name not in data:
            raise NascError(f"--calib {path}: no array named '{s.name}' (has: {', '.join(data.files)})")
        x = np.asarray(data[s.name]).astype(s.dtype)
        if tuple(x.shape) == s.shape:
            x = x[None]
        if tuple(x.shape[1:]) != s.shape:
            raise NascError(f"--calib {path}: '{s.name}' has shape {list(x.shape)}, expected [S, {', '.join(map(str, s.shape))}]")
        per_input[s.name] = x
    count = min(len(x) for x in per_input.values())
    return [{k: v[i] for k, v in per_input.items()} for i in range(count)]


def _run_pair(head_fn, tail_fn, feeds: dict[str, np.ndarray]) -> tuple[dict, dict]:
    """Head then tail; returns (final outputs by original name, head outputs)."""
    outs: dict[str, np.ndarray] = {}
    head_out: dict[str, np.ndarray] = {}
    if head_fn is not None:
        head_out = head_fn(feeds)
        outs.update(head_out)
    if tail_fn is not None:
        outs.update(tail_fn({**feeds, **head_out}))
    return outs, head_out


def _compare(ref: list[dict], got: list[dict], names: list[str]) -> dict:
    """Max abs error, error relative to the output scale, and top-1 agreement for classifiers."""
    max_err, scale, agree, total = 0.0, 0.0, 0, 0
    for r, g in zip(ref, got):
        for n in names:
            a, b = np.asarray(r[n], np.float64), np.asarray(g[n], np.float64)
            max_err = max(max_err, float(np.abs(a - b).max()) if a.size else 0.0)
            scale = max(scale, float(np.abs(a).max()) if a.size else 0.0)
            if a.ndim == 2 and a.shape[1] > 1:
                agree += int((a.argmax(1) == b.argmax(1)).sum())
                total += a.shape[0]
    return {
        "max_abs_error": max_err,
        "output_scale": scale,
        "top1_agreement": (agree / total) if total else None,
        "samples": len(ref),
    }


# ---------------------------------------------------------------------------------------
# compile


def _specs_json(model: ModelProto, which: str) -> list[dict]:
    from nasc.partitioner.analysis import _spec

    vis = model.graph.input if which == "inputs" else model.graph.output
    inits = {t.name for t in model.graph.initializer}
    return [_spec(v).to_json() for v in vis if v.name not in inits]


def _versions() -> dict:
    import onnxruntime

    v = {"nasc": nasc.__version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__,
         "numpy": np.__version__, "python": platform.python_version()}
    try:
        import tvm

        v["tvm"] = tvm.__version__
    except ImportError:
        v["tvm"] = None
    return v


def compile_model(
    source: str | Path | ModelProto | Plan,
    out_dir: str | Path,
    *,
    split: str | int = "auto",
    compress: str = "none",
    granularity: str = "tensor",
    device_target: str = defaults.DEFAULT_DEVICE_TARGET,
    server_target: str = defaults.DEFAULT_SERVER_TARGET,
    backend: str = "tvm",
    input_shapes: dict[str, tuple[int, ...]] | None = None,
    link: Link = defaults.DEFAULT_LINK,
    device_profile: HardwareProfile = defaults.DEFAULT_DEVICE,
    server_profile: HardwareProfile = defaults.DEFAULT_SERVER,
    device_memory_bytes: int | None = None,
    calib: int | str | Path = defaults.CALIB_SAMPLES,
    verify: bool = True,
    tuning_db: str | Path | None = None,
    log: Log = _quiet,
) -> dict:
    """Build the artifact for one split into `out_dir` and return its manifest.

    `source` is a model (path, `example:NAME`, ModelProto) planned here with `split` and the
    link/profile arguments, or a Plan whose choice is used as it is.

    With verify (the default) head-then-tail is checked against ONNX Runtime on the original
    model; a float split beyond tolerance raises VerificationError and writes nothing.

    With `tuning_db` (a `nasc-tune --db` directory) each half uses the records tuned for its
    target, when there are any; the manifest lists its tuned and untuned kernels.
    """
    from nasc.backends import artifacts
    from nasc.backends.targets import resolve_target

    if backend not in ("tvm", "ort"):
        raise NascError(f"--backend {backend}: expected tvm or ort")
    if granularity not in ("tensor", "channel"):
        raise NascError(f"--quant-granularity {granularity}: expected tensor or channel")
    targets = {"head": resolve_target(device_target), "tail": resolve_target(server_target)} if backend == "tvm" else {}
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    p = source if isinstance(source, Plan) else plan(
        source, split=split, input_shapes=input_shapes, link=link, device_profile=device_profile,
        server_profile=server_profile, compress=compress, device_memory_bytes=device_memory_bytes, log=log,
    )
    timings["plan_s"] = time.perf_counter() - t0
    cut = p.cut
    log("split")
    head, tail = split_model(p.analysis, cut)
    float_head, float_tail = head, tail

    # int8 bottleneck -------------------------------------------------------------------
    qparams: list[QuantParams] = []
    compress_info: dict = {"kind": "none"}
    if p.compress == "int8" and cut.kind == SPLIT:
        log("calibrate int8 bottleneck")
        samples = load_calibration(Path(calib), p.original) if isinstance(calib, (str, Path)) and str(calib).endswith(".npz") else sample_inputs(p.original, int(calib))
        from nasc.backends import ort

        float_head_run = ort.Runner(head)
        head_vals = [float_head_run(s) for s in samples]
        qparams = [
            quant_params(t, [hv[t] for hv in head_vals], granularity == "channel")
            for t in cut.tensors if is_quantizable(p.analysis.specs[t].dtype)
        ]
        head, tail = quantize_head(head, qparams), dequantize_tail(tail, qparams)
        original_run = ort.Runner(p.original)
        ref = [original_run(s) for s in samples]
        head_run, tail_run = ort.Runner(head), ort.Runner(tail)
        got = [_run_pair(head_run, tail_run, s)[0] for s in samples]
        err = _compare(ref, got, p.analysis.outputs)
        compress_info = {
            "kind": "int8", "granularity": granularity, "calibration": str(calib) if not str(calib).isdigit() else f"{calib} random-normal samples",
            "tensors": {q.tensor: q.to_json() for q in qparams},
            "payload_ratio": (cut.payload_bytes_int8 / cut.payload_bytes) if cut.payload_bytes else 1.0,
            "error_vs_float": err,
        }
    elif p.compress == "int8":
        compress_info = {"kind": "none", "note": f"{cut.kind} cut: nothing to compress"}
    timings["passes_s"] = time.perf_counter() - t0 - timings["plan_s"]

    halves = {"head": head, "tail": tail}
    executables: dict = {}
    tuning_info: dict = {}
    with artifacts.staging(Path(out_dir)) as tmp:
        for role, m in halves.items():
            if m is None:
                continue
            (tmp / role).mkdir()
            onnx.save(m, str(tmp / role / "model.onnx"))
        if backend == "tvm":
            from nasc.backends import tuning
            from nasc.backends import tvm as tvm_backend

            tvm_backend.set_threads()
            for role, m in halves.items():
                if m is None:
                    continue
                t1 = time.perf_counter()
                log(f"compile {role} for {targets[role].name}")
                db = tuning.open_database(tuning_db, targets[role]) if tuning_db else None
                ex = tvm_backend.compile_model(m, targets[role], where=f"{p.source_name} ({role})", database=db)
                if tuning_db:
                    tuning_info[role] = tuning.kernel_coverage(m, targets[role], tuning_db, where=f"{p.source_name} ({role})")
                tvm_backend.export(ex, tmp / role / tvm_backend.LIBRARY_NAME, targets[role])
                executables[role] = ex
                timings[f"compile_{role}_s"] = time.perf_counter() - t1
        verification = {"skipped": True}
        if verify:
            t1 = time.perf_counter()
            log("verify against ONNX Runtime on the original model")
            verification = _verify(p, halves, (float_head, float_tail), qparams, executables, targets, backend)
            timings["verify_s"] = time.perf_counter() - t1
        manifest = _manifest(p, halves, targets, backend, compress_info, verification, timings, tmp)
        for role, info in tuning_info.items():
            manifest[role]["tuning"] = info
        timings["total_s"] = time.perf_counter() - t0
        manifest["timings_s"] = {k: round(v, 3) for k, v in timings.items()}
        manifest = artifacts.write_manifest(tmp, manifest)
    return manifest


def _verify(p: Plan, halves: dict, float_halves: tuple, qparams: list[QuantParams], executables: dict, targets: dict, backend: str) -> dict:
    from nasc.backends import ort

    samples = sample_inputs(p.original, defaults.VERIFY_SAMPLES, seed=defaults.SEED + 1)
    original_run = ort.Runner(p.original)
    ref = [original_run(s) for s in samples]
    outs = p.analysis.outputs
    fh, ft = (m and ort.Runner(m) for m in float_halves)
    ort_pair = [_run_pair(fh, ft, s)[0] for s in samples]
    report = {"reference": "onnxruntime on the original model", "samples": len(samples)}
    report["onnx_halves"] = _compare(ref, ort_pair, outs)
    bound = defaults.VERIFY_ATOL + defaults.VERIFY_RTOL * report["onnx_halves"]["output_scale"]
    if report["onnx_halves"]["max_abs_error"] > bound:
        raise VerificationError(
            f"{p.source_name}: the ONNX head+tail at cut {p.cut.index} differ from the original by "
            f"{report['onnx_halves']['max_abs_error']:.3g} (> {bound:.3g})"
        )
    if backend != "tvm":
        return report
    from nasc.backends import tvm as tvm_backend
    from nasc.backends.targets import resolve_target

    runners, via = {}, {}
    for role, m in halves.items():
        if m is None:
            runners[role] = None
            continue
        target = targets[role]
        ex = executables[role]
        if not target.runs_here():
            # the real library cannot run here: check the same half through an llvm build
            ex = tvm_backend.compile_model(m, resolve_target("llvm"), where=f"{p.source_name} ({role}, llvm check)")
            via[role] = f"llvm build of the same ONNX half ({target.name} cannot run here)"
        else:
            via[role] = f"{target.name} library"
        names_in = [s["name"] for s in _specs_json(m, "inputs")]
        names_out = [s["name"] for s in _specs_json(m, "outputs")]
        runners[role] = tvm_backend.Runner(ex, "cpu" if role in via and "llvm build" in via[role] else target.device, names_in, names_out)
    tvm_pair = [_run_pair(runners["head"], runners["tail"], s) for s in samples]
    report["tvm"] = _compare(ref, [g for g, _ in tvm_pair], outs)
    report["tvm"]["via"] = via
    if qparams:
        # int8: TVM and ORT must agree on the wire bytes to one quantization step.
        quantized_head = ort.Runner(halves["head"])
        ort_q = [quantized_head(s) for s in samples]
        lsb = max(int(np.abs(a[q.wire_name].astype(np.int32) - b[q.wire_name].astype(np.int32)).max()) for (_, a), b in zip(tvm_pair, ort_q) for q in qparams)
        report["tvm"]["wire_max_lsb_diff"] = lsb
        if lsb > 1:
            raise VerificationError(f"{p.source_name}: compiled head's int8 cut tensors differ from ORT's by {lsb} steps")
    else:
        bound = defaults.VERIFY_TVM_ATOL * max(1.0, report["tvm"]["output_scale"])
        if report["tvm"]["max_abs_error"] > bound:
            raise VerificationError(
                f"{p.source_name}: compiled head+tail at cut {p.cut.index} differ from ONNX Runtime by "
                f"{report['tvm']['max_abs_error']:.3g} (> {bound:.3g})"
            )
    return report


def _source_path(name: str) -> str | None:
    """Absolute path of a source file (None for bundled examples and in-memory models)."""
    path = Path(name)
    return str(path.resolve()) if path.is_file() else None


def _manifest(p: Plan, halves: dict, targets: dict, backend: str, compress_info: dict, verification: dict, timings: dict, root: Path) -> dict:
    from nasc.backends.tvm import LIBRARY_NAME

    def half(role: str):
        m = halves[role]
        if m is None:
            return None
        return {
            "onnx": f"{role}/model.onnx",
            "library": f"{role}/{LIBRARY_NAME}" if backend == "tvm" else None,
            "target": targets[role].to_json() if backend == "tvm" else {"name": "onnxruntime-cpu", "tvm": None},
            "inputs": _specs_json(m, "inputs"),
            "outputs": _specs_json(m, "outputs"),
            "nodes": len(m.graph.node),
        }

    c = p.cut
    a = p.analysis
    cut_tensors = []
    for t in c.tensors:
        d = a.specs[t].to_json()
        q = compress_info.get("tensors", {}).get(t)
        d["wire_name"] = q["wire_name"] if q else t
        d["wire_dtype"] = "uint8" if q else d["dtype"]
        cut_tensors.append(d)
    return {
        "format": "nasc-artifact/1",
        "versions": _versions(),
        "source": {"name": p.source_name, "path": _source_path(p.source_name), "sha256": p.source_sha256, "inputs": [a.specs[i].to_json() for i in a.inputs],
                   "outputs": [a.specs[o].to_json() for o in a.outputs]},
        "backend": backend,
        "split": {"index": c.index, "kind": c.kind, "tensors": list(c.tensors)},
        "cut_tensors": cut_tensors,
        "payload_bytes": p.payload_bytes(),
        "payload_bytes_uncompressed": c.payload_bytes,
        "device_peak_memory_bytes": c.device_peak_memory_bytes,
        "head_macs": c.head_macs,
        "tail_macs": c.tail_macs,
        "predicted": p.prediction.to_json(),
        "latency_model": p.latency_model.source,
        "link": {"bandwidth_mbit": p.link.bandwidth_mbit, "rtt_ms": p.link.rtt_ms},
        "compress": compress_info,
        "head": half("head"),
        "tail": half("tail"),
        "verification": verification,
        "host": {"machine": platform.machine(), "python": sys.version.split()[0]},
    }
