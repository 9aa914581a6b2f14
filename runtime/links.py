"""Emulated network links between the device runtime and the server runtime.

Preferred: two network namespaces the benchmark creates, joined by a veth pair on a private
/30, shaped by `tc` (netem for delay/loss/rate; tbf for rate when netem is missing, with
delay and loss added in process). Fallback: an in-process token-bucket shaper on loopback.
"""

from __future__ import annotations

import ctypes
import math
import os
import shutil
import socket
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from nasc.defaults import LINK_PRESETS, SEED
from nasc.errors import NascError
from nasc.types import Link

MSS_BYTES = 1448  # TCP payload of one Ethernet-sized segment
PACE_CHUNK_BYTES = 16 * 1024  # the in-process shaper releases bytes in chunks of this size
TBF_MIN_BURST_BYTES = 32 * 1024
TBF_QUEUE_BYTES = 8 * 2**20  # deep enough that one request never overflows it (no tail drop)
# tbf lets a whole burst out at line rate after idle; a peak-rate bucket one packet deep holds
# the burst to the link rate, so a small message still pays its serialization time.
TBF_PEAK_OVER_RATE = 1.01
TBF_PEAK_MTU_BYTES = 1600
NETNS_DIR = Path("/var/run/netns")
NETNS_SUBNET = ("10.254.77.1", "10.254.77.2", 30)  # exists only inside the namespaces created here
CLONE_NEWNET = 0x40000000
TC_TIMEOUT_S = 10.0

EMULATION_NONE = "loopback (no emulation)"
EMULATION_INPROC = "in-process token bucket (bandwidth, delay, loss) on loopback"
EMULATION_NETEM = "netns + tc netem (bandwidth, delay, loss)"
EMULATION_TBF = "netns + tc tbf (bandwidth); in-process delay and loss (netem not in this kernel)"


@dataclass(frozen=True)
class BandwidthTrace:
    """Bandwidth over time, cycled: (start_s, bandwidth_mbit) steps sorted by start."""

    steps: tuple[tuple[float, float], ...]
    period_s: float

    def mbit_at(self, t_s: float) -> float:
        t = t_s % self.period_s
        cur = self.steps[0][1]
        for start, mbit in self.steps:
            if start > t:
                break
            cur = mbit
        return cur


def parse_link(text: str) -> tuple[Link, BandwidthTrace | None]:
    """`wifi|lte|3g|...`, `BW_MBIT,RTT_MS[,LOSS_PCT]`, a link profile `FILE.json` or `trace:FILE[,RTT_MS[,LOSS_PCT]]`."""
    t = text.strip()
    if t.lower() in LINK_PRESETS:
        return LINK_PRESETS[t.lower()], None
    if t.endswith(".json"):
        return Link.load(t), None
    if t.startswith("trace:"):
        path, *rest = t[len("trace:") :].split(",")
        trace = load_trace(path)
        nums = _numbers(text, rest)
        rtt, loss = (nums + [0.0, 0.0])[:2]
        mean = float(np.mean([m for _, m in trace.steps]))
        return Link(mean, rtt, loss, name=f"trace:{Path(path).name}"), trace
    nums = _numbers(text, t.split(","))
    if len(nums) not in (2, 3) or nums[0] <= 0 or nums[1] < 0 or (len(nums) == 3 and not 0 <= nums[2] < 100):
        raise NascError(f"--link {text!r}: expected BW_MBIT,RTT_MS[,LOSS_PCT] with BW > 0, RTT >= 0, 0 <= LOSS < 100, "
                        f"or one of {sorted(LINK_PRESETS)}")
    bw, rtt, loss = (nums + [0.0])[:3]
    return Link(bw, rtt, loss, name=f"{bw:g}mbit/{rtt:g}ms" + (f"/{loss:g}%" if loss else "")), None


def _numbers(text: str, parts: list[str]) -> list[float]:
    try:
        return [float(p) for p in parts if p.strip()]
    except ValueError:
        raise NascError(f"--link {text!r}: {parts} are not numbers; expected BW_MBIT,RTT_MS[,LOSS_PCT] "
                        f"or one of {sorted(LINK_PRESETS)}") from None


