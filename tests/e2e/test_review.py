"""Second review of the performance rework (af923ed and the merges after it).

Each test attacks one of the rework's changes over real loopback sockets:
the request head and body relay now writes itself, the response head joined
with the first body bytes, the per-server tick, and the synchronous attach
of pooled connections.
"""

from __future__ import annotations

import asyncio

import h11
import pytest
from harness import (
    WAIT,
    connect,
    read_head,
    read_request,
    read_to_eof,
    run,
    setup,
)

pytestmark = pytest.mark.timeout(60)

OK = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"


def chunked_request(chunks: list[bytes], *, extra: bytes = b"") -> bytes:
    body = b"".join(b"%x\r\n%b\r\n" % (len(c), c) for c in chunks) + b"0\r\n\r\n"
    return (
        b"POST /v1/completions HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
        b"Transfer-Encoding: chunked\r\n%b\r\n%b" % (extra, body)
    )


def parsed_body(raw: bytes) -> tuple[h11.Request, bytes]:
    """The request and the body the upstream reads from ``raw`` (h11 as a server)."""
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(raw)
    request = conn.next_event()
    assert isinstance(request, h11.Request), request
    body = b""
    while True:
        event = conn.next_event()
        if isinstance(event, h11.Data):
            body += event.data
        elif isinstance(event, h11.EndOfMessage):
            return request, body
        else:
            raise AssertionError(f"incomplete request upstream: {event!r} in {raw!r}")


def test_framing_error_in_the_first_read_still_sends_the_head(loop_kind):
    """An upstream whose head and broken first chunk arrive in one read: the client
    still gets the response head before the cut (as before the rework), never an empty reply."""

    async def upstream(reader, writer, up):
        await read_request(reader, up)
        writer.write(
            b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
            b"transfer-encoding: chunked\r\n\r\nZZ-not-a-chunk-size\r\n"
        )
        await writer.drain()
        await asyncio.sleep(2)

    async def main():
        async with setup(upstream) as (_up, relay):
            reader, writer = await connect(relay)
            writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: t\r\nContent-Length: 2\r\n\r\n{}")
            data = await read_to_eof(reader)
            assert data.startswith(b"HTTP/1.1 "), data
            assert relay.metrics.truncated_streams == 1
            writer.close()

    run(loop_kind, main)


def test_chunked_body_replayed_on_a_fresh_connection_is_well_framed(loop_kind):
    """A chunked request retried after a stale pooled connection reaches the fresh
    upstream as one complete, well-framed chunked body with every chunk."""

    async def upstream(reader, writer, up):
        await read_request(reader, up)
        if up.accepted == 1:
            writer.write(OK)
            await writer.drain()
            await read_request(reader, up)  # then closes without answering
            return
        writer.write(OK)
        await writer.drain()

    async def main():
        async with setup(upstream) as (up, relay):
            reader, writer = await connect(relay)
            writer.write(chunked_request([b'{"n":1}']))
            await read_head(reader)
            assert await asyncio.wait_for(reader.readexactly(2), WAIT) == b"ok"
            writer.write(chunked_request([b'{"a":', b'"b"}', b"x" * 3]))
            head = await read_head(reader)
            assert head.startswith(b"HTTP/1.1 200"), head
            assert relay.metrics.upstream_retries == 1
            request, body = parsed_body(bytes(up.received[1]))
            assert body == b'{"a":"b"}xxx'
            assert request.method == b"POST"
            writer.close()

    run(loop_kind, main)


def test_expect_continue_chunked_body_on_a_pooled_connection(loop_kind):
    """Expect: 100-continue with a chunked body, attached at once to a pooled
    connection: one 100 for the client, no Expect upstream, the whole body upstream."""

    async def upstream(reader, writer, up):
        while True:
            await read_request(reader, up)
            writer.write(OK)
            await writer.drain()

    async def main():
        async with setup(upstream) as (up, relay):
            reader, writer = await connect(relay)
            writer.write(b"GET /warm HTTP/1.1\r\nHost: t\r\n\r\n")
            await read_head(reader)
            assert await asyncio.wait_for(reader.readexactly(2), WAIT) == b"ok"
            head = chunked_request([], extra=b"Expect: 100-continue\r\n")
            head = head[: head.index(b"\r\n\r\n") + 4]
            writer.write(head)
            assert await read_head(reader) == b"HTTP/1.1 100 Continue\r\n\r\n"
            writer.write(b"3\r\nabc\r\n")
            await asyncio.sleep(0.05)
            writer.write(b"2\r\nde\r\n0\r\n\r\n")
            final = await read_head(reader)
            assert final.startswith(b"HTTP/1.1 200"), final
            assert await asyncio.wait_for(reader.readexactly(2), WAIT) == b"ok"
            assert up.accepted == 1 and relay.metrics.upstream_reused == 1
            raw = bytes(up.received[0])
            second = raw[raw.index(b"POST ") :]
            request, body = parsed_body(second)
            assert body == b"abcde"
            assert b"expect" not in {name for name, _ in request.headers}
            writer.close()

    run(loop_kind, main)


