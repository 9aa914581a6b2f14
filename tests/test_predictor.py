"""search.predictor and the kernel composition of halves: features, fitting, broken fusion, the suite."""

import numpy as np
import pytest
from onnx import numpy_helper

from conftest import prepared
from nasc import defaults
from nasc.backends.profile import (
    CALL_KEY, KernelProfile, calibration_suite, kernel_features, kernel_groups, part_signature, prepared_analysis,
)
from nasc.errors import NascError
from nasc.search.latency import DEVICE, SERVER, AnalyticLatencyModel, MeasuredLatencyModel, half_ms, predict
from nasc.search.predictor import (
    CLASSES, LAYOUT_CLASSES, NUMERIC, TERMS, KernelPredictor, _terms, fit_predictor, group_features,
)

ANALYTIC = AnalyticLatencyModel(defaults.DEFAULT_DEVICE, defaults.DEFAULT_SERVER)


def test_features_classify_the_kernels_of_real_models():
    _, a, _ = prepared("mobilenetv2")
    classes = {f["class"] for f in kernel_features(a).values()}
    assert {"conv", "conv1x1", "dwconv", "matmul", "reduce"} <= classes
    for g in kernel_groups(a):
        f = group_features(a, g.nodes)
        assert f["ops"] == len(g.nodes) and f["flops"] >= 0 and f["out_bytes"] > 0
        if f["class"] == "dwconv":
            assert f["in_channels_per_group"] == 1 and f["window"] == 9


def test_weight_bytes_are_the_float_data_a_kernel_reads_not_its_integer_parameters():
    """A Split's sizes or a Reshape's shape is an int64 initializer: no weight. ShuffleNetV2's
    Split read 16 such bytes, and the elementwise fit, whose only weights are a Clip's two float
    bounds, priced it 3.3 us; in place, with the concat and transpose it is fused with, it ran in 0.3."""
    _, a, _ = prepared("shufflenet")
    splits = [i for i, n in enumerate(a.nodes) if n.op_type == "Split" and a.node_inits[i]]
    assert splits and all(a.node_inits[i][0] in a.index_initializers for i in splits)
    assert all(group_features(a, (i,))["weight_bytes"] == 0.0 for i in splits)
    for g in kernel_groups(a):
        f = group_features(a, g.nodes)
        floats = sum(a.initializer_bytes[w] for i in g.nodes for w in a.node_inits[i] if w not in a.index_initializers)
        assert f["weight_bytes"] == floats
        if f["class"] in ("conv", "conv1x1", "dwconv"):
            assert f["weight_bytes"] > 0


def test_convs_that_miss_the_cpu_block_are_priced_apart():
    """DenseNet's growth of 12 channels keeps its convs' channels off the 8-channel block: priced
    without the target's runs (how it pads them), they are priced as plain layout."""
    _, a, _ = prepared("densenet")
    plain = {}
    for g in kernel_groups(a):
        n = a.nodes[g.anchor()]
        if n.op_type == "Conv":
            w = next(t.dims for t in a.model.graph.initializer if t.name == n.input[1])
            plain[w[0] % 8 != 0 or w[1] % 8 != 0] = plain.get(w[0] % 8 != 0 or w[1] % 8 != 0, set()) | {
                group_features(a, g.nodes)["plain_layout"]}
    assert plain == {True: {1.0}, False: {0.0}}


def _synthetic(n, rng, cls="conv"):
    feats = []
    for _ in range(n):
        f = {k: float(rng.integers(1, 1000)) for k in NUMERIC}
        f["class"] = cls
        f["padding"] = 1.0 + float(rng.random())      # channels the target pads to, per real MAC
        f["block_cost"] = 1.0 + float(rng.random())   # and its time per MAC in a narrow block
        f["tile_padding"] = 1.0 + float(rng.random())  # Winograd tiles computed per pixel kept
        f["tile_loads"] = float(rng.random())          # operands loaded per FMA
        feats.append(f)
    # a known roofline: compute as run (padded, in its block) + bytes written + a fixed cost
    ms = np.array([2e-4 * f["flops"] * f["padding"] * f["tile_padding"] * f["block_cost"] + 5e-5 * f["out_bytes"] + 0.01
                   for f in feats])
    return feats, ms


