"""The --max-inflight gate on a real asyncio loop whose clock the test moves.

Every timer (queue timeouts, releases, client cancellations) is a timer on
the loop at a virtual time, so the test decides which of them fall due in
the same loop turn and in what order, the way a loaded relay runs many due
callbacks in one turn.
"""

from __future__ import annotations

import asyncio
import copy
import selectors
import subprocess
import time
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any, cast

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from relay.config import Config
from relay.core.admission import Admission, Gate, Ticket
from relay.core.metrics import Metrics
from relay.core.state import ServerState
from relay.http.errors import RelayError
from relay.http.limits import Budget, FairQueue, KeyLimits
from relay.ops.workers import Supervisor, _Worker


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


def test_each_request_counts_one_result_by_key_and_the_queue_refusals_are_not_admitted(loop):
    """admitted + queue_left + queue_timeout + ... add up to the requests let in by the
    key limits: one admitted, one whose client left while queued, one timed out."""
    config = Config(max_inflight=1, queue_size=4, queue_timeout=1.0)
    admission = Admission(config, Metrics())
    pool = SimpleNamespace(address="u:1")
    tickets = [admission.admit(None, "10.0.0.1") for _ in range(3)]
    assert all(isinstance(t, Ticket) for t in tickets)
    first, leaving, late = cast(list[Ticket], tickets)
    assert first.try_enter(pool)
    left = loop.create_task(leaving.enter(pool))
    timed = loop.create_task(late.enter(pool))
    loop.turn()
    leaving.settle(0, None, None)  # the exchange ends while queued (client gone) ...
    left.cancel()  # ... and cancels its connect task
    loop.advance(2.0)
    loop.settle()
    assert timed.result() is not None and timed.result().code == "queue_timeout"
    first.settle(0, None, None)
    results = admission.metrics.key_requests
    assert +results == {
        ("anonymous", "admitted"): 1,
        ("anonymous", "queue_left"): 1,
        ("anonymous", "queue_timeout"): 1,
    }


# -- a stateful property test: random interleavings on the virtual clock ------
#: Deadlines fall between the test's quarter-second steps, so no two timers of
#: the test are due at the very same instant (their order would be the heap's).
WAIT = 1.01
STEPS = st.sampled_from((0.0, 0.5, 1.5))
KEY = st.sampled_from("abc")


class RecordingQueue(FairQueue[asyncio.Future[None]]):
    """The gate's own queue, recording which request each served waiter was."""

    def __init__(self, limit: int, machine: GateMachine) -> None:
        super().__init__(limit)
        self.machine = machine

    def push(self, key: str, item: asyncio.Future[None]) -> bool:
        pushed = super().push(key, item)
        if pushed:
            self.machine.queued(key, item)
        return pushed

    def pop(
        self, skip: Callable[[asyncio.Future[None]], bool] | None = None
    ) -> asyncio.Future[None] | None:
        item = super().pop(skip)
        if item is not None:
            self.machine.served(item)
        return item


class Request:
    def __init__(self, rid: int, key: str, started: float) -> None:
        self.rid = rid
        self.key = key
        self.started = started
        self.state = "new"  # new, waiting, admitted, released, or an error code
        self.task: asyncio.Task[None] | None = None
        self.waiter: asyncio.Future[None] | None = None
        self.queue_was_full = False


