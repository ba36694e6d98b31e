"""A cheap load client: N concurrent SSE streams, each token timed on arrival.

Raw asyncio Protocols and one regex per read, so the client costs little next
to what it measures. Every token event carries the upstream's send stamp
(``relay_sent_ns``, CLOCK_MONOTONIC, shared by all processes of the machine),
so the latency a token picked up on its way is ``arrival - sent``.
"""

from __future__ import annotations

import asyncio
import gc
import json
import random
import re
import time
from dataclasses import dataclass, field
from typing import cast

SENT = re.compile(rb'"relay_sent_ns":(\d+)')


@dataclass
class StreamResult:
    started_ns: int = 0
    arrivals: list[int] = field(default_factory=list)
    sent: list[int] = field(default_factory=list)
    error: str | None = None
    done: bool = False

    @property
    def ttft_ms(self) -> float | None:
        return (self.arrivals[0] - self.started_ns) / 1e6 if self.arrivals else None


class _StreamProtocol(asyncio.Protocol):
    def __init__(self, request: bytes, result: StreamResult, finished: asyncio.Future[None]):
        self.request = request
        self.result = result
        self.finished = finished
        self.head_seen = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.result.started_ns = time.monotonic_ns()
        self.transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        now = time.monotonic_ns()
        result = self.result
        if not self.head_seen:
            if not data.startswith(b"HTTP/1.1 200"):
                result.error = data[:80].decode("latin-1")
                self.transport.close()
                return
            self.head_seen = True
        for match in SENT.finditer(data):
            result.arrivals.append(now)
            result.sent.append(int(match.group(1)))
        if b"data: [DONE]" in data:
            result.done = True
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.result.done and self.result.error is None:
            self.result.error = f"connection lost: {exc}"
        if not self.finished.done():
            self.finished.set_result(None)


def build_request(
    port: int,
    tokens: int,
    ttft_ms: float,
    gap_ms: float,
    burst: int,
    *,
    stream: bool = True,
    api_key: str | None = None,
) -> bytes:
    body = json.dumps(
        {
            "model": "demo-model",
            "stream": stream,
            "max_tokens": tokens,
            "messages": [{"role": "user", "content": "bench"}],
            "relay_ttft_ms": ttft_ms,
            "relay_gap_ms": gap_ms,
            "relay_burst": burst,
            **({"stream_options": {"include_usage": True}} if api_key else {}),
        }
    ).encode()
    # A keyed relay also gets the usage it accounts (stream_options.include_usage).
    auth = b"Authorization: Bearer %b\r\n" % api_key.encode() if api_key else b""
    return (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n%b"
        b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%b"
        % (port, auth, len(body), body)
    )


async def run_streams(
    port: int,
    streams: int,
    tokens: int,
    ttft_ms: float,
    gap_ms: float,
    burst: int = 1,
    limit: float = 120.0,
    api_key: str | None = None,
) -> tuple[list[StreamResult], float]:
    """Open ``streams`` concurrent streams; return their results and the wall time."""
    loop = asyncio.get_running_loop()
    request = build_request(port, tokens, ttft_ms, gap_ms, burst, api_key=api_key)
    results = [StreamResult() for _ in range(streams)]
    waiters = []
    started = time.monotonic()

    async def one(result: StreamResult) -> None:
        finished = loop.create_future()
        try:
            await loop.create_connection(
                lambda: _StreamProtocol(request, result, finished), "127.0.0.1", port
            )
        except OSError as exc:
            result.error = f"connect: {exc}"
            return
        await finished

    for result in results:
        waiters.append(asyncio.ensure_future(one(result)))
    try:
        async with asyncio.timeout(limit):
            await asyncio.gather(*waiters)
    except TimeoutError:
        for waiter in waiters:
            waiter.cancel()
        for result in results:
            if not result.done and result.error is None:
                result.error = "timeout"
    return results, time.monotonic() - started


async def run_held(
    port: int,
    streams: int,
    tokens: int,
    ttft_ms: float,
    gap_ms: tuple[float, float],
    ramp_s: float,
    limit: float = 180.0,
    seed: int = 1,
) -> tuple[list[StreamResult], float]:
    """``streams`` long-held streams: each opens at its place in a ``ramp_s`` ramp
    (a listen backlog takes bursts, not 8000 SYNs at once) and gets its own token
    gap, uniform in ``gap_ms``, so streams do not tick in step."""
    loop = asyncio.get_running_loop()
    chooser = random.Random(seed)
    requests = [
        build_request(port, tokens, ttft_ms, chooser.uniform(*gap_ms), 1) for _ in range(streams)
    ]
    results = [StreamResult() for _ in range(streams)]
    started = time.monotonic()

    async def one(index: int, result: StreamResult) -> None:
        await asyncio.sleep(ramp_s * index / streams)
        finished = loop.create_future()
        request = requests[index]
        try:
            await loop.create_connection(
                lambda: _StreamProtocol(request, result, finished), "127.0.0.1", port
            )
        except OSError as exc:
            result.error = f"connect: {exc}"
            return
        await finished

    waiters = [asyncio.ensure_future(one(i, r)) for i, r in enumerate(results)]
    # The client's own collector pauses would be counted as latency added by the
    # proxy: it makes no cycles worth collecting during a run, so none runs.
    gc.disable()
    try:
        async with asyncio.timeout(limit):
            await asyncio.gather(*waiters)
    except TimeoutError:
        for waiter in waiters:
            waiter.cancel()
        for result in results:
            if not result.done and result.error is None:
                result.error = "timeout"
    finally:
        gc.enable()
    return results, time.monotonic() - started
