"""Sans-IO server-sent events: content decoding, an incremental parser, token timing.

Used by the probe to judge whether an endpoint streams or buffers, as a real
client would see it: :class:`ContentDecoder` removes a ``Content-Encoding``
(gzip, deflate) incrementally, the way httpx and aiohttp do, so events are
timed when they become readable, not when compressed bytes arrive. The parser
follows the WHATWG event-stream rules that matter here: lines end in CRLF, LF
or CR; ``data:`` lines (one optional space after the colon) accumulate; an
empty line dispatches the event; lines starting with ``:`` are comments.
"""

from __future__ import annotations

import json
import math
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Protocol

__all__ = [
    "COALESCED_WITHIN",
    "ContentDecoder",
    "ContentDecodingError",
    "SSEParser",
    "StreamStats",
    "TokenInfo",
    "tokens_in_event",
]

#: Two tokens closer than this arrived together (the bug report's "same millisecond").
COALESCED_WITHIN = 0.001


class SSEError(ValueError):
    """The stream is not a well-formed event stream, or an event is too large."""


class ContentDecodingError(ValueError):
    """The body's Content-Encoding is unsupported, or its compressed data is corrupt or cut."""


#: Most decoded bytes one step hands out: a small compressed body cannot become a huge buffer.
DECODED_CHUNK = 64 * 1024


class _Decompressor(Protocol):
    """What this module uses of a ``zlib.decompressobj()``."""

    eof: bool
    unconsumed_tail: bytes
    unused_data: bytes

    def decompress(self, data: bytes, max_length: int = 0, /) -> bytes: ...


def _zlib_wrapped(head: bytes) -> bool:
    """The first two bytes are a zlib header (RFC 1950 2.2: method 8, FCHECK)."""
    return head[0] & 0x0F == 8 and (head[0] * 256 + head[1]) % 31 == 0