class GateMachine(RuleBasedStateMachine):
    """enter, queue timeout, client cancel, release and drain in any order, in one
    loop turn or across turns. In-flight stays within [0, limit], every admitted
    request gives its slot back exactly once, and keys are served in turn."""

    def __init__(self) -> None:
        super().__init__()
        self.loop = VirtualClockLoop()
        self.gate: Gate | None = None
        self.requests: list[Request] = []
        self.releases: dict[int, int] = {}
        self.by_waiter: dict[asyncio.Future[None], Request] = {}
        self.served_since: dict[str, dict[str, int]] = {}
        self.violations: list[str] = []

    @initialize(limit=st.integers(1, 3), queue_size=st.integers(1, 4))
    def make_gate(self, limit: int, queue_size: int) -> None:
        self.gate = Gate("u", limit, queue_size, WAIT, Metrics())
        self.gate.queue = RecordingQueue(queue_size, self)

    # -- hooks from the queue -----------------------------------------------
    def live(self, key: str) -> bool:
        return any(
            r.key == key and r.state == "waiting" and r.waiter is not None and not r.waiter.done()
            for r in self.requests
        )

    def queued(self, key: str, waiter: asyncio.Future[None]) -> None:
        task = asyncio.current_task(self.loop)
        request = next(r for r in self.requests if r.task is task)
        if not self.live(key):
            self.served_since[key] = {}  # a new stretch of waiting for this key
        request.waiter = waiter
        request.state = "waiting"
        self.by_waiter[waiter] = request

    def served(self, waiter: asyncio.Future[None]) -> None:
        key = self.by_waiter[waiter].key
        self.served_since[key] = {}
        for other in {r.key for r in self.requests} - {key}:
            if other != key and self.live(other):
                seen = self.served_since.setdefault(other, {})
                seen[key] = seen.get(key, 0) + 1
                assert seen[key] <= 1, f"{key} served twice while {other} waited"

    # -- the request's own task ---------------------------------------------
    async def run(self, request: Request) -> None:
        gate = self.gate
        assert gate is not None
        request.started = self.loop.time()
        request.queue_was_full = len(gate.queue) >= gate.queue.limit
        error = await gate.enter(request.key)
        # A failed check here is recorded for the invariants: an exception in
        # the task would only reach the loop's exception handler.
        if error is not None:
            request.state = error.code
            if error.code == "queue_timeout":
                if self.loop.time() < request.started + WAIT:
                    self.violations.append(f"request {request.rid} timed out early")
            elif not (error.code == "queue_full" and request.queue_was_full):
                self.violations.append(f"request {request.rid} refused: {error.code}")
            return
        request.state = "admitted"
        holders = sum(r.state == "admitted" for r in self.requests)
        if holders > gate.limit:
            self.violations.append(f"{holders} admitted over a limit of {gate.limit}")

    def release(self, request: Request) -> None:
        """What the exchange's one ending does: give the slot back, synchronously."""
        if request.state != "admitted":
            return
        request.state = "released"
        self.releases[request.rid] = self.releases.get(request.rid, 0) + 1
        assert self.gate is not None
        self.gate.leave()

    # -- rules ------------------------------------------------------------------
    @rule(key=KEY)
    def enter(self, key: str) -> None:
        request = Request(len(self.requests), key, self.loop.time())
        self.requests.append(request)
        request.task = self.loop.create_task(self.run(request))

    @rule(data=st.data(), delay=STEPS)
    def release_later(self, data: st.DataObject, delay: float) -> None:
        admitted = [r for r in self.requests if r.state == "admitted"]
        if admitted:
            request = data.draw(st.sampled_from(admitted))
            self.loop.call_at(self.loop.time() + delay, self.release, request)

    @rule(data=st.data(), delay=STEPS)
    def client_leaves_later(self, data: st.DataObject, delay: float) -> None:
        pending = [r for r in self.requests if r.task is not None and not r.task.done()]
        if pending:
            request = data.draw(st.sampled_from(pending))
            assert request.task is not None
            self.loop.call_at(self.loop.time() + delay, request.task.cancel)

    @rule(step=STEPS)
    def time_passes(self, step: float) -> None:
        self.loop.advance(self.loop.time() + step)

    @rule()
    def drain(self) -> None:
        """Every request ends at once (shutdown): waiters cancelled, holders released."""

        def end_all() -> None:
            for request in self.requests:
                if request.task is not None and not request.task.done():
                    request.task.cancel()
                self.release(request)

        self.loop.call_soon(end_all)
        self.loop.settle()
        assert self.gate is not None
        assert self.gate.in_flight == 0 and len(self.gate.queue) == 0

    # -- invariants -------------------------------------------------------------
    @invariant()
    def in_flight_within_bounds(self) -> None:
        gate = self.gate
        if gate is None:
            return
        holders = sum(r.state == "admitted" for r in self.requests)
        assert 0 <= gate.in_flight <= gate.limit
        assert holders <= gate.in_flight  # the rest are slots handed over, in transit

    @invariant()
    def no_violation_seen_by_a_request(self) -> None:
        assert self.violations == []

    @invariant()
    def released_at_most_once(self) -> None:
        assert all(n == 1 for n in self.releases.values())

    def teardown(self) -> None:
        try:
            gate = self.gate
            if gate is not None:
                self.loop.settle()  # slots in transit reach their tasks
                holders = sum(r.state == "admitted" for r in self.requests)
                assert gate.in_flight == holders
                # Release everyone, then again those a freed slot reached, until
                # the waits have run out: the gate ends empty.
                for _ in range(4):
                    for request in self.requests:
                        self.release(request)
                    self.loop.advance(self.loop.time() + WAIT)
                    self.loop.settle()
                for request in self.requests:
                    assert request.task is not None and request.task.done()
                    assert request.task.cancelled() or request.state not in ("new", "waiting")
                    assert request.state != "admitted"
                assert all(
                    self.releases.get(r.rid) == 1 for r in self.requests if r.state == "released"
                )
                assert gate.in_flight == 0 and len(gate.queue) == 0
        finally:
            for task in asyncio.all_tasks(self.loop):
                task.cancel()
            self.loop.settle()
            self.loop.close()


