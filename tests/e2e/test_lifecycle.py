"""State that must not outlive the exchange that set it (fifteen defects, one test each).

Each test drives one case that left relay in a bad state before: a pooled
upstream connection still paused, a dropped client still holding its slot,
a keep-alive client never read again, an exchange ended twice, the wrong
side blamed for a stall, framing lost with a hop-by-hop header.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket

import pytest
from harness import (
    WAIT,
    ScriptUpstream,
    connect,
    parse_request,
    read_head,
    read_request,
    read_to_eof,
    relay_for,
    request_bytes,
    run,
    setup,
    until,
)

from relay.config import parse_route, parse_upstream
from relay.core import downstream
from relay.core.downstream import ClientConnection
from relay.core.upstream import UpstreamConnection
from relay.http.rewrite import ModelMap

pytestmark = pytest.mark.timeout(60)


def pool_is_clean(relay) -> bool:
    """Every pooled connection is idle, open and reading."""
    for pool in relay.state.router.pools.values():
        for conn in pool._idle:
            if conn.transport.is_closing() or not conn.transport.is_reading():
                return False
    return True


def settled(relay) -> bool:
    metrics = relay.state.metrics
    pools = relay.state.router.pools.values()
    return metrics.active_exchanges == 0 and all(
        p.outstanding == 0 and p.active == 0 for p in pools
    )


def ended(relay) -> int:
    """How many exchanges have ended so far (a count that only grows)."""
    return sum(relay.state.metrics.endings.values())


async def idle_client(relay, request: bytes) -> socket.socket:
    """A client that sends ``request`` and then reads nothing until told to; its
    receive window is tiny, so relay's writes back up at once."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    await asyncio.wait_for(loop.sock_connect(sock, ("127.0.0.1", relay.port)), WAIT)
    await asyncio.wait_for(loop.sock_sendall(sock, request), WAIT)
    return sock


async def read_all(sock: socket.socket) -> bytes:
    """Read ``sock`` to its end (bounded)."""
    loop = asyncio.get_running_loop()
    data = bytearray()
    async with asyncio.timeout(WAIT):
        while chunk := await loop.sock_recv(sock, 1 << 20):
            data += chunk
    return bytes(data)


@pytest.fixture
def small_buffers(monkeypatch):
    """relay's sockets get a tiny send buffer, so what relay writes backs up in its
    transports (and pauses the other side) instead of in the kernel."""
    for protocol in (UpstreamConnection, ClientConnection):
        original = protocol.connection_made

        def connection_made(self, transport, original=original):
            sock = transport.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
            original(self, transport)

        monkeypatch.setattr(protocol, "connection_made", connection_made)


def test_a_connection_paused_on_the_last_read_enters_the_pool_reading(
    loop_kind, small_buffers, monkeypatch
):
    """A slow client's pause ends with its exchange: the next request on that pooled
    upstream connection is answered at once, not after the head timeout."""
    # The whole body comes in one read, and writing it pauses the client at once.
    monkeypatch.setattr(downstream, "WRITE_HIGH", 1024)
    monkeypatch.setattr(downstream, "WRITE_LOW", 256)
    body = b"x" * 60_000

    async def keepalive(reader, writer, up):
        while True:
            await read_request(reader, up)
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%b" % (len(body), body))
            await writer.drain()

    async def main():
        async with setup(keepalive, upstream_head_timeout=3.0) as (up, relay):
            for i in range(3):
                sock = await idle_client(relay, request_bytes(extra=b"Connection: close\r\n"))
                # The whole body arrives in one read, which pauses the upstream; the
                # exchange ends while the client still reads nothing. Counted by
                # endings (they only grow): "no exchange active" holds before relay
                # has even read the request.
                await until(lambda i=i: ended(relay) == 2 * i + 1)
                assert (await read_all(sock)).endswith(body)
                sock.close()
                assert pool_is_clean(relay)
                started = asyncio.get_running_loop().time()
                reader, writer = await connect(relay)
                writer.write(request_bytes(extra=b"Connection: close\r\n"))
                data = await read_to_eof(reader)
                assert data.startswith(b"HTTP/1.1 200") and data.endswith(body)
                assert asyncio.get_running_loop().time() - started < 2.0
                writer.close()
            assert up.accepted == 1  # the same connection served all six

    run(loop_kind, main, limit=40)


