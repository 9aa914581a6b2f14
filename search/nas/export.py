"""ONNX export of modules and chosen subnets, with the split recorded in the model metadata.

Exports use the TorchScript exporter (opset 17, static shapes, eval mode, BN folded); a subnet's
block outputs get readable tensor names so `nasc.split` can name the tensor that crosses the cut.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
import onnx
import torch
from onnx import ModelProto
from torch import nn

from nasc.search.nas import defaults as D

INPUT_NAME = "input"
OUTPUT_NAME = "logits"


def export_onnx(module: nn.Module, input_shapes: list[tuple[int, ...]], output_names: list[str] | None = None) -> ModelProto:
    """`module` in eval mode as an ONNX model with static shapes; inputs are `input`, `input1`, ..."""
    module = module.eval()
    args = tuple(torch.zeros(s) for s in input_shapes)
    names = [INPUT_NAME] + [f"{INPUT_NAME}{i}" for i in range(1, len(input_shapes))]
    buf = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module, args, buf, opset_version=D.ONNX_OPSET, dynamo=False, do_constant_folding=True,
            input_names=names, output_names=output_names or [OUTPUT_NAME],
        )
    return onnx.load_from_string(buf.getvalue())


def block_tensor_name(block: str) -> str:
    return f"{block}.out"


class _WithBlocks(nn.Module):
    def __init__(self, subnet):
        super().__init__()
        self.subnet = subnet

    def forward(self, x):
        outs = self.subnet.block_outputs(x)
        return (outs[-1], *outs[:-1])


def _prune_dead_nodes(graph: onnx.GraphProto) -> None:
    needed = {o.name for o in graph.output}
    keep = []
    for node in reversed(graph.node):
        if any(o in needed for o in node.output):
            keep.append(node)
            needed.update(node.input)
    del graph.node[:]
    graph.node.extend(reversed(keep))


def export_subnet(subnet, input_shape: tuple[int, ...], metadata: dict[str, str] | None = None) -> tuple[ModelProto, list[str]]:
    """The subnet as ONNX plus, for each block but the last, the tensor that carries its output.

    Blocks whose output is an earlier tensor (an identity cell) map to that earlier tensor.
    """
    blocks = subnet.block_names[:-1]
    model = export_onnx(_WithBlocks(subnet), [input_shape], [OUTPUT_NAME] + [block_tensor_name(b) for b in blocks])
    g = model.graph
    alias = {n.output[0]: n.input[0] for n in g.node if n.op_type == "Identity"}
    tensors = []
    for b in blocks:
        name = block_tensor_name(b)
        while name in alias:
            name = alias[name]
        tensors.append(name)
    final = [o for o in g.output if o.name == OUTPUT_NAME]
    del g.output[:]
    g.output.extend(final)
    _prune_dead_nodes(g)
    for k, v in (metadata or {}).items():
        set_metadata(model, k, v)
    onnx.checker.check_model(model)
    return model, tensors


def split_metadata(cut_index: int, num_blocks: int, block_tensors: list[str]) -> str:
    """Value of `nasc.split` for cut k: "" server-only, "device-only", else the crossing tensor."""
    if cut_index == 0:
        return ""
    if cut_index >= num_blocks:
        return D.SPLIT_DEVICE_ONLY
    return block_tensors[cut_index - 1]


def run_onnx(model: ModelProto, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {INPUT_NAME: x})[0]


def set_metadata(model: ModelProto, key: str, value: str) -> None:
    for p in model.metadata_props:
        if p.key == key:
            p.value = value
            return
    model.metadata_props.append(onnx.StringStringEntryProto(key=key, value=value))
