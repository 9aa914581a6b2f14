"""End-to-end measured vs predicted latency of auto-split pairs, with baselines, over emulated links.

For each example model: compile the auto split, then nasc-bench it over every link with the
device-only, server-only and ONNX Runtime pair baselines; report measured/predicted ratios
and the measured benefit of the auto split over the best of device-only and server-only.

    python benchmarks/bench_pairs.py [--models resnet8 mobilenetv2 inception] [--links wifi lte 3g]
                                     [--backend ort|tvm] [--requests 15] [-o results.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from nasc.compile import compile_model
from nasc.examples import build
from nasc.runtime.bench import BenchConfig, run_bench, write_json

DEFAULT_MODELS = ("resnet8", "mobilenetv2", "inception")
DEFAULT_LINKS = ("wifi", "lte", "3g")
DEFAULT_OUT = Path(__file__).parent / "results" / "bench_pairs.json"


def bench_model(name: str, links, backend: str, compress: str, requests: int, warmup: int, emulation: str,
                work: Path, split="auto") -> dict:
    out = work / f"{name}-{split}"
    t0 = time.perf_counter()
    manifest = compile_model(build(name), out, split=split, compress=compress, backend=backend,
                             device_target="llvm", server_target="llvm")
    compile_s = time.perf_counter() - t0
    res = run_bench(out, BenchConfig(links=tuple(links), requests=requests, warmup=warmup, emulation=emulation))
    rows = []
    for entry in res["links"]:
        pairs = entry["pairs"]
        row = {"link": entry["link"]["name"], "emulation": entry["emulation"]}
        for pname, r in pairs.items():
            pred = (r.get("predicted") or {}).get("total_ms")
            meas = r["e2e_ms"]["p50"]
            row[pname] = {"measured_p50_ms": meas, "measured_p95_ms": r["e2e_ms"]["p95"], "predicted_ms": pred,
                          "measured_over_predicted": round(meas / pred, 3) if pred else None,
                          "stages_p50_ms": {s: r[s]["p50"] for s in ("head_ms", "serialize_ms", "transfer_ms",
                                                                      "server_ms", "tail_ms", "return_ms")}}
        ben = next((b for b in res["benefit"] if b["link"] == row["link"]), None)
        if ben:
            row["benefit"] = {"best_baseline": ben["best_baseline"], "speedup_vs_best": ben["speedup"]}
        rows.append(row)
    return {"model": name, "requested_split": split, "split": manifest["split"], "compress": manifest["compress"]["kind"],
            "payload_bytes": manifest.get("payload_bytes"), "manifest_predicted": manifest["predicted"],
            "compile_s": round(compile_s, 2), "server": res["server"], "notes": res["notes"], "links": rows}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=list(DEFAULT_MODELS))
    ap.add_argument("--links", nargs="+", default=list(DEFAULT_LINKS))
    ap.add_argument("--backend", default="ort", choices=("ort", "tvm"))
    ap.add_argument("--compress", default="int8", choices=("none", "int8"))
    ap.add_argument("--requests", type=int, default=15)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--emulation", default="auto", choices=("auto", "netns", "inproc"))
    ap.add_argument("--no-mid", action="store_true",
                    help="skip the forced cut halfway through each model (shows a real network pair "
                         "when the auto split keeps everything on one side)")
    ap.add_argument("-o", "--output", default=str(DEFAULT_OUT))
    args = ap.parse_args(argv)
    results = {"backend": args.backend, "compress": args.compress, "requests": args.requests, "models": []}
    with tempfile.TemporaryDirectory(prefix="nasc-bench-pairs-") as work:
        runs = []
        for name in args.models:
            r = bench_model(name, args.links, args.backend, args.compress, args.requests, args.warmup,
                            args.emulation, Path(work))
            runs.append(r)
            last = r["split"].get("index")
            if not args.no_mid and isinstance(last, int) and r["split"].get("kind") != "split" and last > 1:
                runs.append(bench_model(name, args.links, args.backend, args.compress, args.requests, args.warmup,
                                        args.emulation, Path(work), split=last // 2))
        for r in runs:
            results["models"].append(r)
            print(f"{r['model']} ({r['requested_split']}): split {r['split'].get('kind')}@{r['split'].get('index')} "
                  f"payload {r['payload_bytes']} B", file=sys.stderr)
            for row in r["links"]:
                cells = "  ".join(f"{k} {row[k]['measured_p50_ms']:.2f}/{row[k]['predicted_ms'] or float('nan'):.2f}"
                                  for k in row if isinstance(row[k], dict) and "measured_p50_ms" in row[k])
                ben = row.get("benefit", {})
                print(f"  {row['link']:>6}: measured/predicted ms  {cells}  -> x{ben.get('speedup_vs_best')} "
                      f"vs {ben.get('best_baseline')}", file=sys.stderr)
    write_json(results, args.output)
    print(json.dumps({"written": args.output}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
