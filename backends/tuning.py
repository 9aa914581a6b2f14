"""MetaSchedule tuning of a model's kernels into a persistent database shared across models.

The database lives in DB_DIR/<target key>/ (TVM JSON tables plus a small kernel index); the key
hashes the TVM target dict and, for native CPU targets, the host CPU model, so records measured
on one machine are never applied to another. `nasc-compile --tuning-db` applies it.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import math
import os
import platform
import tempfile
import time
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Callable

from onnx import ModelProto

from nasc.backends.targets import Target
from nasc.errors import NascError, TargetError

# Budgets and timeouts, named in one place.
DEFAULT_TRIALS_PER_KERNEL = 64
MAX_TRIALS_PER_ITER = 16         # candidates per scheduling round; smaller rounds react to the time budget sooner
BUILD_TIMEOUT_S = 120.0          # one candidate's LLVM build on a busy 2-core machine
RUN_TIMEOUT_S = 30.0             # one candidate's measurement (also the RPC session timeout)
FLUSHED_REPEATS = 10             # runs per CPU candidate, each on flushed caches (`_evaluator`)
BUILD_WORKER_USES = 64           # recycle build workers: TVM's pool leaks memory over many builds
MODULE_EQUALITY = "structural"   # how workloads are matched between tuning and compiling
DEFAULT_SEED = 0
TASK_SCHEDULER = "gradient"
COST_MODEL = "xgb"
# Evolutionary search population per trial asked, clamped. Drawing a round of 16 candidates for
# a ResNet-18 conv took 24 s with TVM's 512 and 6 s with 128 on 2 cores, where building and
# running them takes 4-6 s: the population, not the measurement, set the pace of a search.
POPULATION_PER_TRIAL = 16
POPULATION_MIN, POPULATION_MAX = 64, 128
# Rounds in a row that bring only schedules the database holds before a kernel's search counts
# as exhausted (each round is a fresh evolution; the search never repeats what it sent).
KNOWN_ROUNDS_BEFORE_EXHAUSTED = 3
LAST_PASS_BEFORE_SCHEDULING = "fuse-tir"  # tuning tasks and the database see the fused PrimFuncs
# MetaSchedule's CUDA rules read these per-block limits from the target; they hold for every
# NVIDIA GPU since sm_50 (the compile target leaves them to TVM's defaults).
CUDA_BLOCK_LIMITS = {"max_threads_per_block": 1024, "max_shared_memory_per_block": 48 * 1024,
                     "registers_per_block": 65536, "thread_warp_size": 32}

WORKLOAD_FILE = "database_workload.json"
RECORD_FILE = "database_tuning_record.json"
INDEX_FILE = "kernels.json"
TARGET_FILE = "target.json"
_NO_RUN_S = 1e9                  # MetaSchedule stores failed runs as 1e10 seconds


# ---------------------------------------------------------------------------------------
# value types


@dataclass(frozen=True)
class RpcTracker:
    """Where candidates are measured remotely: a TVM RPC tracker and the device key registered with it."""

    host: str
    port: int
    key: str

    def __str__(self) -> str:
        return f"{self.host}:{self.port}:{self.key}"


@dataclass(frozen=True)
class KernelStatus:
    """One kernel (fused PrimFunc) of a model: its workload key, trials in the DB, best measured time."""

    name: str
    workload_key: str
    weight: int
    trials: int
    best_s: float | None
    skipped: bool = False
    default_s: float | None = None   # the default schedule, measured as tuning measures candidates
    deferred: bool = False           # left out of this run's search by `time_share`: default kept


@dataclass(frozen=True)
class TuneProgress:
    """A snapshot passed to the progress callback after each measured batch."""

    kernels_done: int
    kernels_total: int
    trials_done: int
    trials_total: int
    elapsed_s: float
    eta_s: float | None
    kernel: str
    best_s: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class TuneReport:
    """What one tuning run did: per-kernel status, new trials measured, why it stopped."""

    db_path: Path
    target: str
    kernels: list[KernelStatus]
    trials_measured: int
    elapsed_s: float
    stopped: str                 # "done" | "time-budget" | "nothing-to-tune"

    @property
    def tuned(self) -> list[KernelStatus]:
        return [k for k in self.kernels if k.best_s is not None]

    def to_json(self) -> dict:
        return {
            "db": str(self.db_path), "target": self.target, "trials_measured": self.trials_measured,
            "elapsed_s": round(self.elapsed_s, 3), "stopped": self.stopped,
            "kernels": [k.__dict__ for k in self.kernels],
        }


def parse_rpc(text: str) -> RpcTracker:
    """`HOST:PORT:KEY` -> RpcTracker; NascError naming the text otherwise."""
    parts = text.rsplit(":", 2)
    if len(parts) != 3 or not parts[0] or not parts[2] or not parts[1].isdigit():
        raise NascError(f"--rpc '{text}': expected HOST:PORT:KEY, e.g. 192.168.1.10:9190:rasp4")
    return RpcTracker(parts[0], int(parts[1]), parts[2])


# ---------------------------------------------------------------------------------------
# database location and keying


def host_cpu_model() -> str:
    """The CPU model string of this machine (/proc/cpuinfo), so a changed CPU gets a fresh DB."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith(("model name", "hardware", "cpu model")):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def db_identity(target: Target) -> dict:
    """What a DB is keyed on: the full TVM target dict, plus the host CPU model for native CPUs."""
    ident = {"target": target.spec}
    if target.kind == "llvm" and target.triple is None:
        ident["host_cpu"] = host_cpu_model()
    return ident


