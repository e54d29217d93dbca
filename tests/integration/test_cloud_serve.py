"""`splitnet serve --plan`: the stages a validated plan puts on a device, supervised and restarted on
crash; every mistake (device, endpoint, port, codec, blocks) refused before a model loads."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import psutil_free
from api_processes import free_port  # one free-port helper for the process tests
import pytest
import yaml

import splitnet
from splitnet.edge.config import ClientConfig
from splitnet.errors import StageUnavailable

pytestmark = pytest.mark.timeout(180)
FAST_S = 30  # a refusal comes before any weights load; generous for a loaded 2-core CI host


def _plan(ports: list[int | None], blocks=((0, 3), (3, 6)), num_blocks: int = 6) -> dict:
    devices = ["edge", "cloud"]
    stages = []
    for i, ((a, b), port) in enumerate(zip(blocks, ports)):
        s = {"index": i, "blocks": [a, b], "device": devices[i]}
        if port:
            s["endpoint"] = f"tcp://127.0.0.1:{port}"
        stages.append(s)
    return {"model": "minilm", "num_blocks": num_blocks, "stages": stages,
            "cuts": [{"after_block": blocks[0][1] - 1, "codec": "fp16", "bytes_per_token": 768.0}]}


def _serve(path, device: str, *extra: str, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "splitnet.cli", "serve", "--plan", str(path), "--device", device, "--host",
                             "127.0.0.1", "--insecure", "--log-level", "WARNING", *extra], text=True, **kw)


def _run_serve(path, device: str, *extra: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "splitnet.cli", "serve", "--plan", str(path), "--device", device, "--host", "127.0.0.1",
           "--insecure", *extra]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


def test_serve_plan_device_and_restart(tmp_path, kill_leftovers):
    ports = [free_port(), free_port()]
    path = tmp_path / "plan.yaml"
    path.write_text(yaml.safe_dump(_plan(ports)))
    servers = [_serve(path, d, stdout=subprocess.PIPE) for d in ("edge", "cloud")]
    try:
        for server in servers:
            assert "serving 1 stage(s)" in server.stdout.readline()
        config = ClientConfig(timeout_s=30, connect_timeout_s=60, heartbeat_interval_s=0.3)
        with splitnet.connect(path, config=config) as s:
            first = s.infer({"text": ["served by the cloud node"]})["embedding"]
            victim = s.stages[1]["pid"]
        os.kill(victim, signal.SIGKILL)
        deadline = time.monotonic() + 90
        while True:  # the supervisor restarts the stage on the same endpoint
            try:
                with splitnet.connect(path, config=ClientConfig(timeout_s=30, connect_timeout_s=5)) as s:
                    again = s.infer({"text": ["served by the cloud node"]})["embedding"]
                    new_pid = s.stages[1]["pid"]
                break
            except StageUnavailable:
                assert time.monotonic() < deadline, "stage was not restarted"
        assert new_pid != victim and abs(first - again).max() < 1e-2  # fp16 on the cut
        assert victim not in psutil_free.children(servers[1].pid)

        # the same plan served a second time: the taken port is named at once, nothing restarts
        t0 = time.monotonic()
        r = _run_serve(path, "cloud")
        assert r.returncode == 2, r.stderr
        assert f"port {ports[1]} on 127.0.0.1 is in use (by another splitnet stage?)" in r.stderr
        assert "Traceback" not in r.stderr and time.monotonic() - t0 < FAST_S
    finally:
        for server in servers:
            server.send_signal(signal.SIGTERM)
        for server in servers:
            assert server.wait(timeout=30) == 0


def test_serve_refuses_a_device_without_stages(tmp_path):
    path = tmp_path / "plan.yaml"
    path.write_text(yaml.safe_dump(_plan([free_port(), free_port()])))
    r = _run_serve(path, "laptop")
    assert r.returncode == 2 and "no stage on device 'laptop'" in r.stderr and "['cloud', 'edge']" in r.stderr


@pytest.mark.parametrize("mutate,message", [
    (lambda d: d["cuts"][0].__setitem__("codec_ot", "fp16"), "unknown field(s) codec_ot"),
    (lambda d: d.__setitem__("version", 2), "this splitnet reads plan version 1, got 2"),
    (lambda d: d["stages"][1].__setitem__("endpoint", "127.0.0.1:5556"), "must be tcp://HOST:PORT"),
])
def test_serve_uses_the_validated_plan_reader(tmp_path, mutate, message):
    doc = _plan([free_port(), free_port()])
    mutate(doc)
    path = tmp_path / "plan.yaml"
    path.write_text(yaml.safe_dump(doc))
    r = _run_serve(path, "cloud")
    assert r.returncode == 2 and message in r.stderr, r.stderr
    assert "Traceback" not in r.stderr


def test_blocks_past_the_model_are_refused_before_any_stage_starts(tmp_path):
    """`blocks: [3, 7]` on the 6-block MiniLM (num_blocks edited to match): named at once, no restarts."""
    path = tmp_path / "plan.yaml"
    path.write_text(yaml.safe_dump(_plan([free_port(), free_port()], blocks=((0, 3), (3, 7)), num_blocks=7)))
    t0 = time.monotonic()
    r = _run_serve(path, "cloud")
    assert r.returncode == 2, r.stderr
    assert "plan stage 1 (device cloud) asks for blocks [3, 7], but model minilm has 6 blocks" in r.stderr
    assert "started" not in r.stderr and time.monotonic() - t0 < FAST_S


def test_missing_endpoint_says_where_to_set_it_and_the_fleet_fills_it(tmp_path, kill_leftovers):
    port = free_port()
    path = tmp_path / "plan.yaml"
    path.write_text(yaml.safe_dump(_plan([None, None])))
    r = _run_serve(path, "cloud")
    assert r.returncode == 2
    assert "plan stage 1 (device cloud, blocks 3:6)" in r.stderr and "has no endpoint" in r.stderr
    assert "`endpoint: tcp://HOST:PORT` to device cloud in the fleet file" in r.stderr and "--devices FLEET" in r.stderr
    fleet = tmp_path / "fleet.yaml"
    fleet.write_text(yaml.safe_dump({"name": "t", "devices": [
        {"name": "edge", "compute_speed_rel": 1.0, "memory_gib": 2, "can_host_first_stage": True},
        {"name": "cloud", "compute_speed_rel": 10.0, "memory_gib": 8, "endpoint": f"tcp://127.0.0.1:{port}"}],
        "links": [{"src": "edge", "dst": "cloud", "bandwidth_mbit_s": 100, "rtt_ms": 1}]}))
    server = _serve(path, "cloud", "--devices", str(fleet), stdout=subprocess.PIPE)
    try:
        assert "serving 1 stage(s)" in server.stdout.readline()
        deadline = time.monotonic() + 90
        while True:  # the stage binds the fleet's port once its weights are loaded
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert server.poll() is None and time.monotonic() < deadline, "the fleet's endpoint was not served"
                time.sleep(0.2)
    finally:
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=30) == 0


def test_onnxruntime_first_stage_is_exported_with_its_client_config(tmp_path, kill_leftovers):
    """A phone on onnxruntime: `serve --device phone` exports its stage and writes the client's
    config; the client then runs it without torch against the cloud stage served from the plan."""
    port = free_port()
    doc = _plan([None, port], blocks=((0, 2), (2, 6)))
    doc["stages"][0].update(device="phone", runtime="onnxruntime")
    path = tmp_path / "plan.yaml"
    path.write_text(yaml.safe_dump(doc))
    r = _run_serve(path, "phone", "--export-dir", str(tmp_path / "edge"))
    assert r.returncode == 0, r.stderr
    assert "OnnxStage(" in r.stdout and "local_codec='fp16'" in r.stdout
    client = json.loads((tmp_path / "edge" / "phone.client.json").read_text())
    assert client["endpoints"] == [f"tcp://127.0.0.1:{port}"] and client["local_codec"] == "fp16"
    assert client["blocks"] == [0, 2]
    server = _serve(path, "cloud", stdout=subprocess.PIPE)
    try:
        assert "serving 1 stage(s)" in server.stdout.readline()
        script = (
            "import json, sys\n"
            "sys.modules['torch'] = None\n"
            "import splitnet\n"
            "from splitnet.edge.config import ClientConfig\n"
            "from splitnet.edge.onnx_stage import OnnxStage\n"
            "c = json.load(open(sys.argv[1]))\n"
            "cfg = ClientConfig(timeout_s=30, connect_timeout_s=90)\n"
            "with splitnet.connect(c['endpoints'], local_stage=OnnxStage(c['local_stage']), local_codec=c['local_codec'], config=cfg) as s:\n"
            "    print(s.infer({'text': ['from the phone']})['embedding'].shape)\n"
        )
        out = subprocess.run([sys.executable, "-c", script, str(tmp_path / "edge" / "phone.client.json")],
                             capture_output=True, text=True, timeout=150)
        assert out.returncode == 0, out.stderr[-3000:]
        assert out.stdout.strip().endswith("(1, 384)")
    finally:
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=30) == 0