GateMachine.TestCase.settings = settings(
    max_examples=300, stateful_step_count=30, deadline=None, derandomize=True
)
test_gate_holds_under_any_interleaving = GateMachine.TestCase


# -- the fair queue alone (sans-IO) -------------------------------------------
class FairQueueMachine(RuleBasedStateMachine):
    """Pushes, waiters that leave (removed, or dead but still queued) and pops in any
    order: bounded, first come first served within a key, keys served in turn, and a
    dead waiter neither served nor costing its key its turn."""

    def __init__(self) -> None:
        super().__init__()
        self.queue: FairQueue[int] = FairQueue(4)
        self.keys: dict[int, str] = {}
        self.queued: list[int] = []  # in push order, still in the queue
        self.dead: set[int] = set()
        self.since: dict[str, dict[str, int]] = {}

    def live(self, key: str) -> list[int]:
        return [i for i in self.queued if self.keys[i] == key and i not in self.dead]

    @rule(key=st.sampled_from("ab"))
    def push(self, key: str) -> None:
        item = len(self.keys)
        self.keys[item] = key
        if len(self.queued) >= self.queue.limit:
            assert not self.queue.push(key, item)
            return
        if not self.live(key):
            self.since[key] = {}
        assert self.queue.push(key, item)
        self.queued.append(item)

    @rule(data=st.data(), head=st.booleans())
    def waiter_dies(self, data: st.DataObject, head: bool) -> None:
        alive = [i for i in self.queued if i not in self.dead]
        if head:  # the oldest of a key: the one whose turn a pop may reach
            alive = [live[0] for key in "ab" if (live := self.live(key))]
        if alive:
            self.dead.add(data.draw(st.sampled_from(alive)))

    @rule(data=st.data())
    def waiter_removed(self, data: st.DataObject) -> None:
        if self.queued:
            item = data.draw(st.sampled_from(self.queued))
            assert self.queue.remove(self.keys[item], item)
            self.queued.remove(item)
            assert not self.queue.remove(self.keys[item], item)

    @rule()
    def pop(self) -> None:
        dropped: list[int] = []

        def skip(item: int) -> bool:
            if item in self.dead:
                dropped.append(item)
                return True
            return False

        item = self.queue.pop(skip)
        for gone in dropped:
            self.queued.remove(gone)
        if item is None:
            assert not [i for i in self.queued if i not in self.dead]
            return
        key = self.keys[item]
        assert item not in self.dead and item == self.live(key)[0]  # FIFO within a key
        self.queued.remove(item)
        self.since[key] = {}
        for other in {self.keys[i] for i in self.queued} - {key}:
            if self.live(other):
                seen = self.since.setdefault(other, {})
                seen[key] = seen.get(key, 0) + 1
                assert seen[key] <= 1, f"{key} served twice while {other} waited"

    @invariant()
    def bounded_and_counted(self) -> None:
        assert len(self.queue) == len(self.queued) <= self.queue.limit
        lengths = self.queue.lengths()
        assert sum(lengths.values()) == len(self.queued)