def test_a_client_dropped_for_not_reading_frees_its_slot(loop_kind, small_buffers):
    """--client-send-timeout aborts the connection: its fd and its --max-connections
    slot are free again, and the next client is served instead of getting 503."""

    async def endless(reader, writer, up):
        await read_request(reader, up)
        writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
        chunk = b"8000\r\n" + b"y" * 0x8000 + b"\r\n"
        while True:
            writer.write(chunk)
            await writer.drain()

    async def main():
        async with setup(endless, client_send_timeout=0.3, max_connections=3) as (_up, relay):
            clients = [await idle_client(relay, request_bytes()) for _ in range(3)]
            await until(lambda: relay.state.metrics.active_exchanges == 3)
            await until(lambda: not relay.state.connections)
            assert settled(relay)
            # A fourth client fits again (it is answered by the endless stream).
            reader, writer = await connect(relay)
            writer.write(request_bytes())
            assert (await read_head(reader)).startswith(b"HTTP/1.1 200")
            writer.close()
            for sock in clients:
                sock.close()

    run(loop_kind, main)


def test_a_cut_stream_to_a_client_that_never_reads_is_closed_within_the_send_timeout(
    loop_kind, small_buffers, monkeypatch
):
    """A graceful close has a deadline: the truncated stream's socket does not wait forever
    for a client that reads nothing."""
    # relay reads the whole cut body (the client's transport never pauses it), so
    # the cut is seen while a megabyte still waits for the client.
    monkeypatch.setattr(downstream, "WRITE_HIGH", 1 << 24)

    async def cut(reader, writer, up):
        await read_request(reader, up)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 4000000\r\n\r\n" + b"z" * 1_000_000)
        await writer.drain()
        writer.transport.abort()

    async def main():
        async with setup(cut, client_send_timeout=0.3) as (_up, relay):
            sock = await idle_client(relay, request_bytes())
            await until(lambda: relay.state.metrics.truncated_streams == 1)
            await until(lambda: not relay.state.connections, limit=3.0)
            sock.close()

    run(loop_kind, main)


@pytest.mark.parametrize("size", [150_000, 190_000, 230_000, 250_000])
def test_a_client_whose_upstream_answered_early_is_read_again(loop_kind, size, small_buffers):
    """The upstream answers before reading the body: relay's hold on the client's reads
    ends with the exchange, so the next keep-alive request is read and answered."""
    served = []

    async def early(reader, writer, up):
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            served.append(1)
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
            await writer.drain()
            # Answered first; now read (and drop) the body, as a server must.
            length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
            await asyncio.sleep(0.2)
            await reader.readexactly(length)

    async def main():
        up = await ScriptUpstream(early).start(rcvbuf=4096)
        async with relay_for(up.port) as relay:
            reader, writer = await connect(relay)
            writer.write(request_bytes(body=b"{" + b" " * size + b"}"))
            head = await read_head(reader)
            assert head.startswith(b"HTTP/1.1 200")
            await asyncio.wait_for(reader.readexactly(2), WAIT)
            if b"connection: close" in head.lower():
                return  # relay chose to close: nothing to be left paused
            await until(lambda: relay.state.metrics.active_exchanges == 0)
            writer.write(request_bytes(body=b"{}", extra=b"Connection: close\r\n"))
            data = await read_to_eof(reader)
            assert data.startswith(b"HTTP/1.1 200"), data[:200]
            for conn in relay.state.connections:
                assert conn.transport.is_reading() or conn.exchange is not None
        await up.close()

    run(loop_kind, main)


