"""`splitnet bench e2e --workload lm --quick` in namespace hosts: structure and invariants, never timings."""

from __future__ import annotations

import argparse
import math

import pytest

from splitnet.lab.netns import list_labs

pytestmark = [pytest.mark.netns, pytest.mark.slow, pytest.mark.timeout(900)]


@pytest.fixture(scope="module")
def stdlib_gpt():
    """The workload's model, trained here on first use (3-4 min on one core; a no-op once cached):
    a fresh machine has no trained stdlib-gpt, and the bench refuses to start without it."""
    from splitnet.model.train_lm import materialize_trained

    return materialize_trained("stdlib-gpt", progress=False)[0]


@pytest.fixture(scope="module")
def doc(tmp_path_factory, stdlib_gpt):
    from splitnet.bench import e2e

    p = argparse.ArgumentParser()
    e2e.add_arguments(p)
    plot = tmp_path_factory.mktemp("e2e-lm") / "e2e-lm.png"
    return e2e.run(p.parse_args(["--workload", "lm", "--quick", "--plot", str(plot)])), plot


def test_every_option_is_measured_at_every_point(doc):
    d, _ = doc
    cfg = d["config"]
    assert d["workload"] == "lm" and len(d["points"]) == len(cfg["bandwidths_mbit_s"]) * len(cfg["rtts_ms"]) == 2
    names = {"cloud-only", "edge-only"} | {f"split@{d['split_cut']}:{c}" for c in cfg["codecs"]}
    for p in d["points"]:
        assert set(p["options"]) == names
        for n, o in p["options"].items():
            assert o["requests"] == cfg["requests"]
            assert 0 < o["ttft_p50_ms"] < o["p50_ms"] <= o["p95_ms"]
            assert math.isfinite(o["predicted_ms"]) and o["predicted_ms"] > 0
            if n == "edge-only":
                assert o["sdk_bytes_per_request"] == 0
            else:  # both phases crossed the shaped link, counted by the veth
                assert o["link_prefill_bytes_per_request"] > 0 and o["link_decode_bytes_per_request"] > 0
                assert o["link_bytes_per_request"] >= 0.9 * (o["link_prefill_bytes_per_request"] + o["link_decode_bytes_per_request"])
        assert p["planner"]["planner_choice"] in names and p["planner"]["choice_over_best"] >= 1.0


def test_fidelity_and_bytes(doc):
    d, _ = doc
    cut = d["split_cut"]
    fid = d["fidelity_greedy_e2e"]
    assert fid["edge-only"] == 1.0 and fid["cloud-only"] == 1.0  # the whole model, in process and on the cloud stage
    assert fid[f"split@{cut}:fp16"] >= 0.95
    for p in d["points"]:  # fp16's prefill sends about twice int8's bytes over the same link
        o = p["options"]
        assert o[f"split@{cut}:fp16"]["link_prefill_bytes_per_request"] > 1.3 * o[f"split@{cut}:int8"]["link_prefill_bytes_per_request"]
        assert o[f"split@{cut}:int8"]["link_prefill_bytes_per_request"] > o["cloud-only"]["link_prefill_bytes_per_request"]
    assert [f["setting"] for f in d["fits"]] == [c for c in d["config"]["codecs"] if c.startswith("rvq")]
    assert "TRAINING" in d["data"]["calibration"] and "HELD-OUT" in d["data"]["measured_prompts"]
    assert d["data"]["files_shared_by_calibration_and_evaluation"] == []


def test_planner_summary_plot_and_cleanup(doc):
    import os

    d, plot = doc
    s = d["planner_summary"]
    assert s["points"] == 2 and s["mape_pct_all_options"] >= 0
    assert set(d["calibration_point"]["offsets_ms_per_request"]) == {"split", "cloud"}
    assert d["planner_model"]["workload"]["decode_steps"] == d["config"]["new_tokens"] - 1
    assert plot.exists() and plot.stat().st_size > 10_000
    assert not [lab for lab in list_labs() if lab["name"].startswith("e2e")]
    edge = d["edge_scaling"]["cgroups"]["edge"]
    assert edge["quota_us"] == edge["period_us"] // 4
    assert d["edge_scaling"]["cgroups"]["edge_throttling"]["nr_throttled"] > 0
    for g in d["edge_scaling"]["cgroups"].values():
        if isinstance(g, dict) and "path" in g:
            assert not os.path.exists(g["path"])
