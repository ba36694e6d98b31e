"""One periodic tick for many deadlines, keyed by when they are due.

Deadlines in relay are seconds to minutes long, and almost all of them are
met (a stream ends, a keep-alive connection sends its next request). Arming
and cancelling a ``TimerHandle`` for each of them costs more than the
request itself at high rates, so each connection and exchange keeps plain
timestamps, and one tick per server checks them. The tick only looks at the
objects whose earliest deadline falls in the interval just ended: work per
tick grows with what is due, not with what is open.

The structure is a hashed timer wheel without wrap-around (Varghese and
Lauck; Envoy and the Linux kernel use wheels): a dict from slot number
(``ceil(deadline / interval)``) to the set of objects due in that slot.
Scheduling and unwatching are a dict lookup and a set operation.

Deadlines that move later (an idle timeout pushed on by every read) are not
rescheduled when they move: the object keeps its timestamps, is checked at
the slot it was filed in, and its :meth:`Watched.on_tick` returns the time it
is next due, where it is filed again. A change that makes a deadline earlier
than the one filed (a new phase, a client that stops reading) calls
:meth:`Ticker.schedule`, which keeps the earlier of the two. A deadline fires
up to one interval late; the interval is a quarter of the shortest
configured timeout, at most a second.

The tick also measures how late the loop ran it: the loop's lag, which is
what every stream waits on top of its own work (``relay_loop_lag_seconds``).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from typing import TYPE_CHECKING, Protocol

from ..config import Config

if TYPE_CHECKING:
    from .metrics import Histogram

__all__ = ["Ticker", "Watched", "tick_interval"]

log = logging.getLogger("relay.events")

#: Longest tick: deadlines are checked at least once a second.
MAX_INTERVAL = 1.0
MIN_INTERVAL = 0.01
#: The slot of an object taken out of its set for this tick's check.
_DUE = -1


class Watched(Protocol):
    def on_tick(self, now: float) -> float:
        """Act on what is due at ``now``; return when to look again (0: nothing left)."""
        ...


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
    """Calls ``on_tick(now)`` on each watched object when its filed time comes.

    The tick runs, at multiples of ``interval``, only while something is
    filed; ``close`` (server shutdown) cancels the pending tick. ``lag``, if
    given, observes how late each tick ran.
    """

    def __init__(self, interval: float, lag: Histogram | None = None) -> None:
        self.interval = interval
        self._lag = lag
        self._slot_of: dict[Watched, int] = {}  # object -> its slot (or _DUE)
        self._slots: dict[int, set[Watched]] = {}  # slot -> objects filed there
        self._next_slot = 0  # the slot the pending tick processes
        self._handle: asyncio.TimerHandle | None = None

    def __len__(self) -> int:
        """How many objects are watched."""
        return len(self._slot_of)

    def watch(self, item: Watched) -> None:
        """Check ``item`` at the next tick."""
        self.schedule(item, time.monotonic())

    def schedule(self, item: Watched, when: float) -> None:
        """Check ``item`` at ``when`` (monotonic), or earlier if it is filed earlier.

        ``when`` of 0 means no deadline: nothing changes.
        """
        if not when:
            return
        if self._handle is None:
            self._start()
        slot = max(math.ceil(when / self.interval), self._next_slot)
        current = self._slot_of.get(item)
        if current is not None:
            if current <= slot:  # filed at least as early (or being checked now)
                return
            self._remove(item, current)
        self._slot_of[item] = slot
        filed = self._slots.get(slot)
        if filed is None:
            self._slots[slot] = {item}
        else:
            filed.add(item)

    def unwatch(self, item: Watched) -> None:
        slot = self._slot_of.pop(item, None)
        if slot is not None and slot != _DUE:
            self._remove(item, slot)

    def _remove(self, item: Watched, slot: int) -> None:
        filed = self._slots.get(slot)
        if filed is not None:
            filed.discard(item)
            if not filed:
                del self._slots[slot]

    def _start(self) -> None:
        self._next_slot = math.floor(time.monotonic() / self.interval) + 1
        self._arm()

    def _arm(self) -> None:
        delay = self._next_slot * self.interval - time.monotonic()
        self._handle = asyncio.get_running_loop().call_later(max(0.0, delay), self._tick)

    def _tick(self) -> None:
        interval = self.interval
        first = self._next_slot
        due_at = first * interval
        clock = time.monotonic()
        if self._lag is not None:
            self._lag.observe(max(0.0, clock - due_at))
        # A loop timer may fire a hair before its time: the slot it was armed
        # for is due all the same.
        now = max(clock, due_at)
        last = max(first, math.floor(now / interval))
        self._next_slot = last + 1  # anything filed from here on waits for a later tick
        slots, slot_of = self._slots, self._slot_of
        due: list[Watched] = []
        if last - first < len(slots):
            for slot in range(first, last + 1):
                filed = slots.pop(slot, None)
                if filed:
                    due.extend(filed)
        else:  # the loop stood still for many intervals: look at the filed slots instead
            for slot in [s for s in slots if s <= last]:
                due.extend(slots.pop(slot))
        for item in due:
            slot_of[item] = _DUE
        try:
            for item in due:
                if slot_of.get(item) != _DUE:
                    continue  # an earlier check unwatched it
                del slot_of[item]
                try:
                    when = item.on_tick(now)
                except Exception:
                    # One broken check must not stop every other deadline.
                    log.exception("deadline check failed for %r", item)
                    continue
                if when:
                    self.schedule(item, when)
        finally:
            for item in due:  # left over only if a check raised past the loop
                if slot_of.get(item) == _DUE:
                    del slot_of[item]
            if slot_of:
                self._arm()
            else:
                self._handle = None

    def close(self) -> None:
        self._slot_of.clear()
        self._slots.clear()
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