class _Inflate:
    """One zlib stage: ``gzip`` (members may follow one another) or ``deflate``.

    ``deflate`` is meant to be zlib-wrapped (RFC 9110 8.4.1.2), but some servers
    send raw deflate; like urllib3 and httpx, accept both (told apart by the
    zlib header, so the first byte alone is held until the second arrives).
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self._gzip = name in ("gzip", "x-gzip")
        self._head: bytes | None = None if self._gzip else b""
        self._seen_input = False
        self._decoder: _Decompressor = zlib.decompressobj(16 + zlib.MAX_WBITS)

    def feed(self, data: bytes) -> Iterator[bytes]:
        if self._head is not None:
            data = self._head + data
            if len(data) < 2:
                self._head = data
                return
            self._head = None
            wbits = zlib.MAX_WBITS if _zlib_wrapped(data) else -zlib.MAX_WBITS
            self._decoder = zlib.decompressobj(wbits)
        while data:
            if self._decoder.eof:
                if not self._gzip:
                    return  # bytes after the end of a deflate stream mean nothing
                data = data.lstrip(b"\0")  # some servers pad between gzip members
                if not data:
                    return
                self._decoder = zlib.decompressobj(16 + zlib.MAX_WBITS)
            self._seen_input = True
            try:
                output = self._decoder.decompress(data, DECODED_CHUNK)
                while True:
                    if output:
                        yield output
                    if len(output) < DECODED_CHUNK or self._decoder.unconsumed_tail:
                        break
                    # The output filled up with all input taken: zlib may hold more.
                    output = self._decoder.decompress(b"", DECODED_CHUNK)
            except zlib.error as exc:
                raise ContentDecodingError(f"invalid {self.name} data: {exc}") from None
            # Input zlib did not take because the output was full, or the next gzip member.
            data = self._decoder.unconsumed_tail or self._decoder.unused_data

    def finish(self) -> None:
        if self._head or (self._seen_input and not self._decoder.eof):
            raise ContentDecodingError(f"{self.name} data cut short")


class ContentDecoder:
    """Compressed body bytes in (any split), decoded bytes out, at most 64 KiB a piece.

    ``content_encoding`` is the response's header value (several headers joined
    with commas); codings listed in the order they were applied are undone in
    reverse. ``identity`` or an empty value passes bytes through unchanged.
    Raises :class:`ContentDecodingError` for codings it does not know (``br``,
    ``zstd``) and for corrupt data; call :meth:`finish` at the end of the body
    to catch a compressed stream that was cut short.
    """

    SUPPORTED = ("gzip", "x-gzip", "deflate")

    def __init__(self, content_encoding: str) -> None:
        names = [n.strip().lower() for n in content_encoding.split(",")]
        names = [n for n in names if n and n != "identity"]
        unknown = [n for n in names if n not in self.SUPPORTED]
        if unknown:
            raise ContentDecodingError(f"unsupported content-encoding {unknown[0]!r}")
        self.codings = tuple(names)
        self._stages = [_Inflate(name) for name in reversed(names)]

    @property
    def name(self) -> str:
        """The coding as reported to a person: ``identity`` when there is none."""
        return ", ".join(self.codings) or "identity"

    def feed(self, data: bytes) -> Iterator[bytes]:
        """Decode ``data``; yields the decoded pieces as soon as zlib hands them out."""
        pieces: Iterator[bytes] = iter((data,) if data else ())
        for stage in self._stages:
            pieces = _chain(stage, pieces)
        return pieces

    def finish(self) -> None:
        """The body ended: raise :class:`ContentDecodingError` if a stream is incomplete."""
        for stage in self._stages:
            stage.finish()


def _chain(stage: _Inflate, pieces: Iterator[bytes]) -> Iterator[bytes]:
    for piece in pieces:
        yield from stage.feed(piece)


class SSEParser:
    """Bytes in (any split), the ``data`` of complete events out."""

    def __init__(self, max_event_bytes: int = 1024 * 1024) -> None:
        self._buffer = b""
        self._data: list[str] = []
        self._size = 0
        self._max = max_event_bytes
        self._pending_cr = False

    def feed(self, chunk: bytes) -> list[str]:
        """Feed bytes; return the data of every event completed by them."""
        events: list[str] = []
        buffer = self._buffer + chunk
        if self._pending_cr and buffer.startswith(b"\n"):
            buffer = buffer[1:]  # the LF of a CRLF split across feeds
        self._pending_cr = False
        start = 0
        length = len(buffer)
        while start < length:
            cr = buffer.find(b"\r", start)
            lf = buffer.find(b"\n", start)
            if cr < 0 and lf < 0:
                break
            if cr >= 0 and (lf < 0 or cr < lf):
                end = cr
                if cr + 1 < length:
                    start_next = cr + 2 if buffer[cr + 1 : cr + 2] == b"\n" else cr + 1
                else:
                    start_next = cr + 1
                    self._pending_cr = True
            else:
                end = lf
                start_next = lf + 1
            self._line(buffer[start:end], events)
            start = start_next
        self._buffer = buffer[start:]
        if len(self._buffer) + self._size > self._max:
            raise SSEError("event too large")
        return events

    def _line(self, line: bytes, events: list[str]) -> None:
        if not line:
            if self._data:
                events.append("\n".join(self._data))
            self._data = []
            self._size = 0
            return
        if line.startswith(b":"):
            return
        name, _, value = line.partition(b":")
        if name != b"data":
            return
        if value.startswith(b" "):
            value = value[1:]
        self._size += len(value)
        if self._size > self._max:
            raise SSEError("event too large")
        self._data.append(value.decode("utf-8", "replace"))


@dataclass(frozen=True)
class TokenInfo:
    """What one event carried: tokens, the end marker, or an error."""

    tokens: int = 0
    done: bool = False
    error: str | None = None


def tokens_in_event(data: str) -> TokenInfo:
    """Count the tokens of an OpenAI-style chunk (chat ``content`` and ``reasoning_content``,
    or completions ``text``); recognize ``[DONE]`` and error objects."""
    if data.strip() == "[DONE]":
        return TokenInfo(done=True)
    try:
        document = json.loads(data)
    except ValueError:
        return TokenInfo()
    if not isinstance(document, dict):
        return TokenInfo()
    error = document.get("error")
    if error:
        message = error.get("message") if isinstance(error, dict) else str(error)
        return TokenInfo(error=str(message))
    choices = document.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        return TokenInfo()
    choice = choices[0]
    delta = choice.get("delta")
    if isinstance(delta, dict):
        if delta.get("content") or delta.get("reasoning_content"):
            return TokenInfo(tokens=1)
        return TokenInfo()
    return TokenInfo(tokens=1 if choice.get("text") else 0)


def _percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    rank = max(0, math.ceil(fraction * len(ordered)) - 1)
    return ordered[rank]


@dataclass
class StreamStats:
    """Arrival times of tokens for one request, and what they say."""

    started: float
    arrivals: list[float] = field(default_factory=list)

    def token(self, when: float, count: int = 1) -> None:
        self.arrivals.extend([when] * count)

    @property
    def count(self) -> int:
        return len(self.arrivals)

    @property
    def ttft(self) -> float | None:
        return self.arrivals[0] - self.started if self.arrivals else None

    @property
    def gaps(self) -> list[float]:
        a = self.arrivals
        return [a[i + 1] - a[i] for i in range(len(a) - 1)]

    @property
    def coalesced(self) -> int:
        """Tokens that arrived within 1 ms of the previous one."""
        return sum(1 for gap in self.gaps if gap < COALESCED_WITHIN)

    def gap_summary(self) -> dict[str, float] | None:
        gaps = self.gaps
        if not gaps:
            return None
        return {
            "avg": sum(gaps) / len(gaps),
            "p50": _percentile(gaps, 0.5),
            "p99": _percentile(gaps, 0.99),
            "max": max(gaps),
        }

    @property
    def buffered(self) -> bool:
        """Most tokens arrived together: something on the way holds the stream back."""
        gaps = len(self.gaps)
        return gaps >= 2 and self.coalesced * 2 >= gaps

    @property
    def verdict(self) -> str:
        return "BUFFERED" if self.buffered else "streaming"
