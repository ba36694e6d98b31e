"""Logging: named loggers on stderr, and the one access-log line per exchange.

``relay.events`` carries operational events (start, drain, warnings,
errors); ``relay.access`` gets one line per exchange, as text
(``key=value``) or JSON (``--log-format json``), which journald and
container runtimes collect from stderr.
"""

from __future__ import annotations

import functools
import json
import logging
import re
import sys
import time
from collections.abc import Mapping
from typing import Any, Literal

from ..http.usage import NO_USAGE, Usage

__all__ = ["JsonFormatter", "access", "log_exchange", "setup_logging", "text_value"]

access = logging.getLogger("relay.access")
_INFO = logging.INFO


class JsonFormatter(logging.Formatter):
    """One JSON object per record; access records carry their fields."""

    def __init__(self, *, pid: bool = False) -> None:
        super().__init__()
        self.pid = pid

    def format(self, record: logging.LogRecord) -> str:
        document: dict[str, Any] = {
            "time": _utc_second(int(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
        }
        if self.pid:
            document["pid"] = record.process
        fields = getattr(record, "fields", None)
        if fields:
            document.update(fields)
        else:
            document["message"] = record.getMessage()
        if record.exc_info:
            document["exception"] = self.formatException(record.exc_info)
        return json.dumps(document, ensure_ascii=False)


@functools.lru_cache(maxsize=4)
def _utc_second(second: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))


@functools.lru_cache(maxsize=4)
def _local_second(second: int) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(second))


class TextFormatter(logging.Formatter):
    """The standard text formatter, with the time formatted once per second.

    An access line per request made ``strftime`` a visible cost; the text is
    the same as ``logging.Formatter``'s default ``asctime``. With relay's own
    format string (``setup_logging``) and a record without exception or stack
    text, the line is put together directly: the same text as
    ``logging.Formatter.format``, and ``record.message`` and ``record.asctime``
    set as it sets them, without its generic steps.
    """

    def __init__(
        self,
        fmt: str | None = None,
        datefmt: str | None = None,
        style: Literal["%", "{", "$"] = "%",
        validate: bool = True,
        *,
        defaults: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(fmt, datefmt, style, validate, defaults=defaults)
        #: Which of relay's layouts ``fmt`` is: ``"pid"``, ``"plain"`` or None (any other).
        plain = style == "%" and datefmt is None and not defaults
        self._layout = _LAYOUTS.get(fmt or "") if plain else None

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        if datefmt is not None:
            return super().formatTime(record, datefmt)
        return f"{_local_second(int(record.created))},{int(record.msecs):03d}"

    def format(self, record: logging.LogRecord) -> str:
        layout = self._layout
        if layout is None or record.exc_info or record.exc_text or record.stack_info:
            return super().format(record)
        record.message = message = record.getMessage()
        record.asctime = asctime = f"{_local_second(int(record.created))},{int(record.msecs):03d}"
        if layout == "pid":
            return f"{asctime} {record.levelname} {record.name}[{record.process:d}]: {message}"
        return f"{asctime} {record.levelname} {record.name}: {message}"


#: relay's text format strings (``setup_logging``), by layout.
_TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
_TEXT_FORMAT_PID = "%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s"
_LAYOUTS = {_TEXT_FORMAT: "plain", _TEXT_FORMAT_PID: "pid"}


def setup_logging(level: str, fmt: str = "text", *, pid: bool = False) -> None:
    """Send relay's loggers to stderr at ``level``, as ``text`` or ``json``.

    ``pid`` (``--workers`` above 1) puts the process id on every line, so the
    lines of each worker and of their parent can be told apart.
    """
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter(pid=pid))
    else:
        handler.setFormatter(TextFormatter(_TEXT_FORMAT_PID if pid else _TEXT_FORMAT))
    # Thread ids and names are on no line relay writes, and relay logs from its
    # event loop's thread; the process id stays (``--workers`` lines show it).
    logging.logThreads = False
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(getattr(logging, level.upper()))


#: Characters that could end or forge a log line, or that a terminal acts on:
#: C0 controls, DEL, C1 controls, the Unicode line and paragraph separators,
#: and lone surrogates (which would make the UTF-8 stream writer fail).
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff]")
_SURROGATE = re.compile("[\ud800-\udfff]")
#: Text-format values holding one of these are written in double quotes.
_NEEDS_QUOTES = re.compile(r'[\s"=\\]')
#: Printable ASCII without space, quote, ``=`` or backslash: written as it is.
_PLAIN = re.compile(r"[!#-<>-\[\]-~]+")


