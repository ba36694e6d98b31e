"""The ways relay ships run for real: the container image built from
deploy/Containerfile, and the systemd unit over a virtual environment installed
as its header says. Both start from a directory outside the checkout."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
#: What a clone of relay does not hold (build output, caches, local environments).
LOCAL_ONLY = (".git", "build", "dist", "*.egg-info", "__pycache__", ".*_cache", ".venv", "results")
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
    # A fresh root shell's: no virtual environment's python3 (with h11) comes first.
    env = {
        "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "HOME": os.environ.get("HOME", "/"),
    }
    proxies = ("http_proxy", "https_proxy", "no_proxy", "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY")
    for name in ("CHECK_CONTAINER_CACHE", *proxies):
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


def unit_settings(text: str, key: str) -> list[str]:
    """Every value of ``key=`` in a unit file's text, in order (comments skipped)."""
    return re.findall(rf"^{key}=(.*)$", text, re.MULTILINE)


def install_as_the_unit_says(prefix: Path, cwd: Path) -> None:
    """The unit's header: ``python3 -m venv /opt/relay`` and ``/opt/relay/bin/pip install .``
    from a clone of relay, at ``prefix`` instead of /opt/relay (not editable)."""
    service = (DEPLOY / "relay.service").read_text()
    assert "python3 -m venv /opt/relay" in service and "/opt/relay/bin/pip install ." in service
    # A clean copy, as a fresh clone is: a build/ left in the checkout by an earlier
    # in-tree build would hand pip modules the packaging no longer names.
    clone = cwd / "relay-clone"
    shutil.copytree(ROOT, clone, ignore=shutil.ignore_patterns(*LOCAL_ONLY))
    subprocess.run([sys.executable, "-m", "venv", str(prefix)], check=True, timeout=LIMIT, cwd=cwd)
    result = subprocess.run(
        [str(prefix / "bin" / "pip"), "install", "--quiet", "--no-input", str(clone)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=cwd,
        env={**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"},
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


def read_notify(sock: socket.socket, wanted: bytes, seen: list[bytes]) -> bytes:
    """The first datagram holding ``wanted``; every one read goes to ``seen``."""
    while True:
        message = sock.recv(4096)  # bounded by the socket's timeout
        seen.append(message)
        if wanted in message.split(b"\n"):
            return message


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.skipif(
    shutil.which("systemd-socket-activate") is None,
    reason="systemd-socket-activate not installed (apt-get install systemd)",
)
def test_the_systemd_unit_runs_as_shipped(tmp_path):
    """relay installed into a venv as the unit's header says, started with the unit's own
    ExecStart, Environment= lines and socket (systemd-socket-activate) from outside the
    checkout: it reports READY=1, streams one request, and on SIGTERM says STOPPING=1
    and exits 0."""
    prefix = tmp_path / "opt-relay"
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    started = time.monotonic()
    install_as_the_unit_says(prefix, outside)
    installed = time.monotonic() - started

    service = (DEPLOY / "relay.service").read_text()
    socket_unit = (DEPLOY / "relay.socket").read_text()
    # The installed relay's own streamer is the upstream.
    upstream = subprocess.Popen(
        [str(prefix / "bin" / "python"), "-m", "relay.tools.streamer", "--listen", "127.0.0.1:0"],
        stdout=subprocess.PIPE,
        text=True,
        cwd=outside,
    )
    port, admin = free_port(), free_port()
    # Only the /opt/relay prefix and the ports change; every other value is the unit's.
    rewrite = {"30000": None, "4000": str(port), "4001": str(admin)}
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp_path / "notify"))
    notify.settimeout(LIMIT)
    relay: subprocess.Popen[str] | None = None
    try:
        assert upstream.stdout is not None
        line = upstream.stdout.readline()
        upstream_port = re.search(r":(\d+)$", line.strip())
        assert upstream_port, line
        rewrite["30000"] = upstream_port.group(1)

        def ported(value: str) -> str:
            value = value.replace("/opt/relay", str(prefix))
            return re.sub(r"(?<![\d.])(\d{4,5})$", lambda m: rewrite.get(m[1]) or m[1], value)

        environment = [ported(v) for v in unit_settings(service, "Environment")]
        assert any(v.startswith("RELAY_UPSTREAM=") for v in environment), environment
        (exec_start,) = unit_settings(service, "ExecStart")
        (listen_stream,) = unit_settings(socket_unit, "ListenStream")
        assert exec_start.startswith("/opt/relay/bin/")
        (watchdog,) = unit_settings(service, "WatchdogSec")
        command = [
            "systemd-socket-activate",
            "--listen",
            ported(listen_stream),
            *(f"--setenv={v}" for v in environment),
            f"--setenv=NOTIFY_SOCKET={tmp_path / 'notify'}",
            f"--setenv=WATCHDOG_USEC={int(watchdog) * 1_000_000}",
            *ported(exec_start).split(),
        ]
        relay = subprocess.Popen(command, cwd=outside, stderr=subprocess.PIPE, text=True)
        with httpx.stream(
            "POST",
            f"http://127.0.0.1:{port}/v1/chat/completions",
            json={
                "model": "m",
                "messages": [{"role": "user", "content": "hi"}],
                "stream": True,
                "max_tokens": 4,
            },
            timeout=LIMIT,
        ) as response:
            body = b"".join(response.iter_bytes())
        assert response.status_code == 200, body
        assert body.count(b"data: ") >= 5 and body.rstrip().endswith(b"data: [DONE]"), body
        # systemd-socket-activate starts relay on the first connection, as systemd does
        # for a socket unit whose service is not started yet: READY=1 came before the answer.
        seen: list[bytes] = []
        ready = read_notify(notify, b"READY=1", seen)
        assert f":{port}".encode() in ready, ready  # its STATUS= names the socket it was given
        health = httpx.get(f"http://127.0.0.1:{admin}/health", timeout=LIMIT)
        assert health.status_code == 200

        relay.send_signal(signal.SIGTERM)
        read_notify(notify, b"STOPPING=1", seen)
        assert relay.wait(LIMIT) == 0
        _, errors = relay.communicate(timeout=LIMIT)
        assert "Traceback" not in errors, errors
    finally:
        if relay is not None and relay.poll() is None:
            relay.kill()
            relay.wait(LIMIT)
        upstream.terminate()
        upstream.wait(LIMIT)
        notify.close()
    print(f"systemd unit test: install {installed:.0f} s, total {time.monotonic() - started:.0f} s")
