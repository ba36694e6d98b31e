"""What users install is what the tests run: the wheel, the sdist, the console script.

The rest of the suite imports relay as pip installed it (tests/conftest.py);
these tests check that the install is this tree, whole, and that the
installed relay starts and streams from a directory that is not the checkout.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import tarfile
import threading
import time
import zipfile
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path

import pytest

CHECKOUT = Path(__file__).resolve().parents[2]
#: Every file of the package as the tree has it (relative to the checkout).
TREE = sorted(p.relative_to(CHECKOUT).as_posix() for p in (CHECKOUT / "relay").rglob("*.py"))
LIMIT = 30.0

pytestmark = pytest.mark.skipif(
    os.environ.get("TEST_FROM_CHECKOUT") == "1",
    reason="TEST_FROM_CHECKOUT=1: the checkout is under test, not an install",
)


def installed() -> metadata.Distribution:
    return metadata.distribution("relay")


def console_script() -> Path:
    """The ``relay`` script beside the interpreter running the tests (the venv's)."""
    script = Path(sys.executable).parent / "relay"
    assert script.exists(), f"no console script at {script}: relay is not installed there"
    return script


def outside_env() -> dict[str, str]:
    """The environment of a user's shell: nothing that points into the checkout."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "TEST_FROM_CHECKOUT")}
    return {**env, "PYTHONSAFEPATH": "1"}


def test_the_tree_has_every_package_the_layers_name():
    """The tree this test compares against holds relay's subpackages (the check is not empty)."""
    assert {"relay/http/framing.py", "relay/core/exchange.py", "relay/ops/service.py"} <= set(TREE)
    assert "relay/tools/demo.py" in TREE


def test_the_installed_relay_is_this_tree_byte_for_byte():
    """Every relay/**/*.py of the tree is installed, not editable, with the same bytes.

    Fails for a wheel that lacks a module, and for a stale install that would
    let the suite pass on code other than the tree's."""
    dist = installed()
    direct = dist.read_text("direct_url.json")
    if direct:
        assert not json.loads(direct).get("dir_info", {}).get("editable"), (
            "relay is installed in editable mode; the tests must run what a wheel ships"
        )
    files = {f.as_posix(): f for f in dist.files or []}
    missing = [name for name in TREE if name not in files]
    assert not missing, f"the installed relay lacks {missing}"
    stale = [
        name
        for name in TREE
        if Path(files[name].locate()).read_bytes() != (CHECKOUT / name).read_bytes()
    ]
    assert not stale, f"installed files differ from the tree (reinstall relay): {stale}"
    # A module deleted from the tree but left in setuptools' build/ folder
    # would still ship; the install must hold exactly the tree's modules.
    extra = {n for n in files if n.startswith("relay/") and n.endswith(".py")} - set(TREE)
    assert not extra, f"the installed relay holds modules the tree does not: {sorted(extra)}"
    import relay

    assert dist.version == relay.__version__
    assert not Path(relay.__file__).resolve().is_relative_to(CHECKOUT / "relay")


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_the_sdist_and_the_wheel_built_from_it_carry_the_whole_tree(tmp_path):
    """`python -m build` (an sdist, then the wheel from it) ships every module and the licence."""
    result = subprocess.run(
        [sys.executable, "-m", "build", "--outdir", str(tmp_path), str(CHECKOUT)],
        capture_output=True,
        text=True,
        timeout=220,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    (wheel,) = tmp_path.glob("relay-*.whl")
    (sdist,) = tmp_path.glob("relay-*.tar.gz")
    with zipfile.ZipFile(wheel) as archive:
        in_wheel = set(archive.namelist())
        metadata_text = next(
            archive.read(n).decode() for n in in_wheel if n.endswith(".dist-info/METADATA")
        )
    assert not [name for name in TREE if name not in in_wheel]
    assert any(n.endswith("/LICENSE") for n in in_wheel if ".dist-info/" in n)
    entry_points = next(n for n in in_wheel if n.endswith(".dist-info/entry_points.txt"))
    with zipfile.ZipFile(wheel) as archive:
        assert "relay = relay.cli:main" in archive.read(entry_points).decode()
    assert "Requires-Python: >=3.11" in metadata_text
    assert "Classifier: License :: OSI Approved :: MIT License" in metadata_text
    with tarfile.open(sdist) as archive:
        prefix = archive.getnames()[0].split("/")[0]
        in_sdist = {n.removeprefix(prefix + "/") for n in archive.getnames()}
    for name in [*TREE, "LICENSE", "README.md", "CHANGELOG.md", "setup.cfg", "pyproject.toml"]:
        assert name in in_sdist, f"the sdist lacks {name}"


def run_installed(*args: str, cwd: Path, timeout: float = LIMIT) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(console_script()), *args],
        cwd=cwd,
        env=outside_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_the_console_script_answers_version_and_help_outside_the_checkout(tmp_path):
    """`relay --version` and `relay --help`, run from a directory that is not the checkout."""
    version = run_installed("--version", cwd=tmp_path)
    assert version.returncode == 0, version.stderr
    assert installed().version in version.stdout
    help_text = run_installed("--help", cwd=tmp_path)
    assert help_text.returncode == 0, help_text.stderr
    assert "--upstream" in help_text.stdout and "--listen" in help_text.stdout


@pytest.mark.timeout(60)
def test_the_demo_runs_from_the_installed_package(tmp_path):
    """`relay demo` starts its own upstream and relay, probes both and says relay streams."""
    result = run_installed("demo", "--tokens", "6", "--ttft", "50ms", "--gap", "10ms", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "relay" in result.stdout and "direct" in result.stdout, result.stdout
    assert "Traceback" not in result.stderr


def _started(process: subprocess.Popen, pattern: str, lines: list[str]) -> int:
    """Read stderr (or stdout) lines until ``pattern`` names a port; keep draining after."""
    stream = process.stderr if process.stderr is not None else process.stdout
    assert stream is not None
    deadline = time.monotonic() + LIMIT
    while time.monotonic() < deadline:
        line = stream.readline()
        lines.append(line)
        match = re.search(pattern, line)
        if match:
            threading.Thread(target=stream.read, daemon=True).start()
            return int(match.group(1))
        if not line and process.poll() is not None:
            break
    raise AssertionError("did not start: " + "".join(lines))


@pytest.fixture
def installed_pair(tmp_path) -> Iterator[int]:
    """The installed streamer and the installed relay in front of it; yields relay's port."""
    processes: list[subprocess.Popen] = []
    try:
        streamer = subprocess.Popen(
            [sys.executable, "-m", "relay.tools.streamer", "--listen", "127.0.0.1:0"],
            cwd=tmp_path,
            env=outside_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        processes.append(streamer)
        port = _started(streamer, r"listening on http://127\.0\.0\.1:(\d+)", [])
        upstream = f"127.0.0.1:{port}"
        relay = subprocess.Popen(
            [str(console_script()), "--listen", "127.0.0.1:0", "--upstream", upstream],
            cwd=tmp_path,
            env=outside_env(),
            stderr=subprocess.PIPE,
            text=True,
        )
        processes.append(relay)
        yield _started(relay, r"listening on 127\.0\.0\.1:(\d+)", [])
    finally:
        for process in processes:
            process.kill()
            process.wait(LIMIT)


@pytest.mark.timeout(60)
def test_the_installed_relay_serves_a_stream_from_outside_the_checkout(installed_pair):
    """A client gets a whole chunked SSE stream, ending in [DONE], through the installed relay."""
    body = json.dumps({"model": "m", "stream": True, "messages": []}).encode()
    request = (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: relay\r\nConnection: close\r\n"
        b"Content-Type: application/json\r\nAccept-Encoding: gzip, deflate\r\n"
        + f"Content-Length: {len(body)}\r\n\r\n".encode()
        + body
    )
    with socket.create_connection(("127.0.0.1", installed_pair), timeout=LIMIT) as sock:
        sock.sendall(request)
        received = bytearray()
        while chunk := sock.recv(65536):
            received += chunk
    head, _, payload = bytes(received).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), head
    assert b"transfer-encoding: chunked" in head.lower()
    assert payload.endswith(b"0\r\n\r\n"), payload[-200:]
    assert b"data: [DONE]" in payload
