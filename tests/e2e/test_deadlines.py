"""Deadlines on the server's tick, and the waits relay itself imposes."""

from __future__ import annotations

import asyncio

from harness import WAIT, connect, read_request, read_to_eof, request_bytes, run, setup, until

from relay.core.ticker import Ticker


def test_one_failing_check_does_not_stop_the_other_deadlines(loop_kind, caplog):
    """A watched object whose check raises is dropped and logged; the tick goes on
    for every other one."""

    class Broken:
        def on_tick(self, now: float) -> None:
            raise RuntimeError("broken check")

    class Counting:
        ticks = 0

        def on_tick(self, now: float) -> None:
            self.ticks += 1

    async def main():
        ticker = Ticker(0.01)
        counting = Counting()
        ticker.watch(Broken())
        ticker.watch(counting)
        try:
            await until(lambda: counting.ticks >= 5)
        finally:
            ticker.close()

    run(loop_kind, main)
    assert "deadline check failed" in caplog.text


def test_an_idle_connection_past_its_age_is_not_reused_even_before_the_tick(loop_kind):
    """A pooled connection older than its keep-alive limit is closed, not handed out,
    even when the tick that would expire it has not run yet."""

    async def keepalive(reader, writer, up):
        while True:
            await read_request(reader, up)
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
            await writer.drain()

    async def main():
        async with setup(keepalive) as (up, relay):
            for _ in range(2):
                reader, writer = await connect(relay)
                writer.write(request_bytes(body=b"{}", extra=b"Connection: close\r\n"))
                assert (await read_to_eof(reader)).endswith(b"ok")
                writer.close()
                await until(lambda: relay.state.pool.idle_count == 1)
                # Age the pooled connection past its limit without waiting for a tick.
                relay.state.pool._idle[0].idle_since -= 3600
            assert up.accepted == 2  # the aged connection was not reused

    run(loop_kind, main)


def test_a_request_queued_for_max_inflight_is_not_a_slow_client(loop_kind):
    """While a request waits for a --max-inflight slot relay does not read its body, so
    the client-body deadline does not run: it is served when the slot frees, not 408."""

    async def one_at_a_time(reader, writer, up):
        await read_request(reader, up)
        if up.accepted == 1:
            await asyncio.sleep(1.0)  # holds the only slot longer than the body timeout
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok")
        await writer.drain()

    async def main():
        async with setup(
            one_at_a_time, max_inflight=1, queue_timeout=5.0, client_body_timeout=0.3
        ) as (up, relay):
            first_r, first_w = await connect(relay)
            first_w.write(request_bytes(body=b"{}", extra=b"Connection: close\r\n"))
            await until(lambda: up.accepted == 1)
            second_r, second_w = await connect(relay)
            second_w.write(request_bytes(body=b'{"q": 2}', extra=b"Connection: close\r\n"))
            first = await asyncio.wait_for(first_r.read(), WAIT)
            second = await asyncio.wait_for(second_r.read(), WAIT)
            assert first.startswith(b"HTTP/1.1 200"), first
            assert second.startswith(b"HTTP/1.1 200"), second
            assert relay.state.metrics.timeouts == 0

    run(loop_kind, main)
