"""dlight-style TIR schedule rules for CPUs: register-tiled conv (NCHWc and NCHW) and matmul,
vectorised pooling/reductions, and a safe parallel + vectorise fallback for everything else.

Every rule works on a fresh schedule and declines (returns None) when a primitive does not
apply, so a PrimFunc it does not recognise reaches the next rule untouched.
"""

from __future__ import annotations

import math

import tvm
from tvm import s_tir, tirx
from tvm.s_tir.dlight.analysis import get_root_block
from tvm.s_tir.dlight.base import ScheduleRule
from tvm.sym.analyzer import Analyzer

from .lowering import (CONV_BLOCK_NAME, MATMUL_BLOCK_NAME, PAD_BLOCK_NAME, POOL_BLOCK_NAME, POOL_PAD_NAME, TO_BLOCKED_NAME,
                       TO_PLAIN_NAME)
from .vector_spec import CpuVectorSpec
from .winograd import INPUT_NAME as WINOGRAD_INPUT, OUTPUT_NAME as WINOGRAD_OUTPUT, TILE as WINOGRAD_TILE

# Rows per matmul register tile: 6 rows x 2 vectors = 12 accumulators of the 16 AVX2 registers.
MATMUL_ROW_TILE = 6
# Loops shorter than this are not worth a parallel region (thread wake-up costs ~microseconds).
MIN_PARALLEL_EXTENT = 2
# Parallel chunks wanted from an elementwise/pooling loop nest: a few per thread balances load
# without fusing every loop (whose index div/mod would then run per element).
PARALLEL_CHUNKS = 64
# A channel block narrower than the vector (NCHW4c under AVX-512) is still vectorised on its
# own, as a short vector, when it has at least this many float32 lanes (one 128-bit register).
MIN_SHORT_VECTOR = 4
# A primitive that does not apply raises ScheduleError (a RuntimeError); internal checks raise
# other RuntimeErrors; symbolic extents surface as TypeError in the tile arithmetic. Either
# way the rule declines and the next one gets the PrimFunc.
_SCHEDULE_ERRORS = (RuntimeError, ValueError, TypeError)
# Output rows per parallel chunk of an NCHW{c}c pool, padded together: a 3x3 stride-1 window pads
# 10 input rows for 8 output rows (one row at a time pads 3 for 1). Inception's 3x3 average pool
# over 32 channels at 112x112: 0.25 ms as topi's bounds-checked pool, 0.12 padded per row, 0.07-0.09
# in chunks of 8 rows (2 threads; ONNX Runtime 0.07 in the model).
POOL_CHUNK_ROWS = 8
# Output pixels per pool register tile (one accumulator vector each)
POOL_TILE_COLS = 4
# Output rows per parallel chunk of a depthwise conv, padded together like a pool's (3x3 stride 1,
# 144 channels at 56x56: 1.3-1.4x faster than padding 3 input rows for each output row; MobileNetV2
# 1.035x; stride 2 the same either way)
DEPTHWISE_CHUNK_ROWS = 8
# Pixels per NCHW -> NCHW{c}c transpose tile: a block of channels x this many pixels, both loops
# unrolled, reads whole cache lines of each channel row and writes whole blocks. 64x56x56 at one
# thread: 0.29 ms as TVM's layout_transform, 0.092 with the channel loop innermost, 0.037 tiled.
TRANSPOSE_TILE_COLS = 8
# Pixels per NCHW{c}c -> NCHW tile: each channel's row of the tile is one 64-byte cache line of
# float32 written whole.
TO_PLAIN_TILE_COLS = 16
# Input channels per unrolled step of a conv's reduction. A whole 16-channel AVX-512 block unrolled
# is 256 FMAs in one basic block: LLVM hoists its 128 broadcasts ahead of them and spills half to
# the stack. 8 at a time spills none: MobileNetV2 1.31 -> 1.16 ms, its 144 -> 24 1x1 conv at 56x56
# 0.096 -> 0.061 (2 threads, Zen 5). An AVX2 block (8) stays whole.
CONV_UNROLL_CHANNELS = 8


