"""planner: DP optimality vs brute force, solve time at 8 devices x 80 blocks, predicted vs measured latency.

* ``optimality``: random heterogeneous instances (1-4 devices, 1-40 blocks, 1-3 codecs, memory limits,
  sparse and asymmetric links, fidelity floors), both objectives, both device modes; the DP's objective
  against the best of every placement enumerated by brute force. Infeasible instances (the two agree
  that nothing fits) are counted apart.
* ``solve_time``: tables + DP for 8 devices x 80 blocks x 3 codecs, pinned to one core, median.
* ``prediction``: stage processes over real sockets; each configuration (cuts, codecs, tokens) is
  predicted by the cost model from a model profile measured in this run, and measured end to end.
  Per-message software overheads are fitted on separate calibration configurations (a token count
  not used for evaluation). :func:`measure_prediction` takes a ``runner`` so the netns suite can
  run the same configurations across shaped links.
"""

from __future__ import annotations

import argparse
import math
import os
import random
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--instances", type=int, default=240, help="feasible random instances for optimality (>= 200)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--solve-repeats", type=int, default=7)
    p.add_argument("--skip-prediction", action="store_true", help="do not start stage processes")
    p.add_argument("--prediction-repeats", type=int, default=9, help="timed requests per configuration")
    p.add_argument("--model-profile", help="use this profile instead of measuring one (prediction)")
    p.add_argument("--prediction-mode", choices=["auto", "netns", "loopback"], default="auto",
                   help="netns: stages in network-namespace hosts over tc-shaped, relay-delayed links (root); "
                        "loopback: 127.0.0.1; auto: netns when it can be built here, else loopback")


