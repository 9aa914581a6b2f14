import numpy as np
import pytest

from nasc.errors import NascError
from nasc.search.nas import defaults as D
from nasc.search.nas.space import (
    CELL_TERMS, NB201Space, SpaceConfig, get_space, nb201_cell_terms, nb201_live_edges, parse_nb201_arch,
)

# Anchors NB201's own generator asserts after its seeded shuffle (index -> arch string).
NB201_ANCHORS = {
    0: "|avg_pool_3x3~0|+|nor_conv_1x1~0|skip_connect~1|+|nor_conv_1x1~0|skip_connect~1|skip_connect~2|",
    9: "|avg_pool_3x3~0|+|none~0|none~1|+|skip_connect~0|none~1|nor_conv_3x3~2|",
    123: "|avg_pool_3x3~0|+|avg_pool_3x3~0|nor_conv_1x1~1|+|none~0|avg_pool_3x3~1|nor_conv_3x3~2|",
}


@pytest.fixture(scope="module")
def space():
    return NB201Space()


def test_index_order_matches_nb201_anchors(space):
    assert space.num_archs == 15625
    for i, s in NB201_ANCHORS.items():
        assert space.arch_str(i) == s
        assert space.arch_index(s) == i


def test_index_order_matches_every_row_of_the_shared_tables(space):
    import csv

    from nasc.search.nas.tabular import find_data_dir

    try:
        base = find_data_dir()
    except NascError:
        pytest.skip("NB201 tables not available")
    for name, (col, _) in D.NB201_TABLE_COLUMNS.items():
        with open(base / name, newline="") as f:
            rows = [r[col] for r in csv.DictReader(f)]
        assert rows == [space.arch_str(i) for i in range(space.num_archs)], name


def test_all_archs_distinct_and_roundtrip(space):
    assert len({tuple(r) for r in space.ops.tolist()}) == space.num_archs
    for i in np.random.default_rng(0).integers(space.num_archs, size=50):
        assert space.arch_index(space.arch_str(int(i))) == i


@pytest.mark.parametrize("bad", ["", "|conv~0|+|none~0|none~1|+|none~0|none~1|none~2|", "|none~0|+|none~0|", "|none~1|+|none~0|none~1|+|none~0|none~1|none~2|"])
def test_bad_arch_string_names_it(bad):
    with pytest.raises(NascError, match="not an NB201 arch string"):
        parse_nb201_arch(bad)


def test_bad_index_and_space_name(space):
    with pytest.raises(NascError, match="outside"):
        space.arch_str(15625)
    with pytest.raises(NascError, match="unknown search space"):
        get_space("resnet")


def test_mutate_changes_exactly_one_edge(space):
    rng = np.random.default_rng(1)
    for i in rng.integers(space.num_archs, size=100):
        j = space.mutate(int(i), rng)
        assert np.sum(space.ops[i] != space.ops[j]) == 1


def test_live_edges():
    ops = np.array(parse_nb201_arch("|nor_conv_3x3~0|+|skip_connect~0|none~1|+|none~0|avg_pool_3x3~1|none~2|"))
    # node 2 does not reach the output, so edge 0->2 is dead; 0->1 and 1->3 carry the output.
    assert nb201_live_edges(ops).tolist() == [True, False, False, False, True, False]
    zero = np.array(parse_nb201_arch("|nor_conv_3x3~0|+|none~0|none~1|+|none~0|none~1|none~2|"))
    assert not nb201_live_edges(zero).any()
    assert nb201_cell_terms(zero, nb201_live_edges(zero))["zero"] == 1


def test_cell_terms_merge_shared_relu(space):
    i = space.arch_index("|nor_conv_3x3~0|+|nor_conv_3x3~0|nor_conv_3x3~1|+|skip_connect~0|nor_conv_3x3~1|nor_conv_1x1~2|")
    t = dict(zip(CELL_TERMS, space.cell_terms[i].tolist()))
    assert t["nor_conv_3x3"] == 4 and t["nor_conv_1x1"] == 1
    # One ReLU per source node (0, 1 and 2), shared by its conv edges. Nodes 1 and 2 are read
    # only by their ReLU, which therefore fuses; node 0 is also read by the skip edge's Add.
    assert (t["relu"], t["relu_fused"]) == (1, 2)


