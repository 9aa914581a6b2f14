"""Versioned binary framing between the device runtime and the server runtime.

No pickle, no eval: every field is a fixed-width little-endian integer, a length-prefixed
UTF-8 string or raw tensor bytes, and every length is bounded before anything is allocated.

Byte layout (all integers little-endian)::

    preamble (16 bytes, identical in every version, so any frame can be skipped):
        0   4s   magic            b"NASC"
        4   u8   version          PROTOCOL_VERSION (1)
        5   u8   kind             1 request, 2 response, 3 error
        6   u16  reserved         0
        8   u64  body_len         bytes that follow the preamble (<= limits.max_frame_bytes)
    header v1 (HEADER_V1.size = 104 bytes):
        0   u8   codec            payload compression of this frame: 0 none, 1 zlib, 2 zstd, 3 lz4
        1   u8   accept           bit mask (1 << codec) of codecs the sender can decode in a reply
        2   u16  tensor_count     <= limits.max_tensors
        4   u64  request_id       echoed in the reply
        12  32s  artifact_hash    sha256 of the artifact's manifest.json (selects the served half)
        44  u32  meta_len         bytes of tensor descriptors (error frames: code + message)
        48  u64  wire_len         payload bytes on the wire (compressed if codec != 0)
        56  u64  raw_len          payload bytes once decompressed
        64  u64  server_recv_ns   responses: server monotonic clock when the request was read
        72  u64  server_send_ns   responses: server monotonic clock when the reply was encoded
        80  u64  tail_ns          responses: time spent running the served half
        88  u64  queue_ns         responses: time the request waited for a free runner
        96  u32  checksum         zlib.crc32 over header[0:96] + meta + wire payload
        100 u32  reserved         0
    meta: per tensor, in payload order
        u16 name_len, name (UTF-8), u8 dtype code (DTYPE_CODES), u8 ndim, u32 dims[ndim],
        u32 quant_count (0 = not quantized), i32 quant_axis (AXIS_NONE = per tensor),
        f32 scale[quant_count], i32 zero_point[quant_count], u64 nbytes
      error frames: u16 error code (ERR_*), UTF-8 message
    payload: the tensors' C-order bytes, concatenated, then compressed as a whole.

A frame whose preamble is sound is always read to its end before it is judged, so a
rejected frame (bad checksum, unknown version, mismatched tensors) leaves the stream at
the next frame boundary; only `FramingError` (bad magic, oversize, truncated) loses it.
"""

from __future__ import annotations

import math
import struct
import time
import zlib
from dataclasses import dataclass, field

import numpy as np

from nasc.errors import ProtocolError

MAGIC = b"NASC"
PROTOCOL_VERSION = 1

KIND_REQUEST = 1
KIND_RESPONSE = 2
KIND_ERROR = 3
KINDS = {KIND_REQUEST: "request", KIND_RESPONSE: "response", KIND_ERROR: "error"}

PREAMBLE = struct.Struct("<4sBBHQ")
HEADER_V1 = struct.Struct("<BBHQ32sIQQQQQQII")
CHECKSUMMED_HEADER_BYTES = 96  # the header bytes before its checksum field
HASH_BYTES = 32
AXIS_NONE = -(2**31)

# Error codes carried by error frames; stable across versions.
ERR_MALFORMED = 1
ERR_CHECKSUM = 2
ERR_VERSION = 3
ERR_ARTIFACT = 4
ERR_SPEC = 5
ERR_TOO_LARGE = 6
ERR_TRUNCATED = 7
ERR_MAGIC = 8
ERR_BUSY = 9
ERR_INTERNAL = 10
ERR_KIND = 11

DTYPE_CODES = {
    "float32": 1, "float16": 2, "float64": 3, "uint8": 4, "int8": 5,
    "int16": 6, "int32": 7, "int64": 8, "bool": 9, "uint16": 10,
}
DTYPE_NAMES = {v: k for k, v in DTYPE_CODES.items()}

