"""The deployment files say what they need: a GPU for SGLang, where the image comes from,
and a container check that runs the image as built and cleans up after itself. The
Kubernetes manifest is valid against the API's schema and runs SGLang as written: its
model mounted, shared memory, probes, and a shutdown in which relay drains first."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from relay.config import parse_duration

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
SIDECAR = DEPLOY / "kubernetes-sidecar.yaml"
#: The oldest Kubernetes the manifest is meant for, and the newest the schemas know.
K8S_VERSIONS = ("1.25.0", "latest")


def service_block(text: str, name: str) -> str:
    """The lines of one service of a compose file (two-space indented YAML)."""
    match = re.search(rf"^  {name}:\n((?:    .*\n|\n)*)", text, re.MULTILINE)
    assert match, name
    return match.group(1)


def test_compose_gives_sglang_the_gpu_and_host_ipc():
    """SGLang's service reserves an NVIDIA GPU and shares the host IPC namespace."""
    sglang = service_block((DEPLOY / "compose.yaml").read_text(), "sglang")
    assert re.search(r"- driver: nvidia\n\s+.*\n\s+capabilities: \[gpu\]", sglang), sglang
    assert "reservations:" in sglang and re.search(r"^\s+ipc: host", sglang, re.MULTILINE)


def test_the_sidecar_says_where_the_relay_image_comes_from():
    """The Kubernetes manifest shows how to build and push the relay image, and never
    makes the kubelet pull relay:latest from Docker Hub."""
    text = (DEPLOY / "kubernetes-sidecar.yaml").read_text()
    assert "docker build -f deploy/Containerfile" in text and "docker push" in text
    relay = text[text.index("- name: relay") :]
    assert re.search(r"image: \S+\s.*\n\s+imagePullPolicy: IfNotPresent", relay)


@pytest.mark.skipif(shutil.which("bash") is None, reason="no bash")
def test_the_container_check_runs_the_image_entrypoint_and_removes_its_images():
    """check-container.sh parses, runs the image's own ENTRYPOINT/ENV/USER, checks JSON
    logs, and removes the images it built unless --keep."""
    script = DEPLOY / "check-container.sh"
    subprocess.run(["bash", "-n", str(script)], check=True, timeout=10)
    text = script.read_text()
    assert "podman image inspect" in text and "Entrypoint" in text and '"Env"' in text
    assert '"${in_image[@]}" "${command[@]}"' in text  # relay's command comes from the image
    # Only the image has relay installed: the host's python3 never runs it (it may lack h11).
    assert "python3 -m relay" not in text and ">/dev/null &" not in text
    assert "did not log JSON" in text
    assert re.search(r'keep == no \]\]; then podman rmi -f "\$image" "\$base"', text)
    assert "--layers=false" in text
    containerfile = (DEPLOY / "Containerfile").read_text()
    # The WORKDIR the image runs in must exist in it (the sources are removed).
    assert containerfile.rstrip().count("WORKDIR /\n") == 1


def test_ci_runs_exactly_the_readme_test_command_in_a_virtual_environment():
    """.ci/run's command is the README's test command, and it installs into a venv
    (a system pip refuses on Debian and Ubuntu: externally-managed-environment)."""
    root = DEPLOY.parent
    readme = (root / "README.md").read_text()
    block = readme.split("```sh\n", 1)[1].split("```", 1)[0]
    commands = [line.split("#", 1)[0].strip() for line in block.splitlines()]
    assert commands[0].startswith("python3 -m venv .venv && .venv/bin/pip install . && ")
    assert commands[1] == (root / ".ci" / "run").read_text().strip().splitlines()[-1]
    assert commands[1].startswith("python3 -m venv .venv && .venv/bin/pip install '.[test]'")
    # The suite runs the installed relay: -P keeps the checkout's relay/ off the path.
    assert commands[1].endswith(".venv/bin/python -P -m pytest -q")
    assert commands[0].endswith(".venv/bin/relay demo")
    assert "Python 3.11 or later" in readme
    assert "../shared/" not in readme


