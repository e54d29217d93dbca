"""The planner's side of ``splitnet bench e2e``: profiles measured in the run, predictions per
option and link, and the comparison of the planner's choice with the measured best.

An image is one request of one "token": every block's time is for one 224x224 image, and a cut's
feature is one token of H*W*C channels, so the cost model's per-token arithmetic gives per-image
bytes. Codec figures at each cut are measured (bytes = ``payload.nbytes``, encode/decode time,
fidelity = top-1 agreement with the unsplit model on held-out crops) and override the defaults.

Edge and cloud are this machine's two cores: the edge stage and the edge profile on core 0 (the
edge device: core 0 under a :class:`CpuGroup` quota), the cloud stage on core 1. The reference
device of the model profile is core 0 without the quota; ``compute_speed_rel`` of each device is
the reference whole-model time over the device's, measured here. Links carry the shaper's token
bucket (``LinkProfile.burst_bytes``), and a signed per-path offset measured at the calibration
point (:func:`calibration_offsets`) stands for what the profile does not see (the client's and the
stage's per-message work, the relay). The cost model knows no input upload (the client sits on the first
stage's device), so cloud-only is predicted from the same link figures by
:func:`predict_cloud_only`: JPEG encode on the edge + upload + decode and the whole model on the
cloud + the logits back.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from splitnet.planner.cost import Assignment, Workload, evaluate
from splitnet.planner.profiles import BlockProfile, CodecOption, DeviceProfile, Fleet, LinkProfile, ModelProfile
from splitnet.planner.profiler import median_ms

#: TCP/IPv4 payload per Ethernet frame on the veth: 1448 of 1514 bytes (timestamps on); tbf counts frames
GOODPUT_FRACTION = 1448.0 / 1514.0
#: the smallest CFS quota a CpuGroup sets per period (a smaller fraction is raised to it)
MIN_QUOTA_US = 1000
#: bytes of one logits reply (1, 1000) float32
LOGITS_BYTES = 4000.0
EDGE, CLOUD = "edge", "cloud"


class pinned:
    """``with pinned({0}):`` runs the block on those cores with one torch thread."""

    def __init__(self, cpus: set[int]):
        self.cpus = cpus

    def __enter__(self):
        import torch

        self.old = os.sched_getaffinity(0)
        self.old_threads = torch.get_num_threads()
        os.sched_setaffinity(0, self.cpus & self.old or self.old)
        torch.set_num_threads(1)
        return self

    def __exit__(self, *exc):
        import torch

        os.sched_setaffinity(0, self.old)
        torch.set_num_threads(self.old_threads)


CGROUP_V1_CPU = ("/sys/fs/cgroup/cpu", "/sys/fs/cgroup/cpu,cpuacct")
CGROUP_V2 = "/sys/fs/cgroup"


class CpuGroup:
    """A CPU cgroup of this bench's own: a CFS bandwidth quota (``fraction`` of one core every
    ``period_ms``; None: no quota) and a scheduling weight (``shares``, cgroup v1 ``cpu.shares``;
    v2 ``cpu.weight`` = shares * 100 / 1024), created as a child of the root cpu cgroup and removed
    by :meth:`remove`. Processes join it by pid (:meth:`join`, every thread moves with its process)
    and the calling process for a ``with group.inside():`` block.

    The kernel enforces the quota per period: a process in a group of fraction f runs at most
    f * period of CPU time in each period, so a compute burst of C ms (unthrottled) takes about
    C / f ms of wall time, within one period. That is how the bench makes its edge device slower
    than the cloud core: honestly, every edge process (the client, the edge stage) obeys it.
    """

    def __init__(self, name: str, fraction: float | None, period_ms: float = 10.0, shares: int = 1024):
        from splitnet.errors import ConfigError

        if fraction is not None and not 0.0 < fraction <= 1.0:
            raise ConfigError(f"cgroup {name}: the CPU fraction must be in (0, 1], got {fraction}")
        if not 1.0 <= period_ms <= 1000.0:
            raise ConfigError(f"cgroup {name}: the period must be 1..1000 ms, got {period_ms}")
        self.fraction, self.period_us, self.shares = fraction, int(round(period_ms * 1000)), int(shares)
        v1 = next((r for r in CGROUP_V1_CPU if os.path.exists(os.path.join(r, "cpu.cfs_quota_us"))), None)
        if v1 is not None:
            self.version, self.root = 1, v1
        elif "cpu" in _read(os.path.join(CGROUP_V2, "cgroup.subtree_control")).split():
            self.version, self.root = 2, CGROUP_V2
        else:
            raise ConfigError("no cgroup CPU controller to join (cgroup v1 cpu under /sys/fs/cgroup/cpu, or v2 with cpu "
                              "enabled in /sys/fs/cgroup/cgroup.subtree_control); give --edge-cpu-fraction 1 to run without one")
        self.path = os.path.join(self.root, name)
        try:
            os.makedirs(self.path, exist_ok=True)
            if self.version == 1:
                _write(os.path.join(self.path, "cpu.cfs_period_us"), self.period_us)
                _write(os.path.join(self.path, "cpu.cfs_quota_us"), -1 if self.quota_us is None else self.quota_us)
                _write(os.path.join(self.path, "cpu.shares"), self.shares)
            else:
                q = "max" if self.quota_us is None else str(self.quota_us)
                _write(os.path.join(self.path, "cpu.max"), f"{q} {self.period_us}")
                _write(os.path.join(self.path, "cpu.weight"), max(1, min(10000, self.shares * 100 // 1024)))
        except OSError as e:
            raise ConfigError(f"cannot set up the cgroup {self.path}: {e}; give --edge-cpu-fraction 1 to run without one") from e

    @property
    def quota_us(self) -> int | None:
        return None if self.fraction is None else max(MIN_QUOTA_US, int(self.fraction * self.period_us))

    def join(self, pid: int) -> None:
        _write(os.path.join(self.path, "cgroup.procs"), pid)

    def inside(self) -> "_Inside":
        return _Inside(self)

    def stat(self) -> dict:
        """The kernel's throttling counters of this group (cpu.stat)."""
        out = {}
        for line in _read(os.path.join(self.path, "cpu.stat")).splitlines():
            k, _, v = line.partition(" ")
            if v.strip().isdigit():
                out[k] = int(v)
        return out

    def describe(self) -> dict:
        return {"path": self.path, "cgroup_version": self.version, "cpu_fraction": self.fraction,
                "period_us": self.period_us, "quota_us": self.quota_us, "shares": self.shares}

    def remove(self) -> None:
        """Move what is left back to the root group and remove the group."""
        procs = os.path.join(self.path, "cgroup.procs")
        for pid in _read(procs).split():
            try:
                _write(os.path.join(self.root, "cgroup.procs"), pid)
            except OSError:
                pass  # it exited meanwhile
        try:
            os.rmdir(self.path)
        except OSError:
            pass