def test_cell_nodes_merge_repeated_sums_and_count_peak(space):
    from nasc.search.nas.space import live_peak, nb201_cell_nodes

    i = space.arch_index("|avg_pool_3x3~0|+|avg_pool_3x3~0|skip_connect~1|+|avg_pool_3x3~0|skip_connect~1|skip_connect~2|")
    nodes = nb201_cell_nodes(space.ops[i], space.live[i])
    # p = pool(x); node 2 = p + p; node 3 = (p + p) + node 2: the first sum is one shared Add
    assert [k for k, _, _ in nodes] == ["avg_pool_3x3", "add", "add"]
    assert nodes[2][1] == (nodes[1][2], nodes[1][2])
    assert dict(zip(CELL_TERMS, space.cell_terms[i].tolist()))["add"] == 2
    # x lives until the pool reads it, then p until the first Add, then the sums
    assert live_peak(nodes, lambda _t: 1) == 2 and space.cell_peak_units[i] == 2


def test_structure_shapes(space):
    cfg = SpaceConfig(channels=4, cells_per_stage=2, resolution=16)
    st = space.structure(cfg)
    assert st.num_blocks == 3 * 2 + 4
    assert st.term_counts.shape == (space.num_archs, st.num_blocks, len(st.terms))
    assert st.cut_names[0] == "server-only" and st.cut_names[-1] == "device-only"
    assert len(st.cut_names) == st.num_blocks + 1
    assert st.out_bytes[0] == 4 * 16 * 16 * 4 and st.out_bytes[-1] == 10 * 4
    with pytest.raises(NascError, match="multiple of 4"):
        space.structure(SpaceConfig(resolution=18))


# --------------------------------------------------------------------------- mbv2

MBV2_CFG = SpaceConfig(channels=4, cells_per_stage=2, resolution=16)


@pytest.fixture(scope="module")
def mbv2():
    return get_space("mbv2", MBV2_CFG)


def test_mbv2_indexing_roundtrip_and_skip_rule(mbv2):
    # 6 blocks: the first of stages 2 and 3 change shape (4 choices), the others may be skipped (5).
    assert mbv2.radices == (5, 5, 4, 5, 4, 5) and mbv2.num_archs == 10_000
    assert mbv2.arch_str(0) == "-".join(["k3e3"] * 6)
    assert mbv2.arch_str(mbv2.num_archs - 1) == "skip-skip-k5e6-skip-k5e6-skip"
    for i in np.random.default_rng(0).integers(mbv2.num_archs, size=200):
        assert mbv2.arch_index(mbv2.arch_str(int(i))) == i
    assert len({mbv2.arch_str(i) for i in range(mbv2.num_archs)}) == mbv2.num_archs
    for bad in ("k3e3-k3e3", "k3e3-k3e3-skip-k3e3-k3e3-k3e3", "k7e3-k3e3-k3e3-k3e3-k3e3-k3e3"):
        with pytest.raises(NascError, match="not an mbv2 arch string"):
            mbv2.arch_index(bad)
    with pytest.raises(NascError, match="outside the mbv2 space"):
        mbv2.arch_str(10_000)


def test_mbv2_mutation_changes_exactly_one_block(mbv2):
    rng = np.random.default_rng(2)
    for i in rng.integers(mbv2.num_archs, size=200):
        j = mbv2.mutate(int(i), rng)
        a, b = mbv2.arch_str(int(i)).split("-"), mbv2.arch_str(j).split("-")
        assert sum(x != y for x, y in zip(a, b)) == 1


def test_mbv2_structure_and_size_guard(mbv2):
    st = mbv2.structure(MBV2_CFG)
    assert st.block_names == ("stem", "mb0.0", "mb0.1", "mb1.0", "mb1.1", "mb2.0", "mb2.1", "head")
    assert st.term_counts.shape == (10_000, 8, len(st.terms)) and len(st.terms) == 2 + 6 * 4
    skipped = mbv2.choices[:, 0] == 4
    assert st.term_counts[skipped, 1].sum() == 0 and np.all(st.term_counts[~skipped, 1].sum(1) == 1)
    assert st.out_bytes.tolist() == [4 * 256 * 4] * 3 + [8 * 64 * 4] * 2 + [16 * 16 * 4] * 2 + [10 * 4]
    with pytest.raises(NascError, match="at most"):
        get_space("mbv2", SpaceConfig(cells_per_stage=3))
    with pytest.raises(NascError, match="blocks per stage"):
        mbv2.structure(SpaceConfig(channels=4, cells_per_stage=1, resolution=16))