CODEC_NONE, CODEC_ZLIB, CODEC_ZSTD, CODEC_LZ4 = 0, 1, 2, 3
CODEC_NAMES = {CODEC_NONE: "none", CODEC_ZLIB: "zlib", CODEC_ZSTD: "zstd", CODEC_LZ4: "lz4"}
ZLIB_LEVEL = 1  # the cut tensor is sent once; speed matters more than the last percent


@dataclass(frozen=True)
class Limits:
    """Bounds checked before any allocation; a frame over any of them is refused."""

    max_frame_bytes: int = 256 * 2**20
    max_meta_bytes: int = 2**20
    max_tensors: int = 64
    max_ndim: int = 8
    max_name_bytes: int = 256
    max_quant_params: int = 2**16
    max_error_bytes: int = 4096


DEFAULT_LIMITS = Limits()


class FramingError(ProtocolError):
    """The frame boundary is lost (bad magic, oversize frame, stream ended mid-frame): close."""


def _error(code: int, msg: str, fatal: bool = False) -> ProtocolError:
    err = (FramingError if fatal else ProtocolError)(msg)
    err.code = code
    return err


@dataclass(frozen=True)
class Quant:
    """Affine quantization parameters of one tensor (per tensor when axis is None)."""

    scale: tuple[float, ...]
    zero_point: tuple[int, ...]
    axis: int | None = None

    @staticmethod
    def from_manifest(d: dict) -> "Quant":
        """From one entry of manifest["compress"]["tensors"]; scales rounded to float32 as sent."""
        scale = tuple(float(x) for x in np.asarray(d["scale"], dtype=np.float32).ravel())
        zp = tuple(int(x) for x in np.asarray(d["zero_point"]).ravel())
        axis = d.get("axis")
        return Quant(scale, zp, None if axis is None else int(axis))


@dataclass(frozen=True)
class WireTensor:
    name: str
    array: np.ndarray
    quant: Quant | None = None


@dataclass(frozen=True)
class ServerTiming:
    """Server-side stamps carried by a response (monotonic nanoseconds)."""

    recv_ns: int = 0
    send_ns: int = 0
    tail_ns: int = 0
    queue_ns: int = 0


@dataclass(frozen=True)
class Frame:
    kind: int
    request_id: int
    artifact_hash: bytes
    tensors: tuple[WireTensor, ...] = ()
    error_code: int = 0
    error: str = ""
    timing: ServerTiming = field(default_factory=ServerTiming)
    codec: int = CODEC_NONE
    accept: int = 1 << CODEC_NONE
    wire_bytes: int = 0


# ---------------------------------------------------------------- compression codecs


def _optional_codecs() -> dict:
    found = {}
    try:
        import zstandard

        found[CODEC_ZSTD] = (
            lambda b: zstandard.ZstdCompressor(level=1).compress(b),
            lambda b, n: zstandard.ZstdDecompressor().decompress(b, max_output_size=n),
        )
    except ImportError:
        pass
    try:
        import lz4.frame

        found[CODEC_LZ4] = (lz4.frame.compress, lambda b, n: lz4.frame.decompress(b))
    except ImportError:
        pass
    return found


def _zlib_decompress(data: bytes, max_bytes: int) -> bytes:
    d = zlib.decompressobj()
    out = d.decompress(data, max_bytes)
    if d.unconsumed_tail or not d.eof:
        raise _error(ERR_MALFORMED, "zlib payload is larger than its declared raw length or incomplete")
    return out


CODECS = {CODEC_ZLIB: (lambda b: zlib.compress(b, ZLIB_LEVEL), _zlib_decompress), **_optional_codecs()}


def available_codecs_mask() -> int:
    """Bit mask of the codecs this process can decode (always includes none and zlib)."""
    return (1 << CODEC_NONE) | sum(1 << c for c in CODECS)


