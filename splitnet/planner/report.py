"""Human-readable output for plans: a table, a bandwidth sweep, and a chart."""

from __future__ import annotations

import math

from splitnet.planner.cost import Assignment, Workload, evaluate
from splitnet.planner.plan import Plan
from splitnet.planner.profiles import Fleet, ModelProfile
from splitnet.planner.solver import InfeasibleError, solve


def _fmt_bytes(n: float) -> str:
    if not math.isfinite(n):
        return "inf"
    for unit, f in (("MB", 1e6), ("kB", 1e3)):
        if n >= f:
            return f"{n / f:.1f} {unit}"
    return f"{n:.0f} B"


def _fmt_ms(x: float | None) -> str:
    if x is None:
        return "-"
    return f"{x:.2f}" if x < 100 else f"{x:.0f}"


def _blocks(a: int, b: int) -> str:
    return f"{a}" if b - a == 1 else f"{a}-{b - 1}"


def format_plan(plan: Plan, fleet: Fleet | None = None) -> str:
    """The plan as a table: one row per stage, then the link out of it, then the totals."""
    p = plan.predicted
    wl = plan.workload or {}
    head = (f"plan for {plan.model} ({plan.num_blocks} blocks, model hash {plan.model_hash or '-'}) on fleet "
            f"{plan.fleet or '-'}\nobjective {plan.objective}; request = {wl.get('prefill_tokens', '?')} prefill tokens"
            f" + {wl.get('decode_steps', 0)} decode steps; fidelity floor {wl.get('fidelity_floor', 0)}")
    rows = [("stage", "blocks", "device", "runtime", "compute ms", "codec ms", "codec out", "B/token", "link",
             "link ms", "link bytes")]
    for i, s in enumerate(plan.stages):
        rt = fleet.device(s.device).runtime if fleet else ""
        comp = _fmt_ms(p.per_stage_compute_ms[i]) if p else "-"
        cms = _fmt_ms(p.per_stage_codec_ms[i]) if p and p.per_stage_codec_ms else "-"
        if i < len(plan.cuts):
            c = plan.cuts[i]
            nxt = plan.stages[i + 1].device
            link = f"{s.device}->{nxt}"
            lms = _fmt_ms(p.per_link_ms[i]) if p else "-"
            lb = _fmt_bytes(p.per_link_bytes[i]) if p else "-"
            rows.append((str(i), _blocks(*s.blocks), s.device, rt, comp, cms, c.codec, f"{c.bytes_per_token:.0f}",
                         link, lms, lb))
        else:
            back = plan.stages[0].device
            link = f"{s.device}->{back} (result)" if s.device != back else "(result stays local)"
            rows.append((str(i), _blocks(*s.blocks), s.device, rt, comp, cms, "-", "-", link,
                         _fmt_ms(p.return_ms) if p else "-", _fmt_bytes(p.return_bytes) if p else "-"))
    widths = [max(len(r[k]) for r in rows) for k in range(len(rows[0]))]
    lines = [head, ""]
    for j, r in enumerate(rows):
        lines.append("  ".join(x.ljust(widths[k]) if k in (2, 3, 6, 8) else x.rjust(widths[k]) for k, x in enumerate(r)))
        if j == 0:
            lines.append("  ".join("-" * w for w in widths))
    if p:
        lines.append("")
        extra = f" (prefill {_fmt_ms(p.prefill_ms)} ms, {_fmt_ms(p.per_token_ms)} ms per decoded token)" \
            if p.per_token_ms is not None else ""
        lines.append(f"predicted latency   {_fmt_ms(p.latency_ms)} ms per request{extra}")
        lines.append(f"predicted throughput {p.throughput_rps:.1f} requests/s (bottleneck: {p.bottleneck})")
        lines.append(f"bytes on the wire   {_fmt_bytes(sum(p.per_link_bytes) + p.return_bytes)} per request")
    return "\n".join(lines)


def _summary(asg: Assignment) -> str:
    parts = []
    for i, (d, a, b) in enumerate(asg.stages):
        parts.append(f"{d}[{_blocks(a, b)}]")
        if i < len(asg.codecs):
            parts.append(f"-{asg.codecs[i]}->")
    return " ".join(parts)


