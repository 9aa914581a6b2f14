"""Load an ONNX model, analyse its nodes, and enumerate the cuts between device and server."""

from nasc.partitioner.analysis import Analysis, analyze
from nasc.partitioner.cuts import DEVICE_ONLY, SERVER_ONLY, SPLIT, Cut, cut_from_tensors, enumerate_cuts, quant_axis
from nasc.partitioner.load import load_model, parse_shape

__all__ = [
    "Analysis", "Cut", "DEVICE_ONLY", "SERVER_ONLY", "SPLIT", "analyze", "cut_from_tensors",
    "enumerate_cuts", "load_model", "parse_shape", "quant_axis",
]
