"""The contracts of DESIGN.md §3, each against a real relay on loopback sockets.

The upstream here is scripted byte by byte (tests/harness.py) so that every
test controls exactly what the relay reads and when.
"""

from __future__ import annotations

import asyncio
import socket

import h11
import pytest
from harness import (
    CHUNKED_HEAD,
    WAIT,
    connect,
    parse_request,
    read_head,
    read_request,
    read_to_eof,
    request_bytes,
    reset,
    run,
    setup,
    sse_chunk,
    until,
)

from relay.core.downstream import ClientConnection

pytestmark = pytest.mark.timeout(30)


# -- 1. Fidelity ------------------------------------------------------------------
FIDELITY_PIECES = [
    b"1f;name=value\r\n" + b"a" * 0x1F + b"\r\n",
    b"5\r\nhel",  # a chunk split across two reads
    b"lo\r\n",
    b'0000A;x="q v"\r\n0123456789\r\n',
    b"0\r\nx-trailer: yes\r\nx-other: 2\r\n\r\n",
]


def test_chunked_body_bytes_reach_the_client_unchanged_read_by_read(loop_kind):
    """Chunk sizes, extensions and trailers arrive exactly as sent, each read before the next."""
    gate = None

    async def upstream(reader, writer, up):
        await read_request(reader, up)
        writer.write(CHUNKED_HEAD)
        for piece in FIDELITY_PIECES:
            writer.write(piece)
            await writer.drain()
            await asyncio.wait_for(gate.get(), WAIT)  # the client saw it: next piece
        await asyncio.sleep(0.2)

    async def main():
        nonlocal gate
        gate = asyncio.Queue()
        async with setup(upstream) as (_, relay):
            reader, writer = await connect(relay)
            writer.write(request_bytes())
            head = await read_head(reader)
            assert b"x-accel-buffering: no" in head.lower()
            received = b""
            for piece in FIDELITY_PIECES:
                # The piece must arrive on its own: the upstream waits for us.
                chunk = await asyncio.wait_for(reader.readexactly(len(piece)), WAIT)
                received += chunk
                gate.put_nowait(None)
            assert received == b"".join(FIDELITY_PIECES)
            writer.close()

    run(loop_kind, main)


def test_content_length_body_and_keep_alive_reuse_one_upstream_connection(loop_kind):
    """Two requests on one client connection reuse one pooled upstream connection."""

    async def upstream(reader, writer, up):
        while True:
            await read_request(reader, up)
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello")

    async def main():
        async with setup(upstream) as (up, relay):
            reader, writer = await connect(relay)
            for _ in range(2):
                writer.write(request_bytes(body=b'{"stream":false}'))
                head = await read_head(reader)
                assert head.startswith(b"HTTP/1.1 200 OK")
                assert await asyncio.wait_for(reader.readexactly(5), WAIT) == b"hello"
            assert up.accepted == 1
            assert relay.metrics.upstream_reused == 1
            writer.close()

    run(loop_kind, main)


def test_pipelined_requests_are_answered_in_order(loop_kind):
    """Three requests sent in one write come back as three responses, in order."""

    async def upstream(reader, writer, up):
        while True:
            raw = await read_request(reader, up)
            path = parse_request(raw).target
            body = b"answer to " + path
            await asyncio.sleep(0.02)
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%b" % (len(body), body))

    async def main():
        async with setup(upstream) as (_, relay):
            reader, writer = await connect(relay)
            writer.write(b"".join(request_bytes(f"/p{i}", b"{}") for i in range(3)))
            for i in range(3):
                head = await read_head(reader)
                length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
                body = await asyncio.wait_for(reader.readexactly(length), WAIT)
                assert body == b"answer to /p%d" % i
            writer.close()

    run(loop_kind, main)


def test_http10_client_gets_a_dechunked_body_ended_by_close(loop_kind):
    """An HTTP/1.0 client gets the payload without chunk framing, then the connection closes."""

    async def upstream(reader, writer, up):
        await read_request(reader, up)
        writer.write(CHUNKED_HEAD + sse_chunk("one") + sse_chunk("two") + b"0\r\n\r\n")
        await asyncio.sleep(0.5)

    async def main():
        async with setup(upstream) as (_, relay):
            reader, writer = await connect(relay)
            writer.write(b"GET /stream HTTP/1.0\r\n\r\n")
            data = await read_to_eof(reader)
            head, _, body = data.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.0 200")
            assert b"transfer-encoding" not in head.lower()
            assert body == b"data: one\n\ndata: two\n\n"

    run(loop_kind, main)


