"""Server and device runtimes over real loopback sockets: malformed frames get clean error
replies and the server keeps serving; 32 concurrent devices all get correct answers."""

import socket
import struct
import threading
import zlib

import numpy as np
import onnx
import onnx.utils
import onnxruntime as ort
import pytest

from nasc.errors import ProtocolError
from nasc.examples import build
from nasc.runtime import protocol as P
from nasc.runtime.client import DeviceClient, SplitDevice
from nasc.runtime.halves import OrtHalf, make_endpoint
from nasc.runtime.server import ServerConfig, start_server

HASH = bytes(range(32))
CUT = "relu1"
CLIENTS = 32
REQUESTS_PER_CLIENT = 3
SOCKET_TIMEOUT_S = 20.0


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """Original tiny model plus its head and tail at CUT, cut with onnx.utils.extract_model."""
    d = tmp_path_factory.mktemp("tiny")
    onnx.save(build("tiny"), d / "model.onnx")
    onnx.utils.extract_model(str(d / "model.onnx"), str(d / "head.onnx"), ["input"], [CUT])
    onnx.utils.extract_model(str(d / "model.onnx"), str(d / "tail.onnx"), [CUT], ["logits0"])
    full = ort.InferenceSession(str(d / "model.onnx"), providers=["CPUExecutionProvider"])
    return full, OrtHalf(d / "head.onnx"), OrtHalf(d / "tail.onnx"), d


@pytest.fixture(scope="module")
def server(pair):
    _, _, _, d = pair
    endpoint = make_endpoint("tiny:tail", HASH, [OrtHalf(d / "tail.onnx"), OrtHalf(d / "tail.onnx")])
    handle = start_server([endpoint], "127.0.0.1", 0, config=ServerConfig(frame_timeout_s=5.0))
    yield handle
    handle.close()