def db_key(target: Target) -> str:
    """`<name>-<hash of db_identity>`: the folder of `target`'s records inside a DB directory."""
    digest = hashlib.sha256(json.dumps(db_identity(target), sort_keys=True).encode()).hexdigest()[:16]
    return f"{target.name}-{digest}"


def db_path(db_dir: str | Path, target: Target) -> Path:
    return Path(db_dir) / db_key(target)


def open_database(db_dir: str | Path, target: Target, create: bool = False):
    """The JSON database for `target` under db_dir, or None when nothing was tuned for it."""
    from tvm.s_tir import meta_schedule as ms

    path = db_path(db_dir, target)
    if not (path / WORKLOAD_FILE).is_file():
        if not create:
            return None
        path.mkdir(parents=True, exist_ok=True)
        _write_json(path / TARGET_FILE, db_identity(target))
    return ms.database.JSONDatabase(str(path / WORKLOAD_FILE), str(path / RECORD_FILE), module_equality=MODULE_EQUALITY)


def _write_json(path: Path, obj) -> None:
    """Atomic: a reader (or an interrupted run) never sees half a file."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, sort_keys=True))
    os.replace(tmp, path)


def _read_index(path: Path) -> dict:
    try:
        return json.loads((path / INDEX_FILE).read_text())
    except (OSError, ValueError):
        return {}


# ---------------------------------------------------------------------------------------
# kernels of a model


def fast_tensor_intrinsics() -> None:
    """Import TVM's tensor intrinsics in seconds rather than minutes.

    Each of their ~500 TVMScript functions calls inspect.stack(); for frames of frozen import
    machinery and exec'd code `inspect.getmodule` then scans every loaded module (~2000 under
    TVM), which makes MetaSchedule's first TuneContext and every build worker pay 1-2 minutes.
    Registering those pseudo-files with the modules they belong to (builtins for exec'd code,
    which has no source either way) keeps the scan out of it; the stack it returns is unchanged.
    """
    for pseudo, module in (("<frozen importlib._bootstrap>", "importlib._bootstrap"),
                           ("<frozen importlib._bootstrap_external>", "importlib._bootstrap_external"),
                           ("<string>", "builtins"), ("<ast>", "builtins")):
        inspect.modulesbyfile.setdefault(os.path.normcase(os.path.abspath(pseudo)), module)
    import tvm.s_tir.tensor_intrin  # noqa: F401


def tuning_target(target: Target, num_cores: int | None = None):
    """The TVM target MetaSchedule tunes for: the compile target plus what its rules need
    (the core count on CPUs, the per-block limits on CUDA)."""
    import tvm

    spec = dict(target.spec)
    if target.kind == "llvm" and "num-cores" not in spec:
        spec["num-cores"] = num_cores or _physical_cores()
    if target.kind == "cuda":
        spec = {**CUDA_BLOCK_LIMITS, **spec}
    return tvm.target.Target(spec)


def _physical_cores() -> int:
    try:
        import psutil

        return psutil.cpu_count(logical=False) or 1
    except ImportError:
        return os.cpu_count() or 1


def fused_module(model: ModelProto, target: Target, where: str = "model"):
    """The Relax module after legalisation and fusion: exactly what the compile pipeline schedules."""
    from nasc.backends.tvm import import_for_target, pipeline

    mod = import_for_target(model, target, where)
    with target.tvm():
        for name, p in pipeline(target):
            mod = p(mod)
            if name == LAST_PASS_BEFORE_SCHEDULING:
                return mod
    raise AssertionError(f"pipeline for {target.name} has no {LAST_PASS_BEFORE_SCHEDULING} step")


def extract_kernels(model: ModelProto, target: Target, where: str = "model", num_cores: int | None = None) -> list:
    """MetaSchedule tasks (one per distinct fused PrimFunc), in a stable order."""
    from tvm.s_tir import meta_schedule as ms

    tasks = ms.relax_integration.extract_tasks(fused_module(model, target, where), tuning_target(target, num_cores),
                                               module_equality=MODULE_EQUALITY)
    return sorted(tasks, key=lambda t: t.task_name)


def workload_key(mod) -> str:
    """Stable hex key of a kernel's workload (its structural hash), shared across models."""
    import tvm_ffi

    return f"{tvm_ffi.structural_hash(mod) & (2**64 - 1):016x}"


