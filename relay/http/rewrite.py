"""Sans-IO model rewrite: change only the top-level ``model`` value of a JSON body.

The body is never re-serialized, and never decoded as a whole. A
:class:`ModelScanner` is fed the body chunk by chunk as it arrives and finds
the byte span and the value of the last top-level ``model`` member: regular
expressions jump (at C speed) over everything between structural bytes, and
only candidate member names (at most 32 raw bytes, the longest spelling of
``model`` with every letter escaped) and the ``model`` value itself are
decoded, each with ``json.loads`` on its own raw bytes. The work per chunk is
proportional to the chunk, so a huge prompt never holds the event loop for
more than one read's worth of scanning. The rewrite then replaces that span
in the list of chunks (:func:`rewrite_pieces`); whitespace, key order,
escapes, number formatting and nested ``model`` keys (inside ``messages``,
say) stay byte for byte as the client sent them.

What the scanner reads is what ``json.loads(body_bytes)`` reads (the way
FastAPI, and so SGLang, reads a request body):

* a UTF-8 byte order mark is skipped, as ``json.loads`` skips it;
* UTF-16 and UTF-32 bodies (which ``json.loads`` also accepts) are not read:
  the scan says :attr:`ScanStatus.UNREADABLE`, and a caller that must know
  the model (pinning, routing) refuses the body instead of forwarding it;
* member names are compared after JSON unescaping (``"mod\\u0065l"`` is
  ``model``);
* with duplicate top-level ``model`` keys the last one counts, as in Python's
  ``json``; earlier ones are left alone, and the upstream ignores them as it
  would directly.

A body that is not JSON, not an object, or has no top-level string
``model`` is forwarded unchanged.
"""

from __future__ import annotations

import enum
import json
import re
import sys
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field

__all__ = [
    "InspectBudget",
    "ModelMap",
    "ModelMapError",
    "ModelScan",
    "ModelScanner",
    "Rewrite",
    "ScanStatus",
    "load_model_map_file",
    "parse_model_map_item",
    "rewrite_model",
    "rewrite_pieces",
    "scan_body",
]


class ModelMapError(ValueError):
    """A mapping entry or file is invalid."""


@dataclass(frozen=True)
class ModelMap:
    """Which model names the upstream gets instead of what clients ask for.

    ``aliases`` maps a requested name to the forwarded name; ``default``,
    when set, replaces every model name (the single-model sidecar case),
    after aliases are consulted.
    """

    aliases: Mapping[str, str] = field(default_factory=dict)
    default: str | None = None

    def __bool__(self) -> bool:
        return bool(self.aliases) or self.default is not None

    def target(self, requested: str) -> str | None:
        """The forwarded name for ``requested``, or ``None`` to leave it."""
        forwarded = self.aliases.get(requested, self.default)
        return None if forwarded is None or forwarded == requested else forwarded


# -- scanning ------------------------------------------------------------------

#: Longest raw member name (quotes included) that can decode to ``model``:
#: five ``\uXXXX`` escapes and two quotes.
MAX_KEY_BYTES = 32
#: Longest raw ``model`` value relay decodes. Model names are short; a longer
#: value is unreadable rather than a reason to decode megabytes on the loop.
MAX_MODEL_VALUE_BYTES = 64 * 1024
#: Most bytes one scan step looks at: a regular expression crossing a long
#: run is one step, and stays under a millisecond.
SCAN_WINDOW = 64 * 1024
#: Deepest nesting relay follows. Python's ``json`` fails (RecursionError)
#: just below 1000 levels, so an upstream on it rejects such a body anyway.
MAX_DEPTH = 1000


class ScanStatus(enum.Enum):
    FOUND = "found"  # a top-level object with a ``model`` member
    ABSENT = "absent"  # no top-level ``model``: an object without one, or not an object
    INVALID = "invalid"  # not JSON: ``json.loads`` rejects it too
    UNREADABLE = "unreadable"  # JSON relay does not read (UTF-16/32, huge model, deep)