def test_fit_recovers_a_cost_law_and_round_trips_json():
    rng = np.random.default_rng(0)
    feats, ms = _synthetic(200, rng)
    p = fit_predictor(feats, ms)
    assert "conv" in p.per_class and p.samples == {"conv": 200}
    test_feats, test_ms = _synthetic(50, rng)
    err = np.abs(p.predict_ms(test_feats) / test_ms - 1)
    assert err.max() < 1e-6
    assert (p.per_class["conv"].rates >= 0).all()
    q = KernelPredictor.from_json(p.to_json())
    np.testing.assert_allclose(q.predict_ms(test_feats), p.predict_ms(test_feats))


def _memory_bound(n, rng, cls="pool"):
    feats = [{**{k: float(rng.integers(1, 1000)) for k in NUMERIC}, "class": cls} for _ in range(n)]
    return feats, np.array([3e-5 * f["in_bytes"] + 2e-5 * f["out_bytes"] + 0.002 for f in feats])


def test_rare_classes_fit_the_memory_terms_or_share_the_pooled_model():
    """A class with a few samples gets the memory side of a roofline of its own (a global pool is
    not priced at the rates convs set); with fewer still, it shares the pooled fit."""
    rng = np.random.default_rng(1)
    feats, ms = _synthetic(40, rng)
    few, few_ms = _memory_bound(5, rng)
    two, two_ms = _synthetic(2, rng, cls="reduce")
    assert len(few) < 8
    p = fit_predictor(feats + few + two, np.concatenate([ms, few_ms, two_ms]))
    assert "pool" in p.per_class and "reduce" not in p.per_class
    unseen, unseen_ms = _memory_bound(20, rng)
    np.testing.assert_allclose(p.predict_ms(unseen), unseen_ms, rtol=1e-6)
    assert np.abs(p.pooled(_terms(unseen)) / unseen_ms - 1).max() > 0.5   # the pooled fit would not hold
    np.testing.assert_allclose(p.predict_ms(two), p.pooled(_terms(two)))
    with pytest.raises(NascError, match="at least 2"):
        fit_predictor(feats[:1], ms[:1])


def test_predictor_from_another_feature_set_is_refused():
    rng = np.random.default_rng(2)
    doc = fit_predictor(*_synthetic(20, rng)).to_json()
    doc["terms"] = ["flops"]
    with pytest.raises(NascError, match="refit"):
        KernelPredictor.from_json(doc)


def test_a_cut_through_a_fused_kernel_prices_both_parts():
    """Conv+Relu split between head and tail runs as Conv on the device and Relu on the server."""
    _, a, cuts = prepared("resnet8")
    groups = kernel_groups(a)
    kernels = {g.signature: 1.0 for g in groups}
    kernels[CALL_KEY] = 0.0
    split = next((c, g) for c in cuts for g in groups
                 if len(g.nodes) > 1 and 0 < c.head_mask[list(g.nodes)].sum() < len(g.nodes))
    cut, g = split
    head_part = tuple(i for i in g.nodes if cut.head_mask[i])
    tail_part = tuple(i for i in g.nodes if not cut.head_mask[i])
    kernels[part_signature(a, head_part)] = 0.25
    kernels[part_signature(a, tail_part)] = 0.5
    prof = KernelProfile({}, kernels, {}, None)
    model = MeasuredLatencyModel(ANALYTIC, prof, prof)
    whole_head = sum(1 for h in groups if all(cut.head_mask[i] for i in h.nodes))
    whole_tail = sum(1 for h in groups if not any(cut.head_mask[i] for i in h.nodes))
    mask = cut.head_mask[None, :]
    broken_here = sum(1 for h in groups if 0 < cut.head_mask[list(h.nodes)].sum() < len(h.nodes))
    assert broken_here == 1
    assert half_ms(model, a, mask, DEVICE)[0] == pytest.approx(whole_head + 0.25)
    assert half_ms(model, a, ~mask, SERVER)[0] == pytest.approx(whole_tail + 0.5)
    # cuts that break nothing are priced as plain sums of whole kernels
    p = predict(a, cuts, model, defaults.DEFAULT_LINK)
    for c, pr in zip(cuts, p):
        if not any(0 < c.head_mask[list(h.nodes)].sum() < len(h.nodes) for h in groups):
            assert pr.device_ms == pytest.approx(sum(all(c.head_mask[i] for i in h.nodes) for h in groups))


