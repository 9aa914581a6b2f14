"""A baseline for the server GPU: run an ONNX CNN graph with PyTorch eager ops (cuDNN on CUDA).

It covers the ops of the benchmark models (Conv, Relu, Clip, Add, pools, Flatten, Gemm,
Concat) and raises naming any other; weights are moved to the device once, so a call times
only the kernels PyTorch launches.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper


def _attrs(node) -> dict:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def _padding(pads, k: int) -> int | tuple:
    pads = list(pads or [0] * 2 * k)
    if pads[:k] != pads[k:]:
        raise ValueError(f"asymmetric pads {pads} are not supported")
    return tuple(pads[:k])


class TorchGraph:
    """Callable: {input name: tensor} -> [output tensors], the graph's ops run one by one in PyTorch."""

    def __init__(self, model: onnx.ModelProto, device: str):
        import torch

        self.torch, self.device = torch, device
        self.consts = {t.name: torch.from_numpy(numpy_helper.to_array(t).copy()).to(device)
                       for t in model.graph.initializer}
        self.nodes = list(model.graph.node)
        self.outputs = [o.name for o in model.graph.output]
        for n in self.nodes:
            if n.op_type not in _OPS:
                raise NotImplementedError(f"node '{n.name}': op {n.op_type} has no PyTorch baseline")

    def __call__(self, feeds: dict) -> list:
        env = dict(self.consts)
        env.update(feeds)
        for n in self.nodes:
            ins = [env[x] if x else None for x in n.input]
            env[n.output[0]] = _OPS[n.op_type](self.torch, ins, _attrs(n))
        return [env[o] for o in self.outputs]

    def inputs(self, feeds: dict[str, np.ndarray]) -> dict:
        return {k: self.torch.from_numpy(np.ascontiguousarray(v)).to(self.device) for k, v in feeds.items()}


def _conv(torch, ins, at):
    x, w, b = (ins + [None])[:3]
    k = len(at.get("kernel_shape", w.shape[2:]))
    return torch.nn.functional.conv2d(x, w, b, stride=tuple(at.get("strides", [1] * k)),
                                      padding=_padding(at.get("pads"), k), dilation=tuple(at.get("dilations", [1] * k)),
                                      groups=at.get("group", 1))


def _clip(torch, ins, at):
    lo = ins[1] if len(ins) > 1 and ins[1] is not None else at.get("min")
    hi = ins[2] if len(ins) > 2 and ins[2] is not None else at.get("max")
    return torch.clamp(ins[0], None if lo is None else float(lo), None if hi is None else float(hi))


def _maxpool(torch, ins, at):
    k = at["kernel_shape"]
    return torch.nn.functional.max_pool2d(ins[0], tuple(k), tuple(at.get("strides", [1] * len(k))),
                                          _padding(at.get("pads"), len(k)))


def _avgpool(torch, ins, at):
    k = at["kernel_shape"]
    return torch.nn.functional.avg_pool2d(ins[0], tuple(k), tuple(at.get("strides", [1] * len(k))),
                                          _padding(at.get("pads"), len(k)),
                                          count_include_pad=bool(at.get("count_include_pad", 0)))


def _gemm(torch, ins, at):
    a, b, c = (ins + [None])[:3]
    if at.get("transA", 0):
        a = a.t()
    if at.get("transB", 0):
        b = b.t()
    y = at.get("alpha", 1.0) * (a @ b)
    return y if c is None else y + at.get("beta", 1.0) * c


_OPS = {
    "Conv": _conv,
    "Relu": lambda torch, ins, at: torch.relu(ins[0]),
    "Clip": _clip,
    "Add": lambda torch, ins, at: ins[0] + ins[1],
    "MaxPool": _maxpool,
    "AveragePool": _avgpool,
    "GlobalAveragePool": lambda torch, ins, at: ins[0].mean(dim=(2, 3), keepdim=True),
    "Flatten": lambda torch, ins, at: ins[0].flatten(at.get("axis", 1)),
    "Gemm": _gemm,
    "Concat": lambda torch, ins, at: torch.cat(ins, dim=at["axis"]),
}
