"""backends.context and the halves priced from it: kernels timed in place, attributed to ONNX tensors."""

import numpy as np
import pytest

from conftest import prepared
from nasc import defaults
from nasc.backends.cpu_rules import winograd
from nasc.backends.context import (MAX_SCALE, _call_owners, _direct_pair_s, _direct_s, _kernel_calls, call_nodes,
                                   crossing_tensors, half_calls, half_key, measure_in_context, model_key)
from nasc.backends.profile import KernelProfile, kernel_groups, prepared_analysis
from nasc.backends.targets import resolve_target
from nasc.partitioner.cuts import half_masks
from nasc.search.latency import (DEVICE, MEASURED_IN_CONTEXT, AnalyticLatencyModel, ContextTimes,
                                 MeasuredLatencyModel, half_ms)

ANALYTIC = AnalyticLatencyModel(defaults.DEFAULT_DEVICE, defaults.DEFAULT_SERVER)


@pytest.mark.parametrize("name", ["resnet8", "mobilenetv2", "densenet"])
def test_every_kernel_call_is_attributed(name):
    _, a, _ = prepared(name)
    doc = measure_in_context(a, resolve_target("llvm"))
    assert doc["model"] == model_key(a.model) and doc["unmatched"] == []
    # calls are scaled to the whole run, within a bound either way (down when a busy host slowed them)
    assert doc["whole_ms"] > 0 and 1.0 / MAX_SCALE <= doc["scale"] <= MAX_SCALE
    # a Winograd conv's first two stages compute no ONNX tensor; its output transform does
    assert all((k["tensor"] in a.producer or winograd.is_stage(k["symbol"])) and k["ms"] > 0 for k in doc["kernels"])
    # every kernel group's output is computed by some call (none silently fused away)
    computed = {k["tensor"] for k in doc["kernels"]}
    outputs = {a.nodes[g.nodes[-1]].output[0] for g in kernel_groups(a)}
    assert len(outputs & computed) >= 0.8 * len(outputs)
    # the rest were fused by TVM into their readers: priced with them as one unit
    ctx = ContextTimes(doc, a)
    groups = kernel_groups(a)
    assert sorted(g for u in ctx.units for g in u) == list(range(len(groups)))
    for u in ctx.units:
        if any(a.nodes[groups[g].nodes[-1]].output[0] not in computed for g in u):
            assert len(u) > 1
    for t in doc["transforms"]:
        assert t["tensor"] in a.specs and t["ms"] >= 0
    # the whole model priced from its own records is its measured time, less the call
    everything = np.ones((1, len(a.nodes)), bool)
    whole = ctx.half_ms(everything, lambda parts: np.zeros(len(parts)))[0]
    if 1.0 / MAX_SCALE < doc["scale"] < MAX_SCALE:
        assert whole == pytest.approx(doc["whole_ms"] - doc["call_ms"], rel=1e-6)
    else:
        assert whole == pytest.approx(sum(k["ms"] for k in doc["kernels"]) + sum(t["ms"] for t in doc["transforms"]))


def _doc(a, blocked: bool, kernel_ms: float = 1.0, transform_ms: float = 0.25) -> dict:
    """A synthetic record: every group one kernel of `kernel_ms`, all in blocked layout or all plain."""
    kernels, transforms = [], []
    for g in kernel_groups(a):
        out = a.nodes[g.nodes[-1]].output[0]
        reads = [[x, blocked] for i in g.nodes for x in a.nodes[i].input if x in a.specs and x not in
                 {o for j in g.nodes for o in a.nodes[j].output}]
        kernels.append({"tensor": out, "symbol": "k", "ms": kernel_ms, "blocked": blocked, "reads": reads})
    if blocked:  # the graph input is made blocked once, the output made plain once
        first = kernels[0]["tensor"]
        transforms.append({"tensor": a.inputs[0], "ms": transform_ms, "to_blocked": True, "reader": first})
        transforms.append({"tensor": a.outputs[0], "ms": transform_ms, "to_blocked": False, "reader": None})
    return {"kernels": kernels, "transforms": transforms}


