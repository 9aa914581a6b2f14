"""nasc-bench: measure a compiled pair through device runtime -> network -> server runtime.

For every emulated link it times N requests per stage (head, serialize, transfer, tail,
return) for the chosen split and its baselines (device-only, server-only, ONNX Runtime pair
at the same cut), and sets the result beside the manifest's prediction.
"""

from __future__ import annotations

import json
import os
import platform
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from nasc.defaults import SEED
from nasc.errors import NascError
from nasc.types import Link, TensorSpec
from nasc.runtime import protocol as P
from nasc.runtime.client import DeviceClient, SplitDevice, StageTimes
from nasc.runtime.halves import Endpoint, load_half, make_endpoint, quant_of
from nasc.runtime.links import (EMULATION_INPROC, EMULATION_NONE, NetnsPair, Shaper, netns_unavailable_reason,
                                parse_link)
from nasc.runtime.server import start_server

DEFAULT_LINKS = ("wifi", "lte", "3g")
DEFAULT_REQUESTS = 30
DEFAULT_WARMUP = 3
PERCENTILES = (50, 95, 99)
STAGES = ("head_ms", "serialize_ms", "transfer_ms", "server_ms", "tail_ms", "return_ms", "e2e_ms")
PAIR_SPLIT, PAIR_ORT, PAIR_DEVICE, PAIR_SERVER = "split", "ort-pair", "device-only", "server-only"
MAX_BENCH_S = 3600.0  # a whole run never goes past this, whatever N and the links are
CHECK_ATOL = 1e-3  # split vs ORT pair on the same quantized cut: only reassociation differs
CHECK_RTOL = 1e-3


@dataclass(frozen=True)
class BenchConfig:
    links: tuple[str, ...] = DEFAULT_LINKS
    requests: int = DEFAULT_REQUESTS
    warmup: int = DEFAULT_WARMUP
    server: str | None = None  # HOST:PORT of a running nasc-serve; None starts one here
    emulation: str = "auto"  # auto | netns | inproc
    baselines: bool = True
    compress: str = "auto"  # auto | none | zlib | zstd | lz4
    seed: int = SEED
    baseline_dirs: dict = field(default_factory=dict)  # {"device-only": dir, "server-only": dir}
    model: object = None  # source model (path or ModelProto) to compile missing baselines from


# ---------------------------------------------------------------- statistics


def summarize(samples: list[StageTimes], wall_s: float) -> dict:
    """p50/p95/p99 and mean per stage, plus throughput over the measured wall time."""
    out = {}
    for stage in STAGES:
        v = np.array([getattr(s, stage) for s in samples], dtype=np.float64)
        out[stage] = {f"p{p}": round(float(np.percentile(v, p)), 4) for p in PERCENTILES}
        out[stage]["mean"] = round(float(v.mean()), 4)
    out["requests"] = len(samples)
    out["throughput_rps"] = round(len(samples) / wall_s, 3) if wall_s > 0 else None
    out["up_bytes"] = samples[0].up_bytes if samples else 0
    out["down_bytes"] = samples[0].down_bytes if samples else 0
    return out


def predicted_for_link(manifest: dict, link: Link) -> dict | None:
    """The manifest's device and server predictions with the transfer redone for `link`
    (payload of the cut as sent: the tail's input specs; nothing crosses for device-only)."""
    pred = manifest.get("predicted")
    if not pred:
        return None
    cut_bytes = sum(TensorSpec.from_json(d).nbytes for d in manifest["tail"]["inputs"]) if manifest.get("tail") else 0
    transfer = float(link.transfer_ms(cut_bytes)) if manifest.get("tail") else 0.0
    device, server = float(pred.get("device_ms", 0.0)), float(pred.get("server_ms", 0.0))
    return {"device_ms": round(device, 4), "transfer_ms": round(transfer, 4), "server_ms": round(server, 4),
            "total_ms": round(device + transfer + server, 4), "cut_bytes": cut_bytes}


def host_description() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "gpu": _gpu_name()}


def _gpu_name() -> str | None:
    try:
        from nasc.backends.targets import _cuda_available

        return "cuda" if _cuda_available() else None
    except Exception:  # no TVM CUDA runtime at all: no GPU to use
        return None


# ---------------------------------------------------------------- the pairs