class _Inside:
    def __init__(self, group: CpuGroup):
        self.group = group

    def __enter__(self):
        self.old = _own_cgroup(self.group)
        self.group.join(os.getpid())
        return self.group

    def __exit__(self, *exc):
        _write(os.path.join(self.old, "cgroup.procs"), os.getpid())


def inside(group: CpuGroup | None):
    """``with inside(group):`` runs the block in ``group`` (None: where the process is)."""
    return group.inside() if group is not None else contextlib.nullcontext()


def measure_whole(bm, pixel_values: np.ndarray, group: CpuGroup | None, repeats: int = 9) -> float:
    """Median ms of the whole model on one input, on core 0 inside ``group`` (the edge device)."""
    import torch

    x = {"pixel_values": torch.from_numpy(pixel_values)}
    full = bm.full()
    with pinned({0}), inside(group), torch.no_grad():
        return median_ms(lambda: full(x), repeats=repeats)


def _own_cgroup(group: CpuGroup) -> str:
    """This process's current cgroup directory in ``group``'s hierarchy."""
    for line in _read("/proc/self/cgroup").splitlines():
        _, ctrl, rel = line.split(":", 2)
        if (group.version == 1 and "cpu" in ctrl.split(",")) or (group.version == 2 and ctrl == ""):
            return os.path.join(group.root, rel.lstrip("/"))
    return group.root


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return ""


