"""Solvers: dynamic programming for minimum latency and maximum throughput, brute force to check them.

The DP runs over an *ordered chain* of devices: the first stage sits on the chain's first device and
every later stage on a later device of the chain (devices may be skipped). Its state is
``(b, j, c_in)``: the next stage starts at block ``b`` on chain position ``j`` and its input arrives
through codec ``c_in``. ``c_in`` is part of the state because a device's busy time (throughput)
includes decoding its input as well as encoding its output.

* latency: shortest path over the DAG of states (sum of stage, cut and return costs);
* throughput: bottleneck path (min over paths of the max resource time), then, among the plans that
  reach that bottleneck, the minimum-latency one (a shortest path restricted to edges under the cap).

Both are exact for the cost model in :mod:`splitnet.planner.cost`. Device selection and ordering:
``mode="search"`` runs the chain DP for every first device and every ordering of the others (small
fleets), ``mode="chain"`` uses the fleet file's order (edge first, cloud last), ``"auto"`` searches up
to :data:`SEARCH_MAX_DEVICES` devices.

Every step is vectorised over (chain position, codec, stage end, next position, next codec); a
solve over 8 devices x 80 blocks takes tens of milliseconds on one core.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import numpy as np

from splitnet.errors import ConfigError
from splitnet.planner.cost import INF, Assignment, Tables, Workload, stage_memory_bytes, tables
from splitnet.planner.profiles import Fleet, ModelProfile

OBJECTIVES = ("latency", "throughput")
MODES = ("auto", "chain", "search")
SEARCH_MAX_DEVICES = 5
_REL_TOL = 1e-9


@dataclass
class Solution:
    """The solver's answer: a placement and its objective values (per request, ms)."""

    assignment: Assignment
    latency_ms: float
    bottleneck_ms: float
    objective: str
    orders_tried: int

    @property
    def value(self) -> float:
        return self.latency_ms if self.objective == "latency" else self.bottleneck_ms


class InfeasibleError(ConfigError):
    """No placement satisfies memory, links and fidelity; the message names what does not fit."""