def codec_by_name(name: str) -> int:
    for code, n in CODEC_NAMES.items():
        if n == name:
            if code != CODEC_NONE and code not in CODECS:
                raise ProtocolError(f"compression codec {name!r} is not importable here (pip install {name})")
            return code
    raise ProtocolError(f"unknown compression codec {name!r}; choose one of {sorted(CODEC_NAMES.values())}")


def best_codec(accept_mask: int) -> int:
    """The fastest available codec the peer accepts (zstd, lz4, then zlib), or none."""
    for code in (CODEC_ZSTD, CODEC_LZ4, CODEC_ZLIB):
        if code in CODECS and accept_mask & (1 << code):
            return code
    return CODEC_NONE


@dataclass
class CompressionPolicy:
    """Compress a payload only when it pays: the bytes saved must cross the link faster
    than the codec costs. Learns ratio and speed of the codec from the frames it sends.

    bandwidth_mbit=None means the link is unknown: compress whenever the ratio is good.
    """

    codec: int = CODEC_NONE
    bandwidth_mbit: float | None = None
    min_bytes: int = 4096
    max_ratio: float = 0.9
    ratio: float = 0.5  # running estimates, refined per frame
    mbyte_per_s: float = 200.0
    smoothing: float = 0.3
    probe_every: int = 16
    _frames: int = 0

    def should_try(self, nbytes: int) -> bool:
        if self.codec == CODEC_NONE or nbytes < self.min_bytes:
            return False
        self._frames += 1
        if self.bandwidth_mbit is None or self._frames % self.probe_every == 1:
            return True
        saved_ms = nbytes * (1.0 - self.ratio) * 8.0 / (self.bandwidth_mbit * 1e3)
        cost_ms = 2.0 * nbytes / (self.mbyte_per_s * 1e3)  # compress + decompress
        return self.ratio < self.max_ratio and saved_ms > cost_ms

    def observe(self, raw: int, packed: int, seconds: float) -> None:
        a = self.smoothing
        self.ratio = (1 - a) * self.ratio + a * packed / max(raw, 1)
        self.mbyte_per_s = (1 - a) * self.mbyte_per_s + a * raw / max(seconds, 1e-9) / 1e6


# ---------------------------------------------------------------- encoding


def _encode_tensor_meta(t: WireTensor, limits: Limits) -> bytes:
    arr = t.array
    name = t.name.encode("utf-8")
    dtype = np.dtype(arr.dtype).name
    if dtype not in DTYPE_CODES:
        raise ProtocolError(f"tensor {t.name!r}: dtype {dtype} cannot be sent (supported: {sorted(DTYPE_CODES)})")
    if len(name) > limits.max_name_bytes or arr.ndim > limits.max_ndim:
        raise ProtocolError(f"tensor {t.name!r}: name or rank over the protocol limits")
    parts = [struct.pack("<H", len(name)), name, struct.pack("<BB", DTYPE_CODES[dtype], arr.ndim)]
    parts.append(struct.pack(f"<{arr.ndim}I", *arr.shape))
    q = t.quant
    if q is None:
        parts.append(struct.pack("<Ii", 0, AXIS_NONE))
    else:
        n = len(q.scale)
        if n != len(q.zero_point) or n == 0 or n > limits.max_quant_params:
            raise ProtocolError(f"tensor {t.name!r}: {n} scales but {len(q.zero_point)} zero points")
        parts.append(struct.pack("<Ii", n, AXIS_NONE if q.axis is None else q.axis))
        parts.append(np.asarray(q.scale, dtype="<f4").tobytes())
        parts.append(np.asarray(q.zero_point, dtype="<i4").tobytes())
    parts.append(struct.pack("<Q", arr.nbytes))
    return b"".join(parts)


