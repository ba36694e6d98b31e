"""Soak: many mixed requests through relay, sampling its file descriptors, RSS and pool.

    python -m bench.soak                  # 20000 requests, 64 at a time
    python -m bench.soak --requests 2000  # shorter

The mix: streaming completions, non-streaming ones, streams the client
abandons mid-way, requests the upstream answers 404, and malformed requests
relay refuses itself. Every second the relay process's open descriptors,
RSS and pool sizes (from its /metrics) are sampled; after warm-up none of
them may grow. Prints a table and writes bench/results/soak.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import sys
import time
from pathlib import Path

from bench.loadclient import build_request
from bench.peers import free_port, start_relay, start_streamer

RESULTS = Path(__file__).parent / "results"
LIMIT = 10.0


def fds(pid: int) -> int:
    return len(list(Path(f"/proc/{pid}/fd").iterdir()))


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


async def one(port: int, kind: str) -> str:
    reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), LIMIT)
    try:
        if kind == "bad":
            writer.write(
                b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\n"
                b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
            )
        elif kind == "404":
            writer.write(b"GET /nope HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
        else:
            writer.write(build_request(port, 8, 0, 1, 1, stream=kind != "plain"))
        if kind == "abort":
            await asyncio.wait_for(reader.readuntil(b"relay_sent_ns"), LIMIT)
            return "aborted"
        data = b""
        while not (data.endswith(b"0\r\n\r\n") or b"[DONE]" in data):
            chunk = await asyncio.wait_for(reader.read(65536), LIMIT)
            if not chunk:
                break
            data += chunk
            if kind == "plain" and b"usage" in data:
                break
        return data[9:12].decode("latin-1") or "closed"
    finally:
        writer.close()


async def soak(port: int, admin: int, pid: int, total: int, parallel: int) -> dict:
    kinds = ["stream", "stream", "plain", "abort", "404", "bad"]
    samples: list[dict] = []
    outcomes: dict[str, int] = {}
    done = 0
    queue: asyncio.Queue[str] = asyncio.Queue()
    for i in range(total):
        queue.put_nowait(kinds[i % len(kinds)])

    async def worker() -> None:
        nonlocal done
        while not queue.empty():
            kind = queue.get_nowait()
            try:
                result = await one(port, kind)
            except (OSError, TimeoutError, asyncio.IncompleteReadError) as exc:
                result = type(exc).__name__
            outcomes[f"{kind}:{result}"] = outcomes.get(f"{kind}:{result}", 0) + 1
            done += 1

    async def sampler() -> None:
        started = time.monotonic()
        while True:
            metrics = await scrape(admin)
            samples.append(
                {
                    "t": round(time.monotonic() - started, 1),
                    "done": done,
                    "fds": fds(pid),
                    "rss_mb": round(rss_mb(pid), 1),
                    "pool_idle": metrics.get("idle", -1),
                    "pool_active": metrics.get("active", -1),
                    "clients": metrics.get("clients", -1),
                }
            )
            await asyncio.sleep(1)

    sampling = asyncio.ensure_future(sampler())
    await asyncio.gather(*(worker() for _ in range(parallel)))
    await asyncio.sleep(1.5)  # let idle connections settle, then one last sample
    sampling.cancel()
    metrics = await scrape(admin)
    samples.append(
        {
            "t": "end",
            "done": done,
            "fds": fds(pid),
            "rss_mb": round(rss_mb(pid), 1),
            "pool_idle": metrics.get("idle"),
            "pool_active": metrics.get("active"),
            "clients": metrics.get("clients"),
        }
    )
    return {"requests": total, "outcomes": outcomes, "samples": samples}


async def scrape(admin: int) -> dict[str, float]:
    reader, writer = await asyncio.open_connection("127.0.0.1", admin)
    writer.write(b"GET /metrics HTTP/1.1\r\nHost: a\r\n\r\n")
    text = (await asyncio.wait_for(reader.read(), LIMIT)).decode()
    writer.close()
    found = {}
    for key, name in (
        ("idle", "relay_upstream_pool_idle"),
        ("active", "relay_upstream_pool_active"),
        ("clients", "relay_client_connections"),
    ):
        match = re.search(rf"^{name}(?:{{[^}}]*}})? (\S+)$", text, re.MULTILINE)
        if match:
            found[key] = float(match.group(1))
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__)
    parser.add_argument("--requests", type=int, default=20000)
    parser.add_argument("--parallel", type=int, default=64)
    args = parser.parse_args(argv)
    RESULTS.mkdir(exist_ok=True)
    streamer = start_streamer()
    admin = free_port()
    relay = start_relay(streamer.port, None, "--admin-listen", f"127.0.0.1:{admin}")
    try:
        report = asyncio.run(
            soak(relay.port, admin, relay.process.pid, args.requests, args.parallel)
        )
    finally:
        relay.stop()
        streamer.stop()
    samples = report["samples"]
    print("   t   done   fds  rss MB  pool idle  active  clients")
    for s in samples:
        print(
            f"{s['t']!s:>5} {s['done']:>6} {s['fds']:>5} {s['rss_mb']:>7} "
            f"{s['pool_idle']!s:>10} {s['pool_active']!s:>7} {s['clients']!s:>8}"
        )
    print(json.dumps(report["outcomes"], indent=1, sort_keys=True))
    warm = samples[min(2, len(samples) - 1)]
    end = samples[-1]
    report["verdict"] = {
        "fds_after_warmup": warm["fds"],
        "fds_at_end": end["fds"],
        "rss_after_warmup": warm["rss_mb"],
        "rss_at_end": end["rss_mb"],
    }
    (RESULTS / "soak.json").write_text(json.dumps(report, indent=1))
    print(json.dumps(report["verdict"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
