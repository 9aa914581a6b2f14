"""Shipped artifacts on the server GPU: compiled on a CPU-only machine, served and checked where they run.

For each ARTIFACT=MODEL pair, `nasc-serve` runs the tail (a CUDA tail is an nvcc fatbin made at
compile time) and `nasc run-head --save` runs the head and sends the cut over loopback; the
outputs are compared with ONNX Runtime on the artifact's ONNX halves and on the original model,
and the tail is timed alone with time_evaluator. Run it with TVM_USE_RUNTIME_LIB=1 to show that
both sides need only the TVM runtime.

  python benchmarks/cuda_artifacts.py -o results/cuda_artifacts.json OUT1=model1.onnx [OUT2=model2.onnx ...]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as rt

FIRST_PORT = 7901
SERVER_START_S = 120.0
NUMBER, REPEAT, MIN_REPEAT_MS = 10, 7, 50


def _ort(path: str, feeds: dict) -> dict:
    s = rt.InferenceSession(path, providers=["CPUExecutionProvider"])
    return dict(zip([o.name for o in s.get_outputs()], s.run(None, feeds)))


def _wait_port(port: int) -> bool:
    t0 = time.time()
    while time.time() - t0 < SERVER_START_S:
        try:
            socket.create_connection(("127.0.0.1", port), 1).close()
            return True
        except OSError:
            time.sleep(0.2)
    return False


def _max_err(got: dict, want: dict) -> float:
    return max(float(np.abs(got[o] - want[o]).max()) for o in want)


def check(art: str, model: str, port: int, work: Path) -> dict:
    """Serve `art`'s tail, run its head against it, compare and time; a JSON-able row."""
    import tvm

    from nasc.runtime.artifact import open_artifact

    man = json.loads((Path(art) / "manifest.json").read_text())
    m = onnx.load(model)
    inp = m.graph.input[0]
    shape = [d.dim_value for d in inp.type.tensor_type.shape.dim]
    feeds = {inp.name: np.random.default_rng(0).standard_normal(shape).astype(np.float32)}
    np.savez(work / "x.npz", **feeds)
    ref_orig = _ort(model, feeds)
    mid = _ort(str(Path(art) / man["head"]["onnx"]), feeds) if man.get("head") else feeds
    ref_pair = _ort(str(Path(art) / man["tail"]["onnx"]), mid)
    row = {"artifact": art, "split": man["split"], "tail_target": man["tail"]["target"]}
    srv = subprocess.Popen(["nasc-serve", art, "--port", str(port)], stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True)
    try:
        if not _wait_port(port):
            row["error"] = "server did not start"
        else:
            r = subprocess.run(["nasc", "run-head", art, "--server", f"127.0.0.1:{port}", "--input", str(work / "x.npz"),
                                "--save", str(work / "y.npz"), "--json", "-q"], capture_output=True, text=True, timeout=300)
            if r.returncode != 0:
                row["error"] = r.stderr[-2000:]
            else:
                y = dict(np.load(work / "y.npz"))
                row.update(stages=json.loads(r.stdout)["stages"], max_abs_err_vs_onnx_pair=_max_err(y, ref_pair),
                           max_abs_err_vs_original=_max_err(y, ref_orig),
                           output_scale=max(float(np.abs(v).max()) for v in ref_orig.values()),
                           top1_agrees=all(int(y[o].argmax()) == int(ref_orig[o].argmax()) for o in ref_orig))
    finally:
        srv.terminate()
        try:
            row["server_log_tail"] = (srv.communicate(timeout=20)[0] or "")[-600:]
        except subprocess.TimeoutExpired:
            srv.kill()
    runner = open_artifact(art).load("tail").runner
    args = [tvm.runtime.tensor(np.ascontiguousarray(mid[n]), runner.dev) for n in runner.input_names]
    f = runner.vm.time_evaluator("main", runner.dev, number=NUMBER, repeat=REPEAT, min_repeat_ms=MIN_REPEAT_MS)
    row["tail_ms"] = float(np.min(f(*args).results) * 1e3)
    row["tail_alone_max_abs_err_vs_onnx_pair"] = _max_err(runner({n: mid[n] for n in runner.input_names}), ref_pair)
    return row


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("pairs", nargs="+", metavar="ARTIFACT=MODEL")
    ap.add_argument("-o", "--output", type=Path, required=True)
    args = ap.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as work:
        for k, pair in enumerate(args.pairs):
            art, _, model = pair.partition("=")
            rows.append(check(art, model, FIRST_PORT + k, Path(work)))
            print(json.dumps(rows[-1]), flush=True)
    tmp = args.output.with_suffix(".tmp")
    tmp.write_text(json.dumps({"runtime_only": os.environ.get("TVM_USE_RUNTIME_LIB") == "1", "results": rows}, indent=1))
    os.replace(tmp, args.output)
    return 0 if all("error" not in r for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
