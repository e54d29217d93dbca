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


#: runner(pipelines [(cuts, codecs)], token_counts, repeats) -> {(cuts, codecs): {tokens: [latency ms, ...]}}
Runner = Callable[[list[tuple[tuple[int, ...], tuple[str, ...]]], list[int], int], dict]


def loopback_runner(model: str = "minilm", vocab: int = 30522, warmup_rounds: int = 3) -> Runner:
    """Stage processes on 127.0.0.1 started by the runtime's launcher.

    Every pipeline is started first, then requests go round-robin over (pipeline, token count) for
    ``repeats`` rounds, so that load from other processes on the host falls evenly on all configurations.
    """

    def run(pipelines, tokens, repeats):
        import contextlib

        import splitnet
        from splitnet.runtime.launcher import launch_pipeline

        g = np.random.default_rng(0)
        inputs = {}
        for T in tokens:
            ids = g.integers(1000, vocab, size=(1, T), dtype=np.int64)
            inputs[T] = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
        out = {key: {T: [] for T in tokens} for key in pipelines}
        with contextlib.ExitStack() as stack:
            sessions = {}
            for cuts, codecs in pipelines:
                rt_codecs = ["" if c == "none" else c for c in codecs]
                pipe = stack.enter_context(launch_pipeline(model, cuts=list(cuts), host="127.0.0.1", codecs=rt_codecs))
                sess = splitnet.connect(pipe.endpoints, timeout_s=60)
                if hasattr(sess, "close"):
                    stack.callback(sess.close)
                sessions[(cuts, codecs)] = sess
            for r in range(warmup_rounds + repeats):
                for key, sess in sessions.items():
                    for T in tokens:
                        sess.infer(inputs[T])
                        if r >= warmup_rounds:
                            out[key][T].append(float(sess.last_stats["latency_ms"]))
        return out

    return run


def chain_fleet(num_stages: int, first_overhead_ms: float = 0.0, stage_overhead_ms: float = 0.0,
                bandwidth_mbit_s: float = 5000.0, rtt_ms: float = 0.1):
    """host0..hostN-1, fully linked: the loopback host as a fleet. host0 also runs the client, so its
    per-message overhead (``first_overhead_ms``) includes the SDK's per-request cost."""
    from splitnet.planner.profiles import DeviceProfile, Fleet, LinkProfile

    devs = tuple(DeviceProfile(f"host{i}", 1.0, 2**34, can_host_first_stage=(i == 0),
                               stage_overhead_ms=first_overhead_ms if i == 0 else stage_overhead_ms)
                 for i in range(num_stages))
    links = tuple(LinkProfile(f"host{i}", f"host{j}", bandwidth_mbit_s, rtt_ms)
                  for i in range(num_stages) for j in range(i + 1, num_stages))
    return Fleet(devs, links, "loopback")


def _predict(model, cfg: PredictionConfig, fleet_for, so: float, lo: float) -> float:
    from splitnet.planner.cost import Assignment, Workload, evaluate

    L = model.num_blocks
    bounds = [0, *cfg.cuts, L]
    k = len(bounds) - 1
    asg = Assignment([(f"host{i}", bounds[i], bounds[i + 1]) for i in range(k)], list(cfg.codecs))
    ev = evaluate(model, fleet_for(k, so, lo), Workload(prefill_tokens=cfg.prefill_tokens), asg)
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
    keys = list(dict.fromkeys((tuple(c.cuts), tuple(c.codecs)) for c in configs))
    res = runner(keys, sorted({c.prefill_tokens for c in configs}), repeats)
    measured: dict[int, float] = {}
    samples: dict[int, list[float]] = {}
    for c in configs:
        samples[id(c)] = res[(tuple(c.cuts), tuple(c.codecs))][c.prefill_tokens]
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
        out.append({"cuts": c.cuts, "codecs": c.codecs, "prefill_tokens": c.prefill_tokens, "role": c.role,
                    "predicted_ms": round(pred, 3), "measured_ms": round(meas, 3),
                    "measured_iqr_ms": [round(float(np.percentile(s, 25)), 3), round(float(np.percentile(s, 75)), 3)],
                    "abs_pct_error": round(100 * err, 2), **c.extra})
    return {"configs": len(errs), "mape": float(np.mean(errs)) if errs else None,
            "max_ape": float(np.max(errs)) if errs else None,
            "calibrated": {"first_device_overhead_ms": round(so, 4), "other_stage_overhead_ms": round(lo, 4),
                           "on": [f"cuts={c.cuts} T={c.prefill_tokens}" for c in cal]},
            "results": out}


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


def run_prediction(args: argparse.Namespace) -> dict:
    from splitnet.planner.profiles import load_model_profile

    try:
        from splitnet.runtime.launcher import launch_pipeline  # noqa: F401
        import splitnet.edge.sdk  # noqa: F401
    except ImportError as e:
        return {"status": "not_run", "reason": f"runtime not available: {e}"}
    t0 = time.perf_counter()
    if args.model_profile:
        model = load_model_profile(args.model_profile)
        prof_src = args.model_profile
    else:
        from splitnet.planner.profiler import profile_model

        model = profile_model("minilm", tokens=(1, 32, 64, 128), progress=False)
        prof_src = "measured in this run"
    res = measure_prediction(default_configs(model.num_blocks), loopback_runner("minilm"), model,
                             repeats=args.prediction_repeats)
    res.update({"status": "ok", "network": "loopback only (127.0.0.1, no tc shaping: not run as the netns suite)",
                "model": model.model, "model_profile": prof_src,
                "stage_processes": "splitnet.runtime.launcher, 1 torch thread each, on a 2-core host",
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
        lines.append(f"prediction: {p['configs']} configs, MAPE {100 * p['mape']:.1f} % ({p['network']})")
        for r in p["results"]:
            lines.append(f"  {r['role']:11s} cuts={r['cuts']} codecs={r['codecs']} T={r['prefill_tokens']}: "
                         f"predicted {r['predicted_ms']:.1f} ms, measured {r['measured_ms']:.1f} ms "
                         f"({r['abs_pct_error']:.1f} %)")
    else:
        lines.append(f"prediction: {p.get('status')} ({p.get('reason')})")
    lines.append(f"goals: {doc['goals']}")
    return "\n".join(lines)