# ----------------------------------------------------------------------------- optimality
def check_optimality(n_feasible: int, seed: int = 0, max_devices: int = 4, max_blocks: int = 40,
                     max_codecs: int = 3) -> dict:
    from splitnet.planner.cost import tables
    from splitnet.planner.solver import brute_force, count_placements, solve_tables
    from splitnet.planner.synthetic import random_instance

    rng = random.Random(seed)
    feasible = infeasible = checks = 0
    max_gap = 0.0
    max_placements = 0
    total_placements = 0
    sizes = {"devices": [], "blocks": []}
    mismatched = []
    t0 = time.perf_counter()
    while feasible < n_feasible:
        D = rng.randint(1, max_devices)
        L = rng.choice([rng.randint(1, max_blocks), rng.randint(max_blocks // 2, max_blocks)])
        m, f, wl = random_instance(rng, D, L, rng.randint(1, max_codecs))
        t = tables(m, f, wl)
        mode = rng.choice(["chain", "search"])
        any_ok = False
        for obj in ("latency", "throughput"):
            s = solve_tables(t, obj, mode)
            bf = brute_force(t, obj, mode)
            checks += 1
            if (s is None) != (bf is None):
                mismatched.append({"devices": D, "blocks": L, "objective": obj, "dp": s is not None})
                max_gap = math.inf
                continue
            if s is None:
                continue
            any_ok = True
            if obj == "latency":
                gap = (s.latency_ms - bf[0]) / bf[0] if bf[0] > 0 else s.latency_ms - bf[0]
            else:  # throughput = 1000 / bottleneck; the gap in throughput
                gap = (1 / s.bottleneck_ms - 1 / bf[1]) * bf[1] if bf[1] > 0 else 0.0
            max_gap = max(max_gap, abs(gap))
        n = count_placements(t, mode)
        total_placements += 2 * n
        max_placements = max(max_placements, n)
        if any_ok:
            feasible += 1
            sizes["devices"].append(D)
            sizes["blocks"].append(L)
        else:
            infeasible += 1
    return {
        "instances": feasible,
        "objective_checks": 2 * feasible,
        "infeasible_instances_agreed": infeasible,
        "max_gap": max_gap,
        "max_devices": max(sizes["devices"]), "max_blocks": max(sizes["blocks"]),
        "instances_with_4_devices_30plus_blocks": sum(1 for d, b in zip(sizes["devices"], sizes["blocks"])
                                                      if d == 4 and b >= 30),
        "placements_enumerated": total_placements,
        "max_placements_one_instance": max_placements,
        "mismatches": mismatched,
        "seconds": round(time.perf_counter() - t0, 2),
        "notes": "gap = relative difference of the objective (latency ms, or throughput) between the DP and "
                 "brute force over every placement; throughput ties are broken by latency in both",
    }


# ----------------------------------------------------------------------------- solve time
def time_solve(devices: int = 8, blocks: int = 80, codecs: int = 3, repeats: int = 7, seed: int = 0) -> dict:
    from splitnet.planner.cost import tables
    from splitnet.planner.solver import _orders, solve_tables
    from splitnet.planner.synthetic import random_instance

    pinned = None
    if hasattr(os, "sched_getaffinity"):
        old = os.sched_getaffinity(0)
        pinned = min(old)
        os.sched_setaffinity(0, {pinned})
    try:
        rng = random.Random(seed)
        per_obj: dict[str, list[float]] = {"latency": [], "throughput": []}
        orders = 0
        for r in range(repeats):
            m, f, wl = random_instance(rng, devices, blocks, codecs, tight_memory=False)
            for obj in per_obj:
                t0 = time.perf_counter()
                t = tables(m, f, wl)
                solve_tables(t, obj, "auto")
                per_obj[obj].append(time.perf_counter() - t0)
            orders = len(_orders(t, "auto"))
    finally:
        if pinned is not None:
            os.sched_setaffinity(0, old)
    med = {k: statistics.median(v) for k, v in per_obj.items()}
    return {"devices": devices, "blocks": blocks, "codecs": codecs, "seconds": max(med.values()),
            "seconds_by_objective": med, "repeats": repeats, "pinned_cpu": pinned,
            "device_orders_solved": orders, "mode": "chain (auto for > 5 devices)",
            "includes": "building the cost tables + DP (+ the second, latency-under-cap DP for throughput)"}


# ----------------------------------------------------------------------------- prediction
@dataclass
class PredictionConfig:
    """One pipeline to predict and measure: stage boundaries, codec per cut, request size."""

    cuts: list[int]
    codecs: list[str]
    prefill_tokens: int
    role: str = "eval"  # "eval" or "calibration"
    extra: dict = field(default_factory=dict)
    #: shaped links between the chain's hosts (host i runs stage i): ((i, j), rate Mbit/s, RTT ms)
    #: per pair, i < j; empty: loopback. For 3+ stages the return link (0, K-1) is listed too.
    links: tuple = ()

    def __post_init__(self) -> None:
        if self.role not in ("eval", "calibration"):
            raise ValueError(f"PredictionConfig.role must be eval or calibration, got {self.role!r}")
        if len(self.codecs) != len(self.cuts):
            raise ValueError(f"PredictionConfig: {len(self.cuts)} cuts need {len(self.cuts)} codecs, got {self.codecs}")
        if self.prefill_tokens < 1:
            raise ValueError(f"PredictionConfig.prefill_tokens must be >= 1, got {self.prefill_tokens}")
        k = len(self.cuts) + 1
        for (i, j), mbit, rtt in self.links:
            if not 0 <= i < j < k or mbit <= 0 or rtt < 0:
                raise ValueError(f"PredictionConfig.links: bad link ({i}, {j}) {mbit} Mbit/s {rtt} ms for {k} stages")

    @property
    def key(self) -> tuple:
        """What a runner starts and measures: (cuts, codecs, links)."""
        return tuple(self.cuts), tuple(self.codecs), tuple(self.links)


#: runner({(cuts, codecs, links): [token counts]}, repeats) -> {(cuts, codecs, links): {tokens: [latency ms, ...]}}
Runner = Callable[[dict, int], dict]


def loopback_runner(model: str = "minilm", vocab: int = 30522, warmup_rounds: int = 3) -> Runner:
    """Stage processes on 127.0.0.1 started by the runtime's launcher.

    Every pipeline is started first, then requests go round-robin over (pipeline, token count) for
    ``repeats`` rounds, so that load from other processes on the host falls evenly on all configurations.
    """

    def run(plan, repeats):
        import contextlib

        import splitnet
        from splitnet.runtime.launcher import launch_pipeline

        inputs = _inputs(sorted({T for ts in plan.values() for T in ts}), vocab)
        out = {key: {T: [] for T in ts} for key, ts in plan.items()}
        with contextlib.ExitStack() as stack:
            sessions = {}
            for key in plan:
                cuts, codecs, _ = key
                rt_codecs = ["" if c == "none" else c for c in codecs]
                pipe = stack.enter_context(launch_pipeline(model, cuts=list(cuts), host="127.0.0.1", codecs=rt_codecs))
                sess = splitnet.connect(pipe.endpoints, timeout_s=60)
                if hasattr(sess, "close"):
                    stack.callback(sess.close)
                sessions[key] = sess
            for r in range(warmup_rounds + repeats):
                for key, sess in sessions.items():
                    for T in plan[key]:
                        sess.infer(inputs[T])
                        if r >= warmup_rounds:
                            out[key][T].append(float(sess.last_stats["latency_ms"]))
        return out

    return run


def _inputs(tokens: Sequence[int], vocab: int = 30522) -> dict[int, dict[str, np.ndarray]]:
    """The same pseudo-random token ids for every runner: {T: {input_ids, attention_mask}} (1, T)."""
    g = np.random.default_rng(0)
    out = {}
    for T in tokens:
        ids = g.integers(1000, vocab, size=(1, T), dtype=np.int64)
        out[T] = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    return out


#: TCP payload per byte that tbf counts on a 1500-byte-MTU veth: 1448 payload bytes (MSS with
#: timestamps) per 1514-byte frame. A link shaped at R Mbit/s carries R x this of application data.
TCP_PAYLOAD_PER_FRAME = 1448 / 1514


def chain_fleet(num_stages: int, first_overhead_ms: float = 0.0, stage_overhead_ms: float = 0.0,
                bandwidth_mbit_s: float = 5000.0, rtt_ms: float = 0.1, links: Sequence = (),
                goodput_factor: float = TCP_PAYLOAD_PER_FRAME):
    """host0..hostN-1, fully linked: the loopback host as a fleet. host0 also runs the client, so its
    per-message overhead (``first_overhead_ms``) includes the SDK's per-request cost.

    ``links`` (``PredictionConfig.links``: ((i, j), Mbit/s, RTT ms)) replaces the loopback figures
    for those pairs: the shaped rate x ``goodput_factor`` (headers count against tbf's rate) and
    the RTT the relays add."""
    from splitnet.planner.profiles import DeviceProfile, Fleet, LinkProfile

    devs = tuple(DeviceProfile(f"host{i}", 1.0, 2**34, can_host_first_stage=(i == 0),
                               stage_overhead_ms=first_overhead_ms if i == 0 else stage_overhead_ms)
                 for i in range(num_stages))
    shaped = {tuple(ij): (mbit * goodput_factor, rtt) for ij, mbit, rtt in links}
    lp = tuple(LinkProfile(f"host{i}", f"host{j}", *shaped.get((i, j), (bandwidth_mbit_s, rtt_ms)))
               for i in range(num_stages) for j in range(i + 1, num_stages))
    return Fleet(devs, lp, "netns" if links else "loopback")


def _predict(model, cfg: PredictionConfig, fleet_for, so: float, lo: float) -> float:
    from splitnet.planner.cost import Assignment, Workload, evaluate

    L = model.num_blocks
    bounds = [0, *cfg.cuts, L]
    k = len(bounds) - 1
    asg = Assignment([(f"host{i}", bounds[i], bounds[i + 1]) for i in range(k)], list(cfg.codecs))
    fleet = fleet_for(k, so, lo, links=cfg.links) if cfg.links else fleet_for(k, so, lo)
    ev = evaluate(model, fleet, Workload(prefill_tokens=cfg.prefill_tokens), asg)
    if not ev.feasible:
        raise RuntimeError(ev.reason)
    return ev.latency_ms


def measure_prediction(configs: Sequence[PredictionConfig], runner: Runner, model, fleet_for=chain_fleet,
                       repeats: int = 9, calibrate: bool = True) -> dict:
    """Predict and measure each configuration; MAPE over the ``eval`` ones.

    ``fleet_for(num_stages, first_overhead_ms, stage_overhead_ms) -> Fleet`` with devices host0..; the
    netns suite passes one whose links carry the shaped bandwidth and RTT. When ``calibrate``, the two
    per-message overheads (host0, which also runs the client; every other stage) are fitted (least
    squares, >= 0) on the ``calibration`` configurations only.
    """
    plan: dict[tuple, list[int]] = {}
    for c in configs:
        ts = plan.setdefault(c.key, [])
        if c.prefill_tokens not in ts:
            ts.append(c.prefill_tokens)
    res = runner(plan, repeats)
    measured: dict[int, float] = {}
    samples: dict[int, list[float]] = {}
    for c in configs:
        samples[id(c)] = res[c.key][c.prefill_tokens]
        measured[id(c)] = statistics.median(samples[id(c)])
    so = lo = 0.0  # first device's (client + first stage) and every other stage's overhead per message
    cal = [c for c in configs if c.role == "calibration"]
    if calibrate and cal:
        # residual = measured - prediction without overheads = 1 * first + (K - 1) * other
        a = np.array([[1.0, len(c.cuts)] for c in cal])
        y = np.array([measured[id(c)] - _predict(model, c, fleet_for, 0.0, 0.0) for c in cal])
        sol = np.linalg.lstsq(a, y, rcond=None)[0]
        if sol[1] < 0:  # non-negative least squares, by hand for two unknowns
            sol = np.array([max(0.0, float(np.mean(y))), 0.0])
        elif sol[0] < 0:
            sol = np.array([0.0, max(0.0, float(a[:, 1] @ y / max(a[:, 1] @ a[:, 1], 1e-12)))])
        so, lo = float(sol[0]), float(sol[1])
    out = []
    errs = []
    for c in configs:
        pred = _predict(model, c, fleet_for, so, lo)
        meas = measured[id(c)]
        err = abs(pred - meas) / meas
        if c.role == "eval":
            errs.append(err)
        s = samples[id(c)]
        net = {"links": [{"hosts": list(ij), "rate_mbit_s": mbit, "rtt_ms": rtt} for ij, mbit, rtt in c.links]} if c.links else {}
        out.append({"cuts": c.cuts, "codecs": c.codecs, "prefill_tokens": c.prefill_tokens, "role": c.role, **net,
                    "predicted_ms": round(pred, 3), "measured_ms": round(meas, 3),
                    "measured_iqr_ms": [round(float(np.percentile(s, 25)), 3), round(float(np.percentile(s, 75)), 3)],
                    "abs_pct_error": round(100 * err, 2), **c.extra})
    ev = [r for r in out if r["role"] == "eval"]
    worst = max(ev, key=lambda r: r["abs_pct_error"]) if ev else None
    return {"configs": len(errs), "mape": float(np.mean(errs)) if errs else None,
            "max_ape": float(np.max(errs)) if errs else None, "worst": worst,
            "calibrated": {"first_device_overhead_ms": round(so, 4), "other_stage_overhead_ms": round(lo, 4),
                           "on": [f"cuts={c.cuts} T={c.prefill_tokens}" for c in cal]},
            "results": out}


# ----------------------------------------------------------------------------- netns mode
#: lab hosts; a K-stage chain runs stage i on NETNS_CHAINS[K][i]; the client runs in "edge".
NETNS_HOSTS = ("edge", "mid", "cloud")
NETNS_CHAINS = {1: ("edge",), 2: ("edge", "cloud"), 3: ("edge", "mid", "cloud")}


def netns_reason() -> str | None:
    """None when network-namespace hosts can be built here, else why not."""
    from splitnet.lab.netns import LabError, check_root, lab_topology

    reason = check_root()
    if reason:
        return reason
    try:
        with lab_topology(["probe"], name=f"p{os.getpid() % 10**5}"):
            pass
    except (LabError, OSError) as e:
        return f"`ip netns` does not work here: {e}"
    return None


def tbf_burst_kbyte(rate_mbit: float) -> float:
    """A small tbf bucket (0.3 ms of rate, >= 2 KiB): tbf's default (10 ms, >= 16 KiB) lets a
    whole small message through at line speed, which no bandwidth figure can predict."""
    return max(2.0, rate_mbit * 1e6 / 8 * 3e-4 / 1024)


def netns_runner(model: str = "minilm", num_blocks: int = 6, vocab: int = 30522, warmup_rounds: int = 2,
                 log: Callable[[str], None] | None = None) -> Runner:
    """Stage processes in the namespace hosts ``edge``/``mid``/``cloud`` of one lab, a client in ``edge``.

    Per pipeline (cuts, codecs) the stages are started once (1 torch thread each); per link
    setting the links are reshaped in place (tbf rate), relays with the RTT/2 one-way delay are
    started in each sending host (one per cut, and one in ``edge`` for the result's way back),
    and the client runs ``warmup_rounds`` + ``repeats`` requests round-robin over the token counts.
    """

    def run(plan, repeats):
        from splitnet.lab.netns import LinkSpec, lab_topology

        say = log or (lambda _m: None)
        out = {key: {T: [] for T in ts} for key, ts in plan.items()}
        by_pipe: dict[tuple, list[tuple]] = {}
        for key in plan:
            by_pipe.setdefault(key[:2], []).append(key)
        with lab_topology(NETNS_HOSTS, name=f"pl{os.getpid() % 10**4}") as lab:
            client, _ = lab.spawn("edge", [sys.executable, "-m", "splitnet.bench.planner", "--reply-host", lab.addr("edge"),
                                           "--vocab", str(vocab)], ready_prefix="READY", stdin=True)
            for (cuts, codecs), keys in by_pipe.items():
                k = len(cuts) + 1
                hosts = NETNS_CHAINS[k]
                bounds = [0, *cuts, num_blocks]
                t0 = time.perf_counter()
                stages = []
                for i in range(k):
                    extra = ["--insecure", *(["--codec-out", codecs[i]] if i < len(codecs) and codecs[i] != "none" else [])]
                    stages.append(lab.stage_process(hosts[i], model, (bounds[i], bounds[i + 1]), stage_index=i, extra_args=extra))
                say(f"netns: stages {list(cuts)} {list(codecs)} up in {time.perf_counter() - t0:.1f} s")
                try:
                    for key in keys:
                        shaped = {frozenset((hosts[i], hosts[j])): LinkSpec(rate_mbit=mbit, delay_ms=rtt / 2, burst_kbyte=tbf_burst_kbyte(mbit))
                                  for (i, j), mbit, rtt in key[2]}
                        for a, b in ((NETNS_HOSTS[0], NETNS_HOSTS[1]), (NETNS_HOSTS[1], NETNS_HOSTS[2]), (NETNS_HOSTS[0], NETNS_HOSTS[2])):
                            lab.set_link(a, b, shaped.get(frozenset((a, b)), LinkSpec()))
                        relays, eps = [], [stages[0][1]]
                        for i in range(1, k):
                            p, ep = lab.relay(stages[i][1], src=hosts[i - 1], dst=hosts[i])
                            relays.append(p)
                            eps.append(ep)
                        back = lab.link(hosts[-1], hosts[0]).spec.delay_ms if k > 1 else 0.0
                        try:
                            res = _ask(client, {"endpoints": eps, "reply_delay_ms": back, "tokens": plan[key],
                                                "warmup": warmup_rounds, "repeats": repeats}, timeout_s=600)
                        finally:
                            lab.stop(relays)
                        if not res.get("ok"):
                            raise RuntimeError(f"netns client failed for {key}: {res.get('error')}")
                        for T, lat in res["latency_ms"].items():
                            out[key][int(T)] = lat
                        say(f"netns: {key}: " + ", ".join(f"T={T} {statistics.median(v):.1f} ms (stages {res['stage_compute_ms'].get(T)})"
                                                          for T, v in res["latency_ms"].items()))
                finally:
                    lab.stop([p for p, _ in stages])
        return out

    return run


def _ask(proc, cmd: dict, timeout_s: float) -> dict:
    """Send one JSON command line to the client process and wait (bounded) for its JSON answer."""
    import json

    from splitnet.lab.netns import read_line

    proc.stdin.write(json.dumps(cmd) + "\n")
    proc.stdin.flush()
    try:
        line = read_line(proc, lambda ln: ln.startswith("{"), timeout_s)
    except TimeoutError:
        raise TimeoutError(f"netns client gave no answer within {timeout_s} s") from None
    except EOFError as e:
        raise RuntimeError(f"netns client exited ({proc.poll()}): {e}") from None
    return json.loads(line)


def _client_main(argv: list[str] | None = None) -> int:
    """The netns client, run inside the edge host: one JSON command per stdin line, one JSON answer
    per stdout line; exits when stdin closes (its parent is gone)."""
    import json

    p = argparse.ArgumentParser(prog="python -m splitnet.bench.planner", description="netns prediction client (runs in the edge host)")
    p.add_argument("--reply-host", required=True, help="this host's address; the last stage sends results here")
    p.add_argument("--vocab", type=int, default=30522)
    a = p.parse_args(argv)
    import splitnet.edge.sdk  # noqa: F401  (import cost paid before READY)

    print("READY", flush=True)
    for line in sys.stdin:
        if not line.strip():
            continue
        try:
            out = _client_run(json.loads(line), a.reply_host, a.vocab)
        except Exception as e:  # reported to the parent as data, which raises
            out = {"ok": False, "error": f"{type(e).__name__}: {e}"}
        print(json.dumps(out), flush=True)
    return 0


def _client_run(cmd: dict, reply_host: str, vocab: int) -> dict:
    """Connect, route results back through a delay relay in this host (the return link's RTT/2),
    run warm-up + timed requests round-robin over the token counts."""
    import subprocess

    import splitnet.edge.sdk as sdk
    from splitnet.edge.config import ClientConfig
    from splitnet.lab.relay import start_relay

    tokens = [int(T) for T in cmd["tokens"]]
    inputs = _inputs(tokens, vocab)
    lat: dict[int, list[float]] = {T: [] for T in tokens}
    comp: dict[int, list[list[float]]] = {T: [] for T in tokens}  # per request: each stage's compute ms
    relay = None
    try:
        with sdk.connect(cmd["endpoints"], config=ClientConfig(reply_via="bind", reply_host=reply_host, timeout_s=60, connect_timeout_s=30)) as s:
            if cmd["reply_delay_ms"] > 0:
                relay, s.reply_to = start_relay(reply_host, s.reply_to, cmd["reply_delay_ms"])  # the last stage now reaches us through the relay
            for r in range(int(cmd["warmup"]) + int(cmd["repeats"])):
                for T in tokens:
                    s.infer(inputs[T])
                    if r >= int(cmd["warmup"]):
                        lat[T].append(float(s.last_stats["latency_ms"]))
                        comp[T].append([float(t["compute_ms"]) for t in s.last_stats.get("trace", [])])
    finally:
        if relay is not None:
            relay.terminate()
            try:
                relay.wait(timeout=5)
            except subprocess.TimeoutExpired:
                relay.kill()
                relay.wait(timeout=5)
    return {"ok": True, "latency_ms": {str(T): v for T, v in lat.items()},
            "stage_compute_ms": {str(T): [round(float(x), 2) for x in np.median(np.array(v), axis=0)] for T, v in comp.items() if v}}


def netns_configs(small: bool = False) -> list[PredictionConfig]:
    """2- and 3-host chains of minilm over links of 1-100 Mbit/s and 5-100 ms RTT.

    Calibration configurations (64 tokens, their own link settings) fit the two per-message
    overheads; the evaluated ones use 32 or 128 tokens and other link settings."""
    def L2(mbit, rtt):
        return (((0, 1), mbit, rtt),)

    def L3(m01, r01, m12, r12, m02, r02):
        return (((0, 1), m01, r01), ((1, 2), m12, r12), ((0, 2), m02, r02))

    C = PredictionConfig
    cal = [C([3], ["none"], 64, "calibration", links=L2(20, 30)),
           C([1], ["int8"], 64, "calibration", links=L2(5, 50)),
           C([2, 4], ["none", "none"], 64, "calibration", links=L3(100, 10, 20, 20, 100, 10))]
    ev = [C([3], ["none"], 128, links=L2(20, 20)),
          C([3], ["none"], 128, links=L2(100, 5)),
          C([3], ["none"], 32, links=L2(1, 100)),
          C([1], ["int8"], 32, links=L2(1, 40)),
          C([1], ["int8"], 128, links=L2(5, 100)),
          C([2], ["fp16"], 128, links=L2(5, 10)),
          C([2], ["fp16"], 32, links=L2(20, 60)),
          C([2, 4], ["none", "none"], 128, links=L3(20, 10, 20, 10, 20, 10)),
          C([2, 4], ["none", "none"], 32, links=L3(100, 40, 100, 40, 100, 40)),
          C([2, 4], ["none", "none"], 128, links=L3(100, 5, 5, 50, 20, 30)),
          C([2, 4], ["fp16", "int8"], 128, links=L3(5, 20, 20, 5, 100, 10)),
          C([2, 4], ["fp16", "int8"], 32, links=L3(1, 80, 1, 80, 1, 80))]
    if small:
        return [cal[0], cal[2], ev[0], ev[7]]
    return cal + ev


def default_configs(num_blocks: int = 6) -> list[PredictionConfig]:
    cal = [PredictionConfig([], [], 64, "calibration"), PredictionConfig([3], ["none"], 64, "calibration"),
           PredictionConfig([2, 4], ["none", "none"], 64, "calibration")]
    ev = []
    for cuts, codecs in (([], []), ([3], ["none"]), ([1], ["int8"]), ([2, 4], ["none", "none"]),
                         ([2, 4], ["fp16", "int8"]), ([1, 3, 5], ["none", "none", "none"])):
        for T in (32, 128):
            ev.append(PredictionConfig(list(cuts), list(codecs), T))
    # calibration configs share pipelines with eval ones where the cuts match (different token count)
    return cal + ev


def choose_mode(requested: str) -> tuple[str, str]:
    """(mode, why): ``auto`` picks netns when namespaces can be built here, else loopback."""
    if requested == "loopback":
        return "loopback", "--prediction-mode loopback"
    reason = netns_reason()
    if requested == "netns":
        if reason:
            raise SystemExit(f"--prediction-mode netns: {reason}")
        return "netns", "--prediction-mode netns"
    if reason:
        return "loopback", f"netns not available: {reason}"
    return "netns", "auto: root and `ip netns` work"


def run_prediction(args: argparse.Namespace) -> dict:
    from splitnet.planner.profiles import load_model_profile

    try:
        from splitnet.runtime.launcher import launch_pipeline  # noqa: F401
        import splitnet.edge.sdk  # noqa: F401
    except ImportError as e:
        return {"status": "not_run", "reason": f"runtime not available: {e}"}
    mode, why = choose_mode(getattr(args, "prediction_mode", "auto"))
    t0 = time.perf_counter()
    if args.model_profile:
        model = load_model_profile(args.model_profile)
        prof_src = args.model_profile
    else:
        from splitnet.planner.profiler import profile_model

        model = profile_model("minilm", tokens=(1, 32, 64, 128), progress=False)
        prof_src = "measured in this run (1 torch thread)"
    if mode == "netns":
        configs = netns_configs()
        runner = netns_runner("minilm", model.num_blocks)
        network = ("network namespaces edge/mid/cloud (splitnet.lab), one veth per host pair; rate shaped by "
                   "tc tbf on both ends (bucket: tbf_burst_kbyte), delay = RTT/2 per direction added by "
                   "splitnet.lab.relay in the sending host (one relay per cut, one in edge for the result's way back)")
        fleet_note = (f"links: configured rate x {TCP_PAYLOAD_PER_FRAME:.4f} (TCP payload per frame tbf counts) and "
                      "the configured RTT; devices: this machine's CPU, compute_speed_rel 1.0")
    else:
        configs = default_configs(model.num_blocks)
        runner = loopback_runner("minilm")
        network = "loopback only (127.0.0.1, no tc shaping)"
        fleet_note = "links: 5000 Mbit/s, 0.1 ms RTT; devices: this machine's CPU, compute_speed_rel 1.0"
    res = measure_prediction(configs, runner, model, repeats=args.prediction_repeats)
    res.update({"status": "ok", "mode": mode, "mode_reason": why, "network": network, "fleet": fleet_note,
                "model": model.model, "model_profile": prof_src,
                "stage_processes": "1 torch thread each, on a 2-core host (one request in flight)",
                "seconds": round(time.perf_counter() - t0, 1)})
    return res


# ----------------------------------------------------------------------------- entry points
def run(args: argparse.Namespace) -> dict:
    opt = check_optimality(args.instances, args.seed)
    st = time_solve(repeats=args.solve_repeats, seed=args.seed)
    if args.skip_prediction:
        pred = {"status": "not_run", "reason": "--skip-prediction"}
    else:
        pred = run_prediction(args)
    goals = {"max_gap_zero": opt["max_gap"] <= 1e-9 and opt["instances"] >= 200,
             "solve_seconds_le_1": st["seconds"] <= 1.0,
             "mape_le_0.15": (pred.get("mape") is not None and pred["mape"] <= 0.15 and pred["configs"] >= 10)}
    return {"config": {"instances": args.instances, "seed": args.seed, "solve_repeats": args.solve_repeats,
                       "prediction_repeats": args.prediction_repeats},
            "optimality": opt, "solve_time": st, "prediction": pred, "goals": goals,
            "baseline": {"brute_force": "exhaustive enumeration of the same placement space (optimality)"}}


def summarize(doc: dict) -> str:
    o, s, p = doc["optimality"], doc["solve_time"], doc["prediction"]
    lines = [f"optimality: {o['instances']} instances ({o['objective_checks']} objective checks), max gap {o['max_gap']:.2e}",
             f"solve time: {s['devices']} devices x {s['blocks']} blocks: {s['seconds'] * 1e3:.1f} ms (median, one core)"]
    if p.get("status") == "ok":
        lines.append(f"prediction [{p['mode']}: {p['mode_reason']}]: {p['configs']} configs, MAPE {100 * p['mape']:.1f} %, "
                     f"{p['seconds']} s")
        for r in p["results"]:
            net = " ".join(f"{x['hosts']}:{x['rate_mbit_s']}Mb/{x['rtt_ms']}ms" for x in r.get("links", []))
            lines.append(f"  {r['role']:11s} cuts={r['cuts']} codecs={r['codecs']} T={r['prefill_tokens']} {net}: "
                         f"predicted {r['predicted_ms']:.1f} ms, measured {r['measured_ms']:.1f} ms "
                         f"({r['abs_pct_error']:.1f} %)")
    else:
        lines.append(f"prediction: {p.get('status')} ({p.get('reason')})")
    lines.append(f"goals: {doc['goals']}")
    return "\n".join(lines)


if __name__ == "__main__":  # the netns client (see netns_runner)
    sys.exit(_client_main())
