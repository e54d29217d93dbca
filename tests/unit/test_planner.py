"""Planner: profiles validation, cost model, DP vs brute force, memory limits, plan files, replan, CLI."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from splitnet.errors import ConfigError
from splitnet.planner import (
    Assignment,
    BlockProfile,
    DeviceProfile,
    Fleet,
    InfeasibleError,
    LinkProfile,
    ModelProfile,
    Plan,
    Workload,
    brute_force,
    evaluate,
    load_fleet,
    load_model_profile,
    load_plan,
    make_plan,
    replan,
    solve,
    solve_tables,
    tables,
)
from splitnet.planner.synthetic import random_instance

ROOT = Path(__file__).resolve().parents[2]
MINILM = ROOT / "splitnet" / "planner" / "data" / "minilm.yaml"
FLEETS = ROOT / "examples" / "fleets"
MIB = 2**20


def _model(n=6, ms=1.0, param_mib=10, channels=384) -> ModelProfile:
    blocks = tuple(BlockProfile(i, {128: ms}, param_bytes=param_mib * MIB, out_channels=channels) for i in range(n))
    return ModelProfile("toy", "encoder", blocks, BlockProfile(-1, {128: 0.1}, MIB, channels),
                        BlockProfile(n, {128: 0.1}, 0, channels), model_hash="h")


def _fleet(edge_mem_mib=1000, cloud_mem_mib=1000, bw=10.0, rtt=20.0) -> Fleet:
    return Fleet((DeviceProfile("edge", 1.0, edge_mem_mib * MIB, can_host_first_stage=True),
                  DeviceProfile("cloud", 20.0, cloud_mem_mib * MIB)),
                 (LinkProfile("edge", "cloud", bw, rtt),))


# ----------------------------------------------------------------------------- profiles
@pytest.mark.parametrize("field,value,reason", [
    ("compute_speed_rel", 0, "must be > 0"),
    ("compute_speed_rel", "fast", "must be a number"),
    ("memory_gib", -1, "memory_bytes: must be >= 1"),
    ("runtime", "tensorflow", "must be one of torch, onnxruntime"),
    ("can_host_first_stage", "yes", "must be true or false"),
    ("color", "red", "unknown field(s) color"),
])
def test_device_rejects_bad_fields(field, value, reason):
    d = {"name": "phone", "compute_speed_rel": 1.0, "memory_gib": 2, "can_host_first_stage": True}
    d[field] = value
    with pytest.raises(ConfigError, match=r"phone|device") as e:
        DeviceProfile.from_dict(d, "device")
    assert reason in str(e.value)


def test_memory_gib_converts():
    d = DeviceProfile.from_dict({"name": "x", "compute_speed_rel": 2, "memory_gib": 1.5})
    assert d.memory_bytes == int(1.5 * 2**30)


@pytest.mark.parametrize("text,reason", [
    ("devices: []", "at least one device"),
    ("devices: [{name: a, compute_speed_rel: 1, memory_gib: 1}]", "can_host_first_stage"),
    ("devices: [{name: a, compute_speed_rel: 1, memory_gib: 1, can_host_first_stage: true}]\n"
     "links: [{src: a, dst: b, bandwidth_mbit_s: 5}]", "unknown device 'b'"),
    ("devices: [{name: a, compute_speed_rel: 1, memory_gib: 1, can_host_first_stage: true},"
     " {name: b, compute_speed_rel: 1, memory_gib: 1}]\n"
     "links: [{src: a, dst: b, bandwidth_mbit_s: -5}]", "bandwidth_mbit_s: must be > 0"),
    ("devices: [{name: a, compute_speed_rel: 1, memory_gib: 1, can_host_first_stage: true},"
     " {name: a, compute_speed_rel: 1, memory_gib: 1}]", "duplicate device name"),
    ("devices: {a: 1}", "must be a list"),
    ("devices: [ {name: a", "not valid YAML"),
])
def test_fleet_yaml_rejects_bad_input(tmp_path, text, reason):
    p = tmp_path / "fleet.yaml"
    p.write_text(text)
    with pytest.raises(ConfigError) as e:
        load_fleet(p)
    assert reason in str(e.value)
    assert "fleet.yaml" in str(e.value)


def test_model_profile_rejects_bad_yaml(tmp_path):
    d = yaml.safe_load(MINILM.read_text())
    d["blocks"][2]["prefill_ms_by_tokens"] = {128: -1.0}
    p = tmp_path / "m.yaml"
    p.write_text(yaml.safe_dump(d))
    with pytest.raises(ConfigError, match=r"blocks\[2\].*prefill_ms_by_tokens\[128\]: must be >= 0"):
        load_model_profile(p)
    d = yaml.safe_load(MINILM.read_text())
    d["kind"] = "rnn"
    p.write_text(yaml.safe_dump(d))
    with pytest.raises(ConfigError, match="kind: must be one of"):
        load_model_profile(p)


def test_shipped_profiles_and_fleets_load():
    m = load_model_profile(MINILM)
    assert m.num_blocks == 6 and m.kind == "encoder"
    for f in FLEETS.glob("*.yaml"):
        fl = load_fleet(f)
        assert fl.source.can_host_first_stage


def test_block_interpolation():
    b = BlockProfile(0, {1: 1.0, 128: 10.0}, 0, 8)
    assert b.prefill_ms(1) == 1.0 and b.prefill_ms(128) == 10.0
    assert math.isclose(b.prefill_ms(64.5), 5.5)
    assert b.prefill_ms(256) > 10.0
    assert BlockProfile(0, {128: 4.0}, 0, 8).prefill_ms(64) == 2.0


# ----------------------------------------------------------------------------- cost model
def test_cost_model_by_hand():
    m, f = _model(n=2, ms=1.0), _fleet(bw=8.0, rtt=10.0)
    wl = Workload(prefill_tokens=100)
    ev = evaluate(m, f, wl, Assignment([("edge", 0, 1), ("cloud", 1, 2)], ["none"]))
    # edge: embed (0.1 * 100/128) + block (100/128); cloud: (block + head) / 20
    r = 100 / 128
    assert math.isclose(ev.per_stage_compute_ms[0], 1.1 * r)
    assert math.isclose(ev.per_stage_compute_ms[1], 1.1 * r / 20)
    nbytes = 100 * 384 * 4
    assert ev.per_link_bytes[0] == nbytes
    assert math.isclose(ev.per_link_ms[0], nbytes * 8 / 8e3 + 5.0)
    assert ev.return_bytes == 384 * 4  # one pooled row
    assert math.isclose(ev.latency_ms, 1.1 * r + 1.1 * r / 20 + ev.per_link_ms[0] + ev.return_ms)
    assert math.isclose(ev.bottleneck_ms, nbytes * 8 / 8e3)
    assert ev.bottleneck == "link edge->cloud"


def test_transport_bytes_per_message_count_on_the_link_and_the_return():
    m, plain = _model(n=2, ms=1.0), _fleet(bw=8.0, rtt=10.0)
    sealed = Fleet(plain.devices, (LinkProfile("edge", "cloud", 8.0, 10.0, bytes_per_message=1000.0),))
    asg = Assignment([("edge", 0, 1), ("cloud", 1, 2)], ["none"])
    for wl in (Workload(prefill_tokens=100), Workload(prefill_tokens=16, decode_steps=4)):
        a, b = evaluate(m, plain, wl, asg), evaluate(m, sealed, wl, asg)
        assert b.per_link_bytes[0] - a.per_link_bytes[0] == 1000.0 * wl.messages
        assert b.return_bytes - a.return_bytes == 1000.0 * wl.messages
        assert math.isclose(b.per_link_ms[0] - a.per_link_ms[0], wl.messages * 1000 * 8 / 8e3)  # 1 ms per message at 8 Mbit/s
        s = solve_tables(tables(m, sealed, wl), "latency")
        assert math.isclose(s.latency_ms, evaluate(m, sealed, wl, s.assignment).latency_ms, rel_tol=1e-9)
    with pytest.raises(ConfigError, match="bytes_per_message"):
        LinkProfile("edge", "cloud", 8.0, bytes_per_message=-1)


def test_token_bucket_shortens_each_message_latency_not_the_link_busy_time():
    m = _model(n=2, ms=1.0)
    plain = _fleet(bw=8.0, rtt=10.0)
    burst = 20_000.0
    bucket = Fleet(plain.devices, (LinkProfile("edge", "cloud", 8.0, 10.0, burst_bytes=burst),))
    asg = Assignment([("edge", 0, 1), ("cloud", 1, 2)], ["none"])
    wl = Workload(prefill_tokens=100)  # one 153 600 B message: 20 000 B of it at line rate
    a, b = evaluate(m, plain, wl, asg), evaluate(m, bucket, wl, asg)
    assert math.isclose(a.per_link_ms[0] - b.per_link_ms[0], burst * 8 / 8e3)  # 20 ms less at 8 Mbit/s
    assert math.isclose(a.bottleneck_ms, b.bottleneck_ms)  # the bucket refills only when idle
    assert b.return_ms == 5.0  # the 1 536 B pooled output fits in the bucket: RTT/2 only
    # decode steps smaller than the bucket pass at line rate each; the prefill pays its excess once
    wl2 = Workload(prefill_tokens=16, decode_steps=4)
    c = evaluate(m, bucket, wl2, asg)
    assert math.isclose(c.per_link_ms[0], wl2.messages * 5.0 + (16 * 1536 - burst) * 8 / 8e3)
    for w in (wl, wl2, Workload(prefill_tokens=64, decode_steps=3)):
        s = solve_tables(tables(m, bucket, w), "latency")
        assert math.isclose(s.latency_ms, evaluate(m, bucket, w, s.assignment).latency_ms, rel_tol=1e-9)
    assert LinkProfile("a", "b", 1.0).to_dict().get("burst_bytes") is None  # absent = 0
    assert LinkProfile.from_dict(LinkProfile("a", "b", 1.0, burst_bytes=2048).to_dict()).burst_bytes == 2048
    with pytest.raises(ConfigError, match="burst_bytes"):
        LinkProfile("edge", "cloud", 8.0, burst_bytes=-1)


def test_link_ms_for_uses_the_bucket_per_message():
    ln = LinkProfile("a", "b", 8.0, 10.0, overhead_ms=1.0, burst_bytes=1000.0)
    assert math.isclose(ln.ms_for(3000.0), 2000 * 8 / 8e3 + 5.0 + 1.0)
    assert math.isclose(ln.ms_for(1500.0, messages=2), 2 * (5.0 + 1.0))  # 750 B each: inside the bucket
    assert math.isclose(ln.busy_ms(3000.0), 3.0)


def test_decode_steps_add_messages():
    m, f = _model(n=2), _fleet(rtt=10.0)
    asg = Assignment([("edge", 0, 1), ("cloud", 1, 2)], ["none"])
    a = evaluate(m, f, Workload(prefill_tokens=16), asg)
    b = evaluate(m, f, Workload(prefill_tokens=16, decode_steps=4), asg)
    assert b.latency_ms - a.latency_ms > 4 * 10.0  # every step pays RTT/2 out and back


def test_tables_agree_with_evaluate():
    rng = random.Random(7)
    for _ in range(20):
        m, f, wl = random_instance(rng, rng.randint(1, 4), rng.randint(1, 12), rng.randint(1, 3))
        t = tables(m, f, wl)
        for obj in ("latency", "throughput"):
            s = solve_tables(t, obj)
            if s is None:
                continue
            ev = evaluate(m, f, wl, s.assignment)
            assert ev.feasible, ev.reason
            assert math.isclose(ev.latency_ms, s.latency_ms, rel_tol=1e-9)
            assert math.isclose(ev.bottleneck_ms, s.bottleneck_ms, rel_tol=1e-9)


# ----------------------------------------------------------------------------- DP == brute force
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**31), devices=st.integers(1, 4), blocks=st.integers(1, 14), codecs=st.integers(1, 3),
       objective=st.sampled_from(["latency", "throughput"]), mode=st.sampled_from(["chain", "search"]))
def test_dp_equals_brute_force(seed, devices, blocks, codecs, objective, mode):
    m, f, wl = random_instance(random.Random(seed), devices, blocks, codecs)
    t = tables(m, f, wl)
    s = solve_tables(t, objective, mode)
    bf = brute_force(t, objective, mode)
    assert (s is None) == (bf is None)
    if s is None:
        return
    if objective == "latency":
        assert math.isclose(s.latency_ms, bf[0], rel_tol=1e-9, abs_tol=1e-9)
    else:
        assert math.isclose(s.bottleneck_ms, bf[1], rel_tol=1e-9, abs_tol=1e-9)
        assert math.isclose(s.latency_ms, bf[0], rel_tol=1e-6, abs_tol=1e-9)  # same tie-break


def test_search_never_worse_than_chain():
    rng = random.Random(11)
    for _ in range(15):
        m, f, wl = random_instance(rng, 4, 10, 2)
        t = tables(m, f, wl)
        a, b = solve_tables(t, "latency", "chain"), solve_tables(t, "latency", "search")
        if a is not None:
            assert b is not None and b.latency_ms <= a.latency_ms * (1 + 1e-12)


# ----------------------------------------------------------------------------- memory, infeasible
def test_memory_limits_respected():
    m = _model(n=6, param_mib=10)
    f = _fleet(edge_mem_mib=25, cloud_mem_mib=1000, bw=1000, rtt=0.1)  # edge fits embed + <= 2 blocks
    for obj in ("latency", "throughput"):
        s = solve(m, f, Workload(), obj)
        for dev, a, b in s.assignment.stages:
            need = sum(blk.param_bytes for blk in m.blocks[a:b]) + (m.embed.param_bytes if a == 0 else 0)
            assert need <= f.device(dev).memory_bytes
        assert evaluate(m, f, Workload(), s.assignment).feasible


def test_infeasible_names_the_block():
    m = _model(n=4, param_mib=10)
    big = BlockProfile(2, {128: 1.0}, param_bytes=5000 * MIB, out_channels=384)
    m = ModelProfile("toy", "encoder", (m.blocks[0], m.blocks[1], big, m.blocks[3]), m.embed, m.head)
    with pytest.raises(InfeasibleError, match=r"block 2 alone needs 5000.0 MiB.*largest device \(edge\)"):
        solve(m, _fleet(), Workload())


def test_infeasible_first_stage_and_total():
    m = _model(n=4, param_mib=100)
    with pytest.raises(InfeasibleError, match="first stage") as e:
        solve(m, _fleet(edge_mem_mib=50, cloud_mem_mib=150), Workload())
    assert "the model needs" in str(e.value)


def test_kv_cache_counts_towards_memory():
    blocks = tuple(BlockProfile(i, {1: 1.0}, param_bytes=MIB, out_channels=64, kv_bytes_per_token=1024.0)
                   for i in range(2))
    m = ModelProfile("dec", "decoder", blocks, BlockProfile(-1, {1: 0.1}, MIB, 64), BlockProfile(2, {1: 0.1}, 0, 100))
    f = Fleet((DeviceProfile("edge", 1.0, 4 * MIB, can_host_first_stage=True),), ())
    solve(m, f, Workload(prefill_tokens=16))
    with pytest.raises(InfeasibleError, match="KV cache"):
        solve(m, f, Workload(prefill_tokens=1000, concurrent_requests=4))


def test_fidelity_floor_excludes_lossy_codecs():
    m = load_model_profile(MINILM)
    f = load_fleet(FLEETS / "home_5g.yaml")
    p = make_plan(m, f, Workload(fidelity_floor=0.999))
    for c in p.cuts:
        assert m.cut_codec_cost(c.after_block, m.codec(c.codec))["fidelity"] >= 0.999


# ----------------------------------------------------------------------------- plans
def test_plan_roundtrip_yaml_and_json(tmp_path):
    m = load_model_profile(MINILM)
    f = load_fleet(FLEETS / "home_5g.yaml")
    p = make_plan(m, f, Workload(), "throughput", model_profile_file=str(MINILM))
    for name in ("plan.yaml", "plan.json"):
        p.save(tmp_path / name)
        q = load_plan(tmp_path / name)
        assert q.to_dict() == p.to_dict()
        assert q.stages[0].blocks == p.stages[0].blocks and q.cut_points == p.cut_points
    assert p.predicted.latency_ms > 0 and p.predicted.throughput_rps > 0


@pytest.mark.parametrize("mutate,reason", [
    (lambda d: d["stages"][1].__setitem__("blocks", [2, 6]), "must cover the blocks contiguously"),
    (lambda d: d["stages"][-1].__setitem__("blocks", [d["stages"][-1]["blocks"][0], 9]), "the model has 6 blocks"),
    (lambda d: d["cuts"].pop(), "need 1 cuts"),
    (lambda d: d["cuts"][0].__setitem__("after_block", 3), "after_block: is 3"),
    (lambda d: d["stages"][0].__setitem__("codec_out", "int4"), "codec_out"),
    (lambda d: d.__setitem__("version", 99), "plan version"),
    (lambda d: d["stages"][1].__setitem__("device", d["stages"][0]["device"]), "more than one stage"),
    (lambda d: d.__setitem__("colour", 1), "unknown field(s) colour"),
    (lambda d: d["cuts"][0].__setitem__("codebook_file", "x.safetensors"), "go together"),
])
def test_plan_validation(tmp_path, mutate, reason):
    m = load_model_profile(MINILM)
    f = Fleet((DeviceProfile("a", 1.0, 2**32, can_host_first_stage=True), DeviceProfile("b", 1.0, 2**32)),
              (LinkProfile("a", "b", 100.0, 1.0),))
    p = Plan.from_dict({"model": "minilm", "model_hash": m.model_hash, "num_blocks": 6,
                        "stages": [{"index": 0, "blocks": [0, 3], "device": "a", "codec_out": "int8"},
                                   {"index": 1, "blocks": [3, 6], "device": "b"}],
                        "cuts": [{"after_block": 2, "codec": "int8", "bytes_per_token": 389.0}]})
    assert p.cut_points == [3]
    d = p.to_dict()
    mutate(d)
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(d))
    with pytest.raises(ConfigError) as e:
        load_plan(path)
    assert reason in str(e.value)
    del f


def test_replan_after_failure_and_link_change(tmp_path):
    m = load_model_profile(MINILM)
    f = load_fleet(FLEETS / "home_5g.yaml")
    p = make_plan(m, f, Workload(), model_profile_file=str(MINILM))
    used = {s.device for s in p.stages} - {"phone"}
    assert used
    q = replan(p, f, failed_devices=sorted(used))
    assert not ({s.device for s in q.stages} & used)
    assert q.workload == p.workload and q.objective == p.objective
    # a dead uplink makes remote stages slower than local
    r = replan(p, f, changed_links=[{"src": "phone", "dst": "jetson", "bandwidth_mbit_s": 0.01, "rtt_ms": 500},
                                    {"src": "phone", "dst": "laptop", "bandwidth_mbit_s": 0.01, "rtt_ms": 500},
                                    {"src": "phone", "dst": "cloud", "bandwidth_mbit_s": 0.01, "rtt_ms": 500}])
    assert [s.device for s in r.stages] == ["phone"]
    with pytest.raises(ConfigError, match="every device failed"):
        replan(p, f, failed_devices=[d.name for d in f.devices])
    with pytest.raises(ConfigError, match="unknown device"):
        replan(p, f, failed_devices=["toaster"])


def test_replan_keeps_endpoints():
    m = _model(n=4)
    f = Fleet((DeviceProfile("edge", 1.0, 2**32, can_host_first_stage=True, endpoint="tcp://e:1"),
               DeviceProfile("mid", 5.0, 2**32), DeviceProfile("cloud", 50.0, 2**32)),
              (LinkProfile("edge", "mid", 1000, 1), LinkProfile("mid", "cloud", 1000, 1),
               LinkProfile("edge", "cloud", 1000, 1)))
    p = make_plan(m, f, Workload(prefill_tokens=1024))
    p.stages[-1].endpoint = "tcp://last:9"
    last = p.stages[-1].device
    q = replan(p, f, failed_devices=[d for d in ("mid", "cloud") if d != last], model=m)
    assert q.stages[0].endpoint == "tcp://e:1"
    assert any(s.endpoint == "tcp://last:9" for s in q.stages if s.device == last)


# ----------------------------------------------------------------------------- CLI
def test_cli_plan_table_json_plot(tmp_path, capsys):
    from splitnet.cli import main

    rc = main(["plan", "--model", "minilm", "--devices", str(FLEETS / "home_5g.yaml"), "--sweep-bandwidth", "1,100",
               "--out", str(tmp_path / "p.yaml"), "--plot", str(tmp_path / "p.png")])
    out = capsys.readouterr().out
    assert rc == 0 and "predicted latency" in out and "uplink sweep" in out
    assert load_plan(tmp_path / "p.yaml").model == "minilm"
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"
    rc = main(["plan", "--model", str(MINILM), "--devices", str(FLEETS / "phone_cloud.yaml"), "--json",
               "--objective", "throughput"])
    doc = json.loads(capsys.readouterr().out)
    assert rc == 0 and doc["objective"] == "throughput" and doc["predicted"]["throughput_rps"] > 0


def test_cli_plan_reports_errors(tmp_path, capsys):
    from splitnet.cli import main

    bad = tmp_path / "f.yaml"
    bad.write_text("devices: [{name: a, compute_speed_rel: 1, memory_gib: 0.001, can_host_first_stage: true}]")
    rc = main(["plan", "--model", "minilm", "--devices", str(bad)])
    err = capsys.readouterr().err
    assert rc == 2 and "no feasible plan" in err


def test_the_plot_marks_the_chosen_plan_at_its_own_cut_only():
    from types import SimpleNamespace

    from splitnet.planner.plan import StagePlan
    from splitnet.planner.report import _chosen_cut

    def plan(*stages):  # only the stages matter here
        return SimpleNamespace(stages=[StagePlan(i, b, d) for i, (d, b) in enumerate(stages)])

    assert _chosen_cut(plan(("phone", (0, 2)), ("cloud", (2, 6))), "phone", "cloud", 6) == 1
    assert _chosen_cut(plan(("phone", (0, 6))), "phone", "cloud", 6) == 5  # all local: the panel's last point
    assert _chosen_cut(plan(("phone", (0, 2)), ("laptop", (2, 6))), "phone", "cloud", 6) is None  # not on this panel
    assert _chosen_cut(plan(("phone", (0, 1)), ("laptop", (1, 3)), ("cloud", (3, 6))), "phone", "cloud", 6) is None
