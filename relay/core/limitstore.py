"""The shared limit store: per-key limits and ``--max-inflight`` across processes.

With ``--limits-store redis://...`` every relay process pointed at the same
Redis (or Valkey) enforces one set of numbers. The scripts and key names are
sans-IO (``relay/http/sharedlimits.py``); this module runs them with
redis-py's asyncio client, imported only when the feature is on.

* **One round trip before the first byte.** :meth:`SharedLease.enter` runs
  one ``EVALSHA`` (redis-py loads the script again after ``NOSCRIPT``) that
  checks every limit of the request and takes its leases atomically. The
  local checks (:mod:`relay.core.admission`) run first and stay: a process
  never holds more than the whole fleet may, so they only refuse what the
  store would refuse too, and they are what is left when the store is away.
* **Nothing on the client's path after it.** Releasing the leases and
  debiting the tokens (one script run) is parked when the exchange settles
  and rides in the next acquire's pipeline, or goes on its own after
  :data:`RELEASE_LINGER`, bounded by the timeout and by :data:`MAX_QUEUED`.
* **Batched.** One pipeline is in flight at a time, on a connection of the
  store's own; the calls made while it is out share the next one (one write,
  one round trip, one wake-up of the loop for all of them).
* **The fair queue stays local.** A request that has its local
  ``--max-inflight`` slot but finds the upstream's shared slots all taken by
  other processes keeps its place and asks again when a slot of this process
  is given back, or after a short back-off, until ``--queue-timeout``.
* **Leases expire.** One task renews this process's live leases every third
  of ``--limits-store-lease`` in one call; a relay that dies stops renewing,
  and its slots come back within one lease time.
* **Faults.** Every call has ``--limits-store-timeout``. A failed call marks
  the store away (one log line, ``relay_limits_store_errors_total``); while
  it is away no request waits on it: ``open`` admits on this process's own
  limits, ``closed`` answers 503. The renewal task pings it every half
  second until it answers (one line again), then sends the releases it
  missed (at most :data:`MAX_UNSENT`) and adds back the leases taken while
  it was away.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import secrets
from collections import deque
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Protocol

from ..config import LIMITS_STORE_PASSWORD_ENV, Config, ConfigError
from ..http.errors import RelayError
from ..http.limits import KeyLimits
from ..http.sharedlimits import (
    ACQUIRE,
    PREFIX,
    RELEASE,
    RENEW,
    bucket_key,
    debited_key,
    leases_key,
    marker_key,
    read_answer,
)

if TYPE_CHECKING:
    from .metrics import Metrics

__all__ = ["LimitStore", "SharedLease", "check_store"]

log = logging.getLogger("relay.events")

#: Calls waiting to be sent; beyond it a release is dropped (its lease runs
#: out by itself) and an acquire counts as a store fault.
MAX_QUEUED = 4096
#: Releases that could not be sent while the store was away, sent when it is
#: back; beyond it the oldest is dropped (its lease runs out by itself).
MAX_UNSENT = 4096
#: Script runs sent in one pipeline, and pipelines in flight at once: calls
#: made while one is out wait for its answer and then go together in the next
#: (as Nagle's algorithm does for bytes), so under load many requests share one
#: write and one round trip; a write and a wake-up of the loop cost more than
#: the wait (at most one round trip) saves.
MAX_BATCH = 256
MAX_PIPELINES = 1
#: How long a release waits to share the pipeline of an acquire (seconds): its
#: slot comes back this much later to other processes (a waiter of this
#: process does not wait for it), and under load most releases cost no
#: write and no round trip of their own.
RELEASE_LINGER = 0.005
#: Key names kept ready per (owner, upstream); beyond it they are built again.
MAX_NAMES = 4096
#: Leases renewed per call (one script run), so a call stays short.
RENEW_BATCH = 512
#: How often the store is pinged while it is away (seconds).
PROBE_EVERY = 0.5
#: Back-off between asks for an upstream slot other processes hold (seconds).
RETRY_FIRST = 0.025
RETRY_MOST = 0.4
#: The start-up check waits at least this long (connecting may take a handshake).
START_TIMEOUT = 3.0
#: An unused key of the same slot, for a script argument that does not apply.
_NONE = PREFIX + "none"
#: Connections to the store per process; a call waits (bounded) for a free one.
MAX_CONNECTIONS = 32


#: The 429 messages of a refusal by the store (the local ones read the same).
_REFUSALS = {
    "concurrent": "too many requests in flight for this key (limit {})",
    "rpm": "requests per minute limit reached for this key (limit {})",
    "tpm": "tokens per minute limit reached for this key (limit {})",
}


class Gate(Protocol):
    """What a lease needs of an upstream's ``--max-inflight`` gate (``admission.Gate``)."""

    address: str
    limit: int
    timeout: float


