"""`nasc-search`: joint architecture + split-point search (NASC) with an LMOS Pareto mode.

Thin shell over `nasc.search.nas.api.run_search`: argument parsing and rich rendering only.
"""

from __future__ import annotations

import argparse
import json
import sys

from nasc.errors import NascError


def _link(text: str):
    from nasc.cli.common import parse_link

    return parse_link(text)


def build_parser() -> argparse.ArgumentParser:
    from nasc.search.nas import defaults as D

    p = argparse.ArgumentParser(prog="nasc-search", description=__doc__.splitlines()[0])
    p.add_argument("-o", "--out", required=True, help="output directory (written atomically)")
    p.add_argument("--space", default="nb201", choices=("nb201", "mbv2"),
                   help="NAS-Bench-201 cells (15,625 archs) or MobileNetV2-style blocks with kernel/expansion choices")
    p.add_argument("--data", default="digits", help="digits | cifar10:PATH | folder:PATH")
    p.add_argument("--link", required=True, help="BW_MBIT,RTT_MS, a preset or a link profile FILE.json")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--latency-budget", type=float, metavar="MS")
    g.add_argument("--latency-budget-ratio", type=float, metavar="R", help="budget = R x latency of baseline (a)")
    g.add_argument("--min-accuracy", type=float, metavar="A", help="converse mode: least latency with accuracy >= A")
    p.add_argument("--objective", choices=("accuracy", "pareto"), default="accuracy")
    p.add_argument("--memory-limit", type=float, metavar="BYTES", help="device memory limit (LMOS pick rule)")
    p.add_argument("--tabular", nargs="?", const="", metavar="PATH[:COLUMN]",
                   help="accuracies from the NB201 table (default: ../shared/data or $NASC_NB201_DATA)")
    p.add_argument("--epochs", type=int, default=D.DEFAULT_EPOCHS)
    p.add_argument("--channels", type=int, default=D.DEFAULT_CHANNELS)
    p.add_argument("--cells", type=int, default=D.DEFAULT_CELLS_PER_STAGE, help="NB201 cells or mbv2 blocks per stage (N)")
    p.add_argument("--resolution", type=int)
    p.add_argument("--evo-cycles", type=int, default=D.DEFAULT_EVO_CYCLES)
    p.add_argument("--evo-population", type=int, default=D.DEFAULT_EVO_POPULATION)
    p.add_argument("--device-profile", metavar="JSON", help="hardware profile, or kernel profile from nasc-profile, of the device (default: nasc's analytic one)")
    p.add_argument("--server-profile", metavar="JSON", help="hardware profile, or kernel profile from nasc-profile, of the server (default: nasc's analytic one)")
    p.add_argument("--int8", action="store_true", help="cut payload sent as int8 (1/4 of float32)")
    p.add_argument("--seed", type=int, default=D.DEFAULT_SEED)
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("-q", "--quiet", action="store_true")
    return p


def _table(report, console) -> None:
    from rich.table import Table

    t = Table(title=f"nasc-search ({report.latency_source})")
    for col in ("", "arch", "split", "accuracy %", "latency ms", "device mem B"):
        t.add_column(col)
    rows = [("chosen", report.chosen), ("baseline (a)", report.baseline), ("baseline (b) no split", report.baseline_no_split)]
    for name, p in rows:
        if p is None:
            t.add_row(name, "-", "infeasible", "-", "-", "-")
        else:
            t.add_row(name, p["arch"], p["split"], f"{p['accuracy']:.2f}", f"{p['latency_ms']:.3f}",
                      f"{p['device_memory_bytes']:,}")
    console.print(t)
    console.print(
        f"latency reduction vs (a): {report.latency_reduction_pct:.1f}%  accuracy delta: "
        f"{report.accuracy_delta_pt:+.2f} pt  search: {report.search_seconds:.1f} s over {report.pairs_scored:,} pairs"
        + (f"  supernet training: {report.train_seconds:.1f} s" if report.train_seconds else "")
    )


def main(argv=None) -> int:
    from rich.console import Console

    err = Console(stderr=True)
    args = build_parser().parse_args(argv)
    try:
        from nasc.search.nas.api import SearchSettings, run_search
        from nasc.cli.common import load_profile

        profiles = [load_profile(f, None) if f else None for f in (args.device_profile, args.server_profile)]

        settings = SearchSettings(
            link=_link(args.link), space=args.space, data=args.data, latency_budget_ms=args.latency_budget,
            latency_budget_ratio=args.latency_budget_ratio, min_accuracy=args.min_accuracy, objective=args.objective,
            memory_limit_bytes=args.memory_limit, tabular=args.tabular, epochs=args.epochs, channels=args.channels,
            cells_per_stage=args.cells, resolution=args.resolution, int8=args.int8, seed=args.seed,
            evo_cycles=args.evo_cycles, evo_population=args.evo_population,
            device_profile=profiles[0], server_profile=profiles[1],
        )
        if args.quiet or args.json:
            report = run_search(settings, args.out)
        else:
            from rich.progress import Progress

            with Progress(console=err, transient=True) as bar:
                tasks: dict[str, int] = {}

                def progress(stage: str, done: int, total: int) -> None:
                    if stage not in tasks:
                        tasks[stage] = bar.add_task(stage, total=total)
                    bar.update(tasks[stage], completed=done)

                report = run_search(settings, args.out, progress)
    except NascError as e:
        err.print(f"[red]error: {e}[/red]", highlight=False)
        return e.exit_code
    if args.json:
        sys.stdout.write(json.dumps(report.to_json(), indent=2, default=float) + "\n")
    elif not args.quiet:
        _table(report, Console())
    return 0


if __name__ == "__main__":
    sys.exit(main())
