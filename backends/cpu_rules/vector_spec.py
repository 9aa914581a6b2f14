"""The SIMD shape of a CPU target, which every layout and tile size derives from."""

from __future__ import annotations

from dataclasses import dataclass

import tvm

# Output columns held in registers per conv tile: 8 accumulators of one vector each leave half
# of the 16 AVX2 / 32 NEON vector registers for the weight vector and the broadcasts.
REGISTER_TILE_COLS = 8
# Output-channel blocks per conv tile. AVX-512 has 32 registers: two blocks x 8 columns = 16
# accumulators, enough independent FMAs to cover their latency on both FMA ports, and each
# broadcast input pixel feeds two of them.
WIDE_REGISTER_TILE_ROWS = 2
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
    return CpuVectorSpec(vector_bits=bits,
                         channel_block=max(bits, MIN_CHANNEL_BLOCK_BITS) // FLOAT32_BITS,
                         conv_tile_rows=WIDE_REGISTER_TILE_ROWS if bits == 512 else 1)