@dataclass(frozen=True)
class ModelScan:
    """What a scan found: the status and, when FOUND, the span and value.

    ``start`` and ``end`` are absolute byte offsets of the last top-level
    ``model`` value in the body; ``value`` is that value as ``json.loads``
    reads it (any JSON type).
    """

    status: ScanStatus
    start: int = 0
    end: int = 0
    value: object = None

    @property
    def model(self) -> str | None:
        """The model name, when the body names one as a string."""
        if self.status is ScanStatus.FOUND and isinstance(self.value, str):
            return self.value
        return None


_WS = re.compile(rb"[ \t\n\r]*+")
# The rest of a string: runs without quote or backslash, and escape pairs.
_STRING_REST = re.compile(rb'[^"\\]*+(?:\\.[^"\\]*+)*+', re.DOTALL)
# Inside a nested value: everything up to the next bracket, whole strings included.
_NESTED_SKIP = re.compile(rb'(?:[^"\[\]{}]++|"[^"\\]*+(?:\\.[^"\\]*+)*+")*+', re.DOTALL)
# The same, also crossing innermost pairs without strings (``{}``, ``[1,2]``):
# they leave the depth as it was, and JSON dense with them would otherwise
# cost a Python step per bracket. Used below MAX_DEPTH only, where a pair
# crossed cannot be the level that goes too deep.
_NESTED_SKIP_PAIRS = re.compile(
    rb'(?:[^"\[\]{}]++|"[^"\\]*+(?:\\.[^"\\]*+)*+"|\{[^"\[\]{}]*+\}|\[[^"\[\]{}]*+\])*+',
    re.DOTALL,
)
_SCALAR = re.compile(rb"[^ \t\n\r,}]*+")

# States of the top-level object reader.
_START, _KEY_OR_END, _KEY, _COLON, _VALUE, _COMMA_OR_END, _AFTER = range(7)
# What is being read inside a member.
_NONE, _IN_KEY, _IN_STRING_VALUE, _IN_NESTED, _IN_NESTED_STRING, _IN_SCALAR = range(6)

_OPEN = frozenset(b"[{")