def _input(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((1, 3, 16, 16)).astype(np.float32)


def _valid_frame(pair, rid: int = 1) -> bytes:
    _, head, _, _ = pair
    cut = head.run({"input": _input(rid)})[CUT]
    return P.encode_frame(P.Frame(P.KIND_REQUEST, rid, HASH, (P.WireTensor(CUT, cut),)))


def _connect(server) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", server.port), timeout=SOCKET_TIMEOUT_S)
    return s


def _read(sock) -> P.Frame:
    return P.read_frame(lambda n: P.recv_exact(sock, n))


def _expect_answer(pair, sock, rid: int = 1) -> None:
    full, _, _, _ = pair
    sock.sendall(_valid_frame(pair, rid))
    reply = _read(sock)
    assert reply.kind == P.KIND_RESPONSE and reply.request_id == rid
    want = full.run(None, {"input": _input(rid)})[0]
    np.testing.assert_allclose(reply.tensors[0].array, want, rtol=1e-5, atol=1e-5)


def _body(data: bytes) -> bytearray:
    return bytearray(data[P.PREAMBLE.size :])


def _reframe(body: bytearray) -> bytes:
    h = P.HEADER_V1.size
    meta_len, wire_len = struct.unpack_from("<I", body, 44)[0], struct.unpack_from("<Q", body, 48)[0]
    crc = zlib.crc32(bytes(body[h + meta_len : h + meta_len + wire_len]),
                     zlib.crc32(bytes(body[h : h + meta_len]), zlib.crc32(bytes(body[:96]))))
    struct.pack_into("<I", body, 96, crc)
    return P.PREAMBLE.pack(P.MAGIC, P.PROTOCOL_VERSION, P.KIND_REQUEST, 0, len(body)) + bytes(body)


def _wrong_dtype(pair) -> bytes:
    _, head, _, _ = pair
    cut = head.run({"input": _input(1)})[CUT].astype(np.float64)
    return P.encode_frame(P.Frame(P.KIND_REQUEST, 1, HASH, (P.WireTensor(CUT, cut),)))


def _wrong_shape(pair) -> bytes:
    return P.encode_frame(P.Frame(P.KIND_REQUEST, 1, HASH, (P.WireTensor(CUT, np.zeros((1, 8, 4, 4), np.float32)),)))


def _wrong_name(pair) -> bytes:
    _, head, _, _ = pair
    cut = head.run({"input": _input(1)})[CUT]
    return P.encode_frame(P.Frame(P.KIND_REQUEST, 1, HASH, (P.WireTensor("other", cut),)))


def _wrong_hash(pair) -> bytes:
    _, head, _, _ = pair
    cut = head.run({"input": _input(1)})[CUT]
    return P.encode_frame(P.Frame(P.KIND_REQUEST, 1, bytes(32), (P.WireTensor(CUT, cut),)))


def _unexpected_quant(pair) -> bytes:
    _, head, _, _ = pair
    cut = head.run({"input": _input(1)})[CUT]
    return P.encode_frame(P.Frame(P.KIND_REQUEST, 1, HASH, (P.WireTensor(CUT, cut, P.Quant((0.1,), (0,))),)))


def _bad_checksum(pair) -> bytes:
    d = bytearray(_valid_frame(pair))
    d[-3] ^= 0xFF
    return bytes(d)


def _wrong_length(pair) -> bytes:
    body = _body(_valid_frame(pair))
    struct.pack_into("<Q", body, 56, struct.unpack_from("<Q", body, 56)[0] - 4)  # raw length off by 4
    return _reframe(body)


def _wrong_version(pair) -> bytes:
    d = bytearray(_valid_frame(pair))
    d[4] = 99
    return bytes(d)


def _response_kind(pair) -> bytes:
    d = bytearray(_valid_frame(pair))
    d[5] = P.KIND_RESPONSE
    return bytes(d)


RECOVERABLE = {
    "wrong dtype": (_wrong_dtype, P.ERR_SPEC),
    "wrong shape": (_wrong_shape, P.ERR_SPEC),
    "wrong tensor name": (_wrong_name, P.ERR_SPEC),
    "unexpected quant params": (_unexpected_quant, P.ERR_SPEC),
    "wrong artifact hash": (_wrong_hash, P.ERR_ARTIFACT),
    "bad checksum": (_bad_checksum, P.ERR_CHECKSUM),
    "wrong length": (_wrong_length, P.ERR_MALFORMED),
    "wrong version": (_wrong_version, P.ERR_VERSION),
    "response sent as request": (_response_kind, P.ERR_KIND),
}


@pytest.mark.parametrize("case", sorted(RECOVERABLE))
def test_rejected_frame_keeps_connection_usable(pair, server, case):
    make, code = RECOVERABLE[case]
    with _connect(server) as s:
        s.sendall(make(pair))
        reply = _read(s)
        assert reply.kind == P.KIND_ERROR and reply.error_code == code, reply.error
        _expect_answer(pair, s, rid=5)  # same connection still serves


FATAL = {
    "wrong magic": (lambda pair: b"HTTP" + _valid_frame(pair)[4:], P.ERR_MAGIC),
    "huge length": (lambda pair: P.PREAMBLE.pack(P.MAGIC, 1, P.KIND_REQUEST, 0, 2**40), P.ERR_TOO_LARGE),
    "truncated body": (lambda pair: _valid_frame(pair)[:-100], P.ERR_TRUNCATED),
    "truncated preamble": (lambda pair: _valid_frame(pair)[:7], P.ERR_TRUNCATED),
}


@pytest.mark.parametrize("case", sorted(FATAL))
def test_unrecoverable_frame_gets_error_then_close(pair, server, case):
    make, code = FATAL[case]
    with _connect(server) as s:
        s.sendall(make(pair))
        s.shutdown(socket.SHUT_WR)  # the peer ends mid-frame for the truncated cases
        reply = _read(s)
        assert reply.kind == P.KIND_ERROR and reply.error_code == code, reply.error
        assert s.recv(1) == b""  # server closed this connection
    with _connect(server) as s:  # and keeps serving new ones
        _expect_answer(pair, s, rid=6)


def test_split_device_stages_add_up(pair, server):
    full, head, _, _ = pair
    client = DeviceClient("127.0.0.1", server.port, policy=P.CompressionPolicy(P.CODEC_ZLIB))
    dev = SplitDevice(head, client, HASH, {})
    try:
        for seed in range(3):
            outs, t = dev.infer({"input": _input(seed)})
            np.testing.assert_allclose(outs["logits0"], full.run(None, {"input": _input(seed)})[0], rtol=1e-5, atol=1e-5)
            parts = t.head_ms + t.serialize_ms + t.transfer_ms + t.server_ms + t.tail_ms + t.return_ms
            assert min(t.head_ms, t.serialize_ms, t.transfer_ms, t.tail_ms, t.return_ms) >= 0
            assert abs(parts - t.e2e_ms) < 0.05 * t.e2e_ms + 0.05
            assert t.up_bytes > 0 and t.down_bytes > 0
    finally:
        client.close()


def test_error_reply_raises_protocol_error_on_device(pair, server):
    with DeviceClient("127.0.0.1", server.port) as c:
        with pytest.raises(ProtocolError, match="shape") as e:
            c.call(HASH, [P.WireTensor(CUT, np.zeros((2, 2), np.float32))])
        assert e.value.code == P.ERR_SPEC


def test_32_concurrent_clients_all_correct(pair, server):
    full, head, _, _ = pair
    results, errors = {}, []
    barrier = threading.Barrier(CLIENTS, timeout=SOCKET_TIMEOUT_S)

    def device(i: int):
        try:
            with DeviceClient("127.0.0.1", server.port, timeout_s=SOCKET_TIMEOUT_S) as c:
                barrier.wait()
                for k in range(REQUESTS_PER_CLIENT):
                    seed = 1000 + i * REQUESTS_PER_CLIENT + k
                    cut = head.run({"input": _input(seed)})[CUT]
                    reply, _ = c.call(HASH, [P.WireTensor(CUT, cut)])
                    results[seed] = reply.tensors[0].array.copy()
        except BaseException as e:  # collected and reported by the main thread
            errors.append(e)

    threads = [threading.Thread(target=device, args=(i,)) for i in range(CLIENTS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(SOCKET_TIMEOUT_S * 3)
    assert not errors, errors[:3]
    assert len(results) == CLIENTS * REQUESTS_PER_CLIENT
    for seed, got in results.items():
        np.testing.assert_allclose(got, full.run(None, {"input": _input(seed)})[0], rtol=1e-5, atol=1e-5)