def _write(path: str, value) -> None:
    with open(path, "w") as f:
        f.write(str(value))


@dataclass(frozen=True)
class ComputeTimes:
    """Median ms for one image on one core: the stem (embed), each MBConv block, the head, the whole model."""

    embed_ms: float
    block_ms: tuple[float, ...]
    head_ms: float
    full_ms: float

    def as_dict(self) -> dict:
        return {"embed_ms": round(self.embed_ms, 3), "block_ms": [round(x, 3) for x in self.block_ms],
                "head_ms": round(self.head_ms, 3), "full_ms": round(self.full_ms, 3)}


def measure_compute(bm, pixel_values: np.ndarray, repeats: int = 7) -> ComputeTimes:
    """Per-part times of ``bm`` on one (1, 3, 224, 224) input, in the calling thread's affinity."""
    import torch

    x = {"pixel_values": torch.from_numpy(pixel_values)}
    with torch.no_grad():
        embed = median_ms(lambda: bm.embed(x, 0), repeats=repeats)
        h, ctx = bm.embed(x, 0)
        blocks = []
        for i in range(bm.num_blocks):
            blk, h_in = bm.blocks[i], h
            blocks.append(median_ms(lambda: blk(h_in, ctx, None, i), repeats=repeats))
            h = blk(h_in, ctx, None, i)
        head = median_ms(lambda: bm.head(h, ctx), repeats=repeats)
        full = bm.full()
        whole = median_ms(lambda: full(x), repeats=repeats)
    return ComputeTimes(embed, tuple(blocks), head, whole)


@dataclass(frozen=True)
class CutCodecCost:
    """A codec setting measured at one cut (blocks [0, cut) on the edge)."""

    cut: int
    setting: str
    bytes_per_image: float
    encode_ms: float
    decode_ms: float
    top1_agreement: float
    cut_cosine: float
    #: top-1 agreement on the profile crops the unsplit model is sure of (None when there are none)
    top1_agreement_confident: float | None = None
    #: how many profile crops the figures are measured on, and how many of them are confident
    crops: int = 0
    confident_crops: int = 0

    def as_dict(self) -> dict:
        conf = self.top1_agreement_confident
        return {"cut": self.cut, "setting": self.setting, "bytes_per_image": round(self.bytes_per_image, 1),
                "encode_ms": round(self.encode_ms, 3), "decode_ms": round(self.decode_ms, 3),
                "top1_agreement": round(self.top1_agreement, 4),
                "top1_agreement_confident": None if conf is None else round(conf, 4), "crops": self.crops,
                "confident_crops": self.confident_crops,
                "cut_cosine": round(self.cut_cosine, 6)}


def measure_cut_codec(bm, cut: int, setting: str, codec, features) -> CutCodecCost:
    """Bytes, fidelity (held-out ``features``) and encode/decode time (one image) of ``codec`` at ``cut``."""
    from splitnet.codecs.fidelity import evaluate_codec

    res = evaluate_codec(bm, cut, codec, features)
    h = features[0].hidden
    payload = codec.encode(h)
    conf = res.task.get("top1_agreement_confident")
    return CutCodecCost(cut, setting, res.wire_bytes_per_input, median_ms(lambda: codec.encode(h), 1, 5),
                        median_ms(lambda: codec.decode(payload), 1, 5), float(res.task["top1_agreement"]), res.cut_cosine,
                        None if conf is None else float(conf), len(features),
                        int(round(res.task.get("confident_fraction", 0.0) * len(features))))


