"""Validated profiles the planner reasons about: devices, links, codecs and the model's blocks.

Every profile is a dataclass whose ``__post_init__`` checks each field and raises
:class:`splitnet.errors.ConfigError` naming the field and the reason. Units are in the field names.
Profiles load from and save to YAML; ``from_dict`` rejects unknown keys so a typo does not pass
silently.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import yaml

from splitnet.documents import read_document
from splitnet.errors import ConfigError
from splitnet.wire.overhead import TRANSPORTS, transport_bytes_per_message

GIB = 1024**3
RUNTIMES = ("torch", "onnxruntime")
MODEL_KINDS = ("encoder", "decoder", "vision", "sequential")


# ----------------------------------------------------------------------------- field checks
def _fail(where: str, name: str, reason: str) -> None:
    raise ConfigError(f"{where}.{name}: {reason}")


def _num(where: str, name: str, value: Any, *, lo: float | None = None, lo_open: bool = False,
         hi: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        _fail(where, name, f"must be a number, got {type(value).__name__} {value!r}")
    v = float(value)
    if not math.isfinite(v):
        _fail(where, name, f"must be finite, got {value!r}")
    if lo is not None and (v <= lo if lo_open else v < lo):
        _fail(where, name, f"must be {'>' if lo_open else '>='} {lo:g}, got {value!r}")
    if hi is not None and v > hi:
        _fail(where, name, f"must be <= {hi:g}, got {value!r}")
    return v


def _int(where: str, name: str, value: Any, *, lo: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        else:
            _fail(where, name, f"must be an integer, got {type(value).__name__} {value!r}")
    if value < lo:
        _fail(where, name, f"must be >= {lo}, got {value!r}")
    return int(value)


def _str(where: str, name: str, value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        _fail(where, name, f"must be a non-empty string, got {value!r}")
    return value


def _from_dict(cls, data: Any, where: str, renames: Mapping[str, Any] | None = None):
    """Build dataclass ``cls`` from a mapping, rejecting unknown keys with the list of known ones."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where}: expected a mapping, got {type(data).__name__}")
    data = dict(data)
    for alias, conv in (renames or {}).items():
        if alias in data:
            target, fn = conv
            if target in data:
                raise ConfigError(f"{where}: give either {alias} or {target}, not both")
            data[target] = fn(data.pop(alias))
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"{where}: unknown field(s) {', '.join(unknown)}; known: {', '.join(sorted(names))}")
    try:
        return cls(**data)
    except TypeError as e:  # a required field is missing
        raise ConfigError(f"{where}: {e}") from e
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None


def _gib_to_bytes(v: Any) -> Any:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return v  # let the field check report it
    return int(round(float(v) * GIB))


# ----------------------------------------------------------------------------- devices and links
@dataclass(frozen=True)
class DeviceProfile:
    """One machine that can host a stage.

    Attributes:
        name: unique device name, used by links and plans.
        compute_speed_rel: speed relative to the device the model profile was measured on
            (2.0 = runs a block in half the reference time).
        memory_bytes: memory available to stage weights and caches (YAML may give ``memory_gib``).
        runtime: "torch" or "onnxruntime".
        can_host_first_stage: whether the first stage (raw input, embed) may run here; the client
            sits on the first stage's device and receives the last stage's output there.
        stage_overhead_ms: fixed time this device adds per message handled (framing, Python, ...).
        endpoint: optional address of this device's stage server, copied into plans.
    """

    name: str
    compute_speed_rel: float
    memory_bytes: int
    runtime: str = "torch"
    can_host_first_stage: bool = False
    stage_overhead_ms: float = 0.0
    endpoint: str | None = None

    def __post_init__(self) -> None:
        w = f"device[{self.name!r}]" if isinstance(self.name, str) else "device"
        _str(w, "name", self.name)
        object.__setattr__(self, "compute_speed_rel", _num(w, "compute_speed_rel", self.compute_speed_rel,
                                                           lo=0, lo_open=True))
        object.__setattr__(self, "memory_bytes", _int(w, "memory_bytes", self.memory_bytes, lo=1))
        if self.runtime not in RUNTIMES:
            _fail(w, "runtime", f"must be one of {', '.join(RUNTIMES)}, got {self.runtime!r}")
        if not isinstance(self.can_host_first_stage, bool):
            _fail(w, "can_host_first_stage", f"must be true or false, got {self.can_host_first_stage!r}")
        object.__setattr__(self, "stage_overhead_ms", _num(w, "stage_overhead_ms", self.stage_overhead_ms, lo=0))
        if self.endpoint is not None:
            _str(w, "endpoint", self.endpoint)

    @classmethod
    def from_dict(cls, d: Any, where: str = "device") -> "DeviceProfile":
        return _from_dict(cls, d, where, {"memory_gib": ("memory_bytes", _gib_to_bytes)})

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        if d["endpoint"] is None:
            del d["endpoint"]
        return d