@dataclass
class Pair:
    """One way of answering a request: a device head (or none) and a served tail (or none)."""

    name: str
    manifest: dict
    head: object | None
    endpoint: Endpoint | None
    inputs: tuple[TensorSpec, ...]
    note: str = ""


def _inputs_of(manifest: dict) -> tuple[TensorSpec, ...]:
    first = manifest["head"] if manifest.get("head") else manifest["tail"]
    return tuple(TensorSpec.from_json(d) for d in first["inputs"])


def _load_tail(artifact_dir, engine: str) -> tuple[Endpoint, str]:
    """The served tail; a compiled tail that cannot run on this host (e.g. CUDA without a GPU)
    is replaced by its ONNX through ONNX Runtime on this CPU, and the note says so."""
    try:
        half, man, h = load_half(artifact_dir, "tail", engine)
        note = ""
    except NascError as e:
        if engine != "compiled":
            raise
        half, man, h = load_half(artifact_dir, "tail", "ort")
        note = f"compiled tail cannot run here ({e}); served by ONNX Runtime on this CPU instead"
    ep = make_endpoint(f"{Path(artifact_dir).name}:tail:{engine}", h, [half], quant_of(man, [s.name for s in half.inputs]))
    return ep, note


def load_pairs(artifact_dir, config: BenchConfig, workdir: Path) -> tuple[list[Pair], list[str]]:
    """The chosen split, then the baselines that can be built; notes say what is missing."""
    from nasc.runtime.artifact import open_artifact

    man = open_artifact(artifact_dir).manifest
    pairs, notes = [], []
    head = load_half(artifact_dir, "head", "compiled")[0] if man.get("head") else None
    ep, note = _load_tail(artifact_dir, "compiled") if man.get("tail") else (None, "")
    pairs.append(Pair(PAIR_SPLIT, man, head, ep, _inputs_of(man), note))
    if not config.baselines:
        return pairs, notes
    if man.get("head") and man.get("tail"):
        try:
            ort_head = load_half(artifact_dir, "head", "ort")[0]
            ort_ep, _ = _load_tail(artifact_dir, "ort")
            pairs.append(Pair(PAIR_ORT, man, ort_head, ort_ep, _inputs_of(man)))
        except NascError as e:
            notes.append(f"no ONNX Runtime pair: {e}")
    for kind in (PAIR_DEVICE, PAIR_SERVER):
        split_kind = man.get("split", {}).get("kind") or man.get("split", {}).get("index")
        if (kind == PAIR_DEVICE and not man.get("tail")) or (kind == PAIR_SERVER and not man.get("head")):
            notes.append(f"{kind}: the chosen split ({split_kind}) already is this baseline")
            continue
        try:
            d = config.baseline_dirs.get(kind) or _compile_baseline(man, kind, config, workdir, artifact_dir)
            bman = open_artifact(d).manifest
            if kind == PAIR_DEVICE:
                pairs.append(Pair(kind, bman, load_half(d, "head", "compiled")[0], None, _inputs_of(bman)))
            else:
                bep, bnote = _load_tail(d, "compiled")
                pairs.append(Pair(kind, bman, None, bep, _inputs_of(bman), bnote))
        except NascError as e:
            notes.append(f"no {kind} baseline: {e}")
    return pairs, notes


def _compile_baseline(man: dict, kind: str, config: BenchConfig, workdir: Path, artifact_dir) -> Path:
    """Compile the whole model for one side with the chosen split's backend and targets."""
    from nasc.compile import compile_model

    model = config.model if config.model is not None else _source_model(man, artifact_dir)
    kw = {"backend": man.get("backend", "tvm"), "compress": "none", "verify": False}
    for half, key in (("head", "device_target"), ("tail", "server_target")):
        spec = ((man.get(half) or {}).get("target") or {}).get("tvm")
        if spec:
            kw[key] = json.dumps(spec)
    if "server_target" not in kw:
        kw["server_target"] = kw.get("device_target", "llvm")
    if "device_target" not in kw:
        kw["device_target"] = "llvm"
    out = workdir / kind
    compile_model(model, out, split=kind, **kw)
    return out


