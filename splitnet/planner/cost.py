"""The cost model: what a placement costs in time, bytes and memory.

A placement (:class:`Assignment`) is a list of stages, each a contiguous range of blocks on one
device, and a codec for each cut between consecutive stages. For a :class:`Workload` (one request of
``prefill_tokens`` tokens followed by ``decode_steps`` single-token steps) the model predicts:

* stage compute: reference block time / ``compute_speed_rel`` + a per-message device overhead;
* each cut: encode on the sender + wire bytes / bandwidth + RTT/2 (+ link overhead) per message
  + decode on the receiver; a link with a token bucket (``LinkProfile.burst_bytes``) passes the
  first ``burst_bytes`` of each message at line rate (latency only: the bucket refills only while
  the link idles, so it does not raise throughput);
* the output's trip back to the client on the first stage's device;
* **latency** = the sum of all of these (a request visits every stage in turn, every step);
* **throughput** = 1 / the busiest resource when the pipeline is full: a device (its stage's compute
  plus the codec work it does) or a link direction (bytes / bandwidth + per-message overhead;
  propagation delay overlaps with other requests and does not limit throughput);
* memory per stage = weights (+ embed/head) + KV cache for the workload's context and concurrency.

All times are milliseconds per request. :func:`tables` turns these rules into arrays the solvers
share; :func:`evaluate` applies the same rules one placement at a time, independently, and is what
plans report.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from splitnet.errors import ConfigError
from splitnet.planner.profiles import Fleet, ModelProfile

INF = math.inf


@dataclass(frozen=True)
class Workload:
    """What one request asks of the pipeline.

    Attributes:
        prefill_tokens: tokens in the request's first pass (sequence length for encoders/ViT).
        decode_steps: single-token steps after the prefill (0 for encoders and vision models).
        concurrent_requests: requests whose KV caches a stage holds at once (memory only).
        fidelity_floor: lowest codec fidelity allowed at any cut (0..1).
    """

    prefill_tokens: int = 128
    decode_steps: int = 0
    concurrent_requests: int = 1
    fidelity_floor: float = 0.0

    def __post_init__(self) -> None:
        for f, lo in (("prefill_tokens", 1), ("decode_steps", 0), ("concurrent_requests", 1)):
            v = getattr(self, f)
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise ConfigError(f"workload.{f}: must be an integer >= {lo}, got {v!r}")
        if not (isinstance(self.fidelity_floor, (int, float)) and 0.0 <= self.fidelity_floor <= 1.0):
            raise ConfigError(f"workload.fidelity_floor: must be a number in [0, 1], got {self.fidelity_floor!r}")

    @property
    def messages(self) -> int:
        """Messages each cut carries per request."""
        return 1 + self.decode_steps

    @property
    def tokens(self) -> int:
        """Feature tokens each cut carries per request."""
        return self.prefill_tokens + self.decode_steps

    def to_dict(self) -> dict:
        return {"prefill_tokens": self.prefill_tokens, "decode_steps": self.decode_steps,
                "concurrent_requests": self.concurrent_requests, "fidelity_floor": self.fidelity_floor}


@dataclass
class Assignment:
    """A placement: ``stages`` = [(device name, start, end)], ``codecs`` = codec name per cut."""

    stages: list[tuple[str, int, int]]
    codecs: list[str] = field(default_factory=list)


@dataclass
class Tables:
    """Per-request costs as arrays (D devices, L blocks, C codecs, K = L + 1 boundaries).

    ``comp[d, a, b]``: compute ms of stage [a, b) on device d, inf if it does not fit in memory.
    ``enc[k, c]``, ``dec[k, c]``: reference codec ms at boundary k (cut after block k-1); divide by speed.
    ``link_lat[k, c, d, e]``: transfer ms for cut k with codec c from d to e (inf: no link / below floor).
    ``link_busy[k, c, d, e]``: time the link is occupied (no propagation delay).
    ``ret_lat[d, s]``, ``ret_busy[d, s]``: the output's way back from d to the client device s.
    """

    devices: list[str]
    codecs: list[str]
    speed: np.ndarray
    first_ok: np.ndarray
    comp: np.ndarray
    mem: np.ndarray
    enc: np.ndarray
    dec: np.ndarray
    link_lat: np.ndarray
    link_busy: np.ndarray
    link_bytes: np.ndarray
    ret_lat: np.ndarray
    ret_busy: np.ndarray
    ret_bytes: float

    @property
    def num_blocks(self) -> int:
        return self.comp.shape[1] - 1


def _block_ms(model: ModelProfile, wl: Workload) -> tuple[np.ndarray, float, float]:
    """Reference ms per request for each block, the embed and the head."""
    def ms(b):
        return b.prefill_ms(wl.prefill_tokens) + wl.decode_steps * b.step_ms()

    return np.array([ms(b) for b in model.blocks]), ms(model.embed), ms(model.head)


def _return_bytes(model: ModelProfile, wl: Workload) -> float:
    toks = wl.tokens if model.return_tokens == "all" else wl.messages
    return float(model.head.out_bytes_per_token) * toks


def _return_message_bytes(model: ModelProfile, wl: Workload) -> tuple[float, float]:
    """Bytes of the output's prefill message and of one step message."""
    per = float(model.head.out_bytes_per_token)
    return per * (wl.prefill_tokens if model.return_tokens == "all" else 1), per


