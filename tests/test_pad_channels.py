"""passes.pad_channels: widened conv channels keep the model's numerics (via ORT), padded channels
stay finite and unread, and the CPU pipeline pads exactly when it pays."""

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from conftest import SMALL, prepared, random_feeds
from nasc.backends import cpu_schedules as cs
from nasc.backends import ort
from nasc.partitioner import analyze, load_model
from nasc.passes.pad_channels import channel_layouts, pad_channels

SEED = 0


def _const(rng, name, shape, scale=0.3):
    return numpy_helper.from_array((rng.standard_normal(shape) * scale).astype(np.float32), name)


def _conv(x, w, y, k=3, group=1, bias=None):
    return helper.make_node("Conv", [x, w] + ([bias] if bias else []), [y], name=y, kernel_shape=[k, k],
                            pads=[k // 2] * 4, group=group)


def _every_op_model(split: bool = True) -> onnx.ModelProto:
    """12-channel convs whose outputs meet everything the pass treats apart: a concat (interleaved
    padding), a depthwise conv, BatchNorm, per-channel Mul/Div/Add constants, a residual Add, a
    channel Split and a Flatten + Gemm (both read the real channels only) and a widened graph output
    that another node also reads. (A 10-channel split holds the model to plain convs on a CPU.)"""
    rng = np.random.default_rng(SEED)
    nodes = [
        _conv("x", "w1", "a", bias="b1"), helper.make_node("Sigmoid", ["a"], ["sa"], name="sa"),
        _conv("x", "w2", "b", k=1), helper.make_node("Relu", ["b"], ["rb"], name="rb"),
        helper.make_node("Concat", ["sa", "rb"], ["cat"], name="cat", axis=1),
        _conv("cat", "wd", "dw", group=24, bias="bd"),
        helper.make_node("BatchNormalization", ["dw", "s", "bb", "m", "v"], ["bn"], name="bn"),
        helper.make_node("Mul", ["bn", "scale"], ["mul"], name="mul"),
        helper.make_node("Div", ["mul", "div"], ["div_out"], name="div_out"),
        helper.make_node("Add", ["div_out", "cat"], ["res"], name="res"),
        helper.make_node("Clip", ["res", "lo", "hi"], ["clip"], name="clip"),
        helper.make_node("MaxPool", ["clip"], ["pool"], name="pool", kernel_shape=[2, 2], strides=[2, 2]),
        _conv("pool", "w3", "c3", k=1),
        *([helper.make_node("Split", ["c3", "halves"], ["left", "right"], name="split", axis=1),
           helper.make_node("Add", ["left", "right"], ["sum"], name="sum")] if split else []),
        helper.make_node("GlobalAveragePool", ["c3"], ["gap"], name="gap"),
        helper.make_node("Flatten", ["gap"], ["flat"], name="flat"),
        helper.make_node("Gemm", ["flat", "fc", "fcb"], ["logits"], name="logits", transB=1),
    ]
    inits = [_const(rng, "w1", (12, 8, 3, 3)), _const(rng, "b1", (12,)), _const(rng, "w2", (12, 8, 1, 1)),
             _const(rng, "wd", (24, 1, 3, 3)), _const(rng, "bd", (24,)),
             numpy_helper.from_array((1 + 0.1 * rng.random(24)).astype(np.float32), "s"),
             _const(rng, "bb", (24,)), _const(rng, "m", (24,)),
             numpy_helper.from_array((1 + rng.random(24)).astype(np.float32), "v"),
             _const(rng, "scale", (1, 24, 1, 1)),
             numpy_helper.from_array((0.5 + rng.random((24, 1, 1))).astype(np.float32), "div"),
             numpy_helper.from_array(np.float32(0.0), "lo"), numpy_helper.from_array(np.float32(6.0), "hi"),
             _const(rng, "w3", (20, 24, 1, 1)), numpy_helper.from_array(np.array([10, 10], np.int64), "halves"),
             _const(rng, "fc", (5, 20)), _const(rng, "fcb", (5,))]
    graph = helper.make_graph(nodes, "every_op", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, 8, 8])],
                              [helper.make_tensor_value_info(o, TensorProto.FLOAT, shape) for o, shape in
                               (("logits", [1, 5]), ("sum", [1, 10, 4, 4]), ("c3", [1, 20, 4, 4]))
                               if split or o != "sum"],
                              inits)
    return load_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))