def _source_model(man: dict, artifact_dir):
    """The source model when the manifest names a bundled example whose hash still matches."""
    import hashlib

    from nasc.examples import EXAMPLES, build

    src = man.get("source") or {}
    name = src.get("name")
    if name in EXAMPLES:
        model = build(name)
        if hashlib.sha256(model.SerializeToString()).hexdigest() == src.get("sha256"):
            return model
    raise NascError(f"{artifact_dir}: the source model {name!r} is not a bundled example with the same sha256; "
                    "pass --model PATH or --baseline device-only=DIR --baseline server-only=DIR")


# ---------------------------------------------------------------- measuring


def _feeds(inputs, rng) -> dict:
    out = {}
    for s in inputs:
        if np.dtype(s.dtype).kind == "f":
            out[s.name] = rng.standard_normal(s.shape).astype(s.dtype)
        else:
            out[s.name] = rng.integers(0, 10, s.shape).astype(s.dtype)
    return out


def _measure_local(pair: Pair, n: int, warmup: int, rng, deadline: float, tick) -> tuple[list[StageTimes], float, dict]:
    """Device-only: the whole model on the device, nothing on the wire."""
    samples, first, wall0 = [], None, time.perf_counter()
    for i in range(warmup + n):
        if time.monotonic() > deadline:
            break
        if i == warmup:
            wall0 = time.perf_counter()
        feeds = _feeds(pair.inputs, rng)
        t0 = time.perf_counter()
        outs = pair.head.run(feeds)
        ms = (time.perf_counter() - t0) * 1e3
        first = first or outs
        if i >= warmup:
            samples.append(StageTimes(ms, 0.0, 0.0, 0.0, 0.0, 0.0, ms, 0, 0))
            tick()
    return samples, time.perf_counter() - wall0, first


def _measure_remote(device: SplitDevice, pair: Pair, n: int, warmup: int, rng, deadline: float, tick):
    samples, first, wall0 = [], None, time.perf_counter()
    for i in range(warmup + n):
        if time.monotonic() > deadline:
            break
        if i == warmup:
            wall0 = time.perf_counter()
        outs, t = device.infer(_feeds(pair.inputs, rng))
        first = first or outs
        if i >= warmup:
            samples.append(t)
            tick()
    return samples, time.perf_counter() - wall0, first


class _Network:
    """Where the device and server sockets live and how links are shaped."""

    def __init__(self, mode: str, remote: tuple[str, int] | None):
        self.netns: NetnsPair | None = None
        self.reason = None
        self.remote = remote
        if remote is None and mode in ("auto", "netns"):
            self.reason = netns_unavailable_reason()
            if self.reason is None:
                try:
                    self.netns = NetnsPair().open()
                except NascError as e:
                    self.reason = str(e)
            if self.netns is None and mode == "netns":
                raise NascError(f"network namespaces are not possible here: {self.reason}")

    def server_socket(self):
        return self.netns.server_socket() if self.netns else None

    def host(self) -> str:
        return self.netns.server_addr if self.netns else "127.0.0.1"

    def shape(self, link: Link | None, trace, seed: int) -> tuple[str, object]:
        if link is None:
            return EMULATION_NONE, None
        if self.netns is not None and trace is None:
            return self.netns.shape(link), self.netns.shaper(link, seed)
        why = "" if self.netns is None and self.reason is None else f" ({self.reason or 'bandwidth traces'})"
        return EMULATION_INPROC + why, Shaper(link, trace, seed=seed)

    def device_socket(self):
        return self.netns.device_socket() if self.netns else None

    def close(self):
        if self.netns:
            self.netns.close()


def _policy(config: BenchConfig, link: Link | None) -> P.CompressionPolicy | None:
    if config.compress == "none":
        return None
    codec = P.best_codec(P.available_codecs_mask()) if config.compress == "auto" else P.codec_by_name(config.compress)
    return P.CompressionPolicy(codec, bandwidth_mbit=link.bandwidth_mbit if link else None)