def test_a_fast_uploader_is_not_blamed_when_the_upstream_is_slow_to_read(loop_kind):
    """relay stopped reading because the upstream did not take the body: no 408; the
    request completes once the upstream reads."""
    # Larger than every kernel buffer on the way, so relay must wait for the upstream.
    body = b"{" + b" " * 40_000_000 + b"}"

    async def slow_reader(reader, writer, up):
        await reader.readuntil(b"\r\n\r\n")
        await asyncio.sleep(1.0)  # longer than the client body timeout
        received = 0
        while received < len(body):
            received += len(await asyncio.wait_for(reader.read(1 << 20), WAIT))
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
        await writer.drain()

    async def main():
        async with setup(slow_reader, client_body_timeout=0.3) as (_up, relay):
            reader, writer = await connect(relay)
            writer.write(request_bytes(body=body, extra=b"Connection: close\r\n"))
            data = await asyncio.wait_for(reader.read(), 15)
            assert data.startswith(b"HTTP/1.1 200"), data[:300]
            assert relay.state.metrics.timeouts == 0

    run(loop_kind, main, limit=40)


def test_an_upstream_that_never_reads_the_body_is_the_one_blamed(loop_kind):
    """An upstream that stops taking the request body gets a 504 naming it, not a 408."""
    body = b"{" + b" " * 40_000_000 + b"}"

    async def deaf(reader, writer, up):
        await reader.readuntil(b"\r\n\r\n")
        await asyncio.sleep(WAIT)

    async def main():
        async with setup(deaf, client_body_timeout=0.3, upstream_idle_timeout=0.6) as (
            _up,
            relay,
        ):
            reader, writer = await connect(relay)
            writer.write(request_bytes(body=body))
            data = await read_to_eof(reader)
            assert data.startswith(b"HTTP/1.1 504"), data[:300]
            assert b"upstream stopped reading the request body" in data
            await until(lambda: settled(relay))

    run(loop_kind, main)


def test_framing_comes_from_relay_even_when_connection_names_it(loop_kind):
    """An upstream whose Connection header names Content-Length still gets a delimited
    body to the client, and a pipelined second response stays separate."""

    async def sneaky(reader, writer, up):
        for _ in range(2):
            await read_request(reader, up)
            writer.write(
                b"HTTP/1.1 200 OK\r\nConnection: content-length, transfer-encoding\r\n"
                b"Content-Length: 5\r\n\r\nhello"
            )
            await writer.drain()

    async def main():
        async with setup(sneaky) as (_up, relay):
            reader, writer = await connect(relay)
            writer.write(request_bytes(body=b"{}") + request_bytes(body=b"{}"))
            for _ in range(2):
                head = await read_head(reader)
                assert b"content-length: 5\r\n" in head.lower(), head
                assert await asyncio.wait_for(reader.readexactly(5), WAIT) == b"hello"
            writer.close()

    run(loop_kind, main)


def test_a_response_head_over_the_limit_in_one_read_is_refused(loop_kind):
    """An upstream head longer than --max-header-bytes is a 502, whole read or not."""

    async def big_head(reader, writer, up):
        await read_request(reader, up)
        writer.write(
            b"HTTP/1.1 200 OK\r\nx-big: " + b"a" * 3000 + b"\r\ncontent-length: 2\r\n\r\nok"
        )
        await writer.drain()

    async def main():
        async with setup(big_head, max_header_bytes=2048) as (_up, relay):
            reader, writer = await connect(relay)
            writer.write(request_bytes())
            data = await read_to_eof(reader)
            assert data.startswith(b"HTTP/1.1 502"), data[:200]
            assert b"x-big" not in data

    run(loop_kind, main)


def models_upstream(names: list[str], *, pad: int = 0):
    document = {"object": "list", "data": [{"id": n, "object": "model"} for n in names]}
    if pad:
        document["padding"] = "p" * pad
    body = json.dumps(document).encode()

    async def handler(reader, writer, up):
        while True:
            await read_request(reader, up)
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%b" % (len(body), body))
            await writer.drain()

    return handler