def default_rules(spec: CpuVectorSpec) -> list[ScheduleRule]:
    """The rules in priority order: the first that recognises a PrimFunc schedules it."""
    return [_rule("ConvNCHWc", _schedule_conv_nchwc, spec),
            _rule("ConvNCHW", _schedule_conv_nchw, spec),
            _rule("WinogradInput", _schedule_winograd_input, spec),
            _rule("WinogradOutput", _schedule_winograd_output, spec),
            _rule("Matmul", _schedule_matmul, spec),
            _rule("PoolNCHWc", _schedule_pool_nchwc, spec),
            _rule("ToBlocked", _schedule_to_blocked, spec),
            _rule("ToPlain", _schedule_to_plain, spec),
            _rule("Fallback", _schedule_fallback, spec)]


def _rule(name: str, schedule_fn, spec: CpuVectorSpec) -> ScheduleRule:
    """Wraps `schedule_fn(sch, spec) -> bool` as a rule; a failed primitive means 'not mine'."""

    def apply(func, target, _tunable):
        if not isinstance(func, tirx.PrimFunc) or target.kind.name != "llvm":
            return None
        try:
            sch = s_tir.Schedule(func)
            return sch if schedule_fn(sch, spec) else None
        except _SCHEDULE_ERRORS:
            return None

    return ScheduleRule.from_callable(name)(apply)


def _extent(sch: s_tir.Schedule, loop) -> int | None:
    extent = sch.get(loop).extent
    return int(extent) if isinstance(extent, tirx.IntImm) else None


def _iter_kinds(sch: s_tir.Schedule, block) -> str:
    kinds = {tirx.IterVar.DataPar: "S", tirx.IterVar.CommReduce: "R"}
    return "".join(kinds.get(iv.iter_type, "O") for iv in sch.get(block).iter_vars)


def _domain(sch: s_tir.Schedule, block) -> list[int]:
    return [int(iv.dom.extent) for iv in sch.get(block).iter_vars]


def _root_blocks(sch: s_tir.Schedule) -> list:
    return list(sch.get_child_blocks(get_root_block(sch)))


def matmul_row_tile(rows: int) -> int:
    """Rows per matmul register tile for a matmul of `rows` rows: the largest divisor up to
    MATMUL_ROW_TILE, or a predicated last tile of MATMUL_ROW_TILE rows where that divisor is
    small (e.g. 197 (prime) tokens), not 1-row tiles."""
    tile = _largest_divisor(rows, MATMUL_ROW_TILE)
    return MATMUL_ROW_TILE if tile * 2 <= min(rows, MATMUL_ROW_TILE) else tile


def _largest_divisor(n: int, limit: int) -> int:
    return max(d for d in range(1, min(n, limit) + 1) if n % d == 0)


def _find_block(sch: s_tir.Schedule, predicate):
    found = [b for b in _root_blocks(sch) if predicate(b)]
    return found[0] if len(found) == 1 else None


def _inline_epilogue(sch: s_tir.Schedule, write_back) -> None:
    """Folds the elementwise consumers (bias, residual add, relu, clip) into the write-back."""
    while True:
        consumers = sch.get_consumers(write_back)
        if len(consumers) != 1 or "R" in _iter_kinds(sch, consumers[0]):
            return
        # A consumer over a smaller domain (the crop after pad_einsum) must stay separate:
        # inlined, its bounds check would be lost and the tile would write out of bounds.
        if _domain(sch, consumers[0]) != _domain(sch, write_back):
            return
        try:
            sch.reverse_compute_inline(consumers[0])
        except _SCHEDULE_ERRORS:
            return