def _best_s(db, mod) -> tuple[int, float | None]:
    if not db.has_workload(mod):
        return 0, None
    recs = db.get_top_k(db.commit_workload(mod), 1 << 20)
    times = [sum(float(x) for x in r.run_secs) / len(r.run_secs) for r in recs if r.run_secs]
    times = [t for t in times if t < _NO_RUN_S]
    return len(recs), (min(times) if times else None)


def kernel_coverage(model: ModelProto, target: Target, db_dir: str | Path | None, where: str = "model") -> dict:
    """{"tuned": [...], "untuned": [...]} kernel names of `model` for `target` against the DB."""
    db = open_database(db_dir, target) if db_dir else None
    index = _read_index(db_path(db_dir, target)) if db is not None else {}
    tuned, untuned = [], []
    for t in extract_kernels(model, target, where):
        # a kernel whose only record is its measured default schedule was never searched
        searched = index.get(workload_key(t.dispatched[0]), {}).get("trials", 1) > 0
        ok = db is not None and searched and _best_s(db, t.dispatched[0])[1] is not None
        (tuned if ok else untuned).append(t.task_name)
    return {"db": str(db_path(db_dir, target)) if db is not None else None, "tuned": tuned, "untuned": untuned}


def tuned_kernel_times(db_dir: str | Path, target: Target | str) -> dict[str, float]:
    """{workload_key: best measured seconds} for every kernel in the DB of `target`.

    Keys are structural workload keys (the same kernel in two models shares one);
    `kernel_names(db_dir, target)` maps them to the kernel names tuning runs saw.
    """
    from nasc.backends.targets import resolve_target

    t = resolve_target(target) if not isinstance(target, Target) else target
    db = open_database(db_dir, t)
    if db is None:
        return {}
    best: dict[str, float] = {}
    for r in db.get_all_tuning_records():
        if not r.run_secs:
            continue
        s = sum(float(x) for x in r.run_secs) / len(r.run_secs)
        if s >= _NO_RUN_S:
            continue
        k = workload_key(r.workload.mod)
        best[k] = min(best.get(k, s), s)
    return best