def build_profile(bm, edge: ComputeTimes, costs: Sequence[CutCodecCost], settings: Sequence[str]) -> ModelProfile:
    """The model profile of this run (reference device: the edge core)."""
    by_block: dict[int, dict] = {}
    for c in costs:
        by_block.setdefault(c.cut - 1, {})[c.setting] = {
            "bytes_per_token": c.bytes_per_image, "encode_ms_per_token": c.encode_ms, "decode_ms_per_token": c.decode_ms,
            "fidelity": min(1.0, max(0.0, c.top1_agreement))}
    blocks = []
    for i in range(bm.num_blocks):
        side, _, ch = bm.arch.cut_shape(i + 1) if i + 1 < bm.num_blocks else (1, 1, 1)
        elems = int(side * side * ch)
        blocks.append(BlockProfile(i, {1: edge.block_ms[i]}, 0, elems, out_bytes_per_token=4.0 * elems,
                                   codec_costs=by_block.get(i, {})))
    embed = BlockProfile(-1, {1: edge.embed_ms}, 0, 3 * 224 * 224)
    head = BlockProfile(bm.num_blocks, {1: edge.head_ms}, 0, 1000, out_bytes_per_token=LOGITS_BYTES)
    # a setting not measured at a cut keeps fidelity 0, so it never passes a floor there
    codecs = (CodecOption("none"),) + tuple(CodecOption(s, fidelity=0.0) for s in settings)
    return ModelProfile("efficientnet-lite0", "vision", tuple(blocks), embed, head, reference_device="edge core (core 0), 1 torch thread",
                        return_tokens="last", codecs=codecs, source="measured by splitnet bench e2e in this run")


def fleet_at(bandwidth_mbit_s: float, rtt_ms: float, cloud_speed_rel: float, overhead_ms: float, *,
             edge_speed_rel: float = 1.0, edge_overhead_ms: float = 0.0, burst_bytes: float = 0.0) -> Fleet:
    """Edge (first stage, the client's device) and cloud joined by the shaped link.

    ``bandwidth_mbit_s`` is the configured (frame) rate: the link's goodput is
    ``GOODPUT_FRACTION`` of it. ``burst_bytes``: the shaper's bucket in frame bytes (tbf's
    ``burst``), which passes ``GOODPUT_FRACTION`` of it in message bytes at line rate.
    ``edge_overhead_ms``: the edge device's fixed time per request beyond its block times."""
    devs = (DeviceProfile(EDGE, edge_speed_rel, 8 << 30, can_host_first_stage=True, stage_overhead_ms=edge_overhead_ms),
            DeviceProfile(CLOUD, cloud_speed_rel, 64 << 30))
    link = LinkProfile(EDGE, CLOUD, bandwidth_mbit_s * GOODPUT_FRACTION, rtt_ms, overhead_ms, transport="zmq", uplink=True,
                       burst_bytes=burst_bytes * GOODPUT_FRACTION)
    return Fleet(devs, (link,), "e2e-lab")


@dataclass(frozen=True)
class CloudOnlyCosts:
    """Measured parts of the cloud-only path: JPEG bytes and encode (edge), decode + model (cloud)."""

    jpeg_bytes: float
    encode_ms: float
    cloud_ms: float
    header_bytes: float = 64.0


def predict_cloud_only(c: CloudOnlyCosts, link: LinkProfile, overhead_ms: float) -> float:
    """Predicted ms of one cloud-only request with the cost model's link arithmetic (``link``: the
    fleet's edge-cloud link, its goodput, RTT and bucket; ``overhead_ms`` per message instead of
    the link's own, which is the split path's)."""
    ln = dataclasses.replace(link, overhead_ms=overhead_ms)
    return c.encode_ms + ln.ms_for(c.jpeg_bytes + c.header_bytes) + c.cloud_ms + ln.ms_for(LOGITS_BYTES + c.header_bytes)


def option_name(kind: str, cut: int | None = None, setting: str | None = None) -> str:
    return f"split@{cut}:{setting}" if kind == "split" else f"{kind}-only"


