"""Stream fidelity decisions, sans-IO: what to count and what to send.

relay sees every response byte unchanged, so it can show on live traffic
what a benchmark shows once: whether bytes are held up on the way to the
client (coalescing), how streams end, how fast a departed client's
generation is stopped, that the body was not altered (a digest), and the
one opt-in mode where relay adds bytes (SSE keep-alive comments).

This module holds the pure parts: the keep-alive comment and when it may
go out, how an error answer maps to an ending kind, and which requests the
built-in test stream (``--test-stream``) answers.
"""

from __future__ import annotations

import enum

# Names as the upstream wrote them: the one case-blind reader (re-exported).
from .headers import is_event_stream

__all__ = [
    "DIGEST_ALGORITHM",
    "ENDINGS",
    "KEEPALIVE_CHUNK",
    "KEEPALIVE_COMMENT",
    "LIMIT_CODES",
    "SelfRoute",
    "ending_for_status",
    "ends_event",
    "is_event_stream",
    "route_test_stream",
]

#: The SSE comment line relay sends while the upstream is silent. Clients
#: ignore lines starting with ``:`` (the SSE spec, §9.2.6).
KEEPALIVE_COMMENT = b": keep-alive\n\n"
#: The same as one chunk of its own, for a chunked response: never inside
#: another chunk, so the upstream's chunks reach the client unchanged.
KEEPALIVE_CHUNK = b"%x\r\n%b\r\n" % (len(KEEPALIVE_COMMENT), KEEPALIVE_COMMENT)

#: The body digest of the access line (``--body-digest``): hashlib's SHA-256
#: (OpenSSL, hardware-accelerated), so ``sha256sum`` can check it.
DIGEST_ALGORITHM = "sha256"

#: Every ending kind, as the access line's ``ending`` field spells it.
ENDINGS = ("complete", "upstream_cut", "client_gone", "timeout", "limit", "drain", "error")

#: Error codes of relay's own limits answered with a status that is not one
#: (the ``--max-inflight`` queue's 503s).
LIMIT_CODES = frozenset({"queue_full", "queue_timeout"})


def ending_for_status(status: int, code: str = "") -> str:
    """The ending kind of an exchange relay answered with error ``status`` (``code``).

    A deadline (408, 504) is a timeout; a size or rate limit (413, 429, 431)
    or a full or timed-out ``--max-inflight`` queue (503 ``queue_full``,
    ``queue_timeout``) is a limit; everything else (bad gateway, refused
    body) is an error.
    """
    if status in (408, 504):
        return "timeout"
    if status in (413, 429, 431) or code in LIMIT_CODES:
        return "limit"
    return "error"


def ends_event(last_read: bytes, *, chunked: bool) -> bool:
    """Whether the body forwarded so far ends at an SSE event boundary.

    ``last_read`` is the last upstream read forwarded (empty before the
    first body byte: the body's start is a boundary). For a chunked body the
    caller also checks that the framer sits between chunks; the read then
    ends with the chunk's CRLF, right after the event's blank line.
    """
    if not last_read:
        return True
    return last_read.endswith(b"\n\n\r\n" if chunked else b"\n\n")


class SelfRoute(enum.Enum):
    """What the test stream answers for a request under its path."""

    NOT_OURS = "not_ours"  # not under the test-stream path: proxied as usual
    STREAM = "stream"  # (chat) completions: paced events, or the whole answer
    MODELS = "models"  # the model list the probe asks for first
    NOT_FOUND = "not_found"  # under the path, but nothing there


def route_test_stream(prefix: str, method: bytes, target: bytes) -> tuple[SelfRoute, bool]:
    """Route a request for the test stream mounted at ``prefix`` (e.g. ``/relay-test``).

    Returns the route and whether it is a chat completion. The prefix is a
    base URL as ``relay probe`` takes it: ``{prefix}/v1/chat/completions``,
    ``{prefix}/v1/completions`` and ``{prefix}/v1/models``; a ``GET`` of the
    prefix itself streams too (for curl).
    """
    path = target.split(b"?", 1)[0]
    base = prefix.rstrip("/").encode()
    if path != base and not path.startswith(base + b"/"):
        return SelfRoute.NOT_OURS, False
    rest = path[len(base) :].rstrip(b"/")
    if rest in (b"", b"/v1/chat/completions", b"/v1/completions"):
        if (rest == b"") != (method == b"GET"):
            return SelfRoute.NOT_FOUND, False
        return SelfRoute.STREAM, rest != b"/v1/completions"
    if rest == b"/v1/models" and method == b"GET":
        return SelfRoute.MODELS, False
    return SelfRoute.NOT_FOUND, False