def kernel_names(db_dir: str | Path, target: Target) -> dict[str, str]:
    """{workload_key: kernel name} as recorded by tuning runs."""
    return {k: v["name"] for k, v in _read_index(db_path(db_dir, target)).items()}


# ---------------------------------------------------------------------------------------
# builder: persistent workers


def _prepare_build_worker() -> None:
    fast_tensor_intrinsics()


def _build_one(mod, target, cross_cc: str | None, cuda_arch: str | None, scratch: str) -> str:
    """Build one candidate in a worker and export it to a .so in a fresh folder under `scratch`;
    returns its path. CUDA kernels are packed as an nvcc fatbin, exactly as compiled libraries ship them."""
    from tvm.s_tir.meta_schedule.builder.local_builder import default_build

    rt_mod = default_build(mod, target, None)
    path = os.path.join(tempfile.mkdtemp(dir=scratch), "kernel.so")
    if cuda_arch:
        from nasc.backends.cuda import fatbin_packer

        rt_mod.export_library(path, fpack_imports=fatbin_packer(cuda_arch))
    elif cross_cc:
        import tvm.support

        rt_mod.export_library(path, fcompile=tvm.support.cc.cross_compiler(cross_cc))
    else:
        rt_mod.export_library(path)
    return path


def _make_builder(max_workers: int, cross_cc: str | None, cuda_arch: str | None, scratch: str):
    """A MetaSchedule builder whose worker processes live across batches and build into `scratch`.

    TVM's LocalBuilder starts fresh workers for every batch, and each pays the TVM import plus
    the tensor-intrinsic parse; here workers start once (fast path) and are recycled after
    BUILD_WORKER_USES builds.
    """
    from tvm.ir.utils import derived_object
    from tvm.s_tir.meta_schedule.builder import BuilderResult, PyBuilder
    from tvm.support.popen_pool import PopenPoolExecutor, StatusKind

    @derived_object
    class _PersistentBuilder(PyBuilder):
        def __init__(self):
            super().__init__()
            self.pool = PopenPoolExecutor(max_workers=max_workers, timeout=BUILD_TIMEOUT_S,
                                          initializer=_prepare_build_worker, maximum_process_uses=BUILD_WORKER_USES)

        def build(self, build_inputs):
            out = []
            for r in self.pool.map_with_error_catching(lambda b: _build_one(b.mod, b.target, cross_cc, cuda_arch, scratch), build_inputs):
                if r.status == StatusKind.COMPLETE:
                    out.append(BuilderResult(r.value, None))
                elif r.status == StatusKind.TIMEOUT:
                    out.append(BuilderResult(None, f"build timed out after {BUILD_TIMEOUT_S:g} s"))
                else:
                    out.append(BuilderResult(None, f"build failed: {r.value}"))
            return out

    return _PersistentBuilder()


def _default_schedule(mod, target, rules):
    """The schedule the compile pipeline's default rules give `mod`'s PrimFunc, or None if no rule applies."""
    func = mod["main"]
    for rule in rules:
        sch = rule.apply(func, target, False)
        if isinstance(sch, list):
            sch = sch[0] if sch else None
        if sch is not None:
            return sch
    return None


