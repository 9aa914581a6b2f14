"""Default (untuned) CPU schedules for the kernels that dominate CNNs and ViTs, x86-64 and aarch64.

Two hooks for the llvm pipeline (stages as in tvm/relax/backend/cpu_generic/pipeline.py):
  * `cpu_layout_passes(target)`: on the Relax module, right before `LegalizeOps`. Converts conv2d
    to NCHW{c}c / OIHW{c}o (one block c per model, see `conv_block`) and constant matmul weights
    to column panels (both re-packed at compile time by the `FoldConstant` that follows
    LegalizeOps) and lowers those ops to TIR itself; dense 3x3 stride-1 convs with enough
    channels run as Winograd F(4x4, 3x3) (cpu_rules/winograd.py).
  * `cpu_schedule_passes(target)`: on the fused TIR, right after `FuseTIR`. dlight-style rules
    tile, vectorise and parallelise conv, matmul, pooling and (fallback) everything else.
`scheduled_cpu_pipeline(target)` is TVM's cpu_generic pipeline with both inserted there.
Before import, `pad_for_cpu` pads the ONNX graph's conv channels to the block they run fastest
in (passes/pad_channels.py), so that a model with 12- or 24-channel convs is not held to a narrow block.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import tvm
from onnx import ModelProto, numpy_helper
from tvm.relax.backend.cpu_generic import pipeline as cpu_generic
from tvm.s_tir import dlight as dl

from .cpu_rules.lowering import (CONV_BLOCK_NAME, MATMUL_BLOCK_NAME, MIN_CONV_BLOCK, block_fits, conv_block,
                                 lowering_passes, weight_summed_channels, writes_blocked)
from .cpu_rules.tir_rules import default_rules
from .cpu_rules.vector_spec import CpuVectorSpec, cpu_vector_spec

if TYPE_CHECKING:
    from nasc.partitioner.analysis import Analysis

__all__ = ["CONV_BLOCK_NAME", "MATMUL_BLOCK_NAME", "CpuVectorSpec", "block_fits", "conv_block", "conv_channels",
           "cpu_layout_passes", "cpu_schedule_passes", "cpu_vector_spec", "model_conv_block", "pad_for_cpu",
           "conv_runs", "padding_block", "scheduled_cpu_pipeline", "summed_in_channels", "writes_blocked"]

# Time per MAC of a dense conv computed in block b, relative to a block as wide as the vector
# (V lanes), is (V / b) ** NARROW_BLOCK_EXPONENT: measured at 1 thread on AVX-512, block 8 costs
# 1.5-1.8x and block 4 2.5-3.3x. A dense conv left in plain layout costs PLAIN_CONV_COST: the
# DenseNet-style example at 224 px ran its plain convs in 259 ms, and in 61 ms padded to block 16.
NARROW_BLOCK_EXPONENT = 0.8
PLAIN_CONV_COST = 6.0
# Padding must make the convs at least this much cheaper: it also widens every tensor it touches.
MIN_PADDING_GAIN = 1.05


def cpu_layout_passes(target: tvm.target.Target, spec: CpuVectorSpec | None = None,
                      winograd: bool = True) -> list[tvm.transform.Pass]:
    """Relax passes to run right before LegalizeOps (`winograd`: 3x3 convs as Winograd where it pays)."""
    spec = spec or cpu_vector_spec(target)
    return lowering_passes(spec.channel_block, spec.matmul_cols, winograd)


def cpu_schedule_passes(target: tvm.target.Target,
                        spec: CpuVectorSpec | None = None) -> list[tvm.transform.Pass]:
    """TIR passes to run right after FuseTIR; PrimFuncs already marked scheduled are kept."""
    return [dl.ApplyDefaultSchedule(*default_rules(spec or cpu_vector_spec(target)))]


def scheduled_cpu_pipeline(target: tvm.target.Target, spec: CpuVectorSpec | None = None,
                           winograd: bool = True) -> tvm.transform.Pass:
    """TVM's cpu_generic pipeline with the layout passes and schedule rules inserted
    (`winograd` False: every conv direct, for comparison)."""
    legalize = cpu_generic.legalize_passes(target)
    fuse_tir_at = [p.info.name for p in legalize].index("FuseTIR") + 1
    passes = (cpu_generic.library_dispatch_passes(target) + cpu_layout_passes(target, spec, winograd)
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
    """Whether `cpu_layout_passes` leave this op reading its input in NCHW{model_block}c.

    `model_block` is `conv_block` over all the model's convs. A conv is converted when that
    block divides both its channel counts (dense or depthwise); the ops TVM's layout inference
    lets follow keep their inputs' layout (all of them blocked, for a Concat); everything else
    computes in plain layout. (A conv read plain may still write blocked: `writes_blocked`.)
    """
    if not model_block:
        return False
    if op_type == "Conv":
        return block_fits(model_block, (in_channels, out_channels, groups))
    if op_type in _LAYOUT_FOLLOWERS and inputs_blocked:
        return all(inputs_blocked) if op_type == "Concat" else inputs_blocked[0]
    return False


def conv_channels(a: Analysis, node, out: str | None = None) -> tuple[int, int, int]:
    """(in channels, out channels, groups) of an NCHW node; 0 for a channel count it lacks."""
    out = out or node.output[0]
    shape_in = a.specs[node.input[0]].shape if node.input[0] in a.specs else ()
    shape_out = a.specs[out].shape if out in a.specs else ()
    return (shape_in[1] if len(shape_in) == 4 else 0, shape_out[1] if len(shape_out) == 4 else 0,
            int(next((attr.i for attr in node.attribute if attr.name == "group"), 1)))


def model_conv_block(a: Analysis, channel_block: int | None) -> int | None:
    """`conv_block` of an analysed ONNX model: the block the layout pass gives its convs."""
    if not channel_block:
        return None
    # channel counts of tensors joined or cut along channels bind the block (see conv_block)
    fixed = [a.specs[x].shape[1] for n in a.nodes if n.op_type in ("Concat", "Split", "Slice")
             for x in [*n.input, *n.output] if x in a.specs and len(a.specs[x].shape) == 4]
    return conv_block([conv_channels(a, n) for n in a.nodes if n.op_type == "Conv"], channel_block, fixed)


def block_mac_cost(conv: tuple[int, int, int], block: int | None, channel_block: int) -> float | None:
    """Relative time per MAC of a conv ((in, out, groups) channels) in a model whose convs the layout
    pass gives `block`: 1 at a full-vector block, more in a narrower one; None if it runs plain."""
    cin, cout, groups = conv
    if groups > 1 and groups == cin == cout:  # depthwise: memory bound, about as fast in any block
        return 1.0
    if block and (block_fits(block, conv) or writes_blocked(block, conv)):
        # a stem writing the block is register-tiled on its lanes as a blocked conv is: Inception's
        # 3 -> 32 stem ran 0.059 ms in block 16, 0.105 in block 8 (2 threads, AVX-512)
        return (channel_block / block) ** NARROW_BLOCK_EXPONENT
    return None


def summed_in_channels(a: Analysis, node, block: int | None = None) -> int:
    """Input channels the CPU conv of `node` sums over in a model blocked by `block` (None: plain;
    `lowering.summed_channels`): a dense conv with a constant weight skips its trailing
    zero-weight ones, the channels `pad_channels` added, up to whole blocks where it has a window."""
    cin, _, groups = conv_channels(a, node)
    weight = next((t for t in a.model.graph.initializer if len(node.input) > 1 and t.name == node.input[1]), None)
    if groups != 1 or weight is None:
        return cin
    return min(cin, weight_summed_channels(numpy_helper.to_array(weight), block))


def conv_cost(a: Analysis, channel_block: int) -> float:
    """Relative time of a model's convs in the layouts the layout pass gives them (in MACs at a
    full-vector block, over the input channels each sums over)."""
    block = model_conv_block(a, channel_block)
    total = 0.0
    for i, n in enumerate(a.nodes):
        if n.op_type == "Conv":
            conv = conv_channels(a, n)
            cost = block_mac_cost(conv, block, channel_block)
            summed = summed_in_channels(a, n, block) / max(conv[0], 1)
            total += float(a.macs[i]) * summed * (PLAIN_CONV_COST if cost is None else cost)
    return total


def padding_block(model: ModelProto, channel_block: int) -> int | None:
    """The block to pad the model's conv channels to (passes/pad_channels.py), None to leave them:
    whichever makes `conv_cost` least, if that beats the unpadded model by MIN_PADDING_GAIN."""
    from nasc.partitioner.analysis import analyze
    from nasc.passes.pad_channels import channel_layouts, pad_channels

    if not channel_layouts(model, channel_block):  # already a multiple of every block that fits
        return None
    best, best_cost = None, conv_cost(analyze(model), channel_block) / MIN_PADDING_GAIN
    block = channel_block
    while block >= MIN_CONV_BLOCK:
        cost = conv_cost(analyze(pad_channels(model, block)), channel_block)
        if cost < best_cost:
            best, best_cost = block, cost
        block //= 2
    return best


def conv_runs(model: ModelProto, channel_block: int | None) -> dict[str, tuple[int, int, int, float]]:
    """How the CPU pipeline for a vector of `channel_block` lanes runs each conv of `model`, by node
    name: (in channels it sums over, out channels, groups) as `pad_for_cpu` widens them, and
    `block_mac_cost` in the block the layout pass then gives it (1.0 for a conv it leaves plain).
    Empty off a CPU."""
    from nasc.partitioner.analysis import analyze

    if not channel_block:
        return {}
    w = analyze(pad_for_cpu(model, channel_block)[0])
    block = model_conv_block(w, channel_block)
    return {n.name: (summed_in_channels(w, n, block), *conv[1:], block_mac_cost(conv, block, channel_block) or 1.0)
            for n in w.nodes if n.op_type == "Conv" for conv in [conv_channels(w, n)]}


def compiled_conv_block(model: ModelProto, channel_block: int | None) -> int | None:
    """The NCHW{c}c block the CPU pipeline runs `model`'s convs in once `pad_for_cpu` has widened
    them (None: plain layout) on a CPU with vectors of `channel_block` lanes. A half of a model in
    the whole's block runs its kernels as the whole does; one in another runs others (a head of
    ShuffleNetV2's first convs takes block 16 where the whole takes 8, a conv-free tail none)."""
    from nasc.partitioner.analysis import analyze

    if not channel_block:
        return None
    return model_conv_block(analyze(pad_for_cpu(model, channel_block)[0]), channel_block)


def pad_for_cpu(model: ModelProto, channel_block: int) -> tuple[ModelProto, int | None]:
    """The ONNX graph the CPU pipeline compiles for a vector of `channel_block` float32 lanes:
    `model` with its conv channels padded to `padding_block` (unchanged when that is None), and the block."""
    from nasc.passes.pad_channels import pad_channels

    block = padding_block(model, channel_block)
    return (pad_channels(model, block) if block else model), block