def _tile_accumulator(sch: s_tir.Schedule, block, tile_loop, reduce_loop, parallel_loops: list):
    """Accumulate in a register tile, write back (with the epilogue) per tile, vectorise.

    The innermost two loops of `block` must already be the (unrolled) row and vector loops.
    """
    # "global", not "local": TVM puts a small constant-size global buffer on the stack, where LLVM
    # keeps the tile in registers, but a local one in a workspace allocated per parallel task, whose
    # every tile zeroed and stored its accumulators to memory as dead stores. Placed at its uses,
    # inside the parallel loop, each task still has its own (as a chunk's padded rows do).
    # ResNet-18 1.13x, MobileNetV2 1.10x, ShuffleNetV2 1.08x, DenseNet 1.04x, Inception 1.00-1.06x
    # faster whole (2 threads, Zen 3, side by side).
    write_back = sch.cache_write(block, 0, "global")
    _inline_epilogue(sch, write_back)
    sch.reverse_compute_at(write_back, tile_loop, preserve_unit_loops=True)
    # parallel() needs a complete reduction block, so it precedes decompose_reduction.
    _parallel(sch, parallel_loops)
    init = sch.decompose_reduction(block, reduce_loop)
    for stage in (init, write_back):
        loops = sch.get_loops(stage)
        sch.vectorize(loops[-1])
        sch.unroll(loops[-2])
    return write_back


def _parallel(sch: s_tir.Schedule, loops: list):
    fused = sch.fuse(*loops) if len(loops) > 1 else loops[0]
    extent = _extent(sch, fused)
    if extent is None or extent >= MIN_PARALLEL_EXTENT:
        sch.parallel(fused)
    return fused


def _schedule_conv_nchwc(sch: s_tir.Schedule, spec: CpuVectorSpec) -> bool:
    conv = _find_block(sch, lambda b: sch.get(b).name_hint.startswith(CONV_BLOCK_NAME))
    if conv is None or _iter_kinds(sch, conv) != "SSSSSRRR":
        return False
    n, co, oh, ow, ci, rc, ry, rx = sch.get_loops(conv)
    c_block, in_channels = _extent(sch, ci), _extent(sch, rc)
    # a depthwise conv's blocks share no operand: its tile is one block wide
    depthwise = in_channels == 1
    rows, cols = spec.conv_tile(1 if depthwise else _extent(sch, co), _extent(sch, ow), c_block)
    owo, owi = sch.split(ow, [None, cols])
    coo, coi = sch.split(co, [None, rows])
    parallel, chunk_rows = [n, coo, oh], []
    if depthwise:
        # chunks of output rows in parallel, each padding the input rows it reads (_pad_per_chunk)
        oh_chunk, oh = sch.split(oh, [None, _largest_divisor(_extent(sch, oh), DEPTHWISE_CHUNK_ROWS)])
        parallel, chunk_rows = [n, coo, oh_chunk], [oh]
    # input channels a step at a time: a whole block, or as much of one as the conv sums over
    # (a conv whose trailing input channels are zero padding sums over part of its last block)
    step = math.gcd(in_channels, c_block)
    if not depthwise and step > 1 and (in_channels > c_block or in_channels < c_block):
        rco, rci = sch.split(rc, [None, step])
        sch.reorder(n, coo, oh, owo, rco, ry, rx, rci, coi, owi, ci)
        # an input block's FMAs in a row, no loop between them: 512-channel 3x3 at 7x7 6% faster at
        # one thread, 64 at 56x56 2%, ResNet-18 2% (unrolling the kernel window as well was 25% slower)
        unrolled = _largest_divisor(step, CONV_UNROLL_CHANNELS)
        sch.unroll(sch.split(rci, [None, unrolled])[1] if unrolled < step else rci)
    else:
        rco = rc
        sch.reorder(*parallel, *chunk_rows, owo, rco, ry, rx, coi, owi, ci)
    sch.unroll(coi)
    sch.unroll(owi)
    sch.vectorize(ci)
    _tile_accumulator(sch, conv, owo, rco, parallel)
    if depthwise:
        _pad_per_chunk(sch, conv, PAD_BLOCK_NAME)
    _schedule_remaining(sch, spec, skip=[conv])
    return True