def _measure_defaults(workloads: list, target: Target, ttarget, builder, runner, db) -> list[float | None]:
    """Measure each workload's default schedule like a tuning candidate and commit it as a record.

    The search then starts from it (EvolutionarySearch seeds its population with the DB's best),
    and the DB's best record for a kernel is never slower than the untuned kernel. Returns the
    measured seconds per workload (None where no rule applies or the build or run failed).
    """
    import shutil

    from tvm.s_tir import meta_schedule as ms

    from nasc.backends.tvm import default_schedule_rules

    rules = default_schedule_rules(target)
    with ttarget:
        schedules = [_default_schedule(mod, ttarget, rules) for mod in workloads]
    todo = [i for i, sch in enumerate(schedules) if sch is not None]
    args = {i: ms.arg_info.ArgInfo.from_entry_func(schedules[i].mod, remove_preproc=True) for i in todo}
    built = builder.build([ms.builder.BuilderInput(schedules[i].mod, ttarget) for i in todo])
    ran = [i for i, b in zip(todo, built) if b.error_msg is None]
    futures = runner.run([ms.runner.RunnerInput(b.artifact_path, target.device, args[i])
                          for i, b in zip(todo, built) if b.error_msg is None])
    seconds: list[float | None] = [None] * len(workloads)
    for i, fut in zip(ran, futures):
        res = fut.result()
        secs = [float(x) for x in res.run_secs or []]
        if res.error_msg is None and secs and max(secs) < _NO_RUN_S:
            db.commit_tuning_record(ms.database.TuningRecord(
                schedules[i].trace, db.commit_workload(workloads[i]), res.run_secs, ttarget, args[i]))
            seconds[i] = sum(secs) / len(secs)
    for b in built:
        if b.artifact_path:
            shutil.rmtree(os.path.dirname(b.artifact_path), ignore_errors=True)
    return seconds


def _evaluator(target: Target):
    """How a candidate is timed. On a CPU, each run starts with every argument but the first (the
    kernel's input) flushed from the caches, as inside a model, where the weights were last read
    a whole forward pass ago. Timed hot, the search picked schedules that re-read weights from
    cache: ResNet-18 tuned for 600 s ran 1.56x slower than its default schedules, and 1.04x
    slower with the flush (in place, interleaved, 2 threads)."""
    from tvm.s_tir import meta_schedule as ms

    if target.kind == "cuda":
        return None
    return ms.runner.EvaluatorConfig(number=1, repeat=FLUSHED_REPEATS, min_repeat_ms=0, enable_cpu_cache_flush=True)


def _make_runner(target: Target, rpc: RpcTracker | None):
    from tvm.s_tir import meta_schedule as ms

    if rpc is None:
        if not target.runs_here():
            raise TargetError(f"target '{target.name}' cannot run on this machine: measure on the device with --rpc HOST:PORT:KEY")
        return ms.runner.LocalRunner(timeout_sec=RUN_TIMEOUT_S, evaluator_config=_evaluator(target))
    cfg = ms.runner.RPCConfig(tracker_host=rpc.host, tracker_port=rpc.port, tracker_key=rpc.key,
                              session_timeout_sec=int(RUN_TIMEOUT_S))
    try:
        found = cfg.count_num_servers(allow_missing=True)
    except ValueError:
        raise NascError(f"--rpc {rpc}: no RPC tracker answers at {rpc.host}:{rpc.port}") from None
    if found == 0:
        raise NascError(f"--rpc {rpc}: the tracker has no server registered with key '{rpc.key}'")
    return ms.runner.RPCRunner(rpc_config=cfg, evaluator_config=_evaluator(target), max_workers=1)


# ---------------------------------------------------------------------------------------
# tuning


