"""Default CPU schedules: every kernel class compiled with them matches ONNX Runtime, the rules
really schedule what they claim (parallel + vector loops), and aarch64 code generation works."""

from __future__ import annotations

import re
import shutil

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import tvm
from onnx import TensorProto, helper, numpy_helper
from tvm import relax
from tvm.relax.backend.cpu_generic import pipeline as cpu
from tvm.relax.frontend.onnx import from_onnx

from nasc.backends import cpu_schedules as cs
from nasc.backends.cpu_rules import lowering
from nasc.backends.cpu_rules.tir_rules import (
    CONV_UNROLL_CHANNELS, DEPTHWISE_CHUNK_ROWS, TO_PLAIN_TILE_COLS, TRANSPOSE_TILE_COLS,
)
from nasc.examples import build
from nasc.examples.zoo import resnet

ATOL = 1e-4
RTOL = 1e-4
SEED = 0
HOST = tvm.target.Target({"kind": "llvm", "mcpu": tvm.target.codegen.llvm_get_system_cpu()})
AARCH64 = tvm.target.Target({"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon"]})
def _model(nodes, inputs: dict, output: str, inits=()) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in inputs.items()],
        [helper.make_tensor_value_info(output, TensorProto.FLOAT, None)], list(inits))
    model = onnx.shape_inference.infer_shapes(
        helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    onnx.checker.check_model(model)
    return model


def _const(rng, name: str, shape, scale: float = 1.0):
    return numpy_helper.from_array((rng.standard_normal(shape) * scale).astype(np.float32), name)


def _compile(model: onnx.ModelProto, target=HOST):
    """The model compiled with nasc's scheduled CPU pipeline for `target`."""
    return tvm.compile(from_onnx(model, keep_params_in_input=False), target=target,
                       relax_pipeline=cs.scheduled_cpu_pipeline(target))


def _run_both(model: onnx.ModelProto, target=HOST, ex=None):
    """(nasc's output, ORT's) on one random input; `ex`: the model already compiled for `target`."""
    rng = np.random.default_rng(SEED + 1)
    feeds = {}
    for inp in model.graph.input:
        shape = [d.dim_value for d in inp.type.tensor_type.shape.dim]
        feeds[inp.name] = rng.standard_normal(shape).astype(np.float32)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    expected = session.run(None, feeds)[0]
    ex = ex if ex is not None else _compile(model, target)
    vm = relax.VirtualMachine(ex, tvm.cpu())
    got = vm["main"](*[tvm.runtime.tensor(feeds[i.name]) for i in model.graph.input]).numpy()
    return got, expected


def _assert_matches_ort(model: onnx.ModelProto) -> None:
    got, expected = _run_both(model)
    np.testing.assert_allclose(got, expected, atol=ATOL, rtol=RTOL)


def _scheduled_module(model: onnx.ModelProto, target=HOST) -> tvm.IRModule:
    passes = (cs.cpu_layout_passes(target) + cpu.legalize_passes(target)
              + cs.cpu_schedule_passes(target))
    with target:
        return tvm.transform.Sequential(passes)(from_onnx(model, keep_params_in_input=False))


def _conv_block(cin, cout, k, stride=1, groups=1, hw=12, batch=1, residual=False, bias=True):
    """Conv (+bias) + ReLU, optionally + a residual add of a 1x1-projected input."""
    rng = np.random.default_rng(SEED)
    inits = [_const(rng, "w", (cout, cin // groups, k, k), 0.3)]
    conv_in = ["x", "w"]
    if bias:
        inits.append(_const(rng, "b", (cout,)))
        conv_in.append("b")
    nodes = [helper.make_node("Conv", conv_in, ["c"], kernel_shape=[k, k], pads=[k // 2] * 4,
                              strides=[stride, stride], group=groups),
             helper.make_node("Relu", ["c"], ["r"])]
    out = "r"
    if residual:
        inits.append(_const(rng, "wp", (cout, cin, 1, 1), 0.3))
        nodes += [helper.make_node("Conv", ["x", "wp"], ["p"], strides=[stride, stride]),
                  helper.make_node("Add", ["r", "p"], ["y"])]
        out = "y"
    return _model(nodes, {"x": [batch, cin, hw, hw]}, out, inits)


CONV_CASES = {
    "3x3_bias_relu_residual": dict(cin=16, cout=16, k=3, residual=True),
    "1x1": dict(cin=16, cout=32, k=1),
    "3x3_stride2_padded": dict(cin=16, cout=32, k=3, stride=2, residual=True),
    "5x5_odd_size_batch2": dict(cin=8, cout=16, k=5, hw=13, batch=2),
    "stem_3_channels_7x7_s2": dict(cin=3, cout=16, k=7, stride=2, hw=20),
    "stem_3_to_24_channels": dict(cin=3, cout=24, k=3, stride=2, hw=20),
    "depthwise_3x3": dict(cin=32, cout=32, k=3, groups=32),
    "depthwise_3x3_stride2": dict(cin=16, cout=16, k=3, stride=2, groups=16, hw=15),
    "grouped_4_groups": dict(cin=32, cout=32, k=3, groups=4),
    "grouped_unaligned_channels": dict(cin=12, cout=12, k=3, groups=3),
    "no_bias_unaligned_out": dict(cin=16, cout=20, k=3, bias=False),
}


@pytest.mark.parametrize("case", sorted(CONV_CASES))
def test_conv_matches_ort(case):
    _assert_matches_ort(_conv_block(**CONV_CASES[case]))


def test_blocked_conv_is_tiled_vectorised_and_parallel():
    mod = _scheduled_module(_conv_block(16, 16, 3, residual=True))
    convs = [f for g, f in mod.functions_items() if "conv2d_nchwc" in g.name_hint]
    assert convs, "the aligned conv was not converted to the blocked layout"
    for func in convs:
        text = func.script()
        assert func.attrs["tirx.is_scheduled"]
        assert "T.parallel" in text and "T.vectorized" in text and "_global = T.sblock_alloc_buffer" in text


@pytest.mark.parametrize("cin, k, packed", [(128, 3, True), (16, 3, False), (256, 1, False)])
def test_a_conv_weight_larger_than_l1_is_packed_to_stream(cin, k, packed):
    """A 3x3 conv over 128 channels walks its weight across L1: packed to OIHW{c}i{o}o, the input
    channels of its inner loop are adjacent (a 6-D weight). A small or 1x1 weight, already read
    from L1 or in order, keeps OIHW{o}o (5-D)."""
    model = _conv_block(cin, 16, k, hw=8)   # 16 outputs: too few for Winograd (test_winograd.py)
    _assert_matches_ort(model)
    mod = _scheduled_module(model)
    ranks = _buffers_of(mod, "conv2d_nchwc")
    assert ranks and all((6 in r) == packed for r in ranks), ranks
    # more than one input block: a block's channels are unrolled, at most 8 at a time (a whole
    # 16-channel AVX-512 block spills its broadcasts)
    block = cs.cpu_vector_spec(HOST).channel_block
    step = min(block, CONV_UNROLL_CHANNELS)
    convs = [f.script() for g, f in mod.functions_items() if "conv2d_nchwc" in g.name_hint]
    unrolled = re.compile(rf"rc_[0-9_]+ in T\.unroll\(T\.int64\({step}\)\)")
    assert all(bool(unrolled.search(text)) == (cin > block) for text in convs)


@pytest.mark.parametrize("summed", [8, 12, 24])
def test_a_conv_sums_only_over_the_input_channels_its_weight_reads(summed):
    """Input channels whose weights are all zero at the end of a conv's input (the ones
    pad_channels adds) are not summed over: the reduction spans the first `summed` channels, up
    to a whole block (`summed_channels`: a 3x3 conv stepping part of a block ran at half speed),
    stepping through them 8 at a time, and the result still matches ORT with nonzero data in them."""
    model = _conv_block(32, 16, 3, hw=8)
    for init in model.graph.initializer:
        if init.name == "w":
            w = numpy_helper.to_array(init).copy()
            w[:, summed:] = 0.0
            init.CopyFrom(numpy_helper.from_array(w, "w"))
    assert lowering.reduced_in_channels(w) == summed
    _assert_matches_ort(model)
    func = next(f for g, f in _scheduled_module(model).functions_items() if "conv2d_nchwc" in g.name_hint)
    sch = tvm.s_tir.Schedule(func)
    update = sch.get(sch.get_sblock("nasc_conv2d_nchwc_update"))
    reduced = [int(iv.dom.extent) for iv in update.iter_vars if iv.iter_type == tvm.tirx.IterVar.CommReduce]
    block = cs.cpu_vector_spec(HOST).channel_block
    whole = lowering.summed_channels(summed, 32, block, 9)
    assert reduced == [whole, 3, 3], reduced
    # stepped 8 channels at a time; a sum of one step in a block no wider (AVX2's 8) is one loop
    step = min(block, CONV_UNROLL_CHANNELS)
    stepped = re.search(rf"rc_[0-9_]+ in T\.unroll\(T\.int64\({step}\)\)", func.script())
    assert bool(stepped) == (whole > step or block > step)


def test_only_a_windowed_conv_rounds_its_sum_up_to_whole_blocks():
    """A 3x3 conv that would sum 12 channels in 8-channel blocks sums 16 (its weights are zero
    past 12); a 1x1 conv, which steps each block once per pixel, keeps 12; a sum of whole
    blocks, or one within a block, is left as it is; never past the channels there are."""
    assert lowering.summed_channels(12, 16, 8, 9) == 16
    assert lowering.summed_channels(12, 16, 8, 1) == 12
    assert lowering.summed_channels(24, 32, 8, 9) == 24 and lowering.summed_channels(6, 8, 8, 9) == 6
    assert lowering.summed_channels(12, 12, 8, 9) == 12 and lowering.summed_channels(12, 16, None, 9) == 12


def test_reduced_in_channels_keeps_every_channel_up_to_the_last_nonzero_weight():
    w = np.zeros((4, 6, 3, 3), np.float32)
    assert lowering.reduced_in_channels(w) == 1
    w[2, 3, 1, 1] = 1.0
    assert lowering.reduced_in_channels(w) == 4
    w[0, 0, 0, 0] = 0.5   # a zero channel before the last nonzero one is still summed
    assert lowering.reduced_in_channels(w) == 4


def test_conv_block_is_one_width_per_model():
    # the widest block dividing every conv that some block divides; a 3-channel stem stays plain
    assert cs.conv_block([(3, 64, 1), (64, 64, 1), (64, 128, 1)], 16) == 16
    assert cs.conv_block([(3, 32, 1), (32, 24, 1), (24, 144, 1), (144, 144, 144)], 16) == 8
    assert cs.conv_block([(12, 772, 1), (772, 128, 1)], 16) == 4
    assert cs.conv_block([(3, 5, 1), (6, 10, 2)], 16) is None     # nothing blockable; grouped convs never
    assert cs.conv_block([(16, 16, 1)], 8) == 8                   # never wider than the target's block
    # tensors concatenated along channels must divide too: 36 + 6 channels leave nothing to block
    assert cs.conv_block([(48, 12, 1), (36, 48, 1)], 16, fixed=[36, 6, 42]) is None
    assert cs.conv_block([(48, 16, 1), (32, 48, 1)], 16, fixed=[32, 16, 48]) == 16
    assert cs.runs_blocked("Conv", 24, 48, 1, [False], 8) and not cs.runs_blocked("Conv", 3, 48, 1, [False], 8)
    assert cs.runs_blocked("Relu", 0, 0, 1, [True], 8) and not cs.runs_blocked("Conv", 24, 48, 1, [True], None)


def _conv_chain(channels: list[int], hw: int = 10) -> onnx.ModelProto:
    rng = np.random.default_rng(SEED)
    nodes, inits, x = [], [], "x"
    for i, (cin, cout) in enumerate(zip(channels, channels[1:])):
        inits.append(_const(rng, f"w{i}", (cout, cin, 3, 3), 0.2))
        nodes += [helper.make_node("Conv", [x, f"w{i}"], [f"c{i}"], kernel_shape=[3, 3], pads=[1] * 4),
                  helper.make_node("Relu", [f"c{i}"], [f"r{i}"])]
        x = f"r{i}"
    return _model(nodes, {"x": [1, channels[0], hw, hw]}, x, inits)


def test_concat_of_blocked_and_unblockable_channels_compiles():
    """A blockable conv's 16 channels joined to 6 others: no block divides 6, so nothing is blocked
    (ConvertLayout would fail to block the joined tensors)."""
    rng = np.random.default_rng(SEED)
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], kernel_shape=[3, 3], pads=[1] * 4),
             helper.make_node("Concat", ["c", "z"], ["cat"], axis=1),
             helper.make_node("Conv", ["cat", "w2"], ["y"], kernel_shape=[1, 1])]
    model = _model(nodes, {"x": [1, 8, 8, 8], "z": [1, 6, 8, 8]}, "y",
                   [_const(rng, "w", (16, 8, 3, 3), 0.2), _const(rng, "w2", (16, 22, 1, 1), 0.2)])
    _assert_matches_ort(model)
    assert not any("conv2d_nchwc" in g.name_hint for g, _ in _scheduled_module(model).functions_items())


@pytest.mark.parametrize("sizes", [[16, 32], [16, 16, 16], [8, 40]])
def test_a_blocked_tensor_split_at_given_sizes_compiles(sizes):
    """Conv then an ONNX Split with sizes: the convs stay blocked and the parts match ORT."""
    rng = np.random.default_rng(SEED)
    parts = [f"p{i}" for i in range(len(sizes))]
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], kernel_shape=[3, 3], pads=[1] * 4),
             helper.make_node("Split", ["c", "sizes"], parts, axis=1),
             helper.make_node("Conv", [parts[-1], "w2"], ["d"], kernel_shape=[1, 1]),
             helper.make_node("Add", [parts[0], "d"], ["y"])]
    inits = [_const(rng, "w", (48, 16, 3, 3), 0.2), _const(rng, "w2", (sizes[0], sizes[-1], 1, 1), 0.2),
             numpy_helper.from_array(np.array(sizes, np.int64), "sizes")]
    model = _model(nodes, {"x": [1, 16, 8, 8]}, "y", inits)
    _assert_matches_ort(model)
    assert any("conv2d_nchwc" in g.name_hint for g, _ in _scheduled_module(model).functions_items())


