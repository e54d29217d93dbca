"""`splitnet serve`: every stage a plan puts on one device, supervised and restarted on crash."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import psutil_free
import pytest
import yaml

import splitnet
from splitnet.edge.config import ClientConfig
from splitnet.errors import StageUnavailable

pytestmark = pytest.mark.timeout(180)


def _free_port() -> int:
    """A free port below Linux's ephemeral range: a client that keeps reconnecting to a port in
    that range while the stage starts can be handed a TCP self-connection by the kernel."""
    import random

    for _ in range(100):
        port = random.randint(20000, 30000)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
                return port
            except OSError:
                continue
    raise RuntimeError("no free port")


def test_serve_plan_device_and_restart(tmp_path, kill_leftovers):
    ports = [_free_port(), _free_port()]
    plan = {
        "model": "minilm",
        "stages": [
            {"index": 0, "blocks": [0, 3], "device": "cloud", "endpoint": f"tcp://127.0.0.1:{ports[0]}"},
            {"index": 1, "blocks": [3, 6], "device": "cloud", "endpoint": f"tcp://127.0.0.1:{ports[1]}"},
        ],
        "cuts": [],
    }
    path = tmp_path / "plan.yaml"
    path.write_text(yaml.safe_dump(plan))
    server = subprocess.Popen(
        [sys.executable, "-m", "splitnet.cli", "serve", "--plan", str(path), "--device", "cloud", "--host", "127.0.0.1", "--insecure", "--log-level", "WARNING"],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        assert "serving 2 stage(s)" in server.stdout.readline()
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
        assert new_pid != victim and abs(first - again).max() < 1e-6
        assert victim not in psutil_free.children(server.pid)
    finally:
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=30) == 0


def test_serve_refuses_a_device_without_stages(tmp_path):
    path = tmp_path / "plan.yaml"
    path.write_text(yaml.safe_dump({"model": "minilm", "stages": [{"index": 0, "blocks": [0, 6], "device": "phone", "endpoint": "tcp://127.0.0.1:1"}]}))
    r = subprocess.run([sys.executable, "-m", "splitnet.cli", "serve", "--plan", str(path), "--device", "cloud", "--insecure"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "no stage on device 'cloud'" in r.stderr