def load_trace(path: str | Path) -> BandwidthTrace:
    """A trace file: one `time_s,bandwidth_mbit` per line (# comments), times increasing."""
    p = Path(path)
    try:
        lines = p.read_text().splitlines()
    except OSError as e:
        raise NascError(f"{p}: cannot read the bandwidth trace ({e.strerror})") from None
    steps = []
    for i, line in enumerate(lines, 1):
        line = line.split("#")[0].strip()
        if not line:
            continue
        try:
            ts, mbit = (float(x) for x in line.replace(";", ",").split(",")[:2])
        except ValueError:
            raise NascError(f"{p}:{i}: expected `time_s,bandwidth_mbit`, got {line!r}") from None
        if mbit <= 0 or (steps and ts <= steps[-1][0]):
            raise NascError(f"{p}:{i}: bandwidth must be > 0 and times increasing")
        steps.append((ts, mbit))
    if not steps:
        raise NascError(f"{p}: the bandwidth trace is empty")
    period = steps[-1][0] + max(steps[-1][0] - steps[-2][0], 1.0) if len(steps) > 1 else 1.0
    return BandwidthTrace(tuple(steps), period)


class Shaper:
    """In-process emulation of one link on top of a fast path (loopback or a shaped veth).

    Uplink: the sender waits the one-way delay, then releases bytes at the link rate.
    Downlink: the receiver holds a reply until one-way delay + serialization time after its
    first byte arrived. Loss: each lost MSS segment costs one RTT (fast retransmit), drawn
    from a seeded generator. `bandwidth=False` leaves the rate to the kernel (tbf).
    """

    def __init__(self, link: Link, trace: BandwidthTrace | None = None, bandwidth: bool = True,
                 delay: bool = True, seed: int = SEED):
        self.link, self.trace = link, trace
        self.bandwidth, self.delay = bandwidth, delay
        self.rng = np.random.default_rng(seed)
        self.t0 = time.monotonic()

    def _one_way_s(self) -> float:
        return self.link.rtt_ms / 2e3 if self.delay else 0.0

    def _mbit(self) -> float:
        return self.trace.mbit_at(time.monotonic() - self.t0) if self.trace else self.link.bandwidth_mbit

    def _loss_s(self, nbytes: int) -> float:
        if not self.delay or self.link.loss_pct <= 0:
            return 0.0
        lost = self.rng.binomial(max(1, math.ceil(nbytes / MSS_BYTES)), self.link.loss_pct / 100.0)
        return lost * self.link.rtt_ms / 1e3

    def send(self, sock: socket.socket, data: bytes) -> None:
        time.sleep(self._one_way_s() + self._loss_s(len(data)))
        if not self.bandwidth:
            sock.sendall(data)
            return
        view, start = memoryview(data), time.monotonic()
        due = 0.0
        for off in range(0, len(data), PACE_CHUNK_BYTES):
            chunk = view[off : off + PACE_CHUNK_BYTES]
            due += len(chunk) * 8.0 / (self._mbit() * 1e6)
            wait = start + due - time.monotonic()
            if wait > 0:
                time.sleep(wait)
            sock.sendall(chunk)

    def hold_reply(self, nbytes: int, first_byte_at: float) -> None:
        """Sleep until a reply of nbytes whose first byte arrived at `first_byte_at` would be in."""
        serial = nbytes * 8.0 / (self._mbit() * 1e6) if self.bandwidth else 0.0
        wait = first_byte_at + self._one_way_s() + serial + self._loss_s(nbytes) - time.monotonic()
        if wait > 0:
            time.sleep(wait)


# ---------------------------------------------------------------- network namespaces


def _setns(name: str) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(NETNS_DIR / name, os.O_RDONLY)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns into {name} failed")
    finally:
        os.close(fd)


def in_netns(name: str, fn):
    """Call fn() on a thread that has entered namespace `name`; sockets it makes stay there."""
    box = {}

    def body():
        try:
            _setns(name)
            box["value"] = fn()
        except BaseException as e:  # handed back to the caller's thread
            box["error"] = e

    t = threading.Thread(target=body, name=f"netns-{name}")
    t.start()
    t.join()
    if "error" in box:
        raise box["error"]
    return box["value"]


def _run(*cmd: str) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=TC_TIMEOUT_S, check=False)


