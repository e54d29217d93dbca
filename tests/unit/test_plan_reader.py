"""The one plan reader as the runtime uses it (plan_io over planner.plan), and the preflight checks."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import yaml

from splitnet.errors import ConfigError
from splitnet.planner.plan import Plan, as_plan, check_endpoint, check_plan_fits_model
from splitnet.runtime.plan_io import endpoints_from_plan, fill_endpoints, model_hash_from_plan, stage_from_plan
from splitnet.runtime.preflight import check_codec_spec, check_port_free

pytestmark = pytest.mark.timeout(60)
ROOT = Path(__file__).resolve().parents[2]


def _doc(**stage1) -> dict:
    return {"model": "minilm", "model_hash": "abc", "num_blocks": 6,
            "stages": [{"index": 0, "blocks": [0, 2], "device": "phone", "runtime": "onnxruntime"},
                       {"index": 1, "blocks": [2, 6], "device": "cloud", **stage1}],
            "cuts": [{"after_block": 1, "codec": "int8", "bytes_per_token": 389.0}]}


def test_every_input_form_goes_through_the_validated_reader(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(_doc(endpoint="tcp://10.0.0.2:5556")))
    for form in (path, str(path), _doc(endpoint="tcp://10.0.0.2:5556"), as_plan(path)):
        p = as_plan(form)
        assert isinstance(p, Plan) and p.stages[0].runtime == "onnxruntime" and p.stages[1].runtime == "torch"
    bad = _doc()
    bad["cuts"][0]["codec_ot"] = "int8"
    with pytest.raises(ConfigError, match=r"unknown field\(s\) codec_ot"):
        endpoints_from_plan(bad)  # connect(plan) refuses the typo the planner's reader refuses
    with pytest.raises(ConfigError, match="plan version 1, got 2"):
        model_hash_from_plan({**_doc(), "version": 2})
    with pytest.raises(ConfigError, match="runtime: must be one of torch, onnxruntime"):
        as_plan(_doc(runtime="tensorrt"))


def test_stage_launch_from_a_plan():
    s = stage_from_plan(_doc(endpoint="tcp://10.0.0.2:5556"), 1)
    assert (s.model, s.start_block, s.end_block, s.bind, s.codec_out) == ("minilm", 2, 6, "tcp://0.0.0.0:5556", "")
    s0 = stage_from_plan(_doc(), 0)
    assert s0.codec_out == "int8" and s0.bind == "" and s0.runtime == "onnxruntime"
    with pytest.raises(ConfigError, match=r"--stage must be an index in 0..1"):
        stage_from_plan(_doc(), 2)


@pytest.mark.parametrize("endpoint", ["10.0.0.2:5556", "tcp://10.0.0.2", "tcp://host:0", "tcp://host:70000", "http://h:1", ""])
def test_bad_endpoints_are_refused(endpoint):
    with pytest.raises(ConfigError, match="stages\\[1\\].endpoint"):
        as_plan(_doc(endpoint=endpoint))


def test_good_endpoints():
    for e in ("tcp://10.0.0.2:5556", "tcp://[::1]:5556", "tcp://cloud.example.net:1", "ipc:///tmp/stage.sock"):
        assert check_endpoint(e, "x") == e


def test_missing_endpoint_names_the_stage_and_where_to_set_it(tmp_path):
    with pytest.raises(ConfigError) as e:
        endpoints_from_plan(_doc())
    msg = str(e.value)
    assert "plan stage 0 (device phone, blocks 0:2)" in msg and "fleet file" in msg and "stages[0].endpoint" in msg


def test_fleet_fills_endpoints_and_runtime(tmp_path):
    fleet = tmp_path / "fleet.yaml"
    fleet.write_text(yaml.safe_dump({"name": "f", "devices": [
        {"name": "phone", "compute_speed_rel": 1.0, "memory_gib": 2, "can_host_first_stage": True, "runtime": "onnxruntime"},
        {"name": "cloud", "compute_speed_rel": 9.0, "memory_gib": 8, "endpoint": "tcp://cloud:7000"}],
        "links": [{"src": "phone", "dst": "cloud", "bandwidth_mbit_s": 10, "rtt_ms": 40}]}))
    p = fill_endpoints(as_plan(_doc()), fleet)
    assert p.stages[1].endpoint == "tcp://cloud:7000" and p.stages[0].endpoint is None
    kept = fill_endpoints(as_plan(_doc(endpoint="tcp://mine:1")), fleet)
    assert kept.stages[1].endpoint == "tcp://mine:1"  # the plan's own endpoint wins
    doc = _doc()
    doc["stages"][1]["device"] = "laptop"
    with pytest.raises(ConfigError, match="device 'laptop', which fleet .* does not list"):
        fill_endpoints(as_plan(doc), fleet)


def test_blocks_past_the_model():
    doc = _doc()
    doc["num_blocks"] = 7
    doc["stages"][1]["blocks"] = [2, 7]
    with pytest.raises(ConfigError, match=r"plan stage 1 \(device cloud\) asks for blocks \[2, 7\], but model minilm has 6 blocks"):
        check_plan_fits_model(as_plan(doc), 6)
    check_plan_fits_model(as_plan(_doc()), 6)


def test_port_in_use_is_named():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        with pytest.raises(ConfigError, match=f"port {port} on 127.0.0.1 is in use \\(by another splitnet stage\\?\\)"):
            check_port_free(f"tcp://127.0.0.1:{port}")
    check_port_free(f"tcp://127.0.0.1:{port}")  # free again once closed
    check_port_free("tcp://127.0.0.1:0")


def test_codec_names_are_checked_with_the_known_list():
    with pytest.raises(ConfigError, match="--codec: unknown codec 'fp17'; known codecs: .*fp16.*int8"):
        check_codec_spec("fp17", "--codec")
    with pytest.raises(ConfigError, match="must be fitted first"):
        check_codec_spec("alignedvq", "--codec-out")
    check_codec_spec("fp16", "--codec")
    check_codec_spec("", "--codec")


def test_the_shipped_profile_matches_the_model_it_plans_for():
    """A plan from the shipped profile carries its model_hash; connect(plan) refuses a mismatch."""
    from splitnet.model import load_model
    from splitnet.planner import load_model_profile

    prof = load_model_profile(ROOT / "splitnet" / "planner" / "data" / "minilm.yaml")
    assert prof.model_hash == load_model("minilm", blocks=range(0, 1)).fingerprint()