ACQUIRE_CALL = 0
RELEASE_CALL = 1


class _Call:
    """One script run waiting for a pipeline: its future (None: nobody waits)."""

    __slots__ = ("args", "due", "future", "keys", "upstream", "which")

    def __init__(
        self,
        which: int,
        keys: list[str],
        args: list[object],
        future: asyncio.Future[Any] | None,
        upstream: str | None,
    ) -> None:
        self.which = which
        self.keys = keys
        self.args = args
        self.future = future
        self.upstream = upstream  # a release of this upstream's slot: wake its waiters
        self.due = 0.0  # an acquire not sent by then fails (loop time; 0: never)


def _no_script(reply: object) -> bool:
    from redis.exceptions import NoScriptError  # loaded already: the client is running

    return isinstance(reply, NoScriptError)


def _is_error(reply: object) -> bool:
    return isinstance(reply, Exception)


class StoreFault(Exception):
    """A call to the store failed or timed out (the store is now marked away)."""


def _client(config: Config, timeout: float) -> Any:
    """A redis.asyncio client for ``--limits-store`` (the import happens here)."""
    import redis.asyncio as redis
    from redis.asyncio.retry import Retry
    from redis.backoff import NoBackoff

    store = config.limits_store
    assert store is not None
    pool_class = redis.SSLConnection if store.tls else redis.Connection
    pool = redis.BlockingConnectionPool(
        connection_class=pool_class,
        max_connections=MAX_CONNECTIONS,
        timeout=timeout,
        host=store.host,
        port=store.port,
        db=store.db,
        username=store.username,
        password=config.limits_store_password,
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
        # One immediate reconnect: a restarted store breaks every pooled connection.
        retry=Retry(NoBackoff(), 1),
        health_check_interval=0,
    )
    return redis.Redis(connection_pool=pool)


