import copy

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from nasc.partitioner import analyze, cut_from_tensors, enumerate_cuts, load_model  # noqa: E402
from nasc.search.nas import defaults as D  # noqa: E402
from nasc.search.nas.export import export_subnet, split_metadata  # noqa: E402
from nasc.search.nas.latency_table import build_latency_table, nasc_node_cost  # noqa: E402
from nasc.search.nas.space import NB201Space, SpaceConfig  # noqa: E402
from nasc.types import Link  # noqa: E402

CFG = SpaceConfig(channels=4, cells_per_stage=2, resolution=16)


@pytest.fixture(scope="module")
def setup():
    return _space_table_and_supernet(NB201Space(), CFG)


def _space_table_and_supernet(space, cfg: SpaceConfig):
    torch.manual_seed(0)
    return space, build_latency_table(space, cfg), space.build_supernet(cfg).eval()


def test_table_equals_nasc_model_on_whole_exported_subnets(setup):
    """The probed-term sums reproduce nasc's latency model on the real exported graph exactly."""
    space, table, net = setup
    cost, _ = nasc_node_cost()
    # 53: repeated sums the exporter merges into one Add
    archs = [0, 6111, 9930, 3000, 53] + np.random.default_rng(0).integers(space.num_archs, size=8).tolist()
    for a in archs:
        model, _ = export_subnet(net.subnet(a), CFG.input_shape)
        for side, blocks in (("device", table.block_device_ms), ("server", table.block_server_ms)):
            assert blocks[a].sum() == pytest.approx(cost(model, side).sum(), rel=1e-9), (a, side)


def test_head_latency_and_payload_at_each_cut_match_nasc_cuts(setup):
    """Per cut: device time of the head and the payload equal nasc's own cut of the exported model."""
    from nasc.search.latency import AnalyticLatencyModel
    from nasc.defaults import DEFAULT_DEVICE, DEFAULT_SERVER

    space, table, net = setup
    scores = table.score(Link(10, 5))
    lm = AnalyticLatencyModel(DEFAULT_DEVICE, DEFAULT_SERVER)
    a = space.arch_index("|nor_conv_3x3~0|+|nor_conv_3x3~0|avg_pool_3x3~1|+|skip_connect~0|nor_conv_3x3~1|skip_connect~2|")
    model, tensors = export_subnet(net.subnet(a), CFG.input_shape)
    an = analyze(load_model(model))
    cuts = enumerate_cuts(an)
    dev = lm.node_ms(an, "device")
    for k in range(1, table.num_cuts - 1):
        cut = cut_from_tensors(an, cuts, [split_metadata(k, table.structure.num_blocks, tensors)])
        assert cut.payload_bytes == scores.payload_bytes[k]
        assert float(dev[cut.head_mask].sum()) == pytest.approx(scores.device_ms[a, k], rel=1e-9)


def test_score_shapes_and_end_cuts(setup):
    space, table, _ = setup
    link = Link(bandwidth_mbit=8.0, rtt_ms=3.0)
    s = table.score(link)
    K = table.num_cuts
    assert s.latency_ms.shape == (space.num_archs, K)
    np.testing.assert_allclose(s.latency_ms, s.device_ms + s.transfer_ms + s.server_ms)
    # server-only sends the float input; device-only sends nothing and runs everything locally.
    assert s.payload_bytes[0] == np.prod(CFG.input_shape) * 4 and s.transfer_ms[0, -1] == 0.0
    np.testing.assert_allclose(s.device_ms[:, -1], table.block_device_ms.sum(1))
    np.testing.assert_allclose(s.server_ms[:, 0], table.block_server_ms.sum(1))
    assert s.transfer_ms[0, 1] == pytest.approx(link.transfer_ms(s.payload_bytes[1]))
    q = table.score(link, int8=True)
    assert q.payload_bytes[1] == np.ceil(s.payload_bytes[1] / 4) + D.INT8_QPARAM_BYTES
    assert q.payload_bytes[0] == s.payload_bytes[0]
    assert np.all(np.diff(s.device_memory_bytes, axis=1) >= 0)  # a longer head never needs less memory


def test_custom_cost_function_is_used():
    space = NB201Space()
    ones = lambda model, side: np.ones(len(model.graph.node))  # noqa: E731  one "ms" per node
    t = build_latency_table(space, CFG, cost=ones, source="node count")
    assert t.source == "node count"
    assert np.all(t.block_device_ms[:, 0] == 1)  # the stem exports one Conv (BN folded)
    assert t.block_device_ms.max() > 1


# --------------------------------------------------------------------------- device memory, mbv2