def test_unmeasured_kernels_fall_back_to_predictor_then_analytic():
    _, a, cuts = prepared("resnet8")
    rng = np.random.default_rng(3)
    predictor = fit_predictor(*_synthetic(30, rng))
    with_pred = MeasuredLatencyModel(ANALYTIC, KernelProfile({}, {CALL_KEY: 0.01}, {}, predictor), None)
    ms = with_pred.node_ms(a, DEVICE)
    assert with_pred.coverage[DEVICE]["predicted"] == len(kernel_groups(a)) and ms.sum() > 0
    assert "device predicted" in with_pred.source and "server analytic" in with_pred.source
    bare = MeasuredLatencyModel(ANALYTIC, KernelProfile({}, {CALL_KEY: 0.01}, {}, None), None)
    groups = kernel_groups(a)
    base = ANALYTIC.node_ms(a, DEVICE)
    expect = np.zeros(len(a.nodes))
    for g in groups:
        expect[g.anchor()] = base[list(g.nodes)].sum()
    np.testing.assert_allclose(bare.node_ms(a, DEVICE), expect)


def test_calibration_suite_is_seeded_valid_and_covers_every_class():
    suite = calibration_suite(48, seed=0)
    again = calibration_suite(48, seed=0)
    assert [m.SerializeToString() for m in suite] == [m.SerializeToString() for m in again]
    classes = set()
    for m in suite:
        a = prepared_analysis(m)
        classes |= {f["class"] for f in kernel_features(a).values()}
    assert classes == set(CLASSES) - set(LAYOUT_CLASSES)  # layout samples are the transforms around kernels


def _shapes(m) -> tuple:
    return tuple(tuple(d.dim_value for d in vi.type.tensor_type.shape.dim) for vi in [*m.graph.input, *m.graph.output])


def test_calibration_suite_draws_each_kind_from_a_stream_of_its_own():
    """The k-th conv of a suite is the same whatever else the suite holds (a change to the pools'
    sampling or the mix leaves the convs as they were); classifiers stream a CNN head's weights."""
    small, full = calibration_suite(48, seed=0), calibration_suite(160, seed=0)
    for kind in ("suite conv", "suite pool", "suite classifier"):
        a = [_shapes(m) for m in small if m.doc_string == kind]
        b = [_shapes(m) for m in full if m.doc_string == kind]
        assert a and a == b[:len(a)], kind
    heads = [m for m in full if m.doc_string == "suite classifier"]
    assert heads and all(_shapes(m)[0][0] == 1 for m in heads)
    assert any(_shapes(m)[-1][-1] == 1000 for m in heads)


def test_nnls_matches_the_constrained_optimum():
    from nasc.search.predictor import nnls

    rng = np.random.default_rng(4)
    a = rng.standard_normal((40, 5))
    truth = np.array([1.0, 0.0, 2.0, 0.0, 0.5])
    x = nnls(a, a @ truth - 0.3 * a[:, 1])  # the best unconstrained weight on column 1 is negative
    assert (x >= 0).all() and x[1] == 0.0
    np.testing.assert_allclose(x[[0, 2, 4]], truth[[0, 2, 4]], atol=0.2)


@pytest.mark.parametrize("name,block", [("inception", 16), ("densenet", 8), ("mobilenetv2", 16), ("resnet8", 16)])
def test_padding_is_the_macs_a_conv_runs_per_real_mac(name, block):
    """`padding` of a conv kernel is the MACs the CPU runs in the graph it compiles (channels padded to
    the block, summed over the input channels up to the last with a nonzero weight: the padded ones
    are skipped) over its MACs in the ONNX graph; 1 for every kernel of a model that is not padded."""
    from nasc.backends.cpu_rules.lowering import summed_channels
    from nasc.backends.cpu_schedules import model_conv_block, padding_block
    from nasc.partitioner.analysis import analyze
    from nasc.passes.pad_channels import pad_channels

    _, a, _ = prepared(name)
    features = kernel_features(a, block)
    padded_to = padding_block(a.model, block)
    if padded_to is None:
        assert {f["padding"] for f in features.values()} == {1.0}
        return
    w = analyze(pad_channels(a.model, padded_to))
    weights = {t.name: numpy_helper.to_array(t) for t in w.model.graph.initializer}
    runs_in = model_conv_block(w, block)
    macs = {}
    for i, n in enumerate(w.nodes):
        if n.op_type == "Conv":
            weight = weights[n.input[1]]
            dense = all(attr.i == 1 for attr in n.attribute if attr.name == "group")
            summed = np.flatnonzero(np.abs(weight).sum(axis=(0, 2, 3)))[-1] + 1 if dense else weight.shape[1]
            if dense:  # a windowed conv sums whole blocks (lowering.summed_channels)
                summed = summed_channels(int(summed), weight.shape[1], runs_in, weight.shape[2] * weight.shape[3])
            macs[n.name] = w.macs[i] * summed / weight.shape[1]
    seen = skipped = 0
    for g in kernel_groups(a):
        anchor = a.nodes[g.nodes[0]]
        f = features[g.signature]
        if anchor.op_type == "Conv":
            assert f["padding"] == pytest.approx(macs[anchor.name] / a.macs[g.nodes[0]])
            seen += f["padding"] > 1
            skipped += macs[anchor.name] < w.macs[w.node_names.index(anchor.name)]
        else:
            assert f["padding"] == 1.0
    assert seen > 0 and skipped > 0
    # without a block (off a CPU) nothing is padded
    assert {f["padding"] for f in kernel_features(a).values()} == {1.0}