def manifest() -> list[dict[str, Any]]:
    yaml = pytest.importorskip("yaml", reason="PyYAML not installed (pip install '.[test]')")
    return [doc for doc in yaml.safe_load_all(SIDECAR.read_text()) if doc]


def pod_spec() -> dict[str, Any]:
    (deployment,) = [doc for doc in manifest() if doc["kind"] == "Deployment"]
    return deployment["spec"]["template"]["spec"]


def container(name: str) -> dict[str, Any]:
    (found,) = [c for c in pod_spec()["containers"] if c["name"] == name]
    return found


def env(c: dict[str, Any], name: str) -> str:
    (value,) = [e["value"] for e in c.get("env", []) if e["name"] == name]
    return value


def arg(c: dict[str, Any], flag: str) -> str:
    args = c["args"]
    return args[args.index(flag) + 1]


def prestop_sleep(c: dict[str, Any]) -> float:
    """Seconds a container's preStop hook sleeps (an exec of sleep, or the sleep action)."""
    hook = c["lifecycle"]["preStop"]
    if "sleep" in hook:
        return float(hook["sleep"]["seconds"])
    command = hook["exec"]["command"]
    assert command[0] == "sleep" and len(command) == 2, command
    return float(command[1])


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_the_sidecar_manifest_is_valid_kubernetes(version):
    """Every object in the manifest passes the Kubernetes API's schema, strictly (no
    unknown field), for the oldest and the newest version the schemas cover."""
    kv = pytest.importorskip(
        "kubernetes_validate", reason="kubernetes-validate not installed (pip install '.[test]')"
    )
    if version == "latest":
        version = kv.latest_version()
    docs = manifest()
    assert {doc["kind"] for doc in docs} >= {"Deployment", "Service"}
    for doc in docs:
        kv.validate(doc, version, strict=True)


def test_sglang_reads_its_model_from_a_mounted_volume():
    """--model-path lies under a volume mounted into SGLang's container, and the claim
    that volume names is in the manifest."""
    sglang = container("sglang")
    model_path = arg(sglang, "--model-path")
    mounts = [m for m in sglang["volumeMounts"] if model_path.startswith(m["mountPath"] + "/")]
    assert mounts, (model_path, sglang["volumeMounts"])
    (volume,) = [v for v in pod_spec()["volumes"] if v["name"] == mounts[0]["name"]]
    claim = volume["persistentVolumeClaim"]["claimName"]
    claims = [d["metadata"]["name"] for d in manifest() if d["kind"] == "PersistentVolumeClaim"]
    assert claim in claims


def test_sglang_gets_a_memory_backed_dev_shm():
    """/dev/shm in SGLang's container is an emptyDir in memory (a container's default
    64 MiB is too small for its processes' shared tensors)."""
    sglang = container("sglang")
    (mount,) = [m for m in sglang["volumeMounts"] if m["mountPath"] == "/dev/shm"]
    (volume,) = [v for v in pod_spec()["volumes"] if v["name"] == mount["name"]]
    assert volume["emptyDir"]["medium"] == "Memory"