class ModelScanner:
    """Incremental, sans-IO finder of the top-level ``model`` member of a JSON body.

    Feed the body with :meth:`feed` in pieces of any size (every split point
    gives the same answer), then call :meth:`finish`. Memory held is bounded
    by :data:`MAX_MODEL_VALUE_BYTES` plus a few bytes; the body itself is not
    kept.

    Work in bounded steps: :meth:`add` queues a piece without scanning it,
    and :meth:`advance` scans queued bytes for at most a given number of
    steps (one step is one structural token or one run between them, which
    a regular expression crosses at C speed). Bracket-dense JSON such as
    ``[{},{},...]`` costs a step per bracket, so a caller on an event loop
    scans a few thousand steps per turn and lets other work run between
    turns. The queue holds references to the caller's pieces, not copies.
    """

    def __init__(self) -> None:
        self._offset = 0  # absolute offset of the current chunk's first byte
        self._prefix = b""  # the first bytes, until the encoding is known
        self._encoding_known = False
        self._status: ScanStatus | None = None  # set once the answer is settled
        self._state = _START
        self._inner = _NONE
        self._escape_pending = False  # a string's backslash ended the last chunk
        self._depth = 0
        self._capture: bytearray | None = None  # raw bytes of a key or model value
        self._capture_limit = 0
        self._capture_over = False
        self._key_is_model = False
        self._value_start = 0
        self._found: tuple[int, int, bytes | None] | None = None
        self._queue: deque[tuple[bytes, int]] = deque()  # (piece, offset scanned to)

    # -- public ----------------------------------------------------------
    def feed(self, data: bytes) -> None:
        """Scan the next ``data`` of the body (and anything still queued), all of it."""
        self.add(data)
        self.advance(sys.maxsize)

    def add(self, data: bytes) -> None:
        """Queue the next ``data`` of the body, to be scanned by :meth:`advance`."""
        if self._status is None and data:
            self._queue.append((data, 0))

    @property
    def pending(self) -> bool:
        """Whether queued bytes wait to be scanned."""
        return bool(self._queue)

    def advance(self, steps: int) -> bool:
        """Scan queued bytes for at most about ``steps`` steps; whether all are scanned."""
        queue = self._queue
        while queue and steps > 0:
            if self._status is not None:
                queue.clear()  # settled: the rest cannot change the answer
                break
            data, start = queue.popleft()
            if not self._encoding_known:
                # json.detect_encoding looks at the first four bytes.
                self._prefix += data[start:]
                if len(self._prefix) < 4:
                    continue
                data, start, self._prefix = self._decide_encoding(self._prefix), 0, b""
            window = min(len(data), start + SCAN_WINDOW)  # bounds a regex step's bytes
            end, steps = self._scan(data, start, steps, window)
            if end < len(data):
                queue.appendleft((data, end))
        return not queue

    def finish(self) -> ModelScan:
        """The answer for the whole body fed so far (what is queued is scanned now)."""
        self.advance(sys.maxsize)
        if not self._encoding_known:
            data, self._prefix = self._decide_encoding(self._prefix), b""
            self._scan(data, 0, sys.maxsize, len(data))
        status = self._status
        if status is None:
            if self._state != _AFTER:
                return ModelScan(ScanStatus.INVALID)  # ended inside the object
            if self._found is None:
                return ModelScan(ScanStatus.ABSENT)
            start, end, raw = self._found
            if raw is None:
                return ModelScan(ScanStatus.UNREADABLE)
            try:
                value = json.loads(raw)
            except ValueError:  # UnicodeDecodeError included
                return ModelScan(ScanStatus.INVALID)
            return ModelScan(ScanStatus.FOUND, start, end, value)
        return ModelScan(status)

    # -- internals ---------------------------------------------------------
    def _decide_encoding(self, head: bytes) -> bytes:
        """Settle the encoding from the body's first bytes; the bytes to scan."""
        self._encoding_known = True
        encoding = json.detect_encoding(head)
        if encoding == "utf-8-sig":
            self._offset += 3  # skipped as json.loads skips it; offsets stay absolute
            return head[3:]
        if encoding != "utf-8":
            self._settle(ScanStatus.UNREADABLE)
        return head

    def _settle(self, status: ScanStatus) -> None:
        self._status = status
        self._capture = None

    def _begin_capture(self, limit: int) -> None:
        self._capture = bytearray()
        self._capture_limit = limit
        self._capture_over = False

    def _append(self, piece: bytes) -> None:
        capture = self._capture
        if capture is None or self._capture_over:
            return
        if len(capture) + len(piece) > self._capture_limit:
            self._capture_over = True
            capture.clear()
        else:
            capture += piece

    def _end_key(self, piece: bytes) -> None:
        self._append(piece)
        capture, self._capture = self._capture, None
        self._key_is_model = False
        if capture is not None and not self._capture_over:
            try:
                key = json.loads(bytes(capture))
            except ValueError:
                self._settle(ScanStatus.INVALID)
                return
            self._key_is_model = key == "model"
        self._state = _COLON
        self._inner = _NONE

    def _end_value(self, piece: bytes, end: int) -> None:
        if self._key_is_model:
            self._append(piece)
            raw = None if self._capture_over or self._capture is None else bytes(self._capture)
            self._found = (self._value_start, end, raw)  # the last one wins
        self._capture = None
        self._state = _COMMA_OR_END
        self._inner = _NONE

    def _scan(self, data: bytes, pos: int, steps: int, n: int) -> tuple[int, int]:
        """Scan ``data[pos:n]`` for at most ``steps`` steps: where it stopped, and
        the steps left. Stopping anywhere (``n`` included) is a split point."""
        start = pos
        base = self._offset - pos  # the absolute offset of data[0]
        cap_from = pos  # where this chunk's part of a capture starts
        while pos < n and self._status is None:
            if steps <= 0:
                break
            steps -= 1
            inner = self._inner
            if inner in (_IN_KEY, _IN_STRING_VALUE, _IN_NESTED_STRING):
                if self._escape_pending:
                    self._escape_pending = False
                    pos += 1  # the escaped byte
                    continue
                match = _STRING_REST.match(data, pos, n)
                assert match is not None  # the pattern matches the empty string
                pos = match.end()
                if pos == n:
                    break
                if data[pos] == 0x5C:  # a backslash ends the chunk: its pair follows
                    self._escape_pending = True
                    pos += 1
                    continue
                pos += 1  # the closing quote
                if inner == _IN_KEY:
                    self._end_key(data[cap_from:pos])
                elif inner == _IN_STRING_VALUE:
                    self._end_value(data[cap_from:pos], base + pos)
                else:
                    self._inner = _IN_NESTED
                continue
            if inner == _IN_NESTED:
                skip = _NESTED_SKIP_PAIRS if self._depth < MAX_DEPTH else _NESTED_SKIP
                match = skip.match(data, pos, n)
                assert match is not None
                pos = match.end()
                if pos == n:
                    break
                byte = data[pos]
                pos += 1
                if byte == 0x22:  # a string that goes on in the next chunk
                    self._inner = _IN_NESTED_STRING
                elif byte in _OPEN:
                    self._depth += 1
                    if self._depth > MAX_DEPTH:
                        self._settle(ScanStatus.UNREADABLE)
                else:
                    self._depth -= 1
                    if self._depth == 0:
                        self._end_value(data[cap_from:pos], base + pos)
                continue
            if inner == _IN_SCALAR:
                match = _SCALAR.match(data, pos, n)
                assert match is not None
                pos = match.end()
                if pos < n:
                    self._end_value(data[cap_from:pos], base + pos)
                continue
            # Between tokens of the top-level object.
            match = _WS.match(data, pos, n)
            assert match is not None
            pos = match.end()
            if pos == n:
                break
            byte = data[pos]
            state = self._state
            if state == _START:
                if byte != 0x7B:  # not an object: it has no top-level model
                    self._settle(ScanStatus.ABSENT)
                    break
                self._state = _KEY_OR_END
                pos += 1
            elif state in (_KEY_OR_END, _KEY):
                if byte == 0x22:
                    self._begin_capture(MAX_KEY_BYTES)
                    cap_from = pos
                    self._inner = _IN_KEY
                    pos += 1
                elif byte == 0x7D and state == _KEY_OR_END:
                    self._state = _AFTER
                    pos += 1
                else:
                    self._settle(ScanStatus.INVALID)
            elif state == _COLON:
                if byte != 0x3A:
                    self._settle(ScanStatus.INVALID)
                    break
                self._state = _VALUE
                pos += 1
            elif state == _VALUE:
                if byte in b",}]:":
                    self._settle(ScanStatus.INVALID)
                    break
                self._value_start = base + pos
                if self._key_is_model:
                    self._begin_capture(MAX_MODEL_VALUE_BYTES)
                    cap_from = pos
                if byte == 0x22:
                    self._inner = _IN_STRING_VALUE
                    pos += 1
                elif byte in _OPEN:
                    self._inner = _IN_NESTED
                    self._depth = 1
                    pos += 1
                else:
                    self._inner = _IN_SCALAR
            elif state == _COMMA_OR_END:
                if byte == 0x2C:
                    self._state = _KEY
                elif byte == 0x7D:
                    self._state = _AFTER
                else:
                    self._settle(ScanStatus.INVALID)
                pos += 1
            else:  # _AFTER: only whitespace may follow the object
                self._settle(ScanStatus.INVALID)
        if self._capture is not None and self._status is None:
            self._append(data[cap_from:pos])
        self._offset += pos - start
        return pos, steps