# -- 2. Latency: TCP_NODELAY everywhere ---------------------------------------------
def test_tcp_nodelay_is_set_on_accepted_and_upstream_sockets(loop_kind):
    """Both the client-facing and the upstream-facing sockets have TCP_NODELAY."""
    release = None

    async def upstream(reader, writer, up):
        await read_request(reader, up)
        writer.write(CHUNKED_HEAD + sse_chunk("x"))
        await asyncio.wait_for(release.wait(), WAIT)
        writer.write(b"0\r\n\r\n")

    async def main():
        nonlocal release
        release = asyncio.Event()
        async with setup(upstream) as (_, relay):
            reader, writer = await connect(relay)
            writer.write(request_bytes())
            await read_head(reader)
            (conn,) = relay.state.connections
            assert isinstance(conn, ClientConnection)
            client_sock = conn.transport.get_extra_info("socket")
            assert client_sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
            exchange = conn.exchange
            assert exchange is not None and exchange._upstream is not None
            up_sock = exchange._upstream.transport.get_extra_info("socket")
            assert up_sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
            release.set()
            writer.close()

    run(loop_kind, main)


# -- 3. Honest endings -----------------------------------------------------------
BODY = CHUNKED_HEAD + sse_chunk("alpha") + sse_chunk("beta") + b"0\r\n\r\n"
CUT_OFFSETS = [len(CHUNKED_HEAD) + n for n in (0, 1, 3, 5, 12, 20, 31)] + [len(BODY) - 3]


@pytest.mark.parametrize("how", ["close", "reset"])
@pytest.mark.parametrize("offset", CUT_OFFSETS)
def test_upstream_cut_mid_body_never_looks_complete(loop_kind, offset, how):
    """An upstream that dies mid-body leaves the client with a closed, unterminated message."""

    async def upstream(reader, writer, up):
        await read_request(reader, up)
        writer.write(BODY[:offset])
        await writer.drain()
        await asyncio.sleep(0.05)
        if how == "reset":
            reset(writer)

    async def main():
        async with setup(upstream) as (_, relay):
            reader, writer = await connect(relay)
            writer.write(request_bytes())
            try:
                data = await read_to_eof(reader)
            except ConnectionResetError:
                data = b""
            assert not data.endswith(b"0\r\n\r\n")
            _head, _, body = data.partition(b"\r\n\r\n")
            # What arrived is exactly a prefix of what the upstream sent.
            assert body == BODY[len(CHUNKED_HEAD) : offset][: len(body)]
            assert relay.metrics.truncated_streams == 1

    run(loop_kind, main)


def test_content_length_body_cut_short_is_not_completed(loop_kind):
    """A Content-Length body cut short reaches the client short, then the connection closes."""

    async def upstream(reader, writer, up):
        await read_request(reader, up)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\n" + b"x" * 40)

    async def main():
        async with setup(upstream) as (_, relay):
            reader, writer = await connect(relay)
            writer.write(request_bytes())
            data = await read_to_eof(reader)
            assert data.endswith(b"\r\n\r\n" + b"x" * 40)
            assert relay.metrics.truncated_streams == 1

    run(loop_kind, main)


def test_close_delimited_upstream_body_is_rechunked_so_a_cut_shows(loop_kind):
    """A body ended by close is re-framed as chunks: clean close ends it, RST leaves it open."""

    def make(ending):
        async def upstream(reader, writer, up):
            await read_request(reader, up)
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\n\r\nabc")
            await writer.drain()
            await asyncio.sleep(0.05)
            writer.write(b"def")
            await writer.drain()
            await asyncio.sleep(0.05)
            if ending == "reset":
                reset(writer)

        return upstream

    async def main():
        for ending, tail in (("close", b"0\r\n\r\n"), ("reset", b"3\r\ndef\r\n")):
            async with setup(make(ending)) as (_, relay):
                reader, writer = await connect(relay)
                writer.write(request_bytes(extra=b"Connection: close\r\n"))
                data = await read_to_eof(reader)
                head, _, body = data.partition(b"\r\n\r\n")
                assert b"transfer-encoding: chunked" in head.lower()
                assert body.startswith(b"3\r\nabc\r\n3\r\ndef\r\n")
                assert body.endswith(tail)

    run(loop_kind, main)


