"""`nasc COMMAND ...`: one entry point over the nasc-* commands."""

from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "compile": "nasc.cli.compile",
    "search": "nasc.cli.search",
    "serve": "nasc.cli.serve",
    "bench": "nasc.cli.bench",
    "run-head": "nasc.cli.run_head",
    "tune": "nasc.cli.tune",
    "profile": "nasc.cli.profile",
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print("usage: nasc {" + ",".join(COMMANDS) + "} ...  (each also installed as nasc-COMMAND)")
        return 0 if not argv or argv[0] in ("-h", "--help") else 2
    return importlib.import_module(COMMANDS[argv[0]]).main(argv[1:])


if __name__ == "__main__":
    raise SystemExit(main())
