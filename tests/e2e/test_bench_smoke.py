"""The bench's smallest scenario still runs, so the bench does not rot."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.timeout(120)
def test_quick_bench_produces_results():
    """`python -m bench.run --quick` measures direct and relay and writes results.json."""
    result = subprocess.run(
        [sys.executable, "-m", "bench.run", "--quick"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=100,
    )
    assert result.returncode == 0, result.stderr
    document = json.loads((ROOT / "bench" / "results" / "results.json").read_text())
    peers = document["results"]["N=1"]
    assert {"direct", "relay"} <= set(peers)
    for summary in peers.values():
        assert summary["errors"] == 0
        assert summary["tokens"] == 16
    assert peers["relay"]["coalesced"] == 0