def run_bench(artifact_dir, config: BenchConfig = BenchConfig(), progress=None) -> dict:
    """Benchmark an artifact over every link of `config`; returns the JSON-ready results.

    `progress(event, **info)` is called with "start" (total), "advance" and "note"."""
    progress = progress or (lambda event, **kw: None)
    if config.requests < 1 or config.warmup < 0:
        raise NascError("--requests must be >= 1 and --warmup >= 0")
    links = [parse_link(t) for t in config.links] or [(None, None)]
    remote = _parse_server(config.server) if config.server else None
    deadline = time.monotonic() + MAX_BENCH_S
    with tempfile.TemporaryDirectory(prefix="nasc-bench-") as work:
        pairs, notes = load_pairs(artifact_dir, config, Path(work))
        for n in notes:
            progress("note", text=n)
        net = _Network(config.emulation, remote)
        handle = None
        try:
            served = [p.endpoint for p in pairs if p.endpoint is not None]
            if remote is None and served:
                handle = start_server(served, "127.0.0.1", 0, sock=net.server_socket())
            host, port = remote if remote else (net.host(), handle.port if handle else 0)
            remote_pairs = [p for p in pairs if p.endpoint is not None]
            total = len(links) * len(remote_pairs) * config.requests + (config.requests if any(
                p.endpoint is None for p in pairs) else 0)
            progress("start", total=total)
            rng = np.random.default_rng(config.seed)
            local = {}
            for p in pairs:
                if p.endpoint is None:
                    progress("note", text=f"{p.name} (no network)")
                    s, wall, out = _measure_local(p, config.requests, config.warmup, rng, deadline,
                                                  lambda: progress("advance", n=1))
                    local[p.name] = (summarize(s, wall), out)
            results = []
            for link, trace in links:
                emulation, shaper = net.shape(link, trace, config.seed)
                entry = {"link": _link_json(link, trace), "emulation": emulation, "pairs": {}}
                outputs = {}
                for p in pairs:
                    if p.endpoint is None:
                        entry["pairs"][p.name] = {**local[p.name][0], "predicted": predicted_for_link(p.manifest, link)}
                        outputs[p.name] = local[p.name][1]
                        continue
                    progress("note", text=f"{entry['link']['name']}: {p.name}")
                    client = DeviceClient(host, port, sock=net.device_socket(), shaper=shaper,
                                          policy=_policy(config, link))
                    dev = SplitDevice(p.head, client, p.endpoint.artifact_hash, p.endpoint.quant,
                                      shared_clock=remote is None)
                    try:
                        s, wall, out = _measure_remote(dev, p, config.requests, config.warmup,
                                                       np.random.default_rng(config.seed), deadline,
                                                       lambda: progress("advance", n=1))
                    finally:
                        client.close()
                    entry["pairs"][p.name] = {**summarize(s, wall), "predicted": predicted_for_link(p.manifest, link),
                                              **({"note": p.note} if p.note else {})}
                    outputs[p.name] = out
                entry["check"] = _check(outputs)
                results.append(entry)
        finally:
            if handle is not None:
                handle.close()
            net.close()
    return _report(artifact_dir, config, pairs, results, notes, remote)


def _check(outputs: dict) -> dict:
    """The split's first answer against the ONNX Runtime pair's answer to the same input."""
    a, b = outputs.get(PAIR_SPLIT), outputs.get(PAIR_ORT)
    if not a or not b:
        return {}
    diff = max(float(np.max(np.abs(np.asarray(a[k], np.float64) - np.asarray(b[k], np.float64)))) for k in a if k in b)
    ok = all(np.allclose(np.asarray(a[k], np.float64), np.asarray(b[k], np.float64), atol=CHECK_ATOL, rtol=CHECK_RTOL)
             for k in a if k in b)
    return {"split_vs_ort_pair_max_abs_diff": diff, "ok": bool(ok)}


