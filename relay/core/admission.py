"""Admission: per-key limits, the per-upstream in-flight queue, and usage accounting.

The decisions live in the sans-IO layer (``relay/http/limits.py``,
``relay/http/usage.py``); this module carries them out for the exchanges:

* :meth:`Admission.admit` runs in the client connection right after the key
  check, before anything reaches an upstream: a request over its key's
  concurrency, requests-per-minute or tokens-per-minute limit gets 429 with
  ``Retry-After``. Without configured keys the same limits apply to each
  client address (the budget of an address is forgotten once it is idle).
* :class:`Gate` enforces ``--max-inflight`` per upstream: beyond it requests
  wait in a bounded queue served round-robin over keys; a full queue or a
  wait past ``--queue-timeout`` gets 503. A waiter is a future awaited by the
  exchange's connect task, so a client that leaves (its task is cancelled)
  leaves the queue at once, and a slot handed to it is passed on.
* :class:`Ticket` is one exchange's share: it keeps references to the last
  reads the exchange forwarded (a look at the read's last byte and a
  ``deque.append`` per read; a Python call only for a read of an event
  stream that ends inside a line, see :class:`BodyHooks`) and settles once
  when the exchange ends: usage read from those reads, tokens counted by
  key and model, the key's budget debited, its concurrency and its upstream
  slot released. Every ending goes through the exchange's one ``_end``, so
  nothing leaks when a stream is cut.

Without ``--limits-store`` all of it is per relay process. With it, a
ticket also carries a lease in the shared store (``relay/core/limitstore.py``):
the local checks run first as before, then the store is asked once, before
the request goes upstream, and told when it settles.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, NamedTuple

from ..config import Config
from ..http.auth import NamedKey
from ..http.errors import RelayError
from ..http.limits import Budget, FairQueue, KeyLimits
from ..http.usage import (
    NO_USAGE,
    StreamTail,
    Usage,
    estimate_json,
    reads_kept,
    usage_from_json,
    usage_from_json_tail,
    usage_from_stream,
)

if TYPE_CHECKING:
    from ..config import UpstreamAddress
    from .limitstore import LimitStore, SharedLease
    from .metrics import Gauges, Metrics
    from .upstream import UpstreamPool

__all__ = [
    "ANONYMOUS",
    "IGNORE_READ",
    "NO_HOOKS",
    "OTHER_MODEL",
    "Admission",
    "BodyHooks",
    "Gate",
    "Ticket",
]

#: The key label of requests when no keys are configured.
ANONYMOUS = "anonymous"
#: The model label of every model not named in the configuration.
OTHER_MODEL = "other"
#: Budgets kept before idle ones are forgotten (client addresses come and go).
PRUNE_AT = 1024


#: Takes a read and keeps nothing: the per-read hook of a response whose usage
#: is not read. A C method (a deque that holds nothing), not a Python function,
#: because it runs on every read of the hot path.
IGNORE_READ: Callable[[bytes], None] = deque(maxlen=0).append


class BodyHooks(NamedTuple):
    """Where the exchange hands each read of a response body, for its usage.

    Per read the exchange inlines :meth:`feed`: ``keep(read)`` (C) when the
    read ends with a line feed, else ``mid_line(read)``, a Python call only
    for a read of an event stream (:class:`~relay.http.usage.StreamTail`);
    for any other body both are the same C method.
    """

    keep: Callable[[bytes], None]
    mid_line: Callable[[bytes], None]

    def feed(self, read: bytes) -> None:
        """Hand ``read`` (not empty) over, as the exchange does inline."""
        if read[-1] == 10:
            self.keep(read)
        else:
            self.mid_line(read)


#: A body whose usage is not read: every read goes to the C no-op.
NO_HOOKS = BodyHooks(IGNORE_READ, IGNORE_READ)


class Gate:
    """``--max-inflight`` for one upstream: a count and a fair, bounded queue."""

    def __init__(
        self, address: str, limit: int, queue_size: int, timeout: float, metrics: Metrics
    ) -> None:
        self.address = address
        self.limit = limit
        self.timeout = timeout
        self.metrics = metrics
        self.in_flight = 0
        self.queue: FairQueue[asyncio.Future[None]] = FairQueue(queue_size)

    def try_enter(self) -> bool:
        """Take a free slot at once if there is one and nobody is queued before us."""
        if self.in_flight < self.limit and not self.queue:
            self.in_flight += 1
            return True
        return False

    async def enter(self, key: str) -> RelayError | None:
        """Take a slot, waiting in the queue if need be; an error if the wait fails.

        Cancellation (the client left) removes the waiter from the queue at
        once; a slot handed over just before is passed on to the next waiter.
        """
        if self.in_flight < self.limit and not self.queue:
            self.in_flight += 1
            return None
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[None] = loop.create_future()
        if not self.queue.push(key, waiter):
            self.metrics.key_requests[key, "queue_full"] += 1
            return RelayError(
                503,
                f"upstream busy: {self.limit} requests in flight and its queue is full",
                "queue_full",
                ((b"retry-after", b"1"),),
            )
        started = loop.time()
        try:
            async with asyncio.timeout(self.timeout):
                await waiter
        except TimeoutError:
            # The timeout cancels the waiter unless a slot was handed to it
            # first; a cancelled waiter holds no slot, whoever took it out.
            if not self.queue.remove(key, waiter) and _handed_over(waiter):
                return None  # the slot came as the wait ran out: use it
            self.metrics.key_requests[key, "queue_timeout"] += 1
            return RelayError(
                503,
                f"upstream busy: no slot freed within {self.timeout:g} s",
                "queue_timeout",
                ((b"retry-after", b"1"),),
            )
        except asyncio.CancelledError:
            if not self.queue.remove(key, waiter) and _handed_over(waiter):
                self.leave()  # handed a slot while leaving: pass it on
            raise
        finally:
            self.metrics.queue_wait.observe(loop.time() - started)
        return None

    def leave(self) -> None:
        """Give the slot back: to the next waiter whose turn it is, or to the count."""
        # A waiter already cancelled (timed out or its client left, its task
        # not run yet) is dropped without costing its key the turn.
        waiter = self.queue.pop(skip=_gone)
        if waiter is not None:
            waiter.set_result(None)  # the slot passes to it; in_flight unchanged
            return
        self.in_flight -= 1


def _handed_over(waiter: asyncio.Future[None]) -> bool:
    """Whether :meth:`Gate.leave` gave ``waiter`` a slot: a result, not a cancellation."""
    return waiter.done() and not waiter.cancelled()


def _gone(waiter: asyncio.Future[None]) -> bool:
    return waiter.done()


class Ticket:
    """One exchange's share of the limits, and its usage."""

    # One per request: slots make it smaller and its attributes cheaper to set.
    __slots__ = (
        "_chunked",
        "_counted",
        "_gate",
        "_kind",
        "_max_usage",
        "_reads",
        "_settled",
        "_shared",
        "_waiting",
        "admission",
        "budget",
        "label",
        "metrics",
    )

    def __init__(
        self,
        metrics: Metrics,
        label: str = ANONYMOUS,
        *,
        admission: Admission | None = None,
        budget: Budget | None = None,
        shared: SharedLease | None = None,
    ) -> None:
        self.metrics = metrics
        self.label = label
        self.admission = admission
        self.budget = budget
        self._gate: Gate | None = None
        self._reads: deque[bytes] | StreamTail | None = None
        self._kind = ""  # "stream", "json" or "" (not counted)
        self._chunked = False
        self._settled: Usage | None = None
        # relay_key_requests_total: one result per request, counted once it
        # is known (the queue may still refuse a request the key limits let in).
        self._counted = admission is None
        self._waiting = False  # queued for a --max-inflight slot
        # The default when no admission (so no configuration) comes with it.
        self._max_usage = (
            admission.config.max_usage_bytes if admission is not None else Config.max_usage_bytes
        )
        self._shared = shared  # its leases in the shared store (--limits-store)

    def try_enter(self, pool: UpstreamPool) -> bool:
        """Hold a ``--max-inflight`` slot on ``pool``'s upstream without waiting, if
        none is needed or one is free; false when the caller must await :meth:`enter`."""
        gate = self.admission.gate(pool.address) if self.admission is not None else None
        if self._shared is not None and self._shared.pending(gate):
            return False  # the shared store must be asked: only enter() may wait
        if gate is self._gate:
            self._result("admitted")
            return True
        if gate is None:
            self._leave_gate()
            self._result("admitted")
            return True
        if gate.try_enter():
            self._leave_gate()
            self._gate = gate
            self._result("admitted")
            return True
        return False

    async def enter(self, pool: UpstreamPool) -> RelayError | None:
        """Hold a ``--max-inflight`` slot on ``pool``'s upstream (kept on a retry there)."""
        gate = self.admission.gate(pool.address) if self.admission is not None else None
        if gate is not self._gate:
            self._leave_gate()
            if gate is not None:
                self._waiting = True
                try:
                    error = await gate.enter(self.label)
                finally:
                    self._waiting = False
                if error is not None:
                    self._counted = True  # the gate counted queue_full or queue_timeout
                    return error
                self._gate = gate
        if self._shared is not None:
            # The local slot first (the fair queue is this process's), then the store's.
            first = not self._shared.key_held  # its key's request not yet taken there
            self._waiting = True
            try:
                error = await self._shared.enter(gate)
            finally:
                self._waiting = False
            if error is not None:
                # The store took nothing for a request it refused: neither does
                # this process's own RPM bucket, so both agree on what is left. A
                # retry elsewhere refused went out before: the store kept its request.
                if first and self.budget is not None:
                    self.budget.refused(time.monotonic())
                if error.code == "unavailable":
                    self._result("store_unavailable")
                else:
                    self._counted = True  # the store's answer counted its limit
                return error
        self._result("admitted")
        return None

    def _result(self, result: str) -> None:
        """Count this request's result by key, once."""
        if not self._counted:
            self._counted = True
            self.metrics.key_requests[self.label, result] += 1

    def _leave_gate(self) -> None:
        gate, self._gate = self._gate, None
        if gate is not None:
            gate.leave()

    def response_started(self, status: int, headers: Iterable[tuple[bytes, bytes]]) -> BodyHooks:
        """The per-read hooks for this response's body: where to keep a reference.

        A stream keeps its last few reads, and those of an event still
        unfinished up to ``--max-usage-bytes`` (:class:`StreamTail`); a JSON
        body of unknown length or larger than that bound keeps its last
        :func:`reads_kept` reads, one of known length up to the bound all of
        them; anything else keeps none. References, never a copy.
        """
        if not 200 <= status < 300:
            return NO_HOOKS
        media = b""
        length: int | None = None
        for name, value in headers:
            name = name.lower()  # a handful of fields, once per response
            if name == b"content-type":
                media = value.split(b";", 1)[0].strip().lower()
            elif name == b"content-length" and value.isdigit():
                length = int(value)
            elif name == b"transfer-encoding":
                self._chunked = True
        if media == b"text/event-stream":
            self._kind = "stream"
            tail = StreamTail(self._max_usage)
            self._reads = tail
            return BodyHooks(tail.append, tail.mid_line)
        if media != b"application/json":
            return NO_HOOKS
        self._kind = "json"
        if length is not None and length <= self._max_usage:
            reads: deque[bytes] = deque()  # the whole body: at most the bound
        else:
            reads = deque(maxlen=reads_kept(self._max_usage))
        self._reads = reads
        return BodyHooks(reads.append, reads.append)

    def settle(
        self, bytes_out: int, requested_model: str | None, forwarded_model: str | None
    ) -> Usage:
        """The exchange ended (any way): read its usage, count it, release everything.

        Idempotent: only the first call counts.
        """
        if self._settled is not None:
            return self._settled
        kept, self._reads = self._reads, None
        usage = NO_USAGE
        if kept:
            bound = self._max_usage
            reads = kept.reads() if isinstance(kept, StreamTail) else kept
            if self._kind == "stream":
                usage = usage_from_stream(reads, bytes_out, max_bytes=bound)
            else:
                if sum(map(len, reads)) == bytes_out:  # the whole body was kept
                    usage = usage_from_json(reads, chunked=self._chunked, max_bytes=bound)
                if usage.source == "none":
                    usage = usage_from_json_tail(reads, max_bytes=bound)
                if usage.source == "none":
                    usage = estimate_json(bytes_out)
        self._settled = usage
        metrics = self.metrics
        label = self.label
        admission = self.admission
        if usage.source != "none":
            model = OTHER_MODEL
            if admission is not None:
                model = admission.model_label(requested_model, forwarded_model, usage.model)
            metrics.tokens[label, model, "prompt"] += usage.prompt
            metrics.tokens[label, model, "completion"] += usage.completion
        metrics.usage[label, usage.source] += 1
        # Ended while queued: the client left. Ended before any gate (relay
        # answered itself, or the request failed first): it passed every limit.
        self._result("queue_left" if self._waiting else "admitted")
        if self._gate is not None:
            self._leave_gate()
        if admission is not None:
            admission.in_flight[label] -= 1
            if self.budget is not None:
                self.budget.release(usage.total, time.monotonic())
        if self._shared is not None:
            self._shared.release(usage.total)  # queued: nothing here waits for the store
        return usage