def _all_values(model: onnx.ModelProto, feeds) -> dict[str, np.ndarray]:
    m = onnx.ModelProto()
    m.CopyFrom(model)
    have = {o.name for o in m.graph.output}
    m.graph.output.extend(helper.ValueInfoProto(name=o) for n in m.graph.node for o in n.output if o not in have)
    return ort.run(m, feeds)


@pytest.mark.parametrize("block", [16, 8])
def test_every_op_keeps_numerics_and_padding_stays_finite(block):
    model = _every_op_model()
    before = onnx.ModelProto()
    before.CopyFrom(model)
    padded = pad_channels(model, block)
    assert model == before, "passes must not mutate their input"
    feeds = random_feeds(model)
    want, got = ort.run(model, feeds), ort.run(padded, feeds)
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-5, atol=1e-5)
    layouts = channel_layouts(model, block)
    assert {"a", "b", "cat", "dw", "bn", "mul", "div_out", "res", "pool", "c3"} <= set(layouts)
    values, reference = _all_values(padded, feeds), {**feeds, **_all_values(model, feeds)}
    # the 8-channel input is widened on entry where the block does not divide it
    assert ("x" in layouts) == (block == 16)
    for name, (width, real) in layouts.items():
        value = values.get(f"{name}.padded", values.get(name))
        assert value.shape[1] == width and width % block == 0
        assert np.isfinite(value).all(), f"{name}: padded channels must stay finite"
        np.testing.assert_allclose(value[:, real], reference[name], rtol=1e-5, atol=1e-5)
    # the concat interleaves padding: each piece keeps its real channels first
    width = -(-12 // block) * block
    assert layouts["cat"][0] == 2 * width
    assert list(layouts["cat"][1]) == list(range(12)) + list(range(width, width + 12))
    # every original node is still there by name; the depthwise conv now covers the padded channels
    names = {n.name: n for n in padded.graph.node}
    assert {n.name for n in model.graph.node} <= set(names)
    assert helper.get_attribute_value(next(a for a in names["dw"].attribute if a.name == "group")) == 2 * width
    # the split and the classifier read real channels (a gather); the widened output keeps its name
    gathered = {n.input[0] for n in padded.graph.node if n.op_type == "Gather"}
    assert gathered == {"c3.padded", "gap"}
    assert [o.name for o in padded.graph.output] == [o.name for o in model.graph.output]


@pytest.mark.parametrize("name", sorted(SMALL))
@pytest.mark.parametrize("block", [16, 8, 4])
def test_example_models_keep_their_outputs(name, block):
    _, a, _ = prepared(name)
    padded = pad_channels(a.model, block)
    feeds = random_feeds(a.model)
    want, got = ort.run(a.model, feeds), ort.run(padded, feeds)
    for out in want:
        scale = max(1.0, float(np.abs(want[out]).max()))
        np.testing.assert_allclose(got[out], want[out], rtol=1e-4, atol=1e-4 * scale)
    # every dense conv's output is a multiple of the block now
    widened = analyze(padded)
    for n in widened.nodes:
        if n.op_type == "Conv":
            cin, cout, groups = cs.conv_channels(widened, n)
            assert groups > 1 or cout % block == 0, f"{name}: conv {n.name} has {cout} channels"


def test_the_cpu_pipeline_pads_only_where_convs_get_cheaper():
    def block_for(name):
        return cs.padding_block(prepared(name)[1].model, 16)

    # 8-, 12- and 24-channel convs hold Inception to a 4-channel block; padded they fill a vector
    inception = prepared("inception")[1]
    assert cs.model_conv_block(inception, 16) == 4
    assert block_for("inception") == 16
    assert cs.model_conv_block(analyze(pad_channels(inception.model, 16)), 16) == 16
    # DenseNet's concats (36, 48, 60 ... channels) leave every conv plain until padded
    assert cs.model_conv_block(prepared("densenet")[1], 16) is None and block_for("densenet") is not None
    # already a multiple of the block: nothing to pad
    assert block_for("resnet8") is None
    # 8-channel convs: a block of 8 costs less than four times the MACs at 16
    assert cs.padding_block(_chain([8, 8, 8, 8]), 16) is None
    # 12 channels hold 8 -> 12 -> 8 to a block of 4. Padded to 8 or to 16 alike the convs sum over their
    # real input channels into 16 outputs (1.67x the MACs); in block 16 each MAC costs least (at
    # 112 px, 2 threads, Zen 5: 0.24 ms padded to 16, 0.28 to 8, 0.45 not padded)
    assert cs.padding_block(_chain([8, 12, 8]), 16) == 16
    assert cs.padding_block(_chain([16, 12, 12, 16]), 16) == 16


def test_a_stem_writing_the_block_is_priced_as_a_conv_in_that_block():
    """A 3-channel stem reads plain and writes NCHW{c}c, register-tiled on the block's lanes: in
    a block half the vector wide it costs what the model's other convs cost there (it had been
    priced as a plain conv whatever the block, so padding an Inception head whose 8-channel
    convs held it to block 8 looked no cheaper, and it ran 1.12x slower unpadded)."""
    full, half = analyze(_chain([3, 16, 16])), analyze(_chain([3, 8, 8]))
    assert cs.model_conv_block(full, 16) == 16 and cs.model_conv_block(half, 16) == 8
    assert cs.conv_cost(full, 16) == pytest.approx(float(full.macs.sum()))
    assert cs.conv_cost(half, 16) == pytest.approx(float(half.macs.sum()) * 2 ** cs.NARROW_BLOCK_EXPONENT)


def _chain(channels: list[int]) -> onnx.ModelProto:
    rng = np.random.default_rng(SEED)
    nodes, inits, x = [], [], "x"
    for i, (cin, cout) in enumerate(zip(channels, channels[1:])):
        inits.append(_const(rng, f"w{i}", (cout, cin, 3, 3)))
        nodes.append(_conv(x, f"w{i}", f"c{i}"))
        x = f"c{i}"
    graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, channels[0], 16, 16])],
                              [helper.make_tensor_value_info(x, TensorProto.FLOAT, [1, channels[-1], 16, 16])], inits)
    return load_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))