def test_sglang_has_startup_and_readiness_probes_on_its_own_port():
    """SGLang's startup probe asks /health and its readiness probe /health_generate, on
    the port it is started with; the startup probe allows minutes for loading a model."""
    sglang = container("sglang")
    port = arg(sglang, "--port")
    assert env(container("relay"), "RELAY_UPSTREAM").endswith(f":{port}")
    for probe, path in (("startupProbe", "/health"), ("readinessProbe", "/health_generate")):
        command = " ".join(sglang[probe]["exec"]["command"])
        # It listens on the pod's loopback only: an httpGet probe (to the pod IP) fails.
        assert f"http://{arg(sglang, '--host')}:{port}{path}'" in command, command
    startup = sglang["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 600


def test_relay_drains_before_sglang_is_stopped():
    """SGLang's SIGTERM waits (preStop) until relay's preStop and whole drain are over,
    and the grace period covers that wait and SGLang's own stop."""
    relay, sglang = container("relay"), container("sglang")
    drain = parse_duration(env(relay, "RELAY_DRAIN_TIMEOUT"), "RELAY_DRAIN_TIMEOUT")
    relay_done = prestop_sleep(relay) + drain
    assert prestop_sleep(sglang) > relay_done, (prestop_sleep(sglang), relay_done)
    assert pod_spec()["terminationGracePeriodSeconds"] >= prestop_sleep(sglang) + 10


def test_compose_models_folder_is_the_clones_models_folder():
    """compose.yaml's relative paths resolve against deploy/; its model folder is the
    clone's models/ (where the README's commands run), or $MODELS_DIR."""
    sglang = service_block((DEPLOY / "compose.yaml").read_text(), "sglang")
    match = re.search(r"\$\{MODELS_DIR:-([^}]+)\}:/models:ro", sglang)
    assert match, sglang
    assert (DEPLOY / match.group(1)).resolve() == DEPLOY.parent / "models"
    assert "--model-path /models/model" in sglang


def test_the_unit_and_the_readme_name_one_key_file():
    """The unit's commented key lines load /etc/relay/keys, the file the README's worked
    example writes (after creating /etc/relay), and say who owns it with what mode."""
    service = (DEPLOY / "relay.service").read_text()
    readme = (DEPLOY.parent / "README.md").read_text()
    assert "# LoadCredential=keys:/etc/relay/keys\n" in service
    assert "# Environment=RELAY_API_KEY_FILE=%d/keys\n" in service
    assert "root:root, mode 0600" in service
    named = set(re.findall(r"/etc/relay/[\w.-]+", service + readme))
    assert named == {"/etc/relay/keys"}, named
    example = readme[: readme.index("--api-key-file /etc/relay/keys")]
    assert example.rindex("mkdir -p /etc/relay") > example.rindex("```sh")


@pytest.mark.skipif(
    shutil.which("systemd-analyze") is None,
    reason="systemd-analyze not installed (apt-get install systemd): unit not verified",
)
def test_the_unit_with_its_key_lines_on_verifies(tmp_path):
    """Uncommenting the unit's LoadCredential= and RELAY_API_KEY_FILE lines gives a unit
    that systemd-analyze verify accepts."""
    service = (DEPLOY / "relay.service").read_text()
    service = service.replace("# LoadCredential=", "LoadCredential=")
    service = service.replace(
        "# Environment=RELAY_API_KEY_FILE=", "Environment=RELAY_API_KEY_FILE="
    )
    assert "\nLoadCredential=keys:/etc/relay/keys\n" in service
    root = tmp_path / "root"
    units = root / "etc" / "systemd" / "system"
    units.mkdir(parents=True)
    (units / "relay.service").write_text(service)
    shutil.copy(DEPLOY / "relay.socket", units / "relay.socket")
    relay = root / "opt" / "relay" / "bin" / "relay"
    relay.parent.mkdir(parents=True)
    relay.write_text("#!/bin/sh\n")  # stands in for the venv's console script
    relay.chmod(0o755)
    (root / "opt" / "relay" / "README.md").write_text("relay\n")
    (root / "bin").mkdir()
    shutil.copy("/bin/kill", root / "bin" / "kill")
    keys = root / "etc" / "relay" / "keys"
    keys.parent.mkdir()
    keys.write_text("chat sk-chat\n")
    keys.chmod(0o600)
    system = root / "usr" / "lib" / "systemd" / "system"
    system.mkdir(parents=True)
    for target in Path("/usr/lib/systemd/system").glob("*.target"):
        shutil.copy(target, system / target.name)
    result = subprocess.run(
        [
            *("systemd-analyze", "verify", "--man=no", f"--root={root}"),
            *("/etc/systemd/system/relay.service", "/etc/systemd/system/relay.socket"),
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0 and not result.stderr.strip(), result.stderr
