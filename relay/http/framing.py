"""Sans-IO body framers: find where a message body ends, without copying it.

h11 parses the response *head*; after that, the raw bytes go through one of
these framers. A framer never rewrites the body: :meth:`BodyFramer.feed`
only says how many bytes of a read belong to the current body, so the caller
can forward exactly those bytes (same chunk sizes, extensions and trailers).

The one exception is :class:`ChunkedFramer` with ``dechunk=True``, used for
HTTP/1.0 clients, which cannot take chunked frames (RFC 9112 §7.1): it also
hands out the payload pieces.

Strictness follows RFC 9112 §7.1: a chunk-size line is ``1*HEXDIG [ext] CRLF``,
chunk data is followed by CRLF, trailer lines are field lines, and a bare LF
is an error. Every line has a length bound, so a hostile peer cannot make a
framer buffer without limit. The only state a framer keeps between reads is
a partial line (bounded) and a few integers.
"""

from __future__ import annotations

import re

__all__ = [
    "LAST_CHUNK",
    "BodyFramer",
    "BodyKind",
    "ChunkedFramer",
    "ClientFraming",
    "CloseFramer",
    "FramingError",
    "IncompleteBody",
    "LengthFramer",
    "ResponsePlan",
    "encode_chunk",
    "plan_response",
]

#: The terminating chunk with an empty trailer section.
LAST_CHUNK = b"0\r\n\r\n"

#: Longest chunk-size line accepted, extensions included (nginx and Envoy
#: use a few KiB as well; real servers send ``"%x\r\n"``).
MAX_CHUNK_LINE = 4096

# 16 hex digits can exceed a signed 64-bit size; the value is checked too.
_MAX_CHUNK_SIZE = 2**63 - 1

# chunk-size [ chunk-ext ] CRLF, with BWS before ";" (RFC 9112 §7.1.1).
# Extension bytes are VCHAR / obs-text / SP / HTAB; no CTLs, no bare CR/LF.
_SIZE_LINE = re.compile(rb"([0-9A-Fa-f]{1,16})[ \t]*(?:;[\t\x20-\x7e\x80-\xff]*)?\r\n")
_SIZE_LINE_PREFIX = re.compile(rb"(?:[0-9A-Fa-f]{1,16}[ \t]*(?:;[\t\x20-\x7e\x80-\xff]*)?)?\r?")
#: The chunk-size lines of the fast path: canonical lower-case hex (no
#: leading zero) for 1..4095, what uvicorn and h11 write for token-sized
#: chunks. One dict lookup replaces a hex check and int(); other lines
#: (upper case, leading zeros, bigger chunks, extensions) take the general path.
_FAST_SIZES = {b"%x" % size: size for size in range(1, 4096)}
# field-name ":" field-value CRLF; a leading SP/HTAB would be obs-fold.
_TRAILER_LINE = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+:[\t\x20-\x7e\x80-\xff]*\r\n")
_TRAILER_LINE_PREFIX = re.compile(
    rb"(?:[!#$%&'*+\-.^_`|~0-9A-Za-z]+(?::[\t\x20-\x7e\x80-\xff]*)?)?\r?"
)


class FramingError(ValueError):
    """The body bytes do not follow the framing their head announced."""


class IncompleteBody(FramingError):
    """The connection ended before the body did (a truncated message)."""


def encode_chunk(data: bytes) -> bytes:
    """One chunk carrying ``data`` (which must not be empty)."""
    return b"%x\r\n%b\r\n" % (len(data), data)


class BodyFramer:
    """Base of the framers: ``complete`` turns true at the body's last byte.

    ``reusable`` says whether the connection can carry another message once
    this body is complete (false for a body delimited by closing).
    """

    complete: bool = False
    reusable: bool = True

    def feed(self, data: bytes) -> int:
        """Consume a read; return how many of its leading bytes are body.

        Fewer than ``len(data)`` means the body completed inside this read
        and the rest belongs to whatever comes next. Raises
        :class:`FramingError` on bytes that break the framing.
        """
        raise NotImplementedError

    def feed_eof(self) -> None:
        """The peer closed; raise :class:`IncompleteBody` if the body is not done."""
        if not self.complete:
            raise IncompleteBody("connection closed before the end of the body")


class LengthFramer(BodyFramer):
    """A body of exactly ``Content-Length`` bytes."""

    def __init__(self, length: int) -> None:
        if length < 0:
            raise ValueError("length must not be negative")
        self.remaining = length
        self.complete = length == 0

    def feed(self, data: bytes) -> int:
        remaining = self.remaining
        taken = len(data)
        if taken >= remaining:
            taken = remaining
            self.complete = True
        self.remaining = remaining - taken
        return taken