def encode_frame(frame: Frame, codec: int = CODEC_NONE, policy: CompressionPolicy | None = None,
                 limits: Limits = DEFAULT_LIMITS) -> bytes:
    """Serialize a frame. With a policy, the policy decides whether `policy.codec` is used."""
    if len(frame.artifact_hash) != HASH_BYTES:
        raise ProtocolError(f"artifact hash must be {HASH_BYTES} bytes, got {len(frame.artifact_hash)}")
    if frame.kind == KIND_ERROR:
        msg = frame.error.encode("utf-8")[: limits.max_error_bytes]
        meta, raw = struct.pack("<H", frame.error_code) + msg, b""
    else:
        if len(frame.tensors) > limits.max_tensors:
            raise ProtocolError(f"{len(frame.tensors)} tensors exceed the limit of {limits.max_tensors}")
        arrays = [np.ascontiguousarray(t.array) for t in frame.tensors]
        tensors = [WireTensor(t.name, a.astype(a.dtype.newbyteorder("<"), copy=False), t.quant)
                   for t, a in zip(frame.tensors, arrays)]
        meta = b"".join(_encode_tensor_meta(t, limits) for t in tensors)
        raw = b"".join(t.array.tobytes() for t in tensors)
    wire, used = raw, CODEC_NONE
    if policy is not None and policy.should_try(len(raw)):
        codec = policy.codec
    if codec != CODEC_NONE and raw:
        t0 = time.perf_counter()
        packed = CODECS[codec][0](raw)
        if policy is not None:
            policy.observe(len(raw), len(packed), time.perf_counter() - t0)
        if len(packed) < len(raw):
            wire, used = packed, codec
    timing = frame.timing
    send_ns = time.monotonic_ns() if frame.kind == KIND_RESPONSE else timing.send_ns
    head = HEADER_V1.pack(
        used, frame.accept, len(frame.tensors) if frame.kind != KIND_ERROR else 0, frame.request_id,
        frame.artifact_hash, len(meta), len(wire), len(raw),
        timing.recv_ns, send_ns, timing.tail_ns, timing.queue_ns, 0, 0,
    )[:CHECKSUMMED_HEADER_BYTES]
    crc = zlib.crc32(wire, zlib.crc32(meta, zlib.crc32(head)))
    body_len = HEADER_V1.size + len(meta) + len(wire)
    if body_len > limits.max_frame_bytes:
        raise ProtocolError(f"frame of {body_len} bytes exceeds the limit of {limits.max_frame_bytes}")
    return b"".join([PREAMBLE.pack(MAGIC, PROTOCOL_VERSION, frame.kind, 0, body_len),
                     head, struct.pack("<II", crc, 0), meta, wire])


def error_frame(request_id: int, artifact_hash: bytes, code: int, message: str) -> Frame:
    return Frame(KIND_ERROR, request_id, artifact_hash, error_code=code, error=message)


# ---------------------------------------------------------------- decoding


def parse_preamble(data: bytes, limits: Limits = DEFAULT_LIMITS) -> tuple[int, int, int]:
    """(version, kind, body_len) of a 16-byte preamble; FramingError if the stream is lost."""
    if len(data) != PREAMBLE.size:
        raise _error(ERR_TRUNCATED, f"stream ended inside a frame preamble ({len(data)} of {PREAMBLE.size} bytes)", True)
    magic, version, kind, _, body_len = PREAMBLE.unpack(data)
    if magic != MAGIC:
        raise _error(ERR_MAGIC, f"bad magic {magic!r} (expected {MAGIC!r}): not a nasc frame", True)
    if body_len > limits.max_frame_bytes:
        raise _error(ERR_TOO_LARGE, f"frame body of {body_len} bytes exceeds the limit of {limits.max_frame_bytes}", True)
    return version, kind, body_len


class _Reader:
    """Bounds-checked cursor over the meta section."""

    def __init__(self, data: bytes):
        self.data, self.pos = data, 0

    def take(self, n: int) -> bytes:
        if n < 0 or self.pos + n > len(self.data):
            raise _error(ERR_MALFORMED, "tensor descriptors end early (meta section truncated)")
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def unpack(self, fmt: str) -> tuple:
        s = struct.calcsize(fmt)
        return struct.unpack(fmt, self.take(s))


