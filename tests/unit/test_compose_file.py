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
        args = parser.parse_args(svc["command"])  # SystemExit (a failed test) if a flag or command is unknown
        assert getattr(args, "func", None), name


def test_stage_ports_keys_and_client_route(compose):
    parser = build_parser()
    svcs = compose["services"]
    endpoints = {}
    for name in ("edge-a", "edge-b", "cloud"):
        svc = svcs[name]
        args = parser.parse_args(svc["command"])
        port = args.bind.rsplit(":", 1)[1]
        assert f"{port}:{port}" in svc["ports"]
        assert svc["environment"]["SPLITNET_SERVER_KEY"].startswith("/keys/")
        assert svc["environment"]["SPLITNET_KEYS_DIR"] == "/keys/allow"
        ip = svc["networks"]["splitnet"]["ipv4_address"]
        endpoints[name] = f"tcp://{ip}:{port}"
    cmd = svcs["client"]["command"]
    eps = cmd[cmd.index("--endpoints") + 1].split(",")
    assert eps == [endpoints["edge-a"], endpoints["edge-b"], endpoints["cloud"]]
    assert cmd[cmd.index("--reply-host") + 1] == svcs["client"]["networks"]["splitnet"]["ipv4_address"]
    blocks = [parser.parse_args(svcs[n]["command"]).blocks for n in ("edge-a", "edge-b", "cloud")]
    assert blocks == ["0:2", "2:4", "4:6"]
