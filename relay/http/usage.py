"""Sans-IO usage accounting: the tokens an upstream reports, read after the fact.

relay never parses a response as it streams. The exchange keeps references
to the last reads it already forwarded (no copy, a bounded count); when the
exchange ends, these functions read the usage from them, once, looking at
most at the last ``max_bytes`` (``--max-usage-bytes``). A stream keeps its
last few reads (:class:`StreamTail`), and more only while an event is
unfinished at the end of a read, so that a big final event is kept whole
while thousands of held streams of small events keep a few reads each:

* a non-streaming JSON response (OpenAI ``usage``, or SGLang's native
  ``meta_info``) is parsed whole when relay held all of it; otherwise its
  tail is searched for the ``usage``/``meta_info`` object, which OpenAI and
  SGLang write last (:func:`usage_from_json_tail`);
* a stream (``text/event-stream``) reports its usage in its last event with
  a ``usage`` (SGLang sends one when the request asks for
  ``stream_options.include_usage``; its ``/generate`` stream carries
  ``meta_info`` in every event).
* Without a readable usage, a non-empty response gets an *estimate*, never
  0: a stream's events that carry generated text, counted in the tail and
  scaled by the bytes of the whole stream (events of one stream are of
  similar size); a JSON body's bytes / :data:`BYTES_PER_TOKEN`. Prompt
  tokens are unknown (0). The result is marked ``estimated``.
"""

from __future__ import annotations

import itertools
import json
import re
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from .framing import ChunkedFramer, FramingError

__all__ = [
    "BYTES_PER_TOKEN",
    "MIN_EVENT_READ_BYTES",
    "TAIL_READS",
    "StreamTail",
    "Usage",
    "estimate_json",
    "reads_kept",
    "usage_from_json",
    "usage_from_json_tail",
    "usage_from_stream",
]

#: Items a stream keeps (:class:`StreamTail`: a read, or the reads of one
#: unfinished event). The usage event, ``[DONE]`` and the last chunk may each
#: come in a read of its own, and a usage event cut into reads takes two items.
TAIL_READS = 4
#: Fewest reads a JSON body of unknown size keeps.
JSON_TAIL_READS = 8
#: Average bytes a read of a JSON body is assumed to carry when the count of
#: reads kept is derived from ``--max-usage-bytes``: a big body comes in big reads.
READ_BYTES = 16 * 1024
#: Fewest bytes a read of an unfinished event is assumed to carry: a stream
#: keeps at most ``--max-usage-bytes`` / this many of them, so that an
#: upstream trickling an event byte by byte cannot make the references cost
#: many times the bound.
MIN_EVENT_READ_BYTES = 64
#: Bytes of a JSON body taken for one token when its usage cannot be read
#: (English text runs at about four characters a token).
BYTES_PER_TOKEN = 4
#: Events at the end of a stream where its usage is looked for: the usage
#: event, [DONE], and an empty final chunk or two may follow one another.
LAST_EVENTS = 8
#: Bytes at the end of a stream whose events an estimate counts (and scales).
ESTIMATE_BYTES = 64 * 1024
#: Largest ``usage`` object read from a JSON body's tail.
USAGE_OBJECT_BYTES = 64 * 1024
#: ``"usage"`` names tried in a JSON body's tail, from its end.
USAGE_CANDIDATES = 16
#: Chunk framing a tail may hold besides ``max_bytes`` of payload.
_FRAMING_SLACK = 64 * 1024


