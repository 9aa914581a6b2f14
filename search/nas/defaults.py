"""Named defaults of the NAS side: space sizes, training schedule, search budgets, links.

Every number the NAS code would otherwise hard-code lives here, so runs diff cleanly and a
reader finds the knobs in one place.
"""

from __future__ import annotations

from nasc.types import Link

# NAS-Bench-201 cell space (Dong & Yang, ICLR 2020): op order and the seed NB201 used to shuffle
# the lexicographic enumeration into its published architecture index.
NB201_OPS = ("none", "skip_connect", "nor_conv_1x1", "nor_conv_3x3", "avg_pool_3x3")
NB201_NUM_EDGES = 6
NB201_SHUFFLE_SEED = 88
# The macro skeleton NB201 trained for its tables: C=16, N=5 cells per stage, 32x32 inputs.
NB201_TABLE_CHANNELS = 16
NB201_TABLE_CELLS = 5
NB201_TABLE_RESOLUTION = 32
NB201_TABLE_CLASSES = 10

# MobileNetV2/FBNet-style space: 3 stages of N inverted-residual blocks (widths C, 2C, 4C; the
# first block of stages 2 and 3 halves the resolution); each block picks a depthwise kernel and an
# expansion ratio, and a block that keeps its shape may also be skipped.
MBV2_KERNELS = (3, 5)
MBV2_EXPANSIONS = (3, 6)
MBV2_SKIP = "skip"
MBV2_STAGES = 3
# The head's 1x1 conv widens the last stage by this factor before pooling (as MobileNetV2's 320->1280).
MBV2_HEAD_EXPANSION = 4
# The latency table is dense over (arch, cut): spaces larger than this are refused up front.
MAX_DENSE_ARCHS = 250_000

# Small CPU defaults for the supernet path.
DEFAULT_CHANNELS = 8
DEFAULT_CELLS_PER_STAGE = 2
DEFAULT_RESOLUTION = 16
DEFAULT_BATCH_SIZE = 32
# 60 epochs at lr 0.025 train every connected NB201 subnet of the digits supernet to 79-97% (10
# epochs at lr 0.1 left many below 50%); Kendall tau vs the NB201 table rose from -0.23 to 0.05-0.17
# over two seeds, the best of the recipes tried (benchmarks/nas_ranking.py).
DEFAULT_EPOCHS = 60
DEFAULT_LR = 0.025
DEFAULT_MOMENTUM = 0.9
DEFAULT_WEIGHT_DECAY = 5e-4
DEFAULT_SEED = 0
GRAD_CLIP_NORM = 5.0
EVAL_BATCH_SIZE = 256
# Torch intra-op threads for NAS training and evaluation. These convs are tiny, so extra threads
# gain little, while OpenMP threads spinning on cores other jobs hold slowed training 5-20x on a
# shared 2-core machine; one thread also makes results independent of the core count.
TORCH_THREADS = 1
DEFAULT_VAL_FRACTION = 0.2
# distinct_weights moves BN parameters and statistics by U[0, offset): small, positive (variances stay
# positive), and continuous, so no two folded tensors coincide.
DISTINCT_BN_OFFSET = 0.1
# BN recalibration: batches of training data pushed through a sampled subnet before it is scored.
DEFAULT_BN_RECAL_BATCHES = 4
# Evolutionary search with the supernet (regularised evolution, Real et al. 2019).
DEFAULT_EVO_POPULATION = 24
DEFAULT_EVO_SAMPLE = 6
DEFAULT_EVO_CYCLES = 150

# The NASC table: three links and three latency ratios R (threshold = R x latency of baseline (a)).
TABLE_LINKS = (
    Link(bandwidth_mbit=1.0, rtt_ms=50.0, name="1Mbit/50ms"),
    Link(bandwidth_mbit=20.0, rtt_ms=10.0, name="20Mbit/10ms"),
    Link(bandwidth_mbit=200.0, rtt_ms=2.0, name="200Mbit/2ms"),
)
TABLE_RATIOS = (0.2, 0.4, 0.6)
# Kendall tau sample size (supernet estimate vs table / standalone training).
DEFAULT_TAU_SAMPLE = 40

# float32 activations; the optional int8 cut payload is a quarter of that.
FLOAT_BYTES = 4
INT8_PAYLOAD_FRACTION = 0.25
# One float32 scale + one uint8 zero point per compressed tensor (as the compile path sends).
INT8_QPARAM_BYTES = 5

ONNX_OPSET = 17
SPLIT_METADATA_KEY = "nasc.split"
SPLIT_DEVICE_ONLY = "device-only"
# Environment variable and relative locations searched for the NB201 tables.
NB201_DATA_ENV = "NASC_NB201_DATA"
NB201_DATA_RELATIVE = ("../shared/data", "shared/data")
NB201_DEFAULT_TABLE = "nb201_cifar10valid_200ep_metrics.csv"
NB201_TABLE_COLUMNS = {
    # file name -> (column with the arch string, default accuracy column)
    "nb201_cifar10valid_200ep_metrics.csv": ("arch_str", "valid-accuracy"),
    "nb201_tss_test_acc_200ep.csv": ("ArchitectureString", "CIFAR10TestAccuracy200Epochs"),
    "nb201_12ep_accs_minibench.csv": ("cellstr", "cifar10-val"),
}