def scan_body(body: bytes) -> ModelScan:
    """:class:`ModelScanner` over a whole ``body`` at once."""
    scanner = ModelScanner()
    scanner.feed(body)
    return scanner.finish()


# -- rewriting -------------------------------------------------------------------


@dataclass(frozen=True)
class Rewrite:
    """What a rewrite did: the body to send (as pieces) and the names involved."""

    pieces: list[bytes]
    requested: str | None = None
    forwarded: str | None = None

    @property
    def body(self) -> bytes:
        return b"".join(self.pieces)

    @property
    def length(self) -> int:
        return sum(len(piece) for piece in self.pieces)

    @property
    def changed(self) -> bool:
        return self.forwarded is not None and self.forwarded != self.requested


def _splice(pieces: list[bytes], start: int, end: int, replacement: bytes) -> list[bytes]:
    """``pieces`` with absolute byte span ``[start, end)`` replaced; other pieces shared."""
    out: list[bytes] = []
    inserted = False
    offset = 0
    for piece in pieces:
        first, last = offset, offset + len(piece)
        offset = last
        if last <= start or first >= end:
            out.append(piece)
            continue
        if first < start:
            out.append(piece[: start - first])
        if not inserted:
            out.append(replacement)
            inserted = True
        if last > end:
            out.append(piece[end - first :])
    return [piece for piece in out if piece]


