"""Time every kernel of a compiled model where it runs, and say which ONNX tensor each one computes.

The whole model is compiled once and run under a VM instrument: each kernel call is timed in
place (warm caches, the real layouts between kernels) and its output is matched by value to
the ONNX Runtime tensor it equals, so every call is attributed to the ONNX node that produced
that tensor. Layout transforms are recorded with the tensor they carry and the kernel that
reads them. search/latency.py composes these records into the time of any head or tail.
"""

from __future__ import annotations

import hashlib
import time
from functools import lru_cache
from typing import Callable

import numpy as np
from onnx import ModelProto, helper

from nasc.backends.cpu_rules import winograd
from nasc.partitioner.analysis import Analysis

CONTEXT_FORMAT = "nasc-context-times/2"
TIMED_RUNS = 20                  # instrumented runs; each call keeps its fastest
REPLAY_RUNS = 10                 # a half replayed alone (replay_halves) runs at least this often,
REPLAY_MIN_S = 0.02              # and for at least this long (a ShuffleNetV2 tail takes 7 us),
REPLAY_MAX_RUNS = 2000           # in at most this many runs,
REPLAY_BACK_TO_BACK = 3          # back to back between two runs of the whole model it is compared with
MATCH_RTOL = 1e-3                # a kernel output equals an ONNX tensor within these
MATCH_ATOL_REL = 1e-4            # times the tensor's largest magnitude
TRANSFORM = "layout_transform"   # symbol of TVM's layout-changing kernels
BUILTIN = "vm.builtin."          # VM bookkeeping calls, not kernels
MAX_SCALE = 1.5                  # calls are scaled to the whole run's time, never by more than this either way


def model_key(model: ModelProto) -> str:
    """Identity of a prepared model: context times apply to exactly this graph."""
    return hashlib.sha256(model.SerializeToString()).hexdigest()[:20]


def half_key(mask: np.ndarray) -> str:
    """Identity of the nodes one half runs (a row of a cut mask over the analysis' nodes)."""
    return hashlib.sha256(np.packbits(np.asarray(mask, bool)).tobytes()).hexdigest()[:16]


def _blocked_to_plain(x: np.ndarray) -> np.ndarray:
    n, c1, h, w, c = x.shape
    return x.transpose(0, 1, 4, 2, 3).reshape(n, c1 * c, h, w)


class _TensorIndex:
    """ONNX Runtime values of every activation of the model, looked up by value.

    A tensor the CPU pipeline widened (`layouts`, see passes.pad_channels) is also looked up at
    its padded shape, by its real channels."""

    def __init__(self, a: Analysis, feeds: dict[str, np.ndarray], layouts: dict | None = None):
        from nasc.backends import ort

        m = ModelProto()
        m.CopyFrom(a.model)
        have = {o.name for o in m.graph.output}
        m.graph.output.extend(helper.ValueInfoProto(name=o) for n in a.nodes for o in n.output
                              if o in a.specs and o not in have)
        sess = ort.session(m, threads=1)   # one thread: no pool left spinning beside the kernels being timed
        values = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds)))
        values.update(feeds)
        order = {t: i for i, t in enumerate(list(feeds) + [o for n in a.nodes for o in n.output])}
        self.by_shape: dict[tuple, list[tuple[str, np.ndarray, np.ndarray | None]]] = {}
        layouts = layouts or {}
        for name in sorted(values, key=lambda t: order.get(t, len(order))):
            v = np.asarray(values[name])
            self.by_shape.setdefault(v.shape, []).append((name, v, None))
            if name in layouts:
                padded, real = layouts[name]
                self.by_shape.setdefault((v.shape[0], padded, *v.shape[2:]), []).append((name, v, real))

    def match(self, x: np.ndarray) -> str | None:
        """The first ONNX tensor (in execution order) that `x` equals, in plain or NCHWc layout."""
        views = [x] + ([_blocked_to_plain(x)] if x.ndim == 5 else [])
        for v in views:
            for name, ref, real in self.by_shape.get(v.shape, []):
                got = v if real is None else v[:, real]
                if ref.dtype == got.dtype and np.allclose(got, ref, rtol=MATCH_RTOL,
                                                        atol=MATCH_ATOL_REL * (float(np.abs(ref).max()) + 1e-12)):
                    return name
        return None


