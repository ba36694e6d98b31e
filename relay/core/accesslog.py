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
from typing import Any

from ..http.usage import NO_USAGE, Usage

__all__ = ["JsonFormatter", "access", "log_exchange", "setup_logging", "text_value"]

access = logging.getLogger("relay.access")


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
    the same as ``logging.Formatter``'s default ``asctime``.
    """

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        if datefmt is not None:
            return super().formatTime(record, datefmt)
        return f"{_local_second(int(record.created))},{int(record.msecs):03d}"


def setup_logging(level: str, fmt: str = "text", *, pid: bool = False) -> None:
    """Send relay's loggers to stderr at ``level``, as ``text`` or ``json``.

    ``pid`` (``--workers`` above 1) puts the process id on every line, so the
    lines of each worker and of their parent can be told apart.
    """
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter(pid=pid))
    else:
        name = "%(name)s[%(process)d]" if pid else "%(name)s"
        handler.setFormatter(TextFormatter(f"%(asctime)s %(levelname)s {name}: %(message)s"))
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
    if _PLAIN.fullmatch(text):
        return text  # the common case: printable ASCII, nothing to quote
    if not text or _NEEDS_QUOTES.search(text) or _UNSAFE.search(text):
        escaped = text.replace("\\", "\\\\").replace('"', '\\"')
        return '"' + _safe(escaped) + '"'
    return text


def _json_safe(value: str) -> str:
    """``value`` with lone surrogates escaped; everything else as it is."""
    return _SURROGATE.sub(_escape, value)


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 1)


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
    if not access.isEnabledFor(logging.INFO):
        return
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
        "head_ms": _ms(head_s),
        "ttft_ms": _ms(ttft_s),
        "total_ms": _ms(total_s),
        "ending": ending,
        # Issue #14: the key's name (never the key) and the tokens used.
        "key": key,
        "prompt_tokens": usage.prompt if usage.source != "none" else None,
        "completion_tokens": usage.completion if usage.source != "none" else None,
        "usage": usage.source if usage.source != "none" else None,
    }
    if fidelity:  # stream fidelity (#15): coalesced, keepalives, body_sha256, cancel_*
        fields.update(fidelity)
    # makeRecord + handle, rather than info(): the caller's file and line are
    # not part of an access line, and looking them up costs a stack walk.
    record = access.makeRecord(access.name, logging.INFO, "", 0, AccessLine(fields), (), None)
    record.fields = fields  # for handlers and filters that want the values
    access.handle(record)


class AccessLine:
    """An access record's message: the fields, as ``key=value`` text only when a
    text handler asks for it (the JSON formatter reads the fields)."""

    __slots__ = ("fields",)

    def __init__(self, fields: dict[str, Any]) -> None:
        self.fields = fields

    def __str__(self) -> str:
        return " ".join(
            f"{k}={v if type(v) in _NUMBERS else text_value(v)}"
            for k, v in self.fields.items()
            if v is not None
        )


_NUMBERS = (int, float)
