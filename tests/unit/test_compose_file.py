"""docker-compose.yml cannot run here (no Docker engine): check its structure against the CLI."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from splitnet.cli import build_parser

pytestmark = pytest.mark.timeout(60)
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def compose():
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def test_services_and_image(compose):
    assert {"edge-a", "edge-b", "cloud", "client", "keygen"} <= set(compose["services"])
    for name, svc in compose["services"].items():
        assert svc["build"]["dockerfile"] == "docker/Dockerfile", name
        assert "NET_ADMIN" in svc["cap_add"], name
        assert any(v.startswith("keys:") for v in svc["volumes"]), name
    assert (ROOT / "docker" / "Dockerfile").is_file() and (ROOT / "docker" / "entrypoint.sh").is_file()
    assert "keys" in compose["volumes"]


def test_every_command_parses_with_the_cli(compose):
    parser = build_parser()
    for name, svc in compose["services"].items():
        if name == "keygen":
            continue  # a shell loop over `splitnet keys gen`: checked in test_secrets_stay_with_their_owner
        args = parser.parse_args(svc["command"])  # SystemExit (a failed test) if a flag or command is unknown
        assert getattr(args, "func", None), name


def test_secrets_stay_with_their_owner(compose):
    """Each node has its own keypair; a secret volume is mounted by keygen and its owner only, and
    the shared volume holds public keys (stages and client mount it read-only)."""
    svcs = compose["services"]
    secret_volumes = {v for v in compose["volumes"] if v.startswith("secret-")}
    assert secret_volumes == {f"secret-{n}" for n in ("edge-a", "edge-b", "cloud", "client")}
    for vol in secret_volumes:
        users = {name for name, svc in svcs.items() if any(m.split(":")[0] == vol for m in svc["volumes"])}
        assert users == {"keygen", vol[len("secret-"):]}, vol
    for name in ("edge-a", "edge-b", "cloud", "client"):
        assert "keys:/keys:ro" in svcs[name]["volumes"], name
    script = svcs["keygen"]["command"][0]
    assert "splitnet keys gen --out /secrets/$$n --name $$n" in script
    parser = build_parser()
    assert parser.parse_args(["keys", "gen", "--out", "/secrets/x", "--name", "x", "--force"]).func
    keys = {n: svcs[n]["environment"]["SPLITNET_SERVER_KEY"] for n in ("edge-a", "edge-b", "cloud")}
    assert len(set(keys.values())) == 3 and all(keys[n] == f"/secrets/{n}/{n}.key_secret" for n in keys)


def test_stage_ports_keys_and_client_route(compose):
    parser = build_parser()
    svcs = compose["services"]
    endpoints = {}
    for name in ("edge-a", "edge-b", "cloud"):
        svc = svcs[name]
        args = parser.parse_args(svc["command"])
        port = args.bind.rsplit(":", 1)[1]
        assert all(p.startswith("127.0.0.1:") for p in svc.get("ports", [])), name  # never published on every interface
        assert svc["environment"]["SPLITNET_SERVER_KEY"].startswith(f"/secrets/{name}/")
        assert svc["environment"]["SPLITNET_KEYS_DIR"] == "/keys/allow"
        ip = svc["networks"]["splitnet"]["ipv4_address"]
        endpoints[name] = f"tcp://{ip}:{port}"
    cmd = svcs["client"]["command"]
    eps = cmd[cmd.index("--endpoints") + 1].split(",")
    assert eps == [endpoints["edge-a"], endpoints["edge-b"], endpoints["cloud"]]
    assert cmd[cmd.index("--reply-host") + 1] == svcs["client"]["networks"]["splitnet"]["ipv4_address"]
    blocks = [parser.parse_args(svcs[n]["command"]).blocks for n in ("edge-a", "edge-b", "cloud")]
    assert blocks == ["0:2", "2:4", "4:6"]
