"""Backends: TVM (per-target pass pipelines, libraries), ONNX Runtime (reference), artifacts."""
