"""`nasc-tune`: tune a model's kernels (or one half at a cut) with MetaSchedule into a shared DB."""

from __future__ import annotations

import argparse
import json

from onnx import ModelProto
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from nasc.cli.common import consoles, run_main, stdout_write
from nasc.errors import NascError

EPILOG = """examples:
  nasc-tune model.onnx --target llvm --db ~/.nasc/tuning --trials 64
  nasc-tune model.onnx --target aarch64 --db db --split 12 --rpc 192.168.1.10:9190:rasp4
  nasc-tune example:resnet18 --target cuda:sm_80 --db db --split 12 --half tail --time-budget 600
then: nasc-compile model.onnx -o out --tuning-db ~/.nasc/tuning
"""


def build_parser() -> argparse.ArgumentParser:
    from nasc.backends import tuning

    p = argparse.ArgumentParser(prog="nasc-tune", description=__doc__, epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="ONNX file or example:NAME")
    p.add_argument("--target", required=True, help="llvm | aarch64 | cuda[:sm_XX] | JSON dict (as for nasc-compile)")
    p.add_argument("--db", required=True, metavar="DIR", help="tuning database directory, shared across models and runs")
    p.add_argument("--trials", type=int, default=tuning.DEFAULT_TRIALS_PER_KERNEL, help="measured candidates per kernel (default %(default)s)")
    p.add_argument("--time-budget", type=float, metavar="SECONDS", help="draw no search round after this long (rounds in flight finish); what was measured is kept")
    p.add_argument("--time-share", type=float, default=1.0, metavar="FRACTION",
                   help="search only the kernels making up this share of the measured default time, largest first "
                        "(default %(default)s: all); the rest keep their default schedules")
    p.add_argument("--split", help="tune one half at this cut (as nasc-compile --split); default: the whole model")
    p.add_argument("--half", choices=["head", "tail"], default="head", help="which half of --split to tune (default head)")
    p.add_argument("--rpc", metavar="HOST:PORT:KEY", help="measure on a device registered with a TVM RPC tracker")
    p.add_argument("--num-cores", type=int, help="cores of the measuring device (default: this machine's)")
    p.add_argument("--input-shape", action="append", default=[], metavar="NAME=DIMS", help="fix dynamic dims, e.g. input=1x3x224x224")
    p.add_argument("--seed", type=int, default=tuning.DEFAULT_SEED)
    p.add_argument("--json", action="store_true", help="print the report as one JSON object on stdout")
    p.add_argument("-q", "--quiet", action="store_true")
    return p


def model_to_tune(source: str, split: str | None, half: str, input_shapes: dict | None = None) -> ModelProto:
    """The graph nasc-compile would compile for this half: prepared, then cut (the whole model without a split)."""
    from nasc.compile import plan
    from nasc.partitioner import DEVICE_ONLY
    from nasc.passes import split_model

    p = plan(source, split=split or DEVICE_ONLY, input_shapes=input_shapes)
    head, tail = split_model(p.analysis, p.cut)
    m = head if (half == "head" or split is None) else tail
    if m is None:
        raise NascError(f"--split {split}: the {half} is empty at this cut; nothing to tune")
    return m


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    out, err = consoles(args.json, args.quiet)
    return run_main(lambda: _run(args, out), err)


def _run(args, out) -> int:
    from nasc.backends import tuning
    from nasc.backends.targets import resolve_target
    from nasc.partitioner import parse_shape

    target = resolve_target(args.target)
    rpc = tuning.parse_rpc(args.rpc) if args.rpc else None
    shapes = dict(parse_shape(s) for s in args.input_shape)
    with out.status("preparing the model"):
        model = model_to_tune(args.model, args.split, args.half, shapes)
    out.print(f"tuning {args.model}{f' ({args.half} at --split {args.split})' if args.split else ''} for {target.name} "
              f"into {tuning.db_path(args.db, target)}" + (f", measuring on {rpc}" if rpc else ""))
    bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.fields[kernels]}"),
                   TextColumn("{task.fields[trials]}"), TextColumn("{task.fields[best]}"),
                   TextColumn("ETA {task.fields[eta]}"), TimeElapsedColumn(), console=out, transient=True)
    with bar:
        job = bar.add_task("extracting kernels", total=None, kernels="", trials="", best="", eta="?")

        def show(pr: tuning.TuneProgress) -> None:
            b = pr.best_s.get(pr.kernel)
            bar.update(job, description=pr.kernel, completed=pr.trials_done, total=pr.trials_total,
                       kernels=f"kernels {pr.kernels_done}/{pr.kernels_total}",
                       trials=f"trials {pr.trials_done}/{pr.trials_total}",
                       best=f"best {b * 1e6:.1f} µs" if b else "", eta=f"{pr.eta_s:.0f}s" if pr.eta_s is not None else "?")

        report = tuning.tune(model, target, args.db, trials=args.trials, time_budget_s=args.time_budget, rpc=rpc,
                             num_cores=args.num_cores, seed=args.seed, where=args.model, time_share=args.time_share,
                             progress=show)
    out.print(_table(report))
    why = {"done": "done", "time-budget": "stopped at the time budget (rerun to resume)",
           "nothing-to-tune": "every kernel already tuned in this DB"}[report.stopped]
    out.print(f"[bold green]{why}[/]: {report.trials_measured} new trials in {report.elapsed_s:.0f} s, "
              f"{len(report.tuned)}/{len(report.kernels)} kernels have records")
    if args.json:
        stdout_write(json.dumps(report.to_json(), indent=2))
    return 0


def _table(report) -> Table:
    t = Table(title=f"kernels for {report.target}", title_justify="left", header_style="bold")
    for col, just in (("kernel", "left"), ("workload", "left"), ("uses", "right"), ("trials", "right"),
                      ("default µs", "right"), ("best µs", "right"), ("", "left")):
        t.add_column(col, justify=just)
    us = lambda s: f"{s * 1e6:.2f}" if s else "-"  # noqa: E731
    for k in report.kernels:
        t.add_row(k.name, k.workload_key, str(k.weight), str(k.trials), us(k.default_s), us(k.best_s),
                  "[dim]already tuned[/]" if k.skipped else "[dim]default kept (small share)[/]" if k.deferred else "")
    return t


if __name__ == "__main__":
    raise SystemExit(main())