def sweep_bandwidth(model: ModelProfile, fleet: Fleet, wl: Workload, objective: str, bandwidths: list[float],
                    mode: str = "auto") -> list[dict]:
    """Best plan for each uplink bandwidth (Mbit/s)."""
    out = []
    for bw in bandwidths:
        f = fleet.with_uplink_bandwidth(bw)
        try:
            sol = solve(model, f, wl, objective, mode)
        except InfeasibleError as e:
            out.append({"uplink_mbit_s": bw, "error": str(e)})
            continue
        ev = evaluate(model, f, wl, sol.assignment)
        out.append({"uplink_mbit_s": bw, "plan": _summary(sol.assignment),
                    "stages": [list(s) for s in sol.assignment.stages], "codecs": list(sol.assignment.codecs),
                    "latency_ms": ev.latency_ms, "throughput_rps": ev.throughput_rps,
                    "bytes": sum(ev.per_link_bytes) + ev.return_bytes})
    return out


def format_sweep(rows: list[dict], fleet: Fleet) -> str:
    links = ", ".join(f"{ln.src}-{ln.dst}" for ln in fleet.uplinks())
    lines = [f"uplink sweep (varying {links})", ""]
    hdr = ("uplink Mbit/s", "latency ms", "req/s", "wire bytes", "best plan")
    table = [hdr]
    for r in rows:
        if "error" in r:
            table.append((f"{r['uplink_mbit_s']:g}", "-", "-", "-", r["error"]))
        else:
            table.append((f"{r['uplink_mbit_s']:g}", _fmt_ms(r["latency_ms"]), f"{r['throughput_rps']:.1f}",
                          _fmt_bytes(r["bytes"]), r["plan"]))
    w = [max(len(t[k]) for t in table) for k in range(len(hdr))]
    for j, t in enumerate(table):
        lines.append("  ".join(x.rjust(w[k]) if k < 4 else x for k, x in enumerate(t)))
        if j == 0:
            lines.append("  ".join("-" * x for x in w))
    return "\n".join(lines)


def cut_curve(model: ModelProfile, fleet: Fleet, wl: Workload, partner: str) -> list[tuple[int, float, str]]:
    """Latency of the two-stage split source[0..k] -> partner[k+1..] for every cut k (best codec at each),
    and k = L-1 meaning everything on the source."""
    src = fleet.source.name
    L = model.num_blocks
    pts = []
    for k in range(L - 1):
        best = (math.inf, "")
        for c in model.codecs:
            ev = evaluate(model, fleet, wl, Assignment([(src, 0, k + 1), (partner, k + 1, L)], [c.name]))
            if ev.feasible and ev.latency_ms < best[0]:
                best = (ev.latency_ms, c.name)
        pts.append((k, best[0], best[1]))
    ev = evaluate(model, fleet, wl, Assignment([(src, 0, L)], []))
    pts.append((L - 1, ev.latency_ms if ev.feasible else math.inf, "local"))
    return pts


def _chosen_cut(plan: Plan, src: str, partner: str, L: int) -> int | None:
    """Where the left panel's x axis has the plan: its cut when it is the two-stage split
    source -> partner it draws, L-1 when it runs all on the source; None for any other plan."""
    if len(plan.stages) == 1 and plan.stages[0].device == src:
        return L - 1
    if len(plan.stages) == 2 and plan.stages[0].device == src and plan.stages[1].device == partner:
        return plan.stages[0].blocks[1] - 1
    return None


def _mark_chosen(ax, plan: Plan, src: str, partner: str, L: int) -> None:
    """The chosen plan as one point at its own cut (at the fleet's bandwidth), never a line
    across cuts it did not choose; a plan the panel cannot show is named in a note instead."""
    latency = plan.predicted.latency_ms
    k = _chosen_cut(plan, src, partner, L)
    if k is not None:
        ax.plot([k], [latency], marker="X", ms=12, color="k", ls="none",
                label=f"chosen plan: cut after {k} ({latency:.0f} ms at the fleet's uplink)" if k < L - 1 else f"chosen plan: all on {src} ({latency:.0f} ms)")
        return
    route = " -> ".join(f"{st.device}[{_blocks(*st.blocks)}]" for st in plan.stages)
    ax.text(0.02, 0.02, f"chosen plan ({len(plan.stages)} stages, not a cut on this panel): {route}, {latency:.0f} ms",
            transform=ax.transAxes, fontsize=7, va="bottom")