class Admission:
    """Limits by key (or client address) and ``--max-inflight`` gates by upstream."""

    def __init__(self, config: Config, metrics: Metrics, keys: Sequence[NamedKey] = ()) -> None:
        self.config = config
        self.metrics = metrics
        self.defaults = KeyLimits(config.key_max_concurrent, config.key_rpm, config.key_tpm)
        mapping = config.model_map
        models = {*mapping.aliases, *mapping.aliases.values(), *(m for m, _ in config.routes)}
        if mapping.default is not None:
            models.add(mapping.default)
        self.models = frozenset(models)
        self.in_flight: Counter[str] = Counter()
        self.store: LimitStore | None = None  # --limits-store, set by the server state
        self._gates: dict[str, Gate] = {}
        self._budgets: dict[str, Budget] = {}
        self._prune_at = PRUNE_AT
        self._limits: dict[str, KeyLimits] = {}
        self.set_keys(keys)

    def set_keys(self, keys: Sequence[NamedKey]) -> None:
        """The keys' own limits (start and SIGHUP); budgets in use keep their levels."""
        self._limits = {key.name: key.limits.over(self.defaults) for key in keys}
        now = time.monotonic()
        for name, budget in list(self._budgets.items()):
            if name.startswith("key:"):
                limits = self._limits.get(name[4:])
                if limits is None:
                    del self._budgets[name]  # a removed key; its tickets keep their budget
                else:
                    budget.set_limits(limits, now)

    def admit(self, key: str | None, client_host: str) -> Ticket | RelayError:
        """A ticket for a request of ``key`` (None: no keys configured), or a 429."""
        if key is None:
            label, limits = ANONYMOUS, self.defaults
        else:
            label, limits = key, self._limits.get(key, self.defaults)
        budget = None
        if limits.concurrent or limits.rpm or limits.tpm:
            budget_id = "addr:" + client_host if key is None else "key:" + key
            now = time.monotonic()
            budget = self._budgets.get(budget_id)
            if budget is None:
                if len(self._budgets) >= self._prune_at:
                    self._prune(now)
                budget = self._budgets[budget_id] = Budget(limits, now)
            refusal = budget.admit(now)
            if refusal is not None:
                self.metrics.key_requests[label, refusal.limit] += 1
                retry = str(refusal.retry_after).encode()
                return RelayError(
                    429, refusal.message, "rate_limit_exceeded", ((b"retry-after", retry),)
                )
        self.in_flight[label] += 1
        shared = None
        if self.store is not None and (budget is not None or self.config.max_inflight):
            owner = ("addr:" + client_host if key is None else "key:" + key) if budget else None
            shared = self.store.lease(label, owner, limits if budget else None)
        return Ticket(self.metrics, label, admission=self, budget=budget, shared=shared)

    def _prune(self, now: float) -> None:
        for name in [n for n, b in self._budgets.items() if b.idle(now)]:
            del self._budgets[name]
        # Amortized: the next sweep waits until the dict has doubled again.
        self._prune_at = max(PRUNE_AT, 2 * len(self._budgets))

    def gate(self, address: UpstreamAddress) -> Gate | None:
        """The ``--max-inflight`` gate of an upstream, or None without the flag."""
        limit = self.config.max_inflight
        if not limit:
            return None
        name = str(address)
        gate = self._gates.get(name)
        if gate is None:
            cfg = self.config
            gate = self._gates[name] = Gate(
                name, limit, cfg.queue_size, cfg.queue_timeout, self.metrics
            )
        return gate

    def model_label(self, *names: str | None) -> str:
        """The first of ``names`` the configuration knows, else :data:`OTHER_MODEL`."""
        for name in names:
            if name is not None and name in self.models:
                return name
        return OTHER_MODEL

    def gauges(self) -> Gauges:
        """Queue lengths and slots in use by upstream, requests in flight by key."""
        gates = [(f'upstream="{g.address}"', g) for g in self._gates.values()]
        gauges: Gauges = {
            "relay_queue_length": [(labels, float(len(g.queue))) for labels, g in gates],
            "relay_upstream_inflight": [(labels, float(g.in_flight)) for labels, g in gates],
            "relay_key_in_flight": [
                (f'key="{name}"', float(n)) for name, n in sorted(self.in_flight.items())
            ],
        }
        if self.store is not None:
            gauges["relay_limits_store_up"] = [("", 1.0 if self.store.up else 0.0)]
        return gauges
