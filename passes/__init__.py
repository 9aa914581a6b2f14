"""Graph rewrites over onnx.ModelProto: each a pure function that returns a new, checked model.

PREPARE is the pipeline every model goes through before cuts are enumerated.
"""

from nasc.passes.dce import eliminate_dead_nodes
from nasc.passes.fold import fold_batchnorm, fold_constants
from nasc.passes.pad_channels import channel_layouts, pad_channels
from nasc.passes.quantize import QuantParams, dequantize_tail, quant_params, quantize_head
from nasc.passes.split import extract_half, extract_head, extract_tail, split_model

PREPARE = [
    ("fold-constants", fold_constants),
    ("fold-batchnorm", fold_batchnorm),
    ("eliminate-dead-nodes", eliminate_dead_nodes),
]


def prepare(model, log=None):
    """Run the PREPARE passes in order; `log(name)` is called before each."""
    for name, fn in PREPARE:
        if log:
            log(name)
        model = fn(model)
    return model


__all__ = [
    "PREPARE", "QuantParams", "channel_layouts", "dequantize_tail", "eliminate_dead_nodes", "extract_half", "extract_head",
    "extract_tail", "fold_batchnorm", "fold_constants", "pad_channels", "prepare", "quant_params", "quantize_head",
    "split_model",
]