def test_invalid_chunk_framing_from_upstream_cuts_the_stream(loop_kind):
    """Malformed chunk framing from the upstream is not forwarded and the stream is cut."""

    async def upstream(reader, writer, up):
        await read_request(reader, up)
        writer.write(CHUNKED_HEAD + sse_chunk("ok"))
        await writer.drain()
        await asyncio.sleep(0.05)
        writer.write(b"zz\r\nbad\r\n0\r\n\r\n")
        await asyncio.sleep(0.5)

    async def main():
        async with setup(upstream) as (_, relay):
            reader, writer = await connect(relay)
            writer.write(request_bytes())
            data = await read_to_eof(reader)
            assert data.endswith(sse_chunk("ok"))
            assert relay.metrics.truncated_streams == 1

    run(loop_kind, main)


# -- 4. Cancellation -------------------------------------------------------------
def test_client_disconnect_closes_the_upstream_within_100ms_and_it_is_not_reused(loop_kind):
    """A client that leaves mid-stream makes relay close that upstream connection at once."""
    seen_close: asyncio.Future[float] | None = None

    async def upstream(reader, writer, up):
        await read_request(reader, up)
        if up.accepted > 1:
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
            await asyncio.sleep(1)
            return
        writer.write(CHUNKED_HEAD + sse_chunk("first"))
        # The stream stalls (a long gap); relay must still notice the client left.
        data = await asyncio.wait_for(reader.read(100), WAIT)
        assert data == b""
        seen_close.set_result(asyncio.get_running_loop().time())

    async def main():
        nonlocal seen_close
        seen_close = asyncio.get_running_loop().create_future()
        async with setup(upstream) as (up, relay):
            reader, writer = await connect(relay)
            writer.write(request_bytes())
            await read_head(reader)
            await asyncio.wait_for(reader.readexactly(len(sse_chunk("first"))), WAIT)
            gone = asyncio.get_running_loop().time()
            writer.close()
            closed = await asyncio.wait_for(seen_close, WAIT)
            assert closed - gone < 0.1
            assert relay.metrics.client_disconnects == 1
            # The next request needs a new upstream connection.
            reader, writer = await connect(relay)
            writer.write(request_bytes())
            head = await read_head(reader)
            assert head.startswith(b"HTTP/1.1 200")
            assert up.accepted == 2
            writer.close()

    run(loop_kind, main)


def test_stale_pooled_connection_is_retried_once_on_a_fresh_one(loop_kind):
    """A pooled connection the upstream closed before answering is replaced, not a 502."""

    async def upstream(reader, writer, up):
        await read_request(reader, up)
        if up.accepted == 1:
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
            await writer.drain()
            # Keep-alive race: the upstream closes just as relay reuses it.
            await read_request(reader, up)
            return
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nfresh")

    async def main():
        async with setup(upstream) as (up, relay):
            reader, writer = await connect(relay)
            writer.write(request_bytes(body=b'{"n":1}'))
            await read_head(reader)
            assert await asyncio.wait_for(reader.readexactly(2), WAIT) == b"ok"
            writer.write(request_bytes(body=b'{"n":2}'))
            head = await read_head(reader)
            assert head.startswith(b"HTTP/1.1 200")
            assert await asyncio.wait_for(reader.readexactly(5), WAIT) == b"fresh"
            assert up.accepted == 2
            assert relay.metrics.upstream_retries == 1
            # The retried request carried the same body.
            assert up.received[1].endswith(b'{"n":2}')
            writer.close()

    run(loop_kind, main)


# -- 5/6. Limits and clear errors ---------------------------------------------------
async def _expect_error(relay, payload: bytes, status: int) -> dict:
    import json

    reader, writer = await connect(relay)
    writer.write(payload)
    data = await read_to_eof(reader)
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 %d" % status) or head.startswith(b"HTTP/1.0 %d" % status), (
        data
    )
    document = json.loads(body)
    assert set(document["error"]) == {"message", "type", "code"}
    return document


async def _never_called(reader, writer, up):
    await read_request(reader, up)
    writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")


