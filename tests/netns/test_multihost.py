"""Split inference across three namespace hosts (edge-a, edge-b, cloud) on shaped links."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from splitnet.lab.netns import list_labs
from splitnet.wire.security import generate_keypair

pytestmark = [pytest.mark.netns, pytest.mark.timeout(150)]

PLACEMENT = [("edge-a", (0, 2)), ("edge-b", (2, 4)), ("cloud", (4, 6))]


def _probe(lab, eps, *extra):
    r = lab.run_in("edge-a", [sys.executable, "-m", "splitnet.lab.probe", "--endpoints", ",".join(eps), "--reply-host", lab.addr("edge-a"), *extra], check=False, timeout_s=120)
    assert r.stdout.strip(), r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    d = tmp_path_factory.mktemp("keys")
    generate_keypair(d, "server")
    generate_keypair(d / "allow", "client")
    generate_keypair(d, "intruder")
    return d


def test_link_shaping_is_measurable(lab):
    """tbf shapes the rate in the kernel; the relay adds the configured delay (RTT ~ 2 x 10 ms)."""
    srv = (
        "import socket,sys\ns=socket.socket();s.bind((sys.argv[1],0));s.listen(1)\n"
        "print('READY',s.getsockname()[1],flush=True)\nc,_=s.accept()\n"
        "while True:\n d=c.recv(65536)\n if not d: break\n if d.endswith(b'!'): c.sendall(b'k')\n"
    )
    cli = (
        "import socket,sys,time\nc=socket.create_connection((sys.argv[1],int(sys.argv[2])))\n"
        "c.setsockopt(socket.IPPROTO_TCP,socket.TCP_NODELAY,1)\nt=time.perf_counter();c.sendall(b'!');c.recv(1);r=time.perf_counter()-t\n"
        "n=4000000;t=time.perf_counter();c.sendall(b'x'*n+b'!');c.recv(1);d=time.perf_counter()-t\nprint(r*1e3,n*8/d/1e6)\n"
    )
    _, line = lab.spawn("cloud", [sys.executable, "-c", srv, lab.addr("cloud")], ready_prefix="READY")
    ep = lab.expose(f"tcp://{lab.addr('cloud')}:{line.split()[1]}", src="edge-a", dst="cloud")
    host, port = ep[len("tcp://"):].rsplit(":", 1)
    rtt_ms, mbit = map(float, lab.run_in("edge-a", [sys.executable, "-c", cli, host, port]).stdout.split())
    assert 18 <= rtt_ms <= 60, rtt_ms
    assert 12 <= mbit <= 21, mbit  # 20 Mbit/s configured (tbf measured 18-19)


def test_encoder_across_three_hosts_with_curve(lab, keys):
    extra = ["--server-key", str(keys / "server.key_secret"), "--keys-dir", str(keys / "allow")]
    eps = lab.pipeline("minilm", PLACEMENT, client_host="edge-a", extra_args=extra)
    res = _probe(lab, eps, "--client-key", str(keys / "allow" / "client.key_secret"), "--server-key", str(keys / "server.key"))
    assert res["ok"], res
    assert res["outputs"] == {"embedding": [2, 384]}
    assert res["max_abs_diff"] < 1e-4
    assert res["latency_ms_median"] >= 15  # edge-a->edge-b 5 ms + edge-b->cloud 10 ms one way, at least

    t0 = time.monotonic()
    bad = _probe(lab, eps, "--client-key", str(keys / "intruder.key_secret"), "--server-key", str(keys / "server.key"), "--no-reference")
    assert not bad["ok"] and bad["error"].startswith("AuthError"), bad
    plain = _probe(lab, eps, "--no-reference")
    assert not plain["ok"] and plain["error"].startswith("AuthError"), plain
    assert bad["error"] != plain["error"]
    assert time.monotonic() - t0 < 30  # two client processes, each refused within 2 s of connecting


def test_decoder_generation_across_three_hosts(lab):
    eps = lab.pipeline("tiny-gpt2", PLACEMENT, client_host="edge-a", extra_args=["--insecure"])
    res = _probe(lab, eps, "--requests", "2", "--new-tokens", "6")
    assert res["ok"], res
    assert len(res["tokens"]) == 6 and res["max_abs_diff"] == 0.0


def test_lab_cli_up_and_down():
    name = "clitst"
    up = subprocess.run([sys.executable, "-m", "splitnet.cli", "lab", "up", "--name", name, "--host", "a", "--host", "b",
                         "--link", "a:b:rate=10,delay=2"], capture_output=True, text=True, timeout=60)
    try:
        assert up.returncode == 0, up.stderr
        assert any(lab["name"] == name for lab in list_labs())
        ns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
        assert f"sn-{name}-0" in ns
    finally:
        down = subprocess.run([sys.executable, "-m", "splitnet.cli", "lab", "down", "--name", name], capture_output=True, text=True, timeout=60)
    assert down.returncode == 0, down.stderr
    assert f"sn-{name}-" not in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
