"""Ship compiled CUDA device code: kernels become a fatbin at build time, not source at load time.

TVM's CUDA codegen leaves CUDA C source in the module and compiles it when the server
loads the library. nasc instead runs nvcc here (cross-compiling for the target's sm_XX,
plus PTX for newer GPUs) and packs the fatbin into the exported library in place of the
source, through export_library's `fpack_imports` hook: the patched blob is linked in with
an assembler `.incbin`, not as a C array (the blob holds the weights too). Where TVM built
the kernels itself (PTX or cubin, on a host with a GPU toolchain), they are kept.

The packed-imports blob is a u64 total length, the import tree, then one entry per module:
a length-prefixed key and a length-prefixed body. A "cuda" body is three fields:
format string, function map, data. Only format ("cuda" -> "fatbin") and data change.
"""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
import tempfile
from pathlib import Path

from nasc.errors import TargetError

FATBIN_MAGIC = struct.pack("<I", 0xBA55ED50)
SOURCE_FORMAT = b"cuda"
_U64 = struct.Struct("<Q")


def find_nvcc() -> str:
    nvcc = shutil.which("nvcc") or next((p for p in ("/usr/local/cuda/bin/nvcc",) if os.path.exists(p)), None)
    if nvcc is None:
        raise TargetError("CUDA targets need nvcc to build device code; install the CUDA toolkit or put nvcc on PATH")
    return nvcc


def nvcc_fatbin(source: str, arch: str, workdir: Path) -> bytes:
    """Compile CUDA C to a fatbin holding SASS for `arch` (e.g. sm_90) and PTX for newer GPUs."""
    cc = arch.removeprefix("sm_")
    src = workdir / "kernels.cu"
    out = workdir / "kernels.fatbin"
    src.write_text(source)
    cmd = [find_nvcc(), "--fatbin", "-O3", "-std=c++17", f"-gencode=arch=compute_{cc},code=sm_{cc}",
           f"-gencode=arch=compute_{cc},code=compute_{cc}", "-o", str(out), str(src)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise TargetError(f"nvcc failed for {arch}: {r.stderr.strip().splitlines()[-1] if r.stderr.strip() else r.returncode}")
    return out.read_bytes()


def _string(b: bytes) -> bytes:
    return _U64.pack(len(b)) + b


def has_cuda_source(blob: bytes) -> bool:
    """Whether the packed-imports blob holds a CUDA module still in source form."""
    key = _string(SOURCE_FORMAT)
    pos = 0
    while (i := blob.find(key, pos)) >= 0:
        body_at = i + len(key)
        if blob[body_at + 8: body_at + 8 + len(key)] == key:  # the module key, then a body of format "cuda"
            return True
        pos = i + 1
    return False


def replace_cuda_source(blob: bytes, fatbin: bytes) -> bytes:
    """Return the packed-imports blob with every CUDA module's source replaced by `fatbin`."""
    key = _string(SOURCE_FORMAT)
    out = bytearray(blob)
    pos = 0
    replaced = 0
    while True:
        i = out.find(key, pos)
        if i < 0:
            break
        body_at = i + len(key)
        (n,) = _U64.unpack_from(out, body_at)
        body = bytes(out[body_at + 8: body_at + 8 + n])
        if not body.startswith(key):  # the module key, then its body must start with fmt "cuda"
            pos = i + 1
            continue
        # body = fmt | fmap | data; data is the last length-prefixed field
        data_at = _last_field(body)
        new_body = _string(b"fatbin") + body[len(key):data_at] + _string(fatbin)
        out[body_at: body_at + 8 + n] = _U64.pack(len(new_body)) + new_body
        pos = body_at + 8 + len(new_body)
        replaced += 1
    if not replaced:
        raise ValueError("no CUDA module in the library's imports")
    _U64.pack_into(out, 0, len(out) - 8)
    return bytes(out)


def _last_field(body: bytes) -> int:
    """Offset of the final length-prefixed field (the data) in a CUDA module body."""
    for off in range(len(body) - 8, -1, -1):
        (n,) = _U64.unpack_from(body, off)
        if off + 8 + n == len(body):
            return off
    raise ValueError("malformed CUDA module body")


def _blob_from_c(c_text: str) -> tuple[str, bytes]:
    """(symbol name, bytes) of the byte array TVM's ModulePackImportsToC emits.

    Weights live in the blob, so the text can be hundreds of MB: parse it with str methods.
    """
    decl_end = c_text.index("= {")
    symbol = c_text[:decl_end].rsplit("const unsigned char", 1)[1].split("[")[0].strip()
    body = c_text[decl_end + 3:c_text.rindex("};")]
    return symbol, bytes.fromhex("".join(body.replace("0x", "").replace(",", " ").split()))


def _blob_asm(symbol: str, blob_path: Path) -> str:
    """Assembly that defines `symbol` as the blob's bytes (the C compiler assembles it with .incbin)."""
    return (f"\t.section .rodata\n\t.global {symbol}\n\t.type {symbol}, @object\n\t.balign 16\n"
            f"{symbol}:\n\t.incbin \"{blob_path}\"\n\t.size {symbol}, .-{symbol}\n"
            "\t.section .note.GNU-stack,\"\",@progbits\n")


def fatbin_packer(arch: str):
    """An `fpack_imports` for export_library that swaps CUDA source for an nvcc fatbin."""

    def pack(module, is_system_lib: bool, prefix: str, workspace_dir: str) -> str:
        from tvm.runtime import _ffi_api

        symbol, blob = _blob_from_c(_ffi_api.ModulePackImportsToC(module, is_system_lib, prefix))
        # where a GPU toolchain is set up TVM builds the kernels itself (PTX or cubin): kept as they are
        if has_cuda_source(blob):
            sources = [m.inspect_source() for m in _cuda_modules(module)]
            with tempfile.TemporaryDirectory() as tmp:
                blob = replace_cuda_source(blob, nvcc_fatbin("\n".join(sources), arch, Path(tmp)))
        blob_path = Path(workspace_dir) / f"{prefix}devc.bin"
        blob_path.write_bytes(blob)
        path = os.path.join(workspace_dir, f"{prefix}devc.S")
        with open(path, "w") as f:
            f.write(_blob_asm(symbol, blob_path.resolve()))
        return path

    return pack


def _cuda_modules(module):
    stack, found = [module], []
    while stack:
        m = stack.pop()
        if m.kind == "cuda":
            found.append(m)
        stack.extend(m.imports)
    if len(found) != 1:
        raise ValueError(f"expected one CUDA module in the library, found {len(found)}")
    return found