@pytest.mark.parametrize("joined", [False, True])
def test_unblockable_conv_after_blocked_ones_compiles(joined):
    """A conv no block can hold (6 output channels) reading blocked channels, straight from a
    conv or from a concat of blocked branches (DenseNet's transition layers): it runs plain, with
    its input transformed back, and matches ORT."""
    rng = np.random.default_rng(SEED)
    nodes = [helper.make_node("Conv", ["x", "w"], ["a"], kernel_shape=[3, 3], pads=[1] * 4)]
    inits = [_const(rng, "w", (8, 8, 3, 3), 0.2)]
    mid = "a"
    if joined:
        nodes += [helper.make_node("Conv", ["x", "wb"], ["b"], kernel_shape=[1, 1]),
                  helper.make_node("Concat", ["a", "b"], ["cat"], axis=1)]
        inits.append(_const(rng, "wb", (8, 8, 1, 1), 0.2))
        mid = "cat"
    nodes.append(helper.make_node("Conv", [mid, "w2"], ["y"], kernel_shape=[1, 1]))
    inits.append(_const(rng, "w2", (6, 16 if joined else 8, 1, 1), 0.2))
    model = _model(nodes, {"x": [1, 8, 8, 8]}, "y", inits)
    _assert_matches_ort(model)
    assert any("conv2d_nchwc" in g.name_hint for g, _ in _scheduled_module(model).functions_items())