def test_blocked_tensors_crossing_a_cut_cost_a_transform_each_side():
    _, a, cuts = prepared("tiny")
    groups = kernel_groups(a)
    outputs = {a.nodes[g.nodes[-1]].output[0] for g in groups}
    intact = [c for c in cuts if c.kind == "split" and set(c.tensors) <= outputs
              and not any(a.shape_only[r] for t in c.tensors for r in a.consumers[t])  # read by kernels themselves
              and not any(0 < c.head_mask[list(g.nodes)].sum() < len(g.nodes) for g in groups)]
    assert intact
    no_parts = lambda parts: np.zeros(len(parts))  # noqa: E731
    plain, blocked = ContextTimes(_doc(a, False), a), ContextTimes(_doc(a, True), a)
    for c in intact:
        head, tail = c.head_mask[None, :], ~c.head_mask[None, :]
        n_head = sum(bool(c.head_mask[g.nodes[-1]]) for g in groups)
        n_tail = len(groups) - n_head
        # plain layout: halves are their kernels
        assert plain.half_ms(head, no_parts)[0] == pytest.approx(n_head)
        assert plain.half_ms(tail, no_parts)[0] == pytest.approx(n_tail)
        # blocked: the head keeps the input transform and makes each sent tensor plain; the tail
        # makes each received tensor blocked again once (its readers read it blocked in the whole
        # model, convs or not) and keeps the output transform
        rate = blocked.rate_ms_per_byte
        received = [t for t in c.tensors if any(not c.head_mask[r] for r in a.consumers[t])]
        expect_head = n_head + 0.25 + sum(rate * a.specs[t].nbytes for t in c.tensors)
        expect_tail = n_tail + 0.25 + sum(rate * a.specs[t].nbytes for t in received)
        assert blocked.half_ms(head, no_parts)[0] == pytest.approx(expect_head)
        assert blocked.half_ms(tail, no_parts)[0] == pytest.approx(expect_tail)


def test_a_record_without_transforms_prices_cut_tensors_by_the_layout_model():
    """A whole model that runs blocked from input to output (a blocked stem, a blocked classifier)
    times no transform: its record gives no rate, yet the head pays one for its input (read
    blocked here, a transform into the block) and for each tensor it sends (out of it), and the
    tail for each tensor it receives (into the block)."""
    _, a, cuts = prepared("tiny")
    doc = _doc(a, True)
    doc["transforms"] = []
    no_parts = lambda parts: np.zeros(len(parts))  # noqa: E731
    layout_ms = lambda nbytes, to_blocked: (2e-6 if to_blocked else 1e-6) * nbytes  # noqa: E731
    free, priced = ContextTimes(doc, a), ContextTimes(doc, a, layout_ms=layout_ms)
    assert free.rate_ms_per_byte == 0.0
    outputs = {a.nodes[g.nodes[-1]].output[0] for g in kernel_groups(a)}
    cut = next(c for c in cuts if c.kind == "split" and set(c.tensors) <= outputs)
    head, tail = cut.head_mask[None, :], ~cut.head_mask[None, :]
    moved = layout_ms(a.specs[a.inputs[0]].nbytes, True) + sum(layout_ms(a.specs[t].nbytes, False) for t in cut.tensors)
    assert priced.half_ms(head, no_parts)[0] == pytest.approx(free.half_ms(head, no_parts)[0] + moved)
    received = sum(layout_ms(a.specs[t].nbytes, True) for t in cut.tensors)
    assert priced.half_ms(tail, no_parts)[0] == pytest.approx(free.half_ms(tail, no_parts)[0] + received)


