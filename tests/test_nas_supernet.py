import numpy as np
import pytest

torch = pytest.importorskip("torch")

from nasc.search.nas import train as TR  # noqa: E402
from nasc.search.nas.data import load_data  # noqa: E402
from nasc.search.nas.space import NB201Space, SpaceConfig  # noqa: E402

CFG = SpaceConfig(channels=4, cells_per_stage=1, resolution=8)


@pytest.fixture(scope="module")
def trained():
    data = load_data("digits", resolution=8)
    space = NB201Space()
    res = TR.train_supernet(space, CFG, data, epochs=3, seed=0)
    return space, data, res


def test_training_runs_and_learns(trained):
    space, data, res = trained
    assert res.epochs == 3 and len(res.losses) == 3 and res.seconds > 0
    assert res.losses[2] < res.losses[0] < np.log(10) + 0.5
    est = TR.SupernetEstimator(res.supernet, data)
    best = space.arch_index("|nor_conv_3x3~0|+|nor_conv_3x3~0|nor_conv_3x3~1|+|nor_conv_3x3~0|nor_conv_3x3~1|nor_conv_3x3~2|")
    assert est(best) > 30.0  # well above chance (10%) after three epochs
    assert est.cache[best] == est(best)


def test_subnet_inherits_supernet_weights(trained):
    space, data, res = trained
    x = torch.from_numpy(data.val_x[:16])
    for a in (0, 6111, 9):
        with torch.no_grad():
            want = res.supernet.eval()(x, a)
            got = res.supernet.subnet(a).eval()(x)
        torch.testing.assert_close(got, want)


def test_bn_recalibration_changes_only_the_copy(trained):
    space, data, res = trained
    before = {k: v.clone() for k, v in res.supernet.state_dict().items()}
    net = TR.subnet_for(res.supernet, 6111, data, bn_recal_batches=2)
    bn = [m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)][0]
    assert int(bn.num_batches_tracked) == 2
    for k, v in res.supernet.state_dict().items():
        torch.testing.assert_close(v, before[k])


def test_standalone_training_is_deterministic():
    data = load_data("digits", resolution=8)
    space = NB201Space()
    a = TR.train_standalone(space, CFG, 100, data, epochs=1, seed=3)
    b = TR.train_standalone(space, CFG, 100, data, epochs=1, seed=3)
    assert a == b and 0.0 <= a <= 100.0


def test_mbv2_supernet_paths_and_subnets():
    """Random paths run, a subnet is that path with the same weights, and candidates are separate."""
    from nasc.search.nas.space import get_space

    cfg = SpaceConfig(channels=4, cells_per_stage=2, resolution=8)
    space = get_space("mbv2", cfg)
    torch.manual_seed(0)
    net = space.build_supernet(cfg).eval()
    x = torch.randn(3, 3, 8, 8)
    rng = np.random.default_rng(0)
    outs = []
    for a in [0, space.num_archs - 1] + rng.integers(space.num_archs, size=6).tolist():
        with torch.no_grad():
            want = net(x, a)
            got = net.subnet(a).eval()(x)
        assert want.shape == (3, 10)
        torch.testing.assert_close(got, want)
        outs.append(want)
    assert not torch.allclose(outs[0], outs[1])
    # one module per (kernel, expansion) in every block, none shared
    assert all(len(c) == 4 for c in net.blocks)
    w = [c["k3e3"].expand[0].weight for c in net.blocks[:1]] + [net.blocks[0]["k3e6"].expand[0].weight]
    assert w[0].data_ptr() != w[1].data_ptr()
    sub = net.subnet(space.arch_index("skip-k5e6-k3e3-skip-k5e3-k3e6"))
    assert isinstance(sub.blocks[1], torch.nn.Identity) and sub.blocks[2].depthwise[0].kernel_size == (5, 5)
