"""passes: each pass is pure, returns a checked model, and keeps numerics (via ORT)."""

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from conftest import prepared, random_feeds, run_pair, small_model
from nasc.backends import ort
from nasc.partitioner import SPLIT, load_model
from nasc.passes import (dequantize_tail, eliminate_dead_nodes, extract_half, fold_batchnorm, fold_constants, prepare,
                         quant_params, quantize_head, split_model)
from nasc.passes.util import get_metadata


def _same(m1, m2, feeds, tol=1e-5):
    r1, r2 = ort.run(m1, feeds), ort.run(m2, feeds)
    for k in r1:
        np.testing.assert_allclose(r2[k], r1[k], rtol=tol, atol=tol)


def test_fold_batchnorm_removes_bn_and_keeps_numerics():
    m = load_model(small_model("resnet8"))
    before = onnx.ModelProto()
    before.CopyFrom(m)
    out = fold_batchnorm(m)
    assert m == before, "passes must not mutate their input"
    assert not any(n.op_type == "BatchNormalization" for n in out.graph.node)
    assert any(n.op_type == "BatchNormalization" for n in m.graph.node)
    _same(m, out, random_feeds(m), tol=1e-4)


def test_fold_constants_folds_shape_arithmetic():
    shape = numpy_helper.from_array(np.array([2, -1], np.int64), "two")
    g = helper.make_graph(
        [
            helper.make_node("Constant", [], ["c"], value=numpy_helper.from_array(np.float32(2.0))),
            helper.make_node("Shape", ["x"], ["s"]),
            helper.make_node("Gather", ["s", "idx"], ["g"], axis=0),
            helper.make_node("Unsqueeze", ["g", "ax"], ["gu"]),
            helper.make_node("Concat", ["gu", "two"], ["newshape"], axis=0),
            helper.make_node("Mul", ["x", "c"], ["y"]),
            helper.make_node("Reshape", ["y", "newshape"], ["z"]),
        ],
        "shapes",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 6])],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, [1, 2, 12])],
        [numpy_helper.from_array(np.array(0, np.int64), "idx"), numpy_helper.from_array(np.array([0], np.int64), "ax"), shape],
    )
    m = load_model(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]))
    out = fold_constants(m)
    assert [n.op_type for n in out.graph.node] == ["Mul", "Reshape"]
    _same(m, out, random_feeds(m))


def test_dead_nodes_are_removed():
    m = load_model(small_model("tiny"))
    dead = helper.make_node("Relu", [m.graph.node[0].output[0]], ["unused"], name="dead")
    m.graph.node.append(dead)
    out = eliminate_dead_nodes(m)
    assert "dead" not in {n.name for n in out.graph.node}
    assert len(out.graph.node) == len(m.graph.node) - 1


def test_prepare_keeps_outputs_and_metadata():
    m = load_model(small_model("mobilenetv2", ))
    m.metadata_props.add(key="owner", value="team")
    out = prepare(m)
    assert get_metadata(out, "owner") == "team"
    assert [o.name for o in out.graph.output] == [o.name for o in m.graph.output]
    _same(m, out, random_feeds(m), tol=1e-4)


def test_split_halves_are_standalone_and_named_after_the_cut():
    original, a, cuts = prepared("inception")
    c = max((c for c in cuts if c.kind == SPLIT), key=lambda c: len(c.tensors))
    head, tail = split_model(a, c)
    onnx.checker.check_model(head, full_check=True)
    onnx.checker.check_model(tail, full_check=True)
    assert [o.name for o in head.graph.output] == list(c.tensors)
    assert [i.name for i in tail.graph.input] == list(c.tensors)
    assert get_metadata(head, "nasc.half") == "head" and get_metadata(tail, "nasc.half") == "tail"
    assert get_metadata(tail, "nasc.cut") == ",".join(c.tensors)
    assert head.opset_import == original.opset_import and head.producer_name == original.producer_name
    # weights are split, not copied wholesale
    assert {t.name for t in head.graph.initializer}.isdisjoint({t.name for t in tail.graph.initializer})


def test_a_half_extracted_by_its_node_mask_is_the_cuts_half():
    """extract_half(mask) is the cut's head or tail: the same nodes, reading and returning the same
    tensors, and the head computes the same cut tensors."""
    original, a, cuts = prepared("inception")
    feeds = random_feeds(original)
    checked = 0
    for c in cuts:
        if c.kind != SPLIT:
            continue
        head, tail = split_model(a, c)
        by_mask = extract_half(a, c.head_mask), extract_half(a, ~c.head_mask)
        for half, same in zip(by_mask, (head, tail)):
            onnx.checker.check_model(half, full_check=True)
            assert [n.name for n in half.graph.node] == [n.name for n in same.graph.node]
            assert {i.name for i in half.graph.input} == {i.name for i in same.graph.input}
            assert {o.name for o in half.graph.output} == {o.name for o in same.graph.output}
        assert get_metadata(by_mask[0], "nasc.half") == "head" and get_metadata(by_mask[1], "nasc.half") == "tail"
        got, want = ort.run(by_mask[0], feeds), ort.run(head, feeds)
        for t in c.tensors:
            np.testing.assert_array_equal(got[t], want[t])
        checked += 1
    assert checked >= 10
    assert extract_half(a, np.zeros(len(a.nodes), bool)) is None


@pytest.mark.parametrize("per_channel", [False, True])
def test_int8_bottleneck(per_channel):
    original, a, cuts = prepared("resnet8")
    c = next(c for c in reversed(cuts) if c.kind == SPLIT and len(c.tensors) == 2)
    head, tail = split_model(a, c)
    calib = [random_feeds(original, s) for s in range(6)]
    vals = [ort.run(head, f) for f in calib]
    qs = [quant_params(t, [v[t] for v in vals], per_channel) for t in c.tensors]
    qh, qt = quantize_head(head, qs), dequantize_tail(tail, qs)
    assert [o.name for o in qh.graph.output] == [q.wire_name for q in qs]
    assert [i.name for i in qt.graph.input] == [q.wire_name for q in qs]
    assert all(o.type.tensor_type.elem_type == TensorProto.UINT8 for o in qh.graph.output)
    for q in qs:
        assert (q.axis is not None) == per_channel
        assert len(q.scale) == (a.specs[q.tensor].shape[1] if per_channel else 1)
    wire = ort.run(qh, calib[0])
    assert sum(v.nbytes for v in wire.values()) * 4 == c.payload_bytes
    ref = ort.run(original, calib[0])
    got = run_pair(qh, qt, calib[0])
    for k, v in ref.items():
        err = np.abs(got[k] - v).max()
        # one quantization step per element at the cut bounds the output error loosely
        assert err < 0.2 * np.abs(v).max(), err
        assert got[k].argmax() == v.argmax()


def test_quant_params_cover_zero_and_range():
    x = [np.linspace(0.5, 3.0, 24, dtype=np.float32).reshape(1, 2, 3, 4)]
    q = quant_params("t", x, per_channel=False)
    assert q.zero_point == (0,)
    assert q.scale[0] == pytest.approx(3.0 / 255, rel=1e-6)
    qc = quant_params("t", x, per_channel=True)
    assert qc.axis == 1 and len(qc.scale) == 2