def test_a_crossing_transform_timed_apart_prices_that_tensor_in_that_direction():
    """A record's `crossing` times (the transforms a half runs for the tensors it receives and
    sends, backends.context.measure_crossings) replace the layout model's for those tensors."""
    _, a, cuts = prepared("tiny")
    doc = _doc(a, True)
    doc["transforms"] = []
    no_parts = lambda parts: np.zeros(len(parts))  # noqa: E731
    layout_ms = lambda nbytes, to_blocked: 1e-6 * nbytes  # noqa: E731
    outputs = {a.nodes[g.nodes[-1]].output[0] for g in kernel_groups(a)}
    cut = next(c for c in cuts if c.kind == "split" and set(c.tensors) <= outputs)
    crossing = [{"tensor": t, "to_blocked": True, "ms": 0.5} for t in cut.tensors]
    before = ContextTimes(doc, a, layout_ms=layout_ms)
    after = ContextTimes({**doc, "crossing": crossing}, a, layout_ms=layout_ms)
    tail, head = ~cut.head_mask[None, :], cut.head_mask[None, :]
    into = sum(layout_ms(a.specs[t].nbytes, True) for t in cut.tensors)
    assert after.half_ms(tail, no_parts)[0] == pytest.approx(before.half_ms(tail, no_parts)[0] - into + 0.5 * len(cut.tensors))
    # the head sends them out of the block: a transform the crossing times leave to the layout model
    assert after.half_ms(head, no_parts)[0] == pytest.approx(before.half_ms(head, no_parts)[0])


def test_a_profile_with_the_models_context_prices_it_in_place():
    _, a, cuts = prepared("resnet8")
    doc = _doc(a, False, kernel_ms=2.0)
    prof = KernelProfile({}, {"call_overhead": 0.01}, {}, None, contexts={model_key(a.model): doc})
    lm = MeasuredLatencyModel(ANALYTIC, prof, None)
    masks = np.stack([c.head_mask for c in cuts])
    got = half_ms(lm, a, masks, DEVICE)
    assert lm.coverage[DEVICE] == {MEASURED_IN_CONTEXT: len(doc["kernels"])}
    assert "device measured" in lm.source
    groups = kernel_groups(a)
    intact = [k for k, c in enumerate(cuts) if not any(0 < c.head_mask[list(g.nodes)].sum() < len(g.nodes) for g in groups)]
    assert len(intact) > len(cuts) // 2
    in_place = ContextTimes(doc, a).half_ms(masks[intact], lambda parts: np.zeros(len(parts)))
    np.testing.assert_allclose(got[intact], in_place)
    kernels_in_head = [sum(bool(cuts[k].head_mask[g.nodes[-1]]) for g in groups) for k in intact]
    np.testing.assert_allclose(in_place, 2.0 * np.array(kernels_in_head))
    # another model's context is ignored: its kernels are priced from the profile as before
    _, other, other_cuts = prepared("tiny")
    lm2 = MeasuredLatencyModel(ANALYTIC, prof, None)
    half_ms(lm2, other, np.stack([c.head_mask for c in other_cuts]), DEVICE)
    assert MEASURED_IN_CONTEXT not in lm2.coverage[DEVICE]


def test_planned_record_follows_the_cpu_layout_pass():
    from nasc.search.latency import planned_record

    _, a, _ = prepared("resnet8")
    groups = kernel_groups(a)
    ms = np.ones(len(groups))
    plain = planned_record(a, groups, ms, None, lambda nbytes, to_blocked: 1.0)
    assert plain["transforms"] == [] and not any(k["blocked"] for k in plain["kernels"])
    planned = planned_record(a, groups, ms, 8, lambda nbytes, to_blocked: nbytes * (2e-6 if to_blocked else 1e-6))
    by_tensor = {k["tensor"]: k for k in planned["kernels"]}
    first = planned["kernels"][0]
    assert not any(blocked for _, blocked in first["reads"]), "3 input channels do not fill a block of 8"
    assert first["blocked"], "the stem's 16 output channels are written blocked"
    assert sum(k["blocked"] for k in planned["kernels"]) >= len(groups) // 2
    # a transform exactly where a kernel reads a tensor in the other layout
    for t in planned["transforms"]:
        if t["reader"] is not None:
            assert t["to_blocked"] == dict(map(tuple, by_tensor[t["reader"]]["reads"]))[t["tensor"]]
        # each priced in its direction
        assert t["ms"] == pytest.approx(a.specs[t["tensor"]].nbytes * (2e-6 if t["to_blocked"] else 1e-6))
    # neither the image nor the stem's output is transformed: the stem reads one, writes the other
    assert not any(t["tensor"] in (a.inputs[0], first["tensor"]) for t in planned["transforms"])