def test_head_request_on_a_pooled_connection_then_the_next_request(loop_kind):
    """A HEAD answer with Content-Length has no body: the client gets the head only,
    and the pooled connection carries the next request correctly."""

    async def upstream(reader, writer, up):
        while True:
            raw = await read_request(reader, up)
            if raw.startswith(b"HEAD "):
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n")
            else:
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello")
            await writer.drain()

    async def main():
        async with setup(upstream) as (up, relay):
            reader, writer = await connect(relay)
            writer.write(b"GET /a HTTP/1.1\r\nHost: t\r\n\r\n")
            await read_head(reader)
            assert await asyncio.wait_for(reader.readexactly(5), WAIT) == b"hello"
            writer.write(b"HEAD /b HTTP/1.1\r\nHost: t\r\n\r\n")
            head = await read_head(reader)
            assert head.startswith(b"HTTP/1.1 200") and b"content-length: 5" in head.lower()
            writer.write(b"GET /c HTTP/1.1\r\nHost: t\r\n\r\n")
            head = await read_head(reader)
            assert head.startswith(b"HTTP/1.1 200"), head
            assert await asyncio.wait_for(reader.readexactly(5), WAIT) == b"hello"
            assert up.accepted == 1
            writer.close()

    run(loop_kind, main)


@pytest.mark.parametrize("upstream_body", ["chunked", "length", "close"])
def test_http10_client_body_complete_in_the_first_read(loop_kind, upstream_body):
    """An HTTP/1.0 client whose whole response arrives with the upstream's head gets
    the head, then exactly the payload, then the close."""
    payload = b"data: one\n\ndata: two\n\n"
    if upstream_body == "chunked":
        answer = b"transfer-encoding: chunked\r\n\r\n%x\r\n%b\r\n0\r\n\r\n" % (
            len(payload),
            payload,
        )
    elif upstream_body == "length":
        answer = b"content-length: %d\r\n\r\n%b" % (len(payload), payload)
    else:
        answer = b"connection: close\r\n\r\n" + payload

    async def upstream(reader, writer, up):
        await read_request(reader, up)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n" + answer)
        await writer.drain()
        if upstream_body == "close":
            writer.close()
        else:
            await asyncio.sleep(1)

    async def main():
        async with setup(upstream) as (_up, relay):
            reader, writer = await connect(relay)
            writer.write(b"GET /v1/x HTTP/1.0\r\n\r\n")
            data = await read_to_eof(reader)
            head, _, body = data.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.0 200"), data
            assert body == payload, data
            assert relay.metrics.active_exchanges == 0
            writer.close()

    run(loop_kind, main)


def test_204_with_stray_bytes_in_the_same_read(loop_kind):
    """A 204 followed by stray bytes in one read: the client gets the bare head, the
    next request on the client connection is served on a fresh upstream connection."""

    async def upstream(reader, writer, up):
        await read_request(reader, up)
        if up.accepted == 1:
            writer.write(b"HTTP/1.1 204 No Content\r\n\r\nSTRAY")
        else:
            writer.write(OK)
        await writer.drain()
        await asyncio.sleep(1)

    async def main():
        async with setup(upstream) as (up, relay):
            reader, writer = await connect(relay)
            writer.write(b"GET /a HTTP/1.1\r\nHost: t\r\n\r\n")
            head = await read_head(reader)
            assert head.startswith(b"HTTP/1.1 204"), head
            writer.write(b"GET /b HTTP/1.1\r\nHost: t\r\n\r\n")
            head = await read_head(reader)
            assert head.startswith(b"HTTP/1.1 200"), head
            assert await asyncio.wait_for(reader.readexactly(2), WAIT) == b"ok"
            assert up.accepted == 2
            writer.close()

    run(loop_kind, main)


def test_keepalive_wait_is_not_cut_by_the_shorter_head_timeout(loop_kind):
    """Between requests the keep-alive deadline applies, not the head deadline; a
    partial head after that gets 408 at the head deadline, one tick late at most."""

    async def upstream(reader, writer, up):
        while True:
            await read_request(reader, up)
            writer.write(OK)
            await writer.drain()

    async def main():
        async with setup(upstream, client_head_timeout=0.3, client_keepalive_timeout=3.0) as (
            _up,
            relay,
        ):
            reader, writer = await connect(relay)
            writer.write(b"GET /a HTTP/1.1\r\nHost: t\r\n\r\n")
            await read_head(reader)
            await asyncio.wait_for(reader.readexactly(2), WAIT)
            await asyncio.sleep(0.9)  # three head timeouts, well within keep-alive
            writer.write(b"GET /b HTTP/1.1\r\nHost: t\r\n\r\n")
            head = await read_head(reader)
            assert head.startswith(b"HTTP/1.1 200"), head
            await asyncio.wait_for(reader.readexactly(2), WAIT)
            loop = asyncio.get_running_loop()
            started = loop.time()
            writer.write(b"GET /c HTTP/1.1\r\nHo")
            data = await read_to_eof(reader)
            took = loop.time() - started
            assert data.startswith(b"HTTP/1.1 408"), data
            assert 0.25 <= took < 1.5, took
            writer.close()

    run(loop_kind, main)


