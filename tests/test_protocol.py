"""Wire protocol: round trips, every rejection path, and a fuzzed parser that only ever
raises ProtocolError."""

import struct
import zlib

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nasc.errors import ProtocolError
from nasc.runtime import protocol as P

HASH = bytes(range(32))
RNG = np.random.default_rng(0)
QUANT = P.Quant(scale=(0.05,), zero_point=(128,), axis=None)


def _request(**kw) -> P.Frame:
    tensors = (
        P.WireTensor("cut/0", RNG.integers(0, 255, (1, 8, 4, 4), dtype=np.uint8), QUANT),
        P.WireTensor("cut:1", RNG.standard_normal((2, 3)).astype(np.float32)),
    )
    return P.Frame(P.KIND_REQUEST, 7, HASH, tensors, accept=P.available_codecs_mask(), **kw)


def _assert_same(a: P.Frame, b: P.Frame) -> None:
    assert (a.kind, a.request_id, a.artifact_hash) == (b.kind, b.request_id, b.artifact_hash)
    assert [t.name for t in a.tensors] == [t.name for t in b.tensors]
    for x, y in zip(a.tensors, b.tensors):
        assert x.array.dtype == y.array.dtype and x.array.shape == y.array.shape
        np.testing.assert_array_equal(x.array, y.array)
        assert P.quant_matches(x.quant, y.quant)


def test_round_trip_plain_and_compressed():
    frame = _request()
    _assert_same(frame, P.decode_frame(P.encode_frame(frame)))
    zeros = P.Frame(P.KIND_REQUEST, 1, HASH, (P.WireTensor("x", np.zeros((64, 64), np.float32)),))
    packed = P.encode_frame(zeros, codec=P.CODEC_ZLIB)
    assert len(packed) < zeros.tensors[0].array.nbytes // 10
    back = P.decode_frame(packed)
    assert back.codec == P.CODEC_ZLIB
    _assert_same(zeros, back)


def test_compression_skipped_when_it_does_not_pay():
    noise = P.Frame(P.KIND_REQUEST, 1, HASH, (P.WireTensor("x", RNG.integers(0, 255, 50_000, dtype=np.uint8)),))
    assert P.decode_frame(P.encode_frame(noise, codec=P.CODEC_ZLIB)).codec == P.CODEC_NONE
    # a fast link: the policy learns zlib costs more than the bytes it saves and stops trying
    policy = P.CompressionPolicy(P.CODEC_ZLIB, bandwidth_mbit=100_000.0, probe_every=1000)
    zeros = P.Frame(P.KIND_REQUEST, 1, HASH, (P.WireTensor("x", np.zeros(200_000, np.uint8)),))
    codecs = [P.decode_frame(P.encode_frame(zeros, policy=policy)).codec for _ in range(5)]
    assert codecs[0] == P.CODEC_ZLIB and codecs[-1] == P.CODEC_NONE
    slow = P.CompressionPolicy(P.CODEC_ZLIB, bandwidth_mbit=1.0, probe_every=1000)
    assert all(P.decode_frame(P.encode_frame(zeros, policy=slow)).codec == P.CODEC_ZLIB for _ in range(5))


def test_error_and_response_frames_round_trip():
    err = P.decode_frame(P.encode_frame(P.error_frame(3, HASH, P.ERR_SPEC, "tensor 'x': wrong shape")))
    assert (err.kind, err.request_id, err.error_code, err.error) == (P.KIND_ERROR, 3, P.ERR_SPEC, "tensor 'x': wrong shape")
    resp = P.Frame(P.KIND_RESPONSE, 9, HASH, (P.WireTensor("y", np.arange(4, dtype=np.int64)),),
                   timing=P.ServerTiming(recv_ns=5, tail_ns=2, queue_ns=1))
    back = P.decode_frame(P.encode_frame(resp))
    assert back.timing.recv_ns == 5 and back.timing.tail_ns == 2 and back.timing.send_ns > 0


def _patch(data: bytes, offset: int, fmt: str, value) -> bytes:
    b = bytearray(data)
    struct.pack_into(fmt, b, offset, value)
    return bytes(b)


