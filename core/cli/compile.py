"""`nasc-compile`: choose a split, compile head and tail, verify, write artifacts."""

from __future__ import annotations

import argparse
import json

from rich.table import Table

from nasc import defaults
from nasc.cli.common import consoles, human_bytes, latency_model, load_profile, parse_link, run_main, stdout_write
from nasc.errors import NascError

EPILOG = """examples:
  nasc-compile model.onnx -o out --split auto
  nasc-compile example:resnet18 -o out --compress int8 --server-target cuda:sm_80
  nasc-compile model.onnx --dry-run --json --link 1,50
"""


def parse_bytes(text: str) -> int:
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "kb": 1000, "mb": 10**6, "gb": 10**9,
             "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30}
    t = text.strip().lower()
    num = t.rstrip("kmgib")
    mult = units.get(t[len(num):], 1) if t[len(num):] else 1
    try:
        value = int(float(num) * mult)
    except ValueError:
        raise NascError(f"--device-memory '{text}': expected bytes, e.g. 67108864 or 64MiB") from None
    if value <= 0:
        raise NascError(f"--device-memory '{text}': must be positive")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="nasc-compile", description="Split an ONNX model between device and server, compile both halves with TVM, verify them.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("model", nargs="?", default=f"example:{defaults_example()}",
                   help="ONNX file, or example:NAME for a bundled model (default: %(default)s)")
    p.add_argument("-o", "--output", metavar="OUT", help="artifact directory (written atomically)")
    p.add_argument("--split", default="auto", help="auto | annotated | device-only | server-only | cut index | tensor names t1,t2")
    p.add_argument("--compress", default="none", choices=["none", "int8"], help="quantized bottleneck at the cut")
    p.add_argument("--quant-granularity", default="tensor", choices=["tensor", "channel"])
    p.add_argument("--calib", default=str(defaults.CALIB_SAMPLES), help="N random-normal samples, or an .npz of real inputs keyed by input name")
    p.add_argument("--device-target", default=defaults.DEFAULT_DEVICE_TARGET, help="llvm | aarch64 | JSON dict")
    p.add_argument("--server-target", default=defaults.DEFAULT_SERVER_TARGET, help="cuda[:sm_XX] | llvm | JSON dict")
    p.add_argument("--backend", default="tvm", choices=["tvm", "ort"])
    p.add_argument("--input-shape", action="append", default=[], metavar="NAME=DIMS", help="fix dynamic dims, e.g. input=1x3x224x224")
    p.add_argument("--device-memory", type=parse_bytes, metavar="BYTES", help="device peak memory limit (e.g. 8MiB)")
    p.add_argument("--link", help="link preset (" + ", ".join(defaults.LINK_PRESETS) + "), BW_MBIT,RTT_MS or a link profile FILE.json "
                   '({"bandwidth_mbit", "rtt_ms"[, "loss_pct", "serialize_gbs"]})')
    p.add_argument("--bandwidth", type=float, metavar="MBIT", help="link bandwidth in Mbit/s")
    p.add_argument("--rtt", type=float, metavar="MS", help="link round-trip time in ms")
    p.add_argument("--device-profile", metavar="JSON", help="hardware profile, or measured kernel profile from nasc-profile, for the device")
    p.add_argument("--server-profile", metavar="JSON", help="hardware profile, or measured kernel profile from nasc-profile, for the server")
    p.add_argument("--objective", default="latency", choices=["latency", "pareto"], help="pareto also prints the latency/memory front")
    p.add_argument("--tuning-db", metavar="DIR", help="apply MetaSchedule records from a nasc-tune --db directory (matching targets only)")
    p.add_argument("--dry-run", action="store_true", help="analyse and choose; compile and write nothing")
    p.add_argument("--no-verify", action="store_true", help="skip the numerical check against ONNX Runtime")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    p.add_argument("--all", action="store_true", help="show every candidate cut, not the best few")
    p.add_argument("-v", "--verbose", action="store_true", help="print the pass pipeline of each step")
    p.add_argument("-q", "--quiet", action="store_true")
    return p


def defaults_example() -> str:
    from nasc.examples import DEFAULT_EXAMPLE

    return DEFAULT_EXAMPLE


def candidate_table(summary: dict, show_all: bool, title: str) -> Table:
    cands = summary["candidates"]
    chosen = summary["chosen"]
    by_total = sorted(cands, key=lambda c: c["predicted"]["total_ms"])
    shown = cands if show_all else by_total[: defaults.TABLE_TOP_K]
    keep = {c["index"] for c in shown} | {chosen} | {c["index"] for c in cands if c["kind"] != "split"}
    rows = [c for c in by_total if c["index"] in keep] if not show_all else cands
    t = Table(title=title, title_justify="left", header_style="bold")
    for col, just in (("", "left"), ("cut", "right"), ("sends", "left"), ("payload", "right"), ("head MACs", "right"),
                      ("dev mem", "right"), ("dev ms", "right"), ("link ms", "right"), ("srv ms", "right"),
                      ("total ms", "right")):
        t.add_column(col, justify=just, no_wrap=col != "sends")
    for c in rows:
        pr = c["predicted"]
        mark = "[bold green]▶[/]" if c["index"] == chosen else ("[cyan]◆[/]" if c.get("pareto") else "")
        sends = c["kind"] if c["kind"] != "split" else ", ".join(c["tensors"][:3]) + (f" (+{len(c['tensors']) - 3})" if len(c["tensors"]) > 3 else "")
        style = "bold" if c["index"] == chosen else None
        t.add_row(mark, str(c["index"]), sends, human_bytes(c["payload_bytes"]), f"{c['head_macs'] / 1e6:,.1f}M",
                  human_bytes(c["device_peak_memory_bytes"]), f"{pr['device_ms']:.2f}", f"{pr['transfer_ms']:.2f}",
                  f"{pr['server_ms']:.2f}", f"{pr['total_ms']:.2f}", style=style)
    return t


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    out, err = consoles(args.json, args.quiet)
    return run_main(lambda: _run(args, out, err), err)


