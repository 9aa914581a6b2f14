"""Shared helpers for passes: copy, check, and carry model metadata."""

from __future__ import annotations

import onnx
from onnx import ModelProto


def copy_model(model: ModelProto) -> ModelProto:
    out = ModelProto()
    out.CopyFrom(model)
    return out


def checked(model: ModelProto) -> ModelProto:
    """Every pass validates what it returns; a failure here is a bug in the pass."""
    onnx.checker.check_model(model)
    return model


def set_metadata(model: ModelProto, key: str, value: str) -> None:
    for p in model.metadata_props:
        if p.key == key:
            p.value = value
            return
    model.metadata_props.add(key=key, value=value)


def get_metadata(model: ModelProto, key: str) -> str | None:
    return next((p.value for p in model.metadata_props if p.key == key), None)
