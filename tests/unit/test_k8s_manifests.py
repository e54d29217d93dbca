"""deploy/k8s: every object valid against the Kubernetes schemas (kubernetes-validate ships them:
no cluster, no network), strict (unknown fields refused), and consistent with the CLI and itself:
container args and probe commands parse, Secrets referenced exist, Services select their pods."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from splitnet.cli import build_parser

kubernetes_validate = pytest.importorskip("kubernetes_validate")
pytestmark = pytest.mark.timeout(60)
K8S = Path(__file__).resolve().parents[2] / "deploy" / "k8s"
VERSION = "1.30.0"  # an older supported release: manifests should not need the newest fields


def _objects() -> list[tuple[str, dict]]:
    out = []
    for path in sorted(K8S.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                out.append((path.name, doc))
    return out


OBJECTS = _objects()


def _by_kind(kind: str) -> dict[str, dict]:
    return {o["metadata"]["name"]: o for _, o in OBJECTS if o["kind"] == kind}


def test_the_manifests_hold_the_deployments_services_and_secrets():
    assert set(_by_kind("Deployment")) == {"splitnet-cloud-stage", "splitnet-api"}
    assert set(_by_kind("Service")) == {"splitnet-cloud-stage", "splitnet-api"}
    assert len(_by_kind("Secret")) >= 3


@pytest.mark.parametrize("name,obj", OBJECTS, ids=[f"{n}:{o['kind']}/{o['metadata']['name']}" for n, o in OBJECTS])
def test_valid_against_the_kubernetes_schema(name, obj):
    for version in (VERSION, kubernetes_validate.utils.latest_version()):
        kubernetes_validate.validate(obj, version, strict=True)


def test_the_validator_refuses_a_typo():
    """The check above can fail: a misspelt field is refused in strict mode."""
    deploy = yaml.safe_load(yaml.safe_dump(_by_kind("Deployment")["splitnet-api"]))
    deploy["spec"]["template"]["spec"]["containers"][0]["readinessProbes"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deploy, VERSION, strict=True)


def test_args_and_probes_parse_with_the_cli_and_keys_come_from_secrets():
    parser = build_parser()
    secrets = _by_kind("Secret")
    for name, dep in _by_kind("Deployment").items():
        pod = dep["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True, name
        mounts = {v["name"]: v["secret"]["secretName"] for v in pod["volumes"]}
        assert set(mounts.values()) <= set(secrets), name  # every key volume is a Secret defined here
        for c in pod["containers"]:
            args = parser.parse_args(c["args"])
            assert getattr(args, "func", None), name
            probes = [c[p] for p in ("startupProbe", "readinessProbe", "livenessProbe") if p in c]
            assert {"readinessProbe", "livenessProbe"} <= set(c), name
            for probe in probes:
                if "exec" in probe:
                    cmd = probe["exec"]["command"]
                    assert cmd[:2] == ["splitnet", "status"], name
                    st = parser.parse_args(cmd[1:])
                    assert st.endpoints == [f"tcp://127.0.0.1:{args.bind.rsplit(':', 1)[1]}"]
                else:
                    assert probe["httpGet"]["path"] == "/health", name
            key_paths = [v for v in (getattr(args, "server_key", ""), getattr(args, "client_key", ""),
                                     getattr(args, "api_keys_file", "")) if v and v.startswith("/")]
            key_paths += [e["value"] for e in c.get("env", []) if e["name"].startswith("SPLITNET_") and "KEY" in e["name"]]
            mounted = [m["mountPath"] for m in c["volumeMounts"] if m["name"] in mounts]
            for p in key_paths:
                assert any(p.startswith(m + "/") or p == m for m in mounted), (name, p)


def test_services_select_their_pods_and_name_real_ports():
    deps = _by_kind("Deployment")
    for name, svc in _by_kind("Service").items():
        dep = deps[name]
        labels = dep["spec"]["template"]["metadata"]["labels"]
        assert all(labels.get(k) == v for k, v in svc["spec"]["selector"].items()), name
        port_names = {p["name"] for c in dep["spec"]["template"]["spec"]["containers"] for p in c["ports"]}
        assert {p["targetPort"] for p in svc["spec"]["ports"]} <= port_names, name
        assert svc["spec"].get("type", "ClusterIP") == "ClusterIP", name  # nothing exposed outside the cluster by default
    api = build_parser().parse_args(deps["splitnet-api"]["spec"]["template"]["spec"]["containers"][0]["args"])
    assert api.endpoints == "tcp://splitnet-cloud-stage:5556"  # the stage's Service name and port
