"""The deployment files say what they need: a GPU for SGLang, where the image comes from,
and a container check that runs the image as built and cleans up after itself."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"


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
    assert "Python 3.11 or later" in readme
    assert "../shared/" not in readme