def _call_owners(a: Analysis, calls: list[dict]) -> np.ndarray:
    """The ONNX node each call runs for (-1: none): a call's tensor's producer; a layout transform,
    or a call that computes no ONNX tensor (a Winograd stage), runs for the next call that does;
    a transform after the last kernel (a blocked output made plain) runs for its tensor's producer."""
    owner = np.full(len(calls), -1)
    following = -1
    for k in range(len(calls) - 1, -1, -1):
        c = calls[k]
        made = a.producer.get(c["tensor"], -1) if c.get("tensor") is not None else -1
        if TRANSFORM in c["symbol"] or made < 0:
            owner[k] = following if following >= 0 else made
        else:
            owner[k] = following = made
    return owner


def fused_units(a: Analysis, groups: list, computed: set) -> list[list[int]]:
    """The kernel groups (indices into `groups`, profile.kernel_groups) that ran as one call: a
    group whose output no call computed (`computed`: the tensors the calls wrote) was fused by TVM
    into its readers' kernel, through reshapes. A cut through a unit breaks that call in two."""
    group_of = {i: g for g, grp in enumerate(groups) for i in grp.nodes}
    parent = list(range(len(groups)))

    def root(g: int) -> int:
        while parent[g] != g:
            g = parent[g]
        return g

    def readers(t: str) -> list[int]:  # kernel nodes reading t, looking through reshapes
        out = []
        for c in a.consumers.get(t, []):
            if c in group_of:
                out.append(c)
            elif a.shape_only[c]:
                out += [r for o in a.nodes[c].output for r in readers(o)]
        return out

    for g, grp in enumerate(groups):
        out = [o for o in a.nodes[grp.nodes[-1]].output if o in a.specs]
        if out and out[0] not in computed:
            for reader in readers(out[0]):
                parent[root(group_of[reader])] = root(g)
    units: dict[int, list[int]] = {}
    for g in range(len(groups)):
        units.setdefault(root(g), []).append(g)
    return list(units.values())


def call_nodes(a: Analysis, calls: list[dict], owner: np.ndarray) -> list[np.ndarray]:
    """The ONNX nodes each call computes: its owner's fused unit (`fused_units`); none for a
    layout transform, which moves a tensor and computes nothing."""
    from nasc.backends.profile import kernel_groups

    groups = kernel_groups(a)
    units = fused_units(a, groups, {c["tensor"] for c in calls if TRANSFORM not in c["symbol"]})
    nodes_of: dict[int, np.ndarray] = {}
    for u in units:
        nodes = np.array([n for g in u for n in groups[g].nodes])
        nodes_of.update(dict.fromkeys(nodes.tolist(), nodes))
    return [nodes_of.get(int(o), np.array([int(o)])) if o >= 0 and TRANSFORM not in c["symbol"] else np.array([], int)
            for c, o in zip(calls, owner)]


def half_calls(owner: np.ndarray, nodes: list[np.ndarray], mask: np.ndarray) -> np.ndarray:
    """Which calls a half (node mask) replays: those whose owner it holds, save a kernel the cut
    breaks (some of its nodes outside the half), which the half runs as a part compiled apart and
    search.latency.ContextTimes prices apart. ResNet-18's tail at the last block's residual add
    replayed the fused conv whose add it holds, and its classifier took that conv's ratio."""
    return np.array([o >= 0 and bool(mask[o]) and bool(mask[n].all()) for o, n in zip(owner, nodes)], bool)


