"""The --max-inflight gate on a real asyncio loop whose clock the test moves.

Every timer (queue timeouts, releases, client cancellations) is a timer on
the loop at a virtual time, so the test decides which of them fall due in
the same loop turn and in what order, the way a loaded relay runs many due
callbacks in one turn.
"""

from __future__ import annotations

import asyncio
import selectors
from collections.abc import Callable

import pytest

from relay.core.admission import Gate
from relay.core.metrics import Metrics
from relay.http.errors import RelayError


class VirtualClockLoop(asyncio.SelectorEventLoop):
    """A real selector loop whose ``time()`` is moved by the test, never by the wall."""

    def __init__(self) -> None:
        super().__init__(selectors.DefaultSelector())
        self.now = 0.0

    def time(self) -> float:
        return self.now

    def turn(self) -> None:
        """Run one loop iteration: the due timers and the callbacks already ready."""
        self.stop()
        self.run_forever()

    def advance(self, to: float) -> None:
        """Move the clock to ``to`` and run one turn (every timer due by then runs in it)."""
        self.now = max(self.now, to)
        self.turn()

    def settle(self, turns: int = 6) -> None:
        for _ in range(turns):
            self.turn()


@pytest.fixture
def loop():
    loop = VirtualClockLoop()
    yield loop
    for task in asyncio.all_tasks(loop):
        task.cancel()
    loop.settle()
    loop.close()


def start_enter(
    loop: VirtualClockLoop, gate: Gate, key: str, outcome: list[RelayError | None]
) -> asyncio.Task[None]:
    async def enter() -> None:
        outcome.append(await gate.enter(key))

    return loop.create_task(enter())


def at(loop: VirtualClockLoop, when: float, callback: Callable[[], object]) -> None:
    loop.call_at(when, callback)


def test_a_queue_timeout_and_a_release_in_one_turn_never_admit_without_a_slot(loop):
    """The wait runs out (its waiter cancelled) and the only slot is freed in the same
    turn, before the waiting task runs: it gets its 503, and the slot goes back to the
    count, so in-flight is 0, not -1 with a request upstream."""
    gate = Gate("u", limit=1, queue_size=4, timeout=1.0, metrics=Metrics())
    assert gate.try_enter()  # the one slot is held
    outcome: list[RelayError | None] = []
    start_enter(loop, gate, "k", outcome)
    loop.turn()
    assert len(gate.queue) == 1 and outcome == []
    at(loop, 1.5, gate.leave)  # the holder ends after the deadline, same turn
    loop.advance(2.0)
    loop.settle()
    assert len(outcome) == 1 and outcome[0] is not None
    assert outcome[0].code == "queue_timeout"
    assert gate.in_flight == 0 and len(gate.queue) == 0
    assert gate.try_enter() and not gate.try_enter()  # the limit still holds


def test_a_slot_handed_over_as_the_wait_runs_out_is_used_once(loop):
    """The release comes first in the turn, the deadline right after: the waiter
    holds the slot (it was handed over) and the count stays at the limit."""
    gate = Gate("u", limit=1, queue_size=4, timeout=1.0, metrics=Metrics())
    assert gate.try_enter()
    outcome: list[RelayError | None] = []
    start_enter(loop, gate, "k", outcome)
    loop.turn()
    at(loop, 0.5, gate.leave)
    loop.now = 0.5
    loop.now = 1.0
    loop.turn()  # the release (0.5) and the deadline (1.0) run in this one turn
    loop.settle()
    assert outcome == [None]
    assert gate.in_flight == 1 and not gate.try_enter()


def test_a_client_that_leaves_with_a_slot_handed_to_it_passes_the_slot_on(loop):
    gate = Gate("u", limit=1, queue_size=4, timeout=10.0, metrics=Metrics())
    assert gate.try_enter()
    first: list[RelayError | None] = []
    second: list[RelayError | None] = []
    leaving = start_enter(loop, gate, "a", first)
    start_enter(loop, gate, "b", second)
    loop.turn()
    gate.leave()  # handed to "a" ...
    leaving.cancel()  # ... which leaves before its task runs
    loop.settle()
    assert first == [] and leaving.cancelled()
    assert second == [None] and gate.in_flight == 1


def test_a_waiter_that_left_does_not_cost_its_key_its_turn(loop):
    """Key a's oldest waiter timed out but is still queued when a slot frees: the
    slot goes to a's next waiter, not to b a second time."""
    gate = Gate("u", limit=1, queue_size=8, timeout=1.0, metrics=Metrics())
    assert gate.try_enter()
    order: list[str] = []

    async def enter(key: str, name: str) -> None:
        if await gate.enter(key) is None:
            order.append(name)

    loop.create_task(enter("b", "b1"))
    loop.turn()
    loop.now = 0.5
    loop.create_task(enter("a", "a1"))  # times out at 1.5
    loop.turn()
    loop.now = 0.9
    for name in ("b2", "a2"):  # a2 and b2 time out at 1.9
        loop.create_task(enter(name[0], name))
    loop.turn()
    at(loop, 0.95, gate.leave)  # b1 gets the slot, b to the back: [a, b]
    loop.advance(0.95)
    loop.settle()
    at(loop, 1.6, gate.leave)  # after a1's deadline, before its task runs
    loop.advance(1.6)
    loop.settle()
    assert order == ["b1", "a2"]
