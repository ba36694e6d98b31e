"""The bench's smallest scenario still runs, so the bench does not rot."""

from __future__ import annotations

import json
import re
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


def test_the_cdf_panel_is_titled_by_its_data_and_reaches_one():
    """The CDF shows N=1000 when it ran, else N=1 (and says so); it ends at exactly 1.0."""
    from bench.run import cdf_points, cdf_scenario

    assert cdf_scenario({"N=1": {}}) == "N=1"
    assert cdf_scenario({"N=1": {}, "N=1000": {}}) == "N=1000"
    xs, ys = cdf_points([3.0, 1.0, 2.0])
    assert xs == [1.0, 2.0, 3.0] and ys[-1] == 1.0 and ys[0] == 1 / 3


def test_cpu_too_small_to_measure_is_not_reported_as_zero():
    """A run shorter than a few clock ticks reports no CPU per token, not 0.00."""
    from bench.peers import CLOCK_TICKS
    from bench.run import cpu_per_token_us, fmt

    assert fmt(cpu_per_token_us(0.0, 16)) == "-"
    assert fmt(cpu_per_token_us(1 / CLOCK_TICKS, 16)) == "-"
    assert cpu_per_token_us(1.0, 1000) == 1000.0
    assert cpu_per_token_us(None, 16) is None


def test_a_cpu_figure_too_small_to_measure_is_a_target_not_measured():
    """Every CPU-per-token target says "not measured" for a missing figure instead of failing."""
    from bench.run import targets

    def peers(relay: float | None) -> dict:
        other = {"coalesced": 0, "added_ms_p99": 1.0}
        return {
            "relay": {**other, "cpu_us_per_token": relay},
            "nginx": {**other, "cpu_us_per_token": 2.0},
        }

    def cpu_verdicts(relay: float | None) -> list[str]:
        scenarios = ("saturation burst 1", "N=100", "100 x 500 tokens")
        verdicts = targets({scenario: peers(relay) for scenario in scenarios})
        return [v for v in verdicts if "CPU per token" in v]

    verdicts = cpu_verdicts(None)
    assert len(verdicts) == 3 and all(v.startswith("n/a ") for v in verdicts), verdicts
    verdicts = cpu_verdicts(2.5)
    assert [v[:4] for v in verdicts] == ["PASS", "PASS", "MISS"], verdicts
    assert "100 x 500 tokens ≤ 1.15x nginx: 2.50 vs 2.00 µs" in verdicts[2]


def test_bench_help_lists_its_flags_on_separate_lines():
    """`python -m bench.run --help` keeps the usage examples as lines and documents --quick."""
    result = subprocess.run(
        [sys.executable, "-m", "bench.run", "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0
    assert "\n    python -m bench.run --quick    # " in result.stdout
    assert re.search(r"\n  --quick\s+only N=1", result.stdout)


@pytest.mark.timeout(120)
def test_a_tiny_held_run_measures_relay_beside_nginx():
    """`python -m bench.run --held` with a few short streams measures relay (and nginx
    when installed): every token arrives, relay's loop lag is sampled, and the memory
    per held stream is a figure."""
    result = subprocess.run(
        [sys.executable, "-m", "bench.run", "--held", "--held-sizes", "10", "--held-tokens", "3"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=100,
    )
    assert result.returncode == 0, result.stderr
    document = json.loads((ROOT / "bench" / "results" / "held.json").read_text())
    peers = document["results"]["held N=10"]
    assert "relay" in peers
    for summary in peers.values():
        assert (summary["errors"], summary["tokens"]) == (0, 30)
        assert summary["rss_kb_per_stream"] >= 0
    assert peers["relay"]["lag_ticks"] > 0
    assert "held N=10" in (ROOT / "bench" / "results" / "held.md").read_text()


@pytest.mark.timeout(120)
def test_the_stream_cost_harness_opens_each_stream_on_new_connections():
    """`python -m bench.opencost` runs relay in its own process, every stream on a new
    client and a new upstream connection, each token read on its own (lock step)."""
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.opencost",
            "--streams",
            "6",
            "--tokens",
            "3",
            "--concurrency",
            "2",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=100,
    )
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout.splitlines()[-1])
    assert summary["upstream_connects"] == 6
    assert summary["endings"] == {"complete/true": 6}
    assert summary["coalesced"] == 0