def _pad_per_chunk(sch: s_tir.Schedule, block, pad_name: str) -> None:
    """Pads the input rows each parallel chunk of output rows reads, inside `block`'s parallel
    loop (`pad_name`: its padding stage). A depthwise conv does 9 FMAs per value it reads: padding
    its whole input first, a separate pass through memory, took as long as the conv (MobileNetV2's
    stride-2 depthwise convs ran at 0.4x ONNX Runtime)."""
    pads = [b for b in sch.get_producers(block) if sch.get(b).name_hint.startswith(pad_name)]
    if len(pads) != 1:
        return
    try:
        sch.compute_at(pads[0], sch.get_loops(block)[0], preserve_unit_loops=True)
        sch.vectorize(sch.get_loops(pads[0])[-1])
    except _SCHEDULE_ERRORS:
        return


def _schedule_pool_nchwc(sch: s_tir.Schedule, spec: CpuVectorSpec) -> bool:
    """lowering.pool2d_nchwc: chunks of output rows in parallel, each padding the input rows it
    reads, then register tiles of output pixels x the channel block's lanes."""
    pool = _find_block(sch, lambda b: sch.get(b).name_hint == POOL_BLOCK_NAME)
    if pool is None or _iter_kinds(sch, pool) != "SSSSSRR":
        return False
    n, c, h, w, lane, ry, rx = sch.get_loops(pool)
    ho, hi = sch.split(h, [None, _largest_divisor(_extent(sch, h), POOL_CHUNK_ROWS)])
    wo, wi = sch.split(w, [None, _largest_divisor(_extent(sch, w), POOL_TILE_COLS)])
    sch.reorder(n, c, ho, hi, wo, ry, rx, wi, lane)
    sch.unroll(wi)
    sch.vectorize(lane)
    _tile_accumulator(sch, pool, wo, ry, [n, c, ho])
    _pad_per_chunk(sch, pool, POOL_PAD_NAME)
    _schedule_remaining(sch, spec, skip=[pool])
    return True


