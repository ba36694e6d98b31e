"""The access line's fast paths write exactly what the value-by-value rules write."""

from __future__ import annotations

import enum
import logging
import re
import sys

import pytest
from hypothesis import given
from hypothesis import strategies as st

from relay.core import accesslog
from relay.core.accesslog import AccessLine, TextFormatter, setup_logging, text_value

# The rules as first written (regex per value, generator per line): the reference.
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff]")
_NEEDS_QUOTES = re.compile(r'[\s"=\\]')
_PLAIN = re.compile(r"[!#-<>-\[\]-~]+")


def _escape(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def reference_value(value: object) -> str:
    text = str(value)
    if _PLAIN.fullmatch(text):
        return text
    if not text or _NEEDS_QUOTES.search(text) or _UNSAFE.search(text):
        escaped = text.replace("\\", "\\\\").replace('"', '\\"')
        return '"' + _UNSAFE.sub(_escape, escaped) + '"'
    return text


def reference_line(fields: dict[str, object]) -> str:
    return " ".join(
        f"{k}={v if type(v) in (int, float) else reference_value(v)}"
        for k, v in fields.items()
        if v is not None
    )


class Shade(enum.IntEnum):
    DARK = 1


class Odd(str):
    def __str__(self) -> str:
        return "odd value"


HOSTILE = [
    "", " ", "plain", "/v1/chat/completions", "127.0.0.1:8000", "a=b", "a b", 'say "hi"',
    "back\\slash", "x\nstatus=200 forged=1", "x\r\n2025-01-01 INFO relay.access: client=1",
    "\x00", "\x1b[31m", "\x7f", "\x85", "\x9f", "\xa0", "\u2028", "\u2029", "\u3000",
    "\ud800lone", "lone\udfff", "café", "模型", "emoji\U0001f600", "tab\there", "=", '"', "\\",
    "%s", "%(name)s", "trailing=", "=leading", "x" * 300, "é" * 300,
]  # fmt: skip
ODD_VALUES: list[object] = [True, False, 0, -1, 1.5, float("inf"), float("nan"), 1e20, Shade.DARK,
                            Odd("plain"), b"bytes", ["a b"], {"k": "v"}]  # fmt: skip


@pytest.mark.parametrize("value", HOSTILE + ODD_VALUES)
def test_text_value_matches_the_reference_cold_and_warm(value):
    """text_value gives the reference text the first time and again once it knows the value."""
    accesslog._as_is.clear()
    assert text_value(value) == reference_value(value)
    assert text_value(value) == reference_value(value)


@given(st.text(st.characters(exclude_categories=())))
def test_text_value_matches_the_reference_for_any_string(text):
    """Any string, lone surrogates and controls included, is written as the reference writes it."""
    assert text_value(text) == reference_value(text)
    assert text_value(text) == reference_value(text)


@pytest.mark.parametrize("value", HOSTILE + ODD_VALUES + [None])
@pytest.mark.parametrize("slot", ["client", "path", "status", "head_ms", "extra"])
def test_access_line_matches_the_reference_in_every_slot(value, slot):
    """Whatever value sits in a field, the line is the reference line, cold and warm."""
    fields: dict[str, object] = {
        "client": "127.0.0.1", "method": "POST", "path": "/v1/chat/completions",
        "status": 200, "model": None, "head_ms": 1.0, "total_ms": 3.5, "ending": "complete",
    }  # fmt: skip
    fields[slot] = value
    accesslog._as_is.clear()
    for _ in range(2):
        assert str(AccessLine(fields)) == reference_line(fields)


def test_access_line_follows_changes_to_the_fields():
    """A filter that rewrites record.fields changes the text line too."""
    fields: dict[str, object] = {"client": "127.0.0.1", "path": "/a"}
    line = AccessLine(fields)
    assert str(line) == "client=127.0.0.1 path=/a"
    fields["path"] = "/a b"
    fields["key"] = "team-1"
    assert str(line) == 'client=127.0.0.1 path="/a b" key=team-1'


def test_values_known_as_is_stay_bounded():
    """Ever new plain values (paths) never grow the set of known values past its bound."""
    for i in range(3 * accesslog._AS_IS_MAX):
        assert text_value(f"/p/{i}") == f"/p/{i}"
    assert 0 < len(accesslog._as_is) <= accesslog._AS_IS_MAX
    assert text_value("/" + "x" * 1000) not in accesslog._as_is


def _record(msg: object, **extra: object) -> logging.LogRecord:
    record = logging.getLogger("relay.access").makeRecord(
        "relay.access", logging.INFO, "", 0, msg, (), None
    )
    record.__dict__.update(extra)
    return record


@pytest.mark.parametrize("fmt", [accesslog._TEXT_FORMAT, accesslog._TEXT_FORMAT_PID])
def test_text_formatter_writes_what_logging_formatter_writes(fmt):
    """relay's own layouts give logging.Formatter's text, message and asctime included."""
    for msg in ["plain", "100% %s", AccessLine({"client": "c", "path": "a\nb"})]:
        fast, slow = _record(msg, created=1700000000.5, msecs=500.0), _record(msg)
        slow.__dict__.update(created=1700000000.5, msecs=500.0)
        assert TextFormatter(fmt).format(fast) == logging.Formatter(fmt).format(slow)
        assert (fast.message, fast.asctime) == (slow.message, slow.asctime)


def test_text_formatter_keeps_exceptions_and_other_formats():
    """Records with an exception, and other format strings, are formatted as logging does."""
    try:
        raise ValueError("boom")
    except ValueError:
        exc_info = sys.exc_info()
    fast, slow = _record("failed", exc_info=exc_info), _record("failed", exc_info=exc_info)
    fmt = accesslog._TEXT_FORMAT
    assert TextFormatter(fmt).format(fast) == logging.Formatter(fmt).format(slow)
    assert "ValueError: boom" in TextFormatter(fmt).format(fast)
    other = "%(levelname)s|%(name)s|%(message)s"
    assert TextFormatter(other).format(_record("x")) == "INFO|relay.access|x"
    assert TextFormatter("{levelname} {message}", style="{").format(_record("x")) == "INFO x"


def test_setup_logging_writes_pid_lines_and_every_record_reaches_filters(capsys):
    """With pid, text lines carry name[pid]; a filter on relay.access sees each record."""
    root = logging.getLogger()
    saved = (root.handlers[:], root.level, logging.logThreads)
    seen: list[logging.LogRecord] = []
    access = logging.getLogger("relay.access")

    def keep(record: logging.LogRecord) -> bool:
        seen.append(record)
        return True

    access.addFilter(keep)
    try:
        setup_logging("info", "text", pid=True)
        accesslog.log_exchange(
            client="1.2.3.4", method=b"GET", target=b"/x y", status=200, upstream="u",
            requested_model=None, forwarded_model=None, bytes_in=1, bytes_out=2,
            head_s=None, ttft_s=None, total_s=0.25, ending="complete",
        )  # fmt: skip
    finally:
        access.removeFilter(keep)
        root.handlers[:], logging.logThreads = saved[0], saved[2]
        root.setLevel(saved[1])
    (line,) = capsys.readouterr().err.splitlines()
    pid = seen[0].process
    assert line.endswith(
        f' INFO relay.access[{pid}]: client=1.2.3.4 method=GET path="/x y" status=200'
        " upstream=u bytes_in=1 bytes_out=2 total_ms=250.0 ending=complete"
    )
    assert len(seen) == 1 and seen[0].fields["path"] == "/x y"
