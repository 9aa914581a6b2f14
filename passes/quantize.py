"""Quantized bottleneck: the head ends with QuantizeLinear, the tail starts with DequantizeLinear.

Scales and zero points are calibrated on sample inputs (asymmetric uint8, per tensor or per
channel). The wire tensor is named `<cut tensor>_quantized`; the tail dequantizes it back
into the original cut tensor name, so nothing else in either half is renamed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import ModelProto, TensorProto, helper, numpy_helper

from nasc.partitioner.cuts import quant_axis
from nasc.passes.util import checked, copy_model, set_metadata

WIRE_SUFFIX = "_quantized"
QMAX = 255


@dataclass(frozen=True)
class QuantParams:
    """Affine uint8 quantization of one cut tensor: q = clip(round(x / scale) + zero_point)."""

    tensor: str
    scale: tuple[float, ...]
    zero_point: tuple[int, ...]
    axis: int | None            # None: per-tensor
    dtype: str = "uint8"

    @property
    def wire_name(self) -> str:
        return self.tensor + WIRE_SUFFIX

    def to_json(self) -> dict:
        return {"wire_name": self.wire_name, "scale": list(self.scale), "zero_point": list(self.zero_point),
                "axis": self.axis, "dtype": self.dtype}


def quant_params(name: str, samples: list[np.ndarray], per_channel: bool) -> QuantParams:
    """Min/max calibration over samples; the range always includes 0 so zero is exact."""
    x = np.stack([np.asarray(s, np.float64) for s in samples])
    axis = quant_axis(x.shape[1:]) if per_channel else None
    if axis is None:
        lo, hi = np.array([min(x.min(), 0.0)]), np.array([max(x.max(), 0.0)])
    else:
        moved = np.moveaxis(x, axis + 1, 0).reshape(x.shape[axis + 1], -1)
        lo, hi = np.minimum(moved.min(1), 0.0), np.maximum(moved.max(1), 0.0)
    scale = np.where(hi > lo, (hi - lo) / QMAX, 1.0)
    zp = np.clip(np.round(-lo / scale), 0, QMAX).astype(np.int64)
    return QuantParams(name, tuple(float(s) for s in scale.astype(np.float32)), tuple(int(z) for z in zp), axis)


def _qconsts(q: QuantParams) -> tuple[list[TensorProto], str, str]:
    s_name, z_name = f"nasc.qscale.{q.tensor}", f"nasc.qzero.{q.tensor}"
    shape = () if q.axis is None else (len(q.scale),)
    scale = np.array(q.scale, np.float32).reshape(shape)
    zp = np.array(q.zero_point, np.uint8).reshape(shape)
    return [numpy_helper.from_array(scale, s_name), numpy_helper.from_array(zp, z_name)], s_name, z_name


def _attrs(q: QuantParams) -> dict:
    return {} if q.axis is None else {"axis": q.axis}


def _wire_value_info(vi: onnx.ValueInfoProto, q: QuantParams) -> onnx.ValueInfoProto:
    """The uint8 wire tensor's value info: same shape as the float cut tensor."""
    wire = onnx.ValueInfoProto()
    wire.CopyFrom(vi)
    wire.name = q.wire_name
    wire.type.tensor_type.elem_type = TensorProto.UINT8
    return wire


def quantize_head(head: ModelProto, params: list[QuantParams]) -> ModelProto:
    """Append QuantizeLinear for each cut tensor; the head then outputs the uint8 wire tensors."""
    out = copy_model(head)
    g = out.graph
    by_name = {q.tensor: q for q in params}
    new_outputs = []
    for o in g.output:
        q = by_name.get(o.name)
        if q is None:
            new_outputs.append(o)
            continue
        inits, s, z = _qconsts(q)
        g.initializer.extend(inits)
        g.node.append(helper.make_node("QuantizeLinear", [o.name, s, z], [q.wire_name], name=f"nasc.quantize.{q.tensor}", **_attrs(q)))
        new_outputs.append(_wire_value_info(o, q))
        if not any(v.name == o.name for v in g.value_info) and o.name not in {i.name for i in g.input}:
            g.value_info.append(o)
    del g.output[:]
    g.output.extend(new_outputs)
    set_metadata(out, "nasc.compress", "int8")
    return checked(out)


def dequantize_tail(tail: ModelProto, params: list[QuantParams]) -> ModelProto:
    """Prepend DequantizeLinear for each cut tensor; the tail then reads the uint8 wire tensors."""
    out = copy_model(tail)
    g = out.graph
    by_name = {q.tensor: q for q in params}
    new_inputs, dq_nodes = [], []
    for i in g.input:
        q = by_name.get(i.name)
        if q is None:
            new_inputs.append(i)
            continue
        inits, s, z = _qconsts(q)
        g.initializer.extend(inits)
        dq_nodes.append(helper.make_node("DequantizeLinear", [q.wire_name, s, z], [i.name], name=f"nasc.dequantize.{q.tensor}", **_attrs(q)))
        new_inputs.append(_wire_value_info(i, q))
        g.value_info.append(i)
    nodes = dq_nodes + list(g.node)
    del g.node[:]
    g.node.extend(nodes)
    del g.input[:]
    g.input.extend(new_inputs)
    set_metadata(out, "nasc.compress", "int8")
    return checked(out)


def is_quantizable(dtype: str) -> bool:
    return dtype == "float32"