def _timed_calls(vm, args, runs: int = TIMED_RUNS, sync: Callable[[], None] | None = None) -> np.ndarray:
    """Seconds of each kernel call of `vm`'s main, in place: the fastest of `runs` (other work only adds time).

    On a GPU a call only launches its kernel: `sync` (the device's) is waited on at each stamp.
    """
    best: list[float] = []
    k = -1
    start = 0.0

    def stamp(_func, symbol, before, _ret, *_args):
        nonlocal k, start
        if symbol.startswith(BUILTIN):
            return 0
        if before:
            k += 1
            if sync is not None:
                sync()
            start = time.perf_counter()
            return 0
        if sync is not None:
            sync()
        if k == len(best):
            best.append(np.inf)
        best[k] = min(best[k], time.perf_counter() - start)
        return 0

    vm.set_instrument(stamp)
    for _ in range(runs):
        k = -1
        vm["main"](*args)
    vm.set_instrument(None)
    return np.array(best)


def _run_once_s(calls: list[tuple], sync: Callable[[], None] | None = None) -> float:
    """Seconds of one run of `calls` ((kernel, arguments) as the VM made them), called back to back."""
    if sync is not None:
        sync()
    start = time.perf_counter()
    for kernel, arguments in calls:
        kernel(*arguments)
    if sync is not None:
        sync()
    return time.perf_counter() - start


def _direct_s(calls: list[tuple], sync: Callable[[], None] | None = None, min_runs: int = REPLAY_RUNS,
              min_s: float = REPLAY_MIN_S) -> float:
    """Seconds of `calls` called back to back with no VM between them: the fastest of at least
    `min_runs` runs and `min_s` seconds of them."""
    return _direct_pair_s(calls, [], sync, min_runs, min_s)[0]


def _direct_pair_s(calls: list[tuple], other: list[tuple], sync: Callable[[], None] | None = None,
                   min_runs: int = REPLAY_RUNS, min_s: float = REPLAY_MIN_S) -> tuple[float, float]:
    """`_direct_s` of `calls` and of `other`, in rounds: REPLAY_BACK_TO_BACK runs of `calls` (the
    later ones find in cache what the first left), then one of `other`. Both see the same seconds
    of the host, so their ratio holds when its speed drifts between one half and the next."""
    best, best_other, spent, n = np.inf, np.inf, 0.0, 0
    while n < min_runs or (spent < min_s and n < REPLAY_MAX_RUNS):
        for _ in range(REPLAY_BACK_TO_BACK if other else 1):
            took = _run_once_s(calls, sync)
            best, spent, n = min(best, took), spent + took, n + 1
        if other:
            best_other = min(best_other, _run_once_s(other, sync))
    return best, best_other


def replay_halves(calls: list[tuple], owner: np.ndarray, nodes: list[np.ndarray], in_place_s: np.ndarray,
                  halves: np.ndarray, call_bias_s: float, sync: Callable[[], None] | None = None) -> dict[str, float]:
    """{half_key: ratio} for each node mask in `halves`: the time of its calls ((kernel, arguments) of
    the whole model's run, `owner` their nodes, `nodes` what each computes; `half_calls`) called
    alone, back to back, against their time in place in the whole model (`in_place_s`), relative
    to the same ratio of every call.

    A half run on its own finds in cache what the whole model had evicted between two runs of a
    kernel: ResNet-18's classifier took 0.109 ms in place and 0.042 as the tail that runs it alone.
    The replay calls exactly those kernels of this executable, in their order, on its buffers, and
    nothing between them: replayed in the VM, an instrument callback for each call it skipped ran
    Python between them, and ShuffleNetV2's tail at cut 76 read 0.88 of in place where called
    directly it reads 0.74, and compiled alone 0.65. Each call's host-side cost (`call_bias_s`) is
    taken off, and every half is taken as a share of all calls replayed, in rounds with them
    (`_direct_pair_s`): the VM's dispatch, which a whole run has and the replay has not, is spread
    over the calls as in place, and the host's drift between halves cancels (MobileNetV2's tail at
    cut 32 read 0.75, 0.88 and 0.78 in three sessions against the whole replayed once, 0.87, 0.90
    and 0.92 in rounds)."""

    every = [c for c, r in zip(calls, owner >= 0) if r]
    every_in_place = float(in_place_s[owner >= 0].sum())
    ratios: dict[bytes, float | None] = {}   # by the calls a replay runs: masks that differ in shape-only nodes share one

    def ratio(run: np.ndarray) -> float | None:
        if run.tobytes() not in ratios:
            before = float(in_place_s[run].sum())
            chosen = [c for c, r in zip(calls, run) if r]
            if not chosen or before <= 0.0:
                ratios[run.tobytes()] = None
            else:
                half_s, every_s = _direct_pair_s(chosen, every, sync)
                share = max(half_s - len(chosen) * call_bias_s, 0.0) / max(every_s - len(every) * call_bias_s, 1e-12)
                ratios[run.tobytes()] = share / (before / every_in_place)
        return ratios[run.tobytes()]

    out: dict[str, float] = {}
    if not every or every_in_place <= 0.0:
        return out
    for mask in np.asarray(halves, bool):
        if (r := ratio(half_calls(owner, nodes, mask))) is not None:
            out[half_key(mask)] = r
    return out