def reads_kept(max_bytes: int) -> int:
    """How many reads a JSON body of unknown size keeps (references) to find
    ``max_bytes`` of usage in.

    A count, not bytes, so that keeping one is a C ``deque.append`` per read;
    the bytes held are at most this many reads.
    """
    return max(JSON_TAIL_READS, max_bytes // READ_BYTES)


class _EventReads(deque[bytes]):
    """Consecutive reads of a stream that ended inside an event: one item of a
    :class:`StreamTail`, so that the event's start is kept with its end."""

    __slots__ = ("size",)

    def __init__(self) -> None:
        super().__init__()
        self.size = 0


class StreamTail(deque[bytes | _EventReads]):
    """References to the last reads of an event stream, for its usage: a few
    reads, plus every read of an event still unfinished, up to a bound.

    The exchange hands each read over in one of two ways, by its last byte
    (``data[-1] == 10``, a few bytecodes, no call), so the usual read costs no
    Python call:

    * a read that ends with a line feed: :meth:`append` (deque's own, C). No
      line, so no event, runs on from it. Only the last :data:`TAIL_READS`
      items are kept: the final usage event, ``[DONE]``, the last chunk.
    * a read that ends inside a line: :meth:`mid_line`. Consecutive such
      reads form one item, so an event that runs on from them is kept from
      its start, however many reads it took, up to the read that ends it.

    The line feed stands for an event's end because an event's data line of
    JSON holds none: a read that ends with one ends the event, its data line
    (only the blank line is left), or, chunked, a chunk or a chunk-size line.
    An event of several data lines cut at one of its line ends takes one more
    item; an event cut across chunks could not be read anyway (framing in
    its JSON). Reads of a stream with CR-only line ends all take
    :meth:`mid_line`, and are kept as one unfinished event.

    Reads of unfinished events (all such items together) are kept up to
    ``max_bytes`` (``--max-usage-bytes``: the usage is looked for in no more
    than that, and a bigger event is charged an estimate) and up to
    ``max_bytes`` / :data:`MIN_EVENT_READ_BYTES` reads; beyond, the oldest go
    first. The bound is in bytes, not reads, because these reads cost a
    Python call anyway, and so an event cut into small reads is kept as
    whole as one that came in big reads.
    """

    __slots__ = ("count", "max_bytes", "max_reads", "size")

    def __init__(self, max_bytes: int) -> None:
        super().__init__((), TAIL_READS)
        self.max_bytes = max_bytes
        self.max_reads = max(1, max_bytes // MIN_EVENT_READ_BYTES)
        # Bytes and reads of unfinished events kept: an upper bound (an item
        # that fell off the deque is still counted), made exact by _trim.
        self.size = 0
        self.count = 0

    def mid_line(self, read: bytes) -> None:
        """``read`` ends inside a line: keep it with the reads of its event."""
        last = self[-1] if self else None
        if not isinstance(last, _EventReads):
            last = _EventReads()
            self.append(last)  # the event, and so the item, starts in this read
        last.append(read)
        last.size += len(read)
        self.size += len(read)
        self.count += 1
        if self.size > self.max_bytes or self.count > self.max_reads:
            self._trim(last)

    def _trim(self, last: _EventReads) -> None:
        """Drop the oldest reads of unfinished events until within the bounds;
        the read just kept stays."""
        spans = [item for item in self if isinstance(item, _EventReads)]
        size = sum(span.size for span in spans)
        count = sum(map(len, spans))
        for span in spans:  # the oldest first
            while span and (size > self.max_bytes or count > self.max_reads):
                if span is last and len(span) == 1:
                    break
                dropped = len(span.popleft())
                span.size -= dropped
                size -= dropped
                count -= 1
        self.size = size
        self.count = count

    def reads(self) -> list[bytes]:
        """The reads kept, in order."""
        out: list[bytes] = []
        for item in self:
            if isinstance(item, _EventReads):
                out.extend(item)
            else:
                out.append(item)
        return out


@dataclass(frozen=True)
class Usage:
    """Tokens one exchange used. ``source``: ``reported``, ``estimated`` or ``none``."""

    prompt: int = 0
    completion: int = 0
    source: str = "none"
    model: str | None = None  # the model the upstream's document names, if any

    @property
    def total(self) -> int:
        return self.prompt + self.completion


NO_USAGE = Usage()


def _count(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


def _from_document(document: Any) -> Usage | None:
    """Usage from one decoded JSON document (OpenAI ``usage`` or SGLang ``meta_info``)."""
    if not isinstance(document, dict):
        return None
    model = document.get("model")
    model = model if isinstance(model, str) else None
    for member in _MEMBERS:
        usage = document.get(member)
        if isinstance(usage, dict):
            prompt = _count(usage.get("prompt_tokens"))
            completion = _count(usage.get("completion_tokens"))
            if prompt is not None and completion is not None:
                return Usage(prompt, completion, "reported", model)
    return None


_MEMBERS = ("usage", "meta_info")
_DECODER = json.JSONDecoder()


def _loads(body: bytes) -> Any:
    """``json.loads(body)``, or None when that cannot be a dict; cheaper for the usual
    body (a UTF-8 JSON object) and for a body that is no JSON object at all.

    For a body starting ``{`` and no NUL (no BOM, not UTF-16/32) ``json.loads``
    decodes UTF-8 and reads one document with nothing but JSON whitespace
    after it; this does the same without its dispatch and encoding sniffing.
    """
    first = body[:1]
    if first == b"{" and body[1:2] != b"\x00":
        text = body.decode("utf-8", "surrogatepass")
        document, end = _DECODER.raw_decode(text)
        if end != len(text) and text[end:].strip(" \t\n\r"):
            raise ValueError("extra data after the JSON document")
        return document
    if first and first not in _MAY_START_AN_OBJECT:
        # Whatever the rest, no JSON object (the only document with a usage)
        # starts here: json.loads would fail, or give a list, string or number.
        return None
    return json.loads(body)


#: First bytes of a body that may still be a JSON object: ``{``, JSON
#: whitespace, and those of a BOM or of UTF-16/32 (json.loads sniffs these).
_MAY_START_AN_OBJECT = b"{ \t\n\r\x00\xef\xfe\xff"


def _dechunk(data: bytes) -> bytes | None:
    framer = ChunkedFramer(dechunk=True)
    try:
        framer.feed(data)
    except FramingError:
        return None
    assert framer.payload is not None
    return b"".join(framer.payload) if framer.complete else None


def usage_from_json(reads: Sequence[bytes], *, chunked: bool, max_bytes: int) -> Usage:
    """The usage of a whole non-streaming body, given as the reads that carried it."""
    if sum(map(len, reads)) > max_bytes + _FRAMING_SLACK:
        return NO_USAGE
    body: bytes | None = b"".join(reads)
    if chunked:
        body = _dechunk(body)
    if body is None or len(body) > max_bytes:
        return NO_USAGE
    try:
        document = _loads(body)
    except ValueError:  # not JSON, not UTF-8, or compressed
        return NO_USAGE
    return _from_document(document) or NO_USAGE


_MEMBER_NAMES = (b'"usage"', b'"meta_info"')


def usage_from_json_tail(reads: Sequence[bytes], *, max_bytes: int) -> Usage:
    """The usage object near the end of a JSON body relay did not hold whole.

    OpenAI and SGLang write ``usage`` (``meta_info``) as the last member, so
    the last ``max_bytes`` hold it whatever the size of the body. The object
    is decoded on its own; chunk framing inside it makes it unreadable (then
    ``none``).
    """
    tail = _tail(reads, max_bytes)
    for member in _MEMBER_NAMES:
        end = len(tail)
        for _ in range(USAGE_CANDIDATES):
            at = tail.rfind(member, 0, end)
            if at < 0:
                break
            end = at
            start = at + len(member)
            rest = tail[start : start + USAGE_OBJECT_BYTES].lstrip(b" \t\r\n")
            if not rest.startswith(b":"):
                continue  # inside a string, or a value, not a member name
            # A cut multi-byte character at the slice's end lies past the object.
            text = rest[1:].lstrip(b" \t\r\n").decode("utf-8", "replace")
            try:
                value, _ = _DECODER.raw_decode(text)
            except ValueError:
                continue
            usage = _from_document({member.strip(b'"').decode(): value})
            if usage is not None:
                return usage
    return NO_USAGE


def estimate_json(total_bytes: int) -> Usage:
    """An estimate for a non-empty JSON body whose usage relay could not read."""
    if not total_bytes:
        return NO_USAGE
    return Usage(0, max(1, total_bytes // BYTES_PER_TOKEN), "estimated")


def _tail(reads: Sequence[bytes], max_bytes: int) -> bytes:
    """The last ``max_bytes`` of ``reads``, joining only the reads needed for them."""
    taken = 0
    first = len(reads)
    while first > 0 and taken < max_bytes:
        first -= 1
        taken += len(reads[first])
    joined = b"".join(itertools.islice(reads, first, None))
    return joined[-max_bytes:] if taken > max_bytes else joined


def _data_spans(tail: bytes) -> Iterator[tuple[int, int]]:
    """Where the payloads of the ``data:`` lines in ``tail`` are (start, stop, not
    yet stripped), last first; the first may be cut.

    Lazy, and each search bounded by the line found before it: the usage is
    usually in the last event, and a tail may be megabytes. A payload ends at
    a line break or at the next ``data:``.
    """
    end = len(tail)
    while True:
        start = tail.rfind(b"data:", 0, end)
        if start < 0:
            return
        if start and tail[start - 1] not in _LINE_BREAKS:
            end = start  # "data:" inside a line (in an event's text): not a field
            continue
        stop = start + 5
        line_end = tail.find(b"\n", stop, end)
        if line_end < 0:
            line_end = end
        cr = tail.find(b"\r", stop, line_end)
        yield stop, line_end if cr < 0 else cr
        end = start


def _data_lines(tail: bytes) -> Iterator[bytes]:
    """The payloads of the ``data:`` lines in ``tail``, stripped, last first."""
    for start, stop in _data_spans(tail):
        yield tail[start:stop].strip()


_LINE_BREAKS = b"\r\n"


def _carries_text(payload: bytes) -> bool:
    """Whether one ``data:`` event carries generated text (an estimate counts it).

    Most events do, and are counted from their bytes alone; only one that may
    not (an empty string, an empty list, a ``finish_reason``: the role chunk,
    the final chunk, a usage chunk) is decoded.
    """
    if (
        b'""' not in payload
        and b"[]" not in payload
        and (
            b'"finish_reason"' not in payload
            or b'"finish_reason": null' in payload
            or b'"finish_reason":null' in payload
        )
    ):
        return True
    try:
        document = json.loads(payload)
    except ValueError:
        return False  # cut by the tail's start or a chunk boundary
    if not isinstance(document, dict):
        return False
    choices = document.get("choices")
    if isinstance(choices, list):
        for choice in choices:
            if not isinstance(choice, dict):
                continue
            delta = choice.get("delta")
            if isinstance(delta, dict) and any(
                delta.get(name) for name in ("content", "reasoning_content", "tool_calls")
            ):
                return True
            if choice.get("text"):
                return True
        return False
    return bool(document.get("text"))


#: What may make a ``data:`` line carry no text, or be ``[DONE]``; and a
#: ``finish_reason`` that is not null (a line with either null form is text to
#: :func:`_carries_text`, whatever else it holds). None holds a line break or
#: a lower-case ``d``, so one that starts inside a payload ends inside it, and
#: none starts inside a ``data:``.
_DOUBTFUL_SIGNS = (b'""', b"[]", b"[DONE]")
_FINISH_NOT_NULL = re.compile(rb'"finish_reason"(?!:null|: null)')
#: Signs beyond which every line is asked instead: each sign costs a few
#: searches of the window, each line a few searches of its own bytes.
_MOST_SIGNS = 16


def _count_text_events(window: bytes) -> tuple[int, int]:
    """How many ``data:`` lines ``window`` holds, and how many carry generated text.

    The same count as asking ``payload != b"[DONE]" and _carries_text(payload)``
    of every line that :func:`_data_lines` yields, in a few searches of the
    whole window: the lines are counted where they start, and only a line
    holding a sign that it may not count (:data:`_DOUBTFUL_SIGNS`, a
    ``finish_reason`` that is not null) is asked. Most events of a stream hold
    none; asking each one made this estimate the largest part of relay's own
    work per stream.
    """
    find = window.find
    doubtful = [match.start() for match in _FINISH_NOT_NULL.finditer(window)]
    for sign in _DOUBTFUL_SIGNS:
        at = find(sign)
        while at >= 0 and len(doubtful) <= _MOST_SIGNS:
            doubtful.append(at)
            at = find(sign, at + 1)
    if len(doubtful) > _MOST_SIGNS:
        # Many signs (events with empty strings, say): each would cost a few
        # searches of the window, so every line is asked instead, once.
        return _count_text_events_by_line(window)
    # Every data line, where it starts: at the window's start or after a line break.
    lines = window.count(b"\ndata:") + window.count(b"\rdata:") + window.startswith(b"data:")
    events = lines
    asked: set[int] = set()
    for at in doubtful:
        # The last "data:" before the sign: the payload holding it, if any.
        start = window.rfind(b"data:", 0, at)
        if start < 0 or start in asked:
            continue
        if start and window[start - 1] not in _LINE_BREAKS:
            continue  # after a "data:" inside a line, where no payload reaches
        stop = start + 5
        if find(b"\n", stop, at) >= 0 or find(b"\r", stop, at) >= 0:
            continue  # on a later line: that payload holds no sign, and counts
        asked.add(start)
        # That payload, cut as _data_spans cuts it.
        end = find(b"data:", stop)
        if end < 0:
            end = len(window)
        line_end = find(b"\n", stop, end)
        if line_end < 0:
            line_end = end
        cr = find(b"\r", stop, line_end)
        payload = window[stop : line_end if cr < 0 else cr].strip()
        if payload == b"[DONE]" or not _carries_text(payload):
            events -= 1
    return lines, events


def _count_text_events_by_line(window: bytes) -> tuple[int, int]:
    """:func:`_count_text_events`, asking every line."""
    lines = events = 0
    for payload in _data_lines(window):
        lines += 1
        if payload != b"[DONE]" and _carries_text(payload):
            events += 1
    return lines, events


def usage_from_stream(tail_reads: Sequence[bytes], total_bytes: int, *, max_bytes: int) -> Usage:
    """The usage reported at the end of an SSE stream, or an estimate marked as one.

    ``tail_reads`` are the last reads of the body as they came (chunk framing
    included); ``total_bytes`` is the size of the whole body. The usage is
    looked for in the last :data:`LAST_EVENTS` events of the last
    ``max_bytes``, however big each is; an estimate counts the events of the
    last :data:`ESTIMATE_BYTES` only, so the work at the end of a stream
    stays small whatever the bound.
    """
    tail = _tail(tail_reads, max_bytes)
    model: str | None = None
    # Only a line naming "usage" or "meta_info" is read: when the tail names
    # neither (most streams), its lines are not looked at one by one. find, not
    # ``in``: ``bytes.__contains__`` first tries its operand as an integer, and
    # the TypeError it makes and drops costs more than the search.
    named = tail.find(b'"usage"') >= 0 or tail.find(b'"meta_info"') >= 0
    for seen, payload in enumerate(_data_lines(tail) if named else ()):
        if seen == LAST_EVENTS:
            break
        if payload.find(b'"usage"') >= 0 or payload.find(b'"meta_info"') >= 0:
            try:
                document = json.loads(payload)
            except ValueError:
                document = None  # cut by the tail's start or a chunk boundary
            usage = _from_document(document)
            if usage is not None:
                return usage
            if model is None and isinstance(document, dict):
                found = document.get("model")
                model = found if isinstance(found, str) else None
    if not total_bytes:
        return NO_USAGE
    window = tail[-ESTIMATE_BYTES:]
    lines, events = _count_text_events(window)
    if not lines:
        # Not one event boundary near the end: an event bigger than the
        # window. Its bytes are the best measure there is.
        return Usage(0, max(1, len(tail) // BYTES_PER_TOKEN), "estimated", model)
    # Events of one stream are of about the same size: scale the window's
    # count by the whole stream's bytes. Never 0 for a stream that sent something.
    scale = max(1.0, total_bytes / max(1, len(window)))
    return Usage(0, max(1, round(events * scale)), "estimated", model)
