"""One periodic check for many deadlines, instead of a timer per exchange.

Deadlines in relay are seconds to minutes long, and almost all of them are
met (a stream ends, a keep-alive connection sends its next request). Arming
and cancelling a ``TimerHandle`` for each of them costs more than the
request itself at high rates, so each connection and exchange keeps plain
timestamps, and one tick per server looks at them (aiohttp's keep-alive and
Envoy's timer wheel make the same trade). A deadline fires up to one
interval late; the interval is a quarter of the shortest configured
timeout, at most a second.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Protocol

from ..config import Config

__all__ = ["Ticker", "tick_interval"]

log = logging.getLogger("relay.events")

#: Longest tick: deadlines are checked at least once a second.
MAX_INTERVAL = 1.0
MIN_INTERVAL = 0.01


class Watched(Protocol):
    def on_tick(self, now: float) -> None: ...


def tick_interval(config: Config) -> float:
    """A quarter of the shortest timeout ``config`` sets, within [10 ms, 1 s]."""
    shortest = min(
        config.client_head_timeout,
        config.client_body_timeout,
        config.client_keepalive_timeout,
        config.client_send_timeout,
        config.upstream_head_timeout,
        config.upstream_idle_timeout,
        config.upstream_keepalive_timeout,
        config.sse_keepalive or MAX_INTERVAL,
    )
    return max(MIN_INTERVAL, min(MAX_INTERVAL, shortest / 4))


class Ticker:
    """Calls ``on_tick(now)`` on every watched object once per ``interval``.

    The tick runs only while something is watched. ``watch`` and ``unwatch``
    are set operations, cheap enough for every request; ``close`` (server
    shutdown) cancels the pending tick.
    """

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self._watched: set[Watched] = set()
        self._handle: asyncio.TimerHandle | None = None

    def watch(self, item: Watched) -> None:
        self._watched.add(item)
        if self._handle is None:
            loop = asyncio.get_running_loop()
            self._handle = loop.call_later(self.interval, self._tick)

    def unwatch(self, item: Watched) -> None:
        self._watched.discard(item)

    def _tick(self) -> None:
        now = time.monotonic()
        try:
            for item in list(self._watched):  # a check may unwatch itself or others
                if item in self._watched:
                    try:
                        item.on_tick(now)
                    except Exception:
                        # One broken check must not stop every other deadline.
                        log.exception("deadline check failed for %r", item)
                        self._watched.discard(item)
        finally:
            if self._watched:
                self._handle = asyncio.get_running_loop().call_later(self.interval, self._tick)
            else:
                self._handle = None

    def close(self) -> None:
        self._watched.clear()
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
