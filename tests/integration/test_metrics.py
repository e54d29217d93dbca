"""Prometheus /metrics and /health on stage processes and on `splitnet api`, and `splitnet status`,
against real processes: the counters move when requests run, and parse with prometheus-client."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

import splitnet
from api_processes import free_port, start_api, stop
from splitnet.edge.config import ClientConfig
from splitnet.errors import AuthError
from splitnet.wire.security import generate_keypair
from stage_processes import serve_stage

pytestmark = pytest.mark.timeout(240)

KEY = "sk-splitnet-metrics-0123456789abcdef"


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    d = tmp_path_factory.mktemp("keys")
    stage_pub, stage_sec = generate_keypair(d / "stage", "stage")
    client_pub, client_sec = generate_keypair(d / "client", "client")
    _, stranger_sec = generate_keypair(d / "stranger", "stranger")
    allow = d / "allow"
    allow.mkdir()
    (allow / "client.key").write_text(client_pub.read_text())
    return {"stage_pub": str(stage_pub), "stage_sec": str(stage_sec), "client_sec": str(client_sec), "stranger_sec": str(stranger_sec), "allow": str(allow)}


@pytest.fixture(scope="module")
def procs(keys):
    """Two plaintext tiny-gpt2 stages and one CURVE stage, all with metrics, and an API over the two."""
    started = []
    try:
        with ThreadPoolExecutor(3) as pool:
            stages = list(pool.map(lambda a: serve_stage(*a), [
                ("0:3", ["--insecure", "--metrics-port", "0"], "tiny-gpt2"),
                ("3:6", ["--insecure", "--metrics-port", "0", "--stage-index", "1"], "tiny-gpt2"),
                ("0:6", ["--server-key", keys["stage_sec"], "--keys-dir", keys["allow"], "--metrics-port", "0"], "tiny-gpt2"),
            ]))
            started += [p for p, _ in stages]
        eps = [e for _, e in stages]
        api, base = start_api(["--endpoints", ",".join(eps[:2]), "--api-key", KEY])
        started.append(api)
        yield {"plain": eps[:2], "curve": eps[2], "api": base}
    finally:
        stop(*started)


def scrape(url: str) -> dict[str, float]:
    """Every sample of ``url``/metrics by name and labels, parsed by prometheus-client's parser."""
    text = httpx.get(url + "/metrics", timeout=10).text
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[s.name + json.dumps(s.labels, sort_keys=True)] = s.value
    return out


def value(samples: dict, name: str, **labels) -> float:
    return samples.get(name + json.dumps({k: str(v) for k, v in labels.items()}, sort_keys=True), 0.0)


