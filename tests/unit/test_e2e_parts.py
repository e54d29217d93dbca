"""The pure parts of `splitnet bench e2e`: the cloud-only wire checks, the planner comparison, the
cost model on a per-image profile, the crossover, and argument checks before any work."""

from __future__ import annotations

import argparse

import msgpack
import numpy as np
import pytest

from splitnet.bench import e2e, e2e_profile as EP
from splitnet.bench.e2e_jpeg import JpegLimits, decode_jpeg, encode_jpeg, pack_request, unpack_header
from splitnet.bench.e2e_plot import crossover_mbit_s
from splitnet.errors import ConfigError, ProtocolError


def _image(seed=0):
    rng = np.random.default_rng(seed)
    base = np.linspace(0, 255, 224, dtype=np.float32)
    img = np.stack([np.add.outer(base, base) / 2, np.outer(base, np.ones(224)), rng.uniform(0, 255, (224, 224))], -1)
    return img.clip(0, 255).astype(np.uint8)


def test_jpeg_round_trip_and_bytes():
    img = _image()
    q90, q50 = encode_jpeg(img, 90), encode_jpeg(img, 50)
    assert 0 < len(q50) < len(q90) < img.nbytes  # real JPEG bytes, smaller at lower quality
    out = decode_jpeg(q90)
    assert out.shape == (224, 224, 3) and out.dtype == np.uint8
    assert np.abs(out.astype(int) - img.astype(int)).mean() < 40


def test_jpeg_server_checks_refuse_bad_input_before_decoding():
    from PIL import Image
    import io

    with pytest.raises(ProtocolError, match="bytes"):
        decode_jpeg(b"")
    with pytest.raises(ProtocolError, match="bytes"):
        decode_jpeg(b"x" * 100, JpegLimits(max_jpeg_bytes=50))
    with pytest.raises(ProtocolError, match="decodable"):
        decode_jpeg(b"not a jpeg at all")
    buf = io.BytesIO()
    Image.fromarray(_image()).save(buf, format="PNG")
    with pytest.raises(ProtocolError, match="JPEG"):
        decode_jpeg(buf.getvalue())
    small = encode_jpeg(_image()[:100, :100], 90)
    with pytest.raises(ProtocolError, match="224x224"):
        decode_jpeg(small)


def test_headers_are_versioned_and_bounded():
    assert unpack_header(pack_request(7))["req"] == 7
    with pytest.raises(ProtocolError):
        unpack_header(msgpack.packb({"v": 2, "req": 1}))
    with pytest.raises(ProtocolError):
        unpack_header(msgpack.packb({"v": 1, "req": "one"}))
    with pytest.raises(ProtocolError):
        unpack_header(b"\xc1garbage")
    with pytest.raises(ProtocolError, match="exceeds"):
        unpack_header(b"x" * 2000)


def _profile(block_ms=1.0, codec_bytes=1000.0, fid=1.0):
    class Arch:
        @staticmethod
        def cut_shape(c):
            return (7, 7, 192)

    class BM:
        num_blocks = 16
        arch = Arch()

    edge = EP.ComputeTimes(0.5, tuple([block_ms] * 16), 0.5, 17.0)
    costs = [EP.CutCodecCost(15, "int8", codec_bytes, 0.2, 0.1, fid, 0.999)]
    return EP.build_profile(BM(), edge, costs, ["int8"])


def test_predictions_follow_the_cost_model():
    prof = _profile()
    cloud = EP.CloudOnlyCosts(jpeg_bytes=13000.0, encode_ms=1.0, cloud_ms=10.0)
    opts = [{"kind": "cloud"}, {"kind": "edge"}, {"kind": "split", "cut": 15, "setting": "int8"}]
    slow = EP.predict_options(prof, EP.fleet_at(1.0, 20.0, 2.0, 0.0), opts, cloud, 0.0, 0.99)
    fast = EP.predict_options(prof, EP.fleet_at(100.0, 20.0, 2.0, 0.0), opts, cloud, 0.0, 0.99)
    assert slow["edge-only"]["predicted_ms"] == pytest.approx(17.0)  # 16 blocks + stem + head, no link
    assert fast["edge-only"]["predicted_ms"] == slow["edge-only"]["predicted_ms"]
    # cloud-only at 1 Mbit/s: the JPEG's 13,064 bytes at 0.956 Mbit/s ~ 109 ms, + RTT + compute + logits back
    wire = (13064 + 4064) * 8 / (EP.GOODPUT_FRACTION * 1e3)
    assert slow["cloud-only"]["predicted_ms"] == pytest.approx(1.0 + 10.0 + 20.0 + wire)
    assert slow["split@15:int8"]["predicted_ms"] > fast["split@15:int8"]["predicted_ms"]
    # split: 15 blocks + stem on the edge, 1 block + head on a 2x cloud, codec, 1,000 bytes + logits back, one RTT
    split = 15.5 + 0.2 + (1000 + 4000) * 8 / (EP.GOODPUT_FRACTION * 1e3) + 20.0 + 0.1 / 2 + 1.5 / 2
    assert slow["split@15:int8"]["predicted_ms"] == pytest.approx(split)
    assert EP.planner_choice(slow) == "edge-only"