@pytest.mark.parametrize("channels", [[16, 24, 32, 64], [3, 24, 40], [12, 20, 36]])
def test_convs_of_mixed_channel_counts_share_one_block(channels):
    """Channel counts one block width cannot all take still compile (one narrower block for the
    model), are blocked, and match ORT."""
    model = _conv_chain(channels)
    _assert_matches_ort(model)
    mod = _scheduled_module(model)
    assert any("conv2d_nchwc" in g.name_hint for g, _ in mod.functions_items())


def test_a_stem_writes_the_blocked_layout_its_readers_want():
    """A 3-channel stem cannot read blocks, but its 16 output channels fill them: it writes
    NCHW{c}c straight away, so no transform runs between it and the blocked conv after it."""
    model = _conv_chain([3, 16, 16])
    _assert_matches_ort(model)
    names = [g.name_hint for g, _ in _scheduled_module(model).functions_items()]
    assert sum("conv2d_nchwc" in n for n in names) == 2, names
    assert sum("layout_transform" in n for n in names) == 1, names  # the output, back to NCHW


def _buffers_of(mod: tvm.IRModule, name: str) -> list:
    """For each PrimFunc whose name holds `name`, the ranks of the buffers its blocks read and write."""
    found = []
    for g, f in mod.functions_items():
        if isinstance(f, tvm.tirx.PrimFunc) and name in g.name_hint:
            sch = tvm.s_tir.Schedule(f)
            blocks = sch.get_child_blocks(sch.get_sblock("root"))
            found.append([len(r.region) for b in blocks for r in [*sch.get(b).reads, *sch.get(b).writes]])
    return found


