"""Artifact directories: staged in a temp dir beside OUT and renamed into place on success.

Nothing is left in OUT when a build fails; a previous artifact in OUT is replaced whole.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from pathlib import Path

from nasc.errors import ArtifactError

MANIFEST = "manifest.json"
FORMAT = "nasc-artifact/1"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def file_hashes(root: Path) -> dict[str, str]:
    """sha256 of every file under root except the manifest, by POSIX relative path, sorted."""
    return {
        p.relative_to(root).as_posix(): sha256_file(p)
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != MANIFEST
    }


@contextlib.contextmanager
def staging(out_dir: Path):
    """Yield a fresh temp dir; on success it replaces out_dir, on any error it is removed."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not (out_dir.is_dir() and (not any(out_dir.iterdir()) or (out_dir / MANIFEST).exists())):
        raise ArtifactError(f"{out_dir}: exists and is not a nasc artifact directory; refusing to overwrite it")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.staging-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = out_dir.parent / f".{out_dir.name}.old-{os.getpid()}"
    if out_dir.exists():
        os.rename(out_dir, old)
    os.rename(tmp, out_dir)
    shutil.rmtree(old, ignore_errors=True)


def write_manifest(root: Path, manifest: dict) -> dict:
    """Add file hashes and write manifest.json; returns the manifest as written."""
    manifest = dict(manifest, files=file_hashes(root))
    (root / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n")
    return manifest