def crossing_tensors(a: Analysis, halves: np.ndarray) -> list[str]:
    """The 4-D float activations some half in `halves` ((H, nodes) bool masks) receives or sends:
    made on one side of its cut (a graph input: outside every half) and read on the other."""
    out = []
    for t, spec in a.specs.items():
        readers = a.consumers.get(t, [])
        if len(spec.shape) != 4 or np.dtype(spec.dtype) != np.float32 or not readers:
            continue
        made = halves[:, a.producer[t]] if t in a.producer else np.zeros(len(halves), bool)
        if (halves[:, readers] != made[:, None]).any():
            out.append(t)
    return out


def crossing_model(shapes: list[tuple[int, ...]], block: int) -> ModelProto:
    """A model that moves a tensor of each shape into NCHW{block}c and out again, as a tail that
    receives one and a head that sends one do: input `x<k>` enters through an identity conv (the
    CPU lowering makes it a layout transform, as it does a received tensor's), is rectified in
    the block, and leaves through another (`y<k>`). A `block`-channel identity conv holds the
    layout pass to `block`, the whole model's."""
    from nasc.backends.profile import in_blocked_layout

    shapes = [*shapes, (1, block, 1, 1)]
    f32 = helper.np_dtype_to_tensor_dtype(np.dtype(np.float32))
    g = helper.make_graph([helper.make_node("Relu", [f"x{k}"], [f"y{k}"]) for k in range(len(shapes))], "crossing",
                          [helper.make_tensor_value_info(f"x{k}", f32, list(s)) for k, s in enumerate(shapes)],
                          [helper.make_tensor_value_info(f"y{k}", f32, list(s)) for k, s in enumerate(shapes)])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return in_blocked_layout(m, outputs=True)