@dataclass(frozen=True)
class LinkProfile:
    """A network path between two devices.

    Attributes:
        src, dst: device names.
        bandwidth_mbit_s: usable bandwidth in megabits (10^6 bit) per second.
        rtt_ms: round-trip time; one message pays ``rtt_ms / 2``.
        overhead_ms: fixed time per message on top of the propagation delay (syscalls, copies).
        transport: how messages travel on this link: ``zmq`` (plain ZeroMQ) or ``curvezmq``
            (libzmq's CURVE, splitnet's keyed transport); it sets the default ``bytes_per_message``.
        bytes_per_message: bytes the transport adds to every message on this link, beyond the
            splitnet message itself. Default: the transport's own figure for a two-frame cut message
            (:func:`splitnet.wire.overhead.transport_bytes_per_message`: CurveZMQ 33 per frame = 66;
            plain ZeroMQ 0).
        symmetric: the same figures hold for dst -> src.
        uplink: this link is the edge uplink that ``--sweep-bandwidth`` varies.
        burst_bytes: depth of the link's token bucket (a shaper's or a policer's burst, e.g.
            ``tc tbf ... burst``), in bytes of splitnet messages: a message that finds the link
            idle passes its first ``burst_bytes`` at line rate and the rest at
            ``bandwidth_mbit_s``, so its transfer latency is ``max(0, bytes - burst_bytes) /
            bandwidth``. The bucket only refills while the link idles, so the link's busy time
            (throughput) is not shortened by it. Each message is assumed to find the bucket full
            (the link idles at least ``burst_bytes / bandwidth`` before it). 0: no bucket.
    """

    src: str
    dst: str
    bandwidth_mbit_s: float
    rtt_ms: float = 0.0
    overhead_ms: float = 0.0
    transport: str = "zmq"
    bytes_per_message: float | None = None
    symmetric: bool = True
    uplink: bool = False
    burst_bytes: float = 0.0

    def __post_init__(self) -> None:
        w = f"link[{self.src}->{self.dst}]"
        _str(w, "src", self.src)
        _str(w, "dst", self.dst)
        if self.src == self.dst:
            _fail(w, "dst", "a link must join two different devices")
        object.__setattr__(self, "bandwidth_mbit_s", _num(w, "bandwidth_mbit_s", self.bandwidth_mbit_s,
                                                          lo=0, lo_open=True))
        object.__setattr__(self, "rtt_ms", _num(w, "rtt_ms", self.rtt_ms, lo=0))
        object.__setattr__(self, "overhead_ms", _num(w, "overhead_ms", self.overhead_ms, lo=0))
        if self.transport not in TRANSPORTS:
            _fail(w, "transport", f"must be one of {', '.join(TRANSPORTS)}, got {self.transport!r}")
        if self.bytes_per_message is None:
            object.__setattr__(self, "bytes_per_message", float(transport_bytes_per_message(self.transport)))
        object.__setattr__(self, "bytes_per_message", _num(w, "bytes_per_message", self.bytes_per_message, lo=0))
        object.__setattr__(self, "burst_bytes", _num(w, "burst_bytes", self.burst_bytes, lo=0))
        for b in ("symmetric", "uplink"):
            if not isinstance(getattr(self, b), bool):
                _fail(w, b, f"must be true or false, got {getattr(self, b)!r}")

    def ms_for(self, nbytes: float, messages: float = 1.0) -> float:
        """Time to move ``nbytes`` (splitnet messages) in ``messages`` messages of equal size over
        this link, with the transport's own ``bytes_per_message``; each message passes
        ``burst_bytes`` of itself at line rate."""
        wire = nbytes + messages * self.bytes_per_message
        return self.wire_ms(wire, messages) + messages * (self.rtt_ms / 2.0 + self.overhead_ms)

    def wire_ms(self, wire_bytes: float, messages: float = 1.0) -> float:
        """Serialization latency of ``wire_bytes`` (transport bytes included) sent as ``messages``
        messages of equal size, each finding the token bucket full: the part of each message
        beyond ``burst_bytes``, at ``bandwidth_mbit_s``."""
        if messages <= 0:
            return 0.0
        per = max(0.0, wire_bytes / messages - self.burst_bytes)
        return messages * per * 8.0 / (self.bandwidth_mbit_s * 1e3)

    def busy_ms(self, wire_bytes: float) -> float:
        """Time the link is occupied by ``wire_bytes`` (no bucket: it refills only when idle)."""
        return wire_bytes * 8.0 / (self.bandwidth_mbit_s * 1e3)

    @classmethod
    def from_dict(cls, d: Any, where: str = "link") -> "LinkProfile":
        return _from_dict(cls, d, where)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        if not d["burst_bytes"]:
            del d["burst_bytes"]  # absent = 0: documents written before the field read the same
        return d