def _parse_server(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit():
        raise NascError(f"--server {text!r}: expected HOST:PORT")
    return host, int(port)


def _link_json(link: Link | None, trace) -> dict:
    if link is None:
        return {"name": "loopback", "bandwidth_mbit": None, "rtt_ms": 0.0, "loss_pct": 0.0}
    d = {"name": link.name, "bandwidth_mbit": link.bandwidth_mbit, "rtt_ms": link.rtt_ms, "loss_pct": link.loss_pct}
    if trace is not None:
        d["trace"] = [list(s) for s in trace.steps]
    return d


def _report(artifact_dir, config, pairs, results, notes, remote) -> dict:
    split = pairs[0].manifest
    tail_t = (split.get("tail") or {}).get("target")
    host = host_description()
    on_cpu = remote is None and (host["gpu"] is None or "cuda" not in json.dumps(tail_t))
    server_desc = (f"this CPU ({host['cpu']}, {host['cores']} cores); no GPU available" if on_cpu and host["gpu"] is None
                   else f"this host, target {tail_t}" if remote is None else f"remote {config.server}")
    out = {
        "artifact": str(artifact_dir),
        "source_sha256": (split.get("source") or {}).get("sha256"),
        "split": split.get("split"),
        "compress": (split.get("compress") or {}).get("kind", "none"),
        "manifest_predicted": split.get("predicted"),
        "server": server_desc,
        "device": f"this CPU ({host['cpu']})",
        "requests": config.requests,
        "warmup": config.warmup,
        "codecs": [P.CODEC_NAMES[c] for c in sorted(P.CODECS)],
        "notes": notes + [p.note for p in pairs if p.note],
        "links": results,
    }
    out["benefit"] = benefit(results, (split.get("split") or {}).get("kind"))
    return out


def benefit(results: list[dict], split_kind: str | None = None) -> list[dict]:
    """Per link: measured p50 e2e of the split against the best of device-only and server-only.
    A split that is itself device-only (or server-only) stands in for that baseline."""
    rows = []
    for entry in results:
        pr = entry["pairs"]
        if PAIR_SPLIT not in pr:
            continue
        split = pr[PAIR_SPLIT]["e2e_ms"]["p50"]
        base = {k: pr[k]["e2e_ms"]["p50"] for k in (PAIR_DEVICE, PAIR_SERVER) if k in pr}
        if split_kind in (PAIR_DEVICE, PAIR_SERVER):
            base[split_kind] = split
        if not base:
            continue
        best = min(base, key=base.get)
        rows.append({"link": entry["link"]["name"], "split_ms": split, "best_baseline": best,
                     "best_baseline_ms": base[best], "speedup": round(base[best] / split, 3) if split > 0 else None})
    return rows


def write_json(results: dict, path) -> Path:
    """Write atomically (temp file, then rename)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=p.name, dir=p.parent)
    with os.fdopen(fd, "w") as f:
        json.dump(results, f, indent=2, sort_keys=False)
    os.replace(tmp, p)
    return p


def plot(results: dict, stem) -> list[Path]:
    """PNG plots next to `stem`: per-link stage breakdown and e2e vs bandwidth. [] without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    stem = Path(stem)
    made = []
    links = results["links"]
    stages = [s for s in STAGES if s != "e2e_ms"]
    fig, axes = plt.subplots(1, len(links), figsize=(4.5 * len(links), 4), squeeze=False)
    for ax, entry in zip(axes[0], links):
        names = list(entry["pairs"])
        bottom = np.zeros(len(names))
        for stage in stages:
            v = np.array([entry["pairs"][n][stage]["p50"] for n in names])
            ax.bar(names, v, bottom=bottom, label=stage.replace("_ms", ""))
            bottom += v
        pred = [(entry["pairs"][n].get("predicted") or {}).get("total_ms") for n in names]
        ax.scatter([i for i, v in enumerate(pred) if v is not None], [v for v in pred if v is not None],
                   marker="x", color="k", zorder=3, label="predicted")
        ax.set_title(entry["link"]["name"])
        ax.set_ylabel("p50 latency (ms)")
        ax.tick_params(axis="x", rotation=30)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    made.append(_save(fig, stem.with_name(stem.name + "_breakdown.png")))
    plt.close(fig)
    bw_links = [e for e in links if e["link"].get("bandwidth_mbit")]
    if bw_links:
        fig, ax = plt.subplots(figsize=(6, 4))
        order = sorted(bw_links, key=lambda e: e["link"]["bandwidth_mbit"])
        for name in order[0]["pairs"]:
            xs = [e["link"]["bandwidth_mbit"] for e in order if name in e["pairs"]]
            ys = [e["pairs"][name]["e2e_ms"]["p50"] for e in order if name in e["pairs"]]
            ax.plot(xs, ys, marker="o", label=name)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("link bandwidth (Mbit/s)")
        ax.set_ylabel("end-to-end p50 (ms)")
        ax.legend()
        fig.tight_layout()
        made.append(_save(fig, stem.with_name(stem.name + "_e2e.png")))
        plt.close(fig)
    return made


def _save(fig, path: Path) -> Path:
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    os.replace(tmp, path)
    return path
