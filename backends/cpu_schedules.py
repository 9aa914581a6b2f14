"""Default (untuned) CPU schedules for the kernels that dominate CNNs and ViTs, x86-64 and aarch64.

Two hooks for the llvm pipeline (stages as in tvm/relax/backend/cpu_generic/pipeline.py):
  * `cpu_layout_passes(target)`: on the Relax module, right before `LegalizeOps`. Converts conv2d
    to NCHW{c}c / OIHW{c}o (one block c per model, see `conv_block`) and constant matmul weights
    to column panels (both re-packed at compile time by the `FoldConstant` that follows
    LegalizeOps) and lowers those ops to TIR itself.
  * `cpu_schedule_passes(target)`: on the fused TIR, right after `FuseTIR`. dlight-style rules
    tile, vectorise and parallelise conv, matmul, pooling and (fallback) everything else.
`scheduled_cpu_pipeline(target)` is TVM's cpu_generic pipeline with both inserted there.
"""

from __future__ import annotations

import tvm
from tvm.relax.backend.cpu_generic import pipeline as cpu_generic
from tvm.s_tir import dlight as dl

from .cpu_rules.lowering import CONV_BLOCK_NAME, MATMUL_BLOCK_NAME, block_fits, conv_block, lowering_passes
from .cpu_rules.tir_rules import default_rules
from .cpu_rules.vector_spec import CpuVectorSpec, cpu_vector_spec

__all__ = ["CONV_BLOCK_NAME", "MATMUL_BLOCK_NAME", "CpuVectorSpec", "block_fits", "conv_block", "cpu_layout_passes",
           "cpu_schedule_passes", "cpu_vector_spec", "scheduled_cpu_pipeline"]


def cpu_layout_passes(target: tvm.target.Target,
                      spec: CpuVectorSpec | None = None) -> list[tvm.transform.Pass]:
    """Relax passes to run right before LegalizeOps."""
    spec = spec or cpu_vector_spec(target)
    return lowering_passes(spec.channel_block, spec.matmul_cols)


def cpu_schedule_passes(target: tvm.target.Target,
                        spec: CpuVectorSpec | None = None) -> list[tvm.transform.Pass]:
    """TIR passes to run right after FuseTIR; PrimFuncs already marked scheduled are kept."""
    return [dl.ApplyDefaultSchedule(*default_rules(spec or cpu_vector_spec(target)))]


def scheduled_cpu_pipeline(target: tvm.target.Target,
                           spec: CpuVectorSpec | None = None) -> tvm.transform.Pass:
    """TVM's cpu_generic pipeline with the layout passes and schedule rules inserted."""
    legalize = cpu_generic.legalize_passes(target)
    fuse_tir_at = [p.info.name for p in legalize].index("FuseTIR") + 1
    passes = (cpu_generic.library_dispatch_passes(target) + cpu_layout_passes(target, spec)
              + legalize[:fuse_tir_at] + cpu_schedule_passes(target, spec)
              + legalize[fuse_tir_at:]
              + cpu_generic.dataflow_lower_passes(target) + cpu_generic.finalize_passes(target))

    @tvm.transform.module_pass(opt_level=0, name="NascScheduledCpuPipeline")
    def _pipeline(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        with target:
            return tvm.transform.Sequential(passes)(mod)

    return _pipeline


# ops whose TVM layout inference keeps the layout of their (first) input
_LAYOUT_FOLLOWERS = {"Add", "Mul", "Sub", "Div", "Relu", "Clip", "Sigmoid", "Tanh", "HardSwish", "HardSigmoid",
                     "LeakyRelu", "BatchNormalization", "MaxPool", "AveragePool", "GlobalAveragePool",
                     "GlobalMaxPool", "Max", "Min", "Neg", "Abs", "Exp", "Sqrt", "Erf", "Concat"}


def runs_blocked(op_type: str, in_channels: int, out_channels: int, groups: int, inputs_blocked: list[bool],
                 model_block: int | None) -> bool:
    """Whether `cpu_layout_passes` leave this op computing in NCHW{model_block}c.

    `model_block` is `conv_block` over all the model's convs. A conv is converted when that
    block divides both its channel counts (dense or depthwise); the ops TVM's layout inference
    lets follow keep their inputs' layout (all of them blocked, for a Concat); everything else
    computes in plain layout.
    """
    if not model_block:
        return False
    if op_type == "Conv":
        return block_fits(model_block, (in_channels, out_channels, groups))
    if op_type in _LAYOUT_FOLLOWERS and inputs_blocked:
        return all(inputs_blocked) if op_type == "Concat" else inputs_blocked[0]
    return False
