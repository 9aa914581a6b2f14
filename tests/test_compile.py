"""The compile path end to end with real TVM: artifacts, verification, atomic writes, loader."""

import json
import shutil

import numpy as np
import onnx
import pytest
from onnx import helper

from conftest import SMALL, prepared, random_feeds, small_model
from nasc.backends import ort
from nasc.backends.cuda import FATBIN_MAGIC
from nasc.backends.targets import AARCH64_GCC, resolve_target
from nasc.backends.tvm import Runner, compile_model as tvm_compile
from nasc.compile import compile_model, plan
from nasc.errors import ArtifactError, CutError, UnsupportedOpError
from nasc.partitioner import SPLIT
from nasc.passes import split_model
from nasc.runtime import open_artifact


def mid_split(name="resnet8"):
    p = plan(small_model(name))
    splits = [c for c in p.cuts if c.kind == SPLIT]
    return splits[len(splits) // 2].index


def test_llvm_head_cuda_tail_artifact(tmp_path):
    out = tmp_path / "art"
    k = mid_split()
    m = compile_model(small_model("resnet8"), out, split=k, device_target="llvm", server_target="cuda:sm_80")
    assert m["split"]["index"] == k and m["split"]["kind"] == "split"
    assert m["head"]["target"]["tvm"]["kind"] == "llvm" and m["tail"]["target"]["tvm"] == {"kind": "cuda", "arch": "sm_80"}
    assert [o["name"] for o in m["head"]["outputs"]] == [i["name"] for i in m["tail"]["inputs"]] == m["split"]["tensors"]
    for key in ("versions", "source", "predicted", "payload_bytes", "device_peak_memory_bytes", "files", "compress"):
        assert key in m
    assert set(m["predicted"]) == {"device_ms", "transfer_ms", "server_ms", "total_ms"}
    assert set(m["files"]) == {"head/model.onnx", "head/model.so", "tail/model.onnx", "tail/model.so"}
    v = m["verification"]["tvm"]
    assert v["max_abs_error"] < 1e-3 and "llvm build" in v["via"]["tail"]
    # the CUDA library ships device code (an nvcc fatbin for sm_80), not CUDA C to compile at load
    tail_lib = (out / "tail" / "model.so").read_bytes()
    assert FATBIN_MAGIC in tail_lib and b"__global__" not in tail_lib
    assert json.loads((out / "manifest.json").read_text()) == m
    # the device side runs the real library; the CUDA tail refuses to load on a machine without a GPU
    art = open_artifact(out)
    head = art.load("head")
    assert head.engine == "tvm"
    feeds = random_feeds(small_model("resnet8"), 3)
    got = head.run(feeds)
    ref = ort.run(onnx.load(str(out / "head" / "model.onnx")), feeds)
    for k_, v_ in ref.items():
        np.testing.assert_allclose(got[k_], v_, atol=1e-4)
    if not resolve_target("cuda").runs_here():
        with pytest.raises(ArtifactError, match="cannot run on this machine"):
            art.load("tail")
    tail = art.load("tail", engine="ort")
    final = tail.run(got)
    np.testing.assert_allclose(final["logits0"], ort.run(small_model("resnet8"), feeds)["logits0"], atol=1e-3)


def test_int8_artifact_reports_error_and_payload(tmp_path):
    out = tmp_path / "q"
    m = compile_model(small_model("resnet8"), out, split=mid_split(), compress="int8", granularity="channel",
                      device_target="llvm", server_target="llvm", calib=4)
    comp = m["compress"]
    assert comp["kind"] == "int8" and comp["granularity"] == "channel"
    assert 0.24 < comp["payload_ratio"] < 0.3
    assert m["payload_bytes"] < m["payload_bytes_uncompressed"]
    assert comp["error_vs_float"]["top1_agreement"] is not None
    assert m["verification"]["tvm"]["wire_max_lsb_diff"] <= 1
    assert all(t["wire_dtype"] == "uint8" for t in m["cut_tensors"])
    art = open_artifact(out)
    head, tail = art.load("head"), art.load("tail")
    feeds = random_feeds(small_model("resnet8"), 5)
    wire = head.run(feeds)
    assert all(v.dtype == np.uint8 for v in wire.values())
    final = tail.run(wire)
    ref = ort.run(small_model("resnet8"), feeds)["logits0"]
    assert final["logits0"].argmax() == ref.argmax()


@pytest.mark.skipif(shutil.which(AARCH64_GCC) is None, reason="aarch64 cross gcc not installed (make setup installs it)")
def test_aarch64_head_cross_compiles(tmp_path):
    m = compile_model(small_model("tiny"), tmp_path / "arm", split=mid_split("tiny"), device_target="aarch64", server_target="llvm")
    lib = (tmp_path / "arm" / m["head"]["library"]).read_bytes()
    assert lib[:4] == b"\x7fELF" and lib[18] == 183  # e_machine EM_AARCH64
    assert "llvm build" in m["verification"]["tvm"]["via"]["head"]


def test_ort_backend_writes_onnx_only(tmp_path):
    m = compile_model(small_model("tiny"), tmp_path / "o", backend="ort", split=mid_split("tiny"))
    assert m["head"]["library"] is None and set(m["files"]) == {"head/model.onnx", "tail/model.onnx"}
    art = open_artifact(tmp_path / "o")
    feeds = random_feeds(small_model("tiny"))
    out = art.load("tail").run(art.load("head").run(feeds))
    np.testing.assert_allclose(out["logits0"], ort.run(small_model("tiny"), feeds)["logits0"], atol=1e-4)


def test_tampered_artifact_is_rejected(tmp_path):
    compile_model(small_model("tiny"), tmp_path / "t", backend="ort", split="server-only")
    f = tmp_path / "t" / "tail" / "model.onnx"
    f.write_bytes(f.read_bytes() + b"\0")
    with pytest.raises(ArtifactError, match="tail/model.onnx does not match its sha256"):
        open_artifact(tmp_path / "t")


def test_failed_build_leaves_nothing(tmp_path):
    """An op TVM cannot import fails the build naming the node; OUT and its parent stay as they were."""
    g = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["r"], name="relu"), helper.make_node("Det", ["r"], ["det"], name="det_node")],
        "det", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 2, 2])],
        [helper.make_tensor_value_info("det", onnx.TensorProto.FLOAT, [1])],
    )
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    out = tmp_path / "fail"
    out.mkdir()
    (out / "manifest.json").write_text("{}")
    with pytest.raises(UnsupportedOpError, match="det_node.*Det"):
        compile_model(model, out, split="server-only", server_target="llvm")
    assert json.loads((out / "manifest.json").read_text()) == {}, "a failed build must not touch OUT"
    assert [p.name for p in tmp_path.iterdir()] == ["fail"], "no staging directory may be left behind"


