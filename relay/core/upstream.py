"""Connections to the upstream and the keep-alive pool that holds them.

An :class:`UpstreamConnection` is a thin ``asyncio.Protocol``: every event is
handed straight to the exchange that owns it (no buffering, no await). The
:class:`UpstreamPool` keeps idle connections LIFO (the most recently used is
the least likely to have been closed by the upstream) and expires them
before the upstream's own keep-alive timeout would.

State changes happen at the moment of handoff (httpcore's idea): a
connection is ``IDLE`` only while it sits in the pool, ``ACTIVE`` from
:meth:`UpstreamPool.acquire` until it is released or closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import random
import socket
import ssl
import time
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any, Protocol, cast

import h11

from ..config import UpstreamAddress
from ..http.modellist import MAX_MODEL_LIST_BYTES, parse_model_list

if TYPE_CHECKING:
    from .metrics import Metrics
    from .ticker import Ticker

__all__ = [
    "Balancer",
    "ConnectError",
    "ConnectTimeout",
    "Router",
    "UpstreamConnection",
    "UpstreamPool",
    "fetch",
    "fetch_model_lists",
]

#: Longest passive ejection after repeated connect failures, seconds.
MAX_EJECTION = 30.0

log = logging.getLogger("relay.events")


class ConnectError(OSError):
    """The upstream refused or could not be reached."""


class ConnectTimeout(ConnectError):
    """Connecting to the upstream took longer than the connect timeout."""


class UpstreamOwner(Protocol):
    """What an :class:`UpstreamConnection` reports to while it is ``ACTIVE``."""

    def upstream_data(self, data: bytes) -> None: ...
    def upstream_eof(self) -> None: ...
    def upstream_lost(self, exc: Exception | None) -> None: ...
    def upstream_pause_writing(self) -> None: ...
    def upstream_resume_writing(self) -> None: ...


class State(enum.Enum):
    CONNECTING = "connecting"
    ACTIVE = "active"
    IDLE = "idle"
    CLOSED = "closed"


def set_nodelay(transport: asyncio.BaseTransport) -> None:
    """TCP_NODELAY: a token must not wait for Nagle to fill a segment.

    Both asyncio and uvloop set it already on TCP transports; relay sets it
    explicitly (as aiohttp does) so the contract never depends on that, and
    tolerates sockets where it does not apply (Unix sockets in tests).
    """
    sock = transport.get_extra_info("socket")
    if sock is None:
        return
    with contextlib.suppress(OSError, AttributeError):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class UpstreamConnection(asyncio.Protocol):
    """One TCP connection to the upstream."""

    transport: asyncio.Transport

    def __init__(self, pool: UpstreamPool) -> None:
        self.pool = pool
        self.state = State.CONNECTING
        self.owner: UpstreamOwner | None = None
        self.exchanges = 0  # how many exchanges it has carried (1+ means reused)
        self.reading_paused = False  # the owner's client is not keeping up
        self.idle_since = 0.0  # when it entered the pool

    # -- asyncio.Protocol -------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = transport = cast(asyncio.Transport, transport)
        set_nodelay(transport)

    def data_received(self, data: bytes) -> None:
        # Only while no exchange owns the connection: an owner gets the reads
        # directly (see _hand_reads_to). An idle connection must not talk;
        # whatever it says, it is done.
        self.close()

    def _hand_reads_to(self, owner: UpstreamOwner | None) -> None:
        """Send reads straight to ``owner.upstream_data`` (None: back to this protocol).

        This saves a Python call per token read on the hot path. The
        instance attribute shadows :meth:`data_received`; ``set_protocol``
        makes the transport look it up again (uvloop keeps the bound method
        it was given, asyncio looks it up on every read).
        """
        if owner is None:
            self.__dict__.pop("data_received", None)
        else:
            self.data_received = owner.upstream_data  # type: ignore[method-assign]
        self.transport.set_protocol(self)

    def eof_received(self) -> bool | None:
        owner = self.owner
        if owner is not None:
            owner.upstream_eof()
        return None  # let the transport close itself

    def connection_lost(self, exc: Exception | None) -> None:
        owner = self.owner
        self._mark_closed()
        if owner is not None:
            owner.upstream_lost(exc)

    def pause_writing(self) -> None:
        if self.owner is not None:
            self.owner.upstream_pause_writing()

    def resume_writing(self) -> None:
        if self.owner is not None:
            self.owner.upstream_resume_writing()

    # -- flow control (the owner's client side drives it) -----------------
    def pause_reading(self) -> None:
        if not self.reading_paused and self.state is State.ACTIVE:
            self.reading_paused = True
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.reading_paused:
            self.reading_paused = False
            if not self.transport.is_closing():
                self.transport.resume_reading()

    # -- pool side --------------------------------------------------------
    @property
    def reused(self) -> bool:
        return self.exchanges > 1

    def close(self) -> None:
        """Close now, dropping anything unsent: this connection is done with."""
        if self.state is not State.CLOSED:
            self._mark_closed()
            self.transport.abort()

    def _mark_closed(self) -> None:
        previous = self.state
        self.state = State.CLOSED
        self.owner = None
        self._hand_reads_to(None)
        if previous is State.IDLE:
            self.pool.forget(self)
        elif previous is State.ACTIVE:
            self.pool.active -= 1


class UpstreamPool:
    """Keep-alive connections to one upstream."""

    def __init__(
        self,
        address: UpstreamAddress,
        *,
        connect_timeout: float,
        keepalive_timeout: float,
        max_idle: int,
        metrics: Metrics,
        ticker: Ticker,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.address = address
        self.name = str(address)  # the metrics label, made once
        self.connect_timeout = connect_timeout
        self.keepalive_timeout = keepalive_timeout
        self.max_idle = max_idle
        self.metrics = metrics
        self.ssl_context = ssl_context
        self._ticker = ticker
        # Idle connections expire a tick early, so that they are always gone
        # before the upstream's own keep-alive timeout closes them.
        self._idle_limit = max(keepalive_timeout - ticker.interval, keepalive_timeout / 2)
        self._idle: list[UpstreamConnection] = []  # oldest first; reuse takes the newest
        self.active = 0
        # Balancing and health: requests assigned and not finished, passive
        # ejection after connect failures, and the active check's verdict.
        self.outstanding = 0
        self.failures = 0
        self.ejected_until = 0.0
        self.healthy = True

    def available(self, now: float) -> bool:
        """Neither ejected after connect failures nor failing its health check."""
        return self.healthy and now >= self.ejected_until

    def connect_failed(self, now: float) -> None:
        """Eject for a back-off that doubles with each failure in a row (1 s .. 30 s)."""
        self.failures += 1
        backoff = min(MAX_EJECTION, 2.0 ** (self.failures - 1))
        self.ejected_until = now + backoff
        log.warning(
            "upstream %s ejected for %g s after %d failed connect%s in a row",
            self.address,
            backoff,
            self.failures,
            "" if self.failures == 1 else "s",
        )

    def connect_succeeded(self) -> None:
        if self.failures:
            log.info("upstream %s is back", self.address)
        self.failures = 0
        self.ejected_until = 0.0

    @property
    def idle_count(self) -> int:
        return len(self._idle)

    async def acquire(self, owner: UpstreamOwner, *, fresh: bool = False) -> UpstreamConnection:
        """An ``ACTIVE`` connection reporting to ``owner``; reuse unless ``fresh``.

        Raises :class:`ConnectTimeout` or :class:`ConnectError`.
        """
        if not fresh:
            conn = self.acquire_idle(owner)
            if conn is not None:
                return conn
        return self._activate(await self._connect(), owner)

    def acquire_idle(self, owner: UpstreamOwner) -> UpstreamConnection | None:
        """The most recently pooled open connection, ``ACTIVE`` for ``owner``; or None."""
        idle = self._idle
        now = time.monotonic()
        while idle:
            conn = idle.pop()
            # Past its age (the tick may run late under load): never reused.
            if not conn.transport.is_closing() and now - conn.idle_since < self._idle_limit:
                self.metrics.upstream_reused += 1
                return self._activate(conn, owner)
            conn.close()
        return None

    def _activate(self, conn: UpstreamConnection, owner: UpstreamOwner) -> UpstreamConnection:
        conn.state = State.ACTIVE
        conn.owner = owner
        conn._hand_reads_to(owner)
        conn.exchanges += 1
        self.active += 1
        return conn

    async def _connect(self) -> UpstreamConnection:
        loop = asyncio.get_running_loop()
        self.metrics.upstream_connects += 1
        try:
            async with asyncio.timeout(self.connect_timeout):
                _, conn = await loop.create_connection(
                    lambda: UpstreamConnection(self),
                    self.address.host,
                    self.address.port,
                    ssl=self.ssl_context,
                    server_hostname=self.address.host if self.ssl_context else None,
                )
        except TimeoutError:
            self.metrics.upstream_connect_errors += 1
            self.connect_failed(time.monotonic())
            raise ConnectTimeout(f"connect to {self.address} timed out") from None
        except ssl.SSLError as exc:
            self.metrics.upstream_connect_errors += 1
            self.connect_failed(time.monotonic())
            reason = exc.reason or str(exc)
            raise ConnectError(f"TLS handshake with {self.address} failed: {reason}") from None
        except OSError as exc:
            self.metrics.upstream_connect_errors += 1
            self.connect_failed(time.monotonic())
            reason = exc.strerror or str(exc) or type(exc).__name__
            raise ConnectError(f"connect to {self.address} failed: {reason}") from None
        self.connect_succeeded()
        return conn

    async def open_stream(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """A new connection as streams, for relay's own small requests (health, models)."""
        address = self.address
        return await asyncio.open_connection(
            address.host,
            address.port,
            ssl=self.ssl_context,
            server_hostname=address.host if self.ssl_context else None,
        )

    def release(self, conn: UpstreamConnection, *, reusable: bool) -> None:
        """Hand back an ``ACTIVE`` connection: pooled if reusable and there is room.

        Only a clean connection enters the pool: reading (a pause set for a
        slow client ends with its exchange), nothing left unsent, not closing.
        """
        if (
            not reusable
            or conn.state is not State.ACTIVE
            or conn.transport.is_closing()
            or conn.transport.get_write_buffer_size()
            or len(self._idle) >= self.max_idle
        ):
            conn.close()
            return
        self.active -= 1
        conn.owner = None
        conn._hand_reads_to(None)
        conn.resume_reading()
        conn.state = State.IDLE
        conn.idle_since = time.monotonic()
        self._idle.append(conn)
        self._ticker.schedule(self, conn.idle_since + self._idle_limit)

    def discard(self, conn: UpstreamConnection) -> None:
        """Close an ``ACTIVE`` connection that must never be reused."""
        self.release(conn, reusable=False)

    def on_tick(self, now: float) -> float:
        """Close the connections idle for too long (the oldest are first)."""
        idle = self._idle
        while idle and now - idle[0].idle_since >= self._idle_limit:
            idle[0].close()  # forget() takes it off the list
        return idle[0].idle_since + self._idle_limit if idle else 0.0

    def forget(self, conn: UpstreamConnection) -> None:
        """Drop ``conn`` from the idle list (it closed or expired)."""
        with contextlib.suppress(ValueError):
            self._idle.remove(conn)

    def close(self) -> None:
        """Close every idle connection (shutdown)."""
        for conn in list(self._idle):
            conn.close()
        self._ticker.unwatch(self)


