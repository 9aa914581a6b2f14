"""backends.profile and the measured latency model: kernel groups, standalone kernels, profiles."""

import json

import numpy as np
import onnx

from conftest import prepared, random_feeds
from nasc import defaults
from nasc.backends import ort
from nasc.backends.context import measure_in_context
from nasc.backends.profile import (CALL_KEY, LAYOUT_PREFIX, SUITE_MIX, calibration_suite, group_model, in_blocked_layout,
                                   kernel_groups, layout_sample, measure_kernels, planned_layouts, prepared_analysis)
from nasc.backends.targets import resolve_target
from nasc.cli.profile import main as profile_main
from nasc.search.latency import DEVICE, SERVER, AnalyticLatencyModel, MeasuredLatencyModel, predict


def test_groups_partition_the_kernels():
    _, a, _ = prepared("mobilenetv2")
    groups = kernel_groups(a)
    covered = sorted(i for g in groups for i in g.nodes)
    assert covered == sorted(set(covered))
    assert set(covered) | set(np.flatnonzero(a.shape_only)) == set(range(len(a.nodes)))
    for g in groups:
        assert all(a.fused[i] for i in g.nodes[1:]), "only fusable epilogues join an anchor's group"
    # repeated blocks share signatures
    assert len({g.signature for g in groups}) < len(groups)


def test_group_models_compute_what_the_graph_computes():
    """Each standalone kernel model reproduces its tensors of the full graph."""
    original, a, _ = prepared("resnet8")
    feeds = random_feeds(original)
    m = onnx.ModelProto()
    m.CopyFrom(a.model)
    names = [o for n in a.nodes for o in n.output if o in a.specs and o not in {x.name for x in m.graph.output}]
    m.graph.output.extend(onnx.helper.make_tensor_value_info(n, 1, list(a.specs[n].shape)) for n in names)
    full = {**feeds, **ort.run(m, feeds)}
    groups = kernel_groups(a)
    for g in groups:
        for k, v in ort.run(group_model(a, g), full).items():
            np.testing.assert_allclose(v, full[k], rtol=1e-4, atol=1e-4)
    assert len(groups) > 10


def test_a_kernel_timed_alone_runs_in_the_layout_its_cnn_gives_it():
    """A CNN's pools and adds read NCHW{c}c and its stem writes it; alone, behind or before identity
    convs, they still do, and compute the same."""
    original, a, _ = prepared("resnet8")
    llvm, groups = resolve_target("llvm"), kernel_groups(a)
    layouts = planned_layouts(a, groups, llvm)
    assert not any(r or w for r, w in planned_layouts(a, groups, resolve_target("cuda")))
    feeds = random_feeds(original)
    m = onnx.ModelProto()
    m.CopyFrom(a.model)
    m.graph.output.extend(onnx.helper.make_tensor_value_info(n, 1, list(a.specs[n].shape))
                          for n in a.specs if n not in {x.name for x in m.graph.output} and n not in feeds)
    full = {**feeds, **ort.run(m, feeds)}
    assert layouts[0] == (set(), True)   # the stem reads the RGB input plain and writes blocked
    cases = [(g, in_blocked_layout(group_model(a, g), set(), outputs=True)) for g in groups[:1]]
    cases += [(g, in_blocked_layout(group_model(a, g), r, outputs=w)) for g, (r, w) in zip(groups, layouts)
              if r and not any(a.nodes[i].op_type == "Conv" for i in g.nodes)]
    assert len(cases) >= 2
    for g, alone in cases:
        added = [n for n in alone.graph.node if n.name.endswith(".identity")]
        assert added and all(n.op_type == "Conv" for n in added)
        for k, v in ort.run(alone, {x.name: full[x.name] for x in alone.graph.input}).items():
            np.testing.assert_allclose(v, full[k], rtol=1e-5, atol=1e-5)
        doc = measure_in_context(prepared_analysis(alone), llvm)
        # the identity convs are transforms, not kernels; the kernels read or write blocked as in the CNN
        assert doc["unmatched"] == [] and doc["kernels"] and all(k["blocked"] for k in doc["kernels"])
        assert doc["transforms"]
    # a model without convs runs plain (the calibration suite asks for its kernels blocked, as in a CNN)
    pool = prepared_analysis(next(m for m in calibration_suite(12) if "pool" in m.doc_string))
    assert not any(r or w for r, w in planned_layouts(pool, kernel_groups(pool), llvm))
    assert any(m.doc_string == "suite stem" for m in calibration_suite(len(SUITE_MIX)))