def _parse_tensor_meta(r: _Reader, limits: Limits) -> tuple[str, str, tuple[int, ...], Quant | None, int]:
    (name_len,) = r.unpack("<H")
    if name_len > limits.max_name_bytes:
        raise _error(ERR_TOO_LARGE, f"tensor name of {name_len} bytes exceeds {limits.max_name_bytes}")
    try:
        name = r.take(name_len).decode("utf-8")
    except UnicodeDecodeError:
        raise _error(ERR_MALFORMED, "tensor name is not UTF-8") from None
    code, ndim = r.unpack("<BB")
    if code not in DTYPE_NAMES:
        raise _error(ERR_SPEC, f"tensor {name!r}: unknown dtype code {code}")
    if ndim > limits.max_ndim:
        raise _error(ERR_TOO_LARGE, f"tensor {name!r}: rank {ndim} exceeds {limits.max_ndim}")
    shape = r.unpack(f"<{ndim}I")
    nq, axis = r.unpack("<Ii")
    quant = None
    if nq:
        if nq > limits.max_quant_params:
            raise _error(ERR_TOO_LARGE, f"tensor {name!r}: {nq} quantization parameters exceed {limits.max_quant_params}")
        scale = np.frombuffer(r.take(4 * nq), dtype="<f4")
        zp = np.frombuffer(r.take(4 * nq), dtype="<i4")
        quant = Quant(tuple(float(x) for x in scale), tuple(int(x) for x in zp), None if axis == AXIS_NONE else axis)
    (nbytes,) = r.unpack("<Q")
    dtype = DTYPE_NAMES[code]
    expect = math.prod(shape) * np.dtype(dtype).itemsize
    if nbytes != expect:
        raise _error(ERR_MALFORMED, f"tensor {name!r}: {nbytes} payload bytes but shape {list(shape)} {dtype} needs {expect}")
    return name, dtype, tuple(shape), quant, nbytes


