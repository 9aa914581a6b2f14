"""search: analytic latency model, transfer, cut choice under memory, Pareto fronts."""

import numpy as np
import pytest

from conftest import prepared
from nasc import defaults
from nasc.errors import CutError
from nasc.partitioner import DEVICE_ONLY, SERVER_ONLY
from nasc.search.choose import choose_fastest, pareto_cuts
from nasc.search.latency import DEVICE, SERVER, AnalyticLatencyModel, predict
from nasc.search.pareto import pareto_front
from nasc.types import Link


def test_transfer_ms():
    link = Link(bandwidth_mbit=8.0, rtt_ms=10.0)
    assert link.transfer_ms(1_000_000) == pytest.approx(1000.0 + 10.0)
    assert link.transfer_ms(0) == pytest.approx(10.0)


def test_predictions_sum_per_node_times():
    _, a, cuts = prepared("resnet8")
    lm = AnalyticLatencyModel(defaults.DEFAULT_DEVICE, defaults.DEFAULT_SERVER)
    preds = predict(a, cuts, lm, defaults.DEFAULT_LINK)
    dev, srv = lm.node_ms(a, DEVICE), lm.node_ms(a, SERVER)
    assert (dev >= 0).all() and (srv >= 0).all()
    assert dev.sum() > srv.sum(), "the server GPU profile is faster than the device CPU profile"
    for c, p in zip(cuts, preds):
        assert p.device_ms == pytest.approx(dev[c.head_mask].sum())
        assert p.server_ms == pytest.approx(srv[~c.head_mask].sum())
        if c.kind == DEVICE_ONLY:
            assert p.transfer_ms == 0
        else:
            assert p.transfer_ms == pytest.approx(defaults.DEFAULT_LINK.transfer_ms(c.payload_bytes))


def test_choice_moves_to_the_server_as_bandwidth_grows():
    _, a, cuts = prepared("resnet8")
    lm = AnalyticLatencyModel(defaults.DEFAULT_DEVICE, defaults.DEFAULT_SERVER)
    slow = cuts[choose_fastest(cuts, predict(a, cuts, lm, Link(0.1, 50.0)))]
    fast = cuts[choose_fastest(cuts, predict(a, cuts, lm, Link(100_000.0, 0.01)))]
    assert slow.head_macs >= fast.head_macs
    assert fast.kind == SERVER_ONLY


def test_memory_limit_is_respected():
    _, a, cuts = prepared("resnet8")
    lm = AnalyticLatencyModel(defaults.DEFAULT_DEVICE, defaults.DEFAULT_SERVER)
    preds = predict(a, cuts, lm, Link(1.0, 50.0))
    free = cuts[choose_fastest(cuts, preds)]
    limit = free.device_peak_memory_bytes - 1
    bounded = cuts[choose_fastest(cuts, preds, limit)]
    assert bounded.device_peak_memory_bytes <= limit
    with pytest.raises(CutError, match="no cut fits"):
        choose_fastest(cuts, preds, 1)


def test_pareto_front_matches_brute_force():
    rng = np.random.default_rng(0)
    pts = rng.integers(0, 6, size=(60, 2)).astype(float)
    front = set(pareto_front(pts).tolist())
    for i, p in enumerate(pts):
        dominated = any((q <= p).all() and (q < p).any() for q in pts)
        first_copy = not any((pts[j] == p).all() for j in range(i))
        assert (i in front) == (not dominated and first_copy)


def test_pareto_cuts_contains_the_fastest_and_the_smallest():
    _, a, cuts = prepared("densenet")
    lm = AnalyticLatencyModel(defaults.DEFAULT_DEVICE, defaults.DEFAULT_SERVER)
    preds = predict(a, cuts, lm, defaults.DEFAULT_LINK)
    front = pareto_cuts(cuts, preds)
    fastest = min(range(len(cuts)), key=lambda i: preds[i].total_ms)
    smallest = min(range(len(cuts)), key=lambda i: cuts[i].device_peak_memory_bytes)
    assert preds[front[0]].total_ms <= preds[fastest].total_ms + 1e-9 or fastest in front
    assert any(cuts[i].device_peak_memory_bytes == cuts[smallest].device_peak_memory_bytes for i in front)


def test_link_profile_file_adds_framing_cost_and_errors_name_the_file(tmp_path):
    from nasc.cli.common import parse_link
    from nasc.errors import NascError
    from nasc.types import Link

    f = tmp_path / "lab.json"
    f.write_text('{"bandwidth_mbit": 8, "rtt_ms": 5, "serialize_gbs": 1.0}')
    link = parse_link(str(f))
    assert link.name == "lab" and link.serialize_gbs == 1.0
    # 1 MB: 8e6 bits at 8 Mbit/s = 1000 ms on the wire, + 5 ms RTT, + 1 ms framing at 1 GB/s
    assert float(link.transfer_ms(1e6)) == pytest.approx(1006.0)
    assert float(Link(8, 5).transfer_ms(1e6)) == pytest.approx(1005.0)
    bad = tmp_path / "bad.json"
    bad.write_text('{"rtt_ms": 5}')
    with pytest.raises(NascError, match="bad.json"):
        parse_link(str(bad))
    with pytest.raises(NascError, match="missing.json"):
        parse_link(str(tmp_path / "missing.json"))
