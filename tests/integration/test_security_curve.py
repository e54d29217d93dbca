"""CURVE on real stage processes, with one keypair shared by the stages and with a keypair per
stage: an allowed client runs a pipeline (results over its connection and to a bound result
socket); wrong, missing and plaintext keys are refused with AuthError within 2 s; plaintext
serving needs --insecure."""

from __future__ import annotations

import os
import time

import pytest

from splitnet.edge.config import ClientConfig
from splitnet.errors import AuthError
from splitnet.wire.security import generate_keypair
from stage_processes import serve_stage

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    d = tmp_path_factory.mktemp("keys")
    generate_keypair(d, "server")
    generate_keypair(d, "server-b")
    generate_keypair(d / "stages-b", "upstream")  # stage a's own key, trusted by stage b
    os.replace(d / "stages-b" / "upstream.key_secret", d / "upstream.key_secret")
    generate_keypair(d, "other")
    generate_keypair(d / "allow", "client")
    os.replace(d / "allow" / "client.key_secret", d / "client.key_secret")
    return d


@pytest.fixture(scope="module", params=["shared-keypair", "keypair-per-stage"])
def secure_pipeline(keys, request):
    procs = []
    allow = ["--keys-dir", str(keys / "allow")]
    if request.param == "shared-keypair":
        extra_a = extra_b = ["--server-key", str(keys / "server.key_secret"), *allow]
        server_key = str(keys / "server.key")
    else:
        extra_a = ["--server-key", str(keys / "upstream.key_secret"), *allow]
        extra_b = ["--server-key", str(keys / "server-b.key_secret"), *allow, "--stage-keys-dir", str(keys / "stages-b")]
        server_key = f"{keys / 'stages-b' / 'upstream.key'},{keys / 'server-b.key'}"
    try:
        a, ep_a = serve_stage("0:3", extra_a)
        procs.append(a)
        b, ep_b = serve_stage("3:6", extra_b)
        procs.append(b)
        yield [ep_a, ep_b], procs, server_key
    finally:
        for p in procs:  # kill leftovers even when a test failed
            p.kill()
            p.wait(timeout=10)


def _connect(endpoints, **cfg):
    import splitnet.edge.sdk as sdk

    return sdk.connect(endpoints, config=ClientConfig(connect_timeout_s=10, timeout_s=30, **cfg))


@pytest.mark.parametrize("reply_via", ["connection", "bind"])
def test_allowed_client_runs_pipeline(secure_pipeline, keys, reply_via):
    endpoints, _, server_key = secure_pipeline
    with _connect(endpoints, client_key=str(keys / "client.key_secret"), server_key=server_key, reply_via=reply_via) as s:
        out = s.infer({"text": ["curve keeps the cut private"]})
    assert out and all(v.size for v in out.values())


@pytest.mark.parametrize(
    "case, cfg",
    [
        ("unlisted client key", {"client_key": "other.key_secret"}),
        ("wrong server key", {"client_key": "client.key_secret", "server_key": "other.key"}),
        ("plaintext client", {}),
    ],
)
def test_refused_within_2s(secure_pipeline, keys, case, cfg):
    endpoints, procs, server_key = secure_pipeline
    cfg = {k: str(keys / v) for k, v in cfg.items()}
    if cfg and "server_key" not in cfg:
        cfg["server_key"] = server_key
    t0 = time.monotonic()
    with pytest.raises(AuthError) as e:
        _connect(endpoints, **cfg)
    elapsed = time.monotonic() - t0
    assert elapsed <= 2.0, f"{case}: refusal took {elapsed:.2f} s"
    assert "stage" in str(e.value) and ("key" in str(e.value) or "CURVE" in str(e.value))
    assert all(p.poll() is None for p in procs), "a refused client must not take a stage down"


def test_plaintext_needs_insecure():
    from splitnet.errors import ConfigError
    from splitnet.wire.security import stage_socket_config

    with pytest.raises(ConfigError, match="--insecure"):
        stage_socket_config("", "", False, "tcp://0.0.0.0:5555")
    assert stage_socket_config("", "", True, "tcp://0.0.0.0:5555").security is None
    with pytest.raises(ConfigError, match="--insecure"):  # loopback too: plaintext is always explicit
        stage_socket_config("", "", False, "tcp://127.0.0.1:0")
    assert stage_socket_config("", "", True, "tcp://127.0.0.1:0").security is None