def test_every_cut_half_is_replayed_alone_in_the_compiled_model():
    _, a, cuts = prepared("resnet8")
    masks = half_masks(cuts)
    assert len(masks) == sum(bool(c.head_mask.any()) + bool((~c.head_mask).any()) for c in cuts)
    doc = measure_in_context(a, resolve_target("llvm"), halves=masks, replay=True)
    # every half that runs a kernel whole is replayed (a tail of shape ops alone runs none, and one
    # that holds only the end of a fused kernel runs it as a part compiled apart)
    ctx = ContextTimes(doc, a)
    unit = lambda n: [i for g in ctx.units[ctx.unit_of[n]] for i in ctx.groups[g].nodes]  # noqa: E731
    timed = lambda m: [n for n, _ in ctx.kernels if m[n] and m[unit(n)].all()]  # noqa: E731
    assert set(doc["halves"]) == {half_key(m) for m in masks if timed(m)}
    assert len(doc["halves"]) >= len(cuts) - 2
    assert all(np.isfinite(r) and r > 0 for r in doc["halves"].values())
    # the whole model replayed runs every call, as in place: the same time up to this host's noise
    whole = half_key(np.ones(len(a.nodes), bool))
    assert 0.5 < doc["halves"][whole] < 2.0


def test_every_tensor_a_half_receives_or_sends_is_timed_through_its_own_transforms():
    """A tail moves each tensor it receives into the whole model's NCHW{c}c block and a head each
    one it sends out of it: kernels the whole model never runs, timed apart in `crossing`."""
    _, a, cuts = prepared("resnet8")
    masks = half_masks(cuts)
    tensors = crossing_tensors(a, masks)
    sent = {t for c in cuts if c.kind == "split" for t in c.tensors if len(a.specs[t].shape) == 4}
    assert sent and sent <= set(tensors) and set(tensors) <= sent | set(a.inputs)
    doc = measure_in_context(a, resolve_target("llvm"), halves=masks)
    assert doc["halves"] == {}   # the replay is opt-in; the crossing transforms are not
    block = doc["block"]
    assert block and all(k["tensor"] is None or len(a.specs[k["tensor"]].shape) != 4 or not k["blocked"]
                         or a.specs[k["tensor"]].shape[1] % block == 0 for k in doc["kernels"])
    timed = {(x["tensor"], x["to_blocked"]): x["ms"] for x in doc["crossing"]}
    divisible = [t for t in tensors if a.specs[t].shape[1] % block == 0]
    assert divisible and set(timed) == {(t, d) for t in divisible for d in (True, False)}
    # a 1x1 map is blocked as it is (a reshape, no kernel); any larger one moves through a transform
    assert all(ms > 0 for (t, _), ms in timed.items() if np.prod(a.specs[t].shape[2:]) > 1)
    assert all(ms == 0 for (t, _), ms in timed.items() if np.prod(a.specs[t].shape[2:]) == 1)
    # tensors of one shape share one measurement
    for t in divisible:
        for u in divisible:
            if a.specs[t].shape == a.specs[u].shape:
                assert timed[t, True] == timed[u, True] and timed[t, False] == timed[u, False]