def test_fidelity_floor_excludes_a_lossy_codec():
    prof = _profile(block_ms=0.01, fid=0.5)
    cloud = EP.CloudOnlyCosts(13000.0, 1.0, 10.0)
    pred = EP.predict_options(prof, EP.fleet_at(5.0, 20.0, 1.0, 0.0), [{"kind": "cloud"}, {"kind": "split", "cut": 15, "setting": "int8"}],
                              cloud, 0.0, 0.99)
    assert pred["split@15:int8"]["predicted_ms"] < pred["cloud-only"]["predicted_ms"]
    assert not pred["split@15:int8"]["allowed"]
    assert EP.planner_choice(pred) == "cloud-only"


def test_compare_point_and_summary():
    pred = {"a": {"predicted_ms": 10.0, "allowed": True}, "b": {"predicted_ms": 12.0, "allowed": True},
            "c": {"predicted_ms": 1.0, "allowed": False}}
    near = EP.compare_point(pred, {"a": 10.5, "b": 10.0, "c": 1.0})
    assert near["planner_choice"] == "a" and near["measured_best"] == "b"  # c is below the floor: never best
    assert near["within_tolerance"] and near["choice_over_best"] == pytest.approx(1.05)
    far = EP.compare_point(pred, {"a": 20.0, "b": 10.0, "c": 1.0})
    assert not far["within_tolerance"]
    assert far["abs_pct_error"]["a"] == pytest.approx(50.0)
    s = EP.summarize_planner([near, far])
    assert s["points"] == 2 and s["choice_within_10pct"] == 1 and not s["all_points_within_10pct"]
    assert s["worst_choice_over_best"] == pytest.approx(2.0)


def test_crossover():
    bws = [0.5, 1.0, 2.0, 5.0]
    assert crossover_mbit_s(bws, [100, 50, 30, 20], [40, 40, 40, 40]) == pytest.approx(np.exp((np.log(1) + np.log(2)) / 2), rel=1e-3)
    assert crossover_mbit_s(bws, [100, 90, 80, 70], [10, 10, 10, 10]) is None


def _args(*argv):
    p = argparse.ArgumentParser()
    e2e.add_arguments(p)
    return p.parse_args(list(argv))


def test_config_defaults_and_refusals():
    full = e2e._config(_args())
    assert full["bandwidths_mbit_s"] == [0.5, 1.0, 2.0, 5.0, 15.0, 50.0, 100.0] and full["rtts_ms"] == [20.0, 80.0]
    assert {"fp16", "int8", "int4"} <= set(full["codecs"]) and any(c.startswith("alignedvq") for c in full["codecs"])
    quick = e2e._config(_args("--quick"))
    assert len(quick["bandwidths_mbit_s"]) == 3 and len(quick["rtts_ms"]) == 1
    assert e2e._config(_args("--codecs", "int8,pq:m=16,nbits=8"))["codecs"] == ["int8", "pq:m=16,nbits=8"]
    for bad in (["--bandwidths", "0,1"], ["--cut", "16"], ["--requests", "0"], ["--fidelity-floor", "1.5"]):
        with pytest.raises(ValueError):
            e2e._config(_args(*bad))


def test_unknown_codec_refused_before_any_work():
    with pytest.raises(ValueError, match="unknown codec"):
        e2e.run(_args("--quick", "--codecs", "fp16,zstd"))


