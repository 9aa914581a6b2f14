"""Relax-level lowering the default CPU schedules rely on.

Blocked-layout conv2d (which TVM's LegalizeOps cannot lower) and constant-weight matmul become
TIR with a layout the schedule rules tile well; ReLU6 is made visible to ConvertLayout again.
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax, s_tir, te, tirx, topi
from tvm.relax import PyExprMutator, expr_functor
from tvm.sym.analyzer import Analyzer

from . import winograd

CONV_BLOCK_NAME = "nasc_conv2d_nchwc"
PAD_BLOCK_NAME = "nasc_conv_pad"
# The narrowest channel block worth a blocked layout: one 128-bit vector of float32.
MIN_CONV_BLOCK = 4
MATMUL_BLOCK_NAME = "nasc_matmul_packed"
POOL_BLOCK_NAME = "nasc_pool"
POOL_PAD_NAME = "nasc_pool_pad"
TO_BLOCKED_NAME = "nasc_to_blocked"
TO_PLAIN_NAME = "nasc_to_plain"
# A conv weight slice (one output block) up to this size is read from L1 (32-48 KB on current x86
# and Arm cores) in any order; larger ones are packed so that they stream (`_packs_weight`).
PACKED_WEIGHT_MIN_BYTES = 32 * 1024
OUT_ELEMWISE_FUSABLE = 4   # relax FuseOps' kOutEWiseFusable
# a one-row matmul's weight panels are this many times the matmul's (two vectors): four vectors
GEMV_PANEL_PER_MATMUL_PANEL = 2


def conv2d_nchwc(data: te.Tensor, kernel: te.Tensor, strides, padding, dilation, groups: int,
                 out_dtype: str, reduced_channels: int | None = None) -> te.Tensor:
    """conv2d of data [N, C/c, H, W, c] with kernel [O/o, I/groups, KH, KW, o], or for a dense conv
    packed [O/o, I/c, KH, KW, c, o] (`_packs_weight`): [N, O/o, H', W', o].

    A dense conv sums over its first `reduced_channels` input channels only (default all): the
    caller vouches that the weight is zero for the rest (`reduced_in_channels`).
    Accumulates in `out_dtype` (int8 data with int32 out_dtype stays exact)."""
    _, _, height, width, c_block = (int(d) for d in data.shape)
    packed = len(kernel.shape) == 6
    if packed:
        o_chunks, i_chunks, kh, kw, _, o_block = (int(d) for d in kernel.shape)
        in_per_group = i_chunks * c_block
    else:
        o_chunks, in_per_group, kh, kw, o_block = (int(d) for d in kernel.shape)
    out_per_group = o_chunks * o_block // groups
    (sh, sw), (dh, dw) = strides, dilation
    top, left, bottom, right = padding
    if any(padding):
        data = topi.nn.pad(data, [0, 0, top, left, 0], [0, 0, bottom, right, 0], name=PAD_BLOCK_NAME)
    out_h = (height + top + bottom - dh * (kh - 1) - 1) // sh + 1
    out_w = (width + left + right - dw * (kw - 1) - 1) // sw + 1
    rc = te.reduce_axis((0, reduced_channels if groups == 1 and reduced_channels else in_per_group), name="rc")
    ry = te.reduce_axis((0, kh), name="ry")
    rx = te.reduce_axis((0, kw), name="rx")

    def in_channel(co, ci):
        """(chunk, lane) of the input channel; the common cases are spelled out so that the
        vectoriser sees contiguous lanes instead of a div/mod gather."""
        if groups == 1:
            return rc // c_block, rc % c_block
        if in_per_group == 1 and out_per_group == 1 and o_block == c_block:
            return co, ci
        c = (co * o_block + ci) // out_per_group * in_per_group + rc
        return c // c_block, c % c_block

    def compute(n, co, y, x, ci):
        chunk, lane = in_channel(co, ci)
        pixel = data[n, chunk, y * sh + ry * dh, x * sw + rx * dw, lane]
        weight = kernel[co, chunk, ry, rx, lane, ci] if packed else kernel[co, rc, ry, rx, ci]
        return te.sum(pixel.astype(out_dtype) * weight.astype(out_dtype),
                      axis=[rc, ry, rx])

    return te.compute((data.shape[0], o_chunks, out_h, out_w, o_block), compute,
                      name=CONV_BLOCK_NAME)


def pool2d_nchwc(data: te.Tensor, kind: str, kernel, strides, padding, count_include_pad: bool) -> te.Tensor:
    """Max or average pool (floor mode, no dilation) of data [N, C/c, H, W, c].

    No window read carries a bounds check (topi's pool tests every read). A max pool whose
    windows all overlap the input clamps its reads to the border: the clamped pixel lies in the
    window, so the max is the same, and no padded copy is made (Inception's 3x3/2 max pools
    0.046 -> 0.020 and 0.023 -> 0.010 ms in place, 2 threads). Otherwise padding is a stage of
    its own, which the schedule computes per chunk of rows inside the pool's parallel loop."""
    _, _, height, width, _ = (int(d) for d in data.shape)
    (kh, kw), (sh, sw) = kernel, strides
    top, left, bottom, right = padding
    out_h = (height + top + bottom - kh) // sh + 1
    out_w = (width + left + right - kw) // sw + 1
    shape = (data.shape[0], data.shape[1], out_h, out_w, data.shape[4])
    ry = te.reduce_axis((0, kh), name="ry")
    rx = te.reduce_axis((0, kw), name="rx")
    clamp = kind == "max" and any(padding) and max(top, bottom) < kh and max(left, right) < kw
    padded = data
    if any(padding) and not clamp:
        fill = tirx.const(0.0, data.dtype) if kind == "avg" else te.min_value(data.dtype)
        padded = topi.nn.pad(data, [0, 0, top, left, 0], [0, 0, bottom, right, 0], pad_value=fill, name=POOL_PAD_NAME)

    def read(n, c, y, x, lane):  # y, x: the window pixel's row and column in the padded input
        if clamp:
            y, x = te.min(te.max(y - top, 0), height - 1), te.min(te.max(x - left, 0), width - 1)
        return padded[n, c, y, x, lane]

    reduce = te.max if kind == "max" else te.sum
    pooled = te.compute(shape, lambda n, c, y, x, lane: reduce(read(n, c, y * sh + ry, x * sw + rx, lane), axis=[ry, rx]),
                        name=POOL_BLOCK_NAME)
    if kind == "max":
        return pooled

    def count(y, x):
        if count_include_pad:
            return tirx.const(kh * kw, "int32")
        rows = te.min(y * sh - top + kh, height) - te.max(y * sh - top, 0)
        cols = te.min(x * sw - left + kw, width) - te.max(x * sw - left, 0)
        return te.max(rows * cols, 1)

    return te.compute(shape, lambda n, c, y, x, lane: pooled[n, c, y, x, lane] / count(y, x).astype(data.dtype),
                      name=POOL_BLOCK_NAME + "_avg")


def nchw_to_nchwc(data: te.Tensor, block: int) -> te.Tensor:
    """NCHW -> NCHW{block}c, computed over the output: TVM's layout_transform loops over its input
    and scatters each value 64 bytes from the last (5.5 GB/s); this tiles as a transpose."""
    n, c, h, w = data.shape
    return te.compute((n, c // block, h, w, block), lambda b, co, y, x, ci: data[b, co * block + ci, y, x],
                      name=TO_BLOCKED_NAME)


def nchwc_to_nchw(data: te.Tensor) -> te.Tensor:
    """NCHW{block}c -> NCHW, computed over the output, to be tiled as a transpose (tir_rules)."""
    n, chunks, h, w, block = data.shape
    return te.compute((n, chunks * block, h, w), lambda b, c, y, x: data[b, c // block, y, x, c % block],
                      name=TO_PLAIN_NAME)


def _mapped(call: relax.Call, index: list[int]) -> list[int]:
    """Where a layout_transform's index map sends one index."""
    analyzer = Analyzer()
    return [int(analyzer.simplify(tirx.const(v, "int64") if isinstance(v, int) else v))
            for v in call.attrs.index_map.map_indices([tirx.const(v, "int64") for v in index])]


def _to_blocked_block(call: relax.Call) -> int | None:
    """The block of a layout_transform NCHW -> NCHW{block}c with static shapes, else None."""
    shape, out = _static_shape(call.args[0]), _static_shape(call)
    if shape is None or out is None or len(shape) != 4 or len(out) != 5 or call.attrs.pad_value is not None:
        return None
    block = out[4]
    if out != [shape[0], shape[1] // block, shape[2], shape[3], block] or shape[1] % block:
        return None
    probes = [[0, 0, 0, 0], [1, block + 3, 2, 5], [0, 2 * block - 1, 7, 1]]
    if any(_mapped(call, [n, c, h, w]) != [n, c // block, h, w, c % block] for n, c, h, w in probes):
        return None
    return block


def _is_to_plain(call: relax.Call) -> bool:
    """Whether `call` is a layout_transform NCHW{c}c -> NCHW with static shapes."""
    shape, out = _static_shape(call.args[0]), _static_shape(call)
    if shape is None or out is None or len(shape) != 5 or len(out) != 4 or call.attrs.pad_value is not None:
        return False
    block = shape[4]
    if out != [shape[0], shape[1] * block, shape[2], shape[3]]:
        return False
    probes = [[0, 0, 0, 0, 0], [1, 2, 3, 4, block - 1], [0, 1, 7, 1, block // 2]]
    return all(_mapped(call, [n, co, h, w, ci]) == [n, co * block + ci, h, w] for n, co, h, w, ci in probes)


def _scalar_min_max(func: tirx.PrimFunc):
    """relax.maximum/minimum if `func` is out[i] = max/min(a[i], b[()]), else None.

    The ONNX importer emits Clip (ReLU6) as such TIR calls; ConvertLayout cannot see through
    them and would wrap every ReLU6 in two layout transforms.
    """
    body = func.body
    while isinstance(body, (s_tir.SBlockRealize, s_tir.SBlock, tirx.For)):
        if isinstance(body, s_tir.SBlockRealize):
            body = body.block
        if isinstance(body, s_tir.SBlock) and body.name_hint != "root":
            break
        body = body.body
    if not (isinstance(body, s_tir.SBlock) and isinstance(body.body, tirx.BufferStore)):
        return None
    value, store = body.body.value, body.body
    ops = {tirx.Max: relax.op.maximum, tirx.Min: relax.op.minimum}
    if type(value) not in ops or len(func.params) != 3:
        return None
    a, b = value.a, value.b
    if not (isinstance(a, tvm.ir.TensorLoad) and isinstance(b, tvm.ir.TensorLoad)
            and not a.source.same_as(b.source)
            and len(b.indices) == 0 and len(a.indices) == len(store.indices)
            and all(x.same_as(y) for x, y in zip(a.indices, store.indices))):
        return None
    return ops[type(value)]


@expr_functor.mutator
class _ScalarMinMaxRecoverer(PyExprMutator):
    def visit_call_(self, call: relax.Call) -> relax.Expr:
        call = super().visit_call_(call)
        if not (isinstance(call.op, tvm.ir.Op) and call.op.name == "relax.call_tir"):
            return call
        func = self.builder_.get()[call.args[0]]
        op = _scalar_min_max(func) if isinstance(func, tirx.PrimFunc) else None
        if op is None or len(call.args[1].fields) != 2:
            return call
        # max/min commute, so only "one tensor, one scalar" matters, not the argument order.
        ranks = sorted((arg.ty.ndim, i) for i, arg in enumerate(call.args[1].fields))
        if [r for r, _ in ranks][0] != 0 or ranks[1][0] == 0:
            return call
        return op(call.args[1].fields[ranks[1][1]], call.args[1].fields[ranks[0][1]])


def _mutated(mod: tvm.IRModule, make_mutator) -> tvm.IRModule:
    """`mod` with every Relax function rewritten by one `make_mutator(mod)`."""
    mutator = make_mutator(mod)
    for gvar, func in mod.functions_items():
        if isinstance(func, relax.Function):
            mutator.builder_.update_func(gvar, mutator.visit_expr(func))
    return mutator.builder_.get()


@tvm.transform.module_pass(opt_level=0, name="RecoverScalarMinMax")
class _RecoverScalarMinMax:
    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        return relax.transform.DeadCodeElimination()(_mutated(mod, _ScalarMinMaxRecoverer))


@expr_functor.mutator
class _SplitSlicer(PyExprMutator):
    """A split at given indices becomes one strided_slice per part. TVM 0.27's ConvertLayout
    fails on such a split of a blocked tensor ("DataflowBlock Pass should not rewrite or delete
    any global-scope Var"): a conv followed by an ONNX Split with sizes did not compile. A split
    into equal sections converts, and is left as it is."""

    def visit_call_(self, call: relax.Call) -> relax.Expr:
        call = super().visit_call_(call)
        if not (isinstance(call.op, tvm.ir.Op) and call.op.name == "relax.split"):
            return call
        indices, shape = call.attrs.indices_or_sections, _static_shape(call.args[0])
        if not hasattr(indices, "__len__") or shape is None:
            return call
        axis = int(call.attrs.axis) % len(shape)
        bounds = [0, *(min(int(i), shape[axis]) for i in indices), shape[axis]]
        return relax.Tuple([self.builder_.emit(relax.op.strided_slice(call.args[0], axes=[axis], begin=[b], end=[e]))
                            for b, e in zip(bounds, bounds[1:])])


@tvm.transform.module_pass(opt_level=0, name="SplitAsSlices")
class _SplitAsSlices:
    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        return _mutated(mod, _SplitSlicer)


def _blocked_layout(layout: str) -> bool:
    return layout.startswith("NCHW") and layout.endswith("c") and len(layout) > len("NCHWc")


def matmul_packed(x: te.Tensor, w_panels: te.Tensor, out_dtype: str) -> te.Tensor:
    """x [..., M, K] times a weight packed as column panels [N/p, K, p]: [..., M, N].

    Each panel is one contiguous K x p block, so the inner loop streams it linearly instead of
    touching a new cache line (and often a new page) for every k."""
    k_total = int(x.shape[-1])
    panels, _, panel = (int(d) for d in w_panels.shape)
    k = te.reduce_axis((0, k_total), name="k")

    def compute(*idx):
        *lead, j = idx
        return te.sum(x[(*lead, k)].astype(out_dtype)
                      * w_panels[j // panel, k, j % panel].astype(out_dtype), axis=k)

    return te.compute((*x.shape[:-1], panels * panel), compute, name=MATMUL_BLOCK_NAME)


def _out_dtype(call: relax.Call) -> str:
    out_dtype = str(call.attrs.out_dtype) if call.attrs.out_dtype is not None else ""
    if out_dtype in ("", "void", "None"):  # unset: accumulate in the input dtype
        out_dtype = str(call.args[0].ty.dtype)
    return out_dtype


def _static_shape(expr: relax.Expr) -> list[int] | None:
    shape = getattr(expr.ty, "shape", None)
    if shape is None or not all(isinstance(d, tirx.IntImm) for d in shape):
        return None
    return [int(d) for d in shape]


@expr_functor.mutator
class _CpuOpLowerer(PyExprMutator):
    """Lowers NCHW{c}c conv2d (which LegalizeOps cannot), NCHW{c}c pools and constant-weight matmul to TIR."""

    def __init__(self, mod: tvm.IRModule, panel: int, winograd: bool):
        super().__init__(mod)
        self.panel, self.winograd = panel, winograd

    def visit_call_(self, call: relax.Call) -> relax.Expr:
        call = super().visit_call_(call)
        if not isinstance(call.op, tvm.ir.Op):
            return call
        if call.op.name == "relax.nn.conv2d":
            return self._conv2d(call)
        if call.op.name == "relax.matmul":
            return self._matmul(call)
        if call.op.name in ("relax.nn.max_pool2d", "relax.nn.avg_pool2d"):
            return self._pool2d(call)
        if call.op.name == "relax.layout_transform" and not isinstance(call.args[0], tvm.ir.expr.Constant):
            block = _to_blocked_block(call)
            if block:
                return self.builder_.call_te(nchw_to_nchwc, call.args[0], block, primfunc_name_hint="layout_transform_to_blocked")
            if _is_to_plain(call):
                return self.builder_.call_te(nchwc_to_nchw, call.args[0], primfunc_name_hint="layout_transform_to_plain")
        return call

    def _conv2d(self, call: relax.Call) -> relax.Expr:
        attrs = call.attrs
        if not (_blocked_layout(attrs.out_layout) and attrs.data_layout in ("NCHW", attrs.out_layout)
                and attrs.kernel_layout.startswith("OIHW") and attrs.kernel_layout.endswith("o")):
            return call
        ints = lambda xs: [int(x) for x in xs]  # noqa: E731
        data = call.args[0]
        if attrs.data_layout == attrs.out_layout and self._identity(call):
            return data
        if self.winograd and self._winograd_fits(call):
            return self._winograd(call)
        if attrs.data_layout == "NCHW":  # plain input: blocks of one channel (a reshape is a view, not a copy)
            data = self.builder_.emit(relax.op.reshape(data, [*_static_shape(data), 1]))
        weight = call.args[1]
        root = _constant_root(self, weight)
        c_block = _static_shape(data)[-1]
        if attrs.data_layout != "NCHW" and root is not None and _packs_weight(
                _static_shape(weight), np.dtype(str(weight.ty.dtype)).itemsize, c_block, int(attrs.groups)):
            # A layout_transform of a constant: FoldConstant packs it at compile time.
            weight = self.builder_.emit(relax.op.layout_transform(
                weight, index_map=lambda o, i, h, w, oo: (o, i // c_block, h, w, i % c_block, oo)))
        reduced = None
        if root is not None and int(attrs.groups) == 1:
            reduced = weight_summed_channels(root.value.numpy(), c_block)
        return self.builder_.call_te(conv2d_nchwc, data, weight,
                                     ints(attrs.strides), ints(attrs.padding),
                                     ints(attrs.dilation), int(attrs.groups), _out_dtype(call), reduced,
                                     primfunc_name_hint="conv2d_nchwc")

    def _pool2d(self, call: relax.Call) -> relax.Expr:
        attrs = call.attrs
        shape, ints = _static_shape(call.args[0]), (lambda xs: [int(x) for x in xs])  # noqa: E731
        if not (shape is not None and len(shape) == 5 and _blocked_layout(attrs.layout) and attrs.out_layout == attrs.layout
                and not attrs.ceil_mode and ints(attrs.dilation) == [1, 1] and str(call.args[0].ty.dtype) == "float32"):
            return call
        kind = "max" if call.op.name == "relax.nn.max_pool2d" else "avg"
        return self.builder_.call_te(pool2d_nchwc, call.args[0], kind, ints(attrs.pool_size), ints(attrs.strides),
                                     ints(attrs.padding), bool(attrs.count_include_pad),
                                     primfunc_name_hint=f"{kind}_pool2d_nchwc",
                                     primfunc_attrs={"op_pattern": OUT_ELEMWISE_FUSABLE})

    def _winograd_fits(self, call: relax.Call) -> bool:
        attrs = call.attrs
        weight = _constant_root(self, call.args[1])
        if weight is None or attrs.data_layout != attrs.out_layout or str(call.args[0].ty.dtype) != "float32":
            return False
        out = _static_shape(call)
        return out is not None and _out_dtype(call) == "float32" and winograd.fits(
            tuple(weight.value.shape[2:]), tuple(int(v) for v in attrs.strides),
            tuple(int(v) for v in attrs.dilation), tuple(int(v) for v in attrs.padding), int(attrs.groups),
            (out[2], out[3]), (int(weight.value.shape[1]), int(weight.value.shape[0])))

    def _winograd(self, call: relax.Call) -> relax.Expr:
        data = call.args[0]
        n, _, height, width, _ = _static_shape(data)
        out_block = _static_shape(call)[-1]
        u = relax.const(winograd.transformed_weight(_constant_root(self, call.args[1]).value.numpy()))
        v = self.builder_.emit(self.builder_.call_te(winograd.winograd_input, data, primfunc_name_hint=winograd.INPUT_FUNC))
        m = self.builder_.emit(self.builder_.call_te(winograd.winograd_matmul, v, u, "float32",
                                                     primfunc_name_hint=winograd.MATMUL_FUNC))
        # an anchor like a conv's: its elementwise epilogue fuses in, the next conv's input
        # transform or a concat does not (fused, they are inlined into its tile loops)
        return self.builder_.call_te(winograd.winograd_output, m, n, height, width, out_block,
                                     primfunc_name_hint=winograd.OUTPUT_FUNC,
                                     primfunc_attrs={"op_pattern": OUT_ELEMWISE_FUSABLE})

    def _identity(self, call: relax.Call) -> bool:
        """A stride-1 unpadded 1x1 depthwise conv with unit weights and no dtype change (`_ReceivedBlocker`'s)."""
        weight = _constant_root(self, call.args[1])
        attrs, ones = call.attrs, (_unit_weight(weight) if weight is not None else None)
        return (ones is not None and int(attrs.groups) == ones.shape[0]
                and all(int(v) == 1 for v in [*attrs.strides, *attrs.dilation]) and not any(int(v) for v in attrs.padding)
                and _out_dtype(call) == call.args[0].ty.dtype)

    def _matmul(self, call: relax.Call) -> relax.Expr:
        x, w = call.args
        x_shape, w_shape = _static_shape(x), _static_shape(w)
        if not (isinstance(w, tvm.ir.expr.Constant) and x_shape and w_shape and len(w_shape) == 2
                and len(x_shape) >= 2):
            return call
        # Two vectors wide when N allows, else one; else two, the last panel padded with zero
        # columns that are sliced off after (1000 classes under AVX-512). Padding the packed
        # constant costs nothing at run time; the unpacked fallback pads B on every call.
        columns = w_shape[1]
        panel = next((p for p in (self.panel, self.panel // 2) if columns % p == 0), self.panel)
        if int(np.prod(x_shape[:-1])) == 1:
            # one row (a classifier): nothing to reuse a weight for, the kernel streams B, and
            # wider panels keep more of it in flight (512 x 1000 at 2 threads: 0.048 ms with
            # one-vector panels, 0.028 with two, 0.023 with four)
            panel = GEMV_PANEL_PER_MATMUL_PANEL * self.panel
        # A layout_transform of a constant: FoldConstant packs the weight at compile time.
        packed = self.builder_.emit(relax.op.layout_transform(
            w, index_map=lambda k, n: (n // panel, k, n % panel), pad_value=0.0 if columns % panel else None))
        out = self.builder_.call_te(matmul_packed, x, packed, _out_dtype(call), primfunc_name_hint="matmul_packed")
        if columns % panel == 0:
            return out
        return relax.op.strided_slice(self.builder_.emit(out), axes=[len(x_shape) - 1], begin=[0], end=[columns])


@tvm.transform.module_pass(opt_level=0, name="LowerCpuOps")
class _LowerCpuOps:
    def __init__(self, panel: int, winograd: bool):
        self.panel, self.winograd = panel, winograd

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        return _mutated(mod, lambda m: _CpuOpLowerer(m, self.panel, self.winograd))


def block_fits(block: int, conv: tuple[int, int, int]) -> bool:
    """Whether an NCHW{block}c layout can hold this (in, out, groups) conv: dense or depthwise,
    both channel counts multiples of the block."""
    cin, cout, groups = conv
    return (groups == 1 or groups == cin == cout) and cin > 0 and cout > 0 and cin % block == 0 and cout % block == 0


def writes_blocked(block: int, conv: tuple[int, int, int]) -> bool:
    """Whether a dense conv the block cannot hold (`block_fits` is False: a 3-channel stem) still
    writes NCHW{block}c: it reads plain NCHW and its output channels fill whole blocks."""
    cin, cout, groups = conv
    return groups == 1 and cin > 0 and cout > 0 and cout % block == 0


def conv_block(convs: list[tuple[int, int, int]], channel_block: int, fixed: list[int] = ()) -> int | None:
    """Channels per NCHW{c}c block for a model's convs, given as (in, out, groups); None: all plain.

    One block for the whole model, since TVM's ConvertLayout cannot convert between blocks of
    different widths: the widest, from `channel_block` halving down to MIN_CONV_BLOCK, that
    divides the channels of every dense or depthwise conv that some block divides (a narrower
    vector beats the plain layout's scalar channel loop by far). Convs it does not divide, such
    as a 3-channel stem, stay plain. It must also divide every channel count in `fixed`: the
    tensors joined or cut along channels (Concat, Split, Slice), which ConvertLayout would
    otherwise try to block whatever their channels.
    """
    blocks = []
    b = channel_block
    while b >= MIN_CONV_BLOCK:
        blocks.append(b)
        b //= 2
    blockable = [c for c in convs if blocks and block_fits(blocks[-1], c)]
    if not blockable:
        return None
    return next((blk for blk in blocks
                 if all(block_fits(blk, c) for c in blockable) and all(f % blk == 0 for f in fixed)), None)


def reduced_in_channels(weight: np.ndarray) -> int:
    """Input channels a dense conv with OIHW `weight` sums over: up to its last input channel with a
    nonzero weight (at least one). The channels `pad_channels` adds to a conv's input carry zero
    weights: Inception's 8 -> 16 conv padded to 16 -> 16 would compute twice its MACs."""
    nonzero = np.flatnonzero(np.any(weight.reshape(weight.shape[0], weight.shape[1], -1) != 0, axis=(0, 2)))
    return int(nonzero[-1]) + 1 if nonzero.size else 1


def summed_channels(reduced: int, in_channels: int, c_block: int | None, window: int) -> int:
    """Input channels a dense conv's reduction runs over, of `in_channels`: the `reduced` its weight
    reads, rounded up to whole blocks of `c_block` in a conv with a `window` over 1 pixel where a
    partial block would leave steps of fewer channels. Inception's 12 -> 24 3x3 convs summed 12 of
    16 channels 4 at a time at 42 GFLOP/s, against 78 for its 24 -> 24; summed over 16, the whole
    model ran 1.065x faster (2 threads, Zen 3). A 1x1 conv keeps its sum (DenseNet's 52 -> 56
    rounded ran 0.98x)."""
    if c_block and window > 1 and reduced > c_block and reduced % c_block:
        return min(in_channels, -(-reduced // c_block) * c_block)
    return reduced


def weight_summed_channels(weight: np.ndarray, c_block: int | None) -> int:
    """Input channels a dense conv with OIHW `weight` sums over in blocks of `c_block` (None:
    plain): `reduced_in_channels`, then `summed_channels`."""
    return summed_channels(reduced_in_channels(weight), weight.shape[1], c_block, int(np.prod(weight.shape[2:])))


def _conv_shapes(call: relax.Call) -> tuple[int, int, int] | None:
    """(in channels, out channels, groups) of an NCHW conv2d with static shapes."""
    data, weight = _static_shape(call.args[0]), _static_shape(call.args[1])
    if call.attrs.data_layout != "NCHW" or data is None or weight is None:
        return None
    return data[1], weight[0], int(call.attrs.groups)


# ops that join or cut tensors, along channels among others: their tensors' channel counts bind the block
_CHANNEL_BINDING_OPS = {"relax.concat", "relax.split", "relax.strided_slice"}


def _channel_counts(expr: relax.Expr) -> list[int]:
    """Channel counts (dim 1) of the static 4-D tensors `expr` is or holds."""
    ty = expr.ty
    counts = []
    for t in (list(ty.fields) if hasattr(ty, "fields") else [ty]):
        shape = getattr(t, "shape", None)
        if shape is not None and len(shape) == 4 and isinstance(shape[1], tirx.IntImm):
            counts.append(int(shape[1]))
    return counts


# Relax ops ConvertLayout runs in NCHW{c}c when their input arrives so (a conv, whatever arrives)
_BLOCKED_READERS = {"relax.nn.conv2d", "relax.nn.max_pool2d", "relax.nn.avg_pool2d", "relax.concat", "relax.mean",
                    "relax.nn.relu", "relax.add", "relax.multiply", "relax.subtract", "relax.divide", "relax.clip",
                    "relax.sigmoid", "relax.tanh", "relax.maximum", "relax.minimum", "relax.negative", "relax.abs",
                    "relax.exp", "relax.sqrt", "relax.erf"}


def _packs_weight(kernel_shape: list[int], itemsize: int, c_block: int, groups: int) -> bool:
    """Whether a dense blocked conv's OIHW{o}o weight is packed to OIHW{c}i{o}o.

    The conv's inner loop walks input channels; in OIHW{o}o each step is KH*KW vectors away
    from the last (576 bytes for 3x3), packed they are adjacent and the weights stream. That
    matters once an output block's slice of the weight outgrows L1: a 512-channel 3x3 conv
    at 7x7 ran 9% faster packed at one thread (256 at 14x14: 8%), a 64-channel one the same."""
    o_chunks, in_channels, kh, kw, o_block = kernel_shape
    return (groups == 1 and c_block > 1 and in_channels % c_block == 0 and kh * kw > 1
            and in_channels * kh * kw * o_block * itemsize > PACKED_WEIGHT_MIN_BYTES)


def _constant_root(mutator: PyExprMutator, weight: relax.Expr) -> tvm.ir.expr.Constant | None:
    """The constant a weight is a (layout transform of a) binding of, else None."""
    while isinstance(weight, relax.Var) and mutator.lookup_binding(weight) is not None:
        weight = mutator.lookup_binding(weight)
    while isinstance(weight, relax.Call) and weight.op == tvm.ir.Op.get("relax.layout_transform"):
        weight = weight.args[0]
    return weight if isinstance(weight, tvm.ir.expr.Constant) else None


def _unit_weight(expr: relax.Expr) -> np.ndarray | None:
    """The value of a constant 1x1 depthwise weight of ones (an identity conv's weight), else None."""
    if not isinstance(expr, tvm.ir.expr.Constant):
        return None
    value = expr.value.numpy()
    return value if value.shape[1:] == (1, 1, 1) and bool((value == 1).all()) else None


@expr_functor.mutator
class _ReceivedBlocker(PyExprMutator):
    """Gives each received tensor (a parameter, or a channel pad of one) that ConvertLayout would
    otherwise leave plain an identity depthwise conv, its only reader: ConvertLayout then blocks it
    once, and the pooling, elementwise ops and concats reading it follow in NCHW{c}c as they do in
    the whole model. (A tail's cut tensors arrive plain: a concat of one with blocked branches ran
    plain, and the pools after it; Inception's tail at its 71st cut took 0.47 ms, its part of the
    whole model 0.29.) `_CpuOpLowerer` turns the identity conv back into its input."""

    def __init__(self, mod: tvm.IRModule, block: int, params: set):
        super().__init__(mod)
        self.block, self.params, self.blocked = block, params, {}

    def _received(self, arg: relax.Expr) -> bool:
        if not isinstance(arg, relax.Var):
            return False
        shape = _static_shape(arg)
        if shape is None or len(shape) != 4 or shape[1] % self.block:
            return False
        if arg in self.params:
            return True
        # a channel pad of one: the ONNX importer emits Pad as a call_tir, opaque to ConvertLayout
        value = self.lookup_binding(arg)
        if not isinstance(value, relax.Call):
            return False
        if value.op == tvm.ir.Op.get("relax.nn.pad"):
            return value.args[0] in self.params
        return (value.op == tvm.ir.Op.get("relax.call_tir") and len(value.args[1].fields) == 1
                and value.args[1].fields[0] in self.params)

    def visit_call_(self, call: relax.Call) -> relax.Expr:
        call = super().visit_call_(call)
        if not (isinstance(call.op, tvm.ir.Op) and call.op.name in _BLOCKED_READERS):
            return call
        args = list(call.args[0].fields) if call.op.name == "relax.concat" else list(call.args)
        if not any(self._received(x) for x in args):
            return call
        args = [self._blocked(x) if self._received(x) else x for x in args]
        if call.op.name == "relax.concat":
            return relax.Call(call.op, [relax.Tuple(args)], call.attrs)
        return relax.Call(call.op, args, call.attrs, call.ty_args)

    def _blocked(self, x: relax.Var) -> relax.Var:
        if x not in self.blocked:
            channels = _static_shape(x)[1]
            ones = relax.const(np.ones((channels, 1, 1, 1), dtype=str(x.ty.dtype)))
            self.blocked[x] = self.builder_.emit(relax.op.nn.conv2d(x, ones, groups=channels))
        return self.blocked[x]


def _block_received(mod: tvm.IRModule, block: int) -> tvm.IRModule:
    for gvar, func in mod.functions_items():
        if isinstance(func, relax.Function):
            blocker = _ReceivedBlocker(mod, block, set(func.params))
            mod = tvm.IRModule({**{g: f for g, f in mod.functions_items()}, gvar: blocker.visit_expr(func)})
    return mod


@tvm.transform.module_pass(opt_level=0, name="ConvertConvLayout")
class _ConvertConvLayout:
    """ConvertLayout with the model's `conv_block` for each conv2d its block divides."""

    def __init__(self, channel_block: int):
        self.channel_block = channel_block

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        convs, fixed = [], []

        def collect(expr):
            if not (isinstance(expr, relax.Call) and isinstance(expr.op, tvm.ir.Op)):
                return
            if expr.op.name == "relax.nn.conv2d":
                convs.append(_conv_shapes(expr))
            elif expr.op.name in _CHANNEL_BINDING_OPS:
                fixed.extend(_channel_counts(expr) + [c for arg in expr.args for c in _channel_counts(arg)])

        for _, func in mod.functions_items():
            if isinstance(func, relax.Function):
                relax.analysis.post_order_visit(func, collect)
        block = conv_block([c for c in convs if c], self.channel_block, fixed)
        if block is None:
            return mod

        def layouts(call: relax.Call):
            if not (isinstance(call.op, tvm.ir.Op) and call.op.name == "relax.nn.conv2d"):
                return {}
            shapes = _conv_shapes(call)
            if shapes is None:
                return {}
            if block_fits(block, shapes):
                return {"relax.nn.conv2d": [f"NCHW{block}c", f"OIHW{block}o"]}
            if writes_blocked(block, shapes):
                # reads plain, writes blocked: the readers of a 3-channel stem's output then need
                # no transform of it (0.6 ms of MobileNetV2's 5.8 at 224 px)
                return {"relax.nn.conv2d": ["NCHW", f"OIHW{block}o", f"NCHW{block}c"]}
            # asked for explicitly: left to infer its layout from a blocked input (a concat of
            # blocked branches, say), ConvertLayout fails on a conv the block cannot hold
            return {"relax.nn.conv2d": ["NCHW", "OIHW"]}

        return relax.transform.ConvertLayout({}, layouts)(_block_received(mod, block))


def lowering_passes(channel_block: int, matmul_panel: int, winograd: bool = True) -> list[tvm.transform.Pass]:
    """Relax passes, before LegalizeOps: NCHW{c}c convs (c from `conv_block`), Winograd for the 3x3
    ones `winograd.fits` (unless `winograd` is False), NCHW{c}c pools, packed matmul weights."""
    # FoldConstant first turns Gemm's transposed weight into a plain constant the matmul
    # lowering can pack.
    # ConvertLayout gives each reader of a tensor its own layout_transform; CSE keeps one per
    # tensor and layout (a stem read by four branches was transformed four times).
    return [relax.transform.FoldConstant(), _RecoverScalarMinMax(), _SplitAsSlices(),
            _ConvertConvLayout(channel_block), relax.transform.EliminateCommonSubexpr(), _LowerCpuOps(matmul_panel, winograd)]