class CloseFramer(BodyFramer):
    """A body that ends when the connection closes (no length, not chunked)."""

    reusable = False

    def feed(self, data: bytes) -> int:
        return len(data)

    def feed_eof(self) -> None:
        self.complete = True


# ChunkedFramer states
_SIZE = 0  # inside a chunk-size line (partial line kept in _line)
_DATA = 1  # inside chunk data, _remaining bytes to go
_DATA_CR = 2  # expecting the CR after chunk data
_DATA_LF = 3  # expecting the LF after chunk data
_TRAILER = 4  # inside the trailer section (partial line kept in _line)
_DONE = 5


class ChunkedFramer(BodyFramer):
    """``Transfer-Encoding: chunked``, strictly per RFC 9112 §7.1.

    With ``dechunk=True`` the chunk payloads of each :meth:`feed` are left in
    :attr:`payload` (a list the caller drains), for HTTP/1.0 clients.
    """

    def __init__(self, *, dechunk: bool = False, max_trailer_bytes: int = 65536) -> None:
        self._state = _SIZE
        self._line = b""
        self._remaining = 0
        self._trailer_bytes = 0
        self._max_trailer_bytes = max_trailer_bytes
        self.payload: list[bytes] | None = [] if dechunk else None
        # Between whole chunks and not dechunking: the next read may take the fast path.
        self._fast = not dechunk

    def feed(self, data: bytes) -> int:
        pos = 0
        end = len(data)
        if self._fast:
            # The common read: whole chunks with a canonical size line (see
            # _FAST_SIZES). Anything else falls through to the state machine
            # at the same position, which judges it strictly.
            sizes = _FAST_SIZES
            while True:
                eol = data.find(b"\r\n", pos)
                if eol < 0:
                    break
                size = sizes.get(data[pos:eol])
                if size is None:
                    break
                after = eol + 2 + size
                if data[after : after + 2] != b"\r\n":
                    break
                pos = after + 2
                if pos == end:
                    return end
        payload = self.payload
        while pos < end:
            state = self._state
            if state == _DATA:
                take = end - pos
                if take > self._remaining:
                    take = self._remaining
                if payload is not None:
                    payload.append(data[pos : pos + take])
                pos += take
                self._remaining -= take
                if self._remaining == 0:
                    self._state = _DATA_CR
            elif state == _SIZE:
                pos = self._take_line(data, pos, MAX_CHUNK_LINE, _SIZE_LINE_PREFIX)
                if self._line.endswith(b"\n"):
                    self._end_size_line()
            elif state == _DATA_CR:
                if data[pos] != 13:
                    raise FramingError("chunk data not followed by CRLF")
                pos += 1
                self._state = _DATA_LF
            elif state == _DATA_LF:
                if data[pos] != 10:
                    raise FramingError("chunk data not followed by CRLF")
                pos += 1
                self._state = _SIZE
            elif state == _TRAILER:
                pos = self._take_line(data, pos, self._max_trailer_bytes, _TRAILER_LINE_PREFIX)
                if self._line.endswith(b"\n"):
                    self._end_trailer_line()
            else:  # _DONE
                break
        self._fast = payload is None and self._state == _SIZE and not self._line
        return pos

    @property
    def between_chunks(self) -> bool:
        """Whether the bytes fed so far end right after a whole chunk (or at the start)."""
        return self._state == _SIZE and not self._line

    def _take_line(self, data: bytes, pos: int, limit: int, prefix: re.Pattern[bytes]) -> int:
        """Append to the partial line up to and including LF; return the new position."""
        eol = data.find(b"\n", pos)
        stop = len(data) if eol < 0 else eol + 1
        line = self._line + data[pos:stop]
        if len(line) > limit:
            raise FramingError("chunk-size or trailer line too long")
        if eol < 0 and prefix.fullmatch(line) is None:
            # Fail on the first bad byte, not when the line finally ends.
            raise FramingError(f"invalid chunk framing near {line[:32]!r}")
        self._line = line
        return stop

    def _end_size_line(self) -> None:
        line = self._line
        self._line = b""
        match = _SIZE_LINE.fullmatch(line)
        if match is None:
            raise FramingError(f"invalid chunk-size line {line[:32]!r}")
        size = int(match.group(1), 16)
        if size > _MAX_CHUNK_SIZE:
            raise FramingError("chunk size out of range")
        if size:
            self._remaining = size
            self._state = _DATA
        else:
            self._state = _TRAILER

    def _end_trailer_line(self) -> None:
        line = self._line
        self._line = b""
        if line == b"\r\n":
            self._state = _DONE
            self.complete = True
            return
        self._trailer_bytes += len(line)
        if self._trailer_bytes > self._max_trailer_bytes:
            raise FramingError("trailer section too large")
        if _TRAILER_LINE.fullmatch(line) is None:
            raise FramingError(f"invalid trailer line {line[:32]!r}")