@dataclass(frozen=True)
class Fleet:
    """Devices (in chain order: edge first, cloud last) and the links between them."""

    devices: tuple[DeviceProfile, ...]
    links: tuple[LinkProfile, ...] = ()
    name: str = "fleet"

    def __post_init__(self) -> None:
        object.__setattr__(self, "devices", tuple(self.devices))
        object.__setattr__(self, "links", tuple(self.links))
        if not self.devices:
            raise ConfigError("fleet.devices: at least one device is needed")
        names = [d.name for d in self.devices]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ConfigError(f"fleet.devices: duplicate device name(s) {', '.join(dup)}")
        seen: set[tuple[str, str]] = set()
        for ln in self.links:
            for end in (ln.src, ln.dst):
                if end not in names:
                    raise ConfigError(f"fleet.links[{ln.src}->{ln.dst}]: unknown device {end!r}; "
                                      f"devices: {', '.join(names)}")
            pairs = [(ln.src, ln.dst)] + ([(ln.dst, ln.src)] if ln.symmetric else [])
            for p in pairs:
                if p in seen:
                    raise ConfigError(f"fleet.links: the link {p[0]}->{p[1]} is given twice")
                seen.add(p)
        if not any(d.can_host_first_stage for d in self.devices):
            raise ConfigError("fleet.devices: no device has can_host_first_stage: true, so no device can run "
                              "the first stage (where the input lives); mark at least one")

    def device(self, name: str) -> DeviceProfile:
        for d in self.devices:
            if d.name == name:
                return d
        raise ConfigError(f"unknown device {name!r}; devices: {', '.join(d.name for d in self.devices)}")

    def link(self, src: str, dst: str) -> LinkProfile | None:
        """The link carrying traffic src -> dst, or None when the two are not connected."""
        for ln in self.links:
            if ln.src == src and ln.dst == dst:
                return ln
            if ln.symmetric and ln.src == dst and ln.dst == src:
                return ln
        return None

    @property
    def source(self) -> DeviceProfile:
        """The first device that may host the first stage: where requests come from."""
        return next(d for d in self.devices if d.can_host_first_stage)

    def without(self, failed: "set[str] | list[str] | tuple[str, ...]") -> "Fleet":
        failed = set(failed)
        for n in failed:
            self.device(n)
        devs = tuple(d for d in self.devices if d.name not in failed)
        links = tuple(ln for ln in self.links if ln.src not in failed and ln.dst not in failed)
        if not devs:
            raise ConfigError(f"fleet: every device failed ({', '.join(sorted(failed))}); nothing left to plan on")
        return Fleet(devs, links, self.name)

    def with_links(self, changed: "list[LinkProfile]") -> "Fleet":
        """This fleet with the given links replacing those between the same devices (or added)."""
        links = list(self.links)
        for new in changed:
            keep = []
            for ln in links:
                same = {ln.src, ln.dst} == {new.src, new.dst} if (ln.symmetric or new.symmetric) else \
                    (ln.src, ln.dst) == (new.src, new.dst)
                if not same:
                    keep.append(ln)
            links = keep + [new]
        return Fleet(self.devices, tuple(links), self.name)

    def uplinks(self) -> list[LinkProfile]:
        """Links marked ``uplink: true``; if none, every link touching the source device."""
        marked = [ln for ln in self.links if ln.uplink]
        if marked:
            return marked
        src = self.source.name
        return [ln for ln in self.links if src in (ln.src, ln.dst)]

    def with_uplink_bandwidth(self, mbit_s: float) -> "Fleet":
        changed = [dataclasses.replace(ln, bandwidth_mbit_s=float(mbit_s)) for ln in self.uplinks()]
        return self.with_links(changed)

    @classmethod
    def from_dict(cls, d: Any) -> "Fleet":
        if not isinstance(d, Mapping):
            raise ConfigError(f"fleet: expected a mapping with devices and links, got {type(d).__name__}")
        unknown = sorted(set(d) - {"name", "devices", "links"})
        if unknown:
            raise ConfigError(f"fleet: unknown field(s) {', '.join(unknown)}; known: devices, links, name")
        devs = d.get("devices")
        if not isinstance(devs, list):
            raise ConfigError("fleet.devices: must be a list of devices")
        links = d.get("links") or []
        if not isinstance(links, list):
            raise ConfigError("fleet.links: must be a list of links")
        return cls(
            tuple(DeviceProfile.from_dict(x, f"fleet.devices[{i}]") for i, x in enumerate(devs)),
            tuple(LinkProfile.from_dict(x, f"fleet.links[{i}]") for i, x in enumerate(links)),
            str(d.get("name", "fleet")),
        )

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "devices": [d.to_dict() for d in self.devices],
                "links": [ln.to_dict() for ln in self.links]}


