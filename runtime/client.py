"""Device runtime: runs the head locally, sends the cut tensor(s) to the server, gets the result.

`run_head` runs only the head of an artifact; `DeviceClient` speaks the wire protocol over one
persistent TCP connection; `SplitDevice` does a whole request and times every stage.
"""

from __future__ import annotations

import itertools
import socket
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from nasc.errors import ProtocolError
from nasc.runtime import protocol as P
from nasc.runtime.halves import half_runner, load_half, quant_of, wire_hash

DEFAULT_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class StageTimes:
    """One request, in milliseconds. With a shared clock (server on this host) the stages add up
    to e2e_ms; otherwise the network time is split evenly between transfer and return."""

    head_ms: float
    serialize_ms: float
    transfer_ms: float
    server_ms: float  # decode, validation and queueing on the server
    tail_ms: float
    return_ms: float  # reply on the wire plus its decoding on the device
    e2e_ms: float
    up_bytes: int
    down_bytes: int

    def to_json(self) -> dict:
        return asdict(self)


def run_head(artifact_dir: str | Path, feeds: dict, engine: str = "compiled") -> dict[str, np.ndarray]:
    """Run only the head of an artifact on this machine; returns the cut tensor(s), already
    quantized when the manifest compresses the cut (uint8)."""
    head, _, _ = load_half(artifact_dir, "head", engine)
    return head.run(feeds)


class DeviceClient:
    """One persistent connection to a server. `sock` may be a socket made elsewhere (e.g. in a
    network namespace); `shaper` emulates a link in process."""

    def __init__(self, host: str, port: int, *, sock: socket.socket | None = None, shaper=None,
                 policy: P.CompressionPolicy | None = None, timeout_s: float = DEFAULT_TIMEOUT_S,
                 limits: P.Limits = P.DEFAULT_LIMITS):
        self.sock = sock or socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.settimeout(timeout_s)
        try:
            self.sock.connect((host, port))
        except OSError as e:
            self.sock.close()
            raise ProtocolError(f"cannot connect to the server at {host}:{port}: {e}") from None
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.shaper, self.policy, self.limits = shaper, policy, limits
        self._ids = itertools.count(1)

    def call(self, artifact_hash: bytes, tensors: list[P.WireTensor]) -> tuple[P.Frame, dict]:
        """Send one request, return (reply frame, client stamps in monotonic ns). An error reply
        raises ProtocolError carrying the server's code and message."""
        t_start = time.monotonic_ns()
        rid = next(self._ids)
        frame = P.Frame(P.KIND_REQUEST, rid, artifact_hash, tuple(tensors), accept=P.available_codecs_mask())
        data = P.encode_frame(frame, policy=self.policy, limits=self.limits)
        t_encoded = time.monotonic_ns()
        if self.shaper is not None:
            self.shaper.send(self.sock, data)
        else:
            self.sock.sendall(data)
        t_sent = time.monotonic_ns()
        pre = P.recv_exact(self.sock, P.PREAMBLE.size)
        first = time.monotonic()
        version, kind, body_len = P.parse_preamble(pre, self.limits)
        body = P.recv_exact(self.sock, body_len)
        if self.shaper is not None:
            self.shaper.hold_reply(P.PREAMBLE.size + body_len, first)
        reply = P.parse_body(version, kind, body, self.limits)
        t_done = time.monotonic_ns()
        if reply.kind == P.KIND_ERROR:
            err = ProtocolError(f"server rejected request {rid}: {reply.error}")
            err.code = reply.error_code
            raise err
        if reply.request_id != rid or reply.artifact_hash != artifact_hash:
            raise ProtocolError(f"reply to request {reply.request_id} arrived for request {rid}")
        stamps = {"start": t_start, "encoded": t_encoded, "sent": t_sent, "done": t_done,
                  "up_bytes": len(data), "down_bytes": reply.wire_bytes}
        return reply, stamps

    def close(self) -> None:
        self.sock.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class SplitDevice:
    """The device side of one split: optional head (None sends the raw input, server-only),
    the wire identity of the served tail, and the manifest's quantization of the cut."""

    def __init__(self, head, client: DeviceClient, artifact_hash: bytes, quant: dict, shared_clock: bool = True):
        self.head, self.client, self.hash, self.quant = head, client, artifact_hash, quant
        self.shared_clock = shared_clock

    def infer(self, feeds: dict) -> tuple[dict[str, np.ndarray], StageTimes]:
        t0 = time.monotonic_ns()
        cut = self.head.run(feeds) if self.head is not None else feeds
        t1 = time.monotonic_ns()
        tensors = [P.WireTensor(n, np.asarray(a), self.quant.get(n)) for n, a in cut.items()]
        reply, st = self.client.call(self.hash, tensors)
        tm = reply.timing
        server_ns = tm.send_ns - tm.recv_ns
        if self.shared_clock:
            transfer_ns, return_ns = tm.recv_ns - st["encoded"], st["done"] - tm.send_ns
        else:
            net = (st["done"] - st["encoded"]) - server_ns
            transfer_ns = return_ns = net // 2
        outs = {t.name: t.array for t in reply.tensors}
        ms = 1e-6
        times = StageTimes(
            head_ms=(t1 - t0) * ms, serialize_ms=(st["encoded"] - t1) * ms, transfer_ms=transfer_ns * ms,
            server_ms=(server_ns - tm.tail_ns) * ms, tail_ms=tm.tail_ns * ms, return_ms=return_ns * ms,
            e2e_ms=(st["done"] - t0) * ms, up_bytes=st["up_bytes"], down_bytes=st["down_bytes"],
        )
        return outs, times


def connect_split(artifact_dir: str | Path, host: str, port: int, engine: str = "compiled", **client_kw) -> SplitDevice:
    """A SplitDevice for an artifact: loads only its head (if any) and addresses its tail."""
    from nasc.runtime.artifact import open_artifact

    art = open_artifact(artifact_dir)
    man = art.manifest
    head = half_runner(art, "head", engine, "cpu") if man.get("head") is not None else None
    tail_inputs = [d["name"] for d in man["tail"]["inputs"]]
    shared = client_kw.pop("shared_clock", True)
    return SplitDevice(head, DeviceClient(host, port, **client_kw), wire_hash(artifact_dir, engine),
                       quant_of(man, tail_inputs), shared)


def run_split(artifact_dir: str | Path, feeds: dict, host: str, port: int) -> dict[str, np.ndarray]:
    """Run one input through the device head and the tail served at host:port."""
    dev = connect_split(artifact_dir, host, port)
    try:
        return dev.infer(feeds)[0]
    finally:
        dev.client.close()