def test_the_tvm_cpu_backend_compiles_the_padded_graph_and_keeps_the_outputs():
    """compile_model pads a model whose convs the host's vector outgrows; the library it builds
    (gathers, padded depthwise and BatchNorm included) computes the original outputs."""
    from nasc.backends import tvm as tvm_backend
    from nasc.backends.targets import resolve_target

    model = _every_op_model(split=False)
    target = resolve_target("llvm")
    steps = []
    ex = tvm_backend.compile_model(model, target, log=steps.append)
    block = cs.padding_block(model, cs.cpu_vector_spec(target.tvm()).channel_block)
    assert block and f"pad-channels-{block}" in steps
    assert set(tvm_backend.target_layouts(model, target)) == set(channel_layouts(model, block))
    feeds = random_feeds(model)
    outs = [o.name for o in model.graph.output]
    got = tvm_backend.Runner(ex, "cpu", list(feeds), outs)(feeds)
    want = ort.run(model, feeds)
    for name in outs:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-4, atol=1e-4)


def test_a_tail_widens_the_cut_tensors_it_receives():
    """A DenseNet tail receives 24- and 12-channel tensors and concatenates them: widened on entry,
    its convs run in the same block as the whole model's, and it computes the same outputs."""
    from nasc.passes import split_model

    _, a, cuts = prepared("densenet")
    shapes = lambda m: {i.name: i.type.tensor_type.shape.dim[1].dim_value for i in m.graph.input}  # noqa: E731
    tails = [t for _, t in (split_model(a, c) for c in cuts) if t is not None]
    tail = next(t for t in tails if any(c % 16 and c >= 4 for c in shapes(t).values()))
    odd = {x for x, c in shapes(tail).items() if c % 16}
    assert cs.padding_block(tail, 16) == cs.padding_block(a.model, 16) == 16
    assert odd <= set(channel_layouts(tail, 16))
    feeds = random_feeds(tail)
    want, got = ort.run(tail, feeds), ort.run(pad_channels(tail, 16), feeds)
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-4, atol=1e-4)
    # an image's 3 channels stay as they are
    assert "input" not in channel_layouts(a.model, 16)
