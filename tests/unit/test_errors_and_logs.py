"""Error bodies, access-log lines and head checks say only what relay chooses to say."""

from __future__ import annotations

import json
import logging
import re

import h11
import pytest

from relay.core.accesslog import JsonFormatter, log_exchange
from relay.http.auth import KeyListError, parse_key_list
from relay.http.errors import STATUS_ERRORS, RelayError, error_body, protocol_error_message
from relay.http.headers import find_head_problem, origin_form

# Every status relay sends itself → (type, code) it must carry.
EXPECTED = {
    400: ("invalid_request_error", "bad_request"),
    401: ("invalid_request_error", "invalid_api_key"),
    404: ("invalid_request_error", "not_found"),
    405: ("invalid_request_error", "method_not_allowed"),
    408: ("invalid_request_error", "timeout"),
    413: ("invalid_request_error", "request_too_large"),
    431: ("invalid_request_error", "request_header_fields_too_large"),
    500: ("server_error", "internal_error"),
    501: ("server_error", "not_implemented"),
    502: ("server_error", "bad_gateway"),
    503: ("server_error", "unavailable"),
    504: ("server_error", "upstream_timeout"),
    505: ("server_error", "http_version_not_supported"),
}


@pytest.mark.parametrize("status", sorted(EXPECTED))
def test_type_and_code_derive_from_the_status(status):
    """A RelayError's type and code come from the one status table unless a code is given."""
    assert STATUS_ERRORS[status] == EXPECTED[status]
    error = json.loads(error_body(RelayError(status, "m")))["error"]
    assert (error["type"], error["code"]) == EXPECTED[status]
    precise = RelayError(status, "m", "model_not_found")
    assert precise.code == "model_not_found" and precise.type == EXPECTED[status][0]


SECRET = b"sk-SECRET-KEY-123"
HOSTILE_HEADS = [
    b"GET / HTTP/1.1\r\nHost: a\r\nAuthorization : Bearer " + SECRET + b"\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer sk\x00" + SECRET + b"\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer sk\r" + SECRET + b"\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\nx-api-key: " + SECRET + b"\r\nX Y: 1\r\n\r\n",
    b"GET /" + SECRET + b" HTTP/1.1 x\r\nHost: a\r\n\r\n",
    b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n" + SECRET + b"\r\n",
    b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: " + SECRET + b"\r\n\r\n",
    b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: " + SECRET + b"\r\n\r\n",
]


@pytest.mark.parametrize("raw", HOSTILE_HEADS)
def test_protocol_error_messages_never_quote_the_request(raw):
    """Whatever h11 says about a request, relay's message holds none of its bytes."""
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(raw)
    with pytest.raises(h11.RemoteProtocolError) as caught:
        while conn.next_event() not in (h11.NEED_DATA,):
            pass
    message = protocol_error_message(caught.value.error_status_hint, str(caught.value))
    assert "SECRET" not in message and "bytearray" not in message
    assert len(message) < 60


def test_protocol_error_messages_name_the_problem():
    """Known h11 complaints map to fixed, specific messages."""
    assert protocol_error_message(400, "illegal header line: bytearray(b'x')") == (
        "malformed header line"
    )
    assert protocol_error_message(400, "illegal request line: bytearray(b'x')") == (
        "malformed request line"
    )
    assert protocol_error_message(400, "illegal chunk header: bytearray(b'header')") == (
        "malformed chunked body"
    )
    assert protocol_error_message(400, "Missing mandatory Host: header") == (
        "missing or repeated Host header"
    )
    assert protocol_error_message(431, "anything") == "request head too large"
    assert protocol_error_message(501, "anything") == "unsupported Transfer-Encoding"
    assert protocol_error_message(400, "something new") == "malformed request"


_LOGFMT = re.compile(r'(\w+)=("(?:[^"\\]|\\.)*"|[^\s"]+)')


def _log_line(caplog, formatter: logging.Formatter | None = None, **overrides) -> list[str]:
    fields = dict(
        client="127.0.0.1",
        method=b"POST",
        target=b"/v1/chat/completions",
        status=200,
        upstream="http://u:1",
        requested_model="gpt-4o",
        forwarded_model="GLM",
        bytes_in=1,
        bytes_out=2,
        head_s=0.001,
        ttft_s=None,
        total_s=0.002,
        ending="complete",
    )
    fields.update(overrides)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="relay.access"):
        log_exchange(**fields)
    (record,) = caplog.records
    return (formatter or logging.Formatter("%(message)s")).format(record).split("\n")


