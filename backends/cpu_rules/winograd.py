"""Winograd F(4x4, 3x3) for stride-1 3x3 convs in NCHW{c}c: each 6x6 input tile is transformed,
multiplied by the pre-transformed weight as 36 independent matmuls over channels, and
transformed back into a 4x4 output tile: 2.25 multiplies per output where the direct conv has 9.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from tvm import te

# TVM is imported by the functions that build TIR: `fits` is also what the kernel predictor
# (search/predictor.py) asks, which runs without TVM loaded.

INPUT_NAME = "nasc_winograd_input"
INPUT_COLUMNS_NAME = "nasc_winograd_input_columns"
OUTPUT_ROWS_NAME = "nasc_winograd_output_rows"
MATMUL_NAME = "nasc_winograd_matmul"
OUTPUT_NAME = "nasc_winograd_output"
# PrimFunc names of the stages before the output transform: their outputs are no ONNX tensor
INPUT_FUNC, MATMUL_FUNC, OUTPUT_FUNC = "winograd_input", "winograd_matmul", "winograd_output"
TILE = 4                      # output pixels per tile side, m in F(m x m, 3 x 3)
KERNEL = 3
ALPHA = TILE + KERNEL - 1     # input pixels per tile side
WEIGHT_GROWTH = ALPHA * ALPHA // (KERNEL * KERNEL)   # transformed weight bytes per direct weight byte
# The 36 matmuls use each transformed weight once per tile, and the weights are 4x the direct
# conv's. With few tiles that only pays while they stay cached: at 2 threads on Zen 3, 512
# channels at 7x7 (4 tiles, 38 MB of weights) ran 0.59x the direct conv, 512 at 14x14 (16 tiles)
# 0.92-1.8x, 256 at 7x7 (9.4 MB) 1.6-3.3x.
MIN_TILES = 64
MAX_CACHED_WEIGHT_BYTES = 16 * 1024 * 1024
# With fewer channels the matmuls are too short to beat the direct conv: in Inception at 224 px,
# 8 -> 16 channels at 112x112 ran 0.73x the direct conv, 16 -> 16 1.2x, 24 -> 24 at 56x56 1.08x.
MIN_CHANNELS = 32

# F(4, 3) at the points 0, 1, -1, 2, -2 and infinity (Lavin & Gray): Y = A^T [(G g G^T) * (B^T d B)] A
_BT = np.array([[4, 0, -5, 0, 1, 0],
                [0, -4, -4, 1, 1, 0],
                [0, 4, -4, -1, 1, 0],
                [0, -2, -1, 2, 1, 0],
                [0, 2, -1, -2, 1, 0],
                [0, 4, 0, -5, 0, 1]], dtype=np.float64)
_G = np.array([[1 / 4, 0, 0],
               [-1 / 6, -1 / 6, -1 / 6],
               [-1 / 6, 1 / 6, -1 / 6],
               [1 / 24, 1 / 12, 1 / 6],
               [1 / 24, -1 / 12, 1 / 6],
               [0, 0, 1]], dtype=np.float64)
_AT = np.array([[1, 1, 1, 1, 1, 0],
                [0, 1, -1, 2, -2, 0],
                [0, 1, 1, 4, 4, 0],
                [0, 1, -1, 8, -8, 1]], dtype=np.float64)


def fits(kernel: tuple[int, ...], strides: tuple[int, ...], dilations: tuple[int, ...], pads: tuple[int, ...],
         groups: int, out_hw: tuple[int, int], channels: tuple[int, int], itemsize: int = 4) -> bool:
    """Whether a conv runs as Winograd on CPUs: a dense 3x3, stride 1, padding 1 ("same") conv with
    enough tiles, or weights small enough, for the matmuls to stay compute-bound. `channels` is
    (in, out), `pads` (top, left, bottom, right)."""
    th, tw = tiles(*out_hw)
    weight_bytes = ALPHA * ALPHA * channels[0] * channels[1] * itemsize
    return (tuple(kernel) == (KERNEL, KERNEL) and groups == 1 and min(channels) >= MIN_CHANNELS
            and all(s == 1 for s in strides) and all(d == 1 for d in dilations) and all(p == 1 for p in pads)
            and (th * tw >= MIN_TILES or weight_bytes <= MAX_CACHED_WEIGHT_BYTES))


def is_stage(symbol: str) -> bool:
    """Whether a compiled kernel is a Winograd conv's input transform or matmul: its output is
    an intermediate, the conv's output comes from the output transform that follows."""
    return INPUT_FUNC in symbol or MATMUL_FUNC in symbol


