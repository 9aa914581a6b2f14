"""Open a nasc artifact directory and run one half: what a device or server runs.

Opening checks the manifest format and the sha256 of every file; loading a half checks
that its target can run on this machine. Needs only the TVM runtime (or ORT for ONNX halves).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from nasc.backends.artifacts import FORMAT, MANIFEST, sha256_file
from nasc.errors import ArtifactError
from nasc.types import TensorSpec

HALVES = ("head", "tail")


@dataclass
class Half:
    """A loaded head or tail: validated numpy feeds in, outputs by name out."""

    name: str
    target: str
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    runner: object
    engine: str  # "tvm" or "ort"

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        for spec in self.inputs:
            if spec.name not in feeds:
                raise ArtifactError(f"{self.name}: missing input '{spec.name}'")
            x = feeds[spec.name]
            if tuple(x.shape) != spec.shape or x.dtype != np.dtype(spec.dtype):
                raise ArtifactError(
                    f"{self.name}: input '{spec.name}' is {x.dtype}{list(x.shape)}, expected {spec.dtype}{list(spec.shape)}"
                )
        return self.runner({s.name: feeds[s.name] for s in self.inputs})


class Artifact:
    """A verified artifact directory (hashes checked on open)."""

    def __init__(self, path: Path, manifest: dict):
        self.path = path
        self.manifest = manifest

    def load(self, half: str, device: str | None = None, engine: str | None = None) -> Half:
        """Load `half` ("head" or "tail"). engine "tvm" (default when a library exists) or "ort"."""
        if half not in HALVES:
            raise ArtifactError(f"unknown half '{half}'; expected head or tail")
        entry = self.manifest.get(half)
        if entry is None:
            raise ArtifactError(f"{self.path}: this split has no {half} (split kind {self.manifest['split']['kind']})")
        inputs = [TensorSpec.from_json(d) for d in entry["inputs"]]
        outputs = [TensorSpec.from_json(d) for d in entry["outputs"]]
        engine = engine or ("tvm" if entry.get("library") else "ort")
        if engine == "ort":
            from nasc.backends import ort

            runner = ort.Runner((self.path / entry["onnx"]).read_bytes())
            return Half(half, "onnxruntime-cpu", inputs, outputs, runner, "ort")
        if not entry.get("library"):
            raise ArtifactError(f"{self.path}: {half} has no compiled library (built with --backend ort)")
        from nasc.backends.targets import Target
        from nasc.backends.tvm import Runner, load_library

        target = Target.from_manifest(entry["target"])
        if not target.runs_here():
            raise ArtifactError(
                f"{self.path}: {half} is compiled for {entry['target']['name']} ({json.dumps(entry['target']['tvm'])}), "
                "which cannot run on this machine"
            )
        lib = load_library(self.path / entry["library"])
        runner = Runner(lib, device or target.device, [s.name for s in inputs], [s.name for s in outputs])
        return Half(half, entry["target"]["name"], inputs, outputs, runner, "tvm")


def open_artifact(path: str | Path) -> Artifact:
    """Read OUT/manifest.json and check every listed file's sha256. ArtifactError names the file."""
    root = Path(path)
    mpath = root / MANIFEST
    if not mpath.is_file():
        raise ArtifactError(f"{root}: not a nasc artifact (no {MANIFEST})")
    try:
        manifest = json.loads(mpath.read_text())
    except json.JSONDecodeError as e:
        raise ArtifactError(f"{mpath}: not valid JSON ({e})") from None
    if manifest.get("format") != FORMAT:
        raise ArtifactError(f"{mpath}: format {manifest.get('format')!r}, expected {FORMAT!r}")
    for rel, digest in manifest.get("files", {}).items():
        f = root / rel
        if not f.is_file():
            raise ArtifactError(f"{root}: missing file {rel} listed in the manifest")
        if sha256_file(f) != digest:
            raise ArtifactError(f"{root}: {rel} does not match its sha256 in the manifest (corrupted or modified)")
    return Artifact(root, manifest)