def test_a_half_whose_convs_run_in_another_block_is_timed_on_its_own():
    """A half the CPU pipeline blocks otherwise than the whole model (here a head of the 3-channel
    stem alone, and the conv-free tails after the last conv: both plain) runs kernels the whole
    model never ran: it is compiled and timed on its own, and priced at that time. Compiled
    alone, it runs in the block `compiled_conv_block` plans for it."""
    from nasc.backends.cpu_schedules import compiled_conv_block
    from nasc.backends.profile import channel_block
    from nasc.passes import extract_half

    _, a, cuts = prepared("resnet8")
    target = resolve_target("llvm")
    masks = half_masks(cuts)
    doc = measure_in_context(a, target, halves=masks)
    lanes = channel_block(target)
    assert doc["block"] == compiled_conv_block(a.model, lanes) == lanes
    other = {half_key(m) for m in masks if not m.all() and compiled_conv_block(extract_half(a, m), lanes) != lanes}
    assert other and set(doc["own_layouts"]) == other and all(ms > 0 for ms in doc["own_layouts"].values())
    ctx = ContextTimes(doc, a)
    no_parts = lambda parts: np.zeros(len(parts))  # noqa: E731
    for m in masks:
        if half_key(m) in other:
            assert ctx.half_ms(m[None, :], no_parts)[0] == doc["own_layouts"][half_key(m)]
    # compiled alone, each runs in the block planned for it
    for m in masks[[half_key(m) in other for m in masks]][[0, -1]]:
        half = extract_half(a, m)
        assert measure_in_context(prepared_analysis(half), target)["block"] == compiled_conv_block(half, lanes) != lanes


def test_a_half_replays_exactly_the_kernels_its_record_times():
    """A half replays the calls whose fused unit it holds whole, the kernels ContextTimes times for
    it; a kernel a cut breaks is replayed by neither half (each runs its part compiled apart)."""
    _, a, cuts = prepared("resnet8")
    doc = measure_in_context(a, resolve_target("llvm"))
    ctx = ContextTimes(doc, a)
    calls = [{"symbol": k["symbol"], "tensor": k["tensor"]} for k in doc["kernels"]]
    owner = _call_owners(a, calls)
    nodes = call_nodes(a, calls, owner)
    assert all(len(n) and o in n for o, n in zip(owner, nodes) if o >= 0)
    assert any(len(n) > 1 for n in nodes)      # convs with their adds and relus
    unit = lambda n: [i for g in ctx.units[ctx.unit_of[n]] for i in ctx.groups[g].nodes]  # noqa: E731
    broke = 0
    for c in cuts:
        head, tail = half_calls(owner, nodes, c.head_mask), half_calls(owner, nodes, ~c.head_mask)
        assert not (head & tail).any()
        for mask, chosen in ((c.head_mask, head), (~c.head_mask, tail)):
            assert {int(o) for o in owner[chosen]} == {n for n, _ in ctx.kernels if mask[n] and mask[unit(n)].all()}
        split = [k for k, n in enumerate(nodes) if 0 < c.head_mask[n].sum() < len(n)]
        assert not (head | tail)[split].any()
        broke += bool(split)
    assert broke     # some cut of the residual net falls inside a fused conv + add + relu


def test_a_replay_calls_the_whole_models_kernels_on_its_buffers():
    """Replaying calls runs the kernels of the model's own run on its buffers, with no VM: called
    again, they recompute the model's output; a subset takes less time than all of them."""
    import tvm
    from tvm import relax

    from nasc.backends import tvm as tvm_backend
    from nasc.compile import sample_inputs

    _, a, _ = prepared("resnet8")
    target = resolve_target("llvm")
    vm = relax.VirtualMachine(tvm_backend.compile_model(a.model, target), tvm.cpu())
    args = [tvm.runtime.tensor(x) for x in sample_inputs(a.model, 1)[0].values()]
    calls = _kernel_calls(vm, args)
    doc = measure_in_context(a, target)
    assert len(calls) == len(doc["kernels"]) + len(doc["transforms"])
    out = calls[-1][1][-1]                     # the last kernel writes the model's output
    want = out.numpy().copy()
    out.copyfrom(np.zeros(want.shape, want.dtype))
    every = _direct_s(calls, min_runs=3, min_s=0.0)
    np.testing.assert_array_equal(out.numpy(), want)
    some = _direct_s(calls[::4], min_runs=3, min_s=0.0)
    assert 0.0 < some < every
    # a half and the whole model replayed in rounds: the same two times, up to this host's noise
    half, whole = _direct_pair_s(calls[::4], calls, min_runs=6, min_s=0.0)
    assert 0.0 < half < whole and 0.5 < whole / every < 2.0
    assert 0.5 < every * 1e3 / doc["whole_ms"] < 2.0


