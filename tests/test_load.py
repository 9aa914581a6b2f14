"""partitioner.load: validation, dynamic shapes, and clear errors naming the file/input."""

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from conftest import small_model
from nasc.errors import ModelError
from nasc.partitioner import load_model, parse_shape


def dynamic_model():
    g = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"]), helper.make_node("Flatten", ["y"], ["z"])],
        "dyn",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, "h", "w"])],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, ["batch", None])],
    )
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def test_missing_file(tmp_path):
    with pytest.raises(ModelError, match="no such file"):
        load_model(tmp_path / "nope.onnx")


def test_not_onnx(tmp_path):
    p = tmp_path / "garbage.onnx"
    p.write_bytes(b"\x00\x01this is not a protobuf\xff" * 10)
    with pytest.raises(ModelError, match=str(p)):
        load_model(p)


def test_truncated(tmp_path):
    data = small_model("tiny").SerializeToString()
    p = tmp_path / "cut.onnx"
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelError, match="cut.onnx"):
        load_model(p)


def test_empty_file(tmp_path):
    p = tmp_path / "empty.onnx"
    p.write_bytes(b"")
    with pytest.raises(ModelError, match="empty"):
        load_model(p)


def test_dynamic_dims_need_shape():
    with pytest.raises(ModelError, match=r"input 'x' has dynamic shape.*--input-shape x="):
        load_model(dynamic_model())


def test_input_shape_fixes_dims():
    m = load_model(dynamic_model(), {"x": (2, 3, 4, 5)})
    out = m.graph.output[0].type.tensor_type.shape
    assert [d.dim_value for d in out.dim] == [2, 60]


def test_unknown_input_shape_name():
    with pytest.raises(ModelError, match="'y', which is not an input"):
        load_model(dynamic_model(), {"y": (1, 3, 4, 5)})


def test_parse_shape():
    assert parse_shape("input=1x3x224x224") == ("input", (1, 3, 224, 224))
    assert parse_shape("a=b=1x2") == ("a=b", (1, 2))
    for bad in ("input", "x=", "x=1xax3", "x=0x3"):
        with pytest.raises(ModelError):
            parse_shape(bad)


def test_nodes_named_and_ordered():
    m = small_model("tiny")
    for n in m.graph.node:
        n.name = ""
    nodes = list(m.graph.node)
    del m.graph.node[:]
    m.graph.node.extend(reversed(nodes))  # out of order: the loader sorts topologically
    loaded = load_model(m)
    names = [n.name for n in loaded.graph.node]
    assert len(set(names)) == len(names) and all(names)
    seen = {"input"} | {t.name for t in loaded.graph.initializer}
    for n in loaded.graph.node:
        assert all(x in seen for x in n.input if x)
        seen.update(n.output)


def test_file_roundtrip(tmp_path):
    p = tmp_path / "tiny.onnx"
    onnx.save(small_model("tiny"), str(p))
    m = load_model(p)
    assert all(np.all([d.dim_value > 0 for d in vi.type.tensor_type.shape.dim]) for vi in m.graph.value_info)
