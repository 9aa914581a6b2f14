"""backends.cuda: the packed-imports blob keeps its structure when CUDA source becomes a fatbin."""

import subprocess

import pytest

from nasc.backends.cuda import _U64, _blob_asm, _blob_from_c, _string, has_cuda_source, replace_cuda_source


def blob(modules):
    """A packed-imports blob: total length, a trivial import tree, then key/body entries."""
    body = _U64.pack(2) + _U64.pack(0) + _U64.pack(1) + _U64.pack(0)
    for key, content in modules:
        body += _string(key) + _string(content)
    return _U64.pack(len(body)) + body


def cuda_body(source: bytes) -> bytes:
    fmap = _U64.pack(1) + _string(b"k0") + _string(b"k0") + _U64.pack(0)
    return _string(b"cuda") + fmap + _string(source)


def test_replace_cuda_source_swaps_format_and_data_only():
    src = b"extern \"C\" __global__ void k0() {}"
    b = blob([(b"relax.VMExecutable", b"\x01\x02\x03"), (b"cuda", cuda_body(src))])
    out = replace_cuda_source(b, b"FATBIN-BYTES")
    (total,) = _U64.unpack_from(out, 0)
    assert total == len(out) - 8
    assert src not in out and b"FATBIN-BYTES" in out
    i = out.index(_string(b"cuda")) + 12
    (n,) = _U64.unpack_from(out, i)
    body = out[i + 8:i + 8 + n]
    assert i + 8 + n == len(out)
    assert body.startswith(_string(b"fatbin"))
    assert body.endswith(_string(b"FATBIN-BYTES"))
    assert _string(b"k0") in body  # the function map survives
    assert out.startswith(_U64.pack(total)) and b"\x01\x02\x03" in out


def test_only_cuda_source_is_rebuilt():
    """Kernels TVM already built (PTX, as on a host with a GPU toolchain) are left as they are."""
    src = b"extern \"C\" __global__ void k0() {}"
    assert has_cuda_source(blob([(b"relax.VMExecutable", b"\x01"), (b"cuda", cuda_body(src))]))
    ptx = cuda_body(b".version 8.0").replace(_string(b"cuda"), _string(b"ptx"), 1)
    assert not has_cuda_source(blob([(b"relax.VMExecutable", b"\x01"), (b"cuda", ptx)]))
    assert not has_cuda_source(blob([(b"llvm", b"cuda")]))


def test_blob_without_cuda_is_an_error():
    with pytest.raises(ValueError, match="no CUDA module"):
        replace_cuda_source(blob([(b"llvm", b"x")]), b"f")


def test_blob_parsed_from_c_and_linked_as_assembly(tmp_path):
    data = bytes(range(256)) * 3
    c = ("#include <x>\nTVM_EXPORT extern const unsigned char __tvm_ffi__library_bin[];\n"
         "const unsigned char __tvm_ffi__library_bin[768] = {\n  "
         + ",".join(f"0x{x:02x}" for x in data) + ",\n};\n#ifdef __cplusplus\n}\n#endif\n")
    symbol, parsed = _blob_from_c(c)
    assert symbol == "__tvm_ffi__library_bin" and parsed == data
    blob = tmp_path / "devc.bin"
    blob.write_bytes(parsed)
    asm = tmp_path / "devc.S"
    asm.write_text(_blob_asm(symbol, blob))
    obj = tmp_path / "devc.o"
    subprocess.run(["cc", "-c", str(asm), "-o", str(obj)], check=True)
    syms = subprocess.run(["nm", str(obj)], capture_output=True, text=True, check=True).stdout
    assert " R __tvm_ffi__library_bin" in syms
    assert data in obj.read_bytes()
