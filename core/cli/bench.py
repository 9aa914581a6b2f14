"""nasc-bench: time a compiled pair through device runtime -> emulated network -> server runtime."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from nasc.errors import NascError
from nasc.runtime.bench import DEFAULT_LINKS, DEFAULT_REQUESTS, DEFAULT_WARMUP, BenchConfig, plot, run_bench, write_json


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="nasc-bench", description=__doc__)
    p.add_argument("artifact", metavar="OUT", help="artifact directory made by nasc-compile")
    p.add_argument("--link", action="append", metavar="LINK",
                   help="wifi|lte|3g|fast|slow, BW_MBIT,RTT_MS[,LOSS_PCT] or trace:FILE[,RTT_MS]; repeat to sweep "
                        f"(default {' '.join(DEFAULT_LINKS)})")
    p.add_argument("--requests", type=int, default=DEFAULT_REQUESTS, help="measured requests per pair and link")
    p.add_argument("--warmup", type=int, default=DEFAULT_WARMUP, help="requests run first and not measured")
    p.add_argument("--server", metavar="HOST:PORT", help="a running nasc-serve (default: start one on this host)")
    p.add_argument("--emulation", choices=("auto", "netns", "inproc"), default="auto",
                   help="netns: tc in network namespaces; inproc: token bucket on loopback; auto: netns if possible")
    p.add_argument("--compress", default="auto", help="payload codec: auto|none|zlib|zstd|lz4 (used only when it pays)")
    p.add_argument("--no-baselines", action="store_true", help="only the chosen split")
    p.add_argument("--model", help="source ONNX model, to compile the device-only/server-only baselines")
    p.add_argument("--baseline", action="append", default=[], metavar="KIND=DIR",
                   help="precompiled baseline artifact, KIND device-only or server-only")
    p.add_argument("--json", action="store_true", help="print the results as JSON on stdout")
    p.add_argument("-o", "--output", help="write results JSON here (PNG plots beside it)")
    return p


def _baselines(items: list[str]) -> dict:
    out = {}
    for item in items:
        kind, _, d = item.partition("=")
        if kind not in ("device-only", "server-only") or not d:
            raise NascError(f"--baseline {item!r}: expected device-only=DIR or server-only=DIR")
        out[kind] = d
    return out


def render(results: dict, console: Console) -> None:
    console.print(f"device: {results['device']}   server: {results['server']}")
    for entry in results["links"]:
        link = entry["link"]
        t = Table(title=f"{link['name']}  ({entry['emulation']})", title_justify="left")
        for col in ("pair", "head", "ser", "transfer", "server", "tail", "return", "e2e p50", "p95", "p99",
                    "predicted", "req/s"):
            t.add_column(col, justify="left" if col == "pair" else "right")
        for name, r in entry["pairs"].items():
            pred = (r.get("predicted") or {}).get("total_ms")
            t.add_row(name, *(f"{r[s]['p50']:.2f}" for s in ("head_ms", "serialize_ms", "transfer_ms", "server_ms",
                                                               "tail_ms", "return_ms")),
                      f"{r['e2e_ms']['p50']:.2f}", f"{r['e2e_ms']['p95']:.2f}", f"{r['e2e_ms']['p99']:.2f}",
                      "-" if pred is None else f"{pred:.2f}", f"{r['throughput_rps']:.1f}")
        console.print(t)
        if entry.get("check"):
            console.print(f"  split vs ONNX Runtime pair: max |diff| {entry['check']['split_vs_ort_pair_max_abs_diff']:.2e}"
                          f" ({'ok' if entry['check']['ok'] else 'MISMATCH'})")
    for b in results["benefit"]:
        console.print(f"{b['link']}: split {b['split_ms']:.2f} ms vs best baseline {b['best_baseline']} "
                      f"{b['best_baseline_ms']:.2f} ms -> x{b['speedup']}")
    for n in results["notes"]:
        console.print(f"[yellow]note:[/] {n}")


PIPE_WIDTH = 150  # rich renders 80 columns when not on a terminal; the table needs more


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    stream = sys.stderr if args.json else sys.stdout
    console = Console(stderr=args.json, width=None if stream.isatty() else PIPE_WIDTH)
    try:
        config = BenchConfig(links=tuple(args.link or DEFAULT_LINKS), requests=args.requests, warmup=args.warmup,
                             server=args.server, emulation=args.emulation, baselines=not args.no_baselines,
                             compress=args.compress, model=args.model, baseline_dirs=_baselines(args.baseline))
        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                      console=console, transient=True) as bar:
            task = bar.add_task("loading", total=None)

            def progress(event, **kw):
                if event == "start":
                    bar.update(task, total=kw["total"], description="benchmarking")
                elif event == "advance":
                    bar.advance(task, kw.get("n", 1))
                elif event == "note":
                    bar.update(task, description=kw["text"])

            results = run_bench(args.artifact, config, progress)
        if args.output:
            path = write_json(results, args.output)
            pngs = plot(results, Path(args.output).with_suffix(""))
            console.print(f"wrote {path}" + "".join(f", {p}" for p in pngs))
    except NascError as e:
        console.print(f"[red]error:[/] {e}", highlight=False)
        return e.exit_code
    render(results, console)
    if args.json:
        sys.stdout.write(json.dumps(results, indent=2) + "\n")
    return 0
