"""TVM Relax backend: import an ONNX half, run a per-target pass pipeline, export a library.

Each target's pipeline is a readable list of named TVM passes (printed with --verbose),
built from the same stages as TVM's own cpu_generic and cuda pipelines; CPU targets add
nasc's default schedules (backends/cpu_schedules.py), so untuned code is close to ORT.
"""

from __future__ import annotations

import hashlib
import os
from functools import lru_cache
from pathlib import Path
from typing import Callable

import numpy as np
from onnx import ModelProto

from nasc.backends.targets import Target, require_cross_compiler
from nasc.errors import UnsupportedOpError

LIBRARY_NAME = "model.so"
# TVM wraps host arrays without a copy only when their data is aligned to this many bytes
TENSOR_ALIGNMENT = 64
# the modules whose code decides what a compiled half is and how it is timed end to end
# (time_model_ms): the benchmarks' measured cut times depend on these alone
COMPILE_MODULES = ("nasc.backends.tvm", "nasc.backends.cpu_schedules", "nasc.backends.cpu_rules.lowering",
                   "nasc.backends.cpu_rules.tir_rules", "nasc.backends.cpu_rules.vector_spec",
                   "nasc.backends.cpu_rules.winograd", "nasc.backends.cuda",
                   "nasc.passes.pad_channels", "nasc.passes.split")
# and how its kernels are timed alone and in place, and replayed (kernel profiles and records)
PIPELINE_MODULES = COMPILE_MODULES + ("nasc.backends.profile", "nasc.backends.context")
# time_evaluator settings. Each repeat averages calls over >= MIN_REPEAT_MS; the fastest repeat
# is kept: on a shared machine other work only ever adds time, so the minimum is the stable figure.
NUMBER, REPEAT, MIN_REPEAT_MS = 5, 7, 20


@lru_cache(maxsize=None)
def pipeline_fingerprint(modules: tuple[str, ...] = PIPELINE_MODULES) -> str:
    """A short hash of TVM's version and the source of `modules`: times recorded under another
    fingerprint were taken of other code (benchmark caches compare it to re-measure). A half's
    end-to-end time depends on COMPILE_MODULES only, and keeps when the in-place timing changes."""
    import importlib
    import inspect

    import tvm

    digest = hashlib.sha256(tvm.__version__.encode())
    for name in modules:
        digest.update(inspect.getsource(importlib.import_module(name)).encode())
    return digest.hexdigest()[:16]


def supported_ops() -> set[str]:
    from tvm.relax.frontend.onnx import onnx_frontend

    return set(onnx_frontend._get_convert_map())


def check_ops(model: ModelProto, where: str) -> None:
    """UnsupportedOpError naming the first node whose op TVM's ONNX importer lacks."""
    ok = supported_ops()
    for n in model.graph.node:
        if n.domain not in ("", "ai.onnx") or n.op_type not in ok:
            raise UnsupportedOpError(
                f"{where}: node '{n.name}' uses op {n.domain + '.' if n.domain else ''}{n.op_type}, "
                "which the TVM backend cannot import; use --backend ort or cut before it"
            )


def import_onnx(model: ModelProto, where: str = "model"):
    """ONNX -> Relax IRModule with weights bound as constants."""
    from tvm.relax.frontend.onnx import from_onnx

    check_ops(model, where)
    try:
        return from_onnx(model, keep_params_in_input=False)
    except Exception as e:  # the importer's own complaints are about the model
        raise UnsupportedOpError(f"{where}: TVM cannot import the model: {str(e).splitlines()[-1][:300]}") from None


def target_graph(model: ModelProto, target: Target, log: Callable[[str], None] | None = None) -> ModelProto:
    """The ONNX graph compiled for `target`: on a CPU, conv channels padded to the block they run
    fastest in (see backends.cpu_schedules.pad_for_cpu); the same outputs, in the same layout."""
    if target.kind == "cuda":
        return model
    from nasc.backends.cpu_schedules import cpu_vector_spec, pad_for_cpu

    padded, block = pad_for_cpu(model, cpu_vector_spec(target.tvm()).channel_block)
    if block and log:
        log(f"pad-channels-{block}")
    return padded


def target_layouts(model: ModelProto, target: Target) -> dict:
    """The tensors of `model` that `target_graph` widens: for each, (padded channel count, the
    padded index of each real channel); see passes.pad_channels.channel_layouts."""
    if target.kind == "cuda":
        return {}
    from nasc.backends.cpu_schedules import cpu_vector_spec, padding_block
    from nasc.passes.pad_channels import channel_layouts

    block = padding_block(model, cpu_vector_spec(target.tvm()).channel_block)
    return channel_layouts(model, block) if block else {}