def measure_crossings(a: Analysis, target, tensors: list[str], block: int) -> list[dict]:
    """The layout transforms a half runs for each tensor it receives (to NCHW{block}c) or sends
    (to NCHW): [{tensor, to_blocked, ms}], for the tensors whose channels `block` divides (one
    the block does not divide is padded first; the predictor prices that). A half's entry
    transform is a kernel the whole model never runs: ShuffleNetV2's tail at cut 8 moved its
    98 KB input in 0.0094 ms, which the transforms around the suite's kernels priced at 0.0047.

    Each transform of `crossing_model` is called on its own, back to back on the same buffers,
    as a half that runs request after request finds its input in cache: timed in place, after
    the other shapes' transforms, Inception's tail at cut 118 read its 98 KB max-pool output
    into the block in 0.0105 ms, where the tail compiled alone takes 0.0060. A shape no
    transform call moves (a 1x1 map, whose blocked layout is its plain one) costs 0."""
    import tvm
    from tvm import relax

    from nasc.backends import tvm as tvm_backend
    from nasc.compile import sample_inputs

    shapes = list(dict.fromkeys(tuple(a.specs[t].shape) for t in tensors if a.specs[t].shape[1] % block == 0))
    if not shapes:
        return []
    model = crossing_model(shapes, block)
    dev = tvm_backend.tvm_device(target.device)
    vm = relax.VirtualMachine(tvm_backend.compile_model(model, target, where="crossing transforms"), dev)
    args = [tvm.runtime.tensor(x, dev) for x in sample_inputs(model, 1)[0].values()]
    transforms = []

    def record(func, symbol, before, _ret, *cargs):
        if before and TRANSFORM in symbol:
            transforms.append((func, cargs))
        return 0

    vm.set_instrument(record)
    vm["main"](*args)
    vm.set_instrument(None)
    index = {s: k for k, s in enumerate(shapes)}
    sync, bias = _sync(target, dev), _call_bias_s(target)
    timed: dict[tuple[int, bool], float] = {}
    for call in transforms:
        out = tuple(int(d) for d in call[1][-1].shape)
        plain = (out[0], out[1] * out[4], *out[2:4]) if len(out) == 5 else out
        if plain in index:
            timed[index[plain], len(out) == 5] = max(_direct_s([call], sync) - bias, 0.0) * 1e3
    # a shape moved by no transform call of its own costs nothing: a 1x1 map's NCHW{c}c is its NCHW
    return [{"tensor": t, "to_blocked": to_blocked, "ms": float(timed.get((index[s], to_blocked), 0.0))}
            for t in tensors if (s := tuple(a.specs[t].shape)) in index for to_blocked in (True, False)]


def time_own_layouts(a: Analysis, target, halves: np.ndarray, database=None,
                     log: Callable[[str], None] | None = None) -> dict[str, float]:
    """{half_key: ms} of each half in `halves` whose convs the CPU pipeline runs in another block
    than the whole model's (`cpu_schedules.compiled_conv_block`; none, for a conv-free half),
    compiled and timed on its own, VM call cost included: the whole model runs none of its
    kernels. ShuffleNetV2's head at cut 15 pads its 3 -> 24 stem to 32 channels in block 16 and
    runs it in 0.040 ms, the whole model in block 8 in 0.050; ResNet-18's tail inside the last
    residual add holds no conv, runs plain, and its add takes 0.024 ms, blocked nearly 0."""
    from nasc.backends import tvm as tvm_backend
    from nasc.backends.cpu_schedules import compiled_conv_block
    from nasc.backends.profile import channel_block
    from nasc.passes import extract_half

    lanes = channel_block(target)
    if not lanes:
        return {}
    whole = compiled_conv_block(a.model, lanes)
    out: dict[str, float] = {}
    for mask in np.asarray(halves, bool):
        key = half_key(mask)
        if key in out or mask.all() or not mask.any():
            continue
        half = extract_half(a, mask)
        if compiled_conv_block(half, lanes) != whole:
            if log:
                log(f"timing a {len(half.graph.node)}-node half in a block of its own")
            out[key] = tvm_backend.time_model_ms(half, target, database=database)
    return out


def call_scale(whole_ms: float, calls_ms: float) -> float:
    """The factor that makes calls summing to `calls_ms` add up to a whole run of `whole_ms`
    (call overhead excluded), never more than MAX_SCALE either way."""
    return float(np.clip(whole_ms / calls_ms, 1.0 / MAX_SCALE, MAX_SCALE)) if calls_ms > 0 else 1.0


@lru_cache(maxsize=None)
def _instrument_bias_s(target) -> float:
    """What the timing instrument itself adds to one call: a one-element kernel timed the same way."""
    vm, args, dev = _trivial_vm(target)
    return float(_timed_calls(vm, args, runs=200, sync=_sync(target, dev))[0])