def test_a_received_tensor_is_blocked_once_and_its_readers_follow():
    """A tail's cut tensor arrives in NCHW. Joined with a blocked branch, it used to keep the
    concat and the pool after it plain, as they are not in the whole model. It is now made
    blocked once on entry (an identity conv ConvertLayout blocks, lowered back to nothing), and
    concat and pool run in NCHW{c}c."""
    rng = np.random.default_rng(SEED)
    nodes = [helper.make_node("Conv", ["x", "w"], ["a"], kernel_shape=[3, 3], pads=[1] * 4),
             helper.make_node("Concat", ["a", "r"], ["cat"], axis=1),
             helper.make_node("MaxPool", ["cat"], ["p"], kernel_shape=[3, 3], strides=[2, 2], pads=[1] * 4),
             helper.make_node("Conv", ["p", "w2"], ["y"], kernel_shape=[1, 1])]
    model = _model(nodes, {"x": [1, 16, 12, 12], "r": [1, 16, 12, 12]}, "y",
                   [_const(rng, "w", (16, 16, 3, 3), 0.2), _const(rng, "w2", (16, 32, 1, 1), 0.2)])
    _assert_matches_ort(model)
    mod = _scheduled_module(model)
    names = [g.name_hint for g, f in mod.functions_items() if isinstance(f, tvm.tirx.PrimFunc)]
    assert sum("conv2d" in n for n in names) == 2, names   # the identity conv left no kernel
    for op in ("concatenate", "max_pool2d"):
        (ranks,) = _buffers_of(mod, op)
        assert ranks and all(r == 5 for r in ranks), (op, ranks)
    # x and r (one PrimFunc, as they have one shape) are blocked; y is made plain
    assert sum("layout_transform_to_blocked" in n for n in names) == 1, names
    assert sum("layout_transform_to_plain" in n for n in names) == 1, names
    assert sum("layout_transform" in n for n in names) == 2, names