def wait_for(predicate, timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return predicate()


def test_stage_metrics_move_with_requests_and_health_answers(procs):
    with splitnet.connect(procs["plain"], timeout_s=30) as s:
        urls = [st["metrics_url"] for st in s.stages]
        assert all(u.startswith("http://127.0.0.1:") for u in urls)
        before = [scrape(u) for u in urls]
        prompt = list(b"def f(x):")
        s.generate(prompt, 5)
    after = [scrape(u) for u in urls]
    for i, (b, a) in enumerate(zip(before, after)):
        lab = {"stage": i}
        assert value(a, "splitnet_stage_forwards_total", **lab) - value(b, "splitnet_stage_forwards_total", **lab) >= 5  # prefill + 4 decode steps
        assert value(a, "splitnet_stage_tokens_total", **lab) - value(b, "splitnet_stage_tokens_total", **lab) >= len(prompt) + 4
        assert value(a, "splitnet_stage_batch_size_count", **lab) > value(b, "splitnet_stage_batch_size_count", **lab)
        assert value(a, "splitnet_stage_forward_seconds_count", **lab) > value(b, "splitnet_stage_forward_seconds_count", **lab)
        assert value(a, "splitnet_stage_bytes_in_total", **lab) > value(b, "splitnet_stage_bytes_in_total", **lab)
        assert value(a, "splitnet_stage_bytes_out_total", **lab) > value(b, "splitnet_stage_bytes_out_total", **lab)
        assert "splitnet_stage_queue_depth" + json.dumps({"stage": str(i)}) in a
        assert value(a, "splitnet_stage_info", stage=i, model="tiny-gpt2", blocks=["0:3", "3:6"][i]) == 1
    health = httpx.get(urls[1] + "/health").json()
    assert health["status"] == "ok" and health["blocks"] == [3, 6] and health["model"] == "tiny-gpt2"
    assert httpx.get(urls[1] + "/nothing").status_code == 404


def test_stage_counts_refused_handshakes(procs, keys):
    good = ClientConfig(client_key=keys["client_sec"], server_key=keys["stage_pub"], timeout_s=30)
    with splitnet.connect([procs["curve"]], config=good) as s:
        url = s.stages[0]["metrics_url"]
    before = value(scrape(url), "splitnet_stage_auth_refusals_total", stage=0)
    stranger = ClientConfig(client_key=keys["stranger_sec"], server_key=keys["stage_pub"], connect_timeout_s=5)
    with pytest.raises(AuthError):
        splitnet.connect([procs["curve"]], config=stranger)
    assert wait_for(lambda: value(scrape(url), "splitnet_stage_auth_refusals_total", stage=0) > before)


def test_api_metrics_move_with_requests(procs):
    base = procs["api"]
    before = scrape(base)
    r = httpx.post(base + "/v1/completions", headers={"Authorization": f"Bearer {KEY}"},
                   json={"model": "tiny-gpt2", "prompt": "import os", "max_tokens": 4, "temperature": 0}, timeout=60)
    assert r.status_code == 200
    n_out = r.json()["usage"]["completion_tokens"]
    assert httpx.get(base + "/v1/models", headers={"Authorization": "Bearer sk-wrong-0123456789abcdef"}).status_code == 401
    after = scrape(base)
    route = {"route": "/v1/completions"}
    assert value(after, "splitnet_api_requests_total", status=200, **route) == value(before, "splitnet_api_requests_total", status=200, **route) + 1
    assert value(after, "splitnet_api_requests_total", route="/v1/models", status=401) == value(before, "splitnet_api_requests_total", route="/v1/models", status=401) + 1
    assert value(after, "splitnet_api_auth_refusals_total") == value(before, "splitnet_api_auth_refusals_total") + 1
    assert value(after, "splitnet_api_prompt_tokens_total", **route) - value(before, "splitnet_api_prompt_tokens_total", **route) == len(b"import os")
    assert value(after, "splitnet_api_completion_tokens_total", **route) - value(before, "splitnet_api_completion_tokens_total", **route) == n_out >= 1
    for hist in ("splitnet_api_generation_seconds_count", "splitnet_api_time_to_first_token_seconds_count", "splitnet_api_request_seconds_count"):
        assert value(after, hist, **route) == value(before, hist, **route) + 1
    health = httpx.get(base + "/health").json()
    assert health["status"] == "ok" and health["stages"] == 2
    deep = httpx.get(base + "/health", params={"stages": "true"}, timeout=30)
    assert deep.status_code == 200 and [st["blocks"] for st in deep.json()["stage_status"]] == [[0, 3], [3, 6]]
    assert all(st["live"] and st["rtt_ms"] > 0 for st in deep.json()["stage_status"])


def status(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "splitnet.cli", "status", "--timeout-s", "2", "--sample-s", "0.2", *args],
                          capture_output=True, text=True, timeout=60)


def test_status_reports_each_live_stage(procs):
    r = status(*procs["plain"], "--json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["live"] and doc["pipeline_problem"] == ""
    assert [s["blocks"] for s in doc["stages"]] == [[0, 3], [3, 6]]
    assert all(s["live"] and s["model"] == "tiny-gpt2" and s["rtt_ms"] > 0 and s["queue_depth"] == 0 and 0 <= s["busy_fraction"] <= 1 for s in doc["stages"])
    table = status(",".join(procs["plain"]))
    assert table.returncode == 0 and table.stdout.count(" yes ") == 2 and "3:6" in table.stdout


def test_status_exits_1_for_a_dead_stage(procs):
    dead = f"tcp://127.0.0.1:{free_port()}"
    r = status(procs["plain"][0], dead, "--json")
    assert r.returncode == 1
    first, second = json.loads(r.stdout)["stages"]
    assert first["live"] and not second["live"] and "no answer" in second["error"]


def test_status_needs_the_stage_keys(procs, keys):
    r = status(procs["curve"], "--json")
    assert r.returncode == 1 and "CURVE" in json.loads(r.stdout)["stages"][0]["error"]
    r = status(procs["curve"], "--json", "--client-key", keys["client_sec"], "--server-key", keys["stage_pub"])
    assert r.returncode == 0 and json.loads(r.stdout)["stages"][0]["blocks"] == [0, 6]
    # a container's health check may use the stage's own keypair (a stage trusts its own key)
    r = status(procs["curve"], "--client-key", keys["stage_sec"], "--server-key", keys["stage_pub"])
    assert r.returncode == 0, r.stdout + r.stderr


def test_a_taken_metrics_port_is_refused_in_one_line():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        r = subprocess.run([sys.executable, "-m", "splitnet.cli", "serve-stage", "--model", "tiny-gpt2", "--blocks", "0:6", "--insecure",
                            "--bind", "tcp://127.0.0.1:0", "--metrics-port", str(taken.getsockname()[1])], capture_output=True, text=True, timeout=120)
    out = r.stdout + r.stderr
    assert r.returncode == 2 and "cannot serve metrics" in out and "--metrics-port" in out and "Traceback" not in out