def test_an_elementwise_kernel_timed_alone_is_timed_as_a_kernel():
    """An Add+Relu reading and writing NCHW{c}c, as between a CNN's convs, is one kernel call of
    its own: were its output made plain after it, the transform would fuse with it, and the call
    would count as a transform, leaving the kernel 0 ms."""
    from nasc.examples.builder import Net

    n = Net("eltwise", 0)
    x, other = n.input("input", (1, 64, 28, 28)), n.input("other", (1, 64, 28, 28))
    a = prepared_analysis(n.build(n.act(n.add(x, other), "relu"), "add relu"))
    llvm, (g,) = resolve_target("llvm"), kernel_groups(a)
    doc = measure_in_context(prepared_analysis(in_blocked_layout(group_model(a, g), None, outputs=True)), llvm)
    assert [k["blocked"] for k in doc["kernels"]] == [True] and doc["kernels"][0]["ms"] > 0
    assert not any("add" in t["symbol"] for t in doc["transforms"])
    times = measure_kernels(a, llvm, blocked=True)
    assert times[g.signature] > 0


def test_measured_model_uses_kernels_and_call_overhead():
    _, a, cuts = prepared("resnet8")
    kernels = measure_kernels(a, resolve_target("llvm"))
    assert kernels[CALL_KEY] > 0 and all(v >= 0 for v in kernels.values())
    groups = kernel_groups(a)
    assert all(g.signature in kernels for g in groups)  # every kernel measured
    ms = np.zeros(len(a.nodes))  # each kernel's time on its anchor node
    for g in groups:
        ms[g.anchor()] = kernels[g.signature]
    assert ms.sum() > 0
    analytic = AnalyticLatencyModel(defaults.DEFAULT_DEVICE, defaults.DEFAULT_SERVER)
    measured = MeasuredLatencyModel(analytic, device=kernels)
    preds = predict(a, cuts, measured, defaults.DEFAULT_LINK)
    intact = broken = 0
    for c, p in zip(cuts, preds):
        assert abs(p.server_ms - analytic.node_ms(a, SERVER)[~c.head_mask].sum()) < 1e-9
        # a kernel the cut breaks: the head's part keeps the anchor and costs the whole measured kernel
        cut_through = [g for g in groups if 0 < c.head_mask[list(g.nodes)].sum() < len(g.nodes)]
        if any(not c.head_mask[g.anchor()] for g in cut_through):
            continue  # a part without its anchor is priced on its own (tests/test_predictor.py)
        intact += not cut_through
        broken += bool(cut_through)
        expect = ms[c.head_mask].sum() + (kernels[CALL_KEY] if c.head_mask.any() else 0.0)
        assert abs(p.device_ms - expect) < 1e-9
    assert intact > len(cuts) // 2 and broken > 0
    assert measured.source.startswith("device measured")
    assert np.array_equal(measured.node_ms(a, SERVER), analytic.node_ms(a, SERVER))
    assert not np.array_equal(measured.node_ms(a, DEVICE), analytic.node_ms(a, DEVICE))
    np.testing.assert_allclose(measured.node_ms(a, DEVICE), ms)


