"""The shared-limits sidecar manifest: valid Kubernetes, several pods, one Redis that every
relay reaches with its password from a mounted secret, and nothing relay does not know."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from relay import cli
from relay.config import parse_limits_store

MANIFEST = Path(__file__).resolve().parents[2] / "deploy" / "kubernetes-shared-limits.yaml"
#: The oldest Kubernetes the manifest is meant for, and the newest the schemas know.
K8S_VERSIONS = ("1.25.0", "latest")


def documents() -> list[dict[str, Any]]:
    yaml = pytest.importorskip("yaml", reason="PyYAML not installed (pip install '.[test]')")
    return [doc for doc in yaml.safe_load_all(MANIFEST.read_text()) if doc]


def find(kind: str, name: str) -> dict[str, Any]:
    (found,) = [d for d in documents() if d["kind"] == kind and d["metadata"]["name"] == name]
    return found


def relay_container() -> tuple[dict[str, Any], dict[str, Any]]:
    pod = find("Deployment", "sglang")["spec"]["template"]["spec"]
    (relay,) = [c for c in pod["containers"] if c["name"] == "relay"]
    return pod, relay


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_the_shared_limits_manifest_is_valid_kubernetes(version):
    """Every object passes the Kubernetes API's schema, strictly (no unknown field), for
    the oldest and the newest version the schemas cover."""
    kv = pytest.importorskip(
        "kubernetes_validate", reason="kubernetes-validate not installed (pip install '.[test]')"
    )
    if version == "latest":
        version = kv.latest_version()
    docs = documents()
    assert [d["kind"] for d in docs].count("Deployment") == 2
    for doc in docs:
        kv.validate(doc, version, strict=True)


def test_every_relay_pod_points_at_the_one_redis_with_a_password_from_a_file():
    """Several relay pods; each names the Redis Service with --limits-store; its password
    is a file of the mounted secret Redis also reads, never a value in the manifest."""
    pod, relay = relay_container()
    assert find("Deployment", "sglang")["spec"]["replicas"] > 1
    env = {e["name"]: e.get("value") for e in relay["env"]}
    store = parse_limits_store(env["RELAY_LIMITS_STORE"])
    service = find("Service", "relay-limits-store")
    assert store.host == service["metadata"]["name"]
    assert store.port in [p["port"] for p in service["spec"]["ports"]]
    password_file = Path(env["RELAY_LIMITS_STORE_PASSWORD_FILE"])
    (mount,) = [m for m in relay["volumeMounts"] if m["mountPath"] == str(password_file.parent)]
    (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    redis = find("Deployment", "relay-limits-store")["spec"]["template"]["spec"]["containers"][0]
    (secret,) = [e["valueFrom"]["secretKeyRef"] for e in redis["env"]]
    assert volume["secret"]["secretName"] == secret["name"]
    assert password_file.name == secret["key"]
    assert "RELAY_LIMITS_STORE_PASSWORD" not in env
    # Only leases and buckets live there: no persistence to wait for at restart.
    assert "--save ''" in " ".join(redis["command"]) and "--appendonly no" in " ".join(
        redis["command"]
    )


def test_the_relay_environment_holds_only_variables_relay_knows():
    """Every RELAY_* variable of the relay container is a flag's (or a known) variable,
    and --limits-store-failure's value is one relay accepts."""
    _, relay = relay_container()
    env = {e["name"]: e.get("value") or "" for e in relay["env"]}
    parser = cli.build_parser()
    assert cli.environment_warnings(parser, env) == []
    assert env["RELAY_LIMITS_STORE_FAILURE"] in ("open", "closed")
