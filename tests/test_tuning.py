"""MetaSchedule tuning DB: keying, records, skipping tuned kernels, budgets, compile with the DB, RPC."""

from __future__ import annotations

import json
import socket
import time

import numpy as np
import pytest

from nasc.backends import ort, tuning
from nasc.backends.targets import resolve_target
from nasc.cli.tune import main as tune_main
from nasc.cli.tune import model_to_tune
from nasc.errors import NascError

pytestmark = pytest.mark.slow

TRIALS = 2
SEARCH_TRIALS = 64         # more than a short budget reaches
NO_TIME_S = 1.0            # spent before the search starts (the build and run workers alone start slower)
SEARCH_BUDGET_S = 30.0     # the defaults of a DB that holds them, then some rounds
ROUND_IN_FLIGHT_S = 60.0   # what a budget may be overrun by: the round drawn, built and run when it ran out
ONE_KERNEL_SPLIT = "2"     # tiny's head at cut 2 is one fused conv kernel: the cheapest real tuning
MANY_KERNEL_SPLIT = "7"    # several kernels
# tiny's tail at cut 9 is its classifier alone; its tail at cut 2 runs the classifier too, after
# convs. (The head at cut 2 shares no kernel with larger heads: alone, its stem writes plain
# NCHW; beside blocked convs, it writes their blocked layout.)
CLASSIFIER_TAIL_SPLIT, LONG_TAIL_SPLIT = "9", "2"


@pytest.fixture(scope="module", autouse=True)
def _two_threads(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    mp.setenv("TVM_NUM_THREADS", "2")
    yield
    mp.undo()


@pytest.fixture(scope="module")
def llvm():
    return resolve_target("llvm")


@pytest.fixture(scope="module")
def tuned_db(tmp_path_factory, llvm):
    """One real tuning run of tiny's one-kernel head, shared by the tests below."""
    db = tmp_path_factory.mktemp("tuning-db")
    model = model_to_tune("example:tiny", ONE_KERNEL_SPLIT, "head")
    report = tuning.tune(model, llvm, db, trials=TRIALS)
    return db, model, report


def test_db_key_separates_targets(tmp_path):
    a = resolve_target({"kind": "llvm", "mcpu": "znver3"})
    b = resolve_target({"kind": "llvm", "mcpu": "skylake"})
    c = resolve_target({"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon"], "mcpu": "cortex-a72"})
    d = resolve_target({"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon"], "mcpu": "cortex-a76"})
    keys = {tuning.db_key(t) for t in (a, b, c, d)}
    assert len(keys) == 4
    assert tuning.db_key(a) == tuning.db_key(resolve_target({"mcpu": "znver3", "kind": "llvm"}))
    # native CPU targets also hash this machine's CPU model; cross targets only their dict
    assert tuning.db_identity(a)["host_cpu"] == tuning.host_cpu_model()
    assert "host_cpu" not in tuning.db_identity(c)
    assert tuning.open_database(tmp_path, a) is None


def test_parse_rpc():
    assert tuning.parse_rpc("127.0.0.1:9190:rasp4") == tuning.RpcTracker("127.0.0.1", 9190, "rasp4")
    for bad in ("host:key", "host:port:key", ":9190:k", "h:9190:"):
        with pytest.raises(NascError, match="HOST:PORT:KEY"):
            tuning.parse_rpc(bad)


def test_tuning_writes_records(tuned_db, llvm):
    db, model, report = tuned_db
    assert report.stopped == "done"
    assert report.trials_measured >= 1
    assert all(k.best_s is not None and k.trials >= 1 and not k.skipped for k in report.kernels)
    path = tuning.db_path(db, llvm)
    assert (path / tuning.RECORD_FILE).stat().st_size > 0
    assert json.loads((path / tuning.TARGET_FILE).read_text()) == tuning.db_identity(llvm)
    times = tuning.tuned_kernel_times(db, llvm)
    assert {k.workload_key for k in report.kernels} <= set(times)
    assert all(0 < s < 1 for s in times.values())
    names = tuning.kernel_names(db, llvm)
    assert {names[k.workload_key] for k in report.kernels} == {k.name for k in report.kernels}


def test_tuning_starts_from_the_default_schedules(tuned_db, llvm):
    """Each kernel's default schedule is measured and committed first: the search starts from it and the
    DB's best is never slower than the untuned kernel."""
    import tvm_ffi
    from tvm import tirx
    from tvm.s_tir import dlight as dl

    from nasc.backends.tvm import default_schedule_rules

    db, model, report = tuned_db
    assert all(k.default_s is not None and 0 < k.best_s <= k.default_s for k in report.kernels)
    with llvm.tvm():   # passes may update a module in place: each gets its own
        want = dl.ApplyDefaultSchedule(*default_schedule_rules(llvm))(tuning.fused_module(model, llvm))
    replays_default = []
    for got in _replayed_records(db, model, llvm):
        replays_default.append(all(tvm_ffi.structural_equal(f, want[gv.name_hint]) for gv, f in got.functions_items()
                                   if isinstance(f, tirx.PrimFunc)))
    # the default is committed before the search, which never sends a schedule the DB holds
    assert replays_default.count(True) == 1, "one record is the pipeline's default schedule"


