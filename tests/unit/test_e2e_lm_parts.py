"""The pure parts of `splitnet bench e2e --workload lm`: the codec byte fit, byte accounting per
phase, greedy agreement, the planner's decode model (the cost model's per-step round trips) and
the argument checks before any work."""

from __future__ import annotations

import argparse

import numpy as np
import pytest

from splitnet.bench import e2e, e2e_lm as LM, e2e_profile as EP
from splitnet.errors import ConfigError
from splitnet.planner.cost import Workload


def _args(*argv):
    p = argparse.ArgumentParser()
    e2e.add_arguments(p)
    return p.parse_args(["--workload", "lm", *argv])


def test_message_fit_reproduces_both_messages():
    bpt, bpm = LM.message_fit(5350.0, 196.0, 128)  # rvq 40x8 at cut 2 in bench lm: prefill message, decode message
    assert bpt * 128 + bpm == pytest.approx(5350.0) and bpt + bpm == pytest.approx(196.0)
    assert bpt > 0 and bpm > 0
    # a prefill dearer per token than the decode message's whole size: all bytes per token, prefill exact
    bpt, bpm = LM.message_fit(100.0, 500.0, 10)
    assert (bpt, bpm) == (10.0, 0.0)
    with pytest.raises(ValueError):
        LM.message_fit(10.0, 5.0, 1)


def test_per_token_ms_is_exact_for_the_workload():
    ms = LM.per_token_ms(2.0, 0.5, 128, 31)
    assert ms * (128 + 31) == pytest.approx(2.0 + 31 * 0.5)


def test_normalize_blocks_keeps_shares_and_whole():
    out = LM.normalize_blocks([1.0, 3.0], 2.0)
    assert out == pytest.approx([0.5, 1.5])
    assert LM.normalize_blocks([0.0, 0.0], 4.0) == [2.0, 2.0]


def test_reply_bytes_from_the_sdk_count():
    # 2 forward messages (prefill 400, one step 150) + 2 replies of 300
    assert LM.reply_bytes(400 + 150 + 2 * 300, 400.0, 150.0, 2) == pytest.approx(300.0)
    assert LM.reply_bytes(10.0, 400.0, 150.0, 2) == 0.0


def test_greedy_agreement_and_phase_bytes():
    assert LM.greedy_agreement([1, 2, 3, 4], [1, 2, 0, 4]) == 0.75
    assert LM.greedy_agreement([1, 2], [1, 2, 3, 4]) == 0.5  # a short continuation loses the rest
    with pytest.raises(ValueError):
        LM.greedy_agreement([1], [])
    out = {"link_prefill_bytes": [1000, 3000], "link_decode_bytes": [310, 930], "sdk_bytes": [5, 7]}
    b = LM.phase_bytes(out, prompt_tokens=10, new_tokens=32)
    assert b["link_prefill_bytes_per_request"] == 2000.0 and b["link_prefill_bytes_per_prompt_token"] == 200.0
    assert b["link_decode_bytes_per_request"] == 620.0 and b["link_decode_bytes_per_decoded_token"] == 20.0  # 31 steps
    assert b["sdk_bytes_per_request"] == 6.0


def test_lm_stats_latency_and_fidelity():
    ref = np.array([[1, 2, 3, 4], [5, 6, 7, 8]])
    out = {"total_ms": [100.0, 200.0, 300.0], "ttft_ms": [10.0, 20.0, 30.0], "prompt": [0, 1, 0],
           "tokens": [[1, 2, 3, 4], [5, 6, 0, 0], [1, 2, 3, 4]], "link_bytes_per_request": 50.0,
           "link_prefill_bytes": [1, 1, 1], "link_decode_bytes": [3, 3, 3], "sdk_bytes": [0, 0, 0]}
    s = LM.lm_stats(out, ref, prompt_tokens=4, new_tokens=4)
    assert s["p50_ms"] == 200.0 and s["ttft_p50_ms"] == 20.0 and s["requests"] == 3
    assert s["greedy_agreement"] == pytest.approx((1 + 0.5 + 1) / 3, abs=1e-4) and s["identical_continuations"] == pytest.approx(2 / 3, abs=1e-4)
    assert s["agree"] == [1.0, 0.5, 1.0]


def _profile(step_ms=1.0, prefill_ms=4.0, blocks=4, P=8):
    edge_t = {"prefill_block_ms": [prefill_ms] * blocks, "step_block_ms": [step_ms] * blocks}

    class BM:
        num_blocks = blocks

        class arch:
            config = {"n_embd": 16}

    rows = [{"cut": 1, "setting": "fp16", "prefill_message_bytes": 8 * 32 + 150.0, "decode_message_bytes": 32 + 150.0,
             "encode_prefill_ms": 0.0, "encode_step_ms": 0.0, "decode_prefill_ms": 0.0, "decode_step_ms": 0.0, "greedy_agreement": 1.0},
            {"cut": 1, "setting": "int2", "prefill_message_bytes": 8 * 4 + 150.0, "decode_message_bytes": 4 + 150.0,
             "encode_prefill_ms": 0.0, "encode_step_ms": 0.0, "decode_prefill_ms": 0.0, "decode_step_ms": 0.0, "greedy_agreement": 0.5}]
    by_block, bpm = LM.codec_costs_of(rows, P, 3)
    return LM.build_profile(BM, edge_t, P, by_block, bpm, ["fp16", "int2"], reply=100.0)


