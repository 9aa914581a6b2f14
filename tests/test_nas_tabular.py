import numpy as np
import pytest

from nasc.errors import NascError
from nasc.search.nas.space import NB201Space
from nasc.search.nas.tabular import find_data_dir, kendall_tau, load_table


def test_kendall_tau_matches_scipy_with_ties():
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(0)
    x, y = rng.integers(0, 8, 60), rng.integers(0, 8, 60) + rng.integers(0, 3, 60)
    assert kendall_tau(x, y) == pytest.approx(stats.kendalltau(x, y).statistic)
    assert kendall_tau([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)


def test_load_table_default_and_column():
    try:
        find_data_dir()
    except NascError:
        pytest.skip("NB201 tables not available")
    space = NB201Space()
    t = load_table(None, space)
    assert t.accuracy.shape == (15625,)
    assert int(np.argmax(t.accuracy)) == 6111  # NB201's best cifar10-valid arch
    t2 = load_table(str(find_data_dir() / "nb201_tss_test_acc_200ep.csv"), space)
    assert t2.accuracy.max() == pytest.approx(94.3733, abs=1e-3)


def test_load_table_rejects_foreign_file(tmp_path):
    f = tmp_path / "t.csv"
    f.write_text("arch_str,acc\n|none~0|+|none~0|none~1|+|none~0|none~1|none~2|,1.0\n")
    with pytest.raises(NascError, match="rows"):
        load_table(f"{f}:acc", NB201Space())
    with pytest.raises(NascError, match="not found"):
        load_table(str(tmp_path / "missing"), NB201Space())