def _rechecksum(data: bytes) -> bytes:
    """Recompute the checksum so a test reaches the check behind it."""
    body = data[P.PREAMBLE.size :]
    meta_len, wire_len = struct.unpack_from("<I", body, 44)[0], struct.unpack_from("<Q", body, 48)[0]
    h = P.HEADER_V1.size
    crc = zlib.crc32(body[h + meta_len : h + meta_len + wire_len], zlib.crc32(body[h : h + meta_len], zlib.crc32(body[:96])))
    return _patch(data, P.PREAMBLE.size + 96, "<I", crc)


@pytest.mark.parametrize("mutate, code, fatal", [
    (lambda d: b"XASC" + d[4:], P.ERR_MAGIC, True),
    (lambda d: _patch(d, 8, "<Q", 2**62), P.ERR_TOO_LARGE, True),
    (lambda d: d[:-5], P.ERR_TRUNCATED, True),
    (lambda d: d[:10], P.ERR_TRUNCATED, True),
    (lambda d: _patch(d, 4, "<B", 9), P.ERR_VERSION, False),
    (lambda d: d[:-1] + bytes([d[-1] ^ 1]), P.ERR_CHECKSUM, False),
    (lambda d: _rechecksum(_patch(d, 16 + 56, "<Q", 5)), P.ERR_MALFORMED, False),  # raw length disagrees
    (lambda d: _rechecksum(_patch(d, 16 + 2, "<H", 3)), P.ERR_MALFORMED, False),  # tensor count
    (lambda d: _patch(d, 16 + 44, "<I", 10**6), P.ERR_MALFORMED, False),  # meta length vs frame
])
def test_malformed_frames_raise_protocol_error(mutate, code, fatal):
    with pytest.raises(ProtocolError) as e:
        P.decode_frame(mutate(P.encode_frame(_request())))
    assert e.value.code == code
    assert isinstance(e.value, P.FramingError) == fatal


def test_dtype_code_and_rank_limits():
    data = P.encode_frame(P.Frame(P.KIND_REQUEST, 1, HASH, (P.WireTensor("ab", np.zeros(3, np.float32)),)))
    dtype_at = P.PREAMBLE.size + P.HEADER_V1.size + 2 + 2
    with pytest.raises(ProtocolError, match="dtype code"):
        P.decode_frame(_rechecksum(_patch(data, dtype_at, "<B", 200)))
    with pytest.raises(ProtocolError, match="rank"):
        P.decode_frame(_rechecksum(_patch(data, dtype_at + 1, "<B", 200)))
    with pytest.raises(ProtocolError, match="cannot be sent"):
        P.encode_frame(P.Frame(P.KIND_REQUEST, 1, HASH, (P.WireTensor("c", np.zeros(2, np.complex64)),)))


def test_zlib_bomb_is_refused():
    bomb = zlib.compress(bytes(10**6))
    frame = P.Frame(P.KIND_REQUEST, 1, HASH, (P.WireTensor("x", np.zeros(16, np.uint8)),))
    data = P.encode_frame(frame)
    body = bytearray(data[P.PREAMBLE.size :])
    meta_len = struct.unpack_from("<I", body, 44)[0]
    body = body[: P.HEADER_V1.size + meta_len] + bomb
    body[0] = P.CODEC_ZLIB
    struct.pack_into("<Q", body, 48, len(bomb))
    new = P.PREAMBLE.pack(P.MAGIC, P.PROTOCOL_VERSION, P.KIND_REQUEST, 0, len(body)) + bytes(body)
    with pytest.raises(ProtocolError, match="zlib"):
        P.decode_frame(_rechecksum(new))


FUZZ = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(st.binary(max_size=512))
def test_fuzz_random_bytes(data):
    try:
        P.decode_frame(data)
    except ProtocolError:
        pass


@FUZZ
@given(st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), min_size=1, max_size=8), st.booleans(),
       st.integers(0, 400))
def test_fuzz_mutated_valid_frames(flips, fix_crc, cut):
    data = bytearray(P.encode_frame(_request(), codec=P.CODEC_ZLIB if cut % 2 else P.CODEC_NONE))
    for pos, val in flips:
        data[pos % len(data)] = val
    data = bytes(data)
    if fix_crc:
        try:
            data = _rechecksum(data)
        except struct.error:
            pass
    for candidate in (data, data[: len(data) - cut]):
        try:
            frame = P.decode_frame(candidate)
        except ProtocolError:
            continue
        for t in frame.tensors:  # whatever parses is self-consistent
            assert t.array.nbytes == int(np.prod(t.array.shape)) * t.array.dtype.itemsize
