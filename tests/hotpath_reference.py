"""relay's per-request functions as they were before the hot-path work.

The reference the equivalence tests (tests/unit/test_hotpath_equivalence.py)
hold the fast versions to: same input, same output, same error. Kept as it
was written, slower but plain; not imported by relay.
"""

# ruff: noqa

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from http import HTTPStatus

from relay.http.headers import RequestHeadProblem

HeaderList = list[tuple[bytes, bytes]]

_HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"te",
        b"upgrade",
    }
)
_CREDENTIALS = frozenset({b"authorization", b"x-api-key"})
_FRAMING = frozenset({b"content-length", b"transfer-encoding"})
# Expect is answered by relay itself (it sends 100 Continue when it is ready
# for the body), so the upstream never waits for a continue of its own.
_REQUEST_ONLY_DROPS = frozenset({b"trailer", b"expect"})
_REQUEST_DROPS = _HOP_BY_HOP | _FRAMING | _REQUEST_ONLY_DROPS
_RESPONSE_DROPS = _HOP_BY_HOP | _FRAMING
#: List fields relay appends its own entry to (duplicate lines merged).
_LISTS_ADDED = frozenset({b"x-forwarded-for", b"x-forwarded-proto", b"via"})

#: Field values are VCHAR / obs-text / SP / HTAB (RFC 9110 §5.5). h11 admits
#: other control bytes; relay refuses them rather than pass them on.
_FIELD_VALUE = re.compile(rb"[\t\x20-\x7e\x80-\xff]*")
# A line that begins with SP or HTAB inside a head continues the previous one
# (obs-fold, RFC 9112 §5.2); h11 unfolds it, relay rejects it, as nginx does.
_OBS_FOLD = re.compile(rb"\n[ \t]")
_CONTENT_LENGTH_LINE = re.compile(rb"\ncontent-length[ \t]*:([^\r\n]*)", re.IGNORECASE)
_HEAD_END = re.compile(rb"\r?\n\r?\n")

VIA = b"1.1 relay"


def _connection_tokens(headers: Iterable[tuple[bytes, bytes]]) -> frozenset[bytes]:
    tokens: set[bytes] = set()
    for name, value in headers:
        if len(name) == 10 and name.lower() == b"connection":
            tokens.update(t.strip().lower() for t in value.split(b","))
    tokens.discard(b"")
    return frozenset(tokens)


def has_token(headers: Iterable[tuple[bytes, bytes]], name: bytes, token: bytes) -> bool:
    """Whether comma-list header ``name`` (lower case) holds ``token`` (lower case)."""
    for field_name, value in headers:
        if field_name.lower() == name and any(
            t.strip().lower() == token for t in value.split(b",")
        ):
            return True
    return False


def find_head_problem(raw_head: bytes) -> str | None:
    """Framing ambiguities in the raw bytes of a request head that h11 smooths over.

    ``raw_head`` is the bytes received from the start of the request; only
    the part up to the first empty line is looked at. h11 unfolds obs-fold
    and merges identical ``Content-Length`` lines (and lists such as
    ``3, 3`` in one line); both are classic
    request-smuggling vectors between two parsers, so relay refuses them.
    """
    end = _HEAD_END.search(raw_head)
    head = raw_head[: end.start() + 1] if end else raw_head
    if _OBS_FOLD.search(head):
        return "obsolete line folding in request head"
    lengths = _CONTENT_LENGTH_LINE.findall(head)
    # ``Content-Length: 3, 3`` is a list of lengths in one line: h11 merges
    # it like two lines, relay refuses it like two lines.
    if len(lengths) > 1 or any(b"," in value for value in lengths):
        return "duplicate Content-Length header"
    return None


_ABSOLUTE_FORM = re.compile(rb"[A-Za-z][A-Za-z0-9+.\-]*://([^/?#]*)([^#]*)")


def origin_form(target: bytes) -> bytes:
    """The request target to send upstream: absolute-form becomes origin-form.

    RFC 9112 §3.2.2: a client sends absolute-form (``http://host/path?q``) to
    a proxy, and a server must accept it; the upstream, an origin server
    behind relay, gets ``/path?q`` (``/`` when the path is empty, ``/?q``
    with only a query). Origin-form and asterisk-form (``OPTIONS *``) pass
    unchanged, as does anything relay does not recognise.
    """
    if target.startswith(b"/") or target == b"*":
        return target
    match = _ABSOLUTE_FORM.fullmatch(target)
    if match is None:
        return target
    rest = match.group(2)
    return rest if rest.startswith(b"/") else b"/" + rest