def _replayed_records(db, model, llvm) -> list:
    """`model`'s fused module compiled with each record of `db` alone, one module per record."""
    from tvm import relax
    from tvm.s_tir import meta_schedule as ms

    out = []
    for rec in tuning.open_database(db, llvm).get_all_tuning_records():
        one = ms.database.MemoryDatabase()
        one.commit_tuning_record(ms.database.TuningRecord(rec.trace, one.commit_workload(rec.workload.mod),
                                                          rec.run_secs, rec.target, rec.args_info))
        with llvm.tvm(), one:
            out.append(relax.transform.MetaScheduleApplyDatabase()(tuning.fused_module(model, llvm)))
    return out


def test_no_schedule_is_measured_twice(tmp_path, llvm):
    """An elementwise kernel has a handful of schedules: the first run measures those its default
    is not, and a second run asking for more finds only schedules the DB holds and measures none
    (the search seeds its population with the DB's records and used to measure them again)."""
    import tvm_ffi
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64, 8, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 64, 8, 8])
    nodes = [helper.make_node("Relu", ["x"], ["r"]), helper.make_node("Add", ["r", "x"], ["y"])]
    model = helper.make_model(helper.make_graph(nodes, "relu_add", [x], [y]), opset_imports=[helper.make_opsetid("", 17)])
    first = tuning.tune(model, llvm, tmp_path, trials=8)
    again = tuning.tune(model, llvm, tmp_path, trials=16)
    assert len(first.kernels) == 1 and first.trials_measured >= 1
    assert again.trials_measured == 0 and again.stopped == "done"
    modules = _replayed_records(tmp_path, model, llvm)
    assert len(modules) == 1 + first.trials_measured   # and the default schedule
    for i, a in enumerate(modules):
        assert not any(tvm_ffi.structural_equal(a, b) for b in modules[i + 1:]), f"record {i} was measured twice"


def test_trials_are_a_total_per_kernel(tuned_db, llvm, tmp_path):
    """Asking for one trial more than a kernel has measures one: a later run adds what is missing."""
    import shutil

    db, model, first = tuned_db
    copy = tmp_path / "db"
    shutil.copytree(db, copy)
    more = tuning.tune(model, llvm, copy, trials=TRIALS + 1)
    assert first.trials_measured == TRIALS
    assert more.trials_measured == 1
    assert [k.trials for k in more.kernels] == [k.trials + 1 for k in first.kernels]   # records in the DB


def test_a_kernel_with_only_its_default_record_counts_as_untuned(tuned_db, llvm, tmp_path):
    import shutil

    db, model, report = tuned_db
    copy = tmp_path / "db"
    shutil.copytree(db, copy)
    assert tuning.kernel_coverage(model, llvm, copy)["untuned"] == []
    index_file = tuning.db_path(copy, llvm) / tuning.INDEX_FILE
    index = json.loads(index_file.read_text())
    for entry in index.values():
        entry["trials"] = 0
    index_file.write_text(json.dumps(index))
    assert tuning.kernel_coverage(model, llvm, copy)["untuned"] == [k.name for k in report.kernels]


def test_rerun_skips_tuned_kernels(tuned_db, llvm):
    db, model, first = tuned_db
    records_before = (tuning.db_path(db, llvm) / tuning.RECORD_FILE).read_text()
    again = tuning.tune(model, llvm, db, trials=TRIALS)
    assert again.stopped == "nothing-to-tune"
    assert again.trials_measured == 0
    assert all(k.skipped for k in again.kernels)
    assert (tuning.db_path(db, llvm) / tuning.RECORD_FILE).read_text() == records_before
    # another target never sees these records
    other = resolve_target({"kind": "llvm", "mcpu": "skylake"})
    assert tuning.tuned_kernel_times(db, other) == {}


def test_compile_with_db_matches_ort_and_reports_kernels(tuned_db, tmp_path):
    from nasc.backends import tvm as tvm_backend
    from nasc.compile import compile_model, sample_inputs

    db, model, report = tuned_db
    m = compile_model("example:tiny", tmp_path / "art", split=ONE_KERNEL_SPLIT, server_target="llvm", tuning_db=db)
    head = m["head"]["tuning"]
    assert head["db"] is not None
    assert set(head["tuned"]) == {k.name for k in report.kernels} and head["untuned"] == []
    tail = m["tail"]["tuning"]
    assert tail["tuned"] == [] and tail["untuned"], "the tail's kernels were never tuned"
    # the compiled head with tuned schedules equals ORT on the same ONNX head
    lib = tvm_backend.load_library(tmp_path / "art" / "head" / tvm_backend.LIBRARY_NAME)
    ins = [s["name"] for s in m["head"]["inputs"]]
    outs = [s["name"] for s in m["head"]["outputs"]]
    run = tvm_backend.Runner(lib, "cpu", ins, outs)
    for feeds in sample_inputs(model, 2):
        want = ort.run(model, feeds)
        got = run(feeds)
        for n in outs:
            np.testing.assert_allclose(got[n], want[n], atol=1e-4, rtol=1e-4)