def import_for_target(model: ModelProto, target: Target, where: str = "model",
                      log: Callable[[str], None] | None = None):
    """`import_onnx` of `target_graph`: the Relax module the target's pipeline starts from."""
    return import_onnx(target_graph(model, target, log), where)


def default_schedule_rules(target: Target) -> list:
    """The dlight-style rules, in priority order, that schedule every kernel no tuning record covers.

    The pipeline applies them after FuseTIR; tuning measures what they make as its starting point.
    """
    from tvm.s_tir import dlight as dl

    if target.kind == "cuda":
        return [dl.gpu.Matmul(), dl.gpu.GEMV(), dl.gpu.Reduction(), dl.gpu.GeneralReduction(), dl.gpu.Fallback()]
    from nasc.backends.cpu_rules.tir_rules import default_rules
    from nasc.backends.cpu_rules.vector_spec import cpu_vector_spec

    return default_rules(cpu_vector_spec(target.tvm()))


def pipeline(target: Target) -> list[tuple[str, object]]:
    """The named pass list that lowers an imported Relax module for `target`."""
    from tvm import relax

    t = target.tvm()
    if target.kind == "cuda":
        from tvm.relax.backend.cuda import pipeline as stages
        from tvm.s_tir import dlight as dl

        legalize = [
            ("legalize-ops", relax.transform.LegalizeOps()),
            ("annotate-op-pattern", relax.transform.AnnotateTIROpPattern()),
            ("fold-constant", relax.transform.FoldConstant()),
            ("fuse-ops", relax.transform.FuseOps()),
            ("fuse-tir", relax.transform.FuseTIR()),
            ("dlight-gpu-schedules", dl.ApplyDefaultSchedule(*default_schedule_rules(target))),
        ]
    else:
        from tvm.relax.backend.cpu_generic import pipeline as stages
        from tvm.s_tir import dlight as dl

        from nasc.backends.cpu_schedules import cpu_layout_passes

        legalize = [(f"cpu-layout-{i}", p) for i, p in enumerate(cpu_layout_passes(t))] + [
            ("legalize-ops", relax.transform.LegalizeOps()),
            ("annotate-op-pattern", relax.transform.AnnotateTIROpPattern()),
            ("fold-constant", relax.transform.FoldConstant()),
            ("fuse-ops", relax.transform.FuseOps()),
            ("fuse-tir", relax.transform.FuseTIR()),
            ("cpu-schedules", dl.ApplyDefaultSchedule(*default_schedule_rules(target))),
        ]
    named = lambda passes: [(type(p).__name__ if not hasattr(p, "info") else p.info.name, p) for p in passes]  # noqa: E731
    return (
        named(stages.library_dispatch_passes(t))
        + legalize
        + named(stages.dataflow_lower_passes(t))
        + named(stages.finalize_passes(t))
    )


def with_tuning_database(steps: list[tuple[str, object]]) -> list[tuple[str, object]]:
    """`steps` with MetaSchedule's best schedules applied right after fusion, before the default schedules."""
    from tvm import relax

    at = next(i for i, (name, _) in enumerate(steps) if name == "fuse-tir") + 1
    return steps[:at] + [("apply-tuning-db", relax.transform.MetaScheduleApplyDatabase())] + steps[at:]


def compile_model(model: ModelProto, target: Target, where: str = "model", log: Callable[[str], None] | None = None,
                  database=None):
    """Compile one ONNX half for `target`; returns a TVM relax Executable.

    With a MetaSchedule `database` (see nasc.backends.tuning) its tuned kernels replace the
    default schedules; kernels it lacks keep them.
    """
    import contextlib

    import tvm

    mod = import_for_target(model, target, where, log)
    t = target.tvm()
    with t:  # the database pass reads the current target when it is made
        steps = pipeline(target) if database is None else with_tuning_database(pipeline(target))

    @tvm.transform.module_pass(opt_level=0, name="nasc_pipeline")
    def _run(mod, _ctx):
        with t, (database if database is not None else contextlib.nullcontext()):
            for name, p in steps:
                if log:
                    log(name)
                mod = p(mod)
        return mod

    return tvm.compile(mod, target=t, relax_pipeline=_run)