def head_length(raw_head: bytes) -> int:
    """Length of the head at the start of ``raw_head`` (through its empty line)."""
    end = _HEAD_END.search(raw_head)
    return end.end() if end else len(raw_head)


def check_request_headers(headers: Sequence[tuple[bytes, bytes]]) -> None:
    """Refuse framing that two parsers could read two ways (RFC 9112 §6.3).

    ``headers`` are h11's normalized request headers (lower-case names).
    Raises :class:`RequestHeadProblem`.
    """
    saw_length = saw_encoding = False
    for name, value in headers:
        if name == b"content-length":
            saw_length = True
        elif name == b"transfer-encoding":
            saw_encoding = True
        if _FIELD_VALUE.fullmatch(value) is None:
            raise RequestHeadProblem(f"invalid byte in header {name.decode('ascii')}")
    if saw_length and saw_encoding:
        raise RequestHeadProblem("both Content-Length and Transfer-Encoding")


def request_headers_for_upstream(
    raw_headers: Iterable[tuple[bytes, bytes]],
    *,
    client_host: str,
    scheme: str,
    upstream_authority: str,
    strip_credentials: bool = False,
    upstream_key: str | None = None,
) -> HeaderList:
    """The request headers to send upstream, without framing fields.

    ``X-Forwarded-For`` and ``X-Forwarded-Proto`` get the client's address
    and scheme appended (``Forwarded``-style list semantics, so a trusted
    proxy in front keeps its entries); ``Via`` gets relay's entry; ``Host``
    passes through and is added only when an HTTP/1.0 client sent none.
    ``strip_credentials`` drops the client's ``Authorization`` and
    ``x-api-key`` (relay's own keys never reach the upstream);
    ``upstream_key`` puts relay's key for the upstream in their place.
    """
    raw_headers = list(raw_headers)
    named = _connection_tokens(raw_headers)
    drop = _REQUEST_DROPS | named if named else _REQUEST_DROPS
    if strip_credentials or upstream_key:
        drop = drop | _CREDENTIALS
    out: HeaderList = []
    # The list fields relay adds to, collected in one pass and merged below.
    lists: dict[bytes, list[bytes]] = {}
    has_host = False
    for pair in raw_headers:
        lower = pair[0].lower()
        if lower in drop:
            continue
        if lower in _LISTS_ADDED:
            lists.setdefault(lower, []).append(pair[1])
            continue
        if lower == b"host":
            has_host = True
        out.append(pair)
    if not has_host:
        out.insert(0, (b"host", upstream_authority.encode("ascii")))
    for name, item in (
        (b"x-forwarded-for", client_host.encode("ascii")),
        (b"x-forwarded-proto", scheme.encode("ascii")),
        (b"via", VIA),
    ):
        earlier = lists.get(name)
        out.append((name, b", ".join([*earlier, item]) if earlier else item))
    if upstream_key:
        out.append((b"authorization", b"Bearer " + upstream_key.encode("latin-1")))
    return out


def is_json_or_untyped(headers: Iterable[tuple[bytes, bytes]]) -> bool:
    """Whether the ``Content-Type`` is JSON (``application/json``, ``*+json``) or absent."""
    for name, value in headers:
        if name.lower() == b"content-type":
            media = value.split(b";", 1)[0].strip().lower()
            return media == b"application/json" or media.endswith(b"+json")
    return True


def is_event_stream(headers: Iterable[tuple[bytes, bytes]]) -> bool:
    """Whether the ``Content-Type`` is ``text/event-stream`` (SSE)."""
    for name, value in headers:
        if name.lower() == b"content-type":
            return value.split(b";", 1)[0].strip().lower() == b"text/event-stream"
    return False