def parse_body(version: int, kind: int, body: bytes, limits: Limits = DEFAULT_LIMITS) -> Frame:
    """Decode a whole frame body (everything after the preamble). Raises ProtocolError with a
    `code`; the caller has consumed the body, so the stream stays at a frame boundary."""
    if version != PROTOCOL_VERSION:
        raise _error(ERR_VERSION, f"protocol version {version} is not supported (this side speaks {PROTOCOL_VERSION})")
    if kind not in KINDS:
        raise _error(ERR_KIND, f"unknown frame kind {kind}")
    if len(body) < HEADER_V1.size:
        raise _error(ERR_MALFORMED, f"frame body of {len(body)} bytes is shorter than the {HEADER_V1.size}-byte header")
    (codec, accept, count, rid, ahash, meta_len, wire_len, raw_len,
     recv_ns, send_ns, tail_ns, queue_ns, crc, _) = HEADER_V1.unpack_from(body)
    if HEADER_V1.size + meta_len + wire_len != len(body):
        raise _error(ERR_MALFORMED, f"length fields (meta {meta_len} + payload {wire_len}) disagree with the frame length {len(body)}")
    if meta_len > limits.max_meta_bytes or raw_len > limits.max_frame_bytes:
        raise _error(ERR_TOO_LARGE, "descriptor section or decompressed payload exceeds the limits")
    meta = body[HEADER_V1.size : HEADER_V1.size + meta_len]
    wire = body[HEADER_V1.size + meta_len :]
    got = zlib.crc32(wire, zlib.crc32(meta, zlib.crc32(body[:CHECKSUMMED_HEADER_BYTES])))
    if got != crc:
        raise _error(ERR_CHECKSUM, f"checksum mismatch (crc32 {got:#010x}, header says {crc:#010x})")
    timing = ServerTiming(recv_ns, send_ns, tail_ns, queue_ns)
    if kind == KIND_ERROR:
        if meta_len < 2:
            raise _error(ERR_MALFORMED, "error frame without an error code")
        (ecode,) = struct.unpack_from("<H", meta)
        return Frame(kind, rid, ahash, error_code=ecode, error=meta[2:].decode("utf-8", "replace"),
                     timing=timing, wire_bytes=PREAMBLE.size + len(body))
    if count > limits.max_tensors:
        raise _error(ERR_TOO_LARGE, f"{count} tensors exceed the limit of {limits.max_tensors}")
    r = _Reader(meta)
    descs = [_parse_tensor_meta(r, limits) for _ in range(count)]
    if r.pos != len(meta):
        raise _error(ERR_MALFORMED, f"{len(meta) - r.pos} stray bytes after the tensor descriptors")
    if sum(d[4] for d in descs) != raw_len:
        raise _error(ERR_MALFORMED, f"tensors need {sum(d[4] for d in descs)} payload bytes but raw length is {raw_len}")
    if codec == CODEC_NONE:
        raw = wire
    elif codec in CODECS:
        try:
            raw = CODECS[codec][1](wire, raw_len)
        except ProtocolError:
            raise
        except Exception as e:  # codec libraries raise their own error types on corrupt input
            raise _error(ERR_MALFORMED, f"{CODEC_NAMES[codec]} payload does not decompress: {e}") from None
    else:
        raise _error(ERR_MALFORMED, f"payload codec {CODEC_NAMES.get(codec, codec)} is not available on this side")
    if len(raw) != raw_len:
        raise _error(ERR_MALFORMED, f"payload is {len(raw)} bytes, header says {raw_len}")
    tensors, pos = [], 0
    for name, dtype, shape, quant, nbytes in descs:
        arr = np.frombuffer(raw, dtype=np.dtype(dtype).newbyteorder("<"), count=nbytes // np.dtype(dtype).itemsize,
                            offset=pos).reshape(shape)
        tensors.append(WireTensor(name, arr, quant))
        pos += nbytes
    if len({t.name for t in tensors}) != len(tensors):
        raise _error(ERR_SPEC, "duplicate tensor names in one frame")
    return Frame(kind, rid, ahash, tuple(tensors), timing=timing, codec=codec, accept=accept,
                 wire_bytes=PREAMBLE.size + len(body))


def decode_frame(data: bytes, limits: Limits = DEFAULT_LIMITS) -> Frame:
    """Decode exactly one frame held in `data` (for tests and fuzzing)."""
    version, kind, body_len = parse_preamble(bytes(data[: PREAMBLE.size]), limits)
    body = data[PREAMBLE.size :]
    if len(body) < body_len:
        raise _error(ERR_TRUNCATED, f"stream ended inside a frame ({len(body)} of {body_len} body bytes)", True)
    if len(body) > body_len:
        raise _error(ERR_MALFORMED, f"{len(body) - body_len} bytes after the end of the frame")
    return parse_body(version, kind, bytes(body), limits)


def recv_exact(sock, n: int, chunk_bytes: int = 1 << 20) -> bytes:
    """Read exactly n bytes from a blocking socket, or FramingError if the peer closes first."""
    buf = bytearray(n)
    view, got = memoryview(buf), 0
    while got < n:
        k = sock.recv_into(view[got:], min(n - got, chunk_bytes))
        if k == 0:
            raise _error(ERR_TRUNCATED, f"connection closed inside a frame ({got} of {n} bytes)", True)
        got += k
    return bytes(buf)


def read_frame(recv, limits: Limits = DEFAULT_LIMITS) -> Frame:
    """Read one frame through `recv(n) -> exactly n bytes` (blocking side: the device client)."""
    version, kind, body_len = parse_preamble(recv(PREAMBLE.size), limits)
    return parse_body(version, kind, recv(body_len), limits)


def quant_matches(got: Quant | None, want: Quant | None) -> bool:
    """Exact match of quantization parameters as float32 (what both sides send)."""
    if got is None or want is None:
        return got is None and want is None
    return (got.axis == want.axis and got.zero_point == want.zero_point
            and np.array_equal(np.float32(got.scale), np.float32(want.scale)))