SMUGGLING = {
    "cl_and_te": b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\n"
    b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    "two_different_cl": b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\n"
    b"Content-Length: 5\r\n\r\nabcde",
    "duplicate_cl": b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\n"
    b"content-length: 4\r\n\r\nabcd",
    "cl_with_sign": b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: +4\r\n\r\nabcd",
    "obs_fold": b"POST / HTTP/1.1\r\nHost: a\r\nX-A: b\r\n c\r\nContent-Length: 0\r\n\r\n",
    "te_obfuscated": b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: xchunked\r\n\r\n",
    "space_in_name": b"POST / HTTP/1.1\r\nHost: a\r\nContent Length: 4\r\n\r\nabcd",
    "nul_in_value": b"GET / HTTP/1.1\r\nHost: a\r\nX-A: b\x00c\r\n\r\n",
    "ctl_in_value": b"GET / HTTP/1.1\r\nHost: a\r\nX-A: b\x01c\r\n\r\n",
    "bad_chunk_size": b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    "te_cl": b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n"
    b"\r\n0\r\n\r\n",
    "te_te_twice": b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n"
    b"Transfer-Encoding: x\r\n\r\n0\r\n\r\n",
    "te_list": b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked, identity\r\n\r\n",
    "te_space_before_colon": b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding : chunked\r\n"
    b"\r\n0\r\n\r\n",
    "te_vertical_tab": b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding:\x0bchunked\r\n\r\n",
    "cl_with_space_inside": b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1 0\r\n\r\n0123456789",
    "cl_comma_list": b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 4, 5\r\n\r\nabcde",
    "chunk_size_overflow": b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"FFFFFFFFFFFFFFFFFFFFFF\r\nabc\r\n",
    "nul_in_name": b"GET / HTTP/1.1\r\nHost: a\r\nX\x00A: b\r\n\r\n",
    "bare_cr_in_value": b"GET / HTTP/1.1\r\nHost: a\r\nX-A: b\rc\r\n\r\n",
}


@pytest.mark.parametrize("name", sorted(SMUGGLING))
def test_ambiguous_request_framing_is_rejected_before_reaching_the_upstream(loop_kind, name):
    """Smuggling vectors get a 4xx/5xx JSON error and the upstream sees nothing."""

    async def main():
        async with setup(_never_called) as (up, relay):
            reader, writer = await connect(relay)
            writer.write(SMUGGLING[name])
            data = await read_to_eof(reader)
            assert data.startswith((b"HTTP/1.1 400", b"HTTP/1.1 501")), data
            await asyncio.sleep(0.05)
            assert not any(up.received), bytes(up.received[0])

    run(loop_kind, main)


def test_limits_answer_431_413_408_with_json_errors(loop_kind):
    """Oversized heads, oversized bodies and slow heads get their status and a JSON body."""

    async def main():
        limits = dict(max_header_bytes=4096, max_body_bytes=100, client_head_timeout=0.2)
        async with setup(_never_called, **limits) as (_up, relay):
            big = b"GET / HTTP/1.1\r\nHost: a\r\nX-Big: " + b"b" * 8000 + b"\r\n\r\n"
            await _expect_error(relay, big, 431)
            await _expect_error(relay, request_bytes(body=b"x" * 101), 413)
            chunked = (
                b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
                b"40\r\n" + b"y" * 64 + b"\r\n40\r\n" + b"y" * 64 + b"\r\n0\r\n\r\n"
            )
            await _expect_error(relay, chunked, 413)
            await _expect_error(relay, b"GET / HTTP/1.1\r\nHost:", 408)

    run(loop_kind, main)


def test_upstream_refused_is_502_and_silent_upstream_is_504(loop_kind):
    """Nothing listening → 502; an upstream that never answers → 504 after the head timeout."""

    async def silent(reader, writer, up):
        await read_request(reader, up)
        await asyncio.sleep(5)

    async def main():
        probe = socket.socket()
        probe.bind(("127.0.0.1", 0))
        free_port = probe.getsockname()[1]
        probe.close()
        from harness import relay_for

        async with relay_for(free_port) as relay:
            doc = await _expect_error(relay, request_bytes(), 502)
            assert doc["error"]["type"] == "server_error"
        async with setup(silent, upstream_head_timeout=0.3) as (_, relay):
            await _expect_error(relay, request_bytes(), 504)

    run(loop_kind, main)


def test_connections_beyond_the_limit_get_503(loop_kind):
    """The connection past --max-connections is answered 503 and closed."""

    async def main():
        async with setup(_never_called, max_connections=2) as (_, relay):
            held = [await connect(relay) for _ in range(2)]
            await asyncio.sleep(0.05)
            await _expect_error(relay, b"", 503)
            for _, writer in held:
                writer.close()

    run(loop_kind, main)