def response_headers_for_client(
    raw_headers: Iterable[tuple[bytes, bytes]],
    *,
    keep_framing: bool,
    keep_trailer: bool,
) -> HeaderList:
    """The upstream's response headers as the client should get them.

    ``keep_framing`` keeps ``Content-Length`` / ``Transfer-Encoding`` as the
    upstream sent them (the body is forwarded byte for byte); otherwise the
    caller adds its own. ``keep_trailer`` keeps ``Trailer`` (true when the
    trailer section itself is forwarded). Server-sent events get
    ``X-Accel-Buffering: no`` so an nginx in front of relay does not buffer.
    """
    raw_headers = list(raw_headers)
    named = _connection_tokens(raw_headers)
    drop = _HOP_BY_HOP if keep_framing else _RESPONSE_DROPS
    if named:
        drop = drop | named
    out: HeaderList = []
    vias: list[bytes] = []
    accel = event_stream = False
    for pair in raw_headers:
        lower = pair[0].lower()
        if lower in drop or (lower == b"trailer" and not keep_trailer):
            continue
        if lower == b"via":
            vias.append(pair[1])
            continue
        if lower == b"x-accel-buffering":
            accel = True
        elif lower == b"content-type" and not event_stream:
            event_stream = pair[1].split(b";", 1)[0].strip().lower() == b"text/event-stream"
        out.append(pair)
    if event_stream and not accel:
        out.append((b"x-accel-buffering", b"no"))
    vias.append(VIA)
    out.append((b"via", b", ".join(vias)))
    return out


def request_head(method: bytes, target: bytes, headers: Iterable[tuple[bytes, bytes]]) -> bytes:
    """Serialize an HTTP/1.1 request head from fields relay already validated.

    The method and target come from h11's parse of the client's request, the
    fields from :func:`request_headers_for_upstream` (the client's fields,
    which h11 validated, and relay's own): nothing here needs checking again.
    """
    parts = [method, b" ", target, b" HTTP/1.1\r\n"]
    for name, value in headers:
        parts += (name, b": ", value, b"\r\n")
    parts.append(b"\r\n")
    return b"".join(parts)


def response_head(
    status: int,
    reason: bytes,
    headers: Iterable[tuple[bytes, bytes]],
    *,
    http_version: bytes = b"1.1",
) -> bytes:
    """Serialize a response head; an empty ``reason`` gets the standard phrase."""
    if not reason:
        try:
            reason = HTTPStatus(status).phrase.encode("ascii")
        except ValueError:
            reason = b""
    parts = [b"HTTP/%b %d %b\r\n" % (http_version, status, reason)]
    parts.extend(b"%b: %b\r\n" % pair for pair in headers)
    parts.append(b"\r\n")
    return b"".join(parts)


# -- relay/http/usage.py ------------------------------------------------------

from typing import Any

from relay.http.usage import NO_USAGE, Usage, _dechunk

#: The bound the reference was written for (now ``--max-usage-bytes``).
MAX_JSON_BYTES = 1024 * 1024


