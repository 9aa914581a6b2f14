"""nasc-bench on real compiled artifacts of the tiny example: links parse, the in-process
shaper delays what it should, and a whole run writes valid JSON with every pair and stage."""

import json
import os
import time

import numpy as np
import pytest

from nasc.compile import compile_model
from nasc.errors import NascError
from nasc.examples import build
from nasc.runtime import protocol as P
from nasc.runtime.bench import PAIR_DEVICE, PAIR_ORT, PAIR_SERVER, PAIR_SPLIT, STAGES, BenchConfig, run_bench
from nasc.runtime.client import connect_split, run_head
from nasc.runtime.halves import load_endpoint
from nasc.runtime.links import Shaper, load_trace, parse_link
from nasc.runtime.server import start_server
from nasc.types import Link

SPLIT_INDEX = 5  # a cut in the middle of "tiny" (after its first residual block)


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    out = tmp_path_factory.mktemp("art") / "tiny_int8"
    compile_model(build("tiny"), out, split=SPLIT_INDEX, compress="int8", backend="ort",
                  device_target="llvm", server_target="llvm")
    return out


def test_parse_link_forms(tmp_path):
    assert parse_link("lte")[0].name == "lte"
    link, _ = parse_link("20,15,1.5")
    assert (link.bandwidth_mbit, link.rtt_ms, link.loss_pct) == (20.0, 15.0, 1.5)
    (tmp_path / "t.csv").write_text("# time_s,bandwidth_mbit\n0,10\n1,2\n")
    link, trace = parse_link(f"trace:{tmp_path / 't.csv'},30")
    assert link.rtt_ms == 30.0 and trace.mbit_at(0.5) == 10 and trace.mbit_at(1.5) == 2
    for bad in ("fast-ish", "0,10", "10", "10,5,150", "a,b"):
        with pytest.raises(NascError, match="link"):
            parse_link(bad)
    (tmp_path / "bad.csv").write_text("0,10\n0,5\n")
    with pytest.raises(NascError, match="increasing"):
        load_trace(tmp_path / "bad.csv")


def test_shaper_holds_reply_for_delay_and_serialization():
    shaper = Shaper(Link(bandwidth_mbit=8.0, rtt_ms=40.0))
    t0 = time.monotonic()
    shaper.hold_reply(10_000, t0)  # 20 ms one way + 10 ms for 10 kB at 8 Mbit/s
    assert 0.029 <= time.monotonic() - t0 < 0.5


def test_run_head_and_split_match_the_int8_pipeline(artifact):
    x = np.random.default_rng(1).standard_normal((1, 3, 16, 16)).astype(np.float32)
    cut = run_head(artifact, {"input": x})
    assert all(v.dtype == np.uint8 for v in cut.values())
    ep = load_endpoint(artifact, "tail")
    assert ep.quant and all(q.axis is None for q in ep.quant.values())
    with start_server([ep]) as handle:
        dev = connect_split(artifact, "127.0.0.1", handle.port)
        try:
            outs, times = dev.infer({"input": x})
        finally:
            dev.client.close()
    tail = load_endpoint(artifact, "tail").runners.get()
    want = tail.run(cut)
    np.testing.assert_array_equal(outs["logits0"], want["logits0"])
    assert times.tail_ms > 0 and times.up_bytes > P.PREAMBLE.size


def test_bench_inproc_writes_valid_json(artifact, tmp_path):
    config = BenchConfig(links=("50,4", "5,10"), requests=6, warmup=1, emulation="inproc")
    events = []
    res = run_bench(artifact, config, lambda ev, **kw: events.append(ev))
    text = json.dumps(res)
    res = json.loads(text)
    assert "start" in events and events.count("advance") >= 6
    assert len(res["links"]) == 2 and "no GPU" in res["server"]
    for entry in res["links"]:
        assert entry["emulation"].startswith("in-process token bucket")
        assert set(entry["pairs"]) == {PAIR_SPLIT, PAIR_ORT, PAIR_DEVICE, PAIR_SERVER}
        for name, r in entry["pairs"].items():
            assert r["requests"] == 6 and r["throughput_rps"] > 0
            for stage in STAGES:
                assert r[stage]["p50"] <= r[stage]["p95"] <= r[stage]["p99"]
            assert r["predicted"]["total_ms"] >= 0
        split = entry["pairs"][PAIR_SPLIT]
        # every request crosses the link: at least one RTT of emulated delay
        assert split["e2e_ms"]["p50"] >= entry["link"]["rtt_ms"]
        assert entry["check"]["ok"]
    over_fast, over_slow = (e["pairs"][PAIR_SERVER]["transfer_ms"]["p50"] for e in res["links"])
    assert over_slow > over_fast  # the raw input takes longer over 5 Mbit/s than over 50
    assert {b["link"] for b in res["benefit"]} == {"50mbit/4ms", "5mbit/10ms"}


def test_bench_cli_json_and_errors(artifact, tmp_path, capsys):
    from nasc.cli.bench import main

    out = tmp_path / "res.json"
    rc = main([str(artifact), "--link", "100,2", "--requests", "3", "--warmup", "0", "--no-baselines",
               "--emulation", "inproc", "--json", "-o", str(out)])
    assert rc == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["links"][0]["pairs"][PAIR_SPLIT]["requests"] == 3
    assert json.loads(out.read_text())["requests"] == 3
    assert main([str(artifact), "--link", "nonsense"]) == NascError.exit_code
    assert main([str(tmp_path / "missing")]) == NascError.exit_code


def test_nasc_serve_cli_serves_and_stops_on_sigterm(artifact):
    import re
    import signal
    import subprocess
    import sys

    from nasc.runtime.client import run_split

    proc = subprocess.Popen([sys.executable, "-c", "import sys; from nasc.cli.serve import main; sys.exit(main())",
                             str(artifact), "--host", "127.0.0.1", "--port", "0"],
                            stderr=subprocess.PIPE, text=True)
    try:
        port = None
        deadline = time.monotonic() + 60
        while port is None and time.monotonic() < deadline:
            line = proc.stderr.readline()
            m = re.search(r"listening on 127\.0\.0\.1:(\d+)", line)
            port = int(m.group(1)) if m else None
            assert line or proc.poll() is None, "nasc-serve exited before listening"
        assert port is not None
        x = np.random.default_rng(2).standard_normal((1, 3, 16, 16)).astype(np.float32)
        outs = run_split(artifact, {"input": x}, "127.0.0.1", port)
        tail = load_endpoint(artifact, "tail").runners.get()
        np.testing.assert_array_equal(outs["logits0"], tail.run(run_head(artifact, {"input": x}))["logits0"])
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        assert "1 requests" in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def test_bench_in_network_namespaces(artifact):
    from nasc.runtime.links import netns_unavailable_reason

    reason = netns_unavailable_reason()
    if reason is not None:
        pytest.skip(f"network namespaces not possible here: {reason}")
    res = run_bench(artifact, BenchConfig(links=("20,6",), requests=4, warmup=1, emulation="netns", baselines=False))
    entry = res["links"][0]
    assert entry["emulation"].startswith("netns + tc")
    assert entry["pairs"][PAIR_SPLIT]["e2e_ms"]["p50"] >= 6.0
    import subprocess

    names = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=10).stdout
    assert f"nasc-dev-{os.getpid()}" not in names  # namespaces removed after the run