# -- HTTP semantics ----------------------------------------------------------------
def test_head_204_304_and_expect_continue(loop_kind):
    """Bodiless responses end at the head; Expect: 100-continue gets 100 before the body."""

    async def upstream(reader, writer, up):
        while True:
            raw = await read_request(reader, up)
            request = parse_request(raw)
            if request.method == b"HEAD":
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 1234\r\n\r\n")
            elif request.target == b"/204":
                writer.write(b"HTTP/1.1 204 No Content\r\n\r\n")
            elif request.target == b"/304":
                writer.write(b"HTTP/1.1 304 Not Modified\r\ncontent-length: 9\r\n\r\n")
            else:
                body = raw.partition(b"\r\n\r\n")[2]
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%b" % (len(body), body))

    async def main():
        async with setup(upstream) as (up, relay):
            reader, writer = await connect(relay)
            writer.write(b"HEAD / HTTP/1.1\r\nHost: a\r\n\r\n")
            assert b"content-length: 1234" in (await read_head(reader)).lower()
            for path in (b"/204", b"/304"):
                writer.write(b"GET %b HTTP/1.1\r\nHost: a\r\n\r\n" % path)
                assert (await read_head(reader)).startswith(b"HTTP/1.1 " + path[1:])
            writer.write(
                b"POST /echo HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n"
                b"Expect: 100-continue\r\n\r\n"
            )
            assert await read_head(reader) == b"HTTP/1.1 100 Continue\r\n\r\n"
            writer.write(b"hello")
            head = await read_head(reader)
            assert head.startswith(b"HTTP/1.1 200")
            assert await asyncio.wait_for(reader.readexactly(5), WAIT) == b"hello"
            assert up.accepted == 1  # all on one pooled connection
            assert b"expect" not in bytes(up.received[0]).lower()
            writer.close()

    run(loop_kind, main)


def test_forwarding_headers_and_hop_by_hop_removal(loop_kind):
    """The upstream sees X-Forwarded-*, Via and Host, and none of the hop-by-hop fields."""

    async def upstream(reader, writer, up):
        await read_request(reader, up)
        writer.write(
            b"HTTP/1.1 200 OK\r\nConnection: x-secret\r\nX-Secret: 1\r\nKeep-Alive: timeout=5\r\n"
            b"content-length: 0\r\n\r\n"
        )

    async def main():
        async with setup(upstream) as (up, relay):
            reader, writer = await connect(relay)
            writer.write(
                b"GET / HTTP/1.1\r\nHost: example.test\r\nConnection: keep-alive, x-hop\r\n"
                b"X-Hop: 1\r\nTE: trailers\r\nUpgrade: h2c\r\nProxy-Authorization: x\r\n"
                b"X-Forwarded-For: 10.0.0.1\r\n\r\n"
            )
            head = (await read_head(reader)).lower()
            assert b"x-secret" not in head and b"keep-alive" not in head
            request = parse_request(bytes(up.received[0]))
            headers = {k: v for k, v in request.headers}
            assert headers[b"host"] == b"example.test"
            assert headers[b"x-forwarded-for"] == b"10.0.0.1, 127.0.0.1"
            assert headers[b"x-forwarded-proto"] == b"http"
            assert headers[b"via"] == b"1.1 relay"
            for hop in (b"x-hop", b"te", b"upgrade", b"proxy-authorization", b"connection"):
                assert hop not in headers
            writer.close()

    run(loop_kind, main)


def test_conflicting_framing_from_upstream_is_502_and_not_reused(loop_kind):
    """An upstream head with both Content-Length and chunked is a 502, its connection dropped."""

    async def upstream(reader, writer, up):
        await read_request(reader, up)
        writer.write(
            b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\ntransfer-encoding: chunked\r\n\r\n"
            b"3\r\nabc\r\n0\r\n\r\n"
        )
        await asyncio.sleep(0.5)

    async def main():
        async with setup(upstream) as (_up, relay):
            await _expect_error(relay, request_bytes(), 502)
            assert relay.state.pool.idle_count == 0

    run(loop_kind, main)


# -- Flow control -------------------------------------------------------------------
def test_slow_client_keeps_relay_memory_bounded(loop_kind):
    """A client that stops reading pauses the upstream; relay's buffer stays near the high mark."""
    sent = 0
    total = 32 * 1024 * 1024

    async def upstream(reader, writer, up):
        nonlocal sent
        await read_request(reader, up)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % total)
        block = b"t" * 65536
        while sent < total:
            writer.write(block)
            sent += len(block)
            await writer.drain()

    async def main():
        async with setup(upstream) as (_, relay):
            # A tiny receive buffer so the kernel cannot absorb the stream for us.
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.setblocking(False)
            await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", relay.port))
            reader, writer = await asyncio.open_connection(sock=sock)
            writer.write(request_bytes())
            await read_head(reader)
            await asyncio.sleep(0.5)  # client reads nothing
            (conn,) = relay.state.connections
            buffered = conn.transport.get_write_buffer_size()
            assert buffered <= 64 * 1024 + 256 * 1024
            assert sent < total / 4  # the upstream was held back too
            writer.close()

    run(loop_kind, main)