def plot_plan(plan: Plan, model: ModelProfile, fleet: Fleet, wl: Workload, bandwidths: list[float], path: str,
              mode: str = "auto") -> None:
    """Two panels: latency against the cut point (source -> partner) at each uplink bandwidth, and the
    optimal plan's latency against bandwidth."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    src = fleet.source.name
    # the curves vary the uplink, so cut towards the device across it (else the plan's second device)
    across = [ln.dst if ln.src == src else ln.src for ln in fleet.uplinks() if src in (ln.src, ln.dst)]
    others = [s.device for s in plan.stages if s.device != src]
    partner = (across or others or [d.name for d in fleet.devices if d.name != src and fleet.link(src, d.name)]
               or [None])[0]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.8))
    L = model.num_blocks
    if partner is not None:
        for bw in bandwidths:
            f = fleet.with_uplink_bandwidth(bw)
            pts = cut_curve(model, f, wl, partner)
            xs = [k for k, v, _ in pts if math.isfinite(v)]
            ys = [v for k, v, _ in pts if math.isfinite(v)]
            line, = ax1.plot(xs, ys, marker="o", ms=3, label=f"{bw:g} Mbit/s")
            if ys:
                i = min(range(len(ys)), key=ys.__getitem__)
                ax1.plot([xs[i]], [ys[i]], marker="*", ms=14, color=line.get_color())
        if plan.predicted is not None:
            _mark_chosen(ax1, plan, src, partner, L)
        ax1.set_xticks(range(L))
        ax1.set_xticklabels([str(k) for k in range(L - 1)] + ["all\nlocal"])
        ax1.set_title(f"two stages: {src} -> {partner}, cut after block k (best codec; * = best cut)")
    else:
        ax1.text(0.5, 0.5, "single-device fleet: no cut to choose", ha="center", transform=ax1.transAxes)
    ax1.set_xlabel("cut after block")
    ax1.set_ylabel("predicted latency per request (ms)")
    ax1.set_yscale("log")
    ax1.grid(alpha=0.3)
    ax1.legend(title="uplink", fontsize=8)

    dense = sorted(set(bandwidths) | {x for x in (0.5, 1, 2, 3, 5, 8, 10, 15, 20, 30, 50, 75, 100, 200, 500, 1000)
                                      if min(bandwidths) / 2 <= x <= max(bandwidths) * 2})
    rows = sweep_bandwidth(model, fleet, wl, plan.objective, dense, mode)
    ok = [r for r in rows if "error" not in r]
    key = "latency_ms" if plan.objective == "latency" else "throughput_rps"
    ax2.plot([r["uplink_mbit_s"] for r in ok], [r[key] for r in ok], marker="o", color="k")
    prev = None
    for r in ok:
        if r["plan"] != prev:
            ax2.annotate(r["plan"], (r["uplink_mbit_s"], r[key]), fontsize=7, rotation=20,
                         xytext=(4, 6), textcoords="offset points")
            prev = r["plan"]
    ax2.set_xscale("log")
    ax2.set_xlabel("uplink bandwidth (Mbit/s)")
    ax2.set_ylabel("latency (ms)" if plan.objective == "latency" else "throughput (requests/s)")
    ax2.set_title(f"optimal plan ({plan.objective}) vs uplink; labels = plan where it changes")
    ax2.grid(alpha=0.3, which="both")
    fig.suptitle(f"{plan.model} on {fleet.name}: {wl.prefill_tokens} prefill tokens + {wl.decode_steps} decode steps",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


__all__ = ["cut_curve", "format_plan", "format_sweep", "plot_plan", "sweep_bandwidth"]