def test_profile_cli_calibrates_fits_and_checks_halves(tmp_path, capsys):
    """Suite kernels fit a predictor; a model profiled next is predicted by it (held out) and by its own kernels."""
    prof = tmp_path / "p.json"
    assert profile_main(["--calibrate", "12", "-o", str(prof), "-q"]) == 0
    doc = json.loads(prof.read_text())
    assert doc["source"] == "measured" and doc["target"]["name"] == "llvm" and CALL_KEY in doc["kernels"]
    layouts = [k for k in doc["kernels"] if k.startswith(LAYOUT_PREFIX)]  # transforms around the kernels
    into = [k for k in layouts if layout_sample(k)[1]]
    assert 0 < len(into) < len(layouts)   # both directions: into NCHW{c}c on the way in, out of it after
    samples = doc["predictor"]["samples"]
    assert (samples["layout_to_blocked"], samples["layout_to_plain"]) == (len(into), len(layouts) - len(into))
    assert sum(doc["predictor"]["samples"].values()) == len(doc["features"]) + len(layouts) and len(doc["features"]) >= 12
    assert profile_main(["example:tiny", "-o", str(prof), "--cuts", "2", "--json", "-q"]) == 0
    summary = json.loads(capsys.readouterr().out)
    halves = [r[h] for r in summary["cuts"] for h in ("head", "tail") if h in r]
    assert halves and all(h["measured_ms"] > 0 and h["from_kernels_ms"] > 0 and h["from_predictor_ms"] > 0 for h in halves)
    assert set(summary["accuracy"]) == {"in_context_ms", "from_kernels_ms", "from_predictor_ms"}
    assert all(h["in_context_ms"] > 0 for h in halves)
    doc = json.loads(prof.read_text())
    assert "example:tiny" in doc["models"]
    # halves are priced in place: the replay is opt-in (--replay)
    assert [c["halves"] for c in doc["contexts"].values()] == [{}]
    replayed = tmp_path / "replayed.json"
    assert profile_main(["example:tiny", "-o", str(replayed), "--cuts", "0", "--replay", "-q"]) == 0
    (context,) = json.loads(replayed.read_text())["contexts"].values()
    assert context["halves"] and all(r > 0 for r in context["halves"].values())
    from nasc.cli.compile import main as compile_main

    assert compile_main(["example:tiny", "--dry-run", "--json", "--device-profile", str(prof), "-q"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["latency_model"].startswith("device measured (") and "in context" in out["latency_model"]
    assert "server analytic" in out["latency_model"]
    # an unseen model: every kernel priced by the fitted predictor
    assert compile_main(["example:resnet8", "--dry-run", "--json", "--device-profile", str(prof), "-q"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert "predicted" in out["latency_model"]
    assert all(c["predicted"]["device_ms"] > 0 for c in out["candidates"] if c["kind"] != "server-only")


def test_profile_in_a_tuning_db_is_used_by_compile(tmp_path, capsys):
    db = tmp_path / "db"
    assert profile_main(["example:tiny", "--db", str(db), "--cuts", "0", "-q"]) == 0
    from nasc.backends.tuning import db_path
    from nasc.cli.compile import main as compile_main
    from nasc.cli.profile import PROFILE_IN_DB

    assert (db_path(db, resolve_target("llvm")) / PROFILE_IN_DB).is_file()
    assert compile_main(["example:tiny", "--dry-run", "--json", "--tuning-db", str(db), "-q"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["latency_model"].startswith("device measured")


def test_profile_cli_errors(tmp_path, capsys):
    assert profile_main([]) != 0
    assert "give a MODEL" in capsys.readouterr().err
    bad = tmp_path / "bad.json"
    bad.write_text("{")
    assert profile_main(["example:tiny", "-o", str(bad), "--cuts", "0"]) != 0
    assert "bad.json" in capsys.readouterr().err


def test_a_profile_from_an_older_nasc_is_refused_by_name(tmp_path, capsys):
    """Kernels timed the old way would be composed wrongly: one clear error, nothing written."""
    from nasc.cli.compile import main as compile_main

    old = tmp_path / "old.json"
    old.write_text(json.dumps({"format": "nasc-kernel-profile/1", "target": {}, "kernels": {CALL_KEY: 0.01}}))
    out = tmp_path / "out"
    assert compile_main(["example:tiny", "--split", "auto", "--device-profile", str(old), "-o", str(out)]) != 0
    err = capsys.readouterr().err
    assert "old.json" in err and "measure it again" in err and len(err.strip().splitlines()) == 1
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["old.json"]