# ----------------------------------------------------------------------------- the chain DP
def _chain_dp(t: Tables, order: list[int], objective: str, cap: float = INF):
    """Best placement over chain ``order`` (first stage on order[0]).

    objective "latency": minimise latency using only resources whose busy time is <= cap.
    objective "bottleneck": minimise the busiest resource.
    Returns (value, stages [(device idx, a, b)], codec idx per cut) or None.
    """
    L = t.num_blocks
    J = len(order)
    C = len(t.codecs)
    CI = C + 1  # incoming codec index C = "no cut before" (the first stage)
    o = np.asarray(order)
    sp = t.speed[o]
    comp = t.comp[o]  # (J, K, K)
    # codec ms scaled by device: enc on the sender, dec on the receiver
    enc = t.enc[None, :, :] / sp[:, None, None]  # (J, K, C)
    dec = np.concatenate([t.dec, np.zeros((L + 1, 1))], axis=1)[None] / sp[:, None, None]  # (J, K, CI)
    llat = t.link_lat[:, :, o][:, :, :, o]  # (K, C, J, J')
    lbusy = t.link_busy[:, :, o][:, :, :, o]
    fwd = np.triu(np.ones((J, J), dtype=bool), k=1)  # j' > j
    llat = np.where(fwd[None, None], llat, INF)
    lbusy = np.where(fwd[None, None], lbusy, INF)
    rlat = t.ret_lat[o, o[0]]  # (J,)
    rbusy = t.ret_busy[o, o[0]]
    bott = objective == "bottleneck"

    best = np.full((L + 1, J, CI), INF)
    back = np.full((L + 1, J, CI, 3), -1, dtype=np.int64)
    best[0, 0, C] = 0.0
    final_val, final_from = INF, None
    for b in range(L):
        v = best[b]  # (J, CI)
        if not np.isfinite(v).any():
            continue
        # stage [b, e) on j with input codec ci: compute (J, E) for e in b+1..L
        cp = comp[:, b, b + 1:]  # (J, E)
        busy_in = dec[:, b, :]  # (J, CI)
        # -- final stage e = L
        c_last = cp[:, -1]  # (J,)
        if bott:
            fin = np.maximum(np.maximum(v, (c_last[:, None] + busy_in)), rbusy[:, None])
        else:
            ok = (c_last[:, None] + busy_in <= cap) & (rbusy[:, None] <= cap)
            fin = np.where(ok, v + c_last[:, None] + rlat[:, None], INF)
        idx = np.unravel_index(np.argmin(fin), fin.shape)
        if fin[idx] < final_val:
            final_val, final_from = fin[idx], (b, int(idx[0]), int(idx[1]))
        if b + 1 >= L:
            continue
        # -- a cut at e in b+1..L-1 with codec c to position j'
        ce = cp[:, :-1]  # (J, E)
        e_sl = slice(b + 1, L)
        enc_e = enc[:, e_sl, :]  # (J, E, C)
        dec_e = dec[:, e_sl, :C]  # (J', E, C)
        stage_busy = busy_in[:, :, None, None] + (ce[:, :, None] + enc_e)[:, None]  # (J, CI, E, C)
        if bott:
            lb = np.transpose(lbusy[e_sl], (2, 0, 1, 3))  # (J, E, C, J')
            cand = np.maximum(np.maximum(v[:, :, None, None], stage_busy)[..., None], lb[:, None])
        else:
            ll = np.transpose(llat[e_sl], (2, 0, 1, 3))  # (J, E, C, J')
            lb = np.transpose(lbusy[e_sl], (2, 0, 1, 3))
            add = (ce[:, :, None] + enc_e)[..., None] + ll + np.transpose(dec_e, (1, 2, 0))[None]  # (J,E,C,J')
            cand = (v[:, :, None, None, None] + add[:, None])
            ok = (stage_busy <= cap)[..., None] & (lb <= cap)[:, None]
            cand = np.where(ok, cand, INF)
        # cand: (J, CI, E, C, J') -> minimise over (J, CI)
        E = L - b - 1
        flat = cand.reshape(J * CI, E, C, J)
        am = np.argmin(flat, axis=0)  # (E, C, J')
        mv = np.take_along_axis(flat, am[None], axis=0)[0]
        tgt = np.transpose(mv, (0, 2, 1))  # (E, J', C)
        amt = np.transpose(am, (0, 2, 1))
        cur = best[b + 1:L, :, :C]
        better = tgt < cur
        if better.any():
            cur[better] = tgt[better]
            bk = back[b + 1:L, :, :C]
            jj, cc = np.divmod(amt, CI)
            bk[..., 0][better] = b
            bk[..., 1][better] = jj[better]
            bk[..., 2][better] = cc[better]
    if final_from is None or not math.isfinite(final_val):
        return None
    # walk back
    stages, codecs = [], []
    b, j, ci = final_from
    end = L
    while True:
        stages.append((int(o[j]), b, end))
        if b == 0:
            break
        codecs.append(ci)
        pb, pj, pci = back[b, j, ci]
        end, b, j, ci = b, int(pb), int(pj), int(pci)
    stages.reverse()
    codecs.reverse()
    return float(final_val), stages, codecs


def _orders(t: Tables, mode: str) -> list[list[int]]:
    D = len(t.devices)
    if mode == "auto":
        mode = "search" if D <= SEARCH_MAX_DEVICES else "chain"
    firsts = [i for i in range(D) if t.first_ok[i]]
    if mode == "chain":
        return [[f] + list(range(f + 1, D)) for f in firsts]
    if mode == "search":
        return [[f] + list(p) for f in firsts for p in itertools.permutations([i for i in range(D) if i != f])]
    raise ConfigError(f"solver mode must be one of {', '.join(MODES)}, got {mode!r}")


def _to_assignment(t: Tables, stages, codecs) -> Assignment:
    return Assignment([(t.devices[d], a, b) for d, a, b in stages], [t.codecs[c] for c in codecs])


def _path_values(t: Tables, stages, codecs) -> tuple[float, float]:
    """(latency, bottleneck) of a DP path, from the shared tables."""
    lat, busy = 0.0, []
    C = len(t.codecs)
    for i, (d, a, b) in enumerate(stages):
        s = t.comp[d, a, b]
        lat += s
        bz = s
        if i > 0:
            dd = t.dec[a, codecs[i - 1]] / t.speed[d]
            lat += dd
            bz += dd
        if i < len(stages) - 1:
            c = codecs[i]
            nd = stages[i + 1][0]
            e = t.enc[b, c] / t.speed[d]
            lat += e + t.link_lat[b, c, d, nd]
            bz += e
            busy.append(t.link_busy[b, c, d, nd])
        busy.append(bz)
    lat += t.ret_lat[stages[-1][0], stages[0][0]]
    busy.append(t.ret_busy[stages[-1][0], stages[0][0]])
    del C
    return float(lat), float(max(busy))


