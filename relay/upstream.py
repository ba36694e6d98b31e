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
import socket
import ssl
from typing import TYPE_CHECKING, Protocol, cast

from .config import UpstreamAddress

if TYPE_CHECKING:
    from .metrics import Metrics

__all__ = ["ConnectError", "ConnectTimeout", "UpstreamConnection", "UpstreamPool"]

log = logging.getLogger("relay.error")


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
        self._expiry: asyncio.TimerHandle | None = None

    # -- asyncio.Protocol -------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = transport = cast(asyncio.Transport, transport)
        set_nodelay(transport)

    def data_received(self, data: bytes) -> None:
        owner = self.owner
        if owner is not None:
            owner.upstream_data(data)
        else:
            # An idle connection must not talk; whatever it says, it is done.
            self.close()

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
        self._cancel_expiry()
        if previous is State.IDLE:
            self.pool.forget(self)
        elif previous is State.ACTIVE:
            self.pool.active -= 1

    def _cancel_expiry(self) -> None:
        if self._expiry is not None:
            self._expiry.cancel()
            self._expiry = None


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
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.address = address
        self.connect_timeout = connect_timeout
        self.keepalive_timeout = keepalive_timeout
        self.max_idle = max_idle
        self.metrics = metrics
        self.ssl_context = ssl_context
        self._idle: list[UpstreamConnection] = []
        self.active = 0

    @property
    def idle_count(self) -> int:
        return len(self._idle)

    async def acquire(self, owner: UpstreamOwner, *, fresh: bool = False) -> UpstreamConnection:
        """An ``ACTIVE`` connection reporting to ``owner``; reuse unless ``fresh``.

        Raises :class:`ConnectTimeout` or :class:`ConnectError`.
        """
        while self._idle and not fresh:
            conn = self._idle.pop()
            conn._cancel_expiry()
            if not conn.transport.is_closing():
                self.metrics.upstream_reused += 1
                return self._activate(conn, owner)
            conn.close()
        return self._activate(await self._connect(), owner)

    def _activate(self, conn: UpstreamConnection, owner: UpstreamOwner) -> UpstreamConnection:
        conn.state = State.ACTIVE
        conn.owner = owner
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
            raise ConnectTimeout(f"connect to {self.address} timed out") from None
        except ssl.SSLError as exc:
            self.metrics.upstream_connect_errors += 1
            reason = exc.reason or str(exc)
            raise ConnectError(f"TLS handshake with {self.address} failed: {reason}") from None
        except OSError as exc:
            self.metrics.upstream_connect_errors += 1
            reason = exc.strerror or str(exc) or type(exc).__name__
            raise ConnectError(f"connect to {self.address} failed: {reason}") from None
        return conn

    def release(self, conn: UpstreamConnection, *, reusable: bool) -> None:
        """Hand back an ``ACTIVE`` connection: pooled if reusable and there is room."""
        if (
            not reusable
            or conn.state is not State.ACTIVE
            or conn.transport.is_closing()
            or len(self._idle) >= self.max_idle
        ):
            conn.close()
            return
        self.active -= 1
        conn.owner = None
        conn.state = State.IDLE
        loop = asyncio.get_running_loop()
        conn._expiry = loop.call_later(self.keepalive_timeout, self._expire, conn)
        self._idle.append(conn)

    def discard(self, conn: UpstreamConnection) -> None:
        """Close an ``ACTIVE`` connection that must never be reused."""
        self.release(conn, reusable=False)

    def _expire(self, conn: UpstreamConnection) -> None:
        conn._expiry = None
        conn.close()

    def forget(self, conn: UpstreamConnection) -> None:
        """Drop ``conn`` from the idle list (it closed or expired)."""
        with contextlib.suppress(ValueError):
            self._idle.remove(conn)

    def close(self) -> None:
        """Close every idle connection (shutdown)."""
        for conn in list(self._idle):
            conn.close()
