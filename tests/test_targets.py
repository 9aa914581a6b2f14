"""backends.targets: names and JSON dicts resolve; unknown targets fail naming the target."""

import json

import pytest

from nasc.backends.targets import resolve_target
from nasc.errors import TargetError


def test_named_targets():
    host = resolve_target("llvm")
    assert host.kind == "llvm" and host.runs_here() and host.device == "cpu"
    arm = resolve_target("aarch64")
    assert arm.triple == "aarch64-linux-gnu" and "+neon" in arm.spec["mattr"]
    cuda = resolve_target("cuda:sm_80")
    assert cuda.spec == {"kind": "cuda", "arch": "sm_80"} and cuda.device == "cuda"
    assert resolve_target("cuda").spec["arch"] == "sm_90"


def test_json_dict_target():
    t = resolve_target(json.dumps({"kind": "llvm", "mtriple": "aarch64-linux-gnu"}))
    assert t.name == "aarch64" and not t.runs_here() or t.triple.startswith("aarch64")
    assert resolve_target({"kind": "cuda", "arch": "sm_90"}).kind == "cuda"


@pytest.mark.parametrize("bad,msg", [("riscv", "unknown target 'riscv'"), ("cuda:80", "sm_80"),
                                     ('{"kind": "vulkan"}', "kind must be llvm or cuda"), ("{not json", "not valid JSON")])
def test_bad_targets(bad, msg):
    with pytest.raises(TargetError, match=msg):
        resolve_target(bad)
