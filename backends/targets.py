"""Compilation targets by name or JSON dict: llvm (this host), aarch64 (cross), cuda[:sm_XX].

A Target knows its TVM target dict, which device it runs on, whether this machine can run
it, and how to link its library (the Debian cross gcc for aarch64).
"""

from __future__ import annotations

import json
import platform
import shutil
from dataclasses import dataclass
from functools import lru_cache

from nasc.defaults import DEFAULT_CUDA_ARCH
from nasc.errors import TargetError

AARCH64_GCC = "aarch64-linux-gnu-gcc"
NAMES = "llvm, aarch64, cuda[:sm_XX] or a JSON dict such as '{\"kind\": \"llvm\", \"mtriple\": \"aarch64-linux-gnu\"}'"


@dataclass(frozen=True)
class Target:
    """One compilation target. `spec` is the TVM target dict, stored in manifests as is."""

    name: str
    spec_json: str

    @property
    def spec(self) -> dict:
        return json.loads(self.spec_json)

    @property
    def kind(self) -> str:
        return self.spec["kind"]

    @property
    def device(self) -> str:
        return "cuda" if self.kind == "cuda" else "cpu"

    @property
    def triple(self) -> str | None:
        return self.spec.get("mtriple")

    @property
    def cross_compiler(self) -> str | None:
        t = self.triple
        return AARCH64_GCC if t and t.startswith("aarch64") and platform.machine() != "aarch64" else None

    def tvm(self):
        import tvm

        return tvm.target.Target(self.spec)

    def runs_here(self) -> bool:
        """Whether a library built for this target can execute on this machine."""
        if self.kind == "cuda":
            return _cuda_available()
        t = self.triple
        return t is None or t.split("-")[0] == platform.machine()

    def to_json(self) -> dict:
        return {"name": self.name, "tvm": self.spec}

    @classmethod
    def from_manifest(cls, entry: dict) -> "Target":
        """The target a manifest recorded (its `to_json`), unvalidated: the manifest is hashed and
        was checked when compiled, and a device that runs artifacts may have only the TVM runtime."""
        return cls(entry["name"], json.dumps(entry["tvm"], sort_keys=True))


@lru_cache(maxsize=1)
def load_cuda_runtime() -> None:
    """Make TVM's CUDA runtime available. TVM loads it with its compiler backends; a server
    running artifacts with the TVM runtime alone (TVM_USE_RUNTIME_LIB=1) loads it here."""
    import tvm.base

    if "tvm_runtime_cuda" in tvm.base._LOADED_LIBS:
        return
    from pathlib import Path

    from tvm_ffi.libinfo import load_lib_ctypes

    lib_dir = Path(tvm.base._LOADED_LIBS["tvm_runtime"]._name).resolve().parent
    try:
        tvm.base._LOADED_LIBS["tvm_runtime_cuda"] = load_lib_ctypes(
            package="tvm", target_name="tvm_runtime_cuda", extra_lib_paths=[lib_dir], mode="RTLD_LOCAL")
    except (OSError, FileNotFoundError, RuntimeError):
        pass  # no CUDA driver or runtime here: CUDA devices do not exist


@lru_cache(maxsize=1)
def _cuda_available() -> bool:
    try:
        import tvm

        load_cuda_runtime()
        return bool(tvm.cuda(0).exist)
    except Exception:  # no CUDA runtime library at all
        return False


@lru_cache(maxsize=1)
def host_cpu() -> str:
    import tvm

    return tvm.target.codegen.llvm_get_system_cpu()


def _validate(name: str, spec: dict) -> Target:
    if spec.get("kind") not in ("llvm", "cuda"):
        raise TargetError(f"target '{name}': kind must be llvm or cuda, got {spec.get('kind')!r}")
    try:
        import tvm

        tvm.target.Target(spec)
    except Exception as e:
        raise TargetError(f"target '{name}': TVM rejects {json.dumps(spec)}: {str(e).splitlines()[-1][:200]}") from None
    return Target(name, json.dumps(spec, sort_keys=True))


def resolve_target(text: str | dict) -> Target:
    """Parse a target given on the command line or in Python. TargetError names it if unknown."""
    if isinstance(text, dict):
        return _validate(text.get("kind", "?"), dict(text))
    t = text.strip()
    if t.startswith("{"):
        try:
            spec = json.loads(t)
        except json.JSONDecodeError as e:
            raise TargetError(f"target '{t}': not valid JSON ({e})") from None
        name = "aarch64" if str(spec.get("mtriple", "")).startswith("aarch64") else spec.get("kind", "?")
        return _validate(name, spec)
    base, _, opt = t.partition(":")
    base = base.lower()
    if base in ("llvm", "host", "cpu"):
        return _validate("llvm", {"kind": "llvm", "mcpu": opt or host_cpu()})
    if base in ("aarch64", "arm64"):
        spec = {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon"]}
        if opt:
            spec["mcpu"] = opt
        return _validate("aarch64", spec)
    if base == "cuda":
        arch = opt or DEFAULT_CUDA_ARCH
        if not arch.startswith("sm_") or not arch[3:].isdigit():
            raise TargetError(f"target '{t}': CUDA arch must look like sm_80 or sm_90")
        return _validate("cuda", {"kind": "cuda", "arch": arch})
    raise TargetError(f"unknown target '{t}'; use {NAMES}")


def require_cross_compiler(target: Target) -> str | None:
    """Path of the linker a target needs, or TargetError saying how to install it."""
    cc = target.cross_compiler
    if cc and shutil.which(cc) is None:
        raise TargetError(
            f"target '{target.name}' needs the cross compiler {cc}; install it with "
            "`apt-get install gcc-aarch64-linux-gnu` (make setup does this)"
        )
    return cc