def _count(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


def _from_document(document: Any) -> Usage | None:
    """Usage from one decoded JSON document (OpenAI ``usage`` or SGLang ``meta_info``)."""
    if not isinstance(document, dict):
        return None
    model = document.get("model")
    model = model if isinstance(model, str) else None
    for member in ("usage", "meta_info"):
        usage = document.get(member)
        if isinstance(usage, dict):
            prompt = _count(usage.get("prompt_tokens"))
            completion = _count(usage.get("completion_tokens"))
            if prompt is not None and completion is not None:
                return Usage(prompt, completion, "reported", model)
    return None


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
        document = json.loads(body)
    except ValueError:  # not JSON, not UTF-8, or compressed
        return NO_USAGE
    return _from_document(document) or NO_USAGE


# -- relay/http/requestplan.py ------------------------------------------------

from relay.http.requestplan import RequestPlan

_MODEL_LISTS = (b"/v1/models", b"/models")


def is_json_or_untyped(headers: Iterable[tuple[bytes, bytes]]) -> bool:
    for name, value in headers:
        if name.lower() == b"content-type":
            media = value.split(b";", 1)[0].strip().lower()
            return media == b"application/json" or media.endswith(b"+json")
    return True


def plan_request(
    method: bytes,
    path: bytes,
    fields: Sequence[tuple[bytes, bytes]],
    *,
    rewrites_models: bool,
    pins_model: bool,
    routes_by_model: bool,
    knows_more_models: bool,
) -> RequestPlan:
    expects_body = chunked = False
    length: bytes | None = None
    for name, value in fields:
        if name == b"content-length":
            length = value
            expects_body = value != b"0"
        elif name == b"transfer-encoding":
            expects_body = chunked = True
    must_read = pins_model or routes_by_model
    inspect = (
        (rewrites_models or routes_by_model)
        and method == b"POST"
        and expects_body
        and (must_read or is_json_or_untyped(fields))
    )
    return RequestPlan(
        expects_body=expects_body,
        chunked=chunked,
        length=length,
        client_closes=has_token(fields, b"connection", b"close"),
        lists_models=method == b"GET"
        and not expects_body
        and knows_more_models
        and path.split(b"?", 1)[0] in _MODEL_LISTS,
        inspect=inspect,
        must_read_model=must_read,
        route_by_body=inspect and routes_by_model,
    )


# -- relay/http/outgoing.py ---------------------------------------------------

from relay.http.framing import LAST_CHUNK
from relay.http.outgoing import REPLAY_LIMIT

HeaderList = list[tuple[bytes, bytes]]


class OutgoingRequest:
    """What to write upstream, step by step; the caller writes the bytes it returns.

    ``head_sent`` turns true with :meth:`head`; ``complete`` when the whole
    request (its end included) has been handed out.
    """

    def __init__(
        self,
        method: bytes,
        target: bytes,
        headers: HeaderList,
        *,
        chunked: bool,
        replay_limit: int = REPLAY_LIMIT,
    ) -> None:
        self.method = method
        self.target = target
        self.headers = headers
        self.chunked = chunked
        self.head_sent = False
        self.complete = False
        self.replay: list[bytes] | None = []  # pieces handed out so far (None: too many)
        self._replay_size = 0
        self._replay_limit = replay_limit

    def replace_body(self, pieces: list[bytes], length: int) -> None:
        """The whole (inspected, maybe rewritten) body, sent with a Content-Length."""
        framing = (b"content-length", b"transfer-encoding")
        self.headers = [(n, v) for n, v in self.headers if n not in framing]
        self.headers.append((b"content-length", b"%d" % length))
        self.chunked = False
        self.replay = pieces

    def remember(self, data: bytes) -> bool:
        """Keep ``data`` for a replay; false once the body is too big to replay."""
        if self.replay is None:
            return False
        self._replay_size += len(data)
        if self._replay_size > self._replay_limit:
            self.replay = None
            return False
        self.replay.append(data)
        return True

    def frames(self, pieces: Iterable[bytes]) -> list[bytes]:
        """Body pieces as they go upstream: as they are, or each as one chunk."""
        if not self.chunked:
            return [piece for piece in pieces if piece]
        out: list[bytes] = []
        for piece in pieces:
            if piece:
                out += (b"%x\r\n" % len(piece), piece, b"\r\n")
        return out

    def head(self, first: bytes = b"", *, ends: bool) -> list[bytes]:
        """The head with the body handed out so far (and ``first``), for one write.

        ``ends``: the client's request is complete, so its end goes too.
        """
        parts = [request_head(self.method, self.target, self.headers)]
        parts += self.frames(self.replay or ())
        if first:
            parts += self.frames((first,))
        self.head_sent = True
        if ends:
            parts += self.end()
        return parts

    def end(self) -> list[bytes]:
        """The request's end: the last chunk, or nothing for a sized body."""
        self.complete = True
        return [LAST_CHUNK] if self.chunked else []

    def retry(self) -> None:
        """A fresh connection: everything goes out again from the head."""
        self.head_sent = self.complete = False


# -- relay/core/upstream.py ---------------------------------------------------

import time

from relay.core.upstream import Balancer


class ReferenceBalancer(Balancer):
    """:class:`Balancer` with the choose() it had, before the one-candidate shortcut."""

    def choose(self, candidates, exclude):
        remaining = [pool for pool in candidates if pool not in exclude]
        if not remaining:
            return None
        now = time.monotonic()
        pools = [pool for pool in remaining if pool.available(now)] or remaining
        self._turn += 1
        if self.policy == "round-robin" or len(pools) == 1:
            return pools[self._turn % len(pools)]
        if self.policy == "random-two":
            first, second = self._random.sample(pools, 2)
            return first if first.outstanding <= second.outstanding else second
        start = self._turn % len(pools)
        rotated = pools[start:] + pools[:start]
        return min(rotated, key=lambda pool: pool.outstanding)
