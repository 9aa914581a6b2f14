"""ONNX Runtime backend: the numerical reference and a fallback target for halves."""

from __future__ import annotations

import numpy as np
from onnx import ModelProto


def session(model: ModelProto | bytes, threads: int | None = None):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if threads:
        opts.intra_op_num_threads = threads
    data = model if isinstance(model, bytes) else model.SerializeToString()
    return ort.InferenceSession(data, opts, providers=["CPUExecutionProvider"])


def run(model: ModelProto, feeds: dict[str, np.ndarray], outputs: list[str] | None = None) -> dict[str, np.ndarray]:
    """Run a model on the feeds it needs (extra feeds are ignored); returns outputs by name."""
    s = session(model)
    names = outputs or [o.name for o in s.get_outputs()]
    wanted = {i.name for i in s.get_inputs()}
    return dict(zip(names, s.run(names, {k: v for k, v in feeds.items() if k in wanted})))


class Runner:
    """Same call shape as the TVM runner, over an ORT session."""

    def __init__(self, model: ModelProto | bytes, threads: int | None = None):
        self.sess = session(model, threads)
        self.input_names = [i.name for i in self.sess.get_inputs()]
        self.output_names = [o.name for o in self.sess.get_outputs()]

    def __call__(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return dict(zip(self.output_names, self.sess.run(None, {n: feeds[n] for n in self.input_names})))
