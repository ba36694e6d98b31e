"""Run relay's benchmarks: direct vs relay vs nginx, in one run, on one machine.

    python -m bench.run            # everything, a few minutes on 2 cores
    python -m bench.run --quick    # the smallest scenario only (smoke test)
    python -m bench.run --held     # only N held streams (1000, 4000, 8000), relay and nginx
    python -m bench.run --paced 1000 --paced-rounds 3   # only paced N=1000, relay and nginx

Writes bench/results/{results.json,results.md,timeline.png} and prints the
table. Targets are reported as pass/fail lines, never asserted: they are
ratios against the baselines measured in the same run.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any

from bench.loadclient import StreamResult, run_held, run_streams
from bench.peers import (
    CLOCK_TICKS,
    Peer,
    free_port,
    start_nginx,
    start_origin,
    start_redis,
    start_relay,
    start_streamer,
)

RESULTS = Path(__file__).parent / "results"
GAP_MS = 24
TTFT_MS = 250
TOKENS = 64
#: /proc counts CPU in clock ticks (10 ms): fewer than this many ticks is noise.
MIN_CPU_TICKS = 10


def percentile(values: list[float], fraction: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(fraction * (len(ordered) - 1))))]


def cpu_per_token_us(cpu: float | None, tokens: int) -> float | None:
    """µs of CPU per token, or None when the run was too short for /proc to measure
    (a few clock ticks: 0.00 or one tick's worth would be noise, not a measurement)."""
    if cpu is None or not tokens or cpu * CLOCK_TICKS < MIN_CPU_TICKS:
        return None
    return cpu / tokens * 1e6


def cdf_scenario(results: dict[str, dict[str, Any]]) -> str:
    """The scenario the CDF panel shows: N=1000 when it was run, else N=1."""
    return "N=1000" if "N=1000" in results else "N=1"


def cdf_points(values: list[float]) -> tuple[list[float], list[float]]:
    """Sorted values and the fraction of values ≤ each: from 1/n up to exactly 1.0."""
    ordered = sorted(values)
    return ordered, [(i + 1) / len(ordered) for i in range(len(ordered))]


def summarize(results: list[StreamResult], wall: float, cpu: float | None) -> dict[str, Any]:
    added = [(a - s) / 1e6 for r in results for a, s in zip(r.arrivals, r.sent, strict=True)]
    coalesced = sum(
        1
        for r in results
        for x, y in zip(r.arrivals, r.arrivals[1:], strict=False)
        if y - x < 1_000_000
    )
    tokens = sum(len(r.arrivals) for r in results)
    ttfts = [r.ttft_ms for r in results if r.ttft_ms is not None]
    return {
        "streams": len(results),
        "tokens": tokens,
        "errors": sum(1 for r in results if r.error),
        "coalesced": coalesced,
        "added_ms_p50": percentile(added, 0.5),
        "added_ms_p99": percentile(added, 0.99),
        "added_ms_max": max(added) if added else float("nan"),
        "ttft_ms_p50": statistics.median(ttfts) if ttfts else float("nan"),
        "tokens_per_s": tokens / wall if wall else 0.0,
        "cpu_us_per_token": cpu_per_token_us(cpu, tokens),
        "_added": added,
        "_timeline": [(a - results[0].started_ns) / 1e6 for a in results[0].arrivals]
        if results
        else [],
    }


async def measure(
    peer: Peer,
    streams: int,
    tokens: int,
    gap_ms: float,
    ttft_ms: float,
    burst: int,
    meter: Peer | None,
) -> dict[str, Any]:
    cpu_before = meter.cpu() if meter else None
    results, wall = await run_streams(
        peer.port, streams, tokens, ttft_ms, gap_ms, burst, api_key=peer.api_key
    )
    cpu = meter.cpu() - cpu_before if meter and cpu_before is not None else None
    summary = summarize(results, wall, cpu)
    if meter is not None:
        summary["peak_rss_mb"] = meter.peak_rss_mb()
    return summary


def run_loop(coro: Any) -> Any:
    try:
        import uvloop

        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            return runner.run(coro)
    except ImportError:
        return asyncio.run(coro)


def paced(quick: bool) -> dict[str, dict[str, Any]]:
    """N streams at the bug report's pace, through each peer."""
    out: dict[str, dict[str, Any]] = {}
    streamer = start_streamer()
    peers: list[Peer] = []
    try:
        relay = start_relay(streamer.port)
        peers.append(relay)
        peers.append(start_keyed_relay(streamer.port))
        if not quick:
            workers = start_relay(streamer.port, None, "--workers", "2")
            workers.name = "relay-w2"
            peers.append(workers)
        nginx = start_nginx(streamer.port)
        if nginx is None:
            print("nginx not installed: skipping the nginx peer", file=sys.stderr)
        else:
            peers.append(nginx)
        targets: list[tuple[str, Peer, Peer | None]] = [("direct", streamer, None)]
        targets += [(p.name, p, p) for p in peers]
        for n in [1] if quick else [1, 100, 1000]:
            tokens = 16 if quick else TOKENS
            for name, target, meter in targets:
                key = f"N={n}"
                summary = run_loop(measure(target, n, tokens, GAP_MS, TTFT_MS, 1, meter))
                out.setdefault(key, {})[name] = summary
                print(
                    f"  {key:8} {name:7} tokens={summary['tokens']:6} "
                    f"errors={summary['errors']} coalesced={summary['coalesced']} "
                    f"added p99={summary['added_ms_p99']:.2f} ms",
                    flush=True,
                )
    finally:
        for peer in peers:
            peer.stop()
        streamer.stop()
    return out


def paced_only(sizes: tuple[int, ...], rounds: int) -> int:
    """``--paced``: the paced scenario alone, relay beside nginx, fresh processes each
    round (the peak RSS is the process's); prints every round and the medians."""
    streamer = start_streamer()
    runs: dict[str, dict[str, list[dict[str, Any]]]] = {}
    try:
        for round_ in range(rounds):
            for start in (start_relay, start_nginx):
                peer = start(streamer.port)
                if peer is None:
                    print("nginx not installed: relay only", file=sys.stderr)
                    continue
                try:
                    for n in sorted(sizes):
                        summary = run_loop(measure(peer, n, TOKENS, GAP_MS, TTFT_MS, 1, peer))
                        runs.setdefault(f"N={n}", {}).setdefault(peer.name, []).append(summary)
                        print(
                            f"  round {round_ + 1} N={n:<5} {peer.name:6} "
                            f"errors={summary['errors']} "
                            f"added p99={summary['added_ms_p99']:.2f} ms "
                            f"peak RSS={summary['peak_rss_mb']:.1f} MB",
                            flush=True,
                        )
                finally:
                    peer.stop()
    finally:
        streamer.stop()
    print(f"\nmedians of {rounds} round(s):")
    for scenario, peers in runs.items():
        for name, summaries in peers.items():
            p99 = statistics.median(s["added_ms_p99"] for s in summaries)
            rss = statistics.median(s["peak_rss_mb"] for s in summaries)
            print(f"  {scenario:7} {name:6} added p99 {p99:.2f} ms, peak RSS {rss:.1f} MB")
    return 0


def saturation() -> dict[str, dict[str, Any]]:
    """Gap 0, 8 streams: the intermediary pinned to CPU 0, everything else to CPU 1."""
    out: dict[str, dict[str, Any]] = {}
    if len(os.sched_getaffinity(0)) < 2:
        print("fewer than 2 CPUs: skipping the pinned saturation run", file=sys.stderr)
        return out
    os.sched_setaffinity(0, {1})
    streamer = start_streamer({1})
    try:

        def fidelity(port: int, cpus: set[int]) -> Peer:
            # The opt-in stream-fidelity flags; the always-on checks are in "relay".
            return start_relay(port, cpus, "--body-digest", "--sse-keepalive", "15s")

        peers = (("relay", start_relay), ("relay-fidelity", fidelity), ("nginx", start_nginx))
        for name, start in peers:
            peer = start(streamer.port, {0})
            if peer is None:
                continue
            try:
                for burst in (1, 16):
                    summary = run_loop(measure(peer, 8, 20000, 0, 0, burst, peer))
                    out.setdefault(f"saturation burst {burst}", {})[name] = summary
                    print(
                        f"  saturation burst={burst:2} {name:6} "
                        f"{summary['tokens_per_s']:9.0f} tok/s "
                        f"{fmt(summary['cpu_us_per_token'])} us/token",
                        flush=True,
                    )
            finally:
                peer.stop()
    finally:
        streamer.stop()
        os.sched_setaffinity(0, set(range(os.cpu_count() or 1)))
    return out


#: Held streams: a long time to the first token (a reasoning model thinking, a
#: queue) and slow tokens, so that thousands are open at once.
#: New held streams opened per second (a ramp, not N SYNs at once); --held-open-rate.
HELD_OPEN_RATE = 4000
HELD_SIZES = (1000, 4000, 8000)
HELD_TOKENS = 20
HELD_TTFT_MS = 1000.0
HELD_GAP_MS = (500.0, 600.0)
LAG_METRIC = re.compile(r'^relay_loop_lag_seconds_bucket\{le="([^"]+)"\} (\S+)$', re.M)


def loop_lag_buckets(admin_port: int) -> dict[float, float]:
    """relay's cumulative ``relay_loop_lag_seconds`` buckets, from its admin /metrics."""
    url = f"http://127.0.0.1:{admin_port}/metrics"
    with urllib.request.urlopen(url, timeout=10) as answer:
        text = answer.read().decode()
    return {float(le): float(count) for le, count in LAG_METRIC.findall(text)}


def loop_stall(before: dict[float, float], after: dict[float, float]) -> dict[str, Any]:
    """From two bucket snapshots: ticks sampled, how many ran over 5 ms late, and the
    bound of the highest bucket reached (the longest stall a tick saw, to a bucket)."""
    delta = {le: after.get(le, 0.0) - before.get(le, 0.0) for le in after}
    ticks = delta.get(float("inf"), 0.0)
    longest = next((le for le in sorted(delta) if delta[le] >= ticks), float("inf"))
    return {
        "lag_ticks": int(ticks),
        "lag_over_5ms": int(ticks - delta.get(0.005, 0.0)),
        "lag_max_le_ms": longest * 1000 if ticks else None,
    }


async def measure_held(
    peer: Peer, streams: int, tokens: int, admin_port: int | None, fresh_rss_mb: float
) -> dict[str, Any]:
    """One held run through ``peer``: latency, CPU, resident memory per stream, loop lag.

    Memory per stream is measured from ``fresh_rss_mb``, the peer's resident memory
    before it served any stream: a later round starts from a process whose
    allocator kept the previous round's memory (CPython's does, nginx's pools do
    not), and measured from there relay's streams would look almost free.
    """
    baseline = fresh_rss_mb
    cpu_before = peer.cpu()
    lag_before = loop_lag_buckets(admin_port) if admin_port else None
    peak = baseline

    async def sample_rss() -> None:
        nonlocal peak
        while True:
            peak = max(peak, peer.rss_mb())
            await asyncio.sleep(0.25)

    sampler = asyncio.create_task(sample_rss())
    try:
        results, wall = await run_held(
            peer.port,
            streams,
            tokens,
            HELD_TTFT_MS,
            HELD_GAP_MS,
            ramp_s=max(1.0, streams / HELD_OPEN_RATE),
        )
    finally:
        sampler.cancel()
    cpu = peer.cpu() - cpu_before
    summary = summarize(results, wall, cpu)
    summary["peak_rss_mb"] = peak
    summary["rss_kb_per_stream"] = (peak - baseline) * 1024 / streams
    kinds = Counter((r.error or "")[:40] for r in results if r.error)
    summary["error_kinds"] = dict(kinds.most_common(3))
    if admin_port and lag_before is not None:
        summary.update(loop_stall(lag_before, loop_lag_buckets(admin_port)))
    return summary


def median_summary(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """Each figure the median of the rounds' (the machine is noisy); lists from the first."""
    out: dict[str, Any] = dict(rounds[0])
    for key, value in rounds[0].items():
        values = [r.get(key) for r in rounds]
        if isinstance(value, (int, float)) and all(isinstance(v, (int, float)) for v in values):
            out[key] = statistics.median(values)
    out["rounds"] = len(rounds)
    return out


def set_held_open_rate(rate: int) -> None:
    """``--held-open-rate``: how fast the held scenario opens its streams."""
    global HELD_OPEN_RATE
    HELD_OPEN_RATE = max(1, rate)


def held(
    sizes: tuple[int, ...] = HELD_SIZES, tokens: int = HELD_TOKENS, rounds: int = 1
) -> dict[str, dict[str, Any]]:
    """N held streams through relay and nginx, proxy pinned to CPU 0, streamer and
    load client on CPU 1; rounds alternate the peers."""
    out: dict[str, dict[str, Any]] = {}
    if len(os.sched_getaffinity(0)) < 2:
        print("fewer than 2 CPUs: skipping the held-streams run", file=sys.stderr)
        return out
    raise_own_nofile()
    os.sched_setaffinity(0, {1})
    streamer = start_streamer({1})
    try:
        for n in sizes:
            # Fresh peers for each N: memory per stream is measured from a clean start.
            admin = free_port()
            peers: list[Peer] = []
            try:
                peers.append(
                    start_relay(
                        streamer.port,
                        {0},
                        "--max-connections",
                        str(n + 100),
                        "--admin-listen",
                        f"127.0.0.1:{admin}",
                        log_to_file=True,
                    )
                )
                # Two per stream, and room for closing ones (nginx warns it reuses them).
                nginx = start_nginx(streamer.port, {0}, connections=2 * n + 2000)
                if nginx is None:
                    print("nginx not installed: relay only", file=sys.stderr)
                else:
                    peers.append(nginx)
                samples: dict[str, list[dict[str, Any]]] = {p.name: [] for p in peers}
                fresh = {p.name: p.rss_mb() for p in peers}
                for index in range(rounds):
                    order = peers if index % 2 == 0 else peers[::-1]
                    for peer in order:
                        port = admin if peer.name == "relay" else None
                        summary = run_loop(measure_held(peer, n, tokens, port, fresh[peer.name]))
                        samples[peer.name].append(summary)
                        print(held_line(n, peer.name, summary), flush=True)
            finally:
                for peer in peers:
                    peer.stop()
            for name, values in samples.items():
                out.setdefault(f"held N={n}", {})[name] = median_summary(values)
    finally:
        streamer.stop()
        os.sched_setaffinity(0, set(range(os.cpu_count() or 1)))
    return out


def held_line(n: int, name: str, summary: dict[str, Any]) -> str:
    line = (
        f"  held N={n:<5} {name:6} tokens={summary['tokens']:6} "
        f"errors={summary['errors']} added p50/p99/max="
        f"{summary['added_ms_p50']:.2f}/{summary['added_ms_p99']:.2f}/"
        f"{summary['added_ms_max']:.1f} ms cpu={fmt(summary['cpu_us_per_token'])} us/token "
        f"rss={summary['rss_kb_per_stream']:.1f} KB/stream"
    )
    if "lag_ticks" in summary:
        line += (
            f" lag>5ms={summary['lag_over_5ms']}/{summary['lag_ticks']}"
            f" max<={fmt(summary['lag_max_le_ms'], 1)} ms"
        )
    if summary.get("error_kinds"):
        line += f" errors: {summary['error_kinds']}"
    return line


def raise_own_nofile() -> None:
    """The load client and the streamer (a child) hold a socket per stream each."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def held_table(results: dict[str, dict[str, Any]]) -> str:
    lines = [
        "| scenario | peer | tokens | errors | added p50 ms | added p99 ms | added max ms "
        "| p99 vs nginx | loop lag > 5 ms (ticks) | longest lag ≤ ms | CPU µs/token "
        "| CPU vs nginx | RSS KB/stream | peak RSS MB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for scenario, peers in results.items():
        if not scenario.startswith("held "):
            continue
        nginx = peers.get("nginx", {})
        for name, s in peers.items():
            lag = f"{s['lag_over_5ms']} / {s['lag_ticks']}" if "lag_ticks" in s else "-"
            lines.append(
                f"| {scenario} | {name} | {s['tokens']:.0f} | {s['errors']:.0f} "
                f"| {fmt(s['added_ms_p50'])} | {fmt(s['added_ms_p99'])} "
                f"| {fmt(s['added_ms_max'], 1)} "
                f"| {ratio(s['added_ms_p99'], nginx.get('added_ms_p99'))} | {lag} "
                f"| {fmt(s.get('lag_max_le_ms'), 1)} | {fmt(s['cpu_us_per_token'])} "
                f"| {ratio(s['cpu_us_per_token'], nginx.get('cpu_us_per_token'))} "
                f"| {fmt(s['rss_kb_per_stream'], 1)} | {fmt(s['peak_rss_mb'], 1)} |"
            )
    return "\n".join(lines)


def held_targets(results: dict[str, dict[str, Any]]) -> list[str]:
    """The held-stream targets, against nginx in the same run (reported, never asserted)."""
    verdicts = []

    def check(label: str, ok: bool | None, detail: str) -> None:
        mark = "n/a " if ok is None else ("PASS" if ok else "MISS")
        verdicts.append(f"{mark} {label}: {detail}")

    for n in (4000, 8000):
        peers = results.get(f"held N={n}", {})
        if "relay" in peers and "nginx" in peers:
            r, g = peers["relay"]["added_ms_p99"], peers["nginx"]["added_ms_p99"]
            check(f"held N={n}: added p99 ≤ 2x nginx", r <= 2 * g, f"{r:.2f} vs {g:.2f} ms")
            r, g = peers["relay"]["rss_kb_per_stream"], peers["nginx"]["rss_kb_per_stream"]
            check(f"held N={n}: RSS per stream ≤ nginx", r <= g, f"{r:.1f} vs {g:.1f} KB")
    peers = results.get("held N=8000", {})
    if "relay" in peers and peers["relay"].get("lag_max_le_ms") is not None:
        lag = peers["relay"]["lag_max_le_ms"]
        check("held N=8000: no loop stall over 5 ms (tick lag)", lag <= 5, f"≤ {lag:g} ms")
    peers = results.get("held N=4000", {})
    if "relay" in peers and "nginx" in peers:
        r, g = peers["relay"]["cpu_us_per_token"], peers["nginx"]["cpu_us_per_token"]
        if r is None or g is None:
            check("held N=4000: CPU per token ≤ 1.3x nginx", None, "not measured")
        else:
            check("held N=4000: CPU per token ≤ 1.3x nginx", r <= 1.3 * g, f"{r:.2f} vs {g:.2f} µs")
    return verdicts


WRK_POST = """\
wrk.method = "POST"
wrk.body = '{"model":"m","messages":[{"role":"user","content":"hi"}],"max_tokens":1}'
wrk.headers["Content-Type"] = "application/json"
"""


def per_request(rounds: int = 3, seconds: int = 4) -> dict[str, dict[str, Any]]:
    """Small non-streaming POSTs on 50 keep-alive connections, as fast as they are answered.

    The upstream (an nginx answering at once) and wrk share CPU 1; the proxy under
    test has CPU 0 to itself. Reported: requests per second and CPU microseconds
    per request of the proxy, the median of ``rounds`` rounds that alternate peers.
    """
    out: dict[str, dict[str, Any]] = {}
    wrk = shutil.which("wrk")
    if wrk is None or len(os.sched_getaffinity(0)) < 2:
        print("wrk not installed or fewer than 2 CPUs: skipping the per-request run")
        return out
    origin = start_origin({1})
    if origin is None:
        print("nginx not installed: skipping the per-request run")
        return out
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as script:
        script.write(WRK_POST)
    peers = [p for p in (start_relay(origin.port, {0}), start_nginx(origin.port, {0})) if p]
    samples: dict[str, list[tuple[float, float]]] = {p.name: [] for p in peers}
    try:
        for _ in range(rounds):
            for peer in peers:
                url = f"http://127.0.0.1:{peer.port}/v1/chat/completions"
                command = ["taskset", "-c", "1", wrk, "-t1", "-c50", f"-d{seconds}s"]
                command += ["-s", script.name, url]
                cpu_before = peer.cpu()
                done = subprocess.run(command, capture_output=True, text=True, check=False)
                cpu = peer.cpu() - cpu_before
                match = re.search(r"(\d+) requests in", done.stdout)
                errors = re.search(r"Non-2xx or 3xx responses: (\d+)", done.stdout)
                if match is None or errors is not None:
                    print(f"  wrk against {peer.name} failed: {done.stdout[-300:]}")
                    continue
                requests = int(match.group(1))
                samples[peer.name].append((requests / seconds, cpu * 1e6 / requests))
        for name, values in samples.items():
            if not values:
                continue
            rps = statistics.median(v[0] for v in values)
            us = statistics.median(v[1] for v in values)
            out.setdefault("per request", {})[name] = {
                "req_per_s": rps,
                "cpu_us_per_request": us,
                "rounds": len(values),
            }
            print(f"  per request {name:6} {rps:9.0f} req/s {us:7.1f} us/request", flush=True)
    finally:
        for peer in peers:
            peer.stop()
        origin.stop()
        os.unlink(script.name)
    return out


def long_streams(rounds: int = 3) -> dict[str, dict[str, Any]]:
    """100 streams of 500 tokens, 20 ms apart: CPU per token with per-request cost
    amortized away. Proxy on CPU 0; streamer and client on CPU 1; median of rounds."""
    out: dict[str, dict[str, Any]] = {}
    if len(os.sched_getaffinity(0)) < 2:
        return out
    os.sched_setaffinity(0, {1})
    streamer = start_streamer({1})
    peers = [
        p
        for p in (
            start_relay(streamer.port, {0}),
            start_keyed_relay(streamer.port, {0}),
            start_nginx(streamer.port, {0}),
        )
        if p
    ]
    samples: dict[str, list[float]] = {p.name: [] for p in peers}
    try:
        for _ in range(rounds):
            for peer in peers:
                summary = run_loop(measure(peer, 100, 500, 20, 50, 1, peer))
                if summary["cpu_us_per_token"] is not None:
                    samples[peer.name].append(summary["cpu_us_per_token"])
        for name, values in samples.items():
            if values:
                us = statistics.median(values)
                out.setdefault("100 x 500 tokens", {})[name] = {"cpu_us_per_token": us}
                print(f"  100 x 500 tokens {name:6} {us:6.2f} us/token", flush=True)
    finally:
        for peer in peers:
            peer.stop()
        streamer.stop()
        os.sched_setaffinity(0, set(range(os.cpu_count() or 1)))
    return out


#: The keyed relay's key file: two teams, each with its own limits, high
#: enough never to refuse the bench's load but all checked on every request.
KEY_FILE = "bench sk-bench concurrent=1000 rpm=1000000 tpm=1000000000\nother sk-other rpm=60\n"


def start_keyed_relay(
    upstream_port: int, cpus: set[int] | None = None, store: Peer | None = None
) -> Peer:
    """relay with named keys, per-key limits, --max-inflight and usage accounting on;
    with ``store`` (a redis-server), all of them shared through it (relay-keys-redis)."""
    with tempfile.NamedTemporaryFile("w", suffix=".keys", delete=False) as keys:
        keys.write(KEY_FILE)
    extra = ["--api-key-file", keys.name, "--key-max-concurrent", "2000", "--max-inflight", "2000"]
    if store is not None:
        extra += ["--limits-store", f"redis://127.0.0.1:{store.port}/0"]
    peer = start_relay(upstream_port, cpus, *extra)
    os.unlink(keys.name)  # read at start; relay keeps the keys in memory
    peer.name = "relay-keys" if store is None else "relay-keys-redis"
    peer.api_key = "sk-bench"
    return peer


def keys_redis(rounds: int = 5, batches: int = 25, streams: int = 20) -> dict[str, Any]:
    """relay-keys beside relay-keys-redis (the same limits shared through a local
    redis-server): CPU per request and TTFT p50/p99 of short streams.

    Each round sends ``batches`` batches of ``streams`` concurrent one-token streams
    (no upstream delay), so the cost of admission and settling dominates. The relays
    have CPU 0; the streamer, redis-server (pinned with the upstream) and the client
    CPU 1. Reported: the median over rounds that alternate the two relays.
    """
    out: dict[str, Any] = {}
    if len(os.sched_getaffinity(0)) < 2:
        print("fewer than 2 CPUs: skipping relay-keys-redis")
        return out
    store = start_redis({1})
    if store is None:
        print("redis-server not installed: skipping relay-keys-redis")
        return out
    os.sched_setaffinity(0, {1})
    streamer = start_streamer({1})
    peers = [start_keyed_relay(streamer.port, {0}), start_keyed_relay(streamer.port, {0}, store)]
    samples: dict[str, list[tuple[float, float, float, float]]] = {p.name: [] for p in peers}
    try:
        for peer in peers:  # warm up: connections to the upstream and the store
            run_loop(run_streams(peer.port, streams, 1, 0, 0, api_key=peer.api_key))
        for _ in range(rounds):
            for peer in peers:
                ttfts: list[float] = []
                errors = 0
                cpu_before = peer.cpu()
                for _ in range(batches):
                    results, _ = run_loop(
                        run_streams(peer.port, streams, 1, 0, 0, api_key=peer.api_key)
                    )
                    ttfts += [r.ttft_ms for r in results if r.ttft_ms is not None]
                    errors += sum(1 for r in results if r.error)
                cpu = peer.cpu() - cpu_before
                if errors or len(ttfts) != batches * streams:
                    print(f"  {peer.name}: {errors} errors; round not counted", flush=True)
                    continue
                us = cpu * 1e6 / (batches * streams)
                # One stream at a time: the round trip to the store, without a queue.
                alone = []
                for _ in range(streams):
                    results, _ = run_loop(run_streams(peer.port, 1, 1, 0, 0, api_key=peer.api_key))
                    alone += [r.ttft_ms for r in results if r.ttft_ms is not None]
                samples[peer.name].append(
                    (us, percentile(ttfts, 0.5), percentile(ttfts, 0.99), percentile(alone, 0.5))
                )
        for name, values in samples.items():
            if not values:
                continue
            entry = {
                "cpu_us_per_request": statistics.median(v[0] for v in values),
                "ttft_ms_p50": statistics.median(v[1] for v in values),
                "ttft_ms_p99": statistics.median(v[2] for v in values),
                "ttft_ms_p50_alone": statistics.median(v[3] for v in values),
                "rounds": len(values),
            }
            out[name] = entry
            print(
                f"  {name:16} {entry['cpu_us_per_request']:7.1f} us/request "
                f"TTFT p50 {entry['ttft_ms_p50']:6.2f} ms p99 {entry['ttft_ms_p99']:6.2f} ms "
                f"(one at a time: p50 {entry['ttft_ms_p50_alone']:5.2f} ms)",
                flush=True,
            )
    finally:
        for peer in peers:
            peer.stop()
        streamer.stop()
        store.stop()
        os.sched_setaffinity(0, set(range(os.cpu_count() or 1)))
    return {"keys shared through redis": out} if out else {}


def keys_redis_table(results: dict[str, Any]) -> str:
    """The shared-limits comparison, with the issue's targets (1.3x CPU, one loopback
    round trip of TTFT)."""
    peers = results.get("keys shared through redis", {})
    rows = [
        "| peer | CPU µs/request | TTFT p50 ms | TTFT p99 ms | TTFT p50 ms, one at a time |",
        "|---|---|---|---|---|",
    ]
    for name in ("relay-keys", "relay-keys-redis"):
        if name in peers:
            s = peers[name]
            rows.append(
                f"| {name} | {fmt(s['cpu_us_per_request'], 1)} | {fmt(s['ttft_ms_p50'])} "
                f"| {fmt(s['ttft_ms_p99'])} | {fmt(s['ttft_ms_p50_alone'])} |"
            )
    if {"relay-keys", "relay-keys-redis"} <= set(peers):
        base, shared = peers["relay-keys"], peers["relay-keys-redis"]
        rows.append("")
        rows.append(
            f"relay-keys-redis / relay-keys CPU per request: "
            f"{ratio(shared['cpu_us_per_request'], base['cpu_us_per_request'])} (target <= 1.3x); "
            f"TTFT p50 +{shared['ttft_ms_p50'] - base['ttft_ms_p50']:.2f} ms with 20 at once, "
            f"+{shared['ttft_ms_p50_alone'] - base['ttft_ms_p50_alone']:.2f} ms one at a time "
            "(target: one loopback round trip)"
        )
    return "\n".join(rows)


def fmt(value: Any, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def ratio(a: Any, b: Any) -> str:
    if not isinstance(a, (int, float)) or not isinstance(b, (int, float)) or not b:
        return "-"
    return f"{a / b:.2f}x"


def table(results: dict[str, dict[str, Any]]) -> str:
    lines = [
        "| scenario | peer | tokens | errors | coalesced | added p50 ms | added p99 ms "
        "| p99 vs nginx | TTFT p50 ms | tok/s | CPU µs/token | CPU vs nginx | peak RSS MB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for scenario, peers in results.items():
        nginx = peers.get("nginx", {})
        for name, s in peers.items():
            lines.append(
                f"| {scenario} | {name} | {s['tokens']} | {s['errors']} | {s['coalesced']} "
                f"| {fmt(s['added_ms_p50'])} | {fmt(s['added_ms_p99'])} "
                f"| {ratio(s['added_ms_p99'], nginx.get('added_ms_p99'))} "
                f"| {fmt(s['ttft_ms_p50'], 1)} | {s['tokens_per_s']:.0f} "
                f"| {fmt(s['cpu_us_per_token'])} "
                f"| {ratio(s['cpu_us_per_token'], nginx.get('cpu_us_per_token'))} "
                f"| {fmt(s.get('peak_rss_mb'), 1)} |"
            )
    return "\n".join(lines)


def cost_table(results: dict[str, dict[str, Any]]) -> str:
    """CPU cost per token (long streams) and per request (small POSTs), each against nginx."""
    lines = ["| scenario | peer | req/s | CPU µs | CPU vs nginx |", "|---|---|---|---|---|"]
    for scenario, unit in (("100 x 500 tokens", "cpu_us_per_token"), ("per request", None)):
        peers = results.get(scenario, {})
        nginx = peers.get("nginx", {})
        for name, s in peers.items():
            key = unit or "cpu_us_per_request"
            rate = f"{s['req_per_s']:.0f}" if "req_per_s" in s else "-"
            lines.append(
                f"| {scenario} ({'per token' if unit else 'per request'}) | {name} | {rate} "
                f"| {fmt(s.get(key))} | {ratio(s.get(key), nginx.get(key))} |"
            )
    return "\n".join(lines)


def targets(results: dict[str, dict[str, Any]]) -> list[str]:
    verdicts = []

    def check(label: str, ok: bool | None, detail: str) -> None:
        mark = "n/a " if ok is None else ("PASS" if ok else "MISS")
        verdicts.append(f"{mark} {label}: {detail}")

    def cpu_per_token(scenario: str, where: str, times: float) -> None:
        peers = results.get(scenario, {})
        if "relay" not in peers or "nginx" not in peers:
            return
        r, n = peers["relay"]["cpu_us_per_token"], peers["nginx"]["cpu_us_per_token"]
        label = f"CPU per token {where} ≤ {times:g}x nginx"
        if r is None or n is None:  # too little CPU to measure
            check(label, None, "not measured")
        else:
            check(label, r <= times * n, f"{r:.2f} vs {n:.2f} µs")

    for scenario, peers in results.items():
        if scenario.startswith("N=") and "relay" in peers:
            c = peers["relay"]["coalesced"]
            check(f"coalesced tokens through relay at {scenario}", c == 0, str(c))
    for scenario in ("N=100", "N=1000"):
        peers = results.get(scenario, {})
        if "relay" in peers and "nginx" in peers:
            r, n = peers["relay"]["added_ms_p99"], peers["nginx"]["added_ms_p99"]
            check(f"added p99 at {scenario} no worse than nginx", r <= n, f"{r:.2f} vs {n:.2f} ms")
    cpu_per_token("saturation burst 1", "at burst 1", 1.5)
    big = results.get("N=1000", {})
    if "relay" in big:
        rss = big["relay"]["peak_rss_mb"]
        check("peak RSS at N=1000 ≤ 40 MB", rss <= 40, f"{rss:.1f} MB")
        if "nginx" in big:
            r, n = big["relay"]["coalesced"], big["nginx"]["coalesced"]
            check("coalesced tokens at N=1000 no more than nginx", r <= n, f"{r} vs {n}")
    cpu_per_token("N=100", "at N=100 (short streams)", 1.3)
    cpu_per_token("100 x 500 tokens", "for 100 x 500 tokens", 1.15)
    each = results.get("per request", {})
    if "relay" in each and "nginx" in each:
        r, n = each["relay"]["cpu_us_per_request"], each["nginx"]["cpu_us_per_request"]
        check("CPU per request ≤ 8x nginx", r <= 8 * n, f"{r:.1f} vs {n:.1f} µs ({r / n:.1f}x)")
        rps = each["relay"]["req_per_s"]
        check("≥ 10k requests/s on one core", rps >= 10_000, f"{rps:.0f} req/s")
    one = results.get("N=1", {})
    if "relay" in one and "direct" in one:
        d = one["relay"]["ttft_ms_p50"] - one["direct"]["ttft_ms_p50"]
        check("TTFT through relay within 1 ms of direct at N=1", abs(d) <= 1, f"{d:+.2f} ms")
    return verdicts


def plot(results: dict[str, dict[str, Any]], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed (pip install '.[bench]'): no PNG", file=sys.stderr)
        return False
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 5))
    for name, s in results.get("N=1", {}).items():
        left.plot(s["_timeline"], range(len(s["_timeline"])), marker=".", label=name)
    left.set(
        title="one stream at 24 ms gaps: token arrivals",
        xlabel="ms since request",
        ylabel="token index",
    )
    left.legend()
    scenario = cdf_scenario(results)
    for name, s in results.get(scenario, {}).items():
        if s["_added"]:
            right.step(*cdf_points(s["_added"]), where="post", label=name)
    right.set(
        title=f"added latency CDF ({scenario} concurrent streams)",
        xlabel="arrival - upstream send (ms)",
        ylabel="fraction of tokens",
        xscale="log",
    )
    right.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.run",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="only N=1 with 16 tokens, direct, relay and nginx (a smoke run of a few seconds)",
    )
    parser.add_argument(
        "--held",
        action="store_true",
        help="only the held-streams scenario (relay beside nginx, pinned), to held.{md,json}",
    )
    parser.add_argument(
        "--held-sizes",
        default=",".join(map(str, HELD_SIZES)),
        help="held streams per run, comma-separated (default: %(default)s)",
    )
    parser.add_argument(
        "--held-tokens",
        type=int,
        default=HELD_TOKENS,
        help="tokens per held stream (default: %(default)s)",
    )
    parser.add_argument(
        "--held-rounds",
        type=int,
        default=1,
        help="rounds alternating the peers; each figure is the median (default: %(default)s)",
    )
    parser.add_argument(
        "--held-open-rate",
        type=int,
        default=HELD_OPEN_RATE,
        help="held streams opened per second during the ramp (default: %(default)s)",
    )
    parser.add_argument(
        "--paced",
        metavar="N[,N...]",
        help="only the paced scenario at these stream counts (relay beside nginx), printed, "
        "not written",
    )
    parser.add_argument(
        "--paced-rounds",
        type=int,
        default=1,
        help="with --paced: rounds, each with fresh processes; medians printed "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--keys-redis",
        action="store_true",
        help="only relay-keys beside relay-keys-redis (limits shared through a local "
        "redis-server): CPU per request, TTFT p50/p99",
    )
    args = parser.parse_args(argv)
    RESULTS.mkdir(exist_ok=True)
    sizes = tuple(int(n) for n in args.held_sizes.split(",") if n.strip())
    set_held_open_rate(args.held_open_rate)
    if args.held:
        return held_only(sizes, args.held_tokens, args.held_rounds)
    if args.paced:
        print("paced streams (24 ms gaps, 250 ms to first token):", flush=True)
        return paced_only(tuple(int(n) for n in args.paced.split(",")), args.paced_rounds)
    if args.keys_redis:
        print("keys shared through redis (one-token streams, relays pinned):", flush=True)
        shared = keys_redis()
        print()
        print(keys_redis_table(shared))
        return 0
    print("paced streams (24 ms gaps, 250 ms to first token):", flush=True)
    results = paced(args.quick)
    if not args.quick:
        print("saturation (gap 0, 8 streams, intermediary pinned to CPU 0):", flush=True)
        results.update(saturation())
        print("long streams (100 x 500 tokens, 20 ms apart, proxy pinned to CPU 0):", flush=True)
        results.update(long_streams())
        print("per request (small POSTs, 50 keep-alive connections, proxy pinned):", flush=True)
        requests = per_request()
        print("held streams (1 s to first token, 20 tokens 500-600 ms apart):", flush=True)
        held_results = held(sizes, args.held_tokens, args.held_rounds)
        print("keys shared through redis (one-token streams, relays pinned):", flush=True)
        requests.update(keys_redis())
    else:
        requests = {}
        held_results = {}
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    machine = f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}"
    streams = {k: v for k, v in results.items() if k != "100 x 500 tokens"}
    md = f"Run {stamp} on {machine}.\n\n{table(streams)}\n\n"
    if requests or "100 x 500 tokens" in results:
        md += cost_table({**results, **requests}) + "\n\n"
    if "keys shared through redis" in requests:
        md += keys_redis_table(requests) + "\n\n"
    if held_results:
        md += held_table(held_results) + "\n\n"
    md += "\n".join(
        f"- {line}" for line in targets({**results, **requests}) + held_targets(held_results)
    )
    results.update(requests)
    results.update(held_results)
    (RESULTS / "results.md").write_text(md + "\n")
    public = {
        k: {p: {m: v for m, v in s.items() if not m.startswith("_")} for p, s in peers.items()}
        for k, peers in results.items()
    }
    (RESULTS / "results.json").write_text(
        json.dumps({"date": stamp, "machine": machine, "results": public}, indent=2)
    )
    plot(results, RESULTS / "timeline.png")
    print()
    print(md)
    return 0


def held_only(sizes: tuple[int, ...], tokens: int, rounds: int) -> int:
    """``--held``: the held-streams scenario alone, written to held.md and held.json."""
    print(f"held streams (1 s to first token, {tokens} tokens 500-600 ms apart):", flush=True)
    results = held(sizes, tokens, rounds)
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    machine = f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}"
    md = f"Run {stamp} on {machine}.\n\n{held_table(results)}\n\n"
    md += "\n".join(f"- {line}" for line in held_targets(results))
    (RESULTS / "held.md").write_text(md + "\n")
    public = {
        k: {p: {m: v for m, v in s.items() if not m.startswith("_")} for p, s in peers.items()}
        for k, peers in results.items()
    }
    (RESULTS / "held.json").write_text(
        json.dumps({"date": stamp, "machine": machine, "results": public}, indent=2)
    )
    print()
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