def test_the_bucket_the_edge_speed_and_the_offsets_enter_the_predictions():
    prof = _profile(codec_bytes=5000.0)
    cloud = EP.CloudOnlyCosts(jpeg_bytes=13000.0, encode_ms=1.0, cloud_ms=10.0)
    opts = [{"kind": "cloud"}, {"kind": "edge"}, {"kind": "split", "cut": 15, "setting": "int8"}]
    plain = EP.predict_options(prof, EP.fleet_at(1.0, 20.0, 2.0, 0.0), opts, cloud, 0.0, 0.99)
    burst = 2048.0  # tbf's bucket in frame bytes: GOODPUT_FRACTION of it in message bytes passes at line rate
    free_ms = burst * EP.GOODPUT_FRACTION * 8 / (EP.GOODPUT_FRACTION * 1e3)
    bucket = EP.predict_options(prof, EP.fleet_at(1.0, 20.0, 2.0, 0.0, burst_bytes=burst), opts, cloud, 0.0, 0.99)
    # each of the two messages of a path (up and back) is larger than the bucket: each saves it once
    for n in ("cloud-only", "split@15:int8"):
        assert plain[n]["predicted_ms"] - bucket[n]["predicted_ms"] == pytest.approx(2 * free_ms)
    assert bucket["edge-only"] == plain["edge-only"]
    small = EP.predict_options(_profile(codec_bytes=1000.0), EP.fleet_at(1.0, 20.0, 2.0, 0.0, burst_bytes=burst), opts, cloud, 0.0, 0.99)
    small0 = EP.predict_options(_profile(codec_bytes=1000.0), EP.fleet_at(1.0, 20.0, 2.0, 0.0), opts, cloud, 0.0, 0.99)
    saved = small0["split@15:int8"]["predicted_ms"] - small["split@15:int8"]["predicted_ms"]
    assert saved == pytest.approx((1000.0 + burst * EP.GOODPUT_FRACTION) * 8 / (EP.GOODPUT_FRACTION * 1e3))  # a cut inside the bucket: free
    # an edge 4x slower than the reference core: its blocks, stem, head and the split's encode 4x longer
    slow = EP.predict_options(prof, EP.fleet_at(1.0, 20.0, 2.0, 0.0, edge_speed_rel=0.25), opts, cloud, 0.0, 0.99)
    assert slow["edge-only"]["predicted_ms"] == pytest.approx(4 * 17.0)
    assert slow["split@15:int8"]["predicted_ms"] - plain["split@15:int8"]["predicted_ms"] == pytest.approx(3 * (15.5 + 0.2))
    # the calibration point's offsets: measured - predicted there, signed, added per path
    calib = {"split": {"option": "split@15:int8", "p50_ms": plain["split@15:int8"]["predicted_ms"] - 3.0},
             "cloud": {"option": "cloud-only", "p50_ms": plain["cloud-only"]["predicted_ms"] + 5.0}}
    off = EP.calibration_offsets(plain, calib)
    assert off == {"split": pytest.approx(-3.0), "cloud": pytest.approx(5.0)}
    shifted = EP.predict_options(prof, EP.fleet_at(1.0, 20.0, 2.0, 0.0), opts, cloud, 0.0, 0.99, off)
    assert shifted["split@15:int8"]["predicted_ms"] == pytest.approx(plain["split@15:int8"]["predicted_ms"] - 3.0)
    assert shifted["cloud-only"]["predicted_ms"] == pytest.approx(plain["cloud-only"]["predicted_ms"] + 5.0)
    assert shifted["edge-only"] == plain["edge-only"]


def _cgroup_v1_writable() -> bool:
    import os

    return os.geteuid() == 0 and any(os.access(r, os.W_OK) for r in EP.CGROUP_V1_CPU if os.path.exists(os.path.join(r, "cpu.cfs_quota_us")))


@pytest.mark.skipif(not _cgroup_v1_writable(), reason="needs root and a cgroup v1 cpu controller")
def test_cpu_group_quota_throttles_what_runs_inside_and_is_removed():
    import os
    import time

    def own():
        return [ln for ln in open("/proc/self/cgroup").read().splitlines() if "cpu" in ln.split(":")[1].split(",")]

    before = own()
    g = EP.CpuGroup(f"splitnet-test-{os.getpid()}", 0.25, period_ms=10.0, shares=1024)
    try:
        assert open(os.path.join(g.path, "cpu.cfs_quota_us")).read().strip() == "2500"
        assert open(os.path.join(g.path, "cpu.cfs_period_us")).read().strip() == "10000"
        with g.inside():
            assert str(os.getpid()) in open(os.path.join(g.path, "cgroup.procs")).read().split()
            t = time.process_time()
            while time.process_time() - t < 0.05:  # 50 ms of CPU: more than one period's quota
                pass
        assert own() == before  # back where it was
        assert g.stat()["nr_throttled"] > 0
    finally:
        g.remove()
    assert not os.path.exists(g.path)
    with pytest.raises(ConfigError, match="fraction"):
        EP.CpuGroup("x", 1.5)
