"""Shared CLI plumbing: rich consoles, error handling, link/profile arguments."""

from __future__ import annotations

import argparse
import sys
from typing import Callable

from rich.console import Console

from nasc import defaults
from nasc.errors import NascError
from nasc.types import HardwareProfile, Link


TABLE_WIDTH = 160


def run_main(fn: Callable[[], int], err: Console) -> int:
    """Run a command body; a NascError becomes one red line and its exit code."""
    try:
        return fn()
    except NascError as e:
        err.print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True)
        return e.exit_code
    except KeyboardInterrupt:
        err.print("[yellow]interrupted[/]")
        return 130


def command(parser: "argparse.ArgumentParser", body: Callable, argv: list[str] | None) -> int:
    """Parse argv, build the consoles from --json/-q, run body(args, out) with one-line errors."""
    args = parser.parse_args(argv)
    out, err = consoles(args.json, args.quiet)
    return run_main(lambda: body(args, out), err)


def parse_link(text: str | None, bandwidth: float | None = None, rtt: float | None = None) -> Link:
    """A link from a preset name, `BW_MBIT,RTT_MS[,LOSS_PCT]` or a link profile FILE.json, overridden by --bandwidth/--rtt."""
    link = defaults.DEFAULT_LINK
    if text:
        from nasc.runtime.links import parse_link as parse_link_text

        link, trace = parse_link_text(text)
        if trace is not None:
            raise NascError(f"--link {text!r}: a bandwidth trace drives nasc-bench's emulated link only; "
                            "give a preset, BW_MBIT,RTT_MS or a link FILE.json")
    if bandwidth is not None or rtt is not None:
        if bandwidth is not None and bandwidth <= 0:
            raise NascError(f"--bandwidth {bandwidth}: must be positive (Mbit/s)")
        link = Link(bandwidth if bandwidth is not None else link.bandwidth_mbit,
                    rtt if rtt is not None else link.rtt_ms, link.loss_pct, name="custom")
    return link


def load_profile(path: str | None, default: HardwareProfile):
    """A hardware profile, or a measured kernel profile (KernelProfile) from nasc-profile."""
    if not path:
        return default
    import json
    from pathlib import Path

    from nasc.backends.profile import is_kernel_profile, kernel_profile

    try:
        doc = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise NascError(f"{path}: profile file not found") from None
    except json.JSONDecodeError as e:
        raise NascError(f"{path}: not valid JSON ({e})") from None
    if is_kernel_profile(doc):
        return kernel_profile(doc, str(path))
    return HardwareProfile.from_json(doc)


def latency_model(device, server):
    """The latency model for two loaded profiles: measured where a kernel profile was given."""
    from nasc.search.latency import latency_model_for

    return latency_model_for(device, server)


def consoles(json_mode: bool, quiet: bool) -> tuple[Console, Console]:
    """(out, err): with --json only the JSON goes to stdout; -q silences the human output."""
    err = Console(stderr=True, quiet=False)
    out = Console(stderr=json_mode, quiet=quiet)
    if not out.is_terminal:
        # piped or captured: wide enough that tables never truncate tensor names
        out = Console(stderr=json_mode, quiet=quiet, width=TABLE_WIDTH)
    return out, err


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def stdout_write(text: str) -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()
