"""`nasc run-head`: the device runs the compiled head, the server the compiled tail, over loopback."""

import json

import numpy as np
import pytest

from conftest import small_model
from nasc.backends import ort
from nasc.cli.run_head import main as run_head
from nasc.compile import compile_model, plan
from nasc.partitioner import SPLIT
from nasc.runtime.halves import load_endpoint
from nasc.runtime.server import start_server


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    model = small_model("resnet8")
    p = plan(model)
    k = [c for c in p.cuts if c.kind == SPLIT][len(p.cuts) // 3].index
    out = tmp_path_factory.mktemp("rh") / "art"
    compile_model(model, out, split=k, compress="int8", device_target="llvm", server_target="llvm", calib=4)
    handle = start_server([load_endpoint(out, "tail", "compiled", 1)], "127.0.0.1", 0)
    yield model, out, handle
    handle.close()


def test_run_head_matches_original(served, tmp_path, capsys):
    model, out, handle = served
    x = np.random.default_rng(3).standard_normal((1, 3, 32, 32)).astype(np.float32)
    np.savez(tmp_path / "x.npz", input=x)
    rc = run_head([str(out), "--server", f"127.0.0.1:{handle.port}", "--input", str(tmp_path / "x.npz"),
                   "--save", str(tmp_path / "y.npz"), "--json", "-q"])
    assert rc == 0
    result = json.loads(capsys.readouterr().out)
    ref = ort.run(model, {"input": x})["logits0"]
    assert result["outputs"]["logits0"]["argmax"] == int(ref.argmax())
    saved = np.load(tmp_path / "y.npz")["logits0"]
    assert saved.shape == ref.shape and saved.max() == result["outputs"]["logits0"]["max"]
    assert np.abs(saved - ref).max() <= 0.1 * np.abs(ref).max()  # int8 at the cut
    assert result["stages"]["e2e_ms"] > 0 and result["stages"]["up_bytes"] > 0


def test_run_head_save_to_a_missing_folder_is_refused(served, tmp_path, capsys):
    _, out, handle = served
    target = tmp_path / "no-such-dir" / "y.npz"
    rc = run_head([str(out), "--server", f"127.0.0.1:{handle.port}", "--save", str(target)])
    assert rc == 2
    err = capsys.readouterr().err
    assert "--save" in err and "no-such-dir" in err and "does not exist" in err
    assert not target.parent.exists()


def test_run_head_bad_server(served, capsys):
    _, out, _ = served
    assert run_head([str(out), "--server", "nonsense"]) == 2
    assert "HOST:PORT" in capsys.readouterr().err


def test_device_runs_with_only_the_tvm_runtime(served, tmp_path):
    """A device needs libtvm_runtime alone: the head runs with TVM_USE_RUNTIME_LIB=1, no compiler loaded."""
    import os
    import subprocess
    import sys

    model, out, handle = served
    x = np.random.default_rng(4).standard_normal((1, 3, 32, 32)).astype(np.float32)
    np.savez(tmp_path / "x.npz", input=x)
    probe = ("import sys, tvm.base; from nasc.cli.run_head import main; rc = main(sys.argv[1:]); "
             "assert tvm.base._RUNTIME_ONLY and 'tvm.relax' not in sys.modules; raise SystemExit(rc)")
    r = subprocess.run([sys.executable, "-c", probe, str(out), "--server", f"127.0.0.1:{handle.port}",
                        "--input", str(tmp_path / "x.npz"), "--json", "-q"],
                       env={**os.environ, "TVM_USE_RUNTIME_LIB": "1"}, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    result = json.loads(r.stdout)
    assert result["outputs"]["logits0"]["argmax"] == int(ort.run(model, {"input": x})["logits0"].argmax())