# ----------------------------------------------------------------------------- codecs
@dataclass(frozen=True)
class CodecOption:
    """What a codec costs and keeps, as data, so the solver does not depend on the codec code.

    Wire bytes for a message of T tokens at a cut whose feature has C channels:
    ``T * (C * bits_per_element / 8 + bytes_per_token_extra) + bytes_per_message``, unless the model
    profile carries a measured ``bytes_per_token`` for this codec at that cut.

    Attributes:
        name: registry name ("none" means raw float32, no codec).
        bits_per_element: bits per feature element (32 raw, 16 fp16, 8 int8, ...).
        bytes_per_token_extra: side information per token (scales, means, ...).
        bytes_per_message: fixed bytes per message (header entry, codebook hash, ...).
        encode_ms_per_token, decode_ms_per_token: on the reference device (scaled by compute_speed_rel).
        fidelity: quality kept, 0..1 (mean cosine between split and unsplit outputs, or task agreement).
        config: keyword arguments for ``splitnet.codecs.make_codec``.
        codebook_file, codebook_hash: for fitted codecs.
    """

    name: str
    bits_per_element: float = 32.0
    bytes_per_token_extra: float = 0.0
    bytes_per_message: float = 0.0
    encode_ms_per_token: float = 0.0
    decode_ms_per_token: float = 0.0
    fidelity: float = 1.0
    config: dict = field(default_factory=dict)
    codebook_file: str | None = None
    codebook_hash: str | None = None

    def __post_init__(self) -> None:
        w = f"codec[{self.name!r}]"
        _str(w, "name", self.name)
        for f, lo_open in (("bits_per_element", True), ("bytes_per_token_extra", False),
                           ("bytes_per_message", False), ("encode_ms_per_token", False),
                           ("decode_ms_per_token", False)):
            object.__setattr__(self, f, _num(w, f, getattr(self, f), lo=0, lo_open=lo_open))
        object.__setattr__(self, "fidelity", _num(w, "fidelity", self.fidelity, lo=0, hi=1))
        if not isinstance(self.config, Mapping):
            _fail(w, "config", "must be a mapping of make_codec keyword arguments")

    def bytes_per_token(self, channels: int) -> float:
        return channels * self.bits_per_element / 8.0 + self.bytes_per_token_extra

    @classmethod
    def from_dict(cls, d: Any, where: str = "codec") -> "CodecOption":
        return _from_dict(cls, d, where)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        return {k: v for k, v in d.items() if v is not None and v != {}}


