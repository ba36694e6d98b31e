"""Deadlines on the server's tick, and the waits relay itself imposes."""

from __future__ import annotations

import asyncio
import bisect
import time

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

from relay.core.ticker import Ticker


def test_one_failing_check_does_not_stop_the_other_deadlines(loop_kind, caplog):
    """A watched object whose check raises is dropped and logged; the tick goes on
    for every other one."""

    class Broken:
        def on_tick(self, now: float) -> float:
            raise RuntimeError("broken check")

    class Counting:
        ticks = 0

        def on_tick(self, now: float) -> float:
            self.ticks += 1
            return now + 0.01

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


class _Deadline:
    """A watched object with one deadline it keeps itself, as relay's objects do."""

    def __init__(self, deadline: float) -> None:
        self.deadline = deadline
        self.checks = 0
        self.fired_at: float | None = None
        self.fired = asyncio.Event()

    def on_tick(self, now: float) -> float:
        self.checks += 1
        if now < self.deadline:
            return self.deadline
        self.fired_at = time.monotonic()
        self.fired.set()
        return 0.0


def test_a_tick_looks_only_at_what_is_due(loop_kind):
    """Thousands of far deadlines cost the tick nothing: only the objects whose
    deadline came are checked."""

    async def main():
        ticker = Ticker(0.01)
        now = time.monotonic()
        far = [_Deadline(now + 3600) for _ in range(5000)]
        near = [_Deadline(now + 0.05 * (i + 1)) for i in range(3)]
        try:
            for item in far + near:
                ticker.schedule(item, item.deadline)
            for item in near:
                await asyncio.wait_for(item.fired.wait(), WAIT)
            assert sum(item.checks for item in far) == 0
            assert all(item.checks == 1 for item in near)
            assert len(ticker) == len(far)
        finally:
            ticker.close()

    run(loop_kind, main)


def test_a_deadline_moved_later_fires_at_its_new_time_and_an_earlier_one_wins(loop_kind):
    """A deadline pushed on without telling the ticker (a read) is found when its
    old time comes and fires at its new time; scheduling an earlier time takes
    the object out of its later slot. Neither fires early, both within one
    interval (plus the loop's lag on a loaded machine)."""
    interval = 0.02

    async def main():
        ticker = Ticker(interval)
        start = time.monotonic()
        moved = _Deadline(start + 0.1)
        sooner = _Deadline(start + 60)
        try:
            ticker.schedule(moved, moved.deadline)
            ticker.schedule(sooner, sooner.deadline)
            moved.deadline = start + 0.3  # as a read pushes an idle deadline on
            sooner.deadline = start + 0.15
            ticker.schedule(sooner, sooner.deadline)
            await asyncio.wait_for(moved.fired.wait(), WAIT)
            await asyncio.wait_for(sooner.fired.wait(), WAIT)
            assert moved.checks == 2  # once at the old time, once at the new
            assert sooner.checks == 1
            for item in (moved, sooner):
                assert item.fired_at is not None
                late = item.fired_at - item.deadline
                assert -0.002 <= late <= interval + 0.5, late
            assert len(ticker) == 0
        finally:
            ticker.close()

    run(loop_kind, main)


def test_unwatched_objects_are_not_checked_and_the_tick_stops(loop_kind):
    """An object unwatched before its time is never checked; with nothing filed the
    tick stops."""

    async def main():
        ticker = Ticker(0.01)
        gone = _Deadline(time.monotonic() + 0.03)
        kept = _Deadline(time.monotonic() + 0.06)
        try:
            ticker.schedule(gone, gone.deadline)
            ticker.schedule(kept, kept.deadline)
            ticker.unwatch(gone)
            await asyncio.wait_for(kept.fired.wait(), WAIT)
            assert gone.checks == 0
            await until(lambda: ticker._handle is None)
        finally:
            ticker.close()

    run(loop_kind, main)


#: The deadline under test, in seconds; every other timeout stays long, so each
#: case also checks a deadline that moves earlier than the one filed before it.
SHORT = 0.4


async def _slow_head(relay, up, loop) -> tuple[float, bytes]:
    reader, writer = await connect(relay)
    await asyncio.sleep(0.1)  # inside the (long) keep-alive wait
    writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: t\r\n")
    start = loop.time()
    data = await read_to_eof(reader)
    writer.close()
    return start, data


async def _slow_body(relay, up, loop) -> tuple[float, bytes]:
    reader, writer = await connect(relay)
    writer.write(request_bytes(body=b'{"model":"m"}')[:-4])
    await until(lambda: up.accepted == 1)
    start = loop.time()
    data = await read_to_eof(reader)
    writer.close()
    return start, data