def _transpose_tile(in_shape, index_map, data, want, name: str) -> tuple[list, int, int]:
    """Compiles a lone layout_transform with the CPU pipeline, checks it moves `data` to `want`
    and that an outer loop of its block `name` is parallel; returns the kinds of the two inner
    loops and their extents (pixels, channels) per tile."""
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType(in_shape, "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            out = bb.emit_output(relax.op.layout_transform(x, index_map=index_map))
        bb.emit_func_output(out)
    ex = tvm.compile(bb.get(), target=HOST, relax_pipeline=cs.scheduled_cpu_pipeline(HOST))
    got = relax.VirtualMachine(ex, tvm.cpu())["main"](tvm.runtime.tensor(data)).numpy()
    np.testing.assert_array_equal(got, want)
    with HOST:
        mod = tvm.transform.Sequential(cs.cpu_layout_passes(HOST) + cpu.legalize_passes(HOST)
                                       + cs.cpu_schedule_passes(HOST))(bb.get())
    (func,) = [f for g, f in mod.functions_items() if name.removeprefix("nasc_") in g.name_hint]
    sch = tvm.s_tir.Schedule(func)
    loops = sch.get_loops(sch.get_sblock(name))
    kinds = [sch.get(lp).kind for lp in loops]
    assert tvm.tirx.ForKind.PARALLEL in kinds
    return kinds[-2:], int(sch.get(loops[-1]).extent), int(sch.get(loops[-2]).extent)


@pytest.mark.parametrize("shape,block", [((1, 32, 7, 14), 16), ((1, 24, 5, 9), 8), ((2, 16, 4, 16), 4),
                                         ((1, 32, 4, 28), 16)])
def test_transform_to_blocked_is_a_tiled_transpose(shape, block):
    """NCHW -> NCHW{c}c runs over its output, a tile of channels x pixels with both loops unrolled
    (TVM's own loop over the input scattered every value: 0.29 ms for 64x56x56, now 0.04)."""
    n, c, h, w = shape
    data = np.random.default_rng(SEED).standard_normal(shape).astype(np.float32)
    kinds, tile, channels = _transpose_tile(shape, lambda n_, c_, y, x_: (n_, c_ // block, y, x_, c_ % block), data,
                                            data.reshape(n, c // block, block, h, w).transpose(0, 1, 3, 4, 2),
                                            "nasc_to_blocked")
    assert kinds == [tvm.tirx.ForKind.UNROLLED] * 2
    assert channels == block and (h * w) % tile == 0
    if w == 28:  # rows of 28 pixels would leave tiles of 7: the tile runs across rows, 8 pixels wide
        assert tile == TRANSPOSE_TILE_COLS


@pytest.mark.parametrize("shape,block", [((1, 32, 7, 16), 16), ((1, 24, 5, 9), 8), ((1, 32, 4, 28), 16), ((2, 8, 3, 3), 4)])
def test_transform_to_plain_is_a_tiled_transpose(shape, block):
    """NCHW{c}c -> NCHW, the layout a head sends its cut tensors in, runs over its output: where
    the CPU gathers and the plane divides into vectors, a gathered vector of one channel's pixels
    at a time (16x112x112 at 2 threads: 0.046 ms tiled, 0.026 gathered); else in tiles of a
    channel block x one cache line of pixels, both loops unrolled (256x14x14 at one thread:
    0.030 ms as TVM's own layout_transform, 0.015 tiled)."""
    n, c, h, w = shape
    blocked = (n, c // block, h, w, block)
    data = np.random.default_rng(SEED).standard_normal(blocked).astype(np.float32)
    kinds, tile, channels = _transpose_tile(blocked, lambda n_, co, y, x_, ci: (n_, co * block + ci, y, x_), data,
                                            data.transpose(0, 1, 4, 2, 3).reshape(shape), "nasc_to_plain")
    assert channels == block and (h * w) % tile == 0
    spec = cs.cpu_vector_spec(HOST)
    if spec.gathers and (h * w) % spec.lanes == 0:
        assert kinds == [tvm.tirx.ForKind.UNROLLED, tvm.tirx.ForKind.VECTORIZED] and tile == spec.lanes
        return
    assert kinds == [tvm.tirx.ForKind.UNROLLED] * 2
    if w % TO_PLAIN_TILE_COLS == 0 or (h * w) % TO_PLAIN_TILE_COLS == 0:  # whole cache lines, across rows if need be
        assert tile == TO_PLAIN_TILE_COLS


def _register_tiles(func) -> list:
    """The buffers a conv accumulates its register tiles in (`_tile_accumulator`'s cache_write)."""
    return [b for b in func.body.block.alloc_buffers if "conv2d" in b.name and b.name.endswith("_global")]


def test_plain_conv_accumulates_with_the_vector_lanes_innermost():
    """A 3-channel stem runs plain NCHW vectorised over output channels: its register tile must
    hold those channels innermost, or every FMA gathers and scatters its accumulator."""
    mod = _scheduled_module(_conv_block(3, 16, 7, stride=2, hw=20))
    (func,) = [f for g, f in mod.functions_items() if isinstance(f, tvm.tirx.PrimFunc) and "conv2d" in g.name_hint]
    tile = _register_tiles(func)
    assert tile, "the conv accumulates in a register tile"
    assert [int(d) for d in tile[0].shape] == [1, 10, 10, 16]   # N, H, W, C: channels innermost


def test_plain_conv_short_of_a_vector_still_runs_a_register_tile():
    """24 output channels do not fill a 16-lane vector: the stem still runs register-tiled on the
    widest short vector that divides them, not unscheduled (3 ms for ShuffleNet's stem)."""
    mod = _scheduled_module(_conv_block(3, 24, 3, stride=2, hw=20))
    (func,) = [f for g, f in mod.functions_items() if isinstance(f, tvm.tirx.PrimFunc) and "conv2d" in g.name_hint]
    lanes = max(w for w in (16, 8, 4) if 24 % w == 0 and w <= cs.cpu_vector_spec(HOST).channel_block)
    assert _register_tiles(func), "no register tile"
    text = func.script()
    assert f"T.vectorized({lanes})" in text or f"T.vectorized(T.int64({lanes}))" in text


def _gemm(m, k, n, trans_b=True):
    rng = np.random.default_rng(SEED)
    w_shape = (n, k) if trans_b else (k, n)
    nodes = [helper.make_node("Gemm", ["x", "w", "b"], ["g"], transB=int(trans_b)),
             helper.make_node("Relu", ["g"], ["y"])]
    return _model(nodes, {"x": [m, k]}, "y", [_const(rng, "w", w_shape, 0.2), _const(rng, "b", (n,))])


@pytest.mark.parametrize("m,k,n,trans_b", [(1, 64, 40, True), (5, 48, 32, False), (6, 33, 17, True), (1, 96, 1001, True),
                                           (1, 96, 1000, True), (1, 64, 10, False)])
def test_dense_matches_ort(m, k, n, trans_b):
    _assert_matches_ort(_gemm(m, k, n, trans_b))


def test_dense_weight_is_packed_and_tiled():
    # several column panels on any host, so that there is a panel loop to parallelise
    mod = _scheduled_module(_gemm(4, 64, 4 * cs.cpu_vector_spec(HOST).matmul_cols))
    (func,) = [f for g, f in mod.functions_items() if "matmul" in g.name_hint]
    text = func.script()
    assert cs.MATMUL_BLOCK_NAME in text, "constant weight was not packed into column panels"
    assert "T.parallel" in text and "T.vectorized" in text and "_global = T.sblock_alloc_buffer" in text


def test_dense_weight_of_odd_width_is_packed_with_zero_columns():
    """1001 classes: no panel divides them, so the last panel is padded with zero columns at
    compile time (not B on every call) and the extra outputs sliced off."""
    mod = _scheduled_module(_gemm(1, 64, 1001))
    names = [g.name_hint for g, _ in mod.functions_items()]
    assert any("matmul_packed" in n for n in names) and not any("pad" in n for n in names), names


def _weight_panel(m: int, k: int, n: int) -> int:
    mod = _scheduled_module(_gemm(m, k, n))
    (func,) = [f for g, f in mod.functions_items() if "matmul" in g.name_hint]
    # the packed weight is the function's one 3-D parameter: [N / panel, K, panel]
    (panel,) = re.findall(r"T\.Buffer\(\(T\.int64\(\d+\), T\.int64\(\d+\), T\.int64\((\d+)\)\)", func.script())
    return int(panel)


def test_one_row_matmul_streams_wider_weight_panels():
    """A classifier (one row) reuses no weight: its panels are twice the matmul's, padded where the
    classes do not fill them (1000 at 2 threads: 0.048 ms on one-vector panels, 0.023 on four)."""
    cols = cs.cpu_vector_spec(HOST).matmul_cols
    assert _weight_panel(1, 64, 1000) == lowering.GEMV_PANEL_PER_MATMUL_PANEL * cols
    assert _weight_panel(4, 64, 4 * cols) == cols


def test_batched_matmul_and_transposed_matmul_match_ort():
    rng = np.random.default_rng(SEED)
    # ViT-style: batched activations x constant weight, then attention scores q @ k^T.
    nodes = [helper.make_node("MatMul", ["x", "w"], ["q"]),
             helper.make_node("Transpose", ["q"], ["qt"], perm=[0, 2, 1]),
             helper.make_node("MatMul", ["q", "qt"], ["s"]),
             helper.make_node("MatMul", ["s", "v"], ["y"])]
    # 13 value columns: not a whole vector, so the padded (pad_einsum) tile path runs too.
    model = _model(nodes, {"x": [2, 7, 16], "v": [2, 7, 13]}, "y", [_const(rng, "w", (16, 16), 0.3)])
    _assert_matches_ort(model)


@pytest.mark.parametrize("pool", ["max3x3s2", "avg2x2", "global_avg", "global_avg_unblocked"])
def test_pooling_matches_ort(pool):
    rng = np.random.default_rng(SEED)
    channels = 16 if pool != "global_avg_unblocked" else 6
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], kernel_shape=[3, 3], pads=[1, 1, 1, 1])]
    op = {"max3x3s2": helper.make_node("MaxPool", ["c"], ["y"], kernel_shape=[3, 3],
                                       strides=[2, 2], pads=[1, 1, 1, 1]),
          "avg2x2": helper.make_node("AveragePool", ["c"], ["y"], kernel_shape=[2, 2], strides=[2, 2]),
          "global_avg": helper.make_node("GlobalAveragePool", ["c"], ["y"]),
          "global_avg_unblocked": helper.make_node("GlobalAveragePool", ["c"], ["y"])}[pool]
    model = _model(nodes + [op], {"x": [1, 8, 14, 14]}, "y", [_const(rng, "w", (channels, 8, 3, 3), 0.3)])
    _assert_matches_ort(model)


BLOCKED_POOLS = {
    "avg3x3s1_excluding_pads": ("AveragePool", dict(kernel_shape=[3, 3], pads=[1] * 4, count_include_pad=0), 14),
    "avg3x3s1_including_pads": ("AveragePool", dict(kernel_shape=[3, 3], pads=[1] * 4, count_include_pad=1), 14),
    "avg3x3s2_odd": ("AveragePool", dict(kernel_shape=[3, 3], strides=[2, 2], pads=[1] * 4), 13),
    "avg_asymmetric_pads": ("AveragePool", dict(kernel_shape=[2, 3], pads=[0, 1, 1, 2]), 11),
    "max3x3s1": ("MaxPool", dict(kernel_shape=[3, 3], pads=[1] * 4), 14),
    "max2x2s2_odd": ("MaxPool", dict(kernel_shape=[2, 2], strides=[2, 2]), 13),
    "max_ceil_mode": ("MaxPool", dict(kernel_shape=[3, 3], strides=[2, 2], ceil_mode=1), 14),
    "max3x3s2_odd": ("MaxPool", dict(kernel_shape=[3, 3], strides=[2, 2], pads=[1] * 4), 13),
    "max_asymmetric_pads": ("MaxPool", dict(kernel_shape=[2, 3], pads=[0, 1, 1, 2]), 11),
}


@pytest.mark.parametrize("case", sorted(BLOCKED_POOLS))
def test_blocked_pooling_matches_ort(case):
    """Pools whose input arrives NCHW{c}c, the shapes and paddings ONNX allows: border windows
    average over the pixels they cover (or the whole window), max pools never take a pad."""
    op, attrs, hw = BLOCKED_POOLS[case]
    rng = np.random.default_rng(SEED)
    # a negative bias: every max pool window at the border sees negative values next to its pads
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
             helper.make_node(op, ["c"], ["y"], **attrs)]
    model = _model(nodes, {"x": [1, 8, hw, hw]}, "y",
                   [_const(rng, "w", (16, 8, 3, 3), 0.3), numpy_helper.from_array(np.full(16, -4.0, np.float32), "b")])
    _assert_matches_ort(model)


