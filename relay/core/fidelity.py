"""Stream fidelity on live traffic: one :class:`StreamWatch` per exchange.

The exchange calls in at a few points (each a clearly marked hook line):

* per upstream read, only when the client's transport still holds earlier
  bytes (a *coalesced* read) or an opt-in per-read feature is on
  (``--body-digest``, ``--sse-keepalive``): :meth:`StreamWatch.read`;
* when the response head goes out: :meth:`StreamWatch.head`;
* from the server's deadline tick: :meth:`StreamWatch.keepalive`;
* when the client left mid-response: :meth:`StreamWatch.cancel`, which closes
  the upstream and measures it;
* in the one place an exchange ends: :meth:`StreamWatch.end`, which counts
  the ending and returns the access line's extra fields. The endings counter
  and the access lines therefore agree by construction.

The common path (a client that keeps up, no opt-in flag) pays one
``get_write_buffer_size()`` call and one compare per read, nothing else.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import struct
import termios
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, Protocol

from ..http.fidelity import (
    DIGEST_ALGORITHM,
    KEEPALIVE_CHUNK,
    KEEPALIVE_COMMENT,
    ends_event,
    is_event_stream,
)
from ..http.framing import BodyKind, ChunkedFramer, ClientFraming

if TYPE_CHECKING:
    import asyncio

    from ..config import Config
    from .metrics import Metrics

__all__ = ["StreamWatch", "unread_bytes"]


class _Upstream(Protocol):
    transport: asyncio.Transport


class _Pool(Protocol):
    address: object


def unread_bytes(transport: asyncio.BaseTransport) -> int:
    """Bytes waiting in the socket's receive queue (``FIONREAD``), 0 if unknown."""
    sock = transport.get_extra_info("socket")
    if sock is None:
        return 0
    with contextlib.suppress(OSError, ValueError, AttributeError):
        raw = fcntl.ioctl(sock.fileno(), termios.FIONREAD, b"\0\0\0\0")
        return int(struct.unpack("i", raw)[0])
    return 0


