"""In-loop test peers: a scripted upstream and raw clients, beside a real relay.

Everything runs on one event loop (asyncio or uvloop) over real loopback
sockets, so a test can look inside the relay (its connections, its metrics)
at any moment without threads. Every wait is bounded by ``WAIT``.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import h11

from relay.config import Config, parse_listen, parse_upstream
from relay.core.server import RelayServer, loop_factory

WAIT = 5.0

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter, "ScriptUpstream"], Awaitable[None]]


def run(loop_kind: str, main: Callable[[], Awaitable[Any]], limit: float = 20.0) -> Any:
    """Run ``main()`` on a fresh loop of ``loop_kind``, bounded by ``limit`` seconds."""

    async def bounded() -> Any:
        async with asyncio.timeout(limit):
            return await main()

    with asyncio.Runner(loop_factory=loop_factory(loop_kind)) as runner:
        return runner.run(bounded())


@dataclass
class ScriptUpstream:
    """An upstream whose every connection is served by ``handler``."""

    handler: Handler
    accepted: int = 0
    received: list[bytearray] = field(default_factory=list)
    closed_at: list[float] = field(default_factory=list)
    server: asyncio.Server | None = None
    port: int = 0
    connected: asyncio.Event = field(default_factory=asyncio.Event)
    #: The StreamReader buffer limit: how far ahead of the handler asyncio reads.
    limit: int = 2**16
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)

    async def start(self, *, rcvbuf: int | None = None) -> ScriptUpstream:
        """Listen on a free loopback port; ``rcvbuf`` shrinks each connection's
        receive buffer from the handshake on, so relay's writes back up early."""
        if rcvbuf is None:
            self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0, limit=self.limit)
        else:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
            sock.bind(("127.0.0.1", 0))
            self.server = await asyncio.start_server(self._serve, sock=sock, limit=self.limit)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        self.received.append(bytearray())
        self.connected.set()
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            await self.handler(reader, writer, self)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            self.closed_at.append(asyncio.get_running_loop().time())
            writer.close()
            self._tasks.discard(task)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        if self.server is not None:
            self.server.close()


async def read_request(reader: asyncio.StreamReader, upstream: ScriptUpstream) -> bytes:
    """Read one request (head and body) with h11; record and return its raw bytes."""
    conn = h11.Connection(h11.SERVER)
    raw = bytearray()
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            data = await asyncio.wait_for(reader.read(65536), WAIT)
            if not data:
                raise asyncio.IncompleteReadError(bytes(raw), None)
            raw += data
            upstream.received[-1] += data
            conn.receive_data(data)
        elif isinstance(event, h11.EndOfMessage):
            return bytes(raw)


def parse_request(raw: bytes) -> h11.Request:
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(raw)
    event = conn.next_event()
    assert isinstance(event, h11.Request), event
    return event


async def until(condition: Callable[[], bool], limit: float = WAIT) -> None:
    """Wait (bounded by ``limit``) until ``condition()`` holds on this loop."""
    async with asyncio.timeout(limit):
        # relay's counters and gauges have no event to wait on: poll, bounded.
        while not condition():  # noqa: ASYNC110
            await asyncio.sleep(0.005)


def reset(writer: asyncio.StreamWriter) -> None:
    """Close with RST (SO_LINGER 0): a crash, not a clean close."""
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


@contextlib.asynccontextmanager
async def relay_for(upstream_port: int, **limits: Any) -> AsyncIterator[RelayServer]:
    config = Config(
        listen=parse_listen("127.0.0.1:0"),
        upstream=parse_upstream(f"127.0.0.1:{upstream_port}"),
        **limits,
    )
    server = await RelayServer.start(config)
    try:
        yield server
    finally:
        await server.close()


@contextlib.asynccontextmanager
async def setup(
    handler: Handler, **limits: Any
) -> AsyncIterator[tuple[ScriptUpstream, RelayServer]]:
    upstream = await ScriptUpstream(handler).start()
    try:
        async with relay_for(upstream.port, **limits) as relay:
            yield upstream, relay
    finally:
        await upstream.close()


async def connect(relay: RelayServer) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.wait_for(asyncio.open_connection("127.0.0.1", relay.port), WAIT)


async def read_head(reader: asyncio.StreamReader) -> bytes:
    return await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), WAIT)


async def read_to_eof(reader: asyncio.StreamReader) -> bytes:
    return await asyncio.wait_for(reader.read(), WAIT)


def request_bytes(
    path: str = "/v1/chat/completions", body: bytes = b'{"stream":true}', *, extra: bytes = b""
) -> bytes:
    return (
        b"POST %b HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n%b\r\n%b" % (path.encode(), len(body), extra, body)
    )


CHUNKED_HEAD = (
    b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
)


def sse_chunk(text: str) -> bytes:
    event = b"data: " + text.encode() + b"\n\n"
    return b"%x\r\n%b\r\n" % (len(event), event)