@pytest.mark.parametrize("op", ["AveragePool", "MaxPool"])
def test_blocked_pool_reads_its_windows_unchecked_in_parallel_chunks(op):
    """No pass pads a blocked pool's whole input and no window read is bounds-checked (topi's
    pool tested all 9 reads of every 3x3 window; Inception's average pools ran 2-3x slower than
    ONNX Runtime's). An average pool's parallel chunks of output rows pad the input rows they
    read; a max pool pads nothing, its reads clamped to the border."""
    rng = np.random.default_rng(SEED)
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
             helper.make_node(op, ["c"], ["y"], kernel_shape=[3, 3], pads=[1, 1, 1, 1])]
    model = _model(nodes, {"x": [1, 8, 32, 32]}, "y", [_const(rng, "w", (16, 8, 3, 3), 0.3)])
    _assert_matches_ort(model)
    func = next(f for g, f in _scheduled_module(model).functions_items() if "pool2d_nchwc" in g.name_hint)
    sch = tvm.s_tir.Schedule(func)
    pool = sch.get_sblock("nasc_pool_update")
    nest = sch.get_loops(pool)[0]
    assert sch.get(nest).kind == tvm.tirx.ForKind.PARALLEL
    if op == "AveragePool":
        assert sch.get(sch.get_loops(sch.get_sblock("nasc_pool_pad"))[0]).same_as(sch.get(nest))
    else:
        assert "nasc_pool_pad" not in func.script()
        assert "T.min(T.max(" in sch.get(pool).body.script()
    assert "if_then_else" not in sch.get(pool).body.script()
    assert sch.get(sch.get_loops(pool)[-1]).kind == tvm.tirx.ForKind.VECTORIZED