@pytest.mark.parametrize(
    "model",
    [
        "x\nstatus=200 model=forged ending=complete",
        "x\r\n2025-01-01 INFO relay.access: client=1.2.3.4",
        'a" status=999 b="',
        "a b",
        "\u2028x\x85y\x1b[31m",
        "\ud800lone",
    ],
)
def test_access_log_fields_cannot_forge_lines_or_fields(caplog, model):
    """A hostile model name stays one quoted value on one text line, and valid JSON."""
    (line,) = _log_line(caplog, requested_model=model, target=b"/p?a=b\x7f")
    assert not any(ch in line for ch in "\r\n\x85\u2028\x1b\x7f")
    pairs = _LOGFMT.findall(line)
    assert " ".join(f"{key}={value}" for key, value in pairs) == line  # nothing in between
    assert [key for key, _ in pairs] == [
        "client", "method", "path", "status", "model", "forwarded_model", "upstream",
        "bytes_in", "bytes_out", "head_ms", "total_ms", "ending",
    ]  # fmt: skip
    assert dict(pairs)["status"] == "200" and dict(pairs)["model"].startswith('"')
    (text,) = _log_line(caplog, JsonFormatter(), requested_model=model)
    document = json.loads(text)
    assert document["status"] == 200
    text.encode("utf-8")  # no lone surrogate left to break the stream writer


def test_plain_values_stay_unquoted(caplog):
    """Ordinary values are written as they are: key=value."""
    (line,) = _log_line(caplog)
    assert "model=gpt-4o forwarded_model=GLM" in line and "path=/v1/chat/completions" in line


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        (b"/v1/models?x=1", b"/v1/models?x=1"),
        (b"*", b"*"),
        (b"http://host/path?q", b"/path?q"),
        (b"http://host:8080/a/b", b"/a/b"),
        (b"HTTPS://user@host/p", b"/p"),
        (b"http://host", b"/"),
        (b"http://host?q=1", b"/?q=1"),
        (b"http://[::1]:80/v1", b"/v1"),
        (b"host:443", b"host:443"),
    ],
)
def test_absolute_form_targets_become_origin_form(target, expected):
    """RFC 9112 §3.2.2: the upstream gets origin-form; * and origin-form stay."""
    assert origin_form(target) == expected


@pytest.mark.parametrize("value", [b"3, 3", b"3,3", b"3 ,3", b"4, 5", b"3,"])
def test_content_length_lists_in_one_line_are_refused(value):
    """A list of lengths in one Content-Length line is a duplicate length."""
    head = b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: " + value + b"\r\n\r\nabc"
    assert find_head_problem(head) == "duplicate Content-Length header"
    assert find_head_problem(b"POST / HTTP/1.1\r\nContent-Length: 3\r\n\r\na,b") is None


def test_key_lists_of_only_separators_are_refused():
    """RELAY_API_KEYS with separators but no key is an error, never 'no authentication'."""
    assert parse_key_list("") == []
    assert parse_key_list("a, b c") == ["a", "b", "c"]
    for bad in (",,, ", " ", ",", "\t,\n"):
        with pytest.raises(KeyListError):
            parse_key_list(bad)


@pytest.mark.parametrize("value", [",,, ", " ", ","])
def test_relay_api_keys_of_only_separators_stop_startup_naming_the_variable(monkeypatch, value):
    """The CLI refuses RELAY_API_KEYS that names no key, with a message naming it."""
    from relay import cli
    from relay.config import ConfigError

    monkeypatch.setenv("RELAY_API_KEYS", value)
    args = cli.build_parser().parse_args(["--upstream", "127.0.0.1:1"])
    with pytest.raises(ConfigError) as caught:
        cli.config_from_args(args)
    assert caught.value.flag == "RELAY_API_KEYS"
    monkeypatch.setenv("RELAY_API_KEYS", "sk-a,,sk-b")
    assert cli.config_from_args(args).api_keys == ("sk-a", "sk-b")


def test_max_inspect_bytes_is_a_size_flag_and_an_environment_variable(monkeypatch):
    """--max-inspect-bytes and RELAY_MAX_INSPECT_BYTES set the server-wide inspect budget."""
    from relay import cli
    from relay.config import Config

    assert Config().max_inspect_bytes == 256 * 1024 * 1024
    args = cli.build_parser().parse_args(["--upstream", "a:1", "--max-inspect-bytes", "1m"])
    assert cli.config_from_args(args).max_inspect_bytes == 1024 * 1024
    parser = cli.build_parser()
    cli.apply_environment(parser, {"RELAY_MAX_INSPECT_BYTES": "2m"})
    args = parser.parse_args(["--upstream", "a:1"])
    assert cli.config_from_args(args).max_inspect_bytes == 2 * 1024 * 1024
