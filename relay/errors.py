"""Error responses relay itself sends: a status and an OpenAI-style JSON body.

OpenAI clients (the official SDKs, LiteLLM, LangChain) read
``{"error": {"message", "type", "code"}}``; answering in that shape makes a
relay failure show up in the client's own error message instead of as a
parse error.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from http import HTTPStatus

__all__ = ["RelayError", "error_body", "error_response"]


@dataclass(frozen=True)
class RelayError:
    """A failure relay answers for itself, before any upstream byte was sent."""

    status: int
    message: str
    code: str
    headers: tuple[tuple[bytes, bytes], ...] = ()

    @property
    def type(self) -> str:
        # The OpenAI API uses these two families of error types.
        return "invalid_request_error" if self.status < 500 else "server_error"


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
