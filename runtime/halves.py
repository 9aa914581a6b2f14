"""Runnable halves for the runtimes: a compiled half of an artifact, or the same half's ONNX
through ONNX Runtime (the baseline pair), plus the identity both sides agree on over the wire.

An `Endpoint` is what a server serves and a device addresses: one hash, the specs and
quantization the frames must match, and a pool of runners (one per worker thread).
"""

from __future__ import annotations

import hashlib
import os
import queue
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from nasc.backends.artifacts import MANIFEST as MANIFEST_FILE
from nasc.errors import ArtifactError
from nasc.runtime.artifact import HALVES, Artifact, open_artifact
from nasc.runtime.protocol import HASH_BYTES, Quant
from nasc.types import TensorSpec

ORT_VARIANT = b"onnxruntime"


def manifest_hash(artifact_dir: str | Path) -> bytes:
    """sha256 of the artifact's manifest.json; the manifest pins every file's sha256."""
    path = Path(artifact_dir) / MANIFEST_FILE
    try:
        return hashlib.sha256(path.read_bytes()).digest()
    except FileNotFoundError:
        raise ArtifactError(f"{path}: no manifest.json; is this an artifact directory made by nasc-compile?") from None


def variant_hash(base: bytes, variant: bytes) -> bytes:
    """A distinct, stable wire identity for another runner of the same artifact half."""
    return hashlib.sha256(base + b"\0" + variant).digest()


def quant_of(manifest: dict, names) -> dict[str, Quant]:
    """The manifest's quantization parameters of the named wire tensors (absent: not quantized).
    manifest["compress"]["tensors"] is keyed by the cut tensor; `wire_name` is what crosses."""
    comp = manifest.get("compress") or {}
    if comp.get("kind", "none") == "none":
        return {}
    by_wire = {d.get("wire_name", n): d for n, d in (comp.get("tensors") or {}).items()}
    return {n: Quant.from_manifest(by_wire[n]) for n in names if n in by_wire}


@dataclass(frozen=True)
class Endpoint:
    """One half served under one wire hash; `runners` holds one runner per worker thread."""

    name: str
    artifact_hash: bytes
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    quant: dict
    runners: "queue.SimpleQueue"
    workers: int

    def __post_init__(self):
        if len(self.artifact_hash) != HASH_BYTES:
            raise ValueError("endpoint hash must be a sha256 digest")


def make_endpoint(name: str, artifact_hash: bytes, runners: list, quant: dict | None = None) -> Endpoint:
    """Wrap ready runners (objects with .inputs, .outputs, .run(feeds)) as one endpoint."""
    pool = queue.SimpleQueue()
    for r in runners:
        pool.put(r)
    first = runners[0]
    return Endpoint(name, artifact_hash, tuple(first.inputs), tuple(first.outputs), dict(quant or {}), pool, len(runners))


class OrtHalf:
    """An ONNX file run by ONNX Runtime with the same interface as a compiled Half."""

    def __init__(self, onnx_path: str | Path, threads: int | None = None):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads or default_threads()
        opts.inter_op_num_threads = 1
        self.path = Path(onnx_path)
        try:
            self.session = ort.InferenceSession(str(self.path), opts, providers=["CPUExecutionProvider"])
        except Exception as e:  # onnxruntime raises its own exception types for unreadable models
            raise ArtifactError(f"{self.path}: ONNX Runtime cannot load this half ({e})") from None
        self.inputs = [_spec(v) for v in self.session.get_inputs()]
        self.outputs = [_spec(v) for v in self.session.get_outputs()]

    def run(self, feeds: dict) -> dict:
        outs = self.session.run([o.name for o in self.outputs], {k: np.asarray(v) for k, v in feeds.items()})
        return dict(zip((o.name for o in self.outputs), outs))


_ORT_DTYPES = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(double)": "float64",
               "tensor(uint8)": "uint8", "tensor(int8)": "int8", "tensor(int32)": "int32",
               "tensor(int64)": "int64", "tensor(bool)": "bool"}


def _spec(v) -> TensorSpec:
    shape = tuple(d if isinstance(d, int) else 1 for d in v.shape)
    return TensorSpec(v.name, shape, _ORT_DTYPES.get(v.type, "float32"))


def half_runner(art: Artifact, half: str, engine: str, device: str | None):
    """One runner of an opened artifact's half: "compiled" is the artifact's own runtime (TVM
    when it has a library), "ort" runs the half's ONNX file with ONNX Runtime."""
    if half not in HALVES:
        raise ValueError(f"half must be one of {HALVES}")
    if art.manifest.get(half) is None:
        raise ArtifactError(f"{art.path}: this split has no {half} (split {art.manifest.get('split', {}).get('index')!r})")
    if engine == "compiled":
        return art.load(half, device=device)
    if engine == "ort":
        return art.load(half, engine="ort")
    raise ValueError(f"unknown engine {engine!r}")


def wire_hash(artifact_dir: str | Path, engine: str) -> bytes:
    base = manifest_hash(artifact_dir)
    return base if engine == "compiled" else variant_hash(base, ORT_VARIANT)


def load_half(artifact_dir: str | Path, half: str, engine: str = "compiled", device: str | None = None):
    """(runner, manifest, hash) for one half, through the artifact API (hashes and target checked);
    the "ort" engine is served under a distinct wire hash."""
    art = open_artifact(artifact_dir)
    return half_runner(art, half, engine, device), art.manifest, wire_hash(artifact_dir, engine)


def load_endpoint(artifact_dir: str | Path, half: str = "tail", engine: str = "compiled",
                  workers: int = 1, device: str | None = None) -> Endpoint:
    """An endpoint serving one half of an artifact, with `workers` independent runners.

    The artifact is opened (every file hashed) once, however many runners it gets."""
    art = open_artifact(artifact_dir)
    runners = [half_runner(art, half, engine, device) for _ in range(max(1, workers))]
    name = f"{Path(artifact_dir).name}:{half}:{engine}"
    return make_endpoint(name, wire_hash(artifact_dir, engine), runners,
                         quant_of(art.manifest, [s.name for s in runners[0].inputs]))


def default_threads() -> int:
    """Intra-op threads of one runner; TVM reads TVM_NUM_THREADS, ORT gets the same number."""
    return int(os.environ.get("TVM_NUM_THREADS", "1"))
