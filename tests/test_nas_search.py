import numpy as np
import pytest

from nasc.errors import NascError
from nasc.search.nas import search as S
from nasc.search.nas.latency_table import Scores
from nasc.search.pareto import pareto_front
from nasc.types import Link


def _scores(A=300, K=6, seed=0):
    rng = np.random.default_rng(seed)
    lat = rng.uniform(1, 100, (A, K))
    mem = np.cumsum(rng.uniform(0, 1e5, (A, K)), axis=1)
    payload = np.concatenate([[3072.0], rng.uniform(100, 5000, K - 2), [0.0]])
    z = np.zeros((A, K))
    return Scores(lat, z, z, z, payload, mem, Link(10, 5)), rng.uniform(50, 95, A)


def test_max_accuracy_equals_brute_force():
    s, acc = _scores()
    for budget in (5.0, 20.0, 60.0):
        for mem in (np.inf, 2e5):
            ok = S.feasible_mask(s, budget, mem)
            p = S.max_accuracy(acc, s, ok)
            pairs = [(acc[a], -s.latency_ms[a, k], a, k) for a, k in zip(*np.nonzero(ok))]
            best = max(pairs)
            assert (p.arch_index, p.cut_index) == (best[2], best[3])
            assert p.latency_ms <= budget and p.device_memory_bytes <= mem


def test_min_latency_converse():
    s, acc = _scores()
    p = S.min_latency(acc, s, np.ones_like(s.latency_ms, dtype=bool), 90.0)
    good = acc >= 90.0
    assert p.accuracy >= 90.0
    assert p.latency_ms == pytest.approx(s.latency_ms[good].min())
    assert S.min_latency(acc, s, np.ones_like(s.latency_ms, dtype=bool), 99.0) is None


def test_baselines():
    s, acc = _scores()
    a = S.baseline_accuracy_best(acc, s)
    assert a.arch_index == int(np.argmax(acc)) and a.latency_ms == s.latency_ms[a.arch_index].min()
    b = S.baseline_no_split(acc, s, 30.0)
    assert b.cut_index in (0, s.latency_ms.shape[1] - 1) and b.latency_ms <= 30.0
    nan = np.full_like(acc, np.nan)
    with pytest.raises(NascError):
        S.baseline_accuracy_best(nan, s)


def _brute_front(p):
    keep = []
    for i, row in enumerate(p):
        dominated = np.any(np.all(p <= row, axis=1) & np.any(p < row, axis=1))
        duplicate = np.any(np.all(p[:i] == row, axis=1))
        if not dominated and not duplicate:
            keep.append(i)
    return keep


def test_chunked_pareto_front_matches_brute_force():
    rng = np.random.default_rng(3)
    for n, m in ((50, 2), (400, 3), (1500, 4)):
        p = rng.integers(0, 6, (n, m)).astype(float)  # many ties and duplicates
        assert pareto_front(p, chunk=128).tolist() == _brute_front(p)


def test_pareto_pairs_and_pick_rule():
    s, acc = _scores(A=120)
    f = S.pareto_pairs(acc, s)
    obj = np.stack([s.latency_ms, s.device_memory_bytes, np.broadcast_to(s.payload_bytes, s.latency_ms.shape),
                    np.broadcast_to(-acc[:, None], s.latency_ms.shape)], -1).reshape(-1, 4)
    ref = pareto_front(obj)
    K = s.latency_ms.shape[1]
    assert sorted(zip(f.arch_index.tolist(), f.cut_index.tolist())) == sorted((int(i // K), int(i % K)) for i in ref)
    limit = np.median(s.device_memory_bytes)
    p = S.pick_from_front(acc, s, f, limit)
    on_front = [(acc[a], a, k) for a, k in zip(f.arch_index, f.cut_index) if s.device_memory_bytes[a, k] <= limit]
    assert p.device_memory_bytes <= limit and p.accuracy == max(on_front)[0]
    with pytest.raises(NascError, match="device memory"):
        S.pick_from_front(acc, s, f, 1.0)


def test_evolve_stays_in_allowed_set():
    from nasc.search.nas.space import NB201Space

    space = NB201Space()
    allowed = np.zeros(space.num_archs, dtype=bool)
    allowed[::7] = True
    seen = []
    S.evolve(space, lambda a: seen.append(a) or float(a % 97), allowed, np.random.default_rng(0), population=8, cycles=40)
    assert len(seen) == 48 and all(allowed[a] for a in seen)