def _db_profile(db_dir: str | None, target_name: str) -> str | None:
    """The kernel profile nasc-profile --db keeps beside the tuning records of a target, if any."""
    if not db_dir:
        return None
    from nasc.backends.targets import resolve_target
    from nasc.backends.tuning import db_path
    from nasc.cli.profile import PROFILE_IN_DB

    path = db_path(db_dir, resolve_target(target_name)) / PROFILE_IN_DB
    return str(path) if path.is_file() else None


def _run(args, out, err) -> int:
    from nasc.compile import compile_model, plan
    from nasc.partitioner import parse_shape

    if not args.dry_run and not args.output:
        raise NascError("give -o OUT for the artifact directory, or --dry-run to only analyse")
    shapes = dict(parse_shape(s) for s in args.input_shape)
    link = parse_link(args.link, args.bandwidth, args.rtt)
    device_profile = load_profile(args.device_profile or _db_profile(args.tuning_db, args.device_target), defaults.DEFAULT_DEVICE)
    server_profile = load_profile(args.server_profile or _db_profile(args.tuning_db, args.server_target), defaults.DEFAULT_SERVER)
    if not args.dry_run and args.backend == "tvm":
        from nasc.backends.targets import resolve_target

        resolve_target(args.device_target), resolve_target(args.server_target)  # fail fast on a bad target

    with out.status("loading") as status:
        def log(msg: str) -> None:
            status.update(msg)
            if args.verbose:
                out.print(f"[dim]· {msg}[/]")

        p = plan(args.model, split=args.split, input_shapes=shapes, link=link,
                 latency_model=latency_model(device_profile, server_profile), compress=args.compress,
                 device_memory_bytes=args.device_memory, log=log)
        summary = p.candidates_json()
        title = (f"{p.source_name}: {len(p.analysis.nodes)} nodes, {summary['total_macs'] / 1e6:,.0f}M MACs, "
                 f"{len(p.cuts)} cuts · link {link.bandwidth_mbit:g} Mbit/s, {link.rtt_ms:g} ms · {p.latency_model.source}")
        out.print(candidate_table(summary, args.all, title))
        if args.objective == "pareto":
            out.print("[cyan]◆[/] latency/device-memory Pareto front: cuts " + ", ".join(str(i) for i in summary["pareto"]))
        c = p.cut
        out.print(f"[bold green]chosen:[/] cut {c.index} ({c.label}), predicted {p.prediction.total_ms:.2f} ms "
                  f"= device {p.prediction.device_ms:.2f} + link {p.prediction.transfer_ms:.2f} + server {p.prediction.server_ms:.2f}")
        if args.verbose and not args.dry_run and args.backend == "tvm":
            _print_pipelines(out, args)
        if args.dry_run:
            if args.json:
                stdout_write(json.dumps(summary, indent=2))
            return 0
        manifest = compile_model(
            p, args.output, compress=args.compress, granularity=args.quant_granularity, device_target=args.device_target,
            server_target=args.server_target, backend=args.backend, calib=args.calib, verify=not args.no_verify, tuning_db=args.tuning_db, log=log,
        )
    _print_result(out, manifest, args.output)
    if args.json:
        stdout_write(json.dumps({**summary, "manifest": manifest}, indent=2))
    return 0


def _print_pipelines(out, args) -> None:
    from nasc.backends.targets import resolve_target
    from nasc.backends.tvm import pipeline

    for role, name in (("head", args.device_target), ("tail", args.server_target)):
        t = resolve_target(name)
        out.print(f"[dim]{role} pipeline for {t.name}: " + " → ".join(n for n, _ in pipeline(t)) + "[/]")


def _print_result(out, m: dict, path: str) -> None:
    comp = m["compress"]
    if comp.get("kind") == "int8":
        e = comp["error_vs_float"]
        agree = f", top-1 agreement {e['top1_agreement'] * 100:.1f}%" if e["top1_agreement"] is not None else ""
        out.print(f"int8 bottleneck ({comp['granularity']}): payload {m['payload_bytes_uncompressed']} → {m['payload_bytes']} bytes "
                  f"({comp['payload_ratio']:.2f}x), max abs error {e['max_abs_error']:.3g}{agree}")
    v = m["verification"]
    if not v.get("skipped"):
        line = f"verified vs ONNX Runtime: ONNX halves max err {v['onnx_halves']['max_abs_error']:.2g}"
        if "tvm" in v:
            line += f"; TVM max err {v['tvm']['max_abs_error']:.2g} (" + "; ".join(f"{k}: {x}" for k, x in v["tvm"]["via"].items()) + ")"
        out.print(f"[green]✓[/] {line}")
    else:
        out.print("[yellow]verification skipped (--no-verify)[/]")
    for role in ("head", "tail"):
        t = (m.get(role) or {}).get("tuning")
        if t is not None:
            state = f"{len(t['tuned'])} tuned kernels from {t['db']}" if t["db"] else "no tuning records for this target"
            untuned = f"; untuned: {', '.join(t['untuned'])}" if t["untuned"] else ""
            out.print(f"{role}: {state}{untuned}")
    files = ", ".join(f for f in m["files"])
    out.print(f"[bold]wrote[/] {path}/manifest.json ({files}) in {m['timings_s']['total_s']:.1f} s")


if __name__ == "__main__":
    raise SystemExit(main())