class NetnsPair:
    """A device namespace and a server namespace joined by one veth pair; `close()` removes both.

    Names carry the process id so concurrent runs never collide; the /30 lives only inside
    these namespaces, so no traffic can leave them.
    """

    def __init__(self, tag: str = ""):
        stem = f"{os.getpid()}{tag}"
        self.device_ns, self.server_ns = f"nasc-dev-{stem}", f"nasc-srv-{stem}"
        self.device_if, self.server_if = f"nd{stem}"[:15], f"ns{stem}"[:15]
        self.device_addr, self.server_addr, self.prefix = NETNS_SUBNET
        self.netem = False
        self._made: list[str] = []

    def open(self) -> "NetnsPair":
        try:
            for ns in (self.device_ns, self.server_ns):
                self._check(_run("ip", "netns", "add", ns), "ip netns add")
                self._made.append(ns)
                self._check(_run("ip", "-n", ns, "link", "set", "lo", "up"), "ip link set lo up")
            self._check(_run("ip", "link", "add", self.device_if, "netns", self.device_ns, "type", "veth",
                             "peer", "name", self.server_if, "netns", self.server_ns), "ip link add veth")
            for ns, dev, addr in ((self.device_ns, self.device_if, self.device_addr),
                                  (self.server_ns, self.server_if, self.server_addr)):
                self._check(_run("ip", "-n", ns, "addr", "add", f"{addr}/{self.prefix}", "dev", dev), "ip addr add")
                self._check(_run("ip", "-n", ns, "link", "set", dev, "up"), "ip link set up")
            probe = _run("ip", "netns", "exec", self.device_ns, "tc", "qdisc", "replace", "dev", self.device_if,
                         "root", "netem", "delay", "1ms")
            self.netem = probe.returncode == 0
        except BaseException:
            self.close()
            raise
        return self

    @staticmethod
    def _check(cp: subprocess.CompletedProcess, what: str) -> None:
        if cp.returncode != 0:
            raise NascError(f"{what} failed: {cp.stderr.strip() or cp.stdout.strip()}")

    def shape(self, link: Link) -> str:
        """Shape both directions for `link`; returns the emulation description."""
        for ns, dev in ((self.device_ns, self.device_if), (self.server_ns, self.server_if)):
            if self.netem:
                q = ["netem", "delay", f"{link.rtt_ms / 2:g}ms", "rate", f"{link.bandwidth_mbit:g}mbit",
                     "limit", str(TBF_QUEUE_BYTES // MSS_BYTES)]
                if link.loss_pct > 0:
                    q += ["loss", f"{link.loss_pct:g}%"]
            else:
                rate_bps = link.bandwidth_mbit * 1e6 / 8
                burst = max(TBF_MIN_BURST_BYTES, int(rate_bps / 250))
                q = ["tbf", "rate", f"{link.bandwidth_mbit:g}mbit", "burst", str(burst), "limit", str(TBF_QUEUE_BYTES),
                     "peakrate", f"{link.bandwidth_mbit * TBF_PEAK_OVER_RATE:g}mbit", "mtu", str(TBF_PEAK_MTU_BYTES)]
            self._check(_run("ip", "netns", "exec", ns, "tc", "qdisc", "replace", "dev", dev, "root", *q), "tc qdisc")
        return EMULATION_NETEM if self.netem else EMULATION_TBF

    def shaper(self, link: Link, seed: int = SEED) -> Shaper | None:
        """What the process must add on top of the kernel qdisc (delay/loss without netem)."""
        return None if self.netem else Shaper(link, bandwidth=False, delay=True, seed=seed)

    def server_socket(self, port: int = 0) -> socket.socket:
        def make():
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((self.server_addr, port))
            s.listen(256)
            s.setblocking(False)
            return s

        return in_netns(self.server_ns, make)

    def device_socket(self) -> socket.socket:
        return in_netns(self.device_ns, lambda: socket.socket(socket.AF_INET, socket.SOCK_STREAM))

    def close(self) -> None:
        for ns in reversed(self._made):
            _run("ip", "netns", "del", ns)
        self._made.clear()

    def __enter__(self):
        return self.open()

    def __exit__(self, *exc):
        self.close()


def netns_unavailable_reason() -> str | None:
    """None when namespaces can be made here, else why not (the in-process shaper is used)."""
    if os.geteuid() != 0:
        return "not root"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"`{tool}` is not installed"
    if not hasattr(ctypes.CDLL(None), "setns"):
        return "libc has no setns"
    return None
