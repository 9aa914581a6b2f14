"""Server runtime: serves artifact halves over TCP to many devices at once.

asyncio handles the connections; halves run on a bounded thread pool (one runner per
worker). Every frame is checked against the served half's input specs before it runs; a
rejected frame gets an error reply and the connection goes on unless the stream is lost.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import struct
import threading
import time
from dataclasses import dataclass

import numpy as np

from nasc.errors import NascError, ProtocolError
from nasc.runtime import protocol as P
from nasc.runtime.halves import Endpoint


@dataclass(frozen=True)
class ServerConfig:
    """Bounds of one server; every wait is finite."""

    max_pending: int = 64  # requests decoded but not yet answered, over all connections
    max_connections: int = 256
    idle_timeout_s: float = 300.0  # a connection silent this long between frames is closed
    frame_timeout_s: float = 30.0  # a frame must arrive completely within this after its preamble
    shutdown_grace_s: float = 10.0
    discard_bytes: int = 16 * 2**20  # after a fatal framing error, input read and dropped before closing
    discard_s: float = 1.0
    limits: P.Limits = P.DEFAULT_LIMITS


DEFAULT_SERVER_CONFIG = ServerConfig()


def validate_request(frame: P.Frame, endpoint: Endpoint) -> dict[str, np.ndarray]:
    """Feeds for the endpoint's half, or ProtocolError (code ERR_SPEC) naming the tensor at fault."""
    got = {t.name: t for t in frame.tensors}
    want = {s.name: s for s in endpoint.inputs}
    if set(got) != set(want):
        raise _spec_error(f"frame carries tensors {sorted(got)} but {endpoint.name} takes {sorted(want)}")
    feeds = {}
    for name, spec in want.items():
        t = got[name]
        if t.array.dtype.name != spec.dtype:
            raise _spec_error(f"tensor {name!r}: dtype {t.array.dtype.name}, {endpoint.name} expects {spec.dtype}")
        if tuple(t.array.shape) != tuple(spec.shape):
            raise _spec_error(f"tensor {name!r}: shape {list(t.array.shape)}, {endpoint.name} expects {list(spec.shape)}")
        if not P.quant_matches(t.quant, endpoint.quant.get(name)):
            raise _spec_error(f"tensor {name!r}: quantization parameters differ from the manifest's")
        feeds[name] = t.array
    return feeds


def _spec_error(msg: str) -> ProtocolError:
    err = ProtocolError(msg)
    err.code = P.ERR_SPEC
    return err


def _ids_from_body(body: bytes) -> tuple[int, bytes]:
    """Best-effort request id and hash of a rejected frame, so the error reply can be matched."""
    if len(body) >= 44:
        rid, h = struct.unpack_from("<Q32s", body, 4)
        return rid, h
    return 0, bytes(P.HASH_BYTES)