def test_a_replayed_half_scales_its_timed_calls():
    """The kernels a half's record times are scaled by its replay, never up; a half not replayed,
    and the parts of kernels a cut breaks, are priced as before."""
    _, a, cuts = prepared("tiny")
    groups = kernel_groups(a)
    doc = _doc(a, False)
    parts = lambda q: np.full(len(q), 0.125)  # noqa: E731
    before = ContextTimes(doc, a)
    splits = [c for c in cuts if c.kind == "split"]
    assert any(0 < c.head_mask[list(g.nodes)].sum() < len(g.nodes) for c in splits for g in groups)
    for c in splits:
        head, tail = c.head_mask[None, :], ~c.head_mask[None, :]
        after = ContextTimes({**doc, "halves": {half_key(c.head_mask): 0.5}}, a)
        timed = sum(bool(c.head_mask[list(g.nodes)].all()) for g in groups)   # each kernel 1 ms
        broken = before.half_ms(head, parts)[0] - timed
        assert broken >= 0
        assert after.half_ms(head, parts)[0] == pytest.approx(0.5 * timed + broken)
        assert after.half_ms(tail, parts)[0] == before.half_ms(tail, parts)[0]
        # a replay that read slower than in place is noise: the half keeps its in-place time
        slower = ContextTimes({**doc, "halves": {half_key(c.head_mask): 1.5}}, a)
        assert slower.half_ms(head, parts)[0] == pytest.approx(before.half_ms(head, parts)[0])


def test_a_cut_through_a_blocked_kernel_moves_its_tensor_through_a_transform_each_side():
    """A tensor inside a fused kernel that ran in NCHW{c}c leaves the head plain and enters the
    tail plain: each half pays a layout transform for it (MobileNetV2's head ending in a 16 -> 96
    conv whose Clip the tail runs wrote 2.4 MB through one)."""
    _, a, cuts = prepared("tiny")
    groups = kernel_groups(a)
    layout_ms = lambda nbytes, to_blocked: (2e-6 if to_blocked else 1e-6) * nbytes  # noqa: E731
    no_parts = lambda parts: np.zeros(len(parts))  # noqa: E731
    doc = _doc(a, True)
    checked = 0
    for c in cuts:
        broken = [g for g in groups if 0 < c.head_mask[list(g.nodes)].sum() < len(g.nodes)]
        if c.kind != "split" or len(broken) != 1:
            continue
        g = broken[0]
        out = a.nodes[g.nodes[-1]].output[0]
        plain = {**doc, "kernels": [{**k, "blocked": False} if k["tensor"] == out else k for k in doc["kernels"]]}
        crossing = [t for i in g.nodes for t in a.nodes[i].output if t in a.specs
                    and any(c.head_mask[r] != c.head_mask[i] for r in a.consumers.get(t, []))]
        assert crossing and out not in crossing
        for mask, into_block in ((c.head_mask, False), (~c.head_mask, True)):   # out of the head, into the tail
            moved = sum(layout_ms(a.specs[t].nbytes, into_block) for t in crossing)
            got = ContextTimes(doc, a, layout_ms=layout_ms).half_ms(mask[None, :], no_parts)[0]
            base = ContextTimes(plain, a, layout_ms=layout_ms).half_ms(mask[None, :], no_parts)[0]
            assert got == pytest.approx(base + moved)
        checked += 1
    assert checked