class Balancer:
    """Picks an upstream for each request among a set of pools.

    ``least-requests`` (the default) sends each request to the pool with the
    fewest requests in flight: LLM streams last from seconds to minutes, so
    counting them beats counting connections or taking turns.
    ``random-two`` samples two pools and takes the less busy one ("power of
    two choices"), which scales to large fleets; ``round-robin`` takes turns.
    Ejected or unhealthy pools are skipped while any other is available;
    when none is, all are tried rather than failing at once.
    """

    def __init__(self, policy: str) -> None:
        self.policy = policy
        self._turn = 0
        self._random = random.Random()

    def choose(
        self, candidates: Sequence[UpstreamPool], exclude: set[UpstreamPool]
    ) -> UpstreamPool | None:
        if len(candidates) == 1:
            # One upstream (the usual deployment): every policy takes it, whether
            # it is available or not; only the turn moves on, as below.
            pool = candidates[0]
            if pool in exclude:
                return None
            self._turn += 1
            return pool
        remaining = [pool for pool in candidates if pool not in exclude]
        if not remaining:
            return None
        now = time.monotonic()
        pools = [pool for pool in remaining if pool.available(now)] or remaining
        self._turn += 1
        if self.policy == "round-robin" or len(pools) == 1:
            return pools[self._turn % len(pools)]
        if self.policy == "random-two":
            first, second = self._random.sample(pools, 2)
            return first if first.outstanding <= second.outstanding else second
        # least-requests; ties broken by turn so equal pools share the load
        start = self._turn % len(pools)
        rotated = pools[start:] + pools[:start]
        return min(rotated, key=lambda pool: pool.outstanding)


