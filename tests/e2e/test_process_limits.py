"""Start-up settings of the relay process: its descriptor limit."""

from __future__ import annotations

import re
import resource
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(60)

ROOT = Path(__file__).resolve().parents[2]
LIMIT = 20.0


def _limited(soft: int, hard: int):
    def set_limits() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))

    return set_limits


def _start(max_connections: int, soft: int, hard: int) -> tuple[subprocess.Popen, list[str]]:
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "relay",
            "--listen",
            "127.0.0.1:0",
            "--upstream",
            "127.0.0.1:9",
            "--max-connections",
            str(max_connections),
        ],
        cwd=ROOT,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=_limited(soft, hard),  # only setrlimit, before exec
    )
    assert process.stderr is not None
    lines: list[str] = []
    deadline = time.monotonic() + LIMIT
    while time.monotonic() < deadline:
        line = process.stderr.readline()
        if not line:
            break
        lines.append(line)
        if "listening on" in line:
            return process, lines
    process.kill()
    raise AssertionError("relay did not start: " + "".join(lines))


def _soft_limit(pid: int) -> int:
    text = Path(f"/proc/{pid}/limits").read_text()
    match = re.search(r"Max open files\s+(\d+)\s+(\d+)", text)
    assert match, text
    return int(match.group(1))


@pytest.mark.parametrize(
    ("max_connections", "warned"), [(100, False), (1000, True)], ids=["fits", "too-many"]
)
def test_the_soft_descriptor_limit_is_raised_and_a_shortfall_named(max_connections, warned):
    """relay raises its soft RLIMIT_NOFILE to the hard limit at start-up, and says in
    one line when --max-connections streams (two descriptors each) cannot fit."""
    hard = 768
    _, current_hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if current_hard != resource.RLIM_INFINITY and current_hard < hard:
        pytest.skip(f"this process's hard descriptor limit is only {current_hard}")
    process, lines = _start(max_connections, soft=128, hard=hard)
    try:
        assert _soft_limit(process.pid) == hard
    finally:
        process.terminate()
        process.wait(LIMIT)
    shortfall = [line for line in lines if "file descriptors" in line]
    if warned:
        assert len(shortfall) == 1, lines
        assert "--max-connections 1000" in shortfall[0] and "may open 768" in shortfall[0]
    else:
        assert not shortfall, lines


def test_what_start_up_allocated_is_kept_out_of_later_collections():
    """After start-up the heap so far is frozen (later full collections do not walk
    it), and full collections are ten times rarer than CPython's default."""
    import gc

    from relay.ops.process import FULL_COLLECTION_EVERY, freeze_startup

    thresholds = gc.get_threshold()
    try:
        freeze_startup()
        assert gc.get_freeze_count() > 1000
        assert gc.get_threshold() == (*thresholds[:2], FULL_COLLECTION_EVERY) == (700, 10, 100)
    finally:
        gc.unfreeze()
        gc.set_threshold(*thresholds)
