"""Error responses relay itself sends: a status and an OpenAI-style JSON body.

OpenAI clients (the official SDKs, LiteLLM, LangChain) read
``{"error": {"message", "type", "code"}}``; answering in that shape makes a
relay failure show up in the client's own error message instead of as a
parse error.

Every status relay can send has one row in :data:`STATUS_ERRORS`, and a
:class:`RelayError` takes its ``type`` and ``code`` from that row unless the
call site names a more precise code (``model_not_found``,
``upstream_unreachable``). Messages are short fixed sentences chosen by
relay: never a parser's internal text, never a byte of the request (a header
line may hold an API key).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from http import HTTPStatus

__all__ = [
    "STATUS_ERRORS",
    "RelayError",
    "error_body",
    "error_response",
    "protocol_error_message",
]

#: status → (OpenAI error ``type``, default ``code``). The OpenAI API uses two
#: families of types: ``invalid_request_error`` for 4xx (the request is at
#: fault) and ``server_error`` for 5xx; the code names the status.
STATUS_ERRORS: dict[int, tuple[str, str]] = {
    400: ("invalid_request_error", "bad_request"),
    401: ("invalid_request_error", "invalid_api_key"),
    404: ("invalid_request_error", "not_found"),
    405: ("invalid_request_error", "method_not_allowed"),
    408: ("invalid_request_error", "timeout"),
    413: ("invalid_request_error", "request_too_large"),
    # OpenAI's own 429s carry type "requests" (or "tokens") and this code.
    429: ("requests", "rate_limit_exceeded"),
    431: ("invalid_request_error", "request_header_fields_too_large"),
    500: ("server_error", "internal_error"),
    501: ("server_error", "not_implemented"),
    502: ("server_error", "bad_gateway"),
    503: ("server_error", "unavailable"),
    504: ("server_error", "upstream_timeout"),
    505: ("server_error", "http_version_not_supported"),
}


def _row(status: int) -> tuple[str, str]:
    row = STATUS_ERRORS.get(status)
    if row is not None:
        return row
    family = "invalid_request_error" if status < 500 else "server_error"
    return family, "bad_request" if status < 500 else "internal_error"


@dataclass(frozen=True)
class RelayError:
    """A failure relay answers for itself, before any upstream byte was sent.

    ``code`` defaults to the status's code in :data:`STATUS_ERRORS`; pass it
    only to be more precise than the status.
    """

    status: int
    message: str
    code: str = ""
    headers: tuple[tuple[bytes, bytes], ...] = ()

    def __post_init__(self) -> None:
        if not self.code:
            object.__setattr__(self, "code", _row(self.status)[1])

    @property
    def type(self) -> str:
        return _row(self.status)[0]


#: h11's error texts (lower case) → the fixed message relay sends instead.
#: h11 puts the offending bytes into its messages (``bytearray(b'...')``),
#: which may hold a credential, so its text never leaves relay.
_PROTOCOL_MESSAGES = (
    ("request line", "malformed request line"),
    ("content-length", "invalid Content-Length"),
    ("transfer-encoding", "invalid or unsupported Transfer-Encoding"),
    ("transfer encoding", "invalid or unsupported Transfer-Encoding"),
    ("chunk", "malformed chunked body"),
    ("header", "malformed header line"),
    ("continuation line", "malformed header line"),
    ("host", "missing or repeated Host header"),
)


def protocol_error_message(status: int, parser_text: str) -> str:
    """A short, stable message for a request the HTTP parser refused.

    ``parser_text`` is the parser's own description; only known phrases in
    its fixed part (before the first ``:``, where h11 appends the offending
    bytes) choose the message, and none of its text is copied.
    """
    if status == 431:
        return "request head too large"
    if status == 501:
        return "unsupported Transfer-Encoding"
    lowered = parser_text.split(":", 1)[0].lower()
    for phrase, message in _PROTOCOL_MESSAGES:
        if phrase in lowered:
            return message
    return "malformed request"


def error_body(error: RelayError) -> bytes:
    """The JSON body for ``error``."""
    document = {"error": {"message": error.message, "type": error.type, "code": error.code}}
    return json.dumps(document, separators=(",", ":")).encode() + b"\n"


def error_response(error: RelayError, *, http_version: bytes = b"1.1", close: bool = True) -> bytes:
    """A complete HTTP/1.x response (head and body) for ``error``."""
    body = error_body(error)
    try:
        reason = HTTPStatus(error.status).phrase.encode()
    except ValueError:
        reason = b""
    head = [
        b"HTTP/%s %d %s\r\n" % (http_version, error.status, reason),
        b"content-type: application/json\r\n",
        b"content-length: %d\r\n" % len(body),
        b"cache-control: no-store\r\n",
    ]
    head.extend(b"%b: %b\r\n" % pair for pair in error.headers)
    if close:
        head.append(b"connection: close\r\n")
    head.append(b"\r\n")
    return b"".join(head) + body