def _reason(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "timed out"
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else type(exc).__name__


async def _check(config: Config) -> None:
    import redis.exceptions as errors

    timeout = max(START_TIMEOUT, config.limits_store_timeout)
    client = _client(config, timeout)
    store = config.limits_store
    where = str(store)
    try:
        async with asyncio.timeout(timeout):
            await client.ping()
            await client.script_load(ACQUIRE)
    except errors.AuthenticationError as exc:
        sources = f"--limits-store-password-file or {LIMITS_STORE_PASSWORD_ENV}"
        if config.limits_store_password is None:
            hint = f"it needs a password: {sources}"
        elif "without any password" in str(exc):
            hint = "it has no password set, but relay was given one"
        else:
            hint = f"check {sources}"
        reason = f"{where} refused the login ({_reason(exc)}); {hint}"
        raise ConfigError("--limits-store", reason) from None
    except errors.ResponseError as exc:
        raise ConfigError("--limits-store", f"{where} refused: {_reason(exc)}") from None
    except TimeoutError:
        reason = f"no Redis answer from {where} within {timeout:g}s (is it a Redis server?)"
        raise ConfigError("--limits-store", reason) from None
    except (errors.RedisError, OSError) as exc:
        reason = _reason(exc)
        if isinstance(exc, errors.InvalidResponse | errors.DataError) or "rotocol" in reason:
            reason = f"not a Redis server? ({reason})"
        raise ConfigError("--limits-store", f"cannot use {where}: {reason}") from None
    finally:
        with contextlib.suppress(Exception):
            await client.aclose(close_connection_pool=True)


def check_store(config: Config) -> None:
    """At start: reach the store, log in, load a script; a :class:`ConfigError` if not.

    Runs its own short event loop, before the relay's starts.
    """
    try:
        import redis  # noqa: F401
    except ImportError:
        raise ConfigError(
            "--limits-store", "needs the redis client: pip install 'relay[redis]'"
        ) from None
    asyncio.run(_check(config))


class SharedLease:
    """One exchange's leases in the store: its key's slot and its upstream's slot."""

    __slots__ = ("confirmed", "id", "key_held", "label", "limits", "owner", "store", "upstream")

    def __init__(self, store: LimitStore, lease_id: str, label: str, owner: str | None,
                 limits: KeyLimits | None) -> None:  # fmt: skip
        self.store = store
        self.id = lease_id
        self.label = label
        self.owner = owner  # "key:NAME" or "addr:HOST"; None: no key limits apply
        self.limits = limits
        # The key's part is taken once; with no key limits there is none to take.
        self.key_held = owner is None
        self.upstream: str | None = None  # whose --max-inflight slot is held
        self.confirmed = True  # False: taken while the store was away

    def pending(self, gate: Gate | None) -> bool:
        """Whether :meth:`enter` must ask the store before a request goes to ``gate``'s
        upstream (None: no ``--max-inflight``)."""
        return not self.key_held or (gate is not None and gate.address != self.upstream)

    def sets(self) -> list[str]:
        """The lease sets this lease is a member of (for renewal)."""
        found = []
        limits = self.limits
        if self.owner is not None and limits is not None and limits.concurrent:
            found.append(leases_key(self.owner))
        if self.upstream is not None:
            found.append(leases_key("up:" + self.upstream))
        return found

    async def enter(self, gate: Gate | None) -> RelayError | None:
        """Take what the request still needs in the store: None, or why not (429, 503)."""
        store = self.store
        upstream = gate.address if gate is not None else None
        if self.upstream is not None and self.upstream != upstream:
            # Another upstream this time (a retry elsewhere): give the old slot back.
            store.release_upstream(self)
        if not self.pending(gate):
            return None
        limits = self.limits
        take_key = not self.key_held and limits is not None
        args = [
            self.id,
            store.lease_ms,
            (limits.concurrent or 0) if take_key and limits else 0,
            (limits.rpm or 0) if take_key and limits else 0,
            (limits.tpm or 0) if take_key and limits else 0,
            gate.limit if gate is not None else 0,
        ]
        keys = store.names(self.owner, upstream)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + (gate.timeout if gate is not None else 0.0)
        pause = RETRY_FIRST
        while True:
            if store.up:
                try:
                    answer = read_answer(await store.ask(keys, args))
                except asyncio.CancelledError:
                    # The client left while the store was asked: what it may have
                    # taken goes back now, not when the lease runs out.
                    store.give_back(keys, self.id, upstream)
                    raise
                except StoreFault:
                    if not store.fail_open:
                        # Refused below, so nothing will release what the store
                        # may have taken before its answer was lost.
                        store.forget(keys, self.id, upstream)
                    continue  # the store is away now: decided below
                if not answer.limit:
                    self._took(upstream, confirmed=True)
                    return None
                if answer.limit != "upstream":
                    store.metrics.key_requests[self.label, answer.limit] += 1
                    message = _REFUSALS[answer.limit].format(getattr(limits, answer.limit))
                    retry = str(answer.retry_after).encode()
                    return RelayError(
                        429, message, "rate_limit_exceeded", ((b"retry-after", retry),)
                    )
                assert gate is not None
                remaining = deadline - loop.time()
                if remaining <= 0:
                    store.metrics.key_requests[self.label, "queue_timeout"] += 1
                    return RelayError(
                        503,
                        f"upstream busy: no slot freed within {gate.timeout:g} s",
                        "queue_timeout",
                        ((b"retry-after", b"1"),),
                    )
                await store.wait_for_slot(gate.address, min(pause, remaining))
                pause = min(RETRY_MOST, pause * 2)
                continue
            if store.fail_open:
                # This process's own limits admitted it; the store hears of it
                # when it is back (the renewal adds the lease).
                self._took(upstream, confirmed=False)
                return None
            return RelayError(
                503, "the shared limits store is unavailable", "unavailable",
                ((b"retry-after", b"1"),),
            )  # fmt: skip

    def _took(self, upstream: str | None, *, confirmed: bool) -> None:
        self.key_held = True
        self.upstream = upstream
        self.confirmed = self.confirmed and confirmed
        self.store.live[self.id] = self

    def release(self, tokens: int) -> None:
        """The exchange ended: give the leases back and debit ``tokens`` (queued)."""
        self.store.release(self, tokens)


class LimitStore:
    """This process's link to the shared store: the client, the leases it holds, its state."""

    def __init__(self, config: Config, metrics: Metrics) -> None:
        assert config.limits_store is not None
        self.config = config
        self.metrics = metrics
        self.timeout = config.limits_store_timeout
        self.lease_ms = int(config.limits_store_lease * 1000)
        self.fail_open = config.limits_store_failure == "open"
        self.where = str(config.limits_store)
        self.up = True
        self.live: dict[str, SharedLease] = {}
        # A lease id is unique across processes and restarts: a random process id.
        self.process = f"{os.getpid()}-{secrets.token_hex(6)}"
        self._ids = itertools.count(1)
        self._client: Any = None
        self._renew: Any = None
        self._shas: tuple[str, str] = ("", "")  # ACQUIRE's and RELEASE's
        # Acquires waiting to be sent, and releases: a pipeline takes the acquires
        # first (a backlog of releases, sent when the store is back, never holds
        # an acquire up for more than a pipeline).
        self._queue: deque[_Call] = deque()
        self._releases: deque[_Call] = deque()
        self._unsent: deque[_Call] = deque(maxlen=MAX_UNSENT)
        # Releases waiting (at most RELEASE_LINGER) to ride with an acquire.
        self._parked: list[_Call] = []
        self._park_handle: asyncio.TimerHandle | None = None
        self._names: dict[tuple[str | None, str | None], list[str]] = {}
        self._pack: Any = None  # hiredis's packer, when installed
        self._idle: list[Any] = []  # the pipelines' connections, at most MAX_PIPELINES
        self._pipelines = 0
        self._runner: asyncio.Task[None] | None = None  # sends what is queued
        self._closing = False  # close() runs: releases are not parked
        self._closed = False  # close() is done: nothing is sent any more
        self._changed: asyncio.Future[None] | None = None  # close() waits on it
        self._tasks: set[asyncio.Task[None]] = set()
        self._keeper: asyncio.Task[None] | None = None
        self._went_away: asyncio.Event | None = None  # wakes the keeper to ping
        self._slot_freed: dict[str, asyncio.Future[None]] = {}

    def start(self) -> None:
        """Create the client and start the renewal task (in the running loop)."""
        self._client = _client(self.config, self.timeout)
        acquire = self._client.register_script(ACQUIRE)
        release = self._client.register_script(RELEASE)
        self._shas = (acquire.sha, release.sha)
        self._renew = self._client.register_script(RENEW)
        try:
            # One C call per command, what redis-py's own packer ends in after
            # encoding every argument again in Python.
            from hiredis import pack_command
        except ImportError:
            pack_command = None
        self._pack = pack_command
        self._went_away = asyncio.Event()
        loop = asyncio.get_running_loop()
        self._keeper = loop.create_task(self._keep())
        warm = loop.create_task(self._warm())
        self._tasks.add(warm)
        warm.add_done_callback(self._tasks.discard)

    async def _warm(self) -> None:
        """Open the pipelines' connection now, so the first request's round trip is
        not also a connect and a handshake (a failure here is found by that request)."""
        conn = self._new_connection()
        try:
            async with asyncio.timeout(max(START_TIMEOUT, self.timeout)):
                await conn.connect()
        except asyncio.CancelledError:
            await asyncio.shield(conn.disconnect())
            raise
        except Exception:
            with contextlib.suppress(Exception):
                await conn.disconnect()
            return
        self._idle.append(conn)

    async def close(self) -> None:
        """Stop renewing; send what is parked, queued or in flight, and the releases of
        exchanges cut just before (all within one timeout); close the connections.
        Nothing is parked, queued or started after it."""
        loop = asyncio.get_running_loop()
        keeper = self._keeper
        if keeper is not None:
            keeper.cancel()
        # From now on a release goes at once (no lingering); the exchanges cut just
        # before this still give theirs back as their tasks end.
        self._closing = True
        deadline = loop.time() + self.timeout
        while self._parked or self._releases or self._queue or self._pipelines or self._tasks:
            self._unpark()
            left = deadline - loop.time()
            if left <= 0:
                break
            # Woken when a pipeline or a task ends (a task's end is seen here only
            # a turn after its last line ran).
            changed = self._changed = loop.create_future()
            await asyncio.wait(
                [changed, *self._tasks], timeout=left, return_when=asyncio.FIRST_COMPLETED
            )
        self._closed = True
        self._changed = None
        if self._park_handle is not None:
            self._park_handle.cancel()
            self._park_handle = None
        tasks = [*self._tasks, *([keeper] if keeper is not None else [])]
        for task in tasks:
            task.cancel()
        if tasks:
            # Each cancelled task closes its connection (bounded by the timeout).
            await asyncio.wait(tasks, timeout=self.timeout)
        for conn in self._idle:
            with contextlib.suppress(Exception):
                await conn.disconnect()
        if self._client is not None:
            with contextlib.suppress(Exception):
                await self._client.aclose(close_connection_pool=True)

    def _progress(self) -> None:
        """A pipeline or the runner ended: wake :meth:`close` to look again."""
        changed = self._changed
        if changed is not None and not changed.done():
            changed.set_result(None)

    def names(self, owner: str | None, upstream: str | None) -> list[str]:
        """The three keys of a script run for ``owner`` and ``upstream`` (built once)."""
        names = self._names.get((owner, upstream))
        if names is None:
            if len(self._names) >= MAX_NAMES:
                self._names.clear()  # client addresses come and go
            names = self._names[owner, upstream] = [
                leases_key(owner) if owner else _NONE,
                bucket_key(owner) if owner else _NONE,
                leases_key("up:" + upstream) if upstream else _NONE,
            ]
        return names

    def quiet(self) -> bool:
        """Nothing parked, queued or in flight (for tests)."""
        return not (self._parked or self._releases or self._queue or self._tasks)

    def lease(self, label: str, owner: str | None, limits: KeyLimits | None) -> SharedLease:
        """A new exchange's (empty) lease; ``owner`` None when no key limit applies."""
        return SharedLease(self, f"{self.process}:{next(self._ids)}", label, owner, limits)

    async def call(self, script: Any, keys: Sequence[str], args: Sequence[object]) -> Any:
        """Run ``script`` within the timeout; :class:`StoreFault` (store marked away) if not."""
        try:
            async with asyncio.timeout(self.timeout):
                return await script(keys=keys, args=args)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the client's errors, timeouts, a bad reply
            self._failed(exc)
            raise StoreFault from None

    def _failed(self, exc: BaseException) -> None:
        self.metrics.limits_store_errors += 1
        if self.up:
            self.up = False
            then = "using this process's own limits" if self.fail_open else "answering 503"
            log.warning(
                "limits store %s unreachable (%s): %s until it is back",
                self.where,
                _reason(exc),
                then,
            )
            if self._went_away is not None:
                self._went_away.set()  # ping it from now on, not after the next renewal

    async def wait_for_slot(self, upstream: str, limit: float) -> None:
        """Until this process gives back a slot of ``upstream``, or ``limit`` seconds."""
        freed = self._slot_freed.get(upstream)
        if freed is None or freed.done():
            freed = self._slot_freed[upstream] = asyncio.get_running_loop().create_future()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(limit):
                await asyncio.shield(freed)

    def _wake(self, upstream: str) -> None:
        freed = self._slot_freed.pop(upstream, None)
        if freed is not None and not freed.done():
            freed.set_result(None)

    def release(self, lease: SharedLease, tokens: int) -> None:
        """Give ``lease`` back and debit ``tokens``, off the client's path."""
        if self.live.pop(lease.id, None) is None:
            return  # it never took anything (refused, or never asked)
        limits = lease.limits
        tpm = (limits.tpm or 0) if limits is not None and lease.owner is not None else 0
        if not lease.sets() and not (tpm and tokens):
            return
        keys = self.names(lease.owner, lease.upstream)
        args: list[object] = [lease.id, tokens, tpm]
        if tpm and tokens:
            # Debited once, even when the release runs again (its answer was lost):
            # the marker outlives a store away for up to two lease times.
            keys = [*keys, debited_key(lease.id)]
            args.append(2 * self.lease_ms)
        self._spawn(keys, args, lease.upstream)
        lease.upstream = None

    def release_upstream(self, lease: SharedLease) -> None:
        """Give back only ``lease``'s upstream slot (the request moves to another one)."""
        if lease.upstream is not None:
            keys = self.names(None, lease.upstream)
            self._spawn(keys, [lease.id, 0, 0], lease.upstream)
            lease.upstream = None

    def _spawn(self, keys: list[str], args: list[object], upstream: str | None) -> None:
        call = _Call(RELEASE_CALL, keys, args, None, upstream)
        if self._closed:
            return  # after close: its lease runs out by itself
        if not self.up or len(self._releases) + len(self._parked) >= MAX_QUEUED:
            if not self.up:
                self._unsent.append(call)  # sent when the store is back
            # else dropped: the lease runs out by itself within --limits-store-lease.
            if upstream is not None:
                self._wake(upstream)
            return
        self._parked.append(call)
        if self._closing or (upstream is not None and upstream in self._slot_freed):
            # A request of this process waits for this slot, or the store is being
            # closed: no lingering.
            self._unpark()
        elif self._park_handle is None:
            loop = asyncio.get_running_loop()
            self._park_handle = loop.call_later(RELEASE_LINGER, self._unpark)

    def _unpark(self) -> None:
        """The parked releases go in the next pipeline (none rode with an acquire)."""
        if self._park_handle is not None:
            self._park_handle.cancel()
            self._park_handle = None
        if self._parked:
            self._releases.extend(self._parked)
            self._parked.clear()
            self._start_runner()

    def _take_parked(self, room: int) -> list[_Call]:
        """Up to ``room`` parked releases, to go first in an acquire's pipeline."""
        parked = self._parked
        taken = parked[:room]
        del parked[:room]
        if not parked and self._park_handle is not None:
            self._park_handle.cancel()
            self._park_handle = None
        return taken

    def give_back(self, keys: list[str], lease_id: str, upstream: str | None) -> None:
        """An acquire given up on while it may have been sent: release what it took
        (nothing, if it never ran), in a later pipeline than its own. It may free a
        slot of ``upstream``: a waiter of this process for one asks again."""
        self._spawn(keys, [lease_id, 0, 0], upstream)

    def forget(self, keys: list[str], lease_id: str, upstream: str | None) -> None:
        """An acquire whose answer never came, for a request that goes no further:
        the store may have taken its leases; give them back once it answers."""
        self._unsent.append(_Call(RELEASE_CALL, keys, [lease_id, 0, 0], None, upstream))

    def _resend(self) -> None:
        """The store is back: send the releases it missed while it was away."""
        unsent = self._unsent
        releases = self._releases
        while unsent and len(releases) < MAX_QUEUED:
            releases.append(unsent.popleft())
        self._start_runner()

    async def ask(self, keys: list[str], args: list[object]) -> Any:
        """Run the acquire script (batched with others); :class:`StoreFault` if it fails."""
        if len(self._queue) >= MAX_QUEUED:
            self._failed(OverflowError("too many calls waiting for the store"))
            raise StoreFault
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        call = _Call(ACQUIRE_CALL, keys, args, future, None)
        if not self._pipelines and not self._queue and not self._releases:
            # Nothing else waits to be sent or for a reply: send it from this task
            # at once, rather than a turn of the loop later (under load calls made
            # meanwhile share the next pipeline: one write and one read for all
            # of them). Parked releases go first, so their slots are free for it.
            self._pipelines += 1
            batch = self._take_parked(MAX_BATCH - 1) if self._parked else []
            batch.append(call)
            await self._send(batch)
            if future.exception() is not None:
                raise StoreFault
            return future.result()
        # Queued behind busy pipelines: one timeout to be sent (checked when a
        # pipeline is free, at most one timeout later, with no timer per call),
        # and the pipeline's own timeout once sent.
        call.due = asyncio.get_running_loop().time() + self.timeout
        self._queue.append(call)
        self._start_runner()
        return await future  # its result, or StoreFault

    def _start_runner(self) -> None:
        if self._runner is None and not self._closed:
            # It starts at the next turn of the loop: every call made in this
            # one goes in its first pipeline.
            task = self._runner = asyncio.get_running_loop().create_task(self._drain())
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _drain(self) -> None:
        """Send what is queued, one pipeline after another (the calls made while one
        is out go in the next), until nothing is; no turn of the loop between them."""
        try:
            while (self._queue or self._releases) and self._pipelines < MAX_PIPELINES:
                batch = self._next_batch()
                if batch:
                    self._pipelines += 1
                    await self._send(batch)
        finally:
            self._runner = None
            self._progress()

    def _next_batch(self) -> list[_Call]:
        """The next pipeline's calls, parked releases first; none if the store is away."""
        queue = self._queue
        releases = self._releases
        if not self.up:
            # Found away meanwhile: nobody waits on it; releases go when it is back.
            while queue:
                self._give_up(queue.popleft())
            while releases:
                self._give_up(releases.popleft())
            return []
        now = asyncio.get_running_loop().time()
        late = False  # an acquire was not sent within a timeout
        # Acquires first, leaving half the batch to releases when some wait.
        room = MAX_BATCH - min(MAX_BATCH // 2, len(self._parked) + len(releases))
        acquires: list[_Call] = []
        while queue and len(acquires) < room:
            call = queue.popleft()
            future = call.future
            assert future is not None
            if future.done():
                pass  # given up on (its client left)
            elif call.due < now:
                late = True
                future.set_exception(StoreFault())
            else:
                acquires.append(call)
        # Releases go before acquires in the pipeline: an acquire finds the slots
        # they free (a waiter of this process whose acquire went first would be
        # answered "full", and the release's wake-up would come before it waits
        # again).
        room = MAX_BATCH - len(acquires)
        batch = self._take_parked(room) if self._parked else []
        while releases and len(batch) < room:
            batch.append(releases.popleft())
        batch += acquires
        if late:  # not sent within a timeout: the store is slow, so away
            self._failed(TimeoutError())
            for call in batch:
                self._give_up(call)
            while queue:
                self._give_up(queue.popleft())
            while releases:
                self._give_up(releases.popleft())
            return []
        return batch

    def _give_up(self, call: _Call) -> None:
        future = call.future
        if future is None:
            self._unsent.append(call)
        elif not future.done():
            future.set_exception(StoreFault())

    async def _send(self, batch: list[_Call]) -> None:
        """One pipeline of script runs: one write, one round trip."""
        from redis.exceptions import ConnectionError as Broken

        try:
            async with asyncio.timeout(self.timeout):
                try:
                    replies = await self._pipeline(batch)
                except (Broken, ConnectionResetError, BrokenPipeError):
                    # A restarted store broke every idle connection: close them all
                    # and try once more on a new one.
                    for conn in self._idle:
                        await conn.disconnect()
                    replies = await self._pipeline(batch)
                again = (
                    [i for i, reply in enumerate(replies) if _no_script(reply)]
                    if any(map(_is_error, replies))
                    else None
                )
                if again:
                    # The store restarted and forgot the scripts: load them, and
                    # ask again for the calls that were not run.
                    await self._client.script_load(ACQUIRE)
                    await self._client.script_load(RELEASE)
                    redone = await self._pipeline([batch[i] for i in again])
                    for i, reply in zip(again, redone, strict=True):
                        replies[i] = reply
        except asyncio.CancelledError:
            if not self._closed:
                # The acquire's task was cancelled (its client left): the releases
                # that rode with it go in the next pipeline (again, if they ran).
                self._releases.extend(call for call in batch if call.future is None)
            raise
        except Exception as exc:
            self._failed(exc)
            replies = [StoreFault()] * len(batch)
            # Whether they ran is unknown: releases go again once the store is back
            # (giving a lease back twice is harmless; tokens are debited once).
            self._unsent.extend(call for call in batch if call.future is None)
        finally:
            self._pipelines -= 1
            if (self._queue or self._releases) and self._runner is None:
                # Calls queued while this one was out go next (cancelled too).
                self._start_runner()
            self._progress()
        failed = None
        for call, reply in zip(batch, replies, strict=True):
            if isinstance(reply, Exception) and failed is None:
                failed = reply
            future = call.future
            if future is not None and not future.done():
                if isinstance(reply, Exception):
                    future.set_exception(StoreFault())
                else:
                    future.set_result(reply)
            if call.upstream is not None:
                self._wake(call.upstream)  # a waiter of this process asks again
        if failed is not None and not isinstance(failed, StoreFault):
            self._failed(failed)

    async def _pipeline(self, batch: list[_Call]) -> list[Any]:
        """Send ``batch`` on a connection of its own and read every reply (an error
        reply is returned in its place). redis-py's Pipeline would do the same with
        several times the CPU per command; the connection is its public one."""
        from redis.exceptions import ResponseError

        conn = self._idle.pop() if self._idle else self._new_connection()
        try:
            if not conn.is_connected:
                await conn.connect()
            shas = self._shas
            commands = [
                ("EVALSHA", shas[call.which], len(call.keys), *call.keys, *call.args)
                for call in batch
            ]
            pack = self._pack
            packed = list(map(pack, commands)) if pack else conn.pack_commands(commands)
            await conn.send_packed_command(packed, check_health=False)
            replies: list[Any] = []
            read = conn.read_response
            for _ in batch:
                try:
                    replies.append(await read())
                except ResponseError as exc:  # one script's error; the rest still come
                    replies.append(exc)
        except BaseException:
            # Cancelled or broken half-way: replies may still be on their way, so
            # this connection must never be read again.
            await asyncio.shield(conn.disconnect())
            raise
        finally:
            self._idle.append(conn)
        return replies

    def _new_connection(self) -> Any:
        pool = self._client.connection_pool
        # No socket timeout of its own: the pipeline's one timeout bounds it all.
        # With one, every write is a task of asyncio.wait_for (two more turns of
        # the loop before the bytes leave) and every reply its own timeout.
        return pool.connection_class(**{**pool.connection_kwargs, "socket_timeout": None})

    async def _keep(self) -> None:
        """Renew the live leases every third of a lease; ping the store while it is away."""
        every = self.lease_ms / 3000
        went_away = self._went_away
        assert went_away is not None
        while True:
            if self.up:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(every):
                        await went_away.wait()
                went_away.clear()
            if not self.up:
                await asyncio.sleep(PROBE_EVERY)
                try:
                    async with asyncio.timeout(self.timeout):
                        await self._client.ping()
                except asyncio.CancelledError:
                    raise
                except Exception:
                    self.metrics.limits_store_errors += 1
                    continue
                self.up = True
                log.warning("limits store %s reachable again: limits are shared", self.where)
                self._resend()
            await self.renew()

    async def renew(self) -> None:
        """Extend every live lease; add back those the store does not know."""
        leases = sorted(self.live.values(), key=lambda lease: lease.confirmed)
        pairs = [(name, lease) for lease in leases for name in lease.sets()]
        unconfirmed = [lease for lease in leases if not lease.confirmed]
        for start in range(0, max(1, len(pairs)), RENEW_BATCH):
            batch = pairs[start : start + RENEW_BATCH]
            fresh = sum(1 for _, lease in batch if not lease.confirmed)
            keys = [marker_key(self.process), *(name for name, _ in batch)]
            args: list[object] = [self.lease_ms, *(lease.id for _, lease in batch), fresh]
            try:
                await self.call(self._renew, keys, args)
            except StoreFault:
                return
        for lease in unconfirmed:
            lease.confirmed = True