def transformed_weight(weight: np.ndarray) -> np.ndarray:
    """OIHW 3x3 weight [K, C, 3, 3] -> [6, 6, C, K], each (eps, nu) slice a C x K matmul operand."""
    return np.einsum("ai,kcij,bj->abck", _G, weight.astype(np.float64), _G).astype(weight.dtype)


def _combine(row, value):
    """sum_i row[i] * value(i) over the nonzero coefficients, with the unit ones left unmultiplied."""
    terms = []
    for i, coef in enumerate(row):
        if coef == 0:
            continue
        v = value(i)
        terms.append(v if coef == 1 else -v if coef == -1 else v * float(coef))
    out = terms[0]
    for t in terms[1:]:
        out = out + t
    return out


def _pick(index, rows, value):
    """The combination `rows[index]` of `value`, for a symbolic index that the schedule unrolls
    (the Select chain then folds to the one row's straight-line sum)."""
    from tvm import tirx

    out = _combine(rows[-1], value)
    for k in range(len(rows) - 2, -1, -1):
        out = tirx.Select(index == k, _combine(rows[k], value), out)
    return out


def tiles(height: int, width: int) -> tuple[int, int]:
    return -(-height // TILE), -(-width // TILE)


def winograd_input(data: te.Tensor) -> te.Tensor:
    """data [N, C/c, H, W, c] (padding 1) -> V [6, 6, N * tiles, C], channels innermost.

    B^T d B in two passes, columns then rows: each value is a short sum of loads, which keeps
    the unrolled code (and its compile time) small."""
    from tvm import te, topi

    n, chunks, height, width, c_block = (int(d) for d in data.shape)
    th, tw = tiles(height, width)
    padded = topi.nn.pad(data, [0, 0, 1, 1, 0],
                         [0, 0, th * TILE + 1 - height, tw * TILE + 1 - width, 0], name="winograd_pad")

    def columns(eps, j, p, ch):
        b, t = p // (th * tw), p % (th * tw)
        y0, x0 = t // tw * TILE, t % tw * TILE
        return _pick(eps, _BT, lambda i: padded[b, ch // c_block, y0 + i, x0 + j, ch % c_block])

    shape = (ALPHA, ALPHA, n * th * tw, chunks * c_block)
    half = te.compute(shape, columns, name=INPUT_COLUMNS_NAME)
    return te.compute(shape, lambda eps, nu, p, ch: _pick(nu, _BT, lambda j: half[eps, j, p, ch]), name=INPUT_NAME)


def winograd_matmul(v: te.Tensor, u: te.Tensor, out_dtype: str) -> te.Tensor:
    """M[eps, nu, p, k] = sum_c V[eps, nu, p, c] * U[eps, nu, c, k]."""
    from tvm import te  # noqa: F811

    c = te.reduce_axis((0, int(u.shape[2])), name="c")
    return te.compute((ALPHA, ALPHA, int(v.shape[2]), int(u.shape[3])),
                      lambda e, u_, p, k: te.sum(v[e, u_, p, c].astype(out_dtype) * u[e, u_, c, k].astype(out_dtype),
                                                  axis=c),
                      name=MATMUL_NAME)


def winograd_output(m: te.Tensor, n: int, height: int, width: int, c_block: int) -> te.Tensor:
    """M [6, 6, N * tiles, K] -> Y [N, K/c, H, W, c]: A^T M A in two passes, as the input's."""
    from tvm import te

    th, tw = tiles(height, width)
    k_total = int(m.shape[3])
    half = te.compute((TILE, ALPHA, int(m.shape[2]), k_total),
                      lambda y, u, p, k: _pick(y, _AT, lambda e: m[e, u, p, k]), name=OUTPUT_ROWS_NAME)

    def compute(b, ko, y, x, lane):
        p = b * th * tw + y // TILE * tw + x // TILE
        return _pick(x % TILE, _AT, lambda u: half[y % TILE, u, p, ko * c_block + lane])

    return te.compute((n, k_total // c_block, height, width, c_block), compute, name=OUTPUT_NAME)
