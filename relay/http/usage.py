"""Sans-IO usage accounting: the tokens an upstream reports, read after the fact.

relay never parses a response as it streams. The exchange keeps references
to the last few reads it already forwarded (no copy); when the exchange
ends, these functions read the usage from them, once:

* a non-streaming JSON response (OpenAI ``usage``, or SGLang's native
  ``meta_info``) is parsed whole when relay held all of it, which it does up
  to :data:`MAX_JSON_BYTES`; a larger body is not counted (``none``);
* a stream (``text/event-stream``) reports its usage in its last event with
  a ``usage`` (SGLang sends one when the request asks for
  ``stream_options.include_usage``; its ``/generate`` stream carries
  ``meta_info`` in every event). Only the last :data:`TAIL_BYTES` are read.
  A stream without one gets an *estimate*: its completion tokens are its
  ``data:`` events, counted in the tail and scaled by the bytes of the whole
  stream (events of one stream are of similar size); prompt tokens are
  unknown (0). The result is marked ``estimated``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .framing import ChunkedFramer, FramingError

__all__ = [
    "MAX_JSON_BYTES",
    "TAIL_BYTES",
    "TAIL_READS",
    "Usage",
    "usage_from_json",
    "usage_from_stream",
]

#: Largest non-streaming JSON body whose usage is read (a bigger one is not counted).
MAX_JSON_BYTES = 1024 * 1024
#: The bytes at the end of a stream where its usage is looked for.
TAIL_BYTES = 64 * 1024
#: Reads of a stream kept (by reference) for that: the usage event, [DONE]
#: and the last chunk are often separate reads.
TAIL_READS = 8


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


def usage_from_json(reads: Sequence[bytes], *, chunked: bool) -> Usage:
    """The usage of a whole non-streaming body, given as the reads that carried it."""
    if sum(map(len, reads)) > MAX_JSON_BYTES + 64 * 1024:
        return NO_USAGE
    body: bytes | None = b"".join(reads)
    if chunked:
        body = _dechunk(body)
    if body is None or len(body) > MAX_JSON_BYTES:
        return NO_USAGE
    try:
        document = _loads(body)
    except ValueError:  # not JSON, not UTF-8, or compressed
        return NO_USAGE
    return _from_document(document) or NO_USAGE


def _data_lines(tail: bytes) -> list[bytes]:
    """The payloads of the ``data:`` lines in ``tail``, last first (the first may be cut)."""
    found = []
    end = len(tail)
    while True:
        start = tail.rfind(b"data:", 0, end)
        if start < 0:
            return found
        stop = start + 5
        line_end = min(
            (i for i in (tail.find(b"\n", stop), tail.find(b"\r", stop)) if i >= 0),
            default=len(tail),
        )
        found.append(tail[stop:line_end].strip())
        end = start


def usage_from_stream(tail_reads: Sequence[bytes], total_bytes: int) -> Usage:
    """The usage reported at the end of an SSE stream, or an estimate marked as one.

    ``tail_reads`` are the last reads of the body as they came (chunk framing
    included); ``total_bytes`` is the size of the whole body.
    """
    tail = b"".join(tail_reads)[-TAIL_BYTES:]
    lines = _data_lines(tail)
    model: str | None = None
    events = 0
    for payload in lines:
        if payload == b"[DONE]":
            continue
        events += 1
        if b'"usage"' not in payload and b'"meta_info"' not in payload:
            continue
        try:
            document = json.loads(payload)
        except ValueError:
            continue  # cut by the tail's start or a chunk boundary
        usage = _from_document(document)
        if usage is not None:
            return usage
        if model is None and isinstance(document, dict):
            found = document.get("model")
            model = found if isinstance(found, str) else None
    if not events:
        return NO_USAGE if not total_bytes else Usage(0, 0, "estimated", model)
    # Events of one stream are of about the same size: scale the tail's count
    # by the whole stream's bytes.
    scale = max(1.0, total_bytes / max(1, len(tail)))
    return Usage(0, round(events * scale), "estimated", model)
