"""New requests' share of each loop turn, and the connections waiting for the next.

A request costs relay about 0.3-0.5 ms of Python in all (its per-request
floor): h11 parsing its head and the exchange starting (about a third of
it), then the upstream connect and the response head, in later callbacks.
When thousands of streams open at once, one poll of the loop returns
hundreds of new heads beside the reads that carry tokens of streams already
open, and the loop starts them all in that one turn: the tokens wait behind
every head (the held bench at N=4000 showed 227 heads started in one turn).
:class:`HeadPacer` gives new requests a budget of wall time per loop turn
(``HEAD_TURN``). Once a turn has spent it, a connection whose bytes would
start a request stops reading and waits in a FIFO; later turns take the
waiting connections first, again up to the budget, before any newer head.
Token reads and request bodies never pass through here: only the start of a
request waits.

When "the next turn" comes depends on the loop, and both orders work: the
pacer's callback is a ``call_soon``. asyncio runs it at the start of the next
turn, before the I/O callbacks of that turn's poll; uvloop (libuv) runs it in
the idle phase, again before the next poll's I/O callbacks. Either way the
waiting heads of one turn share the next turn's budget with new ones, and the
reads of that poll that carry tokens are never behind more than one budget
of head work (plus the one head that crossed it).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Protocol

__all__ = ["HEAD_TURN", "HeadPacer", "Paced"]

log = logging.getLogger("relay.events")

#: Wall time per loop turn for starting new requests (parsing heads, starting
#: exchanges; 0.05-0.15 ms each). A token read that came in the same poll as a
#: burst of heads waits about 2 ms behind them, not tens of milliseconds, and
#: the work that follows a start (connect, response head) is bounded with it,
#: being about as much per turn; the loop's turns are cheap, so relay still
#: starts as many requests a second as its CPU allows. The same bound as body
#: inspection's per turn (``INSPECT_TURN``).
HEAD_TURN = 0.002


class Paced(Protocol):
    """A connection that can wait for its turn to start a request."""

    def start_request(self) -> None:
        """Start the request the buffered bytes begin (the pacer's turn came)."""
        ...


class HeadPacer:
    """The per-turn budget for starting requests and the FIFO of those waiting.

    A connection asks :meth:`may_start` (false while others wait, so the
    order stays first come first served), reports what its start cost with
    :meth:`spent`, or waits with :meth:`defer`; a connection that closes
    while waiting leaves with :meth:`discard`. The queue holds at most one
    entry per open connection. The pending callback is owned here and
    cancelled by :meth:`close`.
    """

    def __init__(
        self, budget: float = HEAD_TURN, settled: Callable[[], None] | None = None
    ) -> None:
        self.budget = budget
        self.clock = time.perf_counter  # cheap, and a test may replace it
        #: Called when the last waiting connection has had its turn (drain waits on it).
        self._settled = settled
        self._spent = 0.0  # wall time this turn's new requests took
        self._waiting: OrderedDict[Paced, None] = OrderedDict()
        self._handle: asyncio.Handle | None = None  # the next turn's callback
        self._loop: asyncio.AbstractEventLoop | None = None

    def __len__(self) -> int:
        """How many connections wait for a turn."""
        return len(self._waiting)

    def may_start(self) -> bool:
        """Whether a request may start now: nothing waits and this turn has budget."""
        return not self._waiting and self._spent < self.budget

    def spent(self, seconds: float) -> None:
        """Count ``seconds`` of request starting against this turn's budget."""
        self._spent += seconds
        if self._handle is None:
            self._arm()  # the budget comes back next turn

    def defer(self, conn: Paced) -> None:
        """Queue ``conn`` (at most once) to start its request in a later turn."""
        if conn not in self._waiting:
            self._waiting[conn] = None
        if self._handle is None:
            self._arm()

    def discard(self, conn: Paced) -> None:
        """``conn`` closed: it no longer waits."""
        self._waiting.pop(conn, None)

    def close(self) -> None:
        """Server shutdown: forget the waiting connections, cancel the callback."""
        self._waiting.clear()
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def _arm(self) -> None:
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        self._handle = loop.call_soon(self._turn)

    def _turn(self) -> None:
        """A new loop turn: the budget is back; the waiting go first, oldest first.

        At least one waiting connection starts per turn, whatever the budget,
        so the queue always moves.
        """
        self._handle = None
        self._spent = 0.0
        waiting = self._waiting
        if not waiting:
            return
        try:
            while waiting:
                conn, _ = waiting.popitem(last=False)
                try:
                    conn.start_request()
                except Exception:
                    # One broken connection must not stop the others' turns.
                    log.exception("starting a request failed for %r", conn)
                if self._spent >= self.budget:
                    break
        finally:
            if waiting:
                if self._handle is None:
                    self._arm()
            elif self._settled is not None:
                self._settled()
