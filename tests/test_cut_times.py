"""Measured cut times (benchmarks/cut_times.py), split-quality scoring (benchmarks/split_quality.py) on the tiny example, and the benchmarks' session bookkeeping."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from nasc import defaults
from nasc.compile import plan
from nasc.examples import build
from nasc.search.choose import choose_fastest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
# the quick resumable first pass; the rest of the cuts are measured by the second call
FIRST_PASS_CUTS = 3


def _load(name: str):
    """A benchmark script as a module (benchmarks/ is scripts, not a package)."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    """tiny measured in two resumable passes, then once more from the cache alone."""
    ct = _load("cut_times")
    cache = tmp_path_factory.mktemp("cut_times") / "tiny.json"
    model = build("tiny")
    first = ct.measure_cut_times(model, cache_path=cache, limit_cuts=FIRST_PASS_CUTS)
    second = ct.measure_cut_times(model, cache_path=cache)
    third = ct.measure_cut_times(model, cache_path=cache)
    return {"plan": plan(model), "first": first, "second": second, "third": third, "cache": cache}


def test_one_time_per_half_of_every_cut(measured):
    p, doc = measured["plan"], measured["second"]
    assert doc["complete"] and doc["cuts_total"] == len(p.cuts)
    assert [r["index"] for r in doc["cuts"]] == [c.index for c in p.cuts]
    for c, r in zip(p.cuts, doc["cuts"]):
        assert (r["kind"], tuple(r["tensors"]), r["payload_bytes"], r["payload_bytes_int8"]) == (
            c.kind, c.tensors, c.payload_bytes, c.payload_bytes_int8)
        has_head, has_tail = c.kind != "server-only", c.kind != "device-only"
        assert (r["head_ms"] > 0) == has_head and (r["tail_ms"] > 0) == has_tail
        assert (r["head_compile_s"] > 0) == has_head and (r["tail_compile_s"] > 0) == has_tail
        assert r["head_max_abs_err_vs_ort"] <= defaults.VERIFY_TVM_ATOL * 10
        assert r["tail_max_abs_err_vs_ort"] <= defaults.VERIFY_TVM_ATOL * 10
        # each half timed in several sessions, the fastest kept
        for role, has in (("head", has_head), ("tail", has_tail)):
            if has:
                assert len(r[f"{role}_ms_sessions"]) == 1 + _load("cut_times").AGAIN_SESSIONS and r[f"{role}_ms"] == min(r[f"{role}_ms_sessions"])
    assert doc["whole_model"]["ms"] == min(doc["whole_model"]["ms_sessions"]) > 0
    assert doc["server_stand_in"] == "host llvm"


def test_resume_measures_only_missing_cuts_and_cache_is_reused(measured):
    first, second, third = measured["first"], measured["second"], measured["third"]
    halves = lambda recs: sum((r["kind"] != "server-only") + (r["kind"] != "device-only") for r in recs)  # noqa: E731
    assert len(first["cuts"]) == FIRST_PASS_CUTS and not first["complete"]
    # the spread picks both ends: server-only and device-only
    assert {r["kind"] for r in first["cuts"]} >= {"server-only", "device-only"}
    assert first["measured_now"] == halves(first["cuts"]) + 1  # + the whole model
    assert second["measured_now"] == halves(second["cuts"]) - halves(first["cuts"])
    assert third["measured_now"] == 0 and third["cuts"] == second["cuts"]
    on_disk = json.loads(measured["cache"].read_text())
    assert on_disk["cuts"] == second["cuts"] and "measured_now" not in on_disk


def test_stale_cache_is_not_reused(measured):
    ct = _load("cut_times")
    doc = json.loads(measured["cache"].read_text())
    p = measured["plan"]
    from nasc.backends.targets import resolve_target

    key = ct.cache_key(p, resolve_target("llvm"))
    assert doc["key"] == key and ct.load_cache(measured["cache"], key)
    # times taken of other compiler code (another pipeline fingerprint) are stale too
    from nasc.backends.tvm import COMPILE_MODULES, pipeline_fingerprint

    assert key["pipeline"] == pipeline_fingerprint(COMPILE_MODULES) and len(key["pipeline"]) == 16
    # a half's end-to-end time does not depend on how kernels are timed in place: a change to
    # that code re-measures the kernel records, not the cut times
    assert "nasc.backends.context" not in COMPILE_MODULES and pipeline_fingerprint(COMPILE_MODULES) != pipeline_fingerprint()
    for field, value in (("source_sha256", "0" * 64), ("host_cpu", "another-cpu"), ("threads", key["threads"] + 1),
                         ("pipeline", "0" * 16)):
        assert ct.load_cache(measured["cache"], {**key, field: value}) == {}


def test_perfect_prediction_chooses_the_oracle(measured):
    sq = _load("split_quality")
    p, doc = measured["plan"], measured["second"]
    records = {r["index"]: r for r in doc["cuts"]}
    for link in map(defaults.LINK_PRESETS.get, sq.LINKS):
        for compress in sq.COMPRESS:
            preds = [sq.measured_prediction(records[c.index], link, compress) for c in p.cuts]
            for c, pr in zip(p.cuts, preds):
                assert pr.total_ms == pytest.approx(sq.measured_ms(records[c.index], link, compress))
            row = sq.evaluate(p.cuts, preds, records, link, compress)
            assert row["ratio"] == pytest.approx(1.0)
            assert row["chosen"]["measured_ms"] == pytest.approx(min(sq.measured_ms(r, link, compress) for r in records.values()), abs=1e-4)
            assert p.cuts[choose_fastest(p.cuts, preds)].index == row["chosen"]["index"]


def test_ratio_of_a_worse_choice(measured):
    """Predicting the reverse of the measurement picks the slowest cut: ratio = slowest / fastest."""
    sq = _load("split_quality")
    p, doc = measured["plan"], measured["second"]
    records = {r["index"]: r for r in doc["cuts"]}
    link = defaults.LINK_PRESETS["wifi"]
    ms = [sq.measured_ms(records[c.index], link, "none") for c in p.cuts]
    from nasc.types import Prediction

    reverse = [Prediction(0.0, -m, 0.0) for m in ms]
    row = sq.evaluate(p.cuts, reverse, records, link, "none")
    assert row["ratio"] == pytest.approx(max(ms) / min(ms)) and row["ratio"] > 1.0
    summary = sq.summarize([{"latency_model": "x", "ratio": 1.0}, {"latency_model": "x", "ratio": row["ratio"]}])
    assert summary["x"]["cases"] == 2 and summary["x"]["share_within_good_ratio"] == (0.5 if row["ratio"] > sq.GOOD_RATIO else 1.0)


def test_runs_writing_one_cache_keep_each_others_cuts(measured, tmp_path):
    """Two runs that measured different cuts of one model both end up in the cache."""
    ct = _load("cut_times")
    doc = measured["second"]
    path = tmp_path / "tiny.json"
    about = {"model": doc["model"], "config": None, "cuts_total": doc["cuts_total"]}
    ids = [ct.cut_id(r["kind"], r["tensors"]) for r in doc["cuts"]]
    mine = dict(zip(ids[::2], doc["cuts"][::2]))
    theirs = dict(zip(ids[1::2], doc["cuts"][1::2]))
    ct.save_cache(path, about, doc["key"], doc["whole_model"], theirs)
    whole, merged = ct.save_cache(path, about, doc["key"], None, mine)
    assert whole == doc["whole_model"] and set(merged) == set(ids)
    on_disk = json.loads(path.read_text())
    assert on_disk["complete"] and on_disk["cuts"] == doc["cuts"]


def test_an_in_place_record_is_rescaled_to_the_fastest_whole_run():
    """Sessions of one model keep the calls of one and the fastest whole run of all."""
    lm = _load("latency_model")
    doc = {"whole_ms": 5.7, "call_ms": 0.0, "scale": 1.4,
           "kernels": [{"tensor": "a", "ms": 1.4}, {"tensor": "b", "ms": 2.8}],
           "transforms": [{"tensor": "a", "ms": 1.4}]}       # raw calls: 1 + 2 + 1 = 4 ms
    out = lm.rescaled(doc, 4.4)
    assert out["scale"] == pytest.approx(1.1) and out["whole_ms"] == 4.4
    assert [k["ms"] for k in out["kernels"]] == pytest.approx([1.1, 2.2])
    assert sum(c["ms"] for c in [*out["kernels"], *out["transforms"]]) == pytest.approx(4.4)
    assert lm.rescaled(out, 4.4)["kernels"] == out["kernels"]   # idempotent
    assert doc["scale"] == 1.4 and doc["kernels"][0]["ms"] == 1.4  # the input is left as it was


def test_shares_of_the_whole_model_take_out_a_common_factor():
    """A mode that prices every half and the whole model 20% high prices every share exactly; a
    half it prices 20% high alone is 20% off as a share too."""
    lm = _load("latency_model")
    per_cut = {"head": [{"predicted_ms": 1.2, "measured_ms": 1.0}], "tail": [{"predicted_ms": 3.6, "measured_ms": 3.0}]}
    mode = {"per_cut": per_cut, "whole_predicted_ms": {"head": 4.8, "tail": 4.8}}
    exact = lm.share_errors([(mode, 4.0)])
    assert exact["n"] == 2 and exact["mape_pct"] == pytest.approx(0.0) and exact["within_10pct"] == 1.0
    off = lm.share_errors([({**mode, "whole_predicted_ms": {"head": 4.0, "tail": 4.8}}, 4.0)])
    assert off["mape_pct"] == pytest.approx(10.0) and off["mean_signed_pct"] == pytest.approx(10.0)


def test_sessions_keep_the_fastest_of_what_is_timed_apart():
    """The latency benchmark keeps one session's in-place record, and each half timed on its own
    and each crossing transform at the fastest of the sessions, as the cut times keep theirs."""
    lm = _load("latency_model")
    kept = {"kernels": [{"tensor": "y", "ms": 1.0}], "own_layouts": {"h1": 1.0, "h2": 2.0},
            "crossing": [{"tensor": "x", "to_blocked": True, "ms": 0.5},
                         {"tensor": "x", "to_blocked": False, "ms": 0.3}]}
    other = {"kernels": [{"tensor": "y", "ms": 0.5}], "own_layouts": {"h1": 0.8, "h2": 2.5},
             "crossing": [{"tensor": "x", "to_blocked": True, "ms": 0.4}]}
    merged = lm.fastest_apart(kept, other)
    assert merged["kernels"] == kept["kernels"]
    assert merged["own_layouts"] == {"h1": 0.8, "h2": 2.0}
    assert merged["crossing"] == [{"tensor": "x", "to_blocked": True, "ms": 0.4},
                                  {"tensor": "x", "to_blocked": False, "ms": 0.3}]
    assert kept["own_layouts"] == {"h1": 1.0, "h2": 2.0}   # the session's record is not changed


def test_the_speed_benchmark_keeps_each_rows_least_disturbed_session():
    """benchmarks/cpu_schedules.py: each row comes from the session whose ORT and nasc medians sum
    to least, with every session's ratio beside it; TVM's default pipeline, timed in the first
    session only, is carried over."""
    cs = _load("cpu_schedules")

    def row(name, ratio, ort_median, nasc_median, default=None):
        return cs.Row(name, 1.0, default, 1.0, ratio, default and 50.0, ort_median, nasc_median, 0.0, 1.0)

    first = [row("a", 0.86, 3.9, 3.9, default=100.0), row("b", 1.20, 1.0, 0.9, default=40.0)]
    second = [row("a", 1.04, 3.0, 2.8), row("b", 0.95, 1.5, 1.6)]
    a, b = cs.least_disturbed([first, second])
    assert (a.session, a.ort_over_nasc, a.ort_over_nasc_by_session) == (1, 1.04, (0.86, 1.04))
    assert (a.tvm_default_ms, a.default_over_nasc) == (100.0, 50.0)
    assert (b.session, b.ort_over_nasc, b.ort_over_nasc_by_session) == (0, 1.20, (1.20, 0.95))