def test_time_budget_keeps_records_and_resumes(tuned_db, llvm):
    db, _, _ = tuned_db
    first = tuning.tune(model_to_tune("example:tiny", CLASSIFIER_TAIL_SPLIT, "tail"), llvm, db, trials=TRIALS)
    shared = {k.workload_key for k in first.kernels}
    model = model_to_tune("example:tiny", LONG_TAIL_SPLIT, "tail")

    # out of time before the search begins: the default schedules are measured and kept, no round is drawn
    no_time = tuning.tune(model, llvm, db, trials=TRIALS, time_budget_s=NO_TIME_S)
    assert no_time.stopped == "time-budget" and no_time.trials_measured == 0
    assert any(k.skipped and k.workload_key in shared for k in no_time.kernels), "a kernel tuned for another tail is reused"
    own = [k for k in no_time.kernels if not k.skipped]
    assert own and all(k.default_s and k.trials == 1 for k in own), "each default schedule is a committed record"
    assert {k.workload_key for k in own} <= set(tuning.tuned_kernel_times(db, llvm))

    # out of time mid-search: rounds drawn before the budget ran out are measured and committed,
    # none is drawn after it
    seen = []
    cut_short = tuning.tune(model, llvm, db, trials=SEARCH_TRIALS, time_budget_s=SEARCH_BUDGET_S, progress=seen.append)
    assert cut_short.stopped == "time-budget"
    etas = [p for p in seen if p.eta_s is not None]
    assert etas and all(p.eta_s <= max(0.0, SEARCH_BUDGET_S - p.elapsed_s) + 1.0 for p in etas), "no ETA past the budget"
    assert cut_short.elapsed_s < SEARCH_BUDGET_S + ROUND_IN_FLIGHT_S
    assert 0 < cut_short.trials_measured < SEARCH_TRIALS * len(own)
    searched = [k for k in cut_short.kernels if k.trials > 1]
    assert searched and all(k.best_s <= k.default_s for k in searched)

    # a later run takes up exactly the kernels whose search is unfinished
    index = json.loads((tuning.db_path(db, llvm) / tuning.INDEX_FILE).read_text())
    unfinished = {k.workload_key for k in cut_short.kernels if index[k.workload_key]["requested"] < SEARCH_TRIALS}
    resumed = tuning.tune(model, llvm, db, trials=SEARCH_TRIALS, time_budget_s=NO_TIME_S)
    assert unfinished and {k.workload_key for k in resumed.kernels if not k.skipped} == unfinished


def test_time_share_searches_the_kernels_that_carry_the_time(tmp_path, llvm):
    model = model_to_tune("example:tiny", MANY_KERNEL_SPLIT, "head")
    report = tuning.tune(model, llvm, tmp_path, trials=TRIALS, time_share=0.01)
    assert all(k.default_s for k in report.kernels), "every kernel's default schedule was measured"
    searched = [k for k in report.kernels if not k.deferred]
    assert len(searched) == 1 and len(report.kernels) > 1
    assert searched[0].weight * searched[0].default_s == max(k.weight * k.default_s for k in report.kernels)
    assert all(k.trials == 1 and not k.skipped for k in report.kernels if k.deferred), "deferred: default record only"
    # deferred kernels are taken up by a later run that covers all the time
    again = tuning.tune(model, llvm, tmp_path, trials=TRIALS)
    assert {k.name for k in again.kernels if not k.skipped} == {k.name for k in report.kernels if k.deferred}
    with pytest.raises(NascError, match="time-share"):
        tuning.tune(model, llvm, tmp_path, time_share=0)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_rpc_loopback_tuning(tmp_path, llvm):
    pytest.importorskip("tornado", reason="the RPC tracker needs tornado")
    from tvm import rpc
    from tvm.rpc.tracker import Tracker

    port = _free_port()
    tracker = Tracker(host="127.0.0.1", port=port, port_end=port + 1, silent=True)
    server = rpc.Server(host="127.0.0.1", port=_free_port(), port_end=65000, tracker_addr=("127.0.0.1", tracker.port),
                        key="nasc-test", silent=True)
    try:
        deadline = time.monotonic() + 30
        while not rpc.connect_tracker("127.0.0.1", tracker.port).summary()["server_info"]:
            assert time.monotonic() < deadline, "the RPC server never registered with the tracker"
            time.sleep(0.2)
        code = tune_main(["example:tiny", "--target", "llvm", "--db", str(tmp_path), "--split", ONE_KERNEL_SPLIT,
                          "--trials", str(TRIALS), "--rpc", f"127.0.0.1:{tracker.port}:nasc-test", "-q"])
        assert code == 0
        times = tuning.tuned_kernel_times(tmp_path, llvm)
        assert times and all(0 < s < 1 for s in times.values())
        # a key no server registered is one clear error, not a hang
        assert tune_main(["example:tiny", "--target", "llvm", "--db", str(tmp_path / "x"), "--split", ONE_KERNEL_SPLIT,
                          "--rpc", f"127.0.0.1:{tracker.port}:no-such-device", "-q"]) == 2
    finally:
        server.terminate()
        tracker.terminate()