#: Stateless codecs whose cost is known from arithmetic; fidelities are typical cosines measured on
#: MiniLM features (int4 0.992 from the codec issue's baseline table; fp16/int8 rounding errors).
DEFAULT_CODECS: tuple[CodecOption, ...] = (
    CodecOption("none", bits_per_element=32, fidelity=1.0),
    CodecOption("fp16", bits_per_element=16, fidelity=0.99999, encode_ms_per_token=0.0005,
                decode_ms_per_token=0.0005),
    CodecOption("int8", bits_per_element=8, bytes_per_token_extra=4, fidelity=0.9999,
                encode_ms_per_token=0.002, decode_ms_per_token=0.001),
    CodecOption("int4", bits_per_element=4, bytes_per_token_extra=4, fidelity=0.992,
                encode_ms_per_token=0.003, decode_ms_per_token=0.0015),
)


# ----------------------------------------------------------------------------- the model
@dataclass(frozen=True)
class BlockProfile:
    """One unit of the model chain, measured on the reference device.

    Attributes:
        index: block index (-1 for the embed, num_blocks for the head).
        prefill_ms_by_tokens: compute time for one request of T tokens, {T: ms}; other T interpolate
            (linear between points, proportional beyond).
        decode_ms: compute time for one decode step with a KV cache (decoders); None = prefill at 1 token.
        param_bytes: weight bytes.
        kv_bytes_per_token: cache bytes kept per token of context (decoders).
        out_channels: channels of the feature leaving this block (C of (B, T, C)).
        out_bytes_per_token: raw bytes of that feature per token (float32: 4 * C).
        codec_costs: measured codec figures at the cut after this block, {codec: {bytes_per_token,
            encode_ms_per_token, decode_ms_per_token, fidelity}}; they override the codec's defaults.
    """

    index: int
    prefill_ms_by_tokens: dict
    param_bytes: int
    out_channels: int
    out_bytes_per_token: float | None = None
    decode_ms: float | None = None
    kv_bytes_per_token: float = 0.0
    codec_costs: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        w = f"block[{self.index}]"
        if isinstance(self.index, bool) or not isinstance(self.index, int):
            _fail(w, "index", f"must be an integer, got {self.index!r}")
        if not isinstance(self.prefill_ms_by_tokens, Mapping) or not self.prefill_ms_by_tokens:
            _fail(w, "prefill_ms_by_tokens", "must be a non-empty mapping {tokens: ms}")
        pts = {}
        for t, ms in self.prefill_ms_by_tokens.items():
            try:
                ti = int(t)
            except (TypeError, ValueError):
                _fail(w, "prefill_ms_by_tokens", f"token count {t!r} is not an integer")
            if ti < 1:
                _fail(w, "prefill_ms_by_tokens", f"token count must be >= 1, got {t!r}")
            pts[ti] = _num(w, f"prefill_ms_by_tokens[{t}]", ms, lo=0)
        object.__setattr__(self, "prefill_ms_by_tokens", dict(sorted(pts.items())))
        object.__setattr__(self, "param_bytes", _int(w, "param_bytes", self.param_bytes, lo=0))
        object.__setattr__(self, "out_channels", _int(w, "out_channels", self.out_channels, lo=1))
        if self.out_bytes_per_token is None:
            object.__setattr__(self, "out_bytes_per_token", 4.0 * self.out_channels)
        object.__setattr__(self, "out_bytes_per_token", _num(w, "out_bytes_per_token", self.out_bytes_per_token,
                                                             lo=0))
        if self.decode_ms is not None:
            object.__setattr__(self, "decode_ms", _num(w, "decode_ms", self.decode_ms, lo=0))
        object.__setattr__(self, "kv_bytes_per_token", _num(w, "kv_bytes_per_token", self.kv_bytes_per_token, lo=0))
        if not isinstance(self.codec_costs, Mapping):
            _fail(w, "codec_costs", "must be a mapping {codec: {bytes_per_token, ...}}")
        allowed = {"bytes_per_token", "encode_ms_per_token", "decode_ms_per_token", "fidelity"}
        for name, c in self.codec_costs.items():
            if not isinstance(c, Mapping):
                _fail(w, f"codec_costs[{name}]", "must be a mapping")
            bad = sorted(set(c) - allowed)
            if bad:
                _fail(w, f"codec_costs[{name}]", f"unknown key(s) {', '.join(bad)}; known: {', '.join(sorted(allowed))}")
            for k, v in c.items():
                _num(w, f"codec_costs[{name}].{k}", v, lo=0, hi=1 if k == "fidelity" else None)

    def prefill_ms(self, tokens: int) -> float:
        pts = sorted(self.prefill_ms_by_tokens.items())
        if len(pts) == 1:
            t0, m0 = pts[0]
            return m0 * tokens / t0
        if tokens <= pts[0][0]:
            (t0, m0), (t1, m1) = pts[0], pts[1]
        elif tokens >= pts[-1][0]:
            (t0, m0), (t1, m1) = pts[-2], pts[-1]
        else:
            i = next(i for i in range(1, len(pts)) if pts[i][0] >= tokens)
            (t0, m0), (t1, m1) = pts[i - 1], pts[i]
        v = m0 + (m1 - m0) * (tokens - t0) / (t1 - t0)
        return max(v, 0.0)

    def step_ms(self) -> float:
        return self.decode_ms if self.decode_ms is not None else self.prefill_ms(1)

    @classmethod
    def from_dict(cls, d: Any, where: str = "block") -> "BlockProfile":
        return _from_dict(cls, d, where)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        return {k: v for k, v in d.items() if v is not None and v != {}}