def test_decode_model_pays_one_round_trip_per_step():
    prof = _profile()
    wl = Workload(prefill_tokens=8, decode_steps=3)  # a prefill + 3 steps: 4 messages
    opts = [{"kind": "edge"}, {"kind": "cloud"}, {"kind": "split", "cut": 1, "setting": "fp16"}]
    fast = LM.predict_options(prof, EP.fleet_at(1000.0, 0.0, 1.0, 0.0), wl, opts, (200.0, 150.0), 0.99)
    slow = LM.predict_options(prof, EP.fleet_at(1000.0, 40.0, 1.0, 0.0), wl, opts, (200.0, 150.0), 0.99)
    # edge-only: 4 blocks x (prefill 4 + 3 steps x 1) ms, no network
    assert fast["edge-only"]["predicted_ms"] == pytest.approx(4 * (4.0 + 3 * 1.0))
    assert slow["edge-only"]["predicted_ms"] == fast["edge-only"]["predicted_ms"]
    for n in ("cloud-only", "split@1:fp16"):  # 4 messages, each one RTT (40 ms) there and back
        assert slow[n]["predicted_ms"] - fast[n]["predicted_ms"] == pytest.approx(4 * 40.0)
    # a slower edge device slows edge-only and the split's edge part only
    half = LM.predict_options(prof, EP.fleet_at(1000.0, 0.0, 1.0, 0.0, edge_speed_rel=0.5), wl, opts, (200.0, 150.0), 0.99)
    assert half["edge-only"]["predicted_ms"] == pytest.approx(2 * fast["edge-only"]["predicted_ms"])
    assert half["cloud-only"]["predicted_ms"] == pytest.approx(fast["cloud-only"]["predicted_ms"])
    assert half["split@1:fp16"]["predicted_ms"] - fast["split@1:fp16"]["predicted_ms"] == pytest.approx(4.0 + 3 * 1.0)


def test_bytes_enter_beyond_the_bucket_and_the_floor_holds():
    prof = _profile()
    wl = Workload(prefill_tokens=8, decode_steps=3)
    opts = [{"kind": "split", "cut": 1, "setting": "fp16"}, {"kind": "split", "cut": 1, "setting": "int2"}]
    fl = EP.fleet_at(0.01, 0.0, 1.0, 0.0)  # 10 kbit/s, no bucket: every byte counts
    p = LM.predict_options(prof, fl, wl, opts, (200.0, 150.0), 0.99)
    assert p["split@1:fp16"]["predicted_ms"] > p["split@1:int2"]["predicted_ms"]
    assert p["split@1:fp16"]["allowed"] and not p["split@1:int2"]["allowed"]  # 0.5 greedy agreement < 0.99
    # the byte difference: (8 + 3) tokens x 28 B at the goodput, as the cost model charges it
    diff = p["split@1:fp16"]["predicted_ms"] - p["split@1:int2"]["predicted_ms"]
    assert diff == pytest.approx(11 * 28 * 8 / (0.01 * EP.GOODPUT_FRACTION * 1e3))
    off = LM.predict_options(prof, fl, wl, opts, (200.0, 150.0), 0.99, {"split": 5.0})
    assert off["split@1:int2"]["predicted_ms"] == pytest.approx(p["split@1:int2"]["predicted_ms"] + 5.0)


def test_planner_goal():
    pts = [EP.compare_point({"a": {"predicted_ms": 100.0, "allowed": True}, "b": {"predicted_ms": 120.0, "allowed": True}},
                            {"a": 105.0, "b": 100.0})]
    g = LM.planner_goal(pts)
    assert g["choice_within_10pct_at_every_point"] and g["mape_all_options_within_15pct"] and g["met"]
    bad = [EP.compare_point({"a": {"predicted_ms": 100.0, "allowed": True}, "b": {"predicted_ms": 120.0, "allowed": True}},
                            {"a": 150.0, "b": 100.0})]
    assert not LM.planner_goal(bad)["met"]


def test_config_defaults_and_refusals():
    full, quick = LM.config(_args()), LM.config(_args("--quick"))
    assert full["codecs"] == list(LM.DEFAULT_CODECS) and full["new_tokens"] == 32 and full["prompt_tokens"] == 128
    assert full["cgroup_period_ms"] == LM.LM_CGROUP_PERIOD_MS and quick["requests"] < full["requests"]
    assert e2e._config(_args())["cgroup_period_ms"] == e2e.DEFAULT_CGROUP_PERIOD_MS  # the vision default is unchanged
    for bad in (["--codecs", "fp16,zstd"], ["--codecs", "int8:anchors=1"], ["--new-tokens", "1"], ["--requests", "0"],
                ["--bandwidths", "0"], ["--edge-cpu-fraction", "2"],
                ["--edge-cpu-fraction", "0.1"]):  # 0.5 ms of a 5 ms period: under the 1 ms smallest quota
        with pytest.raises(ConfigError):
            LM.config(_args(*bad))


def test_a_small_fraction_needs_a_longer_period():
    cfg = LM.config(_args("--edge-cpu-fraction", "0.1", "--cgroup-period-ms", "10"))
    assert cfg["edge_cpu_fraction"] * cfg["cgroup_period_ms"] >= e2e.MIN_QUOTA_MS
    from splitnet.bench.e2e_profile import CpuGroup

    assert CpuGroup.quota_us.fget(type("G", (), {"fraction": 0.1, "period_us": 10_000})()) == 1000


def test_vision_refuses_a_quota_under_a_millisecond_too():
    with pytest.raises(ConfigError, match="smallest quota"):
        e2e._config(_args("--edge-cpu-fraction", "0.02"))  # 0.4 ms of the vision default's 20 ms period
    assert e2e._config(_args("--edge-cpu-fraction", "0.05"))["edge_cpu_fraction"] == 0.05  # 1 ms of 20 ms


def test_unknown_codec_refused_before_any_work():
    with pytest.raises(ConfigError, match="zstd"):
        e2e.run(_args("--quick", "--codecs", "fp16,zstd"))
