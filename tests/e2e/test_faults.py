"""The fault matrix (README, "Reliability"): each row a test.

For each broken peer: what the client sees, what the upstream sees, what is
counted, and that relay then serves the next request normally.
"""

from __future__ import annotations

import asyncio
import json

import pytest
from harness import (
    CHUNKED_HEAD,
    WAIT,
    ScriptUpstream,
    connect,
    read_head,
    read_request,
    read_to_eof,
    request_bytes,
    run,
    setup,
    sse_chunk,
)

pytestmark = pytest.mark.timeout(60)

OK = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"


async def serves_next(relay, up: ScriptUpstream) -> None:
    """After the fault, a plain request through the same relay gets its 200."""
    up.next_ok = True
    reader, writer = await connect(relay)
    writer.write(request_bytes(body=b"{}", extra=b"Connection: close\r\n"))
    data = await read_to_eof(reader)
    assert data.startswith(b"HTTP/1.1 200") and data.endswith(b"ok"), data


def scripted(fault):
    """An upstream whose first connection misbehaves and later ones answer OK."""

    async def handler(reader, writer, up):
        if getattr(up, "next_ok", False):
            await read_request(reader, up)
            writer.write(OK)
            await writer.drain()
            return
        await fault(reader, writer, up)

    return handler


async def status_of(relay, payload: bytes | None = None) -> tuple[int, bytes]:
    reader, writer = await connect(relay)
    writer.write(payload or request_bytes())
    data = await read_to_eof(reader)
    status = int(data.split(b" ", 2)[1]) if data.startswith(b"HTTP/") else 0
    return status, data


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("accept_then_close", 502),
        ("partial_head", 502),
        ("garbage_head", 502),
        ("stall_before_head", 504),
    ],
)
def test_upstream_failing_before_the_head_gets_a_json_error(loop_kind, name, expected):
    """Before any response byte: 502 (closed, partial or invalid head) or 504 (stalled)."""

    async def fault(reader, writer, up):
        await read_request(reader, up)
        if name == "partial_head":
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-le")
        elif name == "garbage_head":
            writer.write(b"HTTP/9 nonsense\r\n\r\n")
            await asyncio.sleep(1)
        elif name == "stall_before_head":
            await asyncio.sleep(2)
        await writer.drain()

    async def main():
        async with setup(scripted(fault), upstream_head_timeout=0.3) as (up, relay):
            status, data = await status_of(relay)
            assert status == expected, data
            assert json.loads(data.partition(b"\r\n\r\n")[2])["error"]["code"]
            await serves_next(relay, up)

    run(loop_kind, main)


def test_upstream_stalling_mid_body_is_cut_after_the_idle_timeout(loop_kind):
    """A stream whose upstream goes silent is cut (no last chunk) after --upstream-idle-timeout."""

    async def fault(reader, writer, up):
        await read_request(reader, up)
        writer.write(CHUNKED_HEAD + sse_chunk("one"))
        await asyncio.sleep(3)

    async def main():
        async with setup(scripted(fault), upstream_idle_timeout=0.3) as (up, relay):
            status, data = await status_of(relay)
            assert status == 200 and data.endswith(sse_chunk("one"))
            assert relay.metrics.truncated_streams == 1 and relay.metrics.timeouts == 1
            await serves_next(relay, up)

    run(loop_kind, main)


def test_more_bytes_than_content_length_are_not_forwarded_nor_the_connection_reused(loop_kind):
    """Extra bytes after a Content-Length body never reach the client; the connection is dropped."""

    async def fault(reader, writer, up):
        await read_request(reader, up)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhelloEXTRA-BYTES")
        await asyncio.sleep(1)

    async def main():
        async with setup(scripted(fault)) as (up, relay):
            reader, writer = await connect(relay)
            writer.write(request_bytes())
            await read_head(reader)
            assert await asyncio.wait_for(reader.readexactly(5), WAIT) == b"hello"
            await asyncio.sleep(0.1)
            assert relay.state.pool.idle_count == 0
            writer.write(request_bytes(body=b"{}"))  # same client connection, new upstream one
            up.next_ok = True
            head = await read_head(reader)
            assert head.startswith(b"HTTP/1.1 200")
            assert await asyncio.wait_for(reader.readexactly(2), WAIT) == b"ok"
            assert up.accepted == 2
            writer.close()

    run(loop_kind, main)


@pytest.mark.parametrize("when", ["before_head", "during_request_body"])
def test_client_leaving_early_closes_the_upstream(loop_kind, when):
    """A client gone before the head (or mid request body) makes relay close that upstream."""
    closed: asyncio.Future[None] | None = None

    async def fault(reader, writer, up):
        # Wait for relay to go away (EOF), never answering.
        while await asyncio.wait_for(reader.read(65536), WAIT):
            pass
        closed.set_result(None)

    async def main():
        nonlocal closed
        closed = asyncio.get_running_loop().create_future()
        async with setup(scripted(fault)) as (up, relay):
            _, writer = await connect(relay)
            if when == "before_head":
                writer.write(request_bytes())
            else:
                writer.write(
                    b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 100\r\n\r\n" + b"x" * 10
                )
            await asyncio.wait_for(up.connected.wait(), WAIT)
            await asyncio.sleep(0.05)
            writer.close()
            await asyncio.wait_for(closed, WAIT)
            await asyncio.sleep(0.05)
            assert relay.metrics.client_disconnects == 1
            assert not relay.state.connections
            await serves_next(relay, up)

    run(loop_kind, main)


def test_slowloris_byte_by_byte_head_is_cut_at_the_head_timeout(loop_kind):
    """A head trickled a byte at a time still has to be complete within --client-head-timeout."""

    async def main():
        async with setup(scripted(read_request), client_head_timeout=0.4) as (up, relay):
            reader, writer = await connect(relay)
            payload = request_bytes()
            started = asyncio.get_running_loop().time()
            data = b""
            for byte in payload:
                writer.write(bytes([byte]))
                try:
                    # The pause between bytes doubles as a look for an answer.
                    data = await asyncio.wait_for(reader.read(4096), 0.02)
                except TimeoutError:
                    continue
                break
            data += await read_to_eof(reader)
            elapsed = asyncio.get_running_loop().time() - started
            assert data.startswith(b"HTTP/1.1 408"), data
            assert elapsed < 2
            assert up.accepted == 0
            await serves_next(relay, up)

    run(loop_kind, main)


def test_connection_flood_beyond_the_limit_then_normal_service(loop_kind):
    """Past --max-connections clients get 503; once they leave, service is normal."""

    async def main():
        async with setup(scripted(read_request), max_connections=5) as (up, relay):
            held = [await connect(relay) for _ in range(5)]
            await asyncio.sleep(0.05)
            rejected = 0
            for _ in range(20):
                reader, _ = await connect(relay)
                if (await read_to_eof(reader)).startswith(b"HTTP/1.1 503"):
                    rejected += 1
            assert rejected == 20
            for _, writer in held:
                writer.close()
            await asyncio.sleep(0.1)
            await serves_next(relay, up)

    run(loop_kind, main)