def test_block_cost_prices_a_conv_held_to_a_narrow_block():
    """ShuffleNet's branch convs hold its convs to block 8 (it is not padded): on 16 lanes each
    blocked conv is (16 / 8) ** NARROW_BLOCK_EXPONENT slower per MAC; on 8 lanes, full speed."""
    from nasc.backends.cpu_schedules import NARROW_BLOCK_EXPONENT, model_conv_block

    _, a, _ = prepared("shufflenet")
    assert model_conv_block(a, 16) == 8
    wide, narrow = kernel_features(a, 16), kernel_features(a, 8)
    slow = [sig for sig, f in wide.items() if f["block_cost"] > 1]
    assert slow and all(wide[s]["block_cost"] == pytest.approx(2 ** NARROW_BLOCK_EXPONENT) for s in slow)
    assert all(wide[s]["class"] in ("conv", "conv1x1", "winograd") for s in slow)
    assert {f["block_cost"] for f in narrow.values()} == {1.0}


def test_a_conv_epilogue_costs_no_pass_over_the_output_a_matmul_one_does():
    """The CPU conv schedules apply a fused epilogue to the register tile as they write it back:
    a conv with a ReLU fused in has the cost terms of the bare conv. Other classes keep the term."""
    from nasc.search.predictor import EPILOGUE_IN_REGISTERS

    base = {"flops": 1e7, "in_bytes": 4e5, "out_bytes": 8e5, "weight_bytes": 1e4, "out_channels": 64.0,
            "in_channels_per_group": 32.0, "out_pixels": 3136.0, "window": 1.0, "stride": 1.0, "ops": 1.0,
            "plain_layout": 0.0, "padding": 1.0, "block_cost": 1.0}
    epilogue = TERMS.index("epilogue_bytes")
    for cls in CLASSES:
        bare, fused = _terms([{**base, "class": cls}, {**base, "class": cls, "ops": 3.0}])
        if cls in EPILOGUE_IN_REGISTERS:
            np.testing.assert_array_equal(bare, fused)
        else:
            assert fused[epilogue] == 2 * base["out_bytes"] and bare[epilogue] == 0.0
    assert {"conv", "conv1x1", "dwconv", "winograd"} == set(EPILOGUE_IN_REGISTERS)


def test_a_strided_kernel_pays_for_its_compute_and_input_read_a_stride_apart():
    """Stride 2 adds terms of the kernel's compute and its input bytes (input read a stride
    apart); stride 1 has none of them. A fit on kernels whose strided ones ran slower per byte
    read recovers that and prices unseen ones of both strides."""
    base = {"class": "conv1x1", "flops": 1e7, "in_bytes": 4e5, "out_bytes": 1e5, "weight_bytes": 1e4,
            "out_channels": 64.0, "in_channels_per_group": 32.0, "out_pixels": 784.0, "window": 1.0, "ops": 1.0,
            "plain_layout": 0.0, "padding": 1.0, "block_cost": 1.5}
    s1, s2 = (dict(zip(TERMS, t)) for t in _terms([{**base, "stride": 1.0}, {**base, "stride": 2.0}]))
    assert s1["strided_flops"] == s1["strided_in_bytes"] == 0.0
    assert s2["strided_flops"] == pytest.approx(1.5e7) and s2["strided_in_bytes"] == 4e5
    assert {k: v for k, v in s1.items() if not k.startswith("strided")} == {k: v for k, v in s2.items()
                                                                           if not k.startswith("strided")}
    rng = np.random.default_rng(3)

    def kernels(n):
        feats = [{**base, "flops": float(rng.integers(1, 100)) * 1e6, "in_bytes": float(rng.integers(1, 100)) * 1e4,
                  "stride": float(rng.integers(1, 3))} for _ in range(n)]
        return feats, np.array([1e-8 * f["flops"] + 2e-8 * f["in_bytes"] * (1 + (f["stride"] > 1)) + 1e-3 for f in feats])

    p = fit_predictor(*kernels(60))
    feats, ms = kernels(20)
    assert {f["stride"] for f in feats} == {1.0, 2.0}
    np.testing.assert_allclose(p.predict_ms(feats), ms, rtol=1e-6)