def solve_tables(t: Tables, objective: str = "latency", mode: str = "auto") -> Solution | None:
    if objective not in OBJECTIVES:
        raise ConfigError(f"objective must be one of {', '.join(OBJECTIVES)}, got {objective!r}")
    orders = _orders(t, mode)
    if objective == "latency":
        best = None
        for od in orders:
            r = _chain_dp(t, od, "latency")
            if r and (best is None or r[0] < best[0]):
                best = r
        if best is None:
            return None
        lat, bott = _path_values(t, best[1], best[2])
        return Solution(_to_assignment(t, best[1], best[2]), lat, bott, objective, len(orders))
    # throughput: minimal bottleneck, then minimal latency under it
    vals = []
    for od in orders:
        r = _chain_dp(t, od, "bottleneck")
        vals.append(r[0] if r else INF)
    tstar = min(vals) if vals else INF
    if not math.isfinite(tstar):
        return None
    cap = tstar * (1 + _REL_TOL) + 1e-12
    best = None
    for od, v in zip(orders, vals):
        if v > cap:
            continue
        r = _chain_dp(t, od, "latency", cap=cap)
        if r and (best is None or r[0] < best[0]):
            best = r
    if best is None:  # cannot happen: the bottleneck path itself is under the cap
        raise RuntimeError("throughput DP lost its bottleneck path")
    lat, bott = _path_values(t, best[1], best[2])
    return Solution(_to_assignment(t, best[1], best[2]), lat, bott, objective, len(orders))


def explain_infeasible(model: ModelProfile, fleet: Fleet, wl: Workload) -> str:
    """Say what does not fit, for the error message of an infeasible fleet."""
    L = model.num_blocks
    mib = 2**20
    caps = {d.name: d.memory_bytes for d in fleet.devices}
    firsts = [d for d in fleet.devices if d.can_host_first_stage]
    lines = []
    for i in range(L):
        need = stage_memory_bytes(model, wl, i, i + 1)
        if not any(need <= c for c in caps.values()):
            lines.append(f"block {i} alone needs {need / mib:.1f} MiB (weights + KV cache for {wl.tokens} tokens x "
                         f"{wl.concurrent_requests} requests) but the largest device "
                         f"({max(caps, key=caps.get)}) has {max(caps.values()) / mib:.1f} MiB")
    e0 = stage_memory_bytes(model, wl, 0, 1)
    if not any(e0 <= d.memory_bytes for d in firsts):
        lines.append(f"the first stage (embed + block 0) needs {e0 / mib:.1f} MiB but the devices allowed to host it "
                     f"({', '.join(d.name for d in firsts)}) have at most "
                     f"{max(d.memory_bytes for d in firsts) / mib:.1f} MiB")
    total = stage_memory_bytes(model, wl, 0, L)
    if total > sum(caps.values()):
        lines.append(f"the model needs {total / mib:.1f} MiB in all; the fleet has {sum(caps.values()) / mib:.1f} MiB")
    allowed = [c.name for c in model.codecs if all(model.cut_codec_cost(k, c)["fidelity"] >= wl.fidelity_floor
                                                   for k in range(L - 1))]
    if not allowed and L > 1:
        lines.append(f"no codec reaches the fidelity floor {wl.fidelity_floor} at every cut")
    if not lines:
        lines.append("the memory that fits the model is on devices the links cannot chain in order from the first "
                     "device (check links, device order and memory)")
    return "no feasible plan: " + "; ".join(lines)


def solve(model: ModelProfile, fleet: Fleet, wl: Workload | None = None, objective: str = "latency",
          mode: str = "auto") -> Solution:
    """Optimal placement for ``objective``; raises :class:`InfeasibleError` naming what does not fit."""
    wl = wl or Workload()
    t = tables(model, fleet, wl)
    sol = solve_tables(t, objective, mode)
    if sol is None:
        raise InfeasibleError(explain_infeasible(model, fleet, wl))
    return sol


