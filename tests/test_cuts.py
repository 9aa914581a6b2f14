"""partitioner.cuts: every enumerated cut is an ideal with the right crossing set, and for
every cut of every example model head-then-tail equals the original (ORT, 1e-4)."""

import itertools

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import SMALL, prepared, random_dag, random_feeds, run_pair
from nasc.backends import ort
from nasc.errors import CutError
from nasc.partitioner import DEVICE_ONLY, SERVER_ONLY, SPLIT, analyze, cut_from_tensors, enumerate_cuts, load_model
from nasc.partitioner.load import node_inputs
from nasc.passes import split_model


def brute_force_ideals(a):
    """All predecessor-closed node subsets of a small DAG, as bool masks."""
    N = len(a.nodes)
    preds = [{a.producer[x] for x in node_inputs(n) if x in a.producer} for n in a.nodes]
    out = []
    for bits in itertools.product([False, True], repeat=N):
        if all(not bits[i] or all(bits[p] for p in preds[i]) for i in range(N)):
            out.append(np.array(bits))
    return out


def crossing(a, H):
    """Reference crossing set: head-side (or input) tensors read by a tail node."""
    names = []
    for t in list(a.inputs) + [o for n in a.nodes for o in n.output]:
        made_in_head = t in a.inputs or H[a.producer[t]]
        if made_in_head and any(not H[c] for c in a.consumers.get(t, [])):
            names.append(t)
    return set(names)


def peak_memory(a, H):
    """Reference device peak: simulate the head in execution order, freeing after last use."""
    head = [i for i in range(len(a.nodes)) if H[i]]
    sent = crossing(a, H)
    keep = sent | {o for o in a.outputs if o in a.producer and H[a.producer[o]]}
    live = {t: a.specs[t].nbytes for t in a.inputs}
    peak = sum(live.values())
    for pos, i in enumerate(head):
        for o in a.nodes[i].output:
            live[o] = a.specs[o].nbytes
        peak = max(peak, sum(live.values()))
        later = head[pos + 1:]
        for t in list(live):
            if t not in keep and not any(c in later for c in a.consumers.get(t, []) if H[c]):
                del live[t]
    weights = set()
    for i in head:
        weights.update(a.node_inits[i])
    return peak + sum(a.device_weight_bytes[w] for w in weights)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 10_000), n=st.integers(2, 9))
def test_random_dag_cuts_are_valid_ideals(seed, n):
    a = analyze(load_model(random_dag(seed, n)))
    cuts = enumerate_cuts(a)
    ideals = brute_force_ideals(a)
    ideal_set = {tuple(m) for m in ideals}
    sent_sets = [frozenset(c.tensors) for c in cuts if c.kind == SPLIT]
    assert len(sent_sets) == len(set(sent_sets)), "cuts sending the same tensors must be deduplicated"
    for c in cuts:
        assert tuple(c.head_mask) in ideal_set, "head must be closed under predecessors"
        if c.kind == SPLIT:
            assert set(c.tensors) == crossing(a, c.head_mask)
            assert c.payload_bytes == sum(a.specs[t].nbytes for t in c.tensors)
        if c.kind != SERVER_ONLY:
            assert c.device_peak_memory_bytes == peak_memory(a, c.head_mask)
    # every prefix of the execution order is covered (by itself or a cut sending the same tensors)
    for k in range(1, len(a.nodes)):
        H = np.arange(len(a.nodes)) < k
        want = crossing(a, H)
        assert any(set(c.tensors) == want for c in cuts if c.kind == SPLIT) or not want


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), n=st.integers(2, 12))
def test_random_dag_every_cut_reproduces_outputs(seed, n):
    m = load_model(random_dag(seed, n))
    a = analyze(m)
    feeds = random_feeds(m, seed)
    ref = ort.run(m, feeds)
    for c in enumerate_cuts(a):
        head, tail = split_model(a, c)
        got = run_pair(head, tail, feeds)
        for k, v in ref.items():
            np.testing.assert_allclose(got[k], v, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", list(SMALL))
def test_every_cut_of_every_example_equals_original(name):
    original, a, cuts = prepared(name)
    feeds = random_feeds(original, 1)
    ref = ort.run(original, feeds)
    assert cuts[0].kind == SERVER_ONLY and cuts[-1].kind == DEVICE_ONLY
    assert [c.index for c in cuts] == list(range(len(cuts)))
    for c in cuts:
        head, tail = split_model(a, c)
        got = run_pair(head, tail, feeds)
        for k, v in ref.items():
            err = float(np.abs(got[k] - v).max())
            assert err <= 1e-4 * max(1.0, float(np.abs(v).max())), f"{name} cut {c.index} ({c.label}): err {err}"


@pytest.mark.parametrize("name,most", [("inception", 4), ("densenet", 2), ("shufflenet", 2), ("vit", 2), ("resnet8", 2)])
def test_multi_tensor_cuts_exist(name, most):
    _, _, cuts = prepared(name)
    assert max(len(c.tensors) for c in cuts) >= most


def test_costs_partition_between_halves():
    _, a, cuts = prepared("resnet8")
    for c in cuts:
        assert c.head_macs + c.tail_macs == int(a.macs.sum())
        assert c.head_param_bytes + c.tail_param_bytes >= a.total_param_bytes
    assert cuts[0].head_macs == 0 and cuts[-1].tail_macs == 0
    assert cuts[-1].payload_bytes == 0


def test_cut_from_tensors():
    _, a, cuts = prepared("tiny")
    c = next(c for c in cuts if c.kind == SPLIT and len(c.tensors) == 2)
    assert cut_from_tensors(a, cuts, list(reversed(c.tensors))) == c
    with pytest.raises(CutError, match="not an activation tensor"):
        cut_from_tensors(a, cuts, ["no_such_tensor"])
    # one branch of a residual block alone is not a cut: the tail still needs the other
    two = next(c for c in cuts if len(c.tensors) == 2)
    with pytest.raises(CutError, match="not a cut"):
        cut_from_tensors(a, cuts, [two.tensors[1]])


def test_enumeration_is_polynomial_on_a_large_graph():
    """A 2000-node random DAG enumerates in seconds (O(N (N+E)) families, scored as matrices)."""
    a = analyze(load_model(random_dag(7, 2000)))
    cuts = enumerate_cuts(a)
    assert len(cuts) <= 3 * len(a.nodes) + 1
