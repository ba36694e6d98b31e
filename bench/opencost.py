"""What one held stream costs relay, opened to closed, measured in one process.

relay (``RelayServer`` on uvloop, configured as the bench starts it) runs in
this process; a child process drives it over loopback sockets. The child is
the upstream and the clients at once, in lock step: the upstream sends a
stream's next token only when that stream's client has read the one before,
so no read coalesces and the work done does not depend on timing. Each
stream is a new client connection and, with ``--upstream-keepalive 0``, a
new upstream connection (the held scenario's case: its pool is full when
thousands of streams end). The client closes after ``data: [DONE]``, as the
bench's load client does.

Cost per stream and per token come from differences of runs, which cancel
start-up::

    python -m bench.opencost --streams 400 --tokens 20          # rusage, µs
    python -m bench.opencost --streams 400 --tokens 20 --profile # cProfile, top functions
    valgrind --tool=callgrind --callgrind-out-file=cg.out \\
        python -m bench.opencost --streams 400 --tokens 20      # instructions (total Ir)

(per stream: runs with 100 and 300 streams; per token: 20 and 60 tokens.)
``--without access``, ``nodelay`` or ``usage`` switches that part off, to
measure what it costs. Instruction counts repeat to a few parts in a
thousand on a busy machine; CPU seconds do not.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import io
import json
import logging
import os
import pstats
import re
import resource
import subprocess
import sys
import tempfile
import time
from typing import Any, cast

#: A streamer-like response head (relay's own streamer writes the same).
HEAD = (
    b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
    b"transfer-encoding: chunked\r\nserver: relay-streamer\r\n\r\n"
)
_LENGTH = re.compile(rb"(?i)\r\ncontent-length: *(\d+)")


# -- the driver (child process): upstream and clients ------------------------------------
class _Stream:
    def __init__(self, index: int, tokens: int) -> None:
        from relay.http.streamevents import EventBuilder, StreamerSettings

        self.index = index
        self.events = EventBuilder(
            StreamerSettings(tokens=tokens), chat=True, model="demo-model", include_usage=False
        )
        self.upstream: _Upstream | None = None

    def send_next(self) -> None:
        events = self.events
        upstream = self.upstream
        if upstream is None or events.done:
            return
        payload = events.stamp(events.next_events(), time.monotonic_ns())
        chunk = b"%x\r\n%b\r\n" % (len(payload), payload)
        if events.done:
            chunk += b"0\r\n\r\n"
        upstream.transport.write(chunk)


class _Upstream(asyncio.Protocol):
    def __init__(self, streams: dict[int, _Stream]) -> None:
        self.streams = streams
        self.buffer = bytearray()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        end = self.buffer.find(b"\r\n\r\n")
        if end < 0:
            return
        match = _LENGTH.search(self.buffer, 0, end + 2)
        length = int(match.group(1)) if match else 0
        if len(self.buffer) < end + 4 + length:
            return
        body = json.loads(bytes(self.buffer[end + 4 : end + 4 + length]))
        del self.buffer[: end + 4 + length]
        stream = self.streams[body["relay_stream"]]
        stream.upstream = self
        self.transport.write(HEAD)


class _Client(asyncio.Protocol):
    def __init__(self, request: bytes, stream: _Stream, finished: asyncio.Future[None]) -> None:
        self.request = request
        self.stream = stream
        self.finished = finished
        self.done = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        if b"data: [DONE]" in data:
            self.done = True
            self.transport.close()
            return
        self.stream.send_next()  # the head or a token arrived: the next token goes

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.finished.done():
            if self.done:
                self.finished.set_result(None)
            else:
                self.finished.set_exception(RuntimeError(f"stream cut: {exc}"))


def _request(port: int, index: int, tokens: int) -> bytes:
    body = json.dumps(
        {
            "model": "demo-model",
            "stream": True,
            "max_tokens": tokens,
            "messages": [{"role": "user", "content": "bench"}],
            "relay_ttft_ms": 1000.0,
            "relay_gap_ms": 550.0,
            "relay_burst": 1,
            "relay_stream": index,
        }
    ).encode()
    return (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n"
        b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%b" % (port, len(body), body)
    )


async def _drive(streams: int, tokens: int, concurrency: int) -> None:
    loop = asyncio.get_running_loop()
    table: dict[int, _Stream] = {}
    server = await loop.create_server(lambda: _Upstream(table), "127.0.0.1", 0)
    print(server.sockets[0].getsockname()[1], flush=True)
    relay_port = int(await loop.run_in_executor(None, sys.stdin.readline))
    gate = asyncio.Semaphore(concurrency)

    async def one(index: int) -> None:
        async with gate:
            stream = table[index] = _Stream(index, tokens)
            finished = loop.create_future()
            request = _request(relay_port, index, tokens)
            await loop.create_connection(
                lambda: _Client(request, stream, finished), "127.0.0.1", relay_port
            )
            async with asyncio.timeout(600):
                await finished
            del table[index]

    await asyncio.gather(*(one(i) for i in range(streams)))
    server.close()
    print("done", flush=True)


# -- relay (this process, the one measured) -------------------------------------------------
async def _measure(args: argparse.Namespace) -> dict[str, Any]:
    from relay.cli import build_parser, config_from_args
    from relay.core.accesslog import setup_logging
    from relay.core.server import RelayServer
    from relay.ops.process import freeze_startup

    for name in args.patch:
        _PATCHES[name]()
    child = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "bench.opencost",
        "--drive",
        "--streams",
        str(args.streams),
        "--tokens",
        str(args.tokens),
        "--concurrency",
        str(args.concurrency),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    assert child.stdout is not None and child.stdin is not None
    upstream_port = int(await child.stdout.readline())
    argv = ["--listen", "127.0.0.1:0", "--upstream", f"127.0.0.1:{upstream_port}"]
    argv += ["--upstream-keepalive", "0", "--log-level", "info", *args.relay_args]
    config = config_from_args(build_parser().parse_args(argv))
    # The access lines go to a file, as the bench's relay writes them.
    with tempfile.TemporaryFile("w") as sink:
        stderr, sys.stderr = sys.stderr, sink
        try:
            setup_logging("info")
        finally:
            sys.stderr = stderr
        server = await RelayServer.start(config)
        freeze_startup()
        profile = cProfile.Profile() if args.profile else None
        before = resource.getrusage(resource.RUSAGE_SELF)
        if profile is not None:
            profile.enable()
        child.stdin.write(b"%d\n" % server.port)
        await child.stdin.drain()
        line = await child.stdout.readline()
        # The last clients have closed: relay sees their ends within a few turns.
        for _ in range(1000):
            if not server.state.connections:
                break
            await asyncio.sleep(0.005)
        if profile is not None:
            profile.disable()
        after = resource.getrusage(resource.RUSAGE_SELF)
        metrics = server.metrics
        await server.close()
        await child.wait()
        if line.strip() != b"done":
            raise RuntimeError("the driver failed")
    result: dict[str, Any] = {
        "streams": args.streams,
        "tokens": args.tokens,
        "user_s": after.ru_utime - before.ru_utime,
        "sys_s": after.ru_stime - before.ru_stime,
        "upstream_connects": metrics.upstream_connects,
        "coalesced": sum(metrics.coalesced_reads.values()),
        "endings": {"/".join(k): v for k, v in metrics.endings.items()},
    }
    if profile is not None:
        text = io.StringIO()
        stats = pstats.Stats(profile, stream=text)
        stats.sort_stats(args.sort).print_stats(args.top)
        result["profile"] = text.getvalue()
        result["by_package"] = by_package(stats)
    return result


def _no_nodelay() -> None:
    import relay.core.downstream
    import relay.core.upstream

    relay.core.downstream.set_nodelay = relay.core.upstream.set_nodelay = lambda t: None


def _no_usage() -> None:
    import relay.core.admission

    relay.core.admission.usage_from_stream = lambda *a, **k: relay.core.admission.NO_USAGE


def _no_access() -> None:
    logging.getLogger("relay.access").setLevel(logging.WARNING)


#: Parts switched off to measure what they cost (never for a real run).
_PATCHES = {"access": _no_access, "nodelay": _no_nodelay, "usage": _no_usage}


def by_package(stats: pstats.Stats) -> dict[str, float]:
    """Own time (cProfile's tottime) grouped: h11, relay, asyncio/uvloop, builtins."""
    groups: dict[str, float] = {}
    rows: dict[tuple[str, int, str], tuple[Any, ...]] = getattr(stats, "stats", {})
    for (path, _, name), row in rows.items():
        tottime = row[2]
        if "/h11/" in path:
            group = "h11"
        elif "/relay/" in path:
            group = "relay." + path.rsplit("/relay/", 1)[1].removesuffix(".py")
        elif "asyncio" in path or "uvloop" in path:
            group = "asyncio"
        elif path == "~":
            group = "builtin: " + name
        else:
            group = "other: " + path.rsplit("/", 1)[-1]
        groups[group] = groups.get(group, 0.0) + tottime
    return dict(sorted(groups.items(), key=lambda kv: -kv[1]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--streams", type=int, default=400)
    parser.add_argument("--tokens", type=int, default=20)
    parser.add_argument("--concurrency", type=int, default=50)
    parser.add_argument("--profile", action="store_true", help="cProfile relay's work")
    parser.add_argument("--sort", default="tottime")
    parser.add_argument("--top", type=int, default=60)
    parser.add_argument(
        "--without",
        dest="patch",
        action="append",
        default=[],
        choices=sorted(_PATCHES),
        help="switch a part off, to see its cost",
    )
    parser.add_argument("--drive", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("relay_args", nargs="*", help="more relay flags (after --)")
    args = parser.parse_args(argv)
    import uvloop

    if args.drive:
        uvloop.run(_drive(args.streams, args.tokens, args.concurrency))
        return 0
    os.environ.setdefault("PYTHONHASHSEED", "0")
    result = uvloop.run(_measure(args))
    profile = result.pop("profile", None)
    if profile:
        print(profile)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