FairQueueMachine.TestCase.settings = settings(
    max_examples=300, stateful_step_count=20, deadline=None, derandomize=True
)
test_the_fair_queue_holds_under_any_interleaving = FairQueueMachine.TestCase


# -- per-key concurrency and token buckets (sans-IO, times given) -------------
class BudgetMachine(RuleBasedStateMachine):
    """Requests admitted and ended at random times against one key's limits.

    In flight stays within [0, concurrent]; each admitted request is released
    once; a token bucket never lets in more than its burst plus its refill
    since the start; a refusal's Retry-After is enough for that limit."""

    def __init__(self) -> None:
        super().__init__()
        self.now = 0.0
        self.budget: Budget | None = None
        self.open: list[int] = []  # admitted, not yet released
        self.next_id = 0
        self.admitted = 0
        self.spent = 0

    @initialize(
        concurrent=st.integers(0, 3), rpm=st.integers(0, 5), tpm=st.sampled_from((0, 60, 1000))
    )
    def make_budget(self, concurrent: int, rpm: int, tpm: int) -> None:
        self.budget = Budget(KeyLimits(concurrent, rpm, tpm), self.now)

    @rule(step=st.sampled_from((0.0, 0.5, 1.0, 7.0, 30.0)))
    def time_passes(self, step: float) -> None:
        self.now += step

    @rule()
    def request(self) -> None:
        budget = self.budget
        assert budget is not None
        limits = budget.limits
        refusal = budget.admit(self.now)
        if refusal is None:
            self.open.append(self.next_id)
            self.next_id += 1
            self.admitted += 1
            if limits.rpm:  # the request bucket had a whole request left
                assert self.admitted <= limits.rpm + self.now * limits.rpm / 60 + 1e-9
            if limits.tpm:  # the token bucket was above zero
                assert self.spent < limits.tpm + self.now * limits.tpm / 60
            return
        assert refusal.retry_after >= 1
        if refusal.limit == "concurrent":
            assert limits.concurrent and len(self.open) >= limits.concurrent
            return
        # Asked on a copy: a check moves the buckets' clocks to the time given.
        later = copy.deepcopy(budget).check(self.now + refusal.retry_after)
        assert later is None or later.limit != refusal.limit, refusal

    @rule(data=st.data(), tokens=st.sampled_from((0, 1, 7, 59, 400)))
    def request_ends(self, data: st.DataObject, tokens: int) -> None:
        if not self.open:
            return
        rid = data.draw(st.sampled_from(self.open))
        self.open.remove(rid)  # a second release of one request cannot happen
        assert self.budget is not None
        self.budget.release(tokens, self.now)
        self.spent += tokens

    @invariant()
    def in_flight_is_what_was_admitted_and_not_released(self) -> None:
        budget = self.budget
        if budget is None:
            return
        assert budget.in_flight == len(self.open) >= 0
        if budget.limits.concurrent:
            assert budget.in_flight <= budget.limits.concurrent
        if budget.idle(self.now):
            assert not self.open


