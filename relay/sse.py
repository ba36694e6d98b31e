"""Sans-IO server-sent events: an incremental parser and token-timing statistics.

Used by the probe to judge whether an endpoint streams or buffers. The parser
follows the WHATWG event-stream rules that matter here: lines end in CRLF, LF
or CR; ``data:`` lines (one optional space after the colon) accumulate; an
empty line dispatches the event; lines starting with ``:`` are comments.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

__all__ = ["COALESCED_WITHIN", "SSEParser", "StreamStats", "TokenInfo", "tokens_in_event"]

#: Two tokens closer than this arrived together (the bug report's "same millisecond").
COALESCED_WITHIN = 0.001


class SSEError(ValueError):
    """The stream is not a well-formed event stream, or an event is too large."""


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