@lru_cache(maxsize=None)
def _call_bias_s(target) -> float:
    """What calling a kernel from Python costs the host (`_direct_s`): a one-element kernel called alone."""
    vm, args, dev = _trivial_vm(target)
    return _direct_s(_kernel_calls(vm, args), _sync(target, dev), min_runs=1000, min_s=0.0)


def _trivial_vm(target):
    import tvm
    from tvm import relax

    from nasc.backends.profile import trivial_executable
    from nasc.backends.tvm import tvm_device

    dev = tvm_device(target.device)
    return relax.VirtualMachine(trivial_executable(target), dev), [tvm.runtime.tensor(np.zeros(1, np.float32), dev)], dev


def _kernel_calls(vm, args) -> list[tuple]:
    """(kernel, arguments) of each kernel call of one run of `vm`'s main, in order."""
    calls = []

    def record(func, symbol, before, _ret, *arguments):
        if before and not symbol.startswith(BUILTIN):
            calls.append((func, arguments))
        return 0

    vm.set_instrument(record)
    vm["main"](*args)
    vm.set_instrument(None)
    return calls


def _sync(target, dev) -> Callable[[], None] | None:
    """What a kernel timing waits on: the device's queue on GPUs, nothing on CPUs (calls are synchronous)."""
    return dev.sync if target.device == "cuda" else None