def _escape(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def _safe(value: str) -> str:
    """``value`` with every unsafe character written as a ``\\xNN``/``\\uNNNN`` escape."""
    return _UNSAFE.sub(_escape, value)


def text_value(value: object) -> str:
    """One ``key=value`` value for the text format: never more than one line.

    Client-chosen strings (path, model names) may hold newlines or quotes;
    escaped and, where needed, quoted, they cannot forge a line or a field.
    """
    text = str(value)
    if text in _as_is:
        return text  # seen before: the same few values recur on every line
    if _PLAIN.fullmatch(text):
        _remember_as_is(text)
        return text  # printable ASCII, nothing to quote
    if not text or _NEEDS_QUOTES.search(text) or _UNSAFE.search(text):
        escaped = text.replace("\\", "\\\\").replace('"', '\\"')
        return '"' + _safe(escaped) + '"'
    _remember_as_is(text)
    return text  # non-ASCII, but nothing unsafe and nothing to quote


#: Strings ``text_value`` writes as they are (client addresses, methods, paths,
#: upstreams, model names, endings): a set look-up instead of a regex match for
#: the values that recur on every line. Only ``text_value`` adds to it. Bounded:
#: emptied when full, so clients sending ever new paths cost a regex match
#: each, never memory.
_as_is: set[str] = set()
_AS_IS_MAX = 1024
_AS_IS_LONGEST = 256


def _remember_as_is(text: str) -> None:
    if len(text) <= _AS_IS_LONGEST:
        if len(_as_is) >= _AS_IS_MAX:
            _as_is.clear()
        _as_is.add(text)


def _json_safe(value: str) -> str:
    """``value`` with lone surrogates escaped; everything else as it is."""
    if value.isascii():  # O(1) in CPython: the common case has nothing to escape
        return value
    return _SURROGATE.sub(_escape, value)


def log_exchange(
    *,
    client: str,
    method: bytes,
    target: bytes,
    status: int | None,
    upstream: str,
    requested_model: str | None,
    forwarded_model: str | None,
    bytes_in: int,
    bytes_out: int,
    head_s: float | None,
    ttft_s: float | None,
    total_s: float,
    ending: str,
    fidelity: dict[str, Any] | None = None,
    key: str | None = None,
    usage: Usage = NO_USAGE,
) -> None:
    """Write the access line for one finished exchange (if INFO is enabled)."""
    if not access.isEnabledFor(_INFO):
        return
    # Written out (no helper calls, one look at usage.source): this runs once
    # per exchange, and every call and attribute look-up is a visible cost.
    source = usage.source
    if source == "none":
        prompt = completion = source = None
    else:
        prompt, completion = usage.prompt, usage.completion
    fields = {
        "client": client,
        # ASCII with replacement characters: nothing in them can break a line.
        "method": method.decode("ascii", "replace"),
        "path": target.decode("ascii", "replace"),
        "status": status,
        # Model names come from JSON, which can hold lone surrogates (valid in
        # a Python str, not in UTF-8): those are made safe for JSON too.
        "model": None if requested_model is None else _json_safe(requested_model),
        "forwarded_model": None if forwarded_model is None else _json_safe(forwarded_model),
        "upstream": upstream,
        "bytes_in": bytes_in,
        "bytes_out": bytes_out,
        "head_ms": None if head_s is None else round(head_s * 1000, 1),
        "ttft_ms": None if ttft_s is None else round(ttft_s * 1000, 1),
        "total_ms": None if total_s is None else round(total_s * 1000, 1),
        "ending": ending,
        # Keys and usage: the key's name (never the key) and the tokens used.
        "key": key,
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "usage": source,
    }
    if fidelity:  # stream fidelity: coalesced, keepalives, body_sha256, cancel_*
        fields.update(fidelity)
    # makeRecord + handle, rather than info(): the caller's file and line are
    # not part of an access line, and looking them up costs a stack walk.
    record = access.makeRecord(access.name, _INFO, "", 0, AccessLine(fields), (), None)
    record.fields = fields  # for handlers and filters that want the values
    access.handle(record)


class AccessLine:
    """An access record's message: the fields, as ``key=value`` text only when a
    text handler asks for it (the JSON formatter reads the fields).

    Each field that is not None, in order: an int or float as ``str`` writes
    it, anything else through ``text_value``. The text is read from the fields
    when asked for, so a filter that changes ``record.fields`` changes it too.
    """

    __slots__ = ("fields",)

    def __init__(self, fields: dict[str, Any]) -> None:
        self.fields = fields

    def __str__(self) -> str:
        # One list comprehension, and no call for the values text_value would
        # return unchanged: ints, floats and the strings already in _as_is.
        as_is = _as_is
        return " ".join(
            [
                f"{k}={v}"
                if ((t := type(v)) is str and v in as_is) or t is int or t is float
                else f"{k}={text_value(v)}"
                for k, v in self.fields.items()
                if v is not None
            ]
        )
