"""Winograd F(4x4, 3x3) convs on CPUs: the transforms are exact algebra, the rule picks the convs
it pays for, compiled convs match ONNX Runtime, and each conv's three kernels are priced as one."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import tvm
from onnx import TensorProto, helper, numpy_helper
from tvm import relax

from nasc.backends import cpu_schedules as cs
from nasc.backends import tvm as tvm_backend
from nasc.backends.context import measure_in_context
from nasc.backends.cpu_rules import winograd
from nasc.backends.targets import resolve_target
from nasc.partitioner.analysis import analyze
from nasc.search.predictor import kernel_class

SEED = 0
# Winograd reassociates each output as sums of ~100 products with coefficients up to 8: float32
# error grows to ~1e-5 of the output's range (the direct conv: ~1e-6)
RTOL = 1e-4


def _conv_model(cin: int, cout: int, hw: int, batch: int = 1, stride: int = 1, residual: bool = False,
                k: int = 3) -> onnx.ModelProto:
    """Conv + bias + ReLU (+ a residual Add of a second conv's output)."""
    rng = np.random.default_rng(SEED)
    const = lambda name, shape: numpy_helper.from_array(  # noqa: E731
        (rng.standard_normal(shape) * 0.3).astype(np.float32), name)
    inits = [const("w", (cout, cin, k, k)), const("b", (cout,))]
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], kernel_shape=[k, k], pads=[k // 2] * 4,
                              strides=[stride, stride]),
             helper.make_node("Relu", ["c"], ["r"])]
    out = "r"
    if residual:
        inits.append(const("w2", (cout, cout, 3, 3)))
        nodes += [helper.make_node("Conv", ["r", "w2"], ["c2"], kernel_shape=[3, 3], pads=[1] * 4),
                  helper.make_node("Add", ["c2", "r"], ["y"])]
        out = "y"
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, cin, hw, hw])],
                              [helper.make_tensor_value_info(out, TensorProto.FLOAT, None)], inits)
    model = onnx.shape_inference.infer_shapes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    onnx.checker.check_model(model)
    return model


def _direct(d: np.ndarray, g: np.ndarray) -> np.ndarray:
    """3x3 correlation of a 6x6 tile: the 4x4 outputs a direct conv computes."""
    return np.array([[np.sum(d[y:y + 3, x:x + 3] * g) for x in range(4)] for y in range(4)])


