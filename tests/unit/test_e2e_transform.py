"""`splitnet bench e2e` with the transform codec: fitted on whole calibration maps in the tail's
Fisher metric (as `bench vision` fits it), fidelity per point on all and on confident crops, and
the vision bar with the confident-crop figure beside it (never instead of it)."""

from __future__ import annotations

import numpy as np
import pytest

from splitnet.bench import e2e
from splitnet.codecs import make_codec
from splitnet.codecs.sensitivity import OutputSensitivity


def _maps(n=24, t=49, c=8, seed=0):
    rng = np.random.default_rng(seed)
    base = rng.normal(size=(n, 1, c)) + 0.3 * rng.normal(size=(n, t, c))
    return np.ascontiguousarray(base, dtype=np.float32)


def test_transform_is_fitted_on_whole_maps_in_the_given_metric():
    maps = _maps()
    c = maps.shape[-1]
    sens = OutputSensitivity(np.diag(np.linspace(0.1, 10.0, c)), np.linspace(4.0, 0.5, maps.shape[1]), maps.shape[0], 4)
    fisher = make_codec("transform", step=2)
    e2e._fit(fisher, "transform", maps, sens)
    assert fisher.positions == maps.shape[1]  # whole 7x7 maps, not flat vectors
    flat = make_codec("transform", step=2, metric="mse")
    e2e._fit(flat, "transform", maps, None)
    # the metric changes the codec: a different KLT and per-frequency steps
    assert fisher.codebook_hash != flat.codebook_hash
    assert not np.allclose(fisher.steps[0], fisher.steps[-1]) and np.allclose(flat.steps[0], flat.steps[-1])
    x = maps[:2]
    payload = fisher.encode(x)
    assert fisher.decode(payload).shape == x.shape and payload.nbytes < x.nbytes // 4


def test_fisher_transform_without_a_metric_is_refused():
    from splitnet.errors import CodecError

    with pytest.raises(CodecError, match="channel_metric"):
        e2e._fit(make_codec("transform", step=2), "transform", _maps(), None)


def test_vector_codecs_are_fitted_on_the_maps_vectors():
    maps = _maps()
    pq = make_codec("pq", m=4, nbits=4)
    e2e._fit(pq, "pq", maps, None)
    assert pq.fitted
    assert pq.decode(pq.encode(maps[0])).shape == (maps.shape[1], maps.shape[2])


def test_stats_report_top1_on_all_and_on_confident_crops():
    ref = np.array([3, 4, 5, 6])
    confident = np.array([True, False, True, False])
    out = {"latency_ms": [10.0, 20.0, 30.0, 40.0], "crop": [0, 1, 2, 3], "top1": [3, 9, 9, 6],
           "payload_bytes": [100, 100, 100, 100], "link_bytes_per_request": 150.0}
    s = e2e._stats(out, ref, confident)
    assert s["top1_agreement"] == pytest.approx(0.5)  # crops 0 and 3 agree
    assert s["top1_agreement_confident"] == pytest.approx(0.5) and s["confident_requests"] == 2  # crop 0 yes, crop 2 no
    assert s["agree"] == [1, 0, 0, 1] and s["agree_confident"] == [1, 0]
    none_sure = e2e._stats(out, ref, np.zeros(4, dtype=bool))
    assert none_sure["top1_agreement_confident"] is None and none_sure["confident_requests"] == 0


def _point(bw, cloud, edge, split):
    return {"bandwidth_mbit_s": bw, "rtt_ms": 20.0,
            "options": {"cloud-only": {"p50_ms": cloud}, "edge-only": {"p50_ms": edge}, "split@15:transform:step=2": {"p50_ms": split}}}


def test_vision_goal_keeps_the_bar_and_reports_confident_crops_beside_it():
    rows = [{"option": "split@15:transform:step=2", "pct_of_jpeg": 4.9, "top1_agreement_e2e": 0.85, "top1_agreement_e2e_confident": 1.0}]
    points = [_point(0.5, 400.0, 90.0, 150.0), _point(2.0, 170.0, 90.0, 80.0), _point(5.0, 100.0, 90.0, 90.0)]
    g = e2e._vision_goal(points, [], {}, rows, {"jpeg_quality": 90})
    assert not g["met"] and g["codecs_meeting_fidelity_and_bytes"] == []  # 0.85 top-1 misses 99 %
    assert g["met_on_confident_crops_only"] and g["codecs_meeting_bytes_and_confident_fidelity"] == ["split@15:transform:step=2"]
    assert [r["bandwidth_mbit_s"] for r in g["points"]] == [0.5, 2.0]  # only <= 2 Mbit/s
    assert g["points"][0]["best_speedup_meeting_bytes_and_confident_fidelity"] == pytest.approx(400 / 150, abs=1e-3)
    assert g["points"][1]["edge_only_p50_ms"] == 90.0
    too_big = [{**rows[0], "pct_of_jpeg": 5.3}]
    assert not e2e._vision_goal(points, [], {}, too_big, {"jpeg_quality": 90})["met_on_confident_crops_only"]
    # both held-out samples must keep the bar: a 14-crop e2e 1.000 does not outvote the profile's 0.958
    weak = [{**rows[0], "top1_agreement_profile": 0.9, "top1_agreement_profile_confident": 0.958}]
    assert not e2e._vision_goal(points, [], {}, weak, {"jpeg_quality": 90})["met_on_confident_crops_only"]


def test_fisher_samples_must_be_positive():
    import argparse

    p = argparse.ArgumentParser()
    e2e.add_arguments(p)
    assert e2e._config(p.parse_args([]))["fisher_samples"] == 4
    with pytest.raises(ValueError):
        e2e._config(p.parse_args(["--fisher-samples", "0"]))