def measure_in_context(a: Analysis, target, executable=None, database=None,
                       log: Callable[[str], None] | None = None, halves: np.ndarray | None = None,
                       replay: bool = False) -> dict:
    """Every kernel call of the compiled model, timed in place and attributed to an ONNX tensor.

    Returns a JSON-able document: `kernels` (compute calls: tensor, symbol, ms, blocked output,
    the tensors it reads and whether each is read in blocked layout), `transforms` (tensor, ms,
    direction, the tensor its reader computes), `whole_ms`, and `scale`: the fastest time of each
    call, taken separately, sums to less than the fastest whole run, so every call is scaled to
    make them agree (VM dispatch between calls is spread the same way; on a GPU, where the whole
    run hides launches behind kernels, or after calls a busy host slowed, the sum scales down).
    `block` is the NCHW{c}c block its blocked kernels ran in (None: none did). With `halves`
    ((H, nodes) bool masks, the heads and tails of cuts), also, in a blocked model, `crossing`:
    the transforms a half runs for the tensors it receives and sends (`measure_crossings`);
    `own_layouts`: the halves whose convs run in another block than the whole model's, each
    timed on its own, call cost excluded (`time_own_layouts`); and with `replay`, `halves`:
    each one's calls replayed alone, as a ratio to their time in place (`replay_halves`). The
    replay is opt-in: over 110 halves of five models it read 94% within ±10% of the halves
    compiled and timed, in place 96% (Zen 3); on Zen 5 they tied at 92%.
    """
    import tvm
    from tvm import relax

    from nasc.backends import tvm as tvm_backend
    from nasc.backends.profile import call_overhead_ms
    from nasc.compile import sample_inputs

    tvm_backend.set_threads()
    ex = executable or tvm_backend.compile_model(a.model, target, database=database)
    dev = tvm_backend.tvm_device(target.device)
    vm = relax.VirtualMachine(ex, dev)
    feeds = sample_inputs(a.model, 1)[0]
    args = [tvm.runtime.tensor(x, dev) for x in feeds.values()]
    index = _TensorIndex(a, feeds, tvm_backend.target_layouts(a.model, target))
    if log:
        log(f"attributing the kernels of {len(a.nodes)} nodes")

    # one pass that reads every output: which tensor each call computes, and from what
    live = {t.data_ptr(): name for t, name in zip(args, feeds)}    # buffer -> tensor it holds now
    blocked_ptr: set[int] = set()
    calls: list[dict] = []
    blocks_written: list[int] = []   # the block of each blocked ONNX tensor a call wrote
    replayable: list[tuple] = []   # (kernel, arguments) of each call: a half's are called alone (replay_halves)

    def attribute(func, symbol, before, _ret, *cargs):
        if symbol.startswith(BUILTIN):
            return 0
        tensors = [x for x in cargs if hasattr(x, "data_ptr") and hasattr(x, "shape")]
        if before:
            replayable.append((func, cargs))
            calls.append({"symbol": symbol, "reads": [(live[x.data_ptr()], x.data_ptr() in blocked_ptr)
                                                      for x in tensors[:-1] if x.data_ptr() in live]})
            return 0
        out = tensors[-1]
        name = index.match(out.numpy())
        calls[-1].update(tensor=name, blocked=len(out.shape) == 5)
        if name is not None and len(out.shape) == 5:
            blocks_written.append(int(out.shape[-1]))
        if name is not None:
            live[out.data_ptr()] = name
            (blocked_ptr.add if len(out.shape) == 5 else blocked_ptr.discard)(out.data_ptr())
        else:
            live.pop(out.data_ptr(), None)
        return 0

    vm.set_instrument(attribute)
    vm["main"](*args)

    # the calls are timed in two sessions, either side of the whole model: a neighbour that
    # slows the core for a second slows every run of one session (ResNet-18's calls once
    # summed to 47.8 ms in a session whose whole runs took 27.2)
    sync = _sync(target, dev)
    best = _timed_calls(vm, args, sync=sync)
    # the whole model on a VM that never had an instrument (a cleared one still costs per call)
    whole_ms = tvm_backend.time_model_ms(a.model, target, executable=ex)
    bias_s = _instrument_bias_s(target)
    best = np.maximum(np.minimum(best, _timed_calls(vm, args, sync=sync)) - bias_s, 0.0)
    call_ms = call_overhead_ms(target)
    # the model's NCHW{c}c block (None: it ran plain)
    block = max(set(blocks_written), key=blocks_written.count) if blocks_written else None
    replayed, crossing, own = {}, [], {}
    if halves is not None and len(halves):
        halves = np.asarray(halves, bool)
        if replay:
            if log:
                log(f"replaying {len(halves)} halves alone")
            owner = _call_owners(a, calls)
            replayed = replay_halves(replayable, owner, call_nodes(a, calls, owner), best, halves,
                                     _call_bias_s(target), sync=sync)
        # the transforms of what the halves exchange, and the halves in a block of their own
        if block:
            crossing = measure_crossings(a, target, crossing_tensors(a, halves), block)
        own = {k: max(ms - call_ms, 0.0) for k, ms in time_own_layouts(a, target, halves, database, log).items()}

    raw = best * 1e3
    # Calls are scaled to the whole run. Normally they sum to less (dispatch between them); on a
    # GPU the whole run also overlaps each launch with the kernel before it, and on a CPU both
    # sessions of calls may have run slow, so they may scale down as well.
    scale = call_scale(whole_ms - call_ms, float(raw.sum()))
    kernels, transforms, pending = [], [], []
    for c, ms in zip(calls, raw * scale):
        if TRANSFORM in c["symbol"]:
            pending.append({"tensor": c["tensor"], "ms": float(ms), "to_blocked": c["blocked"], "reader": None,
                            "symbol": c["symbol"]})
            transforms.append(pending[-1])
            continue
        # a transform's reader: the next compute call (TVM emits each transform right before its reader)
        for t in pending:
            t["reader"] = c["tensor"]
        pending.clear()
        kernels.append({"tensor": c["tensor"], "symbol": c["symbol"], "ms": float(ms), "blocked": c["blocked"],
                        "reads": [[t, b] for t, b in c["reads"]]})
    # a Winograd conv's first stages compute no ONNX tensor: their time goes with the conv's output
    unmatched = [c["symbol"] for c in calls if c["tensor"] is None and not winograd.is_stage(c["symbol"])]
    return {"format": CONTEXT_FORMAT, "model": model_key(a.model), "whole_ms": whole_ms, "call_ms": call_ms,
            "scale": scale, "kernels": kernels, "transforms": transforms, "unmatched": unmatched, "halves": replayed,
            "block": block, "crossing": crossing, "own_layouts": own}
