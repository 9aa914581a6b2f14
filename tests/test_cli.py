"""nasc-compile as a user runs it: JSON contract, table, one-line errors with non-zero exits."""

import json
import os
import subprocess
import sys

import onnx
import pytest

from conftest import small_model


def nasc_compile(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "nasc.cli.compile", *args], capture_output=True, text=True, cwd=cwd,
                          env={**os.environ, "COLUMNS": "160"}, timeout=600)


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    p = tmp_path_factory.mktemp("cli") / "tiny.onnx"
    onnx.save(small_model("resnet8"), str(p))
    return p


def test_dry_run_json_contract(tiny_path):
    r = nasc_compile(str(tiny_path), "--dry-run", "--json", "--link", "1,50")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    cands = out["candidates"]
    assert out["chosen"] in [c["index"] for c in cands]
    for c in cands:
        assert {"index", "tensors", "payload_bytes", "head_macs", "device_peak_memory_bytes", "predicted"} <= set(c)
        assert set(c["predicted"]) == {"device_ms", "transfer_ms", "server_ms", "total_ms"}
    kinds = {c["kind"] for c in cands}
    assert {"server-only", "device-only", "split"} <= kinds
    best = min(cands, key=lambda c: c["predicted"]["total_ms"])
    assert best["predicted"]["total_ms"] == next(c for c in cands if c["index"] == out["chosen"])["predicted"]["total_ms"]


def test_table_marks_choice(tiny_path):
    r = nasc_compile(str(tiny_path), "--dry-run", "--objective", "pareto")
    assert r.returncode == 0, r.stderr
    assert "chosen: cut" in r.stdout and "▶" in r.stdout and "server-only" in r.stdout and "Pareto" in r.stdout


def test_compile_writes_artifact(tiny_path, tmp_path):
    r = nasc_compile(str(tiny_path), "-o", str(tmp_path / "out"), "--split", "server-only", "--server-target", "llvm", "--json", "-q")
    assert r.returncode == 0, r.stderr
    m = json.loads(r.stdout)["manifest"]
    assert (tmp_path / "out" / "manifest.json").exists() and m["split"]["kind"] == "server-only" and m["head"] is None


@pytest.mark.parametrize(
    "args,needle",
    [
        (["/no/such/model.onnx", "--dry-run"], "no such file"),
        (["{bad}", "--dry-run"], "not an ONNX model"),
        (["{model}", "--dry-run", "--split", "nonexistent_tensor"], "'nonexistent_tensor' is not an activation tensor"),
        (["{model}", "-o", "{out}", "--server-target", "tpu"], "unknown target 'tpu'"),
        (["{model}", "--dry-run", "--input-shape", "nope=1x3"], "'nope', which is not an input"),
        (["{model}", "--dry-run", "--link", "fast-ish"], "--link 'fast-ish'"),
        (["{model}"], "give -o OUT"),
    ],
)
def test_bad_input_one_line_error(args, needle, tiny_path, tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x08\x07garbage")
    args = [a.format(model=tiny_path, bad=bad, out=tmp_path / "o") for a in args]
    r = nasc_compile(*args)
    assert r.returncode != 0
    assert needle in r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()
