"""Sans-IO limits: per-key budgets and a queue that serves keys in turn.

Nothing here reads a clock or touches a socket: every method that depends on
time takes ``now`` (seconds, monotonic), so the decisions are plain functions
of their inputs and are tested as tables.

* Requests per minute and tokens per minute are token buckets: a key may
  spend up to one minute's budget at once, and the budget refills evenly
  (``limit / 60`` per second). A request is let in while the token bucket
  is above zero; its tokens are debited when it ends (the upstream reports
  them only then), so one request may drive the bucket below zero and the
  key then waits until it has refilled.
* Concurrency is a count of requests in flight.
* :class:`FairQueue` holds waiters by key and hands slots out round-robin
  over the keys waiting, so one greedy key cannot starve the others.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Generic, NamedTuple, TypeVar

__all__ = ["Budget", "FairQueue", "KeyLimits", "Refusal", "TokenBucket"]

T = TypeVar("T", bound=Hashable)


@dataclass(frozen=True)
class KeyLimits:
    """One key's limits; ``None`` takes the default, ``0`` means no limit."""

    concurrent: int | None = None
    rpm: int | None = None
    tpm: int | None = None

    def over(self, default: KeyLimits) -> KeyLimits:
        """These limits, with the unset ones taken from ``default``."""
        return KeyLimits(
            self.concurrent if self.concurrent is not None else default.concurrent,
            self.rpm if self.rpm is not None else default.rpm,
            self.tpm if self.tpm is not None else default.tpm,
        )


class Refusal(NamedTuple):
    """Why a request is over its key's limits, and when to retry (whole seconds)."""

    limit: str  # "concurrent", "rpm" or "tpm"
    retry_after: int
    message: str


class TokenBucket:
    """``per_minute`` units a minute, in bursts up to ``per_minute``."""

    def __init__(self, per_minute: int, now: float) -> None:
        self.capacity = float(per_minute)
        self.rate = per_minute / 60.0
        self.level = float(per_minute)
        self._at = now

    def refill(self, now: float) -> float:
        """The level at ``now`` (never above the capacity)."""
        if now > self._at:
            self.level = min(self.capacity, self.level + (now - self._at) * self.rate)
            self._at = now
        return self.level

    def seconds_until(self, level: float, now: float, *, above: bool = False) -> int:
        """Whole seconds (at least 1) until the bucket holds ``level``, or more than
        ``level`` when ``above``: a Retry-After after which the check passes."""
        if not self.rate:
            return 60
        seconds = (level - self.refill(now)) / self.rate
        # A whole number of seconds that only reaches the level exactly is not
        # enough when the check wants more than it.
        return max(1, math.floor(seconds) + 1 if above else math.ceil(seconds))

    def take(self, amount: float, now: float) -> None:
        """Spend ``amount`` (the level may go below zero: spent is spent)."""
        self.refill(now)
        self.level -= amount

    def give(self, amount: float, now: float) -> None:
        """Put back ``amount`` taken for nothing (never above the capacity)."""
        self.level = min(self.capacity, self.refill(now) + amount)

    def full(self, now: float) -> bool:
        return self.refill(now) >= self.capacity


class Budget:
    """What one key (or one client address) has in flight and left to spend."""

    def __init__(self, limits: KeyLimits, now: float) -> None:
        self.in_flight = 0
        self.limits = limits
        self._requests: TokenBucket | None = None
        self._tokens: TokenBucket | None = None
        self.set_limits(limits, now)

    def set_limits(self, limits: KeyLimits, now: float) -> None:
        """New limits (a reload); a bucket whose limit is unchanged keeps its level."""
        old, self.limits = self.limits, limits
        if not limits.rpm:
            self._requests = None
        elif self._requests is None or old.rpm != limits.rpm:
            self._requests = TokenBucket(limits.rpm, now)
        if not limits.tpm:
            self._tokens = None
        elif self._tokens is None or old.tpm != limits.tpm:
            self._tokens = TokenBucket(limits.tpm, now)

    def check(self, now: float) -> Refusal | None:
        """Why a new request must wait now, or ``None`` if it may go."""
        limits = self.limits
        if limits.concurrent and self.in_flight >= limits.concurrent:
            message = f"too many requests in flight for this key (limit {limits.concurrent})"
            return Refusal("concurrent", 1, message)
        requests = self._requests
        if requests is not None and requests.refill(now) < 1:
            return Refusal(
                "rpm",
                requests.seconds_until(1, now),
                f"requests per minute limit reached for this key (limit {limits.rpm})",
            )
        tokens = self._tokens
        if tokens is not None and tokens.refill(now) <= 0:
            return Refusal(
                "tpm",
                tokens.seconds_until(0, now, above=True),
                f"tokens per minute limit reached for this key (limit {limits.tpm})",
            )
        return None

    def admit(self, now: float) -> Refusal | None:
        """Let a request in (counting it) unless it is over a limit."""
        refusal = self.check(now)
        if refusal is None:
            self.in_flight += 1
            if self._requests is not None:
                self._requests.take(1, now)
        return refusal

    def refused(self, now: float) -> None:
        """A request let in by :meth:`admit` was refused after all (by the shared
        store, which took nothing for it): its request is not spent. It is still in
        flight until :meth:`release`."""
        if self._requests is not None:
            self._requests.give(1, now)

    def release(self, tokens: int, now: float) -> None:
        """A request let in by :meth:`admit` ended, having used ``tokens``."""
        self.in_flight -= 1
        if self._tokens is not None and tokens:
            self._tokens.take(tokens, now)

    def idle(self, now: float) -> bool:
        """Nothing in flight and every bucket full: forgetting it changes nothing."""
        return (
            self.in_flight == 0
            and (self._requests is None or self._requests.full(now))
            and (self._tokens is None or self._tokens.full(now))
        )


class FairQueue(Generic[T]):
    """Waiters grouped by key, served round-robin over the keys; at most ``limit`` in all.

    Within a key, first come first served; across keys, each key waiting gets
    one slot in turn, so a key with a hundred queued requests delays another
    key's single request by at most one slot.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._by_key: dict[str, deque[T]] = {}  # insertion order is the rotation
        self._length = 0

    def __len__(self) -> int:
        return self._length

    def push(self, key: str, item: T) -> bool:
        """Queue ``item`` for ``key``; false (and nothing queued) when the queue is full."""
        if self._length >= self.limit:
            return False
        self._by_key.setdefault(key, deque()).append(item)
        self._length += 1
        return True

    def remove(self, key: str, item: T) -> bool:
        """Take ``item`` out (its waiter left); false if it was not queued."""
        waiting = self._by_key.get(key)
        if waiting is None or item not in waiting:
            return False
        waiting.remove(item)
        self._length -= 1
        if not waiting:
            del self._by_key[key]
        return True

    def pop(self, skip: Callable[[T], bool] | None = None) -> T | None:
        """The next waiter: the oldest of the key whose turn it is; ``None`` if empty.

        Items for which ``skip`` is true (waiters that left but are still
        queued) are dropped on the way, and their key keeps its turn: only a
        waiter that is served sends its key to the back of the rotation.
        """
        by_key = self._by_key
        while by_key:
            key = next(iter(by_key))
            waiting = by_key[key]
            item = waiting.popleft()
            self._length -= 1
            if skip is not None and skip(item):
                if not waiting:
                    del by_key[key]
                continue
            del by_key[key]
            if waiting:
                by_key[key] = waiting  # back of the rotation
            return item
        return None

    def lengths(self) -> dict[str, int]:
        """Waiters by key (for gauges)."""
        return {key: len(waiting) for key, waiting in self._by_key.items()}