class StreamWatch:
    """What one exchange records for the fidelity metrics and its access line."""

    __slots__ = (
        "_chunked",
        "_framer",
        "_keepalive_bytes",
        "cancel_bytes",
        "cancel_s",
        "coalesced",
        "digest",
        "keepalive_at",
        "keepalive_every",
        "keepalives",
        "last_read",
        "metrics",
        "per_read",
        "sse",
    )

    def __init__(self, config: Config, metrics: Metrics) -> None:
        self.metrics = metrics
        self.digest = hashlib.new(DIGEST_ALGORITHM) if config.body_digest else None
        #: Seconds of upstream silence before a keep-alive comment; 0: off.
        self.keepalive_every = config.sse_keepalive or 0.0
        #: Whether :meth:`read` must see every read, not only coalesced ones.
        self.per_read = config.body_digest or bool(config.sse_keepalive)
        self.sse = False  # the response head announced text/event-stream
        self.coalesced = 0
        self.keepalives = 0
        self.keepalive_at = 0.0  # when the last keep-alive went out (monotonic)
        self.last_read = b""  # the last read forwarded (kept only with --sse-keepalive)
        self.cancel_s: float | None = None
        self.cancel_bytes = 0
        self._framer: ChunkedFramer | None = None
        self._chunked = False  # the body as relay reads it is chunked
        self._keepalive_bytes = b""  # empty: this response gets no keep-alive

    # -- the response head ------------------------------------------------------
    def head(
        self,
        status: int,
        headers: Iterable[tuple[bytes, bytes]],
        body: str,
        client_framing: str,
        framer: object,
    ) -> None:
        """The head went out: decide whether keep-alive comments may follow."""
        self.sse = is_event_stream(headers)
        if not (self.keepalive_every and self.sse and status == 200):
            return
        if body not in (BodyKind.CHUNKED, BodyKind.CLOSE):
            return  # a length-delimited body has no room for bytes of relay's own
        # ``framer`` None: relay's own test stream, which writes whole events.
        self._framer = framer if isinstance(framer, ChunkedFramer) else None
        self._chunked = body == BodyKind.CHUNKED
        # A chunked client gets the comment as a chunk of its own; an HTTP/1.0
        # client (de-chunked or close-delimited) gets the bare comment.
        chunked_client = client_framing in (ClientFraming.SAME, ClientFraming.RECHUNK)
        self._keepalive_bytes = KEEPALIVE_CHUNK if chunked_client else KEEPALIVE_COMMENT

    # -- per read (coalesced, or an opt-in feature) --------------------------------
    def read(self, data: bytes, taken: int, backlog: int, pool: _Pool | None) -> None:
        """An upstream read of which ``taken`` bytes are about to be written.

        ``backlog`` is what the client's transport still held before the write:
        non-zero means this read could not go out on its own. ``pool`` is the
        upstream's (``None``: relay's own test stream, counted as ``relay``).
        """
        if backlog:
            self.coalesced += 1
            metrics = self.metrics
            label = "relay" if pool is None else str(pool.address)
            metrics.coalesced_reads[(label,)] += 1
            metrics.coalesced_backlog.observe(backlog)
        digest = self.digest
        if digest is not None:
            digest.update(data if taken == len(data) else memoryview(data)[:taken])
        if self._keepalive_bytes:
            self.last_read = data

    # -- keep-alive comments (from the server's deadline tick) --------------------
    @property
    def keepalive_on(self) -> bool:
        """Whether this response may get keep-alive comments."""
        return bool(self._keepalive_bytes)

    def keepalive_due(self, last_upstream_byte: float) -> float:
        """When the next keep-alive comment may be due (see :meth:`keepalive`)."""
        return max(last_upstream_byte, self.keepalive_at) + self.keepalive_every

    def keepalive(
        self, write: Callable[[bytes], object], now: float, last_upstream_byte: float
    ) -> None:
        """Send one comment if the upstream has been silent long enough and the
        body forwarded so far ends at an event boundary.

        Called only while the client reads (its transport is not paused). Off a
        boundary nothing is sent until the next due time: relay never splits an
        event, and never puts bytes inside one of the upstream's chunks.
        """
        if now - max(last_upstream_byte, self.keepalive_at) < self.keepalive_every:
            return
        self.keepalive_at = now  # also off a boundary: the next check is one period on
        framer = self._framer
        if framer is not None and not framer.between_chunks:
            return
        if not ends_event(self.last_read, chunked=self._chunked):
            return
        write(self._keepalive_bytes)
        self.keepalives += 1
        self.metrics.sse_keepalives += 1

    # -- cancellation -------------------------------------------------------------
    def cancel(self, upstream: _Upstream | None, close: Callable[[], None]) -> None:
        """The client left mid-exchange: close the upstream now and measure that.

        Records the time from this call (the moment relay learned the client
        left) to the upstream connection closed, and the bytes the upstream had
        already sent that relay drops unread (its socket's receive queue).
        """
        if upstream is None:
            return
        started = time.monotonic()
        unread = unread_bytes(upstream.transport)
        close()
        self.cancel_s = time.monotonic() - started
        self.cancel_bytes = unread
        metrics = self.metrics
        metrics.cancel_time.observe(self.cancel_s)
        metrics.cancel_upstream_bytes += unread

    # -- the end --------------------------------------------------------------------
    def end(self, ending: str) -> dict[str, Any]:
        """Count the ending; return the access line's fidelity fields."""
        self.metrics.endings[(ending, "true" if self.sse else "false")] += 1
        self.last_read = b""
        fields: dict[str, Any] = {}
        if self.coalesced:
            fields["coalesced"] = self.coalesced
        if self.keepalives:
            fields["keepalives"] = self.keepalives
        if self.digest is not None:
            fields["body_sha256"] = self.digest.hexdigest()
        if self.cancel_s is not None:
            fields["cancel_ms"] = round(self.cancel_s * 1000, 3)
            fields["cancel_bytes"] = self.cancel_bytes
        return fields