@dataclass(frozen=True)
class ModelProfile:
    """The model as a chain: embed, blocks 0..num_blocks-1, head, measured on one reference device.

    The embed always runs with block 0's stage and the head with the last block's stage.
    ``head.out_channels`` / ``out_bytes_per_token`` describe what returns to the client per token
    (``return_tokens`` = "all" for per-token outputs, "last" when only the final position returns).
    """

    model: str
    kind: str
    blocks: tuple[BlockProfile, ...]
    embed: BlockProfile
    head: BlockProfile
    model_hash: str = ""
    reference_device: str = "unknown"
    return_tokens: str = "last"
    codecs: tuple[CodecOption, ...] = DEFAULT_CODECS
    source: str = ""

    def __post_init__(self) -> None:
        w = "model_profile"
        _str(w, "model", self.model)
        if self.kind not in MODEL_KINDS:
            _fail(w, "kind", f"must be one of {', '.join(MODEL_KINDS)}, got {self.kind!r}")
        object.__setattr__(self, "blocks", tuple(self.blocks))
        object.__setattr__(self, "codecs", tuple(self.codecs))
        if not self.blocks:
            _fail(w, "blocks", "at least one block is needed")
        for i, b in enumerate(self.blocks):
            if b.index != i:
                _fail(w, f"blocks[{i}].index", f"blocks must be listed in order 0..{len(self.blocks) - 1}, got {b.index}")
        if self.return_tokens not in ("all", "last"):
            _fail(w, "return_tokens", f"must be 'all' or 'last', got {self.return_tokens!r}")
        names = [c.name for c in self.codecs]
        if not names:
            _fail(w, "codecs", "at least one codec option (e.g. 'none') is needed")
        if len(set(names)) != len(names):
            _fail(w, "codecs", f"duplicate codec names in {names}")

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    def codec(self, name: str) -> CodecOption:
        for c in self.codecs:
            if c.name == name:
                return c
        raise ConfigError(f"unknown codec {name!r} for this model profile; known: {', '.join(c.name for c in self.codecs)}")

    def cut_codec_cost(self, after_block: int, codec: CodecOption) -> dict[str, float]:
        """Cost of ``codec`` at the cut after ``after_block``: bytes/token, enc/dec ms/token, fidelity."""
        b = self.blocks[after_block]
        d = {"bytes_per_token": codec.bytes_per_token(b.out_channels) if codec.name != "none"
             else b.out_bytes_per_token,
             "encode_ms_per_token": codec.encode_ms_per_token, "decode_ms_per_token": codec.decode_ms_per_token,
             "fidelity": codec.fidelity}
        d.update({k: float(v) for k, v in b.codec_costs.get(codec.name, {}).items()})
        return d

    @classmethod
    def from_dict(cls, d: Any) -> "ModelProfile":
        if not isinstance(d, Mapping):
            raise ConfigError(f"model_profile: expected a mapping, got {type(d).__name__}")
        d = dict(d)
        for req in ("model", "kind", "blocks", "embed", "head"):
            if req not in d:
                raise ConfigError(f"model_profile.{req}: missing")
        if not isinstance(d["blocks"], list):
            raise ConfigError("model_profile.blocks: must be a list")
        d["blocks"] = tuple(BlockProfile.from_dict(b, f"model_profile.blocks[{i}]") for i, b in enumerate(d["blocks"]))
        d["embed"] = BlockProfile.from_dict(d["embed"], "model_profile.embed")
        d["head"] = BlockProfile.from_dict(d["head"], "model_profile.head")
        if "codecs" in d:
            if not isinstance(d["codecs"], list):
                raise ConfigError("model_profile.codecs: must be a list")
            d["codecs"] = tuple(CodecOption.from_dict(c, f"model_profile.codecs[{i}]") for i, c in enumerate(d["codecs"]))
        return _from_dict(cls, d, "model_profile")

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model, "kind": self.kind, "model_hash": self.model_hash,
            "reference_device": self.reference_device, "return_tokens": self.return_tokens, "source": self.source,
            "embed": self.embed.to_dict(), "head": self.head.to_dict(),
            "blocks": [b.to_dict() for b in self.blocks],
            "codecs": [c.to_dict() for c in self.codecs],
        }


# ----------------------------------------------------------------------------- YAML
def _write_yaml(path: str | Path, data: Any) -> None:
    Path(path).write_text(yaml.safe_dump(data, sort_keys=False, default_flow_style=None, width=110))


def _load_document(cls: Any, path: str | Path, what: str) -> Any:
    """``cls.from_dict`` of the document at ``path``; a validation error names the file."""
    try:
        return cls.from_dict(read_document(path, what))
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


def load_fleet(path: str | Path) -> Fleet:
    return _load_document(Fleet, path, "fleet")


def save_fleet(fleet: Fleet, path: str | Path) -> None:
    _write_yaml(path, fleet.to_dict())


def load_model_profile(path: str | Path) -> ModelProfile:
    return _load_document(ModelProfile, path, "model profile")


def save_model_profile(profile: ModelProfile, path: str | Path) -> None:
    _write_yaml(path, profile.to_dict())