def test_client_deadlines_do_not_fire_while_an_exchange_is_in_flight(loop_kind):
    """Short keep-alive and head timeouts never cut a stream that outlives them."""

    async def upstream(reader, writer, up):
        await read_request(reader, up)
        writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
        for _ in range(8):
            await asyncio.sleep(0.1)
            writer.write(b"1\r\nx\r\n")
            await writer.drain()
        writer.write(b"0\r\n\r\n")
        await writer.drain()

    async def main():
        async with setup(upstream, client_head_timeout=0.1, client_keepalive_timeout=0.1) as (
            _up,
            relay,
        ):
            reader, writer = await connect(relay)
            writer.write(b"GET /a HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
            data = await read_to_eof(reader)
            assert data.startswith(b"HTTP/1.1 200"), data
            assert data.endswith(b"1\r\nx\r\n" * 8 + b"0\r\n\r\n"), data
            assert relay.metrics.timeouts == 0
            writer.close()

    run(loop_kind, main)


def test_pooled_connection_expires_before_the_upstream_keepalive_timeout(loop_kind):
    """An idle pooled connection is closed by relay after most of
    --upstream-keepalive-timeout, never after it."""
    finished: list[float] = []

    async def upstream(reader, writer, up):
        await read_request(reader, up)
        writer.write(OK)
        await writer.drain()
        finished.append(asyncio.get_running_loop().time())
        assert await asyncio.wait_for(reader.read(1), WAIT) == b""

    async def main():
        async with setup(upstream, upstream_keepalive_timeout=0.8) as (up, relay):
            reader, writer = await connect(relay)
            writer.write(b"GET /a HTTP/1.1\r\nHost: t\r\n\r\n")
            await read_head(reader)
            await asyncio.wait_for(reader.readexactly(2), WAIT)
            for _ in range(200):
                if up.closed_at:
                    break
                await asyncio.sleep(0.01)
            idle = up.closed_at[0] - finished[0]
            assert 0.4 <= idle <= 0.8 + 0.05, idle
            assert relay.metrics.upstream_reused == 0
            writer.close()

    run(loop_kind, main)


def test_gauges_return_to_zero_with_max_inflight_after_mixed_endings(loop_kind):
    """With --max-inflight 1: a pooled fast-path request, a queued one, one whose
    client leaves while queued and one cut mid-body; afterwards every gauge is zero
    and no task relay started is left."""

    async def upstream(reader, writer, up):
        while True:
            raw = await read_request(reader, up)
            if b"/cut" in raw:
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nabc")
                await writer.drain()
                writer.close()
                return
            if b"/slow" in raw:
                await asyncio.sleep(0.3)
            writer.write(OK)
            await writer.drain()

    async def main():
        before = set(asyncio.all_tasks())
        async with setup(upstream, max_inflight=1) as (_up, relay):
            state = relay.state

            async def get(path: bytes) -> bytes:
                reader, writer = await connect(relay)
                writer.write(b"GET %b HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n" % path)
                try:
                    return await read_to_eof(reader)
                finally:
                    writer.close()

            assert (await get(b"/warm")).endswith(b"ok")
            slow = asyncio.create_task(get(b"/slow"))
            await asyncio.sleep(0.05)
            queued = asyncio.create_task(get(b"/queued"))
            # A client that leaves while waiting in the queue.
            _reader, writer = await connect(relay)
            writer.write(b"GET /gone HTTP/1.1\r\nHost: t\r\n\r\n")
            await asyncio.sleep(0.05)
            writer.close()
            assert (await asyncio.wait_for(slow, WAIT)).endswith(b"ok")
            assert (await asyncio.wait_for(queued, WAIT)).endswith(b"ok")
            cut = await get(b"/cut")
            assert cut.startswith(b"HTTP/1.1 200") and cut.endswith(b"abc")
            for _ in range(100):
                if state.metrics.active_exchanges == 0:
                    break
                await asyncio.sleep(0.01)
            assert state.metrics.active_exchanges == 0
            for pool in state.router.pools.values():
                assert pool.outstanding == 0 and pool.active == 0
            for gate in state.admission._gates.values():
                assert gate.in_flight == 0 and not gate.queue
            assert all(n == 0 for n in state.admission.in_flight.values())
            left = {
                t
                for t in asyncio.all_tasks() - before
                if not t.done()
                and "_serve" not in repr(t.get_coro())
                and t is not asyncio.current_task()
            }
            assert not left, left

    run(loop_kind, main)
