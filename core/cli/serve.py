"""nasc-serve: serve the tail of one or more artifacts over TCP until interrupted."""

from __future__ import annotations

import argparse
import signal
import threading

from rich.console import Console

from nasc.errors import NascError
from nasc.runtime.server import DEFAULT_SERVER_CONFIG, ServerConfig, serve


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="nasc-serve", description="Serve the tail of compiled nasc artifacts over TCP.")
    p.add_argument("artifacts", nargs="+", metavar="OUT", help="artifact directory made by nasc-compile")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=7878, help="TCP port (0 picks a free one; default 7878)")
    p.add_argument("--workers", type=int, default=1, help="tail runners per artifact (threads)")
    p.add_argument("--max-pending", type=int, default=DEFAULT_SERVER_CONFIG.max_pending,
                   help="requests waiting for a runner before readers are paused")
    p.add_argument("--ort-pair", action="store_true", help="also serve each tail through ONNX Runtime (baseline)")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    console = Console(stderr=True)
    stop = threading.Event()

    def ready(handle, endpoints):
        for e in endpoints:
            console.print(f"[green]serving[/] {e.name}  hash {e.artifact_hash.hex()[:16]}  "
                          f"inputs {[f'{s.name}:{s.dtype}{list(s.shape)}' for s in e.inputs]}")
        console.print(f"listening on {args.host}:{handle.port}  (Ctrl-C to stop)")

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        stats = serve(args.artifacts, args.host, args.port, workers=args.workers, ort_pair=args.ort_pair,
                      config=ServerConfig(max_pending=args.max_pending), on_ready=ready, stop_event=stop)
    except NascError as e:
        console.print(f"[red]error:[/] {e}", highlight=False)
        return e.exit_code
    console.print(f"stopped: {stats['requests']} requests, {stats['errors']} rejected, {stats['connections']} connections")
    return 0