async def fetch(
    pool: UpstreamPool,
    target: bytes,
    headers: Sequence[tuple[bytes, bytes]],
    *,
    timeout: float,
    limit: int,
) -> tuple[int, bytes]:
    """``GET target`` on a new connection to ``pool``'s upstream: ``(status, body)``.

    For relay's own small requests (the model list), never on the hot path.
    Raises ``OSError``, ``TimeoutError``, ``h11.ProtocolError``, or
    ``ValueError`` when the body is longer than ``limit``.
    """
    async with asyncio.timeout(timeout):
        reader, writer = await pool.open_stream()
        try:
            conn = h11.Connection(h11.CLIENT)
            request = h11.Request(method=b"GET", target=target, headers=list(headers))
            writer.write(conn.send(request) + conn.send(h11.EndOfMessage()))
            status = 0
            body = bytearray()
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    conn.receive_data(await reader.read(65536))
                elif isinstance(event, h11.Response):
                    status = event.status_code
                elif isinstance(event, h11.Data):
                    body += event.data
                    if len(body) > limit:
                        raise ValueError(f"longer than {limit} bytes")
                elif isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
                    return status, bytes(body)
        finally:
            writer.close()


#: How long relay waits for each upstream's model list.
MODEL_LIST_TIMEOUT = 5.0