def _schedule_conv_nchw(sch: s_tir.Schedule, spec: CpuVectorSpec) -> bool:
    """Plain NCHW conv (e.g. a 3-channel stem): pack the weight to OIHWo in-kernel, vectorise o."""
    conv = _find_block(sch, lambda b: sch.get(b).name_hint == "conv2d_nchw")
    if conv is None or _iter_kinds(sch, conv) != "SSSSRRR":
        return False
    n, oc, oh, ow, rc, ry, rx = sch.get_loops(conv)
    # a whole vector of output channels, else the widest short vector that divides them
    # (a 24-channel stem under AVX-512 runs 8 lanes rather than unscheduled)
    widths = [spec.channel_block >> i for i in range(spec.channel_block.bit_length())
              if spec.channel_block >> i >= MIN_SHORT_VECTOR]
    block_o = next((w for w in widths if _extent(sch, oc) % w == 0), None)
    if block_o is None:
        return False
    weight_index = _weight_read_index(sch, conv)
    packed = sch.cache_read(conv, weight_index, "global")
    sch.transform_layout(packed, ("write", 0),
                         lambda o, i, h, w: (o // block_o, i, h, w, o % block_o))
    oco, oci = sch.split(oc, [None, block_o])
    cols = _largest_divisor(_extent(sch, ow), spec.conv_tile_cols)
    owo, owi = sch.split(ow, [None, cols])
    sch.reorder(n, oco, oh, owo, rc, ry, rx, owi, oci)
    sch.unroll(owi)
    sch.vectorize(oci)
    _tile_accumulator(sch, conv, owo, rc, [n, oco, oh])
    # The register tile is compacted in the accumulator's layout: put the vector lanes (output
    # channels) innermost, or every FMA gathers and scatters its accumulator at a stride.
    sch.transform_layout(conv, ("write", 0), lambda n_, o, h, w: (n_, h, w, o))
    _schedule_remaining(sch, spec, skip=[conv])
    return True


def _schedule_to_blocked(sch: s_tir.Schedule, spec: CpuVectorSpec) -> bool:
    """NCHW -> NCHW{c}c as a tiled transpose; a producer fused in (a tail's channel pad) is inlined."""
    block = _find_block(sch, lambda b: sch.get(b).name_hint.startswith(TO_BLOCKED_NAME))
    if block is None:
        return False
    for other in _root_blocks(sch):
        if not sch.get(other).same_as(sch.get(block)):
            sch.compute_inline(other)
    n, co, h, w, ci = sch.get_loops(block)
    _tile_transpose(sch, n, co, h, w, ci, TRANSPOSE_TILE_COLS)
    return True


def _schedule_to_plain(sch: s_tir.Schedule, spec: CpuVectorSpec) -> bool:
    """NCHW{c}c -> NCHW (a layout transform alone): with gathers, a vector of each channel's pixels
    at a time; else a tiled transpose, a block of channels x a cache line of pixels, both loops
    unrolled."""
    block = _find_block(sch, lambda b: sch.get(b).name_hint.startswith(TO_PLAIN_NAME))
    if block is None or len(_root_blocks(sch)) != 1:
        return False
    chunk = int(sch.get(block).reads[0].source.shape[-1])
    n, c, h, w = sch.get_loops(block)
    co, ci = sch.split(c, [None, chunk])
    if spec.gathers and (_extent(sch, h) * _extent(sch, w)) % spec.lanes == 0:
        # A channel's pixels lie `chunk` floats apart in the blocks and side by side in its plane:
        # one gather and one vector store per vector of pixels. 16x112x112 at 2 threads: 0.046 ms
        # in scalar tiles, 0.026 so; 32x112x112 0.087 -> 0.041, 64x56x56 0.044 -> 0.029.
        hwo, hwi = sch.split(sch.fuse(h, w), [None, spec.lanes])
        sch.reorder(n, co, hwo, ci, hwi)
        sch.unroll(ci)
        sch.vectorize(hwi)
        _parallel_outer(sch, [n, co, hwo])
        return True
    _tile_transpose(sch, n, co, h, w, ci, TO_PLAIN_TILE_COLS)
    return True


def _tile_transpose(sch: s_tir.Schedule, n, co, h, w, ci, cols_wanted: int) -> None:
    """Tiles a layout transpose into (channel block `ci`) x (pixels of row `w`) tiles, both loops
    unrolled, the outer loops parallel. Tiles are `cols_wanted` pixels, or the widest that divides
    the row; a row that leaves them narrower is tiled across rows (256x28x28 NCHW -> NCHW16c in
    tiles of 7 took 0.13 ms, 0.04 in 8s)."""
    height, width = _extent(sch, h), _extent(sch, w)
    cols = _largest_divisor(width, cols_wanted)
    outer, rows = [n, co, h], [h]
    if cols < cols_wanted and (height * width) % cols_wanted == 0:
        w, cols, outer, rows = sch.fuse(h, w), cols_wanted, [n, co], []
    wo, wi = sch.split(w, [None, cols])
    sch.reorder(*rows, wo, ci, wi)
    sch.unroll(ci)
    sch.unroll(wi)
    _parallel_outer(sch, outer + [wo])


def _schedule_winograd_input(sch: s_tir.Schedule, spec: CpuVectorSpec) -> bool:
    """Per tile and channel block, the columns pass then the rows pass, 36 values each in
    straight-line code (the unrolled loops fold each value's coefficient choice away),
    vectorised over the block's lanes; the padded input stays a separate pass, as for the
    direct conv."""
    block = _find_block(sch, lambda b: sch.get(b).name_hint == WINOGRAD_INPUT)
    if block is None:
        return False
    half = sch.get_producers(block)[0]
    lanes = int(sch.get(half).reads[0].source.shape[-1])
    eps, nu, p, ch = sch.get_loops(block)
    cb, lane = sch.split(ch, [None, lanes])
    sch.reorder(p, cb, eps, nu, lane)
    sch.compute_at(half, cb)
    _parallel_outer(sch, [p, cb])
    _unroll_tile(sch, half, 2)
    _unroll_tile(sch, block, 2)
    _schedule_remaining(sch, spec, skip=[block])
    return True


def _schedule_winograd_output(sch: s_tir.Schedule, spec: CpuVectorSpec) -> bool:
    """Per 4x4 output tile and channel block, the rows pass then the columns pass in
    straight-line code, vectorised over the lanes, with the conv's epilogue (bias, residual,
    activation) folded in."""
    block = _find_block(sch, lambda b: sch.get(b).name_hint == WINOGRAD_OUTPUT)
    if block is None:
        return False
    half = sch.get_producers(block)[0]
    _inline_epilogue(sch, block)
    n, ko, y, x, lane = sch.get_loops(block)
    yo, yi = sch.split(y, [None, WINOGRAD_TILE])
    xo, xi = sch.split(x, [None, WINOGRAD_TILE])
    sch.reorder(n, yo, xo, ko, yi, xi, lane)
    sch.compute_at(half, ko)
    _parallel_outer(sch, [n, yo, xo, ko])
    _unroll_tile(sch, half, 2)
    _unroll_tile(sch, block, 2)
    _schedule_remaining(sch, spec, skip=[block])
    return True


def _unroll_tile(sch: s_tir.Schedule, block, unrolled: int) -> None:
    """Unrolls the `unrolled` loops above `block`'s innermost one, which it vectorises."""
    *_, inner = loops = sch.get_loops(block)
    for loop in loops[-1 - unrolled:-1]:
        sch.unroll(loop)
    sch.vectorize(inner)


def _weight_read_index(sch: s_tir.Schedule, conv) -> int:
    """topi's conv2d_nchw reads (padded data, weight), in that order."""
    return len(sch.get(conv).reads) - 1


def _schedule_matmul(sch: s_tir.Schedule, spec: CpuVectorSpec) -> bool:
    """C[..., i, j] += A[..., i, k] * B[..., k, j] (j contiguous in B and C), or the packed
    form B[j // p, k, j % p]: rows x cols register tiles over column panels."""
    block = _find_block(sch, lambda b: "R" in _iter_kinds(sch, b))
    if block is None:
        return False
    stmt = sch.get(block)
    kinds = _iter_kinds(sch, block)
    if not (kinds.endswith("SSR") and kinds.count("R") == 1 and len(stmt.reads) == 2):
        return False
    j_var, k_var = stmt.iter_vars[-2].var, stmt.iter_vars[-1].var
    lhs, rhs = stmt.reads
    packed = stmt.name_hint.startswith(MATMUL_BLOCK_NAME)
    if not (lhs.region[-1].min.same_as(k_var)
            and (packed or rhs.region[-1].min.same_as(j_var))):
        return False
    *batch, i, j, k = sch.get_loops(block)
    i_ext, j_ext = _extent(sch, i), _extent(sch, j)
    if i_ext is None or j_ext is None:
        return False
    if packed:
        cols = int(rhs.source.shape[-1])  # the panel width, so j % p becomes the lane index
    else:
        cols = next((c for c in (spec.matmul_cols, spec.lanes) if j_ext % c == 0), 0)
        if not cols:
            # Odd widths (197 attention keys) are padded up to whole vectors: an O(n^2) copy
            # against O(n^3) work keeps the inner loop a clean vector FMA.
            cols = spec.matmul_cols
            sch.pad_einsum(block, [1] * (len(batch) + 1) + [cols, 1])
            *batch, i, j, k = sch.get_loops(block)
    rows = matmul_row_tile(i_ext)
    jo, ji = sch.split(j, [None, cols])
    io, ii = sch.split(i, [None, rows])
    # Column panels outermost: a K x cols panel of B stays in L2 while all row tiles use it.
    sch.reorder(*batch, jo, io, k, ii, ji)
    sch.unroll(ii)
    sch.vectorize(ji)
    _tile_accumulator(sch, block, io, k, [*batch, jo, io])
    _schedule_remaining(sch, spec, skip=[block])
    return True


def _schedule_fallback(sch: s_tir.Schedule, spec: CpuVectorSpec) -> bool:
    _schedule_remaining(sch, spec, skip=[])
    return True


def _schedule_remaining(sch: s_tir.Schedule, spec: CpuVectorSpec, skip: list) -> None:
    """Inline pure elementwise chains, then parallelise/vectorise each remaining root block."""
    scheduled_nests = [sch.get(sch.get_loops(b)[0]) for b in skip if sch.get_loops(b)]

    def untouched() -> list:
        # Blocks already placed inside a scheduled loop nest (write-backs, inits) are done.
        return [b for b in _root_blocks(sch) if not (sch.get_loops(b) and any(
            sch.get(sch.get_loops(b)[0]).same_as(nest) for nest in scheduled_nests))]

    skip_names = {sch.get(b).name_hint for b in skip}
    blocks = untouched()
    for block in blocks[:-1]:
        consumers = [sch.get(c).name_hint for c in sch.get_consumers(block)]
        # Padding stays a separate pass: inlined into a conv it puts a branch in the inner loop.
        if consumers and not skip_names.intersection(consumers) and "R" not in _iter_kinds(
                sch, block):
            try:
                sch.compute_inline(block)
            except _SCHEDULE_ERRORS:
                pass
    for block in untouched():
        try:
            if "R" in _iter_kinds(sch, block):
                _schedule_reduction(sch, block, spec)
            else:
                _schedule_spatial(sch, block, spec)
        except _SCHEDULE_ERRORS:
            continue


def _uses(expr, var) -> bool:
    return any(v.same_as(var) for v in tirx.analysis.undefined_vars(expr))


def _contiguous_in_all_buffers(sch: s_tir.Schedule, block, iter_index: int) -> bool:
    """True when block iter `iter_index` moves only the last index of every buffer, with unit
    stride: vectorising it then gives plain vector loads/stores. Strided or scattered lanes
    (stride-2 pooling windows, layout transforms) are slower as gathers than as LLVM's own
    scalar code, so those loops are left alone."""
    stmt = sch.get(block)
    var = stmt.iter_vars[iter_index].var
    for region in list(stmt.reads) + list(stmt.writes):
        *outer, last = region.region
        if any(_uses(r.min, var) for r in outer):
            return False
        offset = Analyzer().simplify(last.min - var)
        if _uses(last.min, var) and _uses(offset, var):
            return False
    return True


def _guards(expr) -> list:
    """Conditions of the if_then_else calls in `expr` (padding guards inlined into a pool)."""
    if isinstance(expr, tvm.ir.Call):
        found = [expr.args[0]] if getattr(expr.op, "name", "").endswith("if_then_else") else []
        return found + [c for arg in expr.args for c in _guards(arg)]
    return [c for field in ("a", "b", "value") if hasattr(expr, field) for c in _guards(getattr(expr, field))]


def _guarded_lanes(sch: s_tir.Schedule, block, iter_index: int) -> bool:
    """True when a padding guard depends on block iter `iter_index`: vectorised, each lane then
    loads through a mask (a plain-NCHW 3x3 average pool padded at 16 px ran 16x slower than ORT,
    and 1.0x without the vector loop)."""
    var = sch.get(block).iter_vars[iter_index].var
    body = sch.get(block).body
    return isinstance(body, tirx.BufferStore) and any(_uses(c, var) for c in _guards(body.value))


def _parallel_outer(sch: s_tir.Schedule, loops: list):
    """Parallelise the fewest outer loops that give every thread several chunks; the inner
    loops stay intact (cheap index math, and LLVM can still vectorise them)."""
    count, total = 0, 1
    for loop in loops:
        extent = _extent(sch, loop)
        if extent is None:
            break
        count, total = count + 1, total * extent
        if total >= PARALLEL_CHUNKS:
            break
    return _parallel(sch, loops[:max(count, 1)])


def _short_vector(extent: int | None, spec: CpuVectorSpec) -> bool:
    """A loop narrower than the vector that still fills one short vector (a narrow channel block)."""
    return extent is not None and MIN_SHORT_VECTOR <= extent < spec.lanes and spec.lanes % extent == 0


def _schedule_spatial(sch: s_tir.Schedule, block, spec: CpuVectorSpec) -> None:
    loops = sch.get_loops(block)
    if not loops or any(sch.get(lp).kind != tirx.ForKind.SERIAL for lp in loops):
        return
    if len(loops) != len(sch.get(block).iter_vars):
        _parallel_outer(sch, loops)
        return
    inner = _extent(sch, loops[-1])
    outer = list(loops)
    contiguous = _contiguous_in_all_buffers(sch, block, len(loops) - 1)
    if inner is not None and inner % spec.lanes == 0 and contiguous:
        rest, vec = sch.split(loops[-1], [None, spec.lanes])
        sch.vectorize(vec)
        outer = list(loops[:-1]) + [rest]
    elif _short_vector(inner, spec) and contiguous and len(loops) > 1:
        sch.vectorize(loops[-1])
        outer = list(loops[:-1])
    _parallel_outer(sch, outer)


def _fuse_epilogue_into(sch: s_tir.Schedule, block, loop) -> None:
    """Runs an elementwise consumer (the divide of an average pool) in `block`'s parallel loop:
    one parallel region instead of two, which matters most on a busy machine."""
    consumers = sch.get_consumers(block)
    if len(consumers) != 1 or "R" in _iter_kinds(sch, consumers[0]):
        return
    try:
        sch.reverse_compute_at(consumers[0], loop)
        sch.vectorize(sch.get_loops(consumers[0])[-1])
    except _SCHEDULE_ERRORS:
        return


def _schedule_reduction(sch: s_tir.Schedule, block, spec: CpuVectorSpec) -> None:
    """Pooling-like reductions: spatial loops outside, reductions, then a vector channel loop."""
    kinds = _iter_kinds(sch, block)
    loops = sch.get_loops(block)
    if len(loops) != len(kinds) or kinds.rstrip("R").count("R") or "S" not in kinds:
        return
    n_spatial = kinds.index("R")
    spatial, reduce = loops[:n_spatial], loops[n_spatial:]
    inner = _extent(sch, spatial[-1])
    vectorizable = (inner is not None and (inner % spec.lanes == 0 or _short_vector(inner, spec))
                    and len(spatial) > 1 and _contiguous_in_all_buffers(sch, block, n_spatial - 1)
                    and not _guarded_lanes(sch, block, n_spatial - 1))
    if vectorizable:
        sch.reorder(*spatial[:-1], *reduce, spatial[-1])
        sch.vectorize(spatial[-1])
        outer = _parallel(sch, spatial[:-1])  # before decompose_reduction, which leaves no init
        init = sch.decompose_reduction(block, reduce[0])
        sch.vectorize(sch.get_loops(init)[-1])
        _fuse_epilogue_into(sch, block, outer)
    else:
        _parallel_outer(sch, spatial)
