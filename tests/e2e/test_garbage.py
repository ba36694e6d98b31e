"""What relay leaves for the cyclic garbage collector: nothing.

With thousands of streams held open, a full collection walks every live
object and stops every stream while it does. relay's own objects are freed
by their reference counts the moment an exchange or a connection ends, so
the collector has nothing of relay's to find, and its pauses stay short.
"""

from __future__ import annotations

import asyncio
import gc
from collections import Counter
from collections.abc import Awaitable, Callable

import pytest
from harness import (
    CHUNKED_HEAD,
    WAIT,
    connect,
    read_head,
    read_request,
    read_to_eof,
    request_bytes,
    run,
    setup,
    sse_chunk,
    until,
)

from relay.core.server import RelayServer
from relay.http.rewrite import ModelMap

pytestmark = pytest.mark.timeout(60)

#: Modules whose objects in a reference cycle would be relay's doing.
OURS = ("relay.", "h11.")


def _ours(obj: object) -> bool:
    module = str(getattr(type(obj), "__module__", ""))
    if module.startswith(OURS):
        return True
    owner = getattr(obj, "__self__", None)  # a bound method of one of relay's objects
    return owner is not None and str(getattr(type(owner), "__module__", "")).startswith(OURS)


async def _upstream(reader, writer, up):
    while True:
        raw = await read_request(reader, up)
        if b"cut" in raw:
            writer.write(CHUNKED_HEAD + sse_chunk("one"))
            await writer.drain()
            writer.transport.abort()
            return
        if b"bad-head" in raw:
            writer.write(b"HTTP/1.1 200 OK\r\nBad Header Line\r\n\r\n")
            await writer.drain()
            return
        if b"hold" in raw:
            writer.write(CHUNKED_HEAD + sse_chunk("one"))
            await writer.drain()
            await asyncio.sleep(WAIT)
            return
        writer.write(CHUNKED_HEAD + sse_chunk("one"))
        await writer.drain()
        writer.write(sse_chunk("two") + b"0\r\n\r\n")
        await writer.drain()


async def _streamed_keepalive_pooled(relay: RelayServer) -> None:
    """Two streamed exchanges on one kept-alive client connection (the second one
    on the pooled upstream connection), then the client closes."""
    reader, writer = await connect(relay)
    writer.write(request_bytes(body=b'{"model":"alias","stream":true}'))
    await asyncio.wait_for(reader.readuntil(b"0\r\n\r\n"), WAIT)
    writer.write(request_bytes(body=b'{"stream":true}', extra=b"Connection: close\r\n"))
    assert (await read_to_eof(reader)).endswith(b"0\r\n\r\n")
    writer.close()


async def _client_gone(relay: RelayServer) -> None:
    reader, writer = await connect(relay)
    writer.write(request_bytes(body=b'{"q":"hold"}'))
    await read_head(reader)
    writer.transport.abort()
    await until(lambda: relay.state.metrics.client_disconnects == 1)


async def _upstream_cut(relay: RelayServer) -> None:
    reader, writer = await connect(relay)
    writer.write(request_bytes(body=b'{"q":"cut"}'))
    await read_to_eof(reader)
    writer.close()


async def _bad_upstream_head(relay: RelayServer) -> None:
    reader, writer = await connect(relay)
    writer.write(request_bytes(body=b'{"q":"bad-head"}'))
    assert (await read_to_eof(reader)).startswith(b"HTTP/1.1 502")
    writer.close()


async def _bad_request(relay: RelayServer) -> None:
    reader, writer = await connect(relay)
    writer.write(b"GET / HTTP/1.1\r\nHost: a\r\nBad Header Line\r\n\r\n")
    assert (await read_to_eof(reader)).startswith(b"HTTP/1.1 400")
    writer.close()


CASES: dict[str, Callable[[RelayServer], Awaitable[None]]] = {
    "streamed-keepalive-pooled": _streamed_keepalive_pooled,
    "client-gone": _client_gone,
    "upstream-cut": _upstream_cut,
    "bad-upstream-head": _bad_upstream_head,
    "bad-request": _bad_request,
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_finished_exchange_and_a_closed_connection_leave_nothing_to_collect(loop_kind, case):
    """Once an exchange ends and its client connection closes, none of relay's (or
    h11's) objects is in a reference cycle: the collector finds none of them."""
    scenario = CASES[case]

    async def main():
        async with setup(_upstream, model_map=ModelMap({"alias": "served"})) as (_up, relay):
            await _streamed_keepalive_pooled(relay)  # warm: pools, caches, lazy imports
            await until(lambda: not relay.state.connections)
            gc.collect()
            gc.set_debug(gc.DEBUG_SAVEALL)  # what a collection finds is kept, to look at
            try:
                await scenario(relay)
                await until(lambda: not relay.state.connections)
                await until(lambda: relay.state.metrics.active_exchanges == 0)
                await asyncio.sleep(0.05)  # transports finish closing on the next turns
                gc.collect()
                found = Counter(
                    f"{type(obj).__module__}.{type(obj).__qualname__}"
                    for obj in gc.garbage
                    if _ours(obj)
                )
            finally:
                gc.set_debug(0)
                gc.garbage.clear()
            assert not found, found

    run(loop_kind, main)