def test_transforms_compute_the_direct_correlation_of_a_tile():
    rng = np.random.default_rng(SEED)
    d, g = rng.standard_normal((6, 6)), rng.standard_normal((3, 3))
    u = winograd.transformed_weight(g[None, None].astype(np.float64))[:, :, 0, 0]
    v = winograd._BT @ d @ winograd._BT.T
    np.testing.assert_allclose(winograd._AT @ (u * v) @ winograd._AT.T, _direct(d, g), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("kernel, stride, pads, groups, out_hw, channels, expected", [
    ((3, 3), (1, 1), (1, 1, 1, 1), 1, (56, 56), (64, 64), True),      # ResNet-18's first stage
    ((3, 3), (1, 1), (1, 1, 1, 1), 1, (7, 7), (256, 256), True),      # few tiles, weights cached
    ((3, 3), (1, 1), (1, 1, 1, 1), 1, (7, 7), (512, 512), False),     # few tiles, 38 MB of weights
    ((3, 3), (1, 1), (1, 1, 1, 1), 1, (56, 56), (512, 512), True),    # 196 tiles reuse them
    ((3, 3), (1, 1), (1, 1, 1, 1), 1, (112, 112), (16, 16), False),   # too few channels
    ((3, 3), (2, 2), (1, 1, 1, 1), 1, (28, 28), (64, 64), False),     # stride 2
    ((3, 3), (1, 1), (0, 0, 0, 0), 1, (54, 54), (64, 64), False),     # unpadded
    ((3, 3), (1, 1), (1, 1, 1, 1), 2, (56, 56), (64, 64), False),     # grouped
    ((5, 5), (1, 1), (2, 2, 2, 2), 1, (56, 56), (64, 64), False),     # 5x5
])
def test_winograd_runs_where_it_pays(kernel, stride, pads, groups, out_hw, channels, expected):
    assert winograd.fits(kernel, stride, (1, 1), pads, groups, out_hw, channels) is expected


@pytest.mark.parametrize("cin, cout, hw, batch, residual", [
    (32, 32, 12, 1, True),     # whole tiles, the second conv's epilogue adds the residual
    (32, 48, 13, 2, False),    # a partial last tile in both directions, batch 2
    (64, 32, 7, 1, False),     # 7x7: two tiles a side, the second mostly padding
])
def test_winograd_conv_matches_ort(cin, cout, hw, batch, residual):
    model = _conv_model(cin, cout, hw, batch, residual=residual)
    x = np.random.default_rng(SEED + 1).standard_normal((batch, cin, hw, hw)).astype(np.float32)
    expected = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    target = resolve_target("llvm")
    runner = tvm_backend.Runner(tvm_backend.compile_model(model, target), "cpu", ["x"],
                                [o.name for o in model.graph.output])
    kernels = []
    runner.vm.set_instrument(lambda _f, symbol, before, *_: (kernels.append(symbol) if before else None) or 0)
    got = next(iter(runner({"x": x}).values()))
    np.testing.assert_allclose(got, expected, rtol=RTOL, atol=RTOL * float(np.abs(expected).max()))
    assert any(winograd.MATMUL_FUNC in k for k in kernels) and not any("conv2d_nchwc" in k for k in kernels)


def test_winograd_stages_are_scheduled_and_fuse_their_epilogue():
    host = tvm.target.Target({"kind": "llvm", "mcpu": tvm.target.codegen.llvm_get_system_cpu()})
    mod = _scheduled(_conv_model(32, 32, 16, residual=True), host)
    names = [g.name_hint for g, f in mod.functions_items() if isinstance(f, tvm.tirx.PrimFunc)]
    assert not any("conv2d_nchwc" in n for n in names), names
    for stage in (winograd.INPUT_FUNC, winograd.MATMUL_FUNC, winograd.OUTPUT_FUNC):
        funcs = [f for g, f in mod.functions_items() if stage in g.name_hint]
        assert funcs, (stage, names)   # convs of one shape share them
        for f in funcs:
            text = f.script()
            assert f.attrs["tirx.is_scheduled"] and "T.parallel" in text and "T.vectorized" in text
            if stage != winograd.MATMUL_FUNC:
                assert "T.unroll" in text   # the coefficient choices fold away once unrolled
    # bias, ReLU and the residual Add run in the output transform's loops; the next conv's input
    # transform does not
    outputs = sorted(g.name_hint for g, _ in mod.functions_items() if winograd.OUTPUT_FUNC in g.name_hint)
    assert len(outputs) == 2 and "relu" in outputs[1] and all("add" in n for n in outputs), outputs
    assert not any(winograd.INPUT_FUNC in n for n in outputs)


def _scheduled(model: onnx.ModelProto, target) -> tvm.IRModule:
    from tvm.relax.backend.cpu_generic import pipeline as cpu
    from tvm.relax.frontend.onnx import from_onnx

    passes = cs.cpu_layout_passes(target) + cpu.legalize_passes(target) + cs.cpu_schedule_passes(target)
    with target:
        return tvm.transform.Sequential(passes)(from_onnx(model, keep_params_in_input=False))


def test_direct_convs_when_winograd_is_off():
    host = tvm.target.Target({"kind": "llvm", "mcpu": tvm.target.codegen.llvm_get_system_cpu()})
    model = _conv_model(32, 32, 16)
    passes = cs.cpu_layout_passes(host, winograd=False)
    from tvm.relax.frontend.onnx import from_onnx

    with host:
        mod = tvm.transform.Sequential(passes + [relax.transform.LegalizeOps()])(
            from_onnx(model, keep_params_in_input=False))
    names = [g.name_hint for g, _ in mod.functions_items()]
    assert any("conv2d_nchwc" in n for n in names) and not any("winograd" in n for n in names)


def test_a_winograd_conv_is_priced_as_one_kernel_in_place():
    """Its input transform and matmul compute no ONNX tensor: not unmatched, their time goes to
    the conv's output with the output transform."""
    model = _conv_model(32, 32, 16, residual=True)
    a = analyze(model)
    doc = measure_in_context(a, resolve_target("llvm"))
    assert doc["unmatched"] == []
    stages = [k for k in doc["kernels"] if winograd.is_stage(k["symbol"])]
    assert len(stages) == 4 and all(k["tensor"] is None and k["ms"] > 0 for k in stages)
    from nasc.search.latency import ContextTimes

    ctx = ContextTimes(doc, a)
    priced = sum(ms for _, ms in ctx.kernels)
    assert priced == pytest.approx(sum(k["ms"] for k in doc["kernels"]))


def test_the_predictor_classes_winograd_convs_apart():
    a = analyze(_conv_model(64, 64, 56))
    b = analyze(_conv_model(64, 64, 56, stride=2))
    conv = lambda an: next(i for i, n in enumerate(an.nodes) if n.op_type == "Conv")  # noqa: E731
    assert kernel_class(a, conv(a)) == "winograd" and kernel_class(b, conv(b)) == "conv"


def test_device_memory_counts_winograd_weights_as_compiled():
    from nasc.partitioner import enumerate_cuts

    for stride, growth in ((1, winograd.WEIGHT_GROWTH), (2, 1)):
        a = analyze(_conv_model(64, 64, 56, stride=stride))
        assert a.device_weight_bytes["w"] == growth * a.initializer_bytes["w"]
        assert a.device_weight_bytes["b"] == a.initializer_bytes["b"]
        device_only = max(enumerate_cuts(a), key=lambda c: c.device_peak_memory_bytes)
        assert device_only.device_peak_memory_bytes >= sum(a.device_weight_bytes.values())