def time_model_ms(model: ModelProto, target, executable=None, database=None) -> float:
    """Milliseconds of one call of a compiled model on `target` (which must run here): the fastest repeat."""
    import tvm
    from tvm import relax

    from nasc.compile import sample_inputs

    ex = executable or compile_model(model, target, database=database)
    dev = tvm_device(target.device)
    vm = relax.VirtualMachine(ex, dev)
    args = [tvm.runtime.tensor(x, dev) for x in sample_inputs(model, 1)[0].values()]
    f = vm.time_evaluator("main", dev, number=NUMBER, repeat=REPEAT, min_repeat_ms=MIN_REPEAT_MS)
    return float(np.min(f(*args).results) * 1e3)


def export(executable, path: Path, target: Target) -> None:
    """Write the shared library for `target`: cross-linked for aarch64, CUDA kernels as an nvcc fatbin."""
    cc = require_cross_compiler(target)
    if target.kind == "cuda":
        from nasc.backends.cuda import fatbin_packer

        executable.export_library(str(path), fpack_imports=fatbin_packer(target.spec["arch"]))
    elif cc:
        import tvm.support

        executable.export_library(str(path), fcompile=tvm.support.cc.cross_compiler(cc))
    else:
        executable.export_library(str(path))


def tvm_device(device: str):
    """The TVM device for a target's `device` ("cuda" or "cpu")."""
    import tvm

    if device == "cuda":
        from nasc.backends.targets import load_cuda_runtime

        load_cuda_runtime()
        return tvm.cuda(0)
    return tvm.cpu(0)


class Runner:
    """Runs a compiled library with the TVM VM; feeds and results are numpy arrays in ONNX order.

    It needs only the TVM runtime (a device may run with TVM_USE_RUNTIME_LIB=1 and no compiler).
    """

    def __init__(self, library, device: str, input_names: list[str], output_names: list[str]):
        from tvm.runtime.vm import VirtualMachine

        import tvm

        self.dev = tvm_device(device)
        self.vm = VirtualMachine(library, self.dev)
        self.input_names = input_names
        self.output_names = output_names
        self.on_host = self.dev.dlpack_device_type() == tvm.cpu().dlpack_device_type()
        self.staged: dict[str, object] = {}

    def _argument(self, name: str, x: np.ndarray):
        """The feed as a TVM tensor: on the host an aligned, contiguous, writable array is wrapped as it is;
        anything else is copied into a tensor kept for this input. A fresh tensor per call cost
        63 us for a 224 px image (its pages are faulted in anew), 17 us copied, none wrapped."""
        import tvm

        if self.on_host and x.flags.c_contiguous and x.flags.writeable and x.ctypes.data % TENSOR_ALIGNMENT == 0:
            return tvm.runtime.from_dlpack(x)
        staged = self.staged.get(name)
        if staged is None or tuple(staged.shape) != x.shape or str(staged.dtype) != str(x.dtype):
            staged = self.staged[name] = tvm.runtime.empty(x.shape, str(x.dtype), self.dev)
        if self.on_host:
            np.copyto(np.from_dlpack(staged), x)   # strided feeds too: one copy, no contiguous one first
        else:
            staged.copyfrom(np.ascontiguousarray(x))
        return staged

    def __call__(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        args = [self._argument(n, feeds[n]) for n in self.input_names]
        out = self.vm["main"](*args)
        outs = [out] if len(self.output_names) == 1 and hasattr(out, "numpy") else list(out)
        if not self.on_host:
            return {n: o.numpy() for n, o in zip(self.output_names, outs)}
        # Host results are handed over, not copied: each call's outputs are fresh tensors (a
        # function's results are never planned into storage a later call reuses), and a copy into
        # a fresh numpy array cost more than the kernels (Inception's head at its 33rd cut: four
        # 800 KB outputs, 1.2 ms of kernels, 1.4 ms more in .numpy()). An output that is an input
        # passed through is copied: its storage is the caller's array or one the next call refills.
        inputs = {a.data_ptr() for a in args}
        return {n: np.from_dlpack(o).copy() if o.data_ptr() in inputs else np.from_dlpack(o)
                for n, o in zip(self.output_names, outs)}


def load_library(path: Path):
    import tvm

    return tvm.runtime.load_module(str(path))


def set_threads(n: int | None = None) -> None:
    """TVM's thread pool defaults to one thread here; use every core unless told otherwise."""
    os.environ.setdefault("TVM_NUM_THREADS", str(n or os.cpu_count() or 1))