def test_split_errors():
    with pytest.raises(CutError, match="no such cut"):
        plan(small_model("tiny"), split="999")
    with pytest.raises(CutError, match="no 'nasc.split' metadata"):
        plan(small_model("tiny"), split="annotated")


def test_annotated_split():
    m = small_model("resnet8")
    p0 = plan(m)
    target = next(c for c in p0.cuts if c.kind == SPLIT and len(c.tensors) == 1)
    m.metadata_props.add(key="nasc.split", value=",".join(target.tensors))
    assert plan(m, split="annotated").cut.tensors == target.tensors


@pytest.mark.parametrize("name", [n for n in SMALL if n != "tiny"])
def test_tvm_matches_ort_on_sampled_cuts(name):
    """TVM-compiled head then tail equals ORT on the original, for a sample of cuts per model."""
    original, a, cuts = prepared(name)
    splits = [c for c in cuts if c.kind == SPLIT]
    sample = [max(splits, key=lambda c: len(c.tensors)), splits[len(splits) // 2]]
    feeds = random_feeds(original, 2)
    ref = ort.run(original, feeds)
    llvm = resolve_target("llvm")
    for c in sample:
        head, tail = split_model(a, c)
        runners = []
        for half in (head, tail):
            ex = tvm_compile(half, llvm)
            runners.append(Runner(ex, "cpu", [i.name for i in half.graph.input], [o.name for o in half.graph.output]))
        got = run_pair_tvm(runners, feeds)
        for k, v in ref.items():
            assert np.abs(got[k] - v).max() <= 1e-3 * max(1.0, np.abs(v).max()), f"{name} cut {c.index}"


def run_pair_tvm(runners, feeds):
    h, t = runners
    mid = h(feeds)
    return {**mid, **t({**feeds, **mid})}


def test_runner_results_outlive_the_next_call():
    """A TVM Runner hands host results over without a copy: one call's results keep their values
    through later calls, for every output of a multi-output head."""
    original, a, cuts = prepared("resnet8")
    cut = max((c for c in cuts if c.kind == SPLIT), key=lambda c: len(c.tensors))
    head, _ = split_model(a, cut)
    names_in, names_out = [i.name for i in head.graph.input], [o.name for o in head.graph.output]
    run = Runner(tvm_compile(head, resolve_target("llvm")), "cpu", names_in, names_out)
    first_feeds, second_feeds = random_feeds(head, 1), random_feeds(head, 2)
    first = run(first_feeds)
    kept = {k: v.copy() for k, v in first.items()}
    second = run(second_feeds)
    assert len(names_out) > 1
    for k in names_out:
        assert np.array_equal(first[k], kept[k]), k
        assert not np.array_equal(first[k], second[k]), k
        want = ort.run(head, first_feeds)[k]
        assert np.abs(first[k] - want).max() <= 1e-3 * max(1.0, np.abs(want).max()), k


def _aligned_copy(x: np.ndarray, offset_bytes: int) -> np.ndarray:
    """`x` copied to storage whose data starts `offset_bytes` past a 64-byte boundary."""
    raw = np.empty(x.nbytes + 128, np.uint8)
    start = (-raw.ctypes.data % 64) + offset_bytes
    out = raw[start:start + x.nbytes].view(x.dtype).reshape(x.shape)
    out[...] = x
    return out


@pytest.mark.parametrize("layout", ["aligned", "misaligned", "read-only", "strided"])
def test_runner_takes_any_feed_and_returns_no_storage_it_reuses(layout):
    """Aligned host feeds are wrapped without a copy, others are copied into a tensor the Runner
    keeps: results match ORT whatever the feed's alignment, flags and strides, the feed is left
    as it was, and an output that passes an input through (a reshape) is a copy, so the next
    call neither changes it nor is changed by it."""
    x = helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 4, 6, 6])
    outs = [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 4, 6, 6]),
            helper.make_tensor_value_info("z", onnx.TensorProto.FLOAT, [1, 144])]
    shape = helper.make_tensor("shape", onnx.TensorProto.INT64, [2], [1, 144])
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"]), helper.make_node("Reshape", ["x", "shape"], ["z"])],
                              "pass_through", [x], outs, [shape])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    run = Runner(tvm_compile(model, resolve_target("llvm")), "cpu", ["x"], ["y", "z"])
    rng = np.random.default_rng(0)

    def feed(seed_value: np.ndarray) -> np.ndarray:
        if layout == "strided":
            return np.ascontiguousarray(seed_value.transpose(0, 1, 3, 2)).transpose(0, 1, 3, 2)
        f = _aligned_copy(seed_value, 0 if layout in ("aligned", "read-only") else 4)
        f.setflags(write=layout != "read-only")
        return f

    values = [rng.standard_normal((1, 4, 6, 6)).astype(np.float32) for _ in range(2)]
    feeds = [feed(v) for v in values]
    first = run({"x": feeds[0]})
    kept = {k: v.copy() for k, v in first.items()}
    second = run({"x": feeds[1]})
    for value, f, got in zip(values, feeds, (first, second)):
        assert np.array_equal(f, value), "the feed is unchanged"
        want = ort.run(model, {"x": value})
        for k in ("y", "z"):
            assert np.array_equal(got[k], want[k]), k
        assert not np.shares_memory(got["z"], f)
    for k in ("y", "z"):
        assert np.array_equal(first[k], kept[k]), k
