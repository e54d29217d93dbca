"""The plot of ``splitnet bench e2e --plot FILE``: p50 latency vs bandwidth per option, one panel
per RTT, with the crossovers of cloud-only and the fastest split marked: with any codec (red) and
with a codec that keeps the fidelity floor (purple); the crossover of cloud-only and edge-only,
measured (green) and predicted by the planner (grey); the planner's choice circled at its measured
p50, and its predicted latency as an x."""

from __future__ import annotations

import math


def crossover_mbit_s(bandwidths: list[float], cloud_ms: list[float], split_ms: list[float]) -> float | None:
    """The bandwidth (interpolated on a log axis) where cloud-only and split swap places, or None
    when one of them is faster at every measured bandwidth. ``bandwidths`` ascending."""
    diff = [c - s for c, s in zip(cloud_ms, split_ms)]
    for i in range(len(diff) - 1):
        if diff[i] == 0:
            return bandwidths[i]
        if diff[i] * diff[i + 1] < 0:
            a, b = math.log(bandwidths[i]), math.log(bandwidths[i + 1])
            t = diff[i] / (diff[i] - diff[i + 1])
            return round(math.exp(a + t * (b - a)), 3)
    return bandwidths[-1] if diff and diff[-1] == 0 else None


def plot_latency(doc: dict, path: str, *, title: str = "EfficientNet-Lite0", ylabel: str = "p50 latency per image (ms)") -> dict:
    """Draw the figure to ``path``; return {rtt: crossover Mbit/s or None} (cloud-only vs fastest split).
    ``title`` names the model in each panel's title, ``ylabel`` what the latency is of."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rtts = sorted({p["rtt_ms"] for p in doc["points"]})
    fig, axes = plt.subplots(1, len(rtts), figsize=(7 * len(rtts), 5), squeeze=False)
    crossings: dict[str, float | None] = {}
    crossings_allowed: dict[str, float | None] = {}
    crossings_edge: dict[str, float | None] = {}
    crossings_edge_pred: dict[str, float | None] = {}
    for ax, rtt in zip(axes[0], rtts):
        pts = sorted((p for p in doc["points"] if p["rtt_ms"] == rtt), key=lambda p: p["bandwidth_mbit_s"])
        bws = [p["bandwidth_mbit_s"] for p in pts]
        names = list(pts[0]["options"])
        for n in names:
            ys = [p["options"][n]["p50_ms"] for p in pts]
            style = {"cloud-only": dict(lw=2.5, color="black"), "edge-only": dict(lw=2.5, color="tab:green", ls="--")}.get(n, dict(lw=1.2, marker="o", ms=3))
            ax.plot(bws, ys, label=n, **style)
        cloud = [p["options"]["cloud-only"]["p50_ms"] for p in pts]
        fastest_split = [min(o["p50_ms"] for k, o in p["options"].items() if k.startswith("split@")) for p in pts]
        x = crossover_mbit_s(bws, cloud, fastest_split)
        crossings[str(rtt)] = x
        if x is not None:
            ax.axvline(x, color="red", ls=":", lw=1.5)
            ax.annotate(f"crossover {x:g} Mbit/s (any codec)", (x, max(cloud)), color="red", rotation=90, va="top", ha="right", fontsize=8)
        kept = [[o["p50_ms"] for k, o in p["options"].items() if k.startswith("split@") and o.get("allowed")] for p in pts]
        if all(kept):
            xa = crossover_mbit_s(bws, cloud, [min(v) for v in kept])
            crossings_allowed[str(rtt)] = xa
            if xa is not None:
                ax.axvline(xa, color="purple", ls="-.", lw=1.5)
                ax.annotate(f"crossover {xa:g} Mbit/s (codecs keeping the floor)", (xa, max(cloud)), color="purple", rotation=90,
                            va="top", ha="left", fontsize=8)
        else:
            crossings_allowed[str(rtt)] = None
        if "edge-only" in names:
            edge = [p["options"]["edge-only"]["p50_ms"] for p in pts]
            xe = crossings_edge[str(rtt)] = crossover_mbit_s(bws, cloud, edge)
            xp = crossings_edge_pred[str(rtt)] = crossover_mbit_s(bws, [p["options"]["cloud-only"]["predicted_ms"] for p in pts],
                                                                  [p["options"]["edge-only"]["predicted_ms"] for p in pts])
            for xv, color, what in ((xe, "tab:green", "measured"), (xp, "grey", "predicted")):
                if xv is not None:
                    ax.axvline(xv, color=color, ls="--", lw=1.2)
                    ax.annotate(f"cloud-only = edge-only at {xv:g} Mbit/s ({what})", (xv, min(cloud)), color=color, rotation=90,
                                va="bottom", ha="right" if what == "measured" else "left", fontsize=8)
        chosen = [p["options"][p["planner"]["planner_choice"]]["p50_ms"] for p in pts]
        ax.scatter(bws, chosen, s=90, facecolors="none", edgecolors="red", label="planner's choice (measured)", zorder=5)
        ax.scatter(bws, [p["planner"]["predicted_ms"] for p in pts], s=40, marker="x", color="red",
                   label="planner's choice (predicted)", zorder=6)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("link bandwidth (Mbit/s)")
        ax.set_ylabel(ylabel)
        ax.set_title(f"{title}, RTT {rtt:g} ms (split at cut {doc['split_cut']})")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return {"file": path, "crossover_cloud_vs_fastest_split_mbit_s": crossings,
            "crossover_cloud_vs_fastest_split_keeping_floor_mbit_s": crossings_allowed,
            "crossover_cloud_vs_edge_mbit_s": crossings_edge, "crossover_cloud_vs_edge_predicted_mbit_s": crossings_edge_pred}
