"""backends.profile and the measured latency model: kernel groups, standalone kernels, profiles."""

import json

import numpy as np
import onnx

from conftest import prepared, random_feeds
from nasc import defaults
from nasc.backends import ort
from nasc.backends.profile import CALL_KEY, group_model, kernel_groups, measure_kernels, node_ms_from_kernels
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


def test_measured_model_uses_kernels_and_call_overhead():
    _, a, cuts = prepared("resnet8")
    kernels = measure_kernels(a, resolve_target("llvm"))
    assert kernels[CALL_KEY] > 0 and all(v >= 0 for v in kernels.values())
    ms, known = node_ms_from_kernels(a, kernels)
    assert known.all() and ms.sum() > 0
    analytic = AnalyticLatencyModel(defaults.DEFAULT_DEVICE, defaults.DEFAULT_SERVER)
    measured = MeasuredLatencyModel(analytic, device_kernels=kernels)
    preds = predict(a, cuts, measured, defaults.DEFAULT_LINK)
    for c, p in zip(cuts, preds):
        expect = ms[c.head_mask].sum() + (kernels[CALL_KEY] if c.head_mask.any() else 0.0)
        assert abs(p.device_ms - expect) < 1e-9
        assert abs(p.server_ms - analytic.node_ms(a, SERVER)[~c.head_mask].sum()) < 1e-9
    assert measured.source.startswith("device measured")
    assert np.array_equal(measured.node_ms(a, SERVER), analytic.node_ms(a, SERVER))
    assert not np.array_equal(measured.node_ms(a, DEVICE), analytic.node_ms(a, DEVICE))


def test_profile_cli_writes_a_profile_compile_can_use(tmp_path, capsys):
    prof = tmp_path / "p.json"
    assert profile_main(["example:tiny", "-o", str(prof), "--cuts", "2", "--json", "-q"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["cuts"] and all(r["measured_ms"] > 0 for r in summary["cuts"])
    doc = json.loads(prof.read_text())
    assert doc["source"] == "measured" and doc["target"]["name"] == "llvm" and CALL_KEY in doc["kernels"]
    from nasc.cli.compile import main as compile_main

    assert compile_main(["example:tiny", "--dry-run", "--json", "--device-profile", str(prof), "-q"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert "device measured" in out["latency_model"]
