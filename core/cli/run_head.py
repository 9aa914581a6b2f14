"""`nasc run-head OUT --server HOST:PORT`: what a device runs. Head here, tail on the server."""

from __future__ import annotations

import argparse
import json
import os

import numpy as np

from nasc.cli.common import command, stdout_write
from nasc.errors import NascError


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="nasc run-head", description="Run the compiled head on this device, send the cut "
                                "tensors to a nasc-serve server, print the result and per-stage times.")
    p.add_argument("artifact", metavar="OUT", help="artifact directory made by nasc-compile (only its head is loaded)")
    p.add_argument("--server", required=True, metavar="HOST:PORT", help="a running nasc-serve for the same artifact")
    p.add_argument("--input", metavar="NPZ", help="inputs keyed by name (default: one seeded random-normal sample)")
    p.add_argument("--save", metavar="NPZ", help="also write the model's outputs here, keyed by output name")
    p.add_argument("--json", action="store_true")
    p.add_argument("-q", "--quiet", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    return command(build_parser(), _run, argv)


def _feeds(args, manifest: dict) -> dict[str, np.ndarray]:
    specs = manifest["source"]["inputs"]
    if not args.input:
        rng = np.random.default_rng(0)
        return {s["name"]: rng.standard_normal(s["shape"]).astype(s["dtype"]) for s in specs}
    try:
        data = np.load(args.input)
    except (OSError, ValueError) as e:
        raise NascError(f"--input {args.input}: cannot read .npz ({e})") from None
    feeds = {}
    for s in specs:
        if s["name"] not in data:
            raise NascError(f"--input {args.input}: no array named '{s['name']}'")
        x = np.asarray(data[s["name"]], dtype=s["dtype"])
        if list(x.shape) != s["shape"]:
            raise NascError(f"--input {args.input}: '{s['name']}' has shape {list(x.shape)}, expected {s['shape']}")
        feeds[s["name"]] = x
    return feeds


def _run(args, out) -> int:
    from nasc.runtime.artifact import open_artifact
    from nasc.runtime.client import connect_split

    host, _, port = args.server.rpartition(":")
    if not host or not port.isdigit():
        raise NascError(f"--server '{args.server}': expected HOST:PORT")
    if args.save and not os.path.isdir(os.path.dirname(os.path.abspath(args.save))):
        raise NascError(f"--save {args.save}: folder {os.path.dirname(os.path.abspath(args.save))} does not exist")
    manifest = open_artifact(args.artifact).manifest
    if manifest.get("tail") is None:
        raise NascError(f"{args.artifact}: device-only split; there is nothing to send to a server")
    device = connect_split(args.artifact, host, int(port))
    try:
        outputs, times = device.infer(_feeds(args, manifest))
    finally:
        device.client.close()
    if args.save:
        _save(args.save, outputs)
    summary = {name: {"shape": list(v.shape), "argmax": int(np.argmax(v)), "max": float(np.max(v))} for name, v in outputs.items()}
    stages = times.to_json()
    for name, s in summary.items():
        out.print(f"{name}: shape {s['shape']}, argmax {s['argmax']}")
    out.print("stages (ms): " + ", ".join(f"{k.removesuffix('_ms')} {v}" for k, v in stages.items() if k.endswith("_ms")))
    if args.json:
        stdout_write(json.dumps({"outputs": summary, "stages": stages}, indent=2))
    return 0


def _save(path: str, outputs: dict[str, np.ndarray]) -> None:
    """Write the outputs atomically: a reader never sees half a file, a failed write leaves none."""
    tmp = f"{path}.tmp.npz"
    try:
        np.savez(tmp, **outputs)
        os.replace(tmp, path)
    except OSError as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise NascError(f"--save {path}: cannot write ({e.strerror or e})") from None


if __name__ == "__main__":
    raise SystemExit(main())