def rewrite_pieces(pieces: list[bytes], scan: ModelScan, model_map: ModelMap) -> Rewrite:
    """The body held as ``pieces``, with its model rewritten per ``model_map``.

    ``scan`` is the :class:`ModelScanner` result for the same bytes. Only the
    model value's span changes; untouched pieces are the same objects, so
    nothing is copied but the two pieces the span starts and ends in.
    """
    requested = scan.model
    if requested is None:
        return Rewrite(pieces)
    forwarded = model_map.target(requested)
    if forwarded is None:
        return Rewrite(pieces, requested, requested)
    replacement = json.dumps(forwarded, ensure_ascii=False).encode("utf-8")
    return Rewrite(_splice(pieces, scan.start, scan.end, replacement), requested, forwarded)


def rewrite_model(body: bytes, model_map: ModelMap) -> Rewrite:
    """Rewrite the top-level ``model`` of ``body`` per ``model_map`` (see module doc)."""
    return rewrite_pieces([body] if body else [], scan_body(body), model_map)


# -- the server-wide bound on bodies held for inspection -----------------------


class InspectBudget:
    """How many body bytes all requests together may hold for inspection at once.

    A body relay must read before forwarding (aliasing, pinning, routing) is
    held in memory until it is complete; ``--max-body-bytes`` bounds one such
    body, this bounds their sum.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.held = 0

    def hold(self) -> InspectHold:
        """A new, empty hold on this budget for one request."""
        return InspectHold(self)


class InspectHold:
    """One request's share of an :class:`InspectBudget`; release is idempotent."""

    def __init__(self, budget: InspectBudget) -> None:
        self._budget = budget
        self.size = 0

    @property
    def limit(self) -> int:
        """The whole budget's limit: a body above it can never be held."""
        return self._budget.limit

    def add(self, size: int) -> bool:
        """Take ``size`` more bytes; ``False`` (and nothing taken) if over the limit."""
        budget = self._budget
        if budget.held + size > budget.limit:
            return False
        budget.held += size
        self.size += size
        return True

    def release(self) -> None:
        self._budget.held -= self.size
        self.size = 0


def parse_model_map_item(text: str) -> tuple[str, str]:
    """``ALIAS=TARGET`` → ``(alias, target)``; both non-empty."""
    alias, sep, target = text.partition("=")
    alias, target = alias.strip(), target.strip()
    if not sep or not alias or not target:
        raise ModelMapError(f"expected ALIAS=TARGET, got {text!r}")
    return alias, target


def load_model_map_file(content: str) -> dict[str, str]:
    """A JSON object ``{"alias": "target", ...}`` from a mapping file's ``content``."""
    try:
        document = json.loads(content)
    except ValueError as exc:
        raise ModelMapError(f"not valid JSON: {exc}") from None
    if not isinstance(document, dict):
        raise ModelMapError('expected a JSON object {"alias": "target", ...}')
    aliases: dict[str, str] = {}
    for alias, target in document.items():
        if not isinstance(target, str) or not alias or not target:
            raise ModelMapError(f"alias {alias!r} must map to a non-empty string")
        aliases[alias] = target
    return aliases