def test_pooling_in_a_narrow_block_runs_short_vectors():
    """12 channels give the model a 4-channel block, narrower than the host's vector: the pool
    (and its average) still vectorise that block as a short vector, and match ORT."""
    rng = np.random.default_rng(SEED)
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
             helper.make_node("AveragePool", ["c"], ["y"], kernel_shape=[3, 3], pads=[1, 1, 1, 1])]
    model = _model(nodes, {"x": [1, 8, 14, 14]}, "y", [_const(rng, "w", (12, 8, 3, 3), 0.3)])
    _assert_matches_ort(model)
    (pool,) = [f for g, f in _scheduled_module(model).functions_items() if "pool" in g.name_hint]
    text = pool.script()
    assert "T.int64(14), T.int64(14), T.int64(4)" in text, "the pool runs in the 4-channel block"
    if cs.cpu_vector_spec(HOST).lanes > 4:
        assert text.count("T.vectorized(T.int64(4))") >= 2, "pool sum and average both vectorised"


def test_a_pool_padded_along_its_vector_loop_keeps_that_loop_scalar():
    """In plain NCHW a pool's padding guard depends on W, the loop a vector would take: masked
    per-lane loads ran 16x slower than ORT (0.31 vs 0.02 ms at 96x16x16), LLVM's scalar loop 1.0x."""
    model = _model([helper.make_node("AveragePool", ["x"], ["y"], kernel_shape=[3, 3], pads=[1, 1, 1, 1])],
                   {"x": [1, 96, 16, 16]}, "y")
    _assert_matches_ort(model)
    (pool,) = [f for g, f in _scheduled_module(model).functions_items() if "pool" in g.name_hint]
    sch = tvm.s_tir.Schedule(pool)
    loops = sch.get_loops(sch.get_sblock("pool_sum"))
    assert not any(sch.get(lp).kind == tvm.tirx.ForKind.VECTORIZED for lp in loops)
    assert any(sch.get(lp).kind == tvm.tirx.ForKind.PARALLEL for lp in loops)


def test_unrecognised_ops_fall_back_correctly():
    nodes = [helper.make_node("Softmax", ["x"], ["s"], axis=-1),
             helper.make_node("Transpose", ["s"], ["t"], perm=[0, 2, 1]),
             helper.make_node("Sigmoid", ["t"], ["y"])]
    _assert_matches_ort(_model(nodes, {"x": [3, 10, 7]}, "y"))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["resnet18", "mobilenetv2", "inception"])
def test_small_cnn_matches_ort(name):
    model = resnet((2, 2, 2, 2), (16, 32, 64, 128), resolution=32) if name == "resnet18" else build(name, resolution=32)
    got, expected = _run_both(model)
    scale = max(1.0, float(np.abs(expected).max()))
    np.testing.assert_allclose(got, expected, atol=ATOL * scale, rtol=RTOL)


ELF_MACHINE_OFFSET = 18
ELF_MACHINE_AARCH64 = 183


def test_aarch64_neon_builds(tmp_path):
    spec = cs.cpu_vector_spec(AARCH64)
    assert spec.lanes == 4 and spec.channel_block == 8
    model = resnet((2, 2, 2, 2), (16, 32, 64, 128), resolution=32)
    ex = _compile(model, AARCH64)
    asm = ex.mod.imports[0].inspect_source("asm")
    assert "fmla" in asm and "v0.4s" in asm, "no NEON vector FMAs in the aarch64 code"
    gcc = shutil.which("aarch64-linux-gnu-gcc")
    if gcc is None:
        pytest.skip("aarch64-linux-gnu-gcc missing: object code built, shared library not linked")
    from tvm.support import cc

    path = tmp_path / "model_aarch64.so"
    ex.export_library(str(path), fcompile=cc.cross_compiler(gcc))
    header = path.read_bytes()[:ELF_MACHINE_OFFSET + 2]
    assert int.from_bytes(header[ELF_MACHINE_OFFSET:], "little") == ELF_MACHINE_AARCH64


def test_host_vector_spec_matches_cpu():
    spec = cs.cpu_vector_spec(HOST)
    if tvm.target.codegen.llvm_cpu_has_features("avx2", HOST):
        assert spec.lanes >= 8
    assert spec.channel_block % spec.lanes == 0


AVX2 = tvm.target.Target({"kind": "llvm", "mcpu": "haswell"})
AVX512 = tvm.target.Target({"kind": "llvm", "mcpu": "skylake-avx512"})


@pytest.mark.parametrize("target, gathers", [(AVX2, True), (AVX512, True), (AARCH64, False),
                                             (tvm.target.Target({"kind": "llvm", "mcpu": "sandybridge"}), False)])