AVX2 = dict(vector_bits=256, channel_block=8)


def _avx2_spec():
    from nasc.backends.cpu_rules.vector_spec import AVX2_TILE_ACCUMULATORS, AVX2_TILE_ROWS, CpuVectorSpec

    return CpuVectorSpec(**AVX2, conv_tile_rows=AVX2_TILE_ROWS, conv_tile_accumulators=AVX2_TILE_ACCUMULATORS)


def _one_conv(cin: int, cout: int, hw: int, k: int = 3):
    from nasc.examples.builder import Net

    n = Net("one_conv", 0)
    return prepared_analysis(n.build(n.conv(n.input("input", (1, cin, hw, hw)), cin, cout, k), "one conv"))


@pytest.mark.parametrize("cout,hw,padding,loads", [
    (64, 28, 1.0, (6 + 2) / (6 * 2)),     # 7x7 tiles (49: a predicated 6-row tile), two vectors of outputs
    (72, 28, 1.0, (6 + 1) / (6 * 1)),     # 72 channels fill one 16-lane panel column no more: one vector
    (64, 14, 256 / 196, (4 + 2) / (4 * 2)),  # 14x14 is computed as 16x16: 4x4 tiles, rows of 4
])
def test_a_winograd_conv_is_priced_by_whole_tiles_and_its_matmul_register_tile(cout, hw, padding, loads):
    """A Winograd conv computes whole 4x4 tiles and runs its matmuls in tiles of up to 6 rows by
    one or two vectors: in the suite, out channels filling one vector but not two ran at 0.6x the
    GFLOP/s. Without a vector spec (off a CPU) the tile is unknown and costs nothing extra."""
    a = _one_conv(64, cout, hw)
    (f,) = [f for f in kernel_features(a, 8, _avx2_spec()).values() if f["class"] == "winograd"]
    assert f["tile_padding"] == pytest.approx(padding) and f["tile_loads"] == pytest.approx(loads)
    (bare,) = [f for f in kernel_features(a, 8).values() if f["class"] == "winograd"]
    assert bare["tile_loads"] == 1.0 and bare["tile_padding"] == pytest.approx(padding)
    terms = dict(zip(TERMS, _terms([f])[0]))
    assert terms["flops"] == pytest.approx(f["flops"] * padding)
    assert terms["operand_loads"] == pytest.approx(f["flops"] * padding * loads)


def test_a_direct_conv_tile_loads_follow_the_conv_register_tile():
    """A 1x1 conv with 48 out channels (6 blocks of 8) on 32-wide rows gets the AVX2 6 x 2 tile;
    one with 152 (19 blocks, prime) gets a single row of 8 pixels: more loads per FMA."""
    spec = _avx2_spec()
    wide = [f for f in kernel_features(_one_conv(64, 48, 32, k=1), 8, spec).values() if f["class"] == "conv1x1"]
    tall = [f for f in kernel_features(_one_conv(64, 152, 32, k=1), 8, spec).values() if f["class"] == "conv1x1"]
    assert spec.conv_tile(6, 32) == (6, 2) and spec.conv_tile(19, 32) == (1, 8)
    assert wide[0]["tile_loads"] == pytest.approx(8 / 12) and tall[0]["tile_loads"] == pytest.approx(9 / 8)


def test_a_conv_padded_to_the_block_runs_blocked_not_plain():
    """DenseNet's convs read 36, 60, 84 channels: the CPU pipeline pads them to its 8-channel block,
    so none runs in plain layout (priced so, its 1x1 convs read 20-40% slow). Without the target's
    runs the graph's own channels decide."""
    _, a, _ = prepared("densenet")
    on_cpu, bare = kernel_features(a, 8), kernel_features(a)
    convs = [s for s, f in bare.items() if f["class"] in ("conv", "conv1x1")]
    assert any(bare[s]["plain_layout"] for s in convs)
    assert not any(on_cpu[s]["plain_layout"] for s in convs)