# ----------------------------------------------------------------------------- brute force
def brute_force(t: Tables, objective: str = "latency", mode: str = "auto") -> tuple[float, float] | None:
    """(latency, bottleneck) of the best placement by enumerating every placement in the DP's space.

    For each number of stages, device sequence and codec per cut, every set of cut points is
    evaluated at once (vectorised over the cut sets). Exponential: for small instances only.
    Throughput ties are broken by latency, as the DP does.
    """
    L = t.num_blocks
    D = len(t.devices)
    if mode == "auto":
        mode = "search" if D <= SEARCH_MAX_DEVICES else "chain"
    seqs: list[tuple[int, ...]] = []
    for k in range(1, min(D, L) + 1):
        if mode == "chain":
            for f in range(D):
                if t.first_ok[f]:
                    seqs += [(f,) + rest for rest in itertools.combinations(range(f + 1, D), k - 1)]
        else:
            seqs += [p for p in itertools.permutations(range(D), k) if t.first_ok[p[0]]]
    best_lat, best_bott = INF, INF
    C = len(t.codecs)
    cut_sets: dict[int, np.ndarray] = {}
    for seq in seqs:
        k = len(seq)
        if k not in cut_sets:
            combos = list(itertools.combinations(range(1, L), k - 1))
            cs = np.array(combos, dtype=np.int64).reshape(len(combos), k - 1)
            n = cs.shape[0]
            cut_sets[k] = np.concatenate([np.zeros((n, 1), np.int64), cs, np.full((n, 1), L, np.int64)], axis=1)
        bnd = cut_sets[k]
        base_lat = np.zeros(bnd.shape[0])
        stage_c = []
        for i, d in enumerate(seq):
            s = t.comp[d, bnd[:, i], bnd[:, i + 1]]
            stage_c.append(s)
            base_lat = base_lat + s
        rl = t.ret_lat[seq[-1], seq[0]]
        rb = t.ret_busy[seq[-1], seq[0]]
        for cods in itertools.product(range(C), repeat=k - 1):
            lat = base_lat + rl
            busy = [stage_c[i].copy() for i in range(k)]
            lbusy = [np.full(bnd.shape[0], rb)]
            for i, c in enumerate(cods):
                kk = bnd[:, i + 1]
                e = t.enc[kk, c] / t.speed[seq[i]]
                dd = t.dec[kk, c] / t.speed[seq[i + 1]]
                lat = lat + e + t.link_lat[kk, c, seq[i], seq[i + 1]] + dd
                busy[i] = busy[i] + e
                busy[i + 1] = busy[i + 1] + dd
                lbusy.append(t.link_busy[kk, c, seq[i], seq[i + 1]])
            bott = np.max(np.stack(busy + lbusy), axis=0)
            if objective == "latency":
                i = int(np.argmin(lat))
                if lat[i] < best_lat:
                    best_lat, best_bott = float(lat[i]), float(bott[i])
            else:
                m = float(np.min(bott))
                if not math.isfinite(m):
                    continue
                cap = m * (1 + _REL_TOL) + 1e-12
                lm = float(np.min(np.where(bott <= cap, lat, INF)))
                if m < best_bott * (1 - _REL_TOL) - 1e-12:
                    best_bott, best_lat = m, lm
                elif m <= best_bott * (1 + _REL_TOL) + 1e-12:
                    best_bott, best_lat = min(best_bott, m), min(best_lat, lm)
    if not math.isfinite(best_lat if objective == "latency" else best_bott):
        return None
    return best_lat, best_bott


def count_placements(t: Tables, mode: str = "auto") -> int:
    """How many placements brute force enumerates (for reports)."""
    L, D, C = t.num_blocks, len(t.devices), len(t.codecs)
    if mode == "auto":
        mode = "search" if D <= SEARCH_MAX_DEVICES else "chain"
    total = 0
    nf = int(t.first_ok.sum())
    for k in range(1, min(D, L) + 1):
        if mode == "chain":
            nseq = sum(math.comb(D - f - 1, k - 1) for f in range(D) if t.first_ok[f])
        else:
            nseq = nf * math.perm(D - 1, k - 1)
        total += nseq * math.comb(L - 1, k - 1) * C ** (k - 1)
    return total