MBV2_CFG = SpaceConfig(channels=4, cells_per_stage=2, resolution=16)
# Edge cases of the exported graph: repeated sums merged by the exporter (53), a zero cell, an
# identity cell, pools only; for mbv2 every block skipped that may be, and the widest arch.
MEMORY_ARCHS = {
    "nb201": [6111, 53, "|nor_conv_1x1~0|+|none~0|none~1|+|none~0|none~1|none~2|",
              "|none~0|+|none~0|none~1|+|skip_connect~0|none~1|none~2|", 9952],
    "mbv2": ["skip-skip-k5e6-skip-k5e6-skip", "k5e6-k5e6-k5e6-k5e6-k5e6-k5e6", 2697],
    "nb201-wide": ["|nor_conv_3x3~0|+|nor_conv_3x3~0|nor_conv_3x3~1|+|skip_connect~0|nor_conv_3x3~1|nor_conv_3x3~2|",
                   "|nor_conv_1x1~0|+|none~0|nor_conv_3x3~1|+|avg_pool_3x3~0|none~1|nor_conv_3x3~2|"],
}
# Wide enough that the last stage's 3x3 convs (32 channels) run as Winograd convs on the device,
# whose compiled weights are larger than the ONNX ones.
WIDE_CFG = SpaceConfig(channels=8, cells_per_stage=1, resolution=16)


@pytest.fixture(scope="module")
def mbv2_setup():
    from nasc.search.nas.space import get_space

    return _space_table_and_supernet(get_space("mbv2", MBV2_CFG), MBV2_CFG)


def test_mbv2_table_equals_nasc_model_on_whole_exported_subnets(mbv2_setup):
    space, table, net = mbv2_setup
    assert table.block_device_ms.shape == (space.num_archs, 8) and table.num_cuts == 9
    cost, _ = nasc_node_cost()
    for a in [0, space.num_archs - 1] + np.random.default_rng(1).integers(space.num_archs, size=4).tolist():
        model, _ = export_subnet(net.subnet(a), MBV2_CFG.input_shape)
        for side, blocks in (("device", table.block_device_ms), ("server", table.block_server_ms)):
            assert blocks[a].sum() == pytest.approx(cost(model, side).sum(), rel=1e-9), (a, side)
    # a skipped block costs nothing and sends what the block before it sends
    a = space.arch_index("skip-skip-k5e6-skip-k5e6-skip")
    assert table.block_device_ms[a, 1] == 0 and table.block_param_bytes[a, 2] == 0


@pytest.fixture(scope="module")
def wide_setup():
    return _space_table_and_supernet(NB201Space(), WIDE_CFG)


@pytest.mark.parametrize("name", ["nb201", "mbv2", "nb201-wide"])
def test_device_memory_is_what_the_partitioner_computes(name, request):
    """For every cut of exported subnets, the table's device memory equals the partitioner's
    `Cut.device_peak_memory_bytes` (nasc.compile.plan with the annotated split) exactly."""
    from nasc.compile import plan
    from nasc.search.nas.export import set_metadata
    from nasc.search.nas.supernet import distinct_weights

    fixture, cfg = {"nb201": ("setup", CFG), "mbv2": ("mbv2_setup", MBV2_CFG), "nb201-wide": ("wide_setup", WIDE_CFG)}[name]
    space, table, net = request.getfixturevalue(fixture)
    scores = table.score(Link(10, 5))
    nb = table.structure.num_blocks
    # trained networks hold no equal tensors; fresh BNs do, and the exporter would merge them
    net = distinct_weights(copy.deepcopy(net))
    for arch in MEMORY_ARCHS[name]:
        a = space.arch_index(arch) if isinstance(arch, str) else arch
        model, tensors = export_subnet(net.subnet(a), cfg.input_shape)
        set_metadata(model, D.SPLIT_METADATA_KEY, split_metadata(nb // 2, nb, tensors))
        p = plan(model, split="annotated")
        if name == "nb201-wide":
            grown = [w for w, b in p.analysis.device_weight_bytes.items() if b > p.analysis.initializer_bytes[w]]
            assert grown, f"{arch}: no Winograd conv, the case tests nothing new"
        assert p.cut.device_peak_memory_bytes == scores.device_memory_bytes[a, nb // 2], (arch, nb // 2)
        for k in range(nb + 1):
            if k in (0, nb):
                cut = p.cuts[0] if k == 0 else p.cuts[-1]
            else:
                cut = cut_from_tensors(p.analysis, p.cuts, [split_metadata(k, nb, tensors)])
            assert cut.device_peak_memory_bytes == scores.device_memory_bytes[a, k], (arch, k)