async def _after_the_head(relay, up, loop) -> tuple[float, bytes]:
    """Timed from the response head: the keep-alive and upstream idle deadlines."""
    reader, writer = await connect(relay)
    writer.write(request_bytes(body=b"{}"))
    head = await read_head(reader)
    start = loop.time()
    data = await read_to_eof(reader)
    writer.close()
    return start, head + data


async def _upstream_head(relay, up, loop) -> tuple[float, bytes]:
    reader, writer = await connect(relay)
    writer.write(request_bytes(body=b"{}"))
    await until(lambda: up.accepted == 1)
    start = loop.time()
    data = await read_to_eof(reader)
    writer.close()
    return start, data


async def _sse_keepalive(relay, up, loop) -> tuple[float, bytes]:
    reader, writer = await connect(relay)
    writer.write(request_bytes(body=b"{}"))
    head = await read_head(reader)
    start = loop.time()
    data = await asyncio.wait_for(reader.readuntil(b"keep-alive\n\n\r\n"), WAIT)
    writer.close()
    return start, head + data


async def _silent(reader, writer, up):
    await read_request(reader, up)
    await asyncio.sleep(WAIT)


async def _stalling_body(reader, writer, up):
    await read_request(reader, up)
    writer.write(CHUNKED_HEAD + sse_chunk("one"))
    await writer.drain()
    await asyncio.sleep(WAIT)


async def _answering(reader, writer, up):
    await read_request(reader, up)
    writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
    await writer.drain()
    await asyncio.sleep(WAIT)


LONG = 30.0
DEADLINES = {
    # name: (client, upstream, config, what the client sees)
    "client-head": (_slow_head, _silent, {"client_head_timeout": SHORT}, b"HTTP/1.1 408"),
    "client-body": (_slow_body, _silent, {"client_body_timeout": SHORT}, b"HTTP/1.1 408"),
    "client-keepalive": (
        _after_the_head,
        _answering,
        {"client_keepalive_timeout": SHORT, "client_head_timeout": LONG},
        b"HTTP/1.1 200",
    ),
    "upstream-head": (_upstream_head, _silent, {"upstream_head_timeout": SHORT}, b"HTTP/1.1 504"),
    "upstream-idle": (
        _after_the_head,
        _stalling_body,
        {"upstream_idle_timeout": SHORT},
        b"HTTP/1.1 200",
    ),
    "sse-keepalive": (_sse_keepalive, _stalling_body, {"sse_keepalive": SHORT}, b"HTTP/1.1 200"),
}


@pytest.mark.parametrize("name", list(DEADLINES))
def test_each_deadline_fires_on_time_not_early(loop_kind, name):
    """Each deadline on the tick fires after its timeout, and no later than one tick
    interval past it (plus a margin for a loaded machine), also where it is shorter
    than the wait filed before it."""
    client, upstream, limits, first = DEADLINES[name]
    base = dict.fromkeys(
        (
            "client_head_timeout",
            "client_body_timeout",
            "client_keepalive_timeout",
            "client_send_timeout",
            "upstream_head_timeout",
            "upstream_idle_timeout",
        ),
        LONG,
    )
    config = base | limits

    async def main():
        loop = asyncio.get_running_loop()
        async with setup(upstream, **config) as (up, relay):
            interval = relay.state.ticker.interval
            start, data = await client(relay, up, loop)
            took = loop.time() - start
            assert data.startswith(first), data[:200]
            assert SHORT - 0.02 <= took <= SHORT + interval + 1.0, (took, interval)

    run(loop_kind, main)


def test_the_tick_measures_how_late_the_loop_runs_it(loop_kind):
    """A callback that holds the loop shows in relay_loop_lag_seconds: the tick
    that was due meanwhile records how late it ran."""

    async def main():
        async with setup(_silent, client_head_timeout=0.4) as (_up, relay):
            lag = relay.state.metrics.loop_lag
            _reader, writer = await connect(relay)  # a watched connection: the tick runs
            await until(lambda: lag.count >= 2)
            late = bisect.bisect_right(lag.bounds, 0.1)  # buckets above 100 ms
            before = sum(lag.counts[late:])
            time.sleep(0.35)  # noqa: ASYNC251 - holds the loop, as one long callback would
            await until(lambda: sum(lag.counts[late:]) > before)
            assert lag.total >= 0.1
            text = relay.state.metrics.render()
            assert "# TYPE relay_loop_lag_seconds histogram" in text
            assert 'relay_loop_lag_seconds_bucket{le="0.25"}' in text
            writer.close()

    run(loop_kind, main)