class Server:
    """Serves endpoints keyed by their wire hash. Use `start_server` for a background thread,
    or `serve_forever` from a running event loop."""

    def __init__(self, endpoints: list[Endpoint], config: ServerConfig = DEFAULT_SERVER_CONFIG):
        if not endpoints:
            raise NascError("nothing to serve: give at least one artifact with a tail")
        self.endpoints = {e.artifact_hash: e for e in endpoints}
        self.config = config
        workers = sum(e.workers for e in endpoints)
        self.pool = concurrent.futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="nasc-tail")
        self.stats = {"requests": 0, "errors": 0, "connections": 0}
        self._conns: set[asyncio.Task] = set()
        self._server: asyncio.base_events.Server | None = None
        self._pending: asyncio.Semaphore | None = None
        self._inflight = 0
        self._closing = False

    async def start(self, host: str = "127.0.0.1", port: int = 0, sock=None) -> int:
        """Listen (on `sock` if given, e.g. one made inside a network namespace); return the port."""
        self._pending = asyncio.Semaphore(self.config.max_pending)
        kw = {"sock": sock} if sock is not None else {"host": host, "port": port}
        self._server = await asyncio.start_server(self._accept, backlog=self.config.max_connections, **kw)
        return self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        """Stop accepting, let requests in flight finish (bounded by the grace period), close."""
        self._closing = True
        if self._server is not None:
            self._server.close()
        deadline = time.monotonic() + self.config.shutdown_grace_s
        while self._inflight and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        for task in list(self._conns):
            task.cancel()
        await asyncio.gather(*self._conns, return_exceptions=True)
        self.pool.shutdown(wait=True, cancel_futures=True)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if len(self._conns) >= self.config.max_connections or self._closing:
            await self._reply(writer, P.error_frame(0, bytes(P.HASH_BYTES), P.ERR_BUSY, "server is at its connection limit"))
            writer.close()
            return
        self._conns.add(task)
        self.stats["connections"] += 1
        try:
            await self._serve_connection(reader, writer)
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            self._conns.discard(task)
            writer.close()

    async def _serve_connection(self, reader, writer) -> None:
        cfg = self.config
        while not self._closing:
            try:
                pre = await asyncio.wait_for(reader.readexactly(P.PREAMBLE.size), cfg.idle_timeout_s)
            except asyncio.IncompleteReadError as e:
                if e.partial:
                    await self._fatal(writer, P.ERR_TRUNCATED, "connection closed inside a frame preamble", reader)
                return
            except asyncio.TimeoutError:
                return
            try:
                version, kind, body_len = P.parse_preamble(pre, cfg.limits)
            except P.FramingError as e:
                await self._fatal(writer, e.code, str(e), reader)
                return
            try:
                body = await asyncio.wait_for(reader.readexactly(body_len), cfg.frame_timeout_s)
            except (asyncio.IncompleteReadError, asyncio.TimeoutError):
                await self._fatal(writer, P.ERR_TRUNCATED, f"frame of {body_len} bytes did not arrive completely", reader)
                return
            recv_ns = time.monotonic_ns()
            reply = await self._answer(version, kind, body, recv_ns)
            await self._reply(writer, reply)

    async def _answer(self, version: int, kind: int, body: bytes, recv_ns: int) -> tuple[P.Frame, P.CompressionPolicy | None]:
        rid, h = _ids_from_body(body)
        try:
            frame = P.parse_body(version, kind, body, self.config.limits)
            if frame.kind != P.KIND_REQUEST:
                raise _coded(P.ERR_KIND, f"a server only takes requests, got a {P.KINDS[frame.kind]} frame")
            endpoint = self.endpoints.get(frame.artifact_hash)
            if endpoint is None:
                raise _coded(P.ERR_ARTIFACT, f"artifact hash {frame.artifact_hash.hex()[:16]}... is not served here "
                             f"(serving {[e.name for e in self.endpoints.values()]})")
            feeds = validate_request(frame, endpoint)
        except ProtocolError as e:
            self.stats["errors"] += 1
            return P.error_frame(rid, h, getattr(e, "code", P.ERR_MALFORMED), str(e)), None
        async with self._pending:
            loop = asyncio.get_running_loop()
            self._inflight += 1
            try:
                outs, tail_ns, queue_ns = await loop.run_in_executor(self.pool, _run, endpoint, feeds, time.perf_counter_ns())
            except Exception as e:  # a half that fails at run time is reported, the server goes on
                self.stats["errors"] += 1
                return P.error_frame(rid, h, P.ERR_INTERNAL, f"{endpoint.name} failed: {type(e).__name__}: {e}"), None
            finally:
                self._inflight -= 1
        self.stats["requests"] += 1
        tensors = tuple(P.WireTensor(s.name, np.asarray(outs[s.name])) for s in endpoint.outputs)
        timing = P.ServerTiming(recv_ns=recv_ns, tail_ns=tail_ns, queue_ns=queue_ns)
        codec = P.best_codec(frame.accept) if frame.codec != P.CODEC_NONE else P.CODEC_NONE
        reply = P.Frame(P.KIND_RESPONSE, frame.request_id, frame.artifact_hash, tensors, timing=timing)
        return reply, (P.CompressionPolicy(codec) if codec != P.CODEC_NONE else None)

    async def _reply(self, writer, reply) -> None:
        frame, policy = reply if isinstance(reply, tuple) else (reply, None)
        try:
            data = P.encode_frame(frame, policy=policy, limits=self.config.limits)
        except ProtocolError as e:
            data = P.encode_frame(P.error_frame(frame.request_id, frame.artifact_hash, P.ERR_INTERNAL, str(e)))
        writer.write(data)
        await writer.drain()

    async def _fatal(self, writer, code: int, message: str, reader=None) -> None:
        """Reply, half-close, and discard what the peer still sends (bounded), so closing with
        unread input does not reset the connection before the peer has read the reply."""
        self.stats["errors"] += 1
        await self._reply(writer, P.error_frame(0, bytes(P.HASH_BYTES), code, message + "; closing the connection"))
        if reader is None or not writer.can_write_eof():
            return
        writer.write_eof()
        left, deadline = self.config.discard_bytes, time.monotonic() + self.config.discard_s
        while left > 0 and time.monotonic() < deadline:
            try:
                chunk = await asyncio.wait_for(reader.read(min(left, 1 << 16)), deadline - time.monotonic())
            except (asyncio.TimeoutError, ConnectionError):
                return
            if not chunk:
                return
            left -= len(chunk)


