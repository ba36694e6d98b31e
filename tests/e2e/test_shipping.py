"""The ways relay ships run for real: the container image built from
deploy/Containerfile, and the systemd unit over a virtual environment installed
as its header says. Both start from a directory outside the checkout."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
#: How long any one step of the unit's run may take on a loaded machine.
LIMIT = 60


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def container_check_skip_reason() -> str | None:
    if os.geteuid() != 0:
        return "not root: the container image check needs root (podman, chroot, netns)"
    missing = [t for t in ("podman", "debootstrap", "ip") if shutil.which(t) is None]
    if missing:
        return f"{', '.join(missing)} not installed (apt-get install podman debootstrap iproute2)"
    return None


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.skipif(
    container_check_skip_reason() is not None, reason=str(container_check_skip_reason())
)
def test_the_container_image_streams_through_its_own_entrypoint(tmp_path):
    """deploy/check-container.sh, run from a fresh shell outside the checkout, builds the
    image, streams through its ENTRYPOINT/ENV/USER, passes its HEALTHCHECK and removes
    the images it built."""
    env = {
        "PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
        "HOME": os.environ.get("HOME", "/"),
    }
    for name in ("RELAY_CHECK_CACHE", "http_proxy", "https_proxy", "no_proxy"):
        if name in os.environ:
            env[name] = os.environ[name]
    started = time.monotonic()
    result = subprocess.run(
        ["bash", str(DEPLOY / "check-container.sh")],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=840,
    )
    took = time.monotonic() - started
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-6000:]
    assert "container image OK" in result.stdout and "verdict      streaming" in result.stdout
    print(f"container image check: {took:.0f} s")
    images = subprocess.run(
        ["podman", "images", "--format", "{{.Repository}}:{{.Tag}}"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    tag = re.search(r"Successfully tagged (localhost/relay:check-\d+)", output)
    assert tag and tag.group(1) not in images, images