async def get_models(relay) -> tuple[bytes, bytes]:
    reader, writer = await connect(relay)
    writer.write(b"GET /v1/models HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
    data = await read_to_eof(reader)
    head, _, body = data.partition(b"\r\n\r\n")
    return head, body


def test_model_list_is_the_union_of_every_upstream_plus_aliases(loop_kind):
    """Two upstreams, one alias: the list names each model once, from both upstreams,
    and the access figures count the bytes the client got."""

    async def main():
        a = await ScriptUpstream(models_upstream(["m-a", "shared"])).start()
        b = await ScriptUpstream(models_upstream(["shared", "m-b"])).start()
        try:
            async with relay_for(
                a.port,
                more_upstreams=(parse_upstream(f"127.0.0.1:{b.port}"),),
                model_map=ModelMap({"alias": "m-b"}),
            ) as relay:
                head, body = await get_models(relay)
                assert head.startswith(b"HTTP/1.1 200")
                ids = [entry["id"] for entry in json.loads(body)["data"]]
                assert ids == ["m-a", "shared", "m-b", "alias"]
                assert f"content-length: {len(body)}".encode() in head.lower()
                await until(lambda: settled(relay))
        finally:
            await a.close()
            await b.close()

    run(loop_kind, main)


def test_strict_model_list_names_only_what_is_served(loop_kind):
    """Under --strict-models the list holds the routed models (listed upstream or not)
    and the aliases that route, and nothing that would answer 404."""

    async def main():
        a = await ScriptUpstream(models_upstream(["served", "unrouted"])).start()
        try:
            address = f"127.0.0.1:{a.port}"
            async with relay_for(
                a.port,
                routes=(parse_route(f"served={address}"), parse_route(f"Other-Model={address}")),
                strict_models=True,
                model_map=ModelMap({"alias": "served", "dangling": "nowhere"}),
            ) as relay:
                _head, body = await get_models(relay)
                ids = sorted(entry["id"] for entry in json.loads(body)["data"])
                assert ids == ["Other-Model", "alias", "served"]
        finally:
            await a.close()

    run(loop_kind, main)


def test_an_oversized_model_list_ends_the_exchange_once_with_a_clear_error(loop_kind):
    """A model list over 1 MiB is a 502 with a JSON error; the exchange ends once and the
    gauges return to zero."""

    async def main():
        async with setup(
            models_upstream(["m"], pad=2 * 1024 * 1024), model_map=ModelMap({"alias": "m"})
        ) as (_up, relay):
            for _ in range(2):
                head, body = await get_models(relay)
                assert head.startswith(b"HTTP/1.1 502"), head
                assert json.loads(body)["error"]["message"]
            await until(lambda: settled(relay))
            assert relay.state.metrics.active_exchanges == 0

    run(loop_kind, main)


def test_bytes_from_an_idle_pooled_connection_close_it(loop_kind):
    """Reads go straight to the exchange that owns a connection; once it is pooled
    they come back to the pool's side: stray bytes then close it, the finished
    exchange never sees them, and the next request gets a fresh connection."""
    ok = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
    pooled = asyncio.Event()

    async def upstream(reader, writer, up):
        await read_request(reader, up)
        writer.write(ok)
        await writer.drain()
        if up.accepted == 1:
            await asyncio.wait_for(pooled.wait(), WAIT)
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nstale")
            await writer.drain()
        # Held open well past the test's waits: only relay can close it.
        await asyncio.sleep(4 * WAIT)

    async def main():
        # Pooled connections outlive the test: only the stray bytes can end this one.
        async with setup(upstream, upstream_keepalive_timeout=60.0) as (up, relay):
            pool = relay.state.router.default[0]
            reader, writer = await connect(relay)
            writer.write(b"GET /a HTTP/1.1\r\nHost: t\r\n\r\n")
            assert (await read_head(reader)).startswith(b"HTTP/1.1 200")
            assert await asyncio.wait_for(reader.readexactly(2), WAIT) == b"ok"
            await until(lambda: pool.idle_count == 1)
            pooled.set()
            await until(lambda: pool.idle_count == 0)  # the stray bytes closed it
            writer.write(b"GET /b HTTP/1.1\r\nHost: t\r\n\r\n")
            assert (await read_head(reader)).startswith(b"HTTP/1.1 200")
            assert await asyncio.wait_for(reader.readexactly(2), WAIT) == b"ok"
            assert up.accepted == 2
            await until(lambda: settled(relay) and pool_is_clean(relay))
            writer.close()

    run(loop_kind, main)


@pytest.mark.parametrize("connection", [b"close", b"Keep-Alive, CLOSE"])
def test_an_upstream_answer_with_connection_close_is_not_pooled(loop_kind, connection):
    """An upstream that says ``Connection: close`` (any case, in a list) is taken at
    its word even if it keeps the socket open: relay closes that connection and
    the next request goes over a new one."""
    answer = b"HTTP/1.1 200 OK\r\nConnection: %b\r\nContent-Length: 2\r\n\r\nok" % connection

    async def upstream(reader, writer, up):
        while True:
            await read_request(reader, up)
            writer.write(answer)
            await writer.drain()

    async def main():
        # Pooled connections outlive the test: only the header can end this one.
        async with setup(upstream, upstream_keepalive_timeout=60.0) as (up, relay):
            pool = relay.state.router.default[0]
            reader, writer = await connect(relay)
            for _ in range(2):
                writer.write(b"GET /a HTTP/1.1\r\nHost: t\r\n\r\n")
                assert (await read_head(reader)).startswith(b"HTTP/1.1 200")
                assert await asyncio.wait_for(reader.readexactly(2), WAIT) == b"ok"
            await until(lambda: settled(relay) and len(up.closed_at) >= 2)
            assert up.accepted == 2
            assert pool.idle_count == 0
            writer.close()

    run(loop_kind, main)


@pytest.mark.parametrize("answer", [b"401", b"413", b"503"])
def test_an_answer_before_a_known_length_body_is_read_reaches_the_client_whole(loop_kind, answer):
    """relay answers while most of a known-length body is still on its way (a bad
    key, too large, or no --max-inflight slot in time) and a pipelined request
    follows: the client reads the whole error (a lingering close, not a reset),
    and relay is left with nothing in flight and a clean pool."""
    body = b"x" * 200_000
    extra = b"Authorization: Bearer sk-good\r\n"

    async def upstream(reader, writer, up):
        while True:
            raw = await read_request(reader, up)
            if parse_request(raw).target == b"/first":
                await asyncio.sleep(1.0)  # holds the only slot past the queue timeout
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
            await writer.drain()

    async def main():
        limits: dict = {"api_keys": ("sk-good",)}
        if answer == b"401":
            limits["api_keys"] = ("sk-other",)
        elif answer == b"413":
            limits["max_body_bytes"] = 100_000
        else:
            limits.update(max_inflight=1, queue_timeout=0.2)
        async with setup(upstream, **limits) as (up, relay):
            if answer == b"503":
                _, first = await connect(relay)
                first.write(request_bytes("/first", b"{}", extra=extra))
                await until(lambda: up.accepted == 1)
            reader, writer = await connect(relay)
            wire = request_bytes(body=body, extra=extra)
            writer.write(wire[:-150_000])  # the head and a part of the body
            await asyncio.sleep(0.05)
            with contextlib.suppress(ConnectionError):
                writer.write(wire[-150_000:] + request_bytes(body=b"{}", extra=extra))
                await writer.drain()
            data = await read_to_eof(reader)
            assert data.startswith(b"HTTP/1.1 " + answer), data[:100]
            head, _, error = data.partition(b"\r\n\r\n")
            assert b"content-length: %d\r\n" % len(error) in head, data  # the error, whole
            assert json.loads(error)["error"]["code"], error
            await until(lambda: settled(relay) and pool_is_clean(relay))
            await until(lambda: all(c.exchange is None for c in relay.state.connections))
            writer.close()

    run(loop_kind, main)
