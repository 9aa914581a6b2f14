import json

import numpy as np
import onnx
import pytest

pytest.importorskip("torch")

from nasc.cli.search import main  # noqa: E402
from nasc.search.nas import defaults as D  # noqa: E402

TINY = ["--epochs", "1", "--channels", "4", "--cells", "1", "--resolution", "8", "--evo-cycles", "6",
        "--evo-population", "6"]


def test_end_to_end_digits(tmp_path, capsys):
    out = tmp_path / "run"
    rc = main(["-o", str(out), "--space", "nb201", "--data", "digits", "--link", "1,50",
               "--latency-budget", "1000", "--json", *TINY])
    assert rc == 0
    report = json.loads(capsys.readouterr().out)
    for key in ("chosen", "baseline"):
        assert {"arch", "split", "accuracy", "latency_ms", "device_memory_bytes"} <= set(report[key])
    assert report["chosen"]["latency_ms"] <= 1000 and report["train_seconds"] > 0
    # with a budget nothing binds, the chosen arch is as accurate as baseline (a)
    assert report["chosen"]["accuracy"] == pytest.approx(report["baseline"]["accuracy"])
    assert sorted(p.name for p in out.iterdir()) == ["accuracy_vs_latency.png", "chosen.onnx", "search.json"]
    model = onnx.load(str(out / "chosen.onnx"))
    meta = {p.key: p.value for p in model.metadata_props}
    assert meta["nasc.arch"] == report["chosen"]["arch"]
    assert meta[D.SPLIT_METADATA_KEY] == report["chosen"]["split_tensor"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dirs left behind


def test_tabular_ratio_and_pareto(tmp_path, capsys):
    from nasc.errors import NascError
    from nasc.search.nas.tabular import find_data_dir

    try:
        find_data_dir()
    except NascError:
        pytest.skip("NB201 tables not available")
    rc = main(["-o", str(tmp_path / "t"), "--tabular", "--link", "200,2", "--latency-budget-ratio", "0.4", "--json"])
    assert rc == 0
    r = json.loads(capsys.readouterr().out)
    assert r["chosen"]["latency_ms"] <= 0.4 * r["baseline"]["latency_ms"] + 1e-9
    assert r["latency_reduction_pct"] >= 60.0 and r["baseline"]["arch_index"] == 6111
    rc = main(["-o", str(tmp_path / "p"), "--tabular", "--link", "20,10", "--objective", "pareto",
               "--memory-limit", "1000000", "--json"])
    r = json.loads(capsys.readouterr().out)
    assert rc == 0 and r["pareto"] and r["chosen"]["device_memory_bytes"] <= 1_000_000
    lat = np.array([p["latency_ms"] for p in r["pareto"]])
    assert lat.min() <= r["chosen"]["latency_ms"]


def test_errors_are_one_red_line(tmp_path, capsys):
    rc = main(["-o", str(tmp_path / "x"), "--link", "1;50", "--latency-budget", "1"])
    assert rc == 2 and "BW_MBIT,RTT_MS" in capsys.readouterr().err
    rc = main(["-o", str(tmp_path / "x"), "--link", "1,50", "--data", "folder:/nonexistent", "--latency-budget", "1"])
    err = capsys.readouterr().err
    assert rc == 2 and "/nonexistent" in err and len(err.strip().splitlines()) == 1
    rc = main(["-o", str(tmp_path / "x"), "--link", "1,50"])
    assert rc == 2 and "latency-budget" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


RATIO = 1.0


def test_mbv2_search_end_to_end_and_compiles(tmp_path, capsys):
    """The second space runs the same loop: search on digits, export, nasc-compile at the chosen cut."""
    from nasc.compile import compile_model

    out = tmp_path / "mb"
    # at this size per-kernel overhead dominates every architecture's latency, so how far below the
    # baseline a budget can reach depends on the host: the budget here is the baseline's own latency
    rc = main(["-o", str(out), "--space", "mbv2", "--data", "digits", "--link", "20,10",
               "--latency-budget-ratio", str(RATIO), "--json", *TINY])
    assert rc == 0
    r = json.loads(capsys.readouterr().out)
    from nasc.search.nas.space import SpaceConfig, get_space

    space = get_space("mbv2", SpaceConfig(cells_per_stage=1))
    assert space.arch_str(space.arch_index(r["chosen"]["arch"])) == r["chosen"]["arch"]
    assert r["chosen"]["latency_ms"] <= RATIO * r["baseline"]["latency_ms"] + 1e-9
    assert r["archs_estimated"] > 1 and "supernet" in r["accuracy_source"]
    # device memory of the chosen cut: the table's figure is the partitioner's, exactly
    assert r["chosen"]["device_memory_bytes_partitioner"] == r["chosen"]["device_memory_bytes"]
    model = onnx.load(str(out / "chosen.onnx"))
    meta = {p.key: p.value for p in model.metadata_props}
    assert meta["nasc.space"] == "mbv2" and meta["nasc.arch"] == r["chosen"]["arch"]
    manifest = compile_model(out / "chosen.onnx", tmp_path / "art", split="annotated", backend="ort")
    want = [meta[D.SPLIT_METADATA_KEY]] if meta[D.SPLIT_METADATA_KEY] not in ("", D.SPLIT_DEVICE_ONLY) else []
    assert manifest["split"]["tensors"] == want


def test_search_with_a_kernel_profile_prices_terms_with_it(tmp_path, capsys):
    """--device-profile accepts a nasc-profile kernel profile; the report names it instead of dumping it."""
    from nasc.backends.profile import calibration_suite, kernel_features, prepared_analysis, save_profile
    from nasc.backends.targets import resolve_target

    features = {}
    for m in calibration_suite(12, seed=0):
        features.update(kernel_features(prepared_analysis(m)))
    # a synthetic but plausible target: 1 GFLOP/s plus 10 us per kernel
    kernels = {s: f["flops"] / 1e6 + 0.01 for s, f in features.items()}
    prof = tmp_path / "device.json"
    save_profile(prof, resolve_target("llvm"), {**kernels, "call_overhead": 0.001}, features, {})
    rc = main(["-o", str(tmp_path / "run"), "--space", "nb201", "--data", "digits", "--link", "1,50",
               "--latency-budget", "1000", "--json", "--device-profile", str(prof), *TINY])
    assert rc == 0
    report = json.loads(capsys.readouterr().out)
    assert report["latency_source"].startswith("device predicted") and "server analytic" in report["latency_source"]
    assert report["settings"]["device_profile"]["kernel_profile"] == str(prof)
    assert report["chosen"]["device_ms"] > 0 or report["chosen"]["split"] == "server-only"