@pytest.mark.parametrize("pooled", [True, False], ids=["pooled", "fresh-connection"])
def test_request_bodies_split_at_every_offset_reach_the_upstream_exactly(loop_kind, pooled):
    """Pipelined requests with bodies of known length, none, and chunks, split in two
    writes at every offset: the upstream gets each body exactly, the answers come in
    order, whether the upstream connection was pooled or is still being opened
    while the body arrives (relay counts known-length bodies off without h11)."""
    wire = (
        request_bytes("/a", b"0123456789")
        + b"GET /b HTTP/1.1\r\nHost: t\r\n\r\n"
        + request_bytes("/c", b"xyz")
        + b"POST /d HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
        + b"5\r\nhello\r\n0\r\n\r\n"
    )
    expected = [b"/a=0123456789", b"/b=", b"/c=xyz", b"/d=hello"]

    async def upstream(reader, writer, up):
        while True:
            conn = h11.Connection(h11.SERVER)
            target, body = b"", b""
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    data = await asyncio.wait_for(reader.read(65536), WAIT)
                    if not data:
                        return
                    conn.receive_data(data)
                elif isinstance(event, h11.Request):
                    target = event.target
                elif isinstance(event, h11.Data):
                    body += event.data
                elif isinstance(event, h11.EndOfMessage):
                    break
            answer = target + b"=" + body
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%b" % (len(answer), answer))

    async def main():
        limits = {} if pooled else {"upstream_keepalive": 0}
        async with setup(upstream, **limits) as (_, relay):
            for cut in range(len(wire) + 1):
                reader, writer = await connect(relay)
                writer.write(wire[:cut])
                await writer.drain()
                await asyncio.sleep(0)
                writer.write(wire[cut:])
                for want in expected:
                    head = await read_head(reader)
                    assert head.startswith(b"HTTP/1.1 200"), (cut, head)
                    length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
                    got = await asyncio.wait_for(reader.readexactly(length), WAIT)
                    assert got == want, (cut, got)
                writer.close()
            await until(lambda: relay.state.metrics.active_exchanges == 0)

    run(loop_kind, main, limit=50.0)


def test_a_large_body_sent_while_waiting_for_an_upstream_arrives_whole(loop_kind):
    """A body far bigger than what relay holds while it has no upstream connection
    (its request queued behind --max-inflight): relay stops reading at its bound,
    then streams the rest once the slot frees; the upstream gets every byte, in
    order, and the client its answer."""
    body = bytes(range(256)) * 4096  # 1 MiB
    release = asyncio.Event()

    async def upstream(reader, writer, up):
        raw = await read_request(reader, up)
        if parse_request(raw).target == b"/first":
            await asyncio.wait_for(release.wait(), WAIT)
            answer = b"first"
        else:
            got = raw.split(b"\r\n\r\n", 1)[1]
            answer = b"%d %d" % (len(got), got == body)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%b" % (len(answer), answer))
        await writer.drain()

    async def answer(reader):
        head = await read_head(reader)
        assert head.startswith(b"HTTP/1.1 200"), head
        length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
        return await asyncio.wait_for(reader.readexactly(length), WAIT)

    async def main():
        async with setup(upstream, max_inflight=1, queue_timeout=WAIT) as (up, relay):
            first_reader, first = await connect(relay)
            first.write(request_bytes("/first", b"{}"))
            await until(lambda: up.accepted == 1)
            reader, writer = await connect(relay)
            big = request_bytes("/big", body)
            writer.write(big[: -len(body)])  # the head first: the request is queued
            bound = relay.state.config.max_header_bytes
            await until(lambda: sum(c.exchange is not None for c in relay.state.connections) == 2)
            writer.write(body)
            await asyncio.sleep(0.2)  # the client keeps sending; relay must not keep reading
            held = max(len(c._pending) for c in relay.state.connections)
            assert held <= bound + 256 * 1024, held
            release.set()
            assert await answer(first_reader) == b"first"
            await asyncio.wait_for(writer.drain(), WAIT)
            assert await answer(reader) == b"%d 1" % len(body)
            first.close()
            writer.close()

    run(loop_kind, main)