# -- the response-framing decision -------------------------------------------------


class BodyKind:
    """How the upstream delimits a response body (after h11 parsed its head)."""

    NONE = "none"  # HEAD, 1xx, 204, 304: no body whatever the headers say
    CHUNKED = "chunked"
    LENGTH = "length"
    CLOSE = "close"  # neither: the body ends when the upstream closes


class ClientFraming:
    """How relay delimits the body it writes to the client."""

    NONE = "none"
    SAME = "same"  # forward the upstream's bytes as they are (chunks or length)
    DECHUNK = "dechunk"  # HTTP/1.0 client: chunk payloads only, end by closing
    RECHUNK = "rechunk"  # close-delimited upstream, 1.1 client: wrap each read in a chunk
    CLOSE = "close"  # close-delimited both ways (HTTP/1.0 client)


class ResponsePlan:
    """What :func:`plan_response` decided; plain data, no I/O."""

    __slots__ = ("body", "client_framing", "framing_headers", "keep_client", "keep_trailer")

    def __init__(
        self,
        body: str,
        client_framing: str,
        framing_headers: list[tuple[bytes, bytes]],
        *,
        keep_client: bool,
        keep_trailer: bool,
    ) -> None:
        self.body = body
        self.client_framing = client_framing
        self.framing_headers = framing_headers
        self.keep_client = keep_client
        self.keep_trailer = keep_trailer

    def __repr__(self) -> str:
        return (
            f"ResponsePlan({self.body}, {self.client_framing}, {self.framing_headers}, "
            f"keep_client={self.keep_client}, keep_trailer={self.keep_trailer})"
        )


def plan_response(
    *,
    status: int,
    head_request: bool,
    chunked: bool,
    length: int | None,
    client_http_version: bytes,
    client_may_stay: bool,
) -> ResponsePlan:
    """Decide how a response body is framed towards the client (RFC 9112 §6.3).

    ``chunked`` and ``length`` are the upstream's framing as h11 parsed it.
    The framing header fields the client gets come only from this decision,
    never from what survived hop-by-hop filtering (an upstream whose
    ``Connection`` names ``Content-Length`` must not leave the client with a
    body it cannot delimit). ``client_may_stay`` says whether the request was
    complete and did not ask to close; an HTTP/1.0 client always closes.
    """
    client_v11 = client_http_version == b"1.1"
    keep_client = client_v11 and client_may_stay
    if head_request or status in (204, 304) or 100 <= status < 200:
        headers: list[tuple[bytes, bytes]] = []
        # A HEAD or 304 answer may say how long the body would have been.
        if status != 204 and chunked and client_v11:
            headers.append((b"transfer-encoding", b"chunked"))
        elif status != 204 and length is not None:
            headers.append((b"content-length", b"%d" % length))
        return ResponsePlan(
            BodyKind.NONE, ClientFraming.NONE, headers, keep_client=keep_client, keep_trailer=False
        )
    if chunked:
        if client_v11:
            return ResponsePlan(
                BodyKind.CHUNKED,
                ClientFraming.SAME,
                [(b"transfer-encoding", b"chunked")],
                keep_client=keep_client,
                keep_trailer=True,  # the trailer section is forwarded too
            )
        return ResponsePlan(
            BodyKind.CHUNKED, ClientFraming.DECHUNK, [], keep_client=False, keep_trailer=False
        )
    if length is not None:
        return ResponsePlan(
            BodyKind.LENGTH,
            ClientFraming.SAME,
            [(b"content-length", b"%d" % length)],
            keep_client=keep_client,
            keep_trailer=False,
        )
    if client_v11:
        # Re-framed as chunks, so that a cut upstream shows as a missing last chunk.
        return ResponsePlan(
            BodyKind.CLOSE,
            ClientFraming.RECHUNK,
            [(b"transfer-encoding", b"chunked")],
            keep_client=keep_client,
            keep_trailer=False,
        )
    return ResponsePlan(
        BodyKind.CLOSE, ClientFraming.CLOSE, [], keep_client=False, keep_trailer=False
    )
