"""The SIMD shape of a CPU target, which every layout and tile size derives from."""

from __future__ import annotations

from dataclasses import dataclass

import tvm

# Most output columns per conv register tile (a tile is rows output-channel blocks x cols pixels,
# one accumulator each; the 7-wide rows of CNNs at 7x7 and 14x14 fit one tile row).
REGISTER_TILE_COLS = 8
# AVX2 has 16 vector registers: 12 accumulators, the broadcast pixel and weight vectors read from
# memory by the FMAs. Tall tiles load fewer operands per FMA: 6 blocks x 2 pixels ran MobileNetV2's
# 1x1 convs at 14x14 and 28x28 at 1.3-1.4x the speed of 1 block x 7-8 pixels (2 threads, Zen 3),
# and 2 x 7 (14 accumulators) spilled and ran 0.6x.
AVX2_TILE_ROWS = 6
AVX2_TILE_ACCUMULATORS = 12
# AVX-512 has 32 registers: two blocks x 8 columns = 16 accumulators, enough independent FMAs to
# cover their latency on both FMA ports, and each broadcast input pixel feeds two of them.
AVX512_TILE_ROWS = 2
AVX512_TILE_ACCUMULATORS = 16
# Channels per layout block span at least 256 bits: one AVX2 register, two NEON ones, and a
# whole register on AVX-512 (whose block is then 512 bits).
MIN_CHANNEL_BLOCK_BITS = 256
FLOAT32_BITS = 32


@dataclass(frozen=True)
class CpuVectorSpec:
    """What the schedules need to know about a CPU target."""

    vector_bits: int
    channel_block: int
    conv_tile_cols: int = REGISTER_TILE_COLS
    conv_tile_rows: int = 1
    conv_tile_accumulators: int = REGISTER_TILE_COLS
    # AVX2 and AVX-512 load a vector from lanes a stride apart in one instruction (a gather)
    gathers: bool = False

    def conv_tile(self, channel_blocks: int, width: int, block: int | None = None) -> tuple[int, int]:
        """(rows, cols) of the register tile for a conv with `channel_blocks` output blocks of
        `block` channels (default `channel_block`) and `width` output columns: both divide, and
        the tile holds the most accumulators that fit, the taller of equal ones (fewer loads per
        FMA). A block narrower than the vector is a narrower register: a tile may be that many
        times as tall (block 8 under AVX-512: ShuffleNetV2's 3 -> 24 stem 3 x 4 instead of 1 x 8,
        0.091 -> 0.079 ms, its 1x1 convs 1.3x faster; 2 threads, Zen 5)."""
        tall = self.conv_tile_rows * max(1, self.lanes // (block or self.channel_block))
        fits = [(r * c, r, c) for r in range(1, min(channel_blocks, tall) + 1) if channel_blocks % r == 0
                for c in range(1, min(width, self.conv_tile_cols) + 1) if width % c == 0
                and r * c <= self.conv_tile_accumulators]
        _, rows, cols = max(fits)
        return rows, cols

    @property
    def matmul_cols(self) -> int:
        """Output columns per matmul register tile (= the weight panel width): two vectors."""
        return 2 * self.lanes

    @property
    def lanes(self) -> int:
        """float32 lanes per vector register."""
        return self.vector_bits // FLOAT32_BITS


def cpu_vector_spec(target: tvm.target.Target) -> CpuVectorSpec:
    """SIMD width of `target`: NEON 128 bit, AVX-512 512, AVX/AVX2 256, plain x86 128."""
    triple = str(target.attrs.get("mtriple", ""))
    if triple.startswith(("aarch64", "arm")):
        bits = 128
    elif tvm.target.codegen.llvm_cpu_has_features("avx512f", target):
        bits = 512
    elif tvm.target.codegen.llvm_cpu_has_features("avx", target):
        bits = 256
    else:
        bits = 128
    block = max(bits, MIN_CHANNEL_BLOCK_BITS) // FLOAT32_BITS
    gathers = bits >= 256 and tvm.target.codegen.llvm_cpu_has_features("avx2", target)
    if bits == 512:
        return CpuVectorSpec(bits, block, conv_tile_rows=AVX512_TILE_ROWS, conv_tile_accumulators=AVX512_TILE_ACCUMULATORS,
                             gathers=gathers)
    if bits == 256:
        return CpuVectorSpec(bits, block, conv_tile_rows=AVX2_TILE_ROWS, conv_tile_accumulators=AVX2_TILE_ACCUMULATORS,
                             gathers=gathers)
    # NEON and SSE: a block is 256 bits, two registers, so one block x 8 columns is 16 of them
    return CpuVectorSpec(bits, block)