def tune(
    model: ModelProto,
    target: Target,
    db_dir: str | Path,
    *,
    trials: int = DEFAULT_TRIALS_PER_KERNEL,
    time_budget_s: float | None = None,
    rpc: RpcTracker | None = None,
    num_cores: int | None = None,
    seed: int = DEFAULT_SEED,
    where: str = "model",
    time_share: float = 1.0,
    progress: Callable[[TuneProgress], None] | None = None,
) -> TuneReport:
    """Tune every kernel of `model` for `target` that the DB does not already cover with `trials` trials.

    Each kernel's default schedule is measured first. With `time_share` below 1, only the kernels
    that, largest first by measured default time x uses, make up that share of the model's time
    are searched; the others keep their default schedules (`deferred`) and a later run with a
    larger share takes them up. Records are committed as they are measured, so an interruption
    (Ctrl-C, a time budget) keeps them. `trials` is a total per kernel: a later run gives each
    kernel still short of it the trials it lacks.
    """
    from tvm.ir.utils import derived_object
    from tvm.s_tir import meta_schedule as ms

    if trials < 1:
        raise NascError(f"--trials {trials}: must be at least 1")
    if time_budget_s is not None and time_budget_s <= 0:
        raise NascError(f"--time-budget {time_budget_s}: must be positive seconds")
    if not 0 < time_share <= 1:
        raise NascError(f"--time-share {time_share}: must be in (0, 1]")
    t0 = time.perf_counter()
    tasks = extract_kernels(model, target, where, num_cores)
    db = open_database(db_dir, target, create=True)
    path = db_path(db_dir, target)
    index = _read_index(path)
    keys = [workload_key(t.dispatched[0]) for t in tasks]
    todo = [i for i, k in enumerate(keys) if index.get(k, {}).get("requested", 0) < trials]
    for i, k in enumerate(keys):
        index.setdefault(k, {"name": tasks[i].task_name, "trials": 0, "requested": 0})

    measured = {keys[i]: 0 for i in todo}
    deferred: list[int] = []
    best: dict[str, float] = {}
    state = {"stopped": "done" if todo else "nothing-to-tune"}
    deadline = t0 + time_budget_s if time_budget_s is not None else math.inf

    def out_of_time() -> bool:
        if time.perf_counter() < deadline:
            return False
        state["stopped"] = "time-budget"
        return True

    if todo:
        with tempfile.TemporaryDirectory(prefix="nasc-tune-") as scratch:
            fast_tensor_intrinsics()
            ttarget = tuning_target(target, num_cores)
            cross_cc = target.cross_compiler
            runner = _make_runner(target, rpc)
            builder = _make_builder(_physical_cores(), cross_cc, target.spec.get("arch") if target.kind == "cuda" else None,
                                    scratch)
            unseeded = [i for i in todo if "default_s" not in index[keys[i]]]
            if unseeded:
                if progress:
                    progress(TuneProgress(0, len(todo), 0, trials * len(todo), time.perf_counter() - t0, None,
                                          "measuring default schedules"))
                for i, s in zip(unseeded, _measure_defaults([tasks[i].dispatched[0] for i in unseeded], target,
                                                             ttarget, builder, runner, db)):
                    index[keys[i]]["default_s"] = s
                _write_json(path / INDEX_FILE, index)
            todo, deferred = _focus(todo, [tasks[i].weight for i in range(len(tasks))],
                                    [index[k].get("default_s") for k in keys], time_share)
            measured = {keys[i]: 0 for i in todo}
            # `trials` is a total per kernel: a kernel searched before, or cut short, gets the rest
            wanted = {keys[i]: max(1, trials - index[keys[i]]["trials"]) for i in todo}
            contexts = [
                ms.TuneContext(mod=tasks[i].dispatched[0], target=ttarget, space_generator="post-order-apply",
                               search_strategy=_search_strategy(tasks[i].dispatched[0], ttarget, trials, wanted[keys[i]],
                                                                out_of_time),
                               task_name=tasks[i].task_name, logger=ms.logging.get_logger(f"nasc.tune.{i}"),
                               rand_state=seed + i, num_threads=_physical_cores()).clone()
                for i in todo
            ]
            _quiet_loggers()
            total = sum(wanted.values())

            @derived_object
            class _Progress(ms.measure_callback.PyMeasureCallback):
                """Counts trials, keeps the kernel index current and ends the kernels the search is done with."""

                def apply(self, scheduler, task_id, candidates, builder_results, runner_results):
                    k = keys[todo[task_id]]
                    if not candidates:
                        # out of time, or the search found nothing new: a small space is exhausted, and
                        # asking again only costs time
                        if state["stopped"] != "time-budget":
                            index[k]["requested"] = max(index[k]["requested"], trials)
                        scheduler.terminate_task(task_id)
                    measured[k] += len(candidates)
                    index[k]["trials"] += len(candidates)
                    for r in runner_results:
                        if r.run_secs:
                            s = sum(float(x) for x in r.run_secs) / len(r.run_secs)
                            if s < _NO_RUN_S:
                                best[tasks[todo[task_id]].task_name] = min(best.get(tasks[todo[task_id]].task_name, s), s)
                    if measured[k] >= wanted[k]:
                        index[k]["requested"] = max(index[k]["requested"], trials)
                    _write_json(path / INDEX_FILE, index)
                    elapsed = time.perf_counter() - t0
                    if progress and candidates:
                        done_trials = sum(min(v, wanted[key]) for key, v in measured.items())
                        done_k = sum(1 for key, v in measured.items() if v >= wanted[key])
                        eta = elapsed / done_trials * (total - done_trials) if done_trials else None
                        if eta is not None:
                            eta = max(0.0, min(eta, deadline - t0 - elapsed))
                        progress(TuneProgress(done_k, len(todo), done_trials, total, elapsed, eta,
                                              tasks[todo[task_id]].task_name, dict(best)))

            # Out of time, every kernel's next round is empty and ends its search, so the scheduler
            # joins (and commits) each round already in flight: the budget is overrun by that round
            # at most, never by rounds started after it.
            ms.tune_tasks(
                tasks=contexts, task_weights=[float(tasks[i].weight) for i in todo], work_dir=scratch,
                max_trials_global=total, max_trials_per_task=trials, num_trials_per_iter=min(MAX_TRIALS_PER_ITER, trials),
                builder=builder, runner=runner, database=db, cost_model=COST_MODEL,
                measure_callbacks=ms.MeasureCallback.create("default") + [_Progress()],
                task_scheduler=TASK_SCHEDULER, module_equality=MODULE_EQUALITY,
            )
        if state["stopped"] == "done":
            # the search ended on its own: a kernel with a small space may have fewer candidates than asked
            for i in todo:
                index[keys[i]]["requested"] = max(index[keys[i]]["requested"], trials)
        _write_json(path / INDEX_FILE, index)

    db = open_database(db_dir, target)
    kernels = []
    for i, t in enumerate(tasks):
        n, b = _best_s(db, t.dispatched[0])
        kernels.append(KernelStatus(t.task_name, keys[i], int(t.weight), n, b,
                                    skipped=i not in todo and i not in deferred,
                                    default_s=index[keys[i]].get("default_s"), deferred=i in deferred))
    return TuneReport(path, target.name, kernels, sum(measured.values()), time.perf_counter() - t0, state["stopped"])