def predict_options(profile: ModelProfile, fleet: Fleet, options: Sequence[dict], cloud: CloudOnlyCosts,
                    cloud_overhead_ms: float, fidelity_floor: float,
                    offsets_ms: dict[str, float] | None = None) -> dict[str, dict[str, Any]]:
    """{option name: {"predicted_ms", "allowed"}} for every option; ``allowed``: the codec keeps the floor.
    ``offsets_ms``: by option kind ("cloud", "edge", "split"), ms added to every prediction of that
    kind (signed: what :func:`calibration_offsets` measured at the calibration point)."""
    off = offsets_ms or {}
    link = fleet.links[0]
    wl = Workload(prefill_tokens=1, decode_steps=0, fidelity_floor=0.0)
    out: dict[str, dict[str, Any]] = {}
    for o in options:
        name = option_name(o["kind"], o.get("cut"), o.get("setting"))
        if o["kind"] == "edge":
            ev = evaluate(profile, fleet, wl, Assignment([(EDGE, 0, profile.num_blocks)], []))
            out[name] = {"predicted_ms": ev.latency_ms + off.get("edge", 0.0), "allowed": True}
        elif o["kind"] == "cloud":
            out[name] = {"predicted_ms": predict_cloud_only(cloud, link, cloud_overhead_ms) + off.get("cloud", 0.0), "allowed": True}
        else:
            asg = Assignment([(EDGE, 0, o["cut"]), (CLOUD, o["cut"], profile.num_blocks)], [o["setting"]])
            ev = evaluate(profile, fleet, wl, asg)
            fid = profile.cut_codec_cost(o["cut"] - 1, profile.codec(o["setting"]))["fidelity"]
            out[name] = {"predicted_ms": ev.latency_ms + off.get("split", 0.0), "allowed": bool(fid >= fidelity_floor - 1e-12)}
    return out


def calibration_offsets(predicted: dict[str, dict[str, Any]], calib: dict[str, dict]) -> dict[str, float]:
    """{kind: measured p50 - predicted ms} at the calibration point, for the kinds measured there
    (``calib``: {kind: {"option": name, "p50_ms": ...}}; ``predicted`` at that point, no offsets).
    Signed: a path that ran faster than its profile there gets a negative offset."""
    return {k: float(c["p50_ms"] - predicted[c["option"]]["predicted_ms"]) for k, c in calib.items() if c["option"] in predicted}


def planner_choice(predicted: dict[str, dict[str, Any]]) -> str:
    """The allowed option with the lowest predicted latency."""
    return min((n for n, p in predicted.items() if p["allowed"]), key=lambda n: predicted[n]["predicted_ms"])


def compare_point(predicted: dict[str, dict[str, Any]], measured_ms: dict[str, float], tolerance: float = 0.10) -> dict:
    """The planner's choice next to the measured best (both among allowed options) at one point."""
    allowed = [n for n in measured_ms if predicted[n]["allowed"]]
    choice = planner_choice({n: predicted[n] for n in allowed})
    best = min(allowed, key=lambda n: measured_ms[n])
    ratio = measured_ms[choice] / measured_ms[best]
    errs = {n: abs(predicted[n]["predicted_ms"] - measured_ms[n]) / measured_ms[n] for n in measured_ms}
    return {"planner_choice": choice, "predicted_ms": round(predicted[choice]["predicted_ms"], 2),
            "choice_measured_ms": round(measured_ms[choice], 2), "measured_best": best,
            "measured_best_ms": round(measured_ms[best], 2), "choice_over_best": round(ratio, 4),
            "within_tolerance": bool(ratio <= 1.0 + tolerance),
            "abs_pct_error": {n: round(100 * e, 2) for n, e in errs.items()},
            "mape_pct_choice": round(100 * errs[choice], 2)}


def summarize_planner(points: Sequence[dict]) -> dict:
    """Over the sweep: how often the choice is within tolerance, MAPE over every option and over the choices."""
    all_errs = [e for p in points for e in p["abs_pct_error"].values()]
    return {"points": len(points), "choice_within_10pct": sum(p["within_tolerance"] for p in points),
            "all_points_within_10pct": all(p["within_tolerance"] for p in points),
            "mape_pct_all_options": round(float(np.mean(all_errs)), 2) if all_errs else None,
            "mape_pct_planner_choice": round(float(np.mean([p["mape_pct_choice"] for p in points])), 2) if points else None,
            "worst_choice_over_best": max((p["choice_over_best"] for p in points), default=None)}