async def fetch_model_lists(
    pools: Iterable[UpstreamPool], target: bytes, headers: Sequence[tuple[bytes, bytes]]
) -> list[list[dict[str, Any]]]:
    """Every upstream's model list, asked at once (each bounded in time and size).

    An upstream that fails or answers something else is logged and left out.
    """
    pools = list(pools)
    answers = await asyncio.gather(
        *(
            fetch(
                pool,
                target,
                [(b"host", pool.address.authority.encode("ascii")), *headers],
                timeout=MODEL_LIST_TIMEOUT,
                limit=MAX_MODEL_LIST_BYTES,
            )
            for pool in pools
        ),
        return_exceptions=True,
    )
    lists = []
    for pool, answer in zip(pools, answers, strict=True):
        entries = None
        if isinstance(answer, tuple) and answer[0] == 200:
            entries = parse_model_list(answer[1])
        if entries is None:
            problem = answer if isinstance(answer, BaseException) else "no model list"
            log.warning("upstream %s: %s for %r", pool.address, problem, target)
        else:
            lists.append(entries)
    return lists


class Router:
    """Which pools may serve a request: the default set, or a model's route."""

    def __init__(
        self,
        pools: dict[UpstreamAddress, UpstreamPool],
        default: Sequence[UpstreamAddress],
        routes: Sequence[tuple[str, Sequence[UpstreamAddress]]],
        *,
        balancer: Balancer,
        strict: bool,
    ) -> None:
        self.pools = pools
        self.default = [pools[address] for address in default]
        self.routes = {model: [pools[a] for a in targets] for model, targets in routes}
        self.balancer = balancer
        self.strict = strict

    @property
    def routes_by_model(self) -> bool:
        return bool(self.routes)

    def candidates(self, model: str | None) -> list[UpstreamPool] | None:
        """Pools for ``model``; ``None`` when strict routing does not know it."""
        if model is not None and model in self.routes:
            return self.routes[model]
        if self.strict:
            return None
        return self.default

    def close(self) -> None:
        for pool in self.pools.values():
            pool.close()