def _focus(todo: list[int], weights: list[int], default_s: list[float | None], share: float) -> tuple[list, list]:
    """(searched, deferred) kernels of `todo`: the fewest, largest first by default time x uses,
    that make up `share` of their total; a kernel with no measured default is always searched."""
    if share >= 1:
        return todo, []
    cost = {i: weights[i] * default_s[i] for i in todo if default_s[i] is not None}
    keep = [i for i in todo if i not in cost]
    total, acc = sum(cost.values()), 0.0
    for i in sorted(cost, key=lambda i: -cost[i]):
        if acc >= share * total:
            break
        keep.append(i)
        acc += cost[i]
    return [i for i in todo if i in keep], [i for i in todo if i not in keep]


def _has_choices(mod, ttarget) -> bool:
    """Whether any design space MetaSchedule generates for `mod` samples a decision (a tile size,
    an unroll depth, a compute location). One that samples none is a single schedule."""
    from tvm.s_tir import meta_schedule as ms

    ctx = ms.TuneContext(mod=mod, target=ttarget, space_generator="post-order-apply", num_threads=1)
    return any(inst.kind.name.startswith("Sample")
               for space in ctx.space_generator.generate_design_space(mod) for inst in space.trace.insts)


def _search_strategy(mod, ttarget, trials: int, wanted: int, out_of_time: Callable[[], bool]):
    """The search for one kernel: sized for `trials` in all, it measures at most `wanted` this run
    and draws nothing once `out_of_time()`. A kernel whose design space holds a single schedule
    replays it: an evolutionary search spent 160 s of a 600 s budget drawing ResNet-18's
    Winograd input transform, its one schedule, from a population of 512."""
    from tvm.s_tir import meta_schedule as ms

    if not _has_choices(mod, ttarget):
        inner = ms.search_strategy.ReplayTrace()
    else:
        population = min(POPULATION_MAX, max(POPULATION_MIN, POPULATION_PER_TRIAL * trials))
        inner = ms.search_strategy.EvolutionarySearch(population_size=population,
                                                      init_min_unmeasured=min(population // 2, 50))
    return _skipping_known()(inner, wanted, out_of_time)


def _scheduled_modules(db, mod) -> list:
    """The scheduled modules of every record `db` holds for workload `mod` (failed runs included,
    which get_top_k leaves out)."""
    from tvm import s_tir

    if not db.has_workload(mod):
        return []
    workload = db.commit_workload(mod)   # the database's own entry, which its records share
    found = []
    for rec in db.get_all_tuning_records():
        if not rec.workload.same_as(workload):
            continue
        sch = s_tir.Schedule(mod)
        try:
            rec.trace.apply_to_schedule(sch, remove_postproc=False)
        except Exception:  # noqa: BLE001 - a record that no longer replays cannot be drawn again either
            continue
        found.append(sch.mod)
    return found


@lru_cache(maxsize=None)
def _skipping_known():
    """A search strategy class wrapping EvolutionarySearch that never sends a schedule the database
    already holds for the kernel: the search seeds its population with the database's best (the
    committed default schedule, or a resumed run's records) and, knowing only this run's own
    measurements, drew them again, spending trials on times already known. Each kernel's search
    also stops at its own trial count (the task scheduler's count is one for every kernel)."""
    import tvm_ffi
    from tvm.ir.utils import derived_object
    from tvm.s_tir import meta_schedule as ms

    @derived_object
    class _SkipKnown(ms.search_strategy.PySearchStrategy):
        def __init__(self, inner, wanted: int, out_of_time: Callable[[], bool]):
            self.inner = inner
            self.wanted = wanted
            self.out_of_time = out_of_time
            self.known: dict[int, list] = {}

        def _initialize_with_tune_context(self, context) -> None:
            self.inner._initialize_with_tune_context(context)
            self.mod = context.mod

        def pre_tuning(self, max_trials, num_trials_per_iter, design_spaces, database=None, cost_model=None):
            self.known = {}
            for m in _scheduled_modules(database, self.mod) if database is not None else []:
                self.known.setdefault(tvm_ffi.structural_hash(m), []).append(m)
            self.inner.pre_tuning(min(max_trials, self.wanted), num_trials_per_iter, design_spaces, database, cost_model)

        def post_tuning(self) -> None:
            self.inner.post_tuning()

        def _is_known(self, mod) -> bool:
            return any(tvm_ffi.structural_equal(mod, m) for m in self.known.get(tvm_ffi.structural_hash(mod), []))

        def generate_measure_candidates(self):
            # Out of time, the round is empty and ends the kernel's search. A round of nothing but
            # known schedules is asked again: an empty round would read as an exhausted space.
            if self.out_of_time():
                return []
            for _ in range(KNOWN_ROUNDS_BEFORE_EXHAUSTED):
                candidates = self.inner.generate_measure_candidates()
                if candidates is None:
                    return None
                fresh = []
                for c in candidates:
                    # a replayed single schedule comes back in every round: send it once
                    if not self._is_known(c.sch.mod):
                        self.known.setdefault(tvm_ffi.structural_hash(c.sch.mod), []).append(c.sch.mod)
                        fresh.append(c)
                if fresh or not candidates:
                    return fresh
                self.inner.notify_runner_results([], [])
            return []

        def notify_runner_results(self, measure_candidates, results) -> None:
            self.inner.notify_runner_results(measure_candidates, results)

        def clone(self):
            return _SkipKnown(self.inner.clone(), self.wanted, self.out_of_time)

    return _SkipKnown


def _quiet_loggers() -> None:
    """MetaSchedule logs every round at INFO; nasc shows its own progress instead."""
    import logging

    for name in ("tvm.s_tir.meta_schedule", "nasc.tune"):
        logging.getLogger(name).setLevel(logging.WARNING)
