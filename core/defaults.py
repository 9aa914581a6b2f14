"""Every default nasc uses, named in one place.

Hardware numbers here are *analytic* (datasheet-style); a profile file or the measured
latency model replaces them. Anything reported from them says so (`source`).
"""

from nasc.types import HardwareProfile, Link

# Device: this host's CPU as an IoT/edge device, 2 threads. Effective (not peak) numbers:
# sustained FP32 GEMM-like throughput of a 2-core AVX2 machine and its DRAM stream bandwidth.
DEFAULT_DEVICE = HardwareProfile(
    name="host-cpu", peak_gflops=60.0, mem_bandwidth_gbs=12.0, kernel_overhead_us=4.0, source="analytic"
)
# Server: an A100/H100-class GPU at batch 1. Effective FP32 throughput at batch 1 is far below
# peak; the launch overhead per kernel dominates small layers.
DEFAULT_SERVER = HardwareProfile(
    name="h100-class-gpu", peak_gflops=15000.0, mem_bandwidth_gbs=1500.0, kernel_overhead_us=6.0, source="analytic"
)
DEFAULT_LINK = Link(bandwidth_mbit=20.0, rtt_ms=10.0, name="wifi")

# Named link presets accepted wherever a link is given.
LINK_PRESETS = {
    "wifi": DEFAULT_LINK,
    "lte": Link(bandwidth_mbit=10.0, rtt_ms=40.0, name="lte"),
    "3g": Link(bandwidth_mbit=1.0, rtt_ms=100.0, name="3g"),
    "slow": Link(bandwidth_mbit=1.0, rtt_ms=50.0, name="slow"),
    "fast": Link(bandwidth_mbit=200.0, rtt_ms=2.0, name="fast"),
}

DEFAULT_DEVICE_TARGET = "llvm"
DEFAULT_SERVER_TARGET = "cuda"
DEFAULT_CUDA_ARCH = "sm_90"

# Verification: head-then-tail vs ORT on the original model.
VERIFY_ATOL = 1e-4
VERIFY_RTOL = 1e-4
# TVM reassociates float reductions differently from ORT; compiled halves get a looser bound.
VERIFY_TVM_ATOL = 1e-3
VERIFY_SAMPLES = 2
CALIB_SAMPLES = 8
SEED = 0

# Table rendering: how many candidate cuts the CLI shows.
TABLE_TOP_K = 12