def _bucket_ms(prefill_bytes, step_bytes, steps: int, burst, bw):
    """Serialization latency (ms) of one prefill message and ``steps`` step messages (wire bytes
    each) on a link of ``bw`` Mbit/s whose token bucket of ``burst`` bytes is full before each."""
    over = np.maximum(0.0, prefill_bytes - burst) + steps * np.maximum(0.0, step_bytes - burst)
    return over * 8.0 / (bw * 1e3)


def stage_memory_bytes(model: ModelProfile, wl: Workload, a: int, b: int) -> float:
    """Memory a stage over blocks [a, b) needs: weights, embed/head, KV caches."""
    ctx = wl.tokens * wl.concurrent_requests
    m = sum(blk.param_bytes + blk.kv_bytes_per_token * ctx for blk in model.blocks[a:b])
    if a == 0:
        m += model.embed.param_bytes
    if b == model.num_blocks:
        m += model.head.param_bytes
    return float(m)


def tables(model: ModelProfile, fleet: Fleet, wl: Workload) -> Tables:
    L, D = model.num_blocks, len(fleet.devices)
    codecs = list(model.codecs)
    C = len(codecs)
    speed = np.array([d.compute_speed_rel for d in fleet.devices])
    ovh = np.array([d.stage_overhead_ms for d in fleet.devices])
    memcap = np.array([d.memory_bytes for d in fleet.devices], dtype=float)
    first_ok = np.array([d.can_host_first_stage for d in fleet.devices])

    w, w_embed, w_head = _block_ms(model, wl)
    W = np.concatenate([[0.0], np.cumsum(w)])
    ctx = wl.tokens * wl.concurrent_requests
    pm = np.array([b.param_bytes + b.kv_bytes_per_token * ctx for b in model.blocks], dtype=float)
    M = np.concatenate([[0.0], np.cumsum(pm)])
    a = np.arange(L + 1)[:, None]
    b = np.arange(L + 1)[None, :]
    ref = W[b] - W[a] + np.where(a == 0, w_embed, 0.0) + np.where(b == L, w_head, 0.0)
    mem = M[b] - M[a] + np.where(a == 0, model.embed.param_bytes, 0) + np.where(b == L, model.head.param_bytes, 0)
    valid = b > a
    comp = ref[None] / speed[:, None, None] + wl.messages * ovh[:, None, None]
    fits = valid[None] & (mem[None] <= memcap[:, None, None])
    comp = np.where(fits, comp, INF)

    K = L + 1
    enc = np.zeros((K, C))
    dec = np.zeros((K, C))
    nbytes = np.full((K, C), INF)
    pre_b = np.zeros((K, C))  # the prefill message's bytes (for a token bucket), then one step message's
    step_b = np.zeros((K, C))
    allowed = np.zeros((K, C), dtype=bool)
    for k in range(1, L):
        for ci, c in enumerate(codecs):
            cc = model.cut_codec_cost(k - 1, c)
            enc[k, ci] = cc["encode_ms_per_token"] * wl.tokens
            dec[k, ci] = cc["decode_ms_per_token"] * wl.tokens
            nbytes[k, ci] = cc["bytes_per_token"] * wl.tokens + c.bytes_per_message * wl.messages
            pre_b[k, ci] = cc["bytes_per_token"] * wl.prefill_tokens + c.bytes_per_message
            step_b[k, ci] = cc["bytes_per_token"] + c.bytes_per_message
            allowed[k, ci] = cc["fidelity"] >= wl.fidelity_floor - 1e-12
    bw = np.full((D, D), np.nan)
    prop = np.full((D, D), np.nan)
    lovh = np.full((D, D), np.nan)
    lbytes = np.zeros((D, D))  # transport bytes per message (e.g. the sealed envelope)
    burst = np.zeros((D, D))  # token bucket bytes
    names = [d.name for d in fleet.devices]
    for i, x in enumerate(names):
        for j, y in enumerate(names):
            if i != j and (ln := fleet.link(x, y)) is not None:
                bw[i, j], prop[i, j], lovh[i, j] = ln.bandwidth_mbit_s, ln.rtt_ms / 2.0, ln.overhead_ms
                lbytes[i, j] = ln.bytes_per_message
                burst[i, j] = ln.burst_bytes
    has = ~np.isnan(bw)
    bwz = np.where(has, bw, 1.0)
    wire = (nbytes[:, :, None, None] + wl.messages * lbytes[None, None]) * 8.0 / (bwz[None, None] * 1e3)  # bytes -> ms
    per_msg = wl.messages * np.where(has, lovh, 0.0)[None, None]
    link_busy = wire + per_msg
    wire_lat = _bucket_ms(pre_b[:, :, None, None] + lbytes[None, None], step_b[:, :, None, None] + lbytes[None, None],
                          wl.decode_steps, burst[None, None], bwz[None, None])
    link_lat = np.where(np.isfinite(nbytes)[:, :, None, None], wire_lat, INF) + per_msg \
        + wl.messages * np.where(has, prop, 0.0)[None, None]
    ok = allowed[:, :, None, None] & has[None, None]
    link_busy = np.where(ok, link_busy, INF)
    link_lat = np.where(ok, link_lat, INF)

    rb = _return_bytes(model, wl)
    rpre, rstep = _return_message_bytes(model, wl)
    ret_wire = (rb + wl.messages * lbytes) * 8.0 / (bwz * 1e3)
    ret_busy = np.where(has, ret_wire + wl.messages * np.where(has, lovh, 0.0), INF)
    ret_lat = np.where(has, _bucket_ms(rpre + lbytes, rstep + lbytes, wl.decode_steps, burst, bwz)
                       + wl.messages * np.where(has, lovh + prop, 0.0), INF)
    np.fill_diagonal(ret_busy, 0.0)
    np.fill_diagonal(ret_lat, 0.0)
    return Tables(names, [c.name for c in codecs], speed, first_ok, comp, mem, enc, dec, link_lat, link_busy,
                  nbytes, ret_lat, ret_busy, rb)