BudgetMachine.TestCase.settings = settings(
    max_examples=200, stateful_step_count=30, deadline=None, derandomize=True
)
test_key_budgets_hold_under_any_interleaving = BudgetMachine.TestCase


# -- the same pattern elsewhere: an answer that comes as the wait runs out -----
class FakeWriter:
    def __init__(self) -> None:
        self.written: list[bytes] = []

    def is_closing(self) -> bool:
        return False

    def write(self, data: bytes) -> None:
        self.written.append(data)


def test_a_workers_answer_that_comes_as_the_wait_runs_out_is_not_lost(loop):
    """The parent asks a worker (a watchdog ping, a metrics scrape); the answer arrives
    in the turn its time runs out: the answer is used, not taken for no answer."""
    supervisor = Supervisor(Config(), [], [])
    worker = _Worker(cast(subprocess.Popen[bytes], SimpleNamespace(pid=1)))
    worker.writer = cast(asyncio.StreamWriter, FakeWriter())
    asked = loop.create_task(supervisor._ask(worker, "ping", 1.0))
    loop.turn()
    (future,) = worker.waiting.values()
    at(loop, 0.5, lambda: future.set_result({"pong": True}))
    loop.advance(1.5)  # the answer (0.5) and the deadline (1.0) in one turn
    loop.settle()
    assert asked.result() == {"pong": True}


def test_a_drain_that_ends_as_its_time_runs_out_is_reported_as_drained(loop, monkeypatch):
    """The last exchange ends in the turn the drain time runs out: drained, so the
    shutdown does not report cutting streams that are not there."""
    state = ServerState(Config())
    busy = [True]
    monkeypatch.setattr(state, "busy", lambda: busy[0])

    def last_exchange_ends() -> None:
        busy[0] = False
        state.exchange_settled()

    drained = loop.create_task(state.wait_drained(1.0))
    loop.turn()
    at(loop, 0.5, last_exchange_ends)
    loop.advance(1.5)
    loop.settle()
    assert drained.result() is True


class _StoreLease:
    """A shared lease whose store admits the first ask and refuses the next (503)."""

    def __init__(self) -> None:
        self.key_held = False
        self.asked = 0

    def pending(self, gate: Gate | None) -> bool:
        return True

    async def enter(self, gate: Gate | None) -> RelayError | None:
        self.asked += 1
        if self.asked == 1:
            self.key_held = True  # the store took the key's request (and its RPM)
            return None
        return RelayError(503, "upstream busy", "queue_timeout")

    def release(self, tokens: int) -> None:
        self.key_held = False


def test_a_store_refusal_on_a_retry_elsewhere_gives_back_no_rpm_the_store_kept(loop):
    """rpm=2, --max-inflight 1: the store admits a request (taking one of the key's
    requests a minute); its retry on another upstream is refused there (503). The
    request did go out, so the local RPM bucket keeps it spent, as the store does;
    only a refusal of the request's first ask gives the local request back."""
    config = Config(max_inflight=1, key_rpm=2)
    admission = Admission(config, Metrics())
    ticket = admission.admit(None, "10.0.0.1")
    assert isinstance(ticket, Ticket) and ticket.budget is not None
    budget = ticket.budget
    store = _StoreLease()
    ticket._shared = cast(Any, store)
    first = loop.create_task(ticket.enter(SimpleNamespace(address="u:1")))
    loop.settle()
    assert first.result() is None
    retry = loop.create_task(ticket.enter(SimpleNamespace(address="u:2")))
    loop.settle()
    assert retry.result() is not None and retry.result().status == 503
    assert budget.check(time.monotonic()) is None  # one of two left
    assert budget.admit(time.monotonic()) is None
    refusal = budget.check(time.monotonic())
    assert refusal is not None and refusal.limit == "rpm"
    ticket.settle(0, None, None)