def _coded(code: int, msg: str) -> ProtocolError:
    err = ProtocolError(msg)
    err.code = code
    return err


def _run(endpoint: Endpoint, feeds: dict, queued_at_ns: int) -> tuple[dict, int, int]:
    runner = endpoint.runners.get()
    t0 = time.perf_counter_ns()
    try:
        outs = runner.run(feeds)
    finally:
        endpoint.runners.put(runner)
    t1 = time.perf_counter_ns()
    return outs, t1 - t0, t0 - queued_at_ns


class ServerHandle:
    """A server running its own event loop in a daemon thread; `close()` shuts it down."""

    def __init__(self, server: Server, host: str, port: int, sock=None, start_timeout_s: float = 30.0):
        self.server, self.host = server, host
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self.port = port
        self._thread = threading.Thread(target=self._main, args=(host, port, sock), name="nasc-serve", daemon=True)
        self._thread.start()
        if not self._ready.wait(start_timeout_s):
            raise NascError(f"server on {host}:{port} did not start within {start_timeout_s} s")
        if self._error is not None:
            raise NascError(f"server cannot listen on {host}:{port}: {self._error}")

    def _main(self, host, port, sock) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self.port = self._loop.run_until_complete(self.server.start(host, port, sock))
        except OSError as e:
            self._error = e
            self._ready.set()
            return
        self._ready.set()
        self._loop.run_forever()

    def close(self, timeout_s: float = 30.0) -> None:
        if self._error is not None or not self._thread.is_alive():
            return
        fut = asyncio.run_coroutine_threadsafe(self.server.stop(), self._loop)
        try:
            fut.result(timeout_s)
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout_s)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def start_server(endpoints: list[Endpoint], host: str = "127.0.0.1", port: int = 0, sock=None,
                 config: ServerConfig = DEFAULT_SERVER_CONFIG) -> ServerHandle:
    """Serve `endpoints` from a background thread; port 0 picks a free port (see `.port`)."""
    return ServerHandle(Server(endpoints, config), host, port, sock)


def serve(artifact_dirs: list, host: str = "127.0.0.1", port: int = 0, workers: int = 1, ort_pair: bool = False,
          config: ServerConfig = DEFAULT_SERVER_CONFIG, on_ready=None, stop_event: threading.Event | None = None) -> dict:
    """Load the tail of every artifact and serve until `stop_event` is set (or forever).
    With ort_pair, each tail is also served through ONNX Runtime under its variant hash."""
    from nasc.runtime.halves import load_endpoint

    endpoints = []
    for d in artifact_dirs:
        endpoints.append(load_endpoint(d, "tail", "compiled", workers))
        if ort_pair:
            endpoints.append(load_endpoint(d, "tail", "ort", workers))
    handle = start_server(endpoints, host, port, config=config)
    try:
        if on_ready is not None:
            on_ready(handle, endpoints)
        while stop_event is None or not stop_event.wait(0.2):
            if stop_event is None:
                time.sleep(0.2)
    finally:
        handle.close()
    return dict(handle.server.stats)