@dataclass
class Evaluation:
    """Predicted figures for one placement (ms per request unless stated)."""

    feasible: bool
    reason: str
    per_stage_compute_ms: list[float]
    per_stage_codec_ms: list[float]
    per_stage_memory_bytes: list[float]
    per_link_ms: list[float]
    per_link_bytes: list[float]
    return_ms: float
    return_bytes: float
    latency_ms: float
    bottleneck_ms: float
    bottleneck: str

    @property
    def throughput_rps(self) -> float:
        return 1000.0 / self.bottleneck_ms if self.bottleneck_ms > 0 else INF


def evaluate(model: ModelProfile, fleet: Fleet, wl: Workload, asg: Assignment) -> Evaluation:
    """Apply the cost model to one placement, one stage at a time (the reference the solvers must match)."""
    L = model.num_blocks
    st = asg.stages
    reasons = []
    if not st:
        raise ConfigError("assignment: no stages")
    if len(asg.codecs) != len(st) - 1:
        raise ConfigError(f"assignment: {len(st)} stages need {len(st) - 1} codecs, got {len(asg.codecs)}")
    if st[0][1] != 0 or st[-1][2] != L or any(st[i][2] != st[i + 1][1] for i in range(len(st) - 1)) \
            or any(s[2] <= s[1] for s in st):
        raise ConfigError(f"assignment: stages {[(s[1], s[2]) for s in st]} must cover blocks 0..{L} in order")
    names = [s[0] for s in st]
    if len(set(names)) != len(names):
        reasons.append(f"a device hosts two stages: {names}")
    devs = [fleet.device(n) for n in names]
    if not devs[0].can_host_first_stage:
        reasons.append(f"device {devs[0].name} may not host the first stage")
    w, w_embed, w_head = _block_ms(model, wl)
    comp, codec_ms, mems = [], [], []
    for (name, a, b), d in zip(st, devs):
        ref = float(sum(w[a:b])) + (w_embed if a == 0 else 0.0) + (w_head if b == L else 0.0)
        comp.append(ref / d.compute_speed_rel + wl.messages * d.stage_overhead_ms)
        m = stage_memory_bytes(model, wl, a, b)
        mems.append(m)
        if m > d.memory_bytes:
            reasons.append(f"stage blocks [{a},{b}) needs {m / 2**20:.1f} MiB, {d.name} has {d.memory_bytes / 2**20:.1f} MiB")
    codec_ms = [0.0] * len(st)
    link_ms, link_bytes, link_busy = [], [], []
    lat = sum(comp)
    for i, cname in enumerate(asg.codecs):
        c = model.codec(cname)
        k = st[i][2]
        cc = model.cut_codec_cost(k - 1, c)
        if cc["fidelity"] < wl.fidelity_floor - 1e-12:
            reasons.append(f"codec {cname} at the cut after block {k - 1} has fidelity {cc['fidelity']} "
                           f"< floor {wl.fidelity_floor}")
        e = cc["encode_ms_per_token"] * wl.tokens / devs[i].compute_speed_rel
        dd = cc["decode_ms_per_token"] * wl.tokens / devs[i + 1].compute_speed_rel
        codec_ms[i] += e
        codec_ms[i + 1] += dd
        nb = cc["bytes_per_token"] * wl.tokens + c.bytes_per_message * wl.messages
        ln = fleet.link(devs[i].name, devs[i + 1].name)
        if ln is None:
            reasons.append(f"no link {devs[i].name}->{devs[i + 1].name}")
            t, busy = INF, INF
        else:
            nb += wl.messages * ln.bytes_per_message
            busy = nb * 8.0 / (ln.bandwidth_mbit_s * 1e3) + wl.messages * ln.overhead_ms
            pre = cc["bytes_per_token"] * wl.prefill_tokens + c.bytes_per_message + ln.bytes_per_message
            step = cc["bytes_per_token"] + c.bytes_per_message + ln.bytes_per_message
            t = float(_bucket_ms(pre, step, wl.decode_steps, ln.burst_bytes, ln.bandwidth_mbit_s)) \
                + wl.messages * (ln.overhead_ms + ln.rtt_ms / 2.0)
        link_ms.append(t)
        link_bytes.append(nb)
        link_busy.append(busy)
        lat += e + t + dd
    rb = _return_bytes(model, wl)
    if devs[-1].name == devs[0].name:
        ret_t = ret_busy = 0.0
    else:
        ln = fleet.link(devs[-1].name, devs[0].name)
        if ln is None:
            reasons.append(f"no link {devs[-1].name}->{devs[0].name} to return the output")
            ret_t = ret_busy = INF
        else:
            rb += wl.messages * ln.bytes_per_message
            ret_busy = rb * 8.0 / (ln.bandwidth_mbit_s * 1e3) + wl.messages * ln.overhead_ms
            rpre, rstep = _return_message_bytes(model, wl)
            ret_t = float(_bucket_ms(rpre + ln.bytes_per_message, rstep + ln.bytes_per_message, wl.decode_steps,
                                     ln.burst_bytes, ln.bandwidth_mbit_s)) + wl.messages * (ln.overhead_ms + ln.rtt_ms / 2.0)
    lat += ret_t
    cands = [(comp[i] + codec_ms[i], f"stage {i} on {names[i]}") for i in range(len(st))]
    cands += [(link_busy[i], f"link {names[i]}->{names[i + 1]}") for i in range(len(link_busy))]
    cands.append((ret_busy, f"return {names[-1]}->{names[0]}"))
    bott, bname = max(cands, key=lambda x: x[0])
    feasible = not reasons
    return Evaluation(feasible, "; ".join(reasons), comp, codec_ms, mems, link_ms, link_bytes, ret_t, rb,
                      lat if feasible else INF, bott if feasible else INF, bname)
