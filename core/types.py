"""Small value types for the nouns of split computing, with units in field names."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class TensorSpec:
    """A named tensor with a static shape and a numpy dtype name (e.g. "float32")."""

    name: str
    shape: tuple[int, ...]
    dtype: str

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * np.dtype(self.dtype).itemsize

    def to_json(self) -> dict:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}

    @staticmethod
    def from_json(d: dict) -> "TensorSpec":
        return TensorSpec(d["name"], tuple(int(x) for x in d["shape"]), d["dtype"])


@dataclass(frozen=True)
class Link:
    """A network path between device and server."""

    bandwidth_mbit: float
    rtt_ms: float
    loss_pct: float = 0.0
    name: str = ""
    # packing + unpacking the frames on the two ends, GB/s (0: not modelled)
    serialize_gbs: float = 0.0

    def transfer_ms(self, payload_bytes) -> "np.ndarray | float":
        """Payload on the wire plus one round trip (request + reply), plus framing at both ends."""
        b = np.asarray(payload_bytes, dtype=np.float64)
        framing = b / (self.serialize_gbs * 1e6) if self.serialize_gbs > 0 else 0.0
        return b * 8.0 / (self.bandwidth_mbit * 1e3) + self.rtt_ms + framing

    FIELDS = ("bandwidth_mbit", "rtt_ms", "loss_pct", "serialize_gbs")

    @staticmethod
    def load(path: str) -> "Link":
        """A link profile file: {"bandwidth_mbit": .., "rtt_ms": .., ["loss_pct", "serialize_gbs", "name"]}."""
        from nasc.errors import NascError

        try:
            d = json.loads(Path(path).read_text())
            link = Link(**{k: float(d[k]) for k in Link.FIELDS if k in d}, name=str(d.get("name", Path(path).stem)))
        except FileNotFoundError:
            raise NascError(f"{path}: link profile not found") from None
        except (json.JSONDecodeError, TypeError, ValueError, AttributeError) as e:
            raise NascError(f"{path}: not a valid link profile ({e}); expected JSON with bandwidth_mbit and rtt_ms") from None
        if link.bandwidth_mbit <= 0 or link.rtt_ms < 0 or not 0 <= link.loss_pct < 100 or link.serialize_gbs < 0:
            raise NascError(f"{path}: link profile out of range (bandwidth_mbit > 0, rtt_ms >= 0, 0 <= loss_pct < 100)")
        return link


@dataclass(frozen=True)
class HardwareProfile:
    """What the analytic latency model knows of one processor.

    Roofline per kernel: max(flops / effective FLOP/s, bytes / effective bandwidth) plus a
    fixed per-kernel overhead (dispatch or launch). `source` says where the numbers came from.
    """

    name: str
    peak_gflops: float
    mem_bandwidth_gbs: float
    kernel_overhead_us: float
    source: str = "analytic"
    extra: dict = field(default_factory=dict, compare=False, hash=False)

    def to_json(self) -> dict:
        return asdict(self)

    @staticmethod
    def from_json(d: dict) -> "HardwareProfile":
        known = {k: d[k] for k in ("name", "peak_gflops", "mem_bandwidth_gbs", "kernel_overhead_us") if k in d}
        missing = {"name", "peak_gflops", "mem_bandwidth_gbs", "kernel_overhead_us"} - set(known)
        if missing:
            from nasc.errors import NascError

            raise NascError(f"hardware profile is missing {sorted(missing)}")
        return HardwareProfile(**known, source=d.get("source", "analytic"), extra=d.get("extra", {}))

    @staticmethod
    def load(path: str | Path) -> "HardwareProfile":
        from nasc.errors import NascError

        p = Path(path)
        try:
            return HardwareProfile.from_json(json.loads(p.read_text()))
        except FileNotFoundError:
            raise NascError(f"{p}: hardware profile file not found") from None
        except (json.JSONDecodeError, TypeError) as e:
            raise NascError(f"{p}: not a valid hardware profile JSON ({e})") from None


@dataclass(frozen=True)
class Prediction:
    """Predicted end-to-end latency of one cut, in milliseconds."""

    device_ms: float
    transfer_ms: float
    server_ms: float

    @property
    def total_ms(self) -> float:
        return self.device_ms + self.transfer_ms + self.server_ms

    def to_json(self) -> dict:
        return {
            "device_ms": round(self.device_ms, 4),
            "transfer_ms": round(self.transfer_ms, 4),
            "server_ms": round(self.server_ms, 4),
            "total_ms": round(self.total_ms, 4),
        }