def test_vector_spec_says_which_cpus_gather(target, gathers):
    """AVX2 and AVX-512 gather a vector from strided lanes in one instruction; AVX and NEON do not."""
    assert cs.cpu_vector_spec(target).gathers == gathers


@pytest.mark.parametrize("target, blocks, width, block, tile", [
    (AVX2, 12, 14, None, (6, 2)),     # tall: 12 accumulators, 8 operand loads per 12 FMAs
    (AVX2, 2, 112, None, (2, 4)),     # as tall as the blocks allow
    (AVX2, 3, 56, None, (3, 4)),
    (AVX2, 120, 7, None, (1, 7)),     # a 7-wide row fills one tile row better than 6 x 1
    (AVX512, 12, 56, None, (2, 8)),
    (AVX512, 3, 14, None, (1, 7)),
    (AARCH64, 12, 56, None, (1, 8)),  # a NEON block is two registers: 16 of the 32
    (AVX512, 3, 112, 8, (3, 4)),      # block 8 on 16 lanes: half-width registers, tiles up to twice as tall
    (AVX512, 4, 56, 8, (4, 4)),
    (AVX512, 3, 112, 16, (1, 8)),
])
def test_conv_register_tile_fits_the_registers_and_divides_the_conv(target, blocks, width, block, tile):
    spec = cs.cpu_vector_spec(target)
    rows, cols = spec.conv_tile(blocks, width, block)
    assert (rows, cols) == tile
    assert blocks % rows == 0 and width % cols == 0
    assert rows * cols <= spec.conv_tile_accumulators
    assert rows <= spec.conv_tile_rows * max(1, spec.lanes // (block or spec.channel_block))


def test_avx2_conv_accumulates_in_a_tall_register_tile():
    """A 1x1 conv with 12 output blocks at 14 px accumulates 6 blocks x 2 pixels in registers."""
    mod = _scheduled_module(_conv_block(16, 96, 1, hw=14), target=AVX2)
    func = next(f for g, f in mod.functions_items() if "conv2d_nchwc" in g.name_hint)
    sch = tvm.s_tir.Schedule(func)
    write_back = sch.get_sblock("nasc_conv2d_nchwc_intermediate_global")
    extents = [int(sch.get(loop).extent) for loop in sch.get_loops(write_back)]
    assert extents[-4:] == [6, 1, 2, 8], extents  # blocks, rows, pixels, lanes


def _compute_functions(asm: str) -> dict[str, str]:
    """The x86 assembly of each kernel's compute function (the body its parallel tasks run), by name."""
    parts = re.split(r"^(\w+_compute_):$", asm, flags=re.M)
    return dict(zip(parts[1::2], parts[2::2]))


@pytest.mark.parametrize("model", [_conv_block(32, 48, 1, hw=16, bias=True),
                                   _model([helper.make_node("MatMul", ["x", "w"], ["y"])], {"x": [12, 64]}, "y",
                                          [_const(np.random.default_rng(SEED), "w", (64, 32))])],
                         ids=["conv", "matmul"])
def test_a_register_tile_is_no_workspace(model):
    """A task's accumulator tile is a small buffer on its stack, which LLVM keeps in registers. In
    a workspace allocated per task (TVM's "local" scope on a CPU), every tile stored its zeros and
    its sums to memory besides (dead stores: ResNet-18 ran 1.13x slower, 2 threads, Zen 3)."""
    ex = _compile(model)
    np.testing.assert_allclose(*_run_both(model, ex=ex), atol=ATOL, rtol=RTOL)
    kernels = {name: body for name, body in _compute_functions(ex.mod.imports[0].inspect_source("asm")).items()
               if "conv2d_nchwc" in name or "matmul" in name}
    assert kernels, "no conv or matmul kernel in the module"
    for name, body in kernels.items():
        assert "vfmadd" in body, f"{name}: no vector FMAs"
        assert "AllocWorkspace" not in body, f"{name} allocates a workspace per task"


@pytest.mark.parametrize("stride", [1, 2])
def test_depthwise_conv_pads_the_rows_it_reads_inside_its_parallel_loop(stride):
    """No separate pass pads a depthwise conv's whole input: each parallel chunk of output rows
    pads the input rows it reads, once (not 3 rows for every output row); its tile is one block tall."""
    model = _conv_block(32, 32, 3, stride=stride, groups=32, hw=16)
    _assert_matches_ort(model)
    mod = _scheduled_module(model)
    func = next(f for g, f in mod.functions_items() if "conv2d_nchwc" in g.name_hint)
    sch = tvm.s_tir.Schedule(func)
    conv_nest = sch.get_loops(sch.get_sblock("nasc_conv2d_nchwc_update"))[0]
    pad_loops = sch.get_loops(sch.get_sblock("nasc_conv_pad"))
    assert sch.get(pad_loops[0]).same_as(sch.get(conv_nest)), "the pad runs as its own pass"
    assert sch.get(conv_nest).kind == tvm.tirx.ForKind.PARALLEL
    out_rows = 16 // stride
    chunk = max(d for d in range(1, DEPTHWISE_CHUNK_ROWS + 1) if out_rows % d == 0)
    pad_rows = [int(sch.get(lp).extent) for lp in pad_loops[1:]][2]
    assert pad_rows == (chunk - 1) * stride + 3 > 3, "a chunk of rows pads the input rows its output rows read"
    write_back = sch.get_loops(sch.get_sblock("nasc_conv2d_nchwc_intermediate_global"))
    assert int(sch.get(write_back[-4]).extent) == 1
