"""Sans-IO header policy: what crosses relay in each direction, and head bytes.

Headers are lists of ``(name, value)`` byte pairs in the order and case the
peer sent them (h11's ``Headers.raw_items()``); duplicates stay duplicates,
because folding them into a dict loses ``Set-Cookie`` and friends.

Hop-by-hop fields (RFC 9110 §7.6.1) describe one connection, not the
message, so they stop at relay in both directions: ``Connection`` and every
field it names, ``Keep-Alive``, ``Proxy-*``, ``TE``, ``Upgrade``, and
``Trailer`` on requests. Framing fields (``Content-Length``,
``Transfer-Encoding``) are removed here and decided by the caller, which
knows how the body will be framed on the other connection.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from http import HTTPStatus

__all__ = [
    "HeaderList",
    "RequestHeadProblem",
    "check_request_headers",
    "find_head_problem",
    "has_token",
    "head_ended",
    "head_length",
    "is_event_stream",
    "is_json_or_untyped",
    "origin_form",
    "request_head",
    "request_headers_for_upstream",
    "response_head",
    "response_headers_for_client",
]

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

# What the one pass over a head's fields does with each (lower-case) name; a
# name not in the table is kept as it is: one dict lookup a field instead of
# several set tests. ``Connection`` is dropped and its values collected; only
# if they name a field the table keeps (``keep-alive`` is dropped anyway) does
# the pass run again with those names dropped too.
_DROP, _CONNECTION, _LIST, _HOST, _VIA, _ACCEL, _CONTENT_TYPE = range(7)
_Kinds = dict[bytes, int]
_GONE = (_DROP, _CONNECTION)

_REQUEST_KINDS: _Kinds = {
    **dict.fromkeys(_REQUEST_DROPS, _DROP),
    **dict.fromkeys(_LISTS_ADDED, _LIST),
    b"host": _HOST,
    b"connection": _CONNECTION,
}
_REQUEST_KINDS_NO_CREDENTIALS: _Kinds = {**_REQUEST_KINDS, **dict.fromkeys(_CREDENTIALS, _DROP)}


def _response_kinds(drops: frozenset[bytes]) -> _Kinds:
    return {
        **dict.fromkeys(drops, _DROP),
        b"via": _VIA,
        b"x-accel-buffering": _ACCEL,
        b"content-type": _CONTENT_TYPE,
        b"connection": _CONNECTION,
    }


_KEEP_FRAMING_AND_TRAILER = _response_kinds(_HOP_BY_HOP)
_KEEP_FRAMING = _response_kinds(_HOP_BY_HOP | {b"trailer"})
_KEEP_TRAILER = _response_kinds(_RESPONSE_DROPS)
_KEEP_NEITHER = _response_kinds(_RESPONSE_DROPS | {b"trailer"})

#: Field values are VCHAR / obs-text / SP / HTAB (RFC 9110 §5.5). h11 admits
#: other control bytes; relay refuses them rather than pass them on.
_FIELD_VALUE = re.compile(rb"[\t\x20-\x7e\x80-\xff]*")
# A line that begins with SP or HTAB inside a head continues the previous one
# (obs-fold, RFC 9112 §5.2); h11 unfolds it, relay rejects it, as nginx does.
_OBS_FOLD = re.compile(rb"\n[ \t]")
_CONTENT_LENGTH_LINE = re.compile(rb"\ncontent-length[ \t]*:([^\r\n]*)", re.IGNORECASE)

VIA = b"1.1 relay"
_VIA_FIELD = (b"via", VIA)
_ACCEL_FIELD = (b"x-accel-buffering", b"no")
#: ``(name, value)`` -> ``name: value`` (a head is its lines joined by CRLF).
_FIELD_LINE = b": ".join


class RequestHeadProblem(ValueError):
    """A request head relay refuses; ``status`` is the answer (400 or 501)."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


def _tokens(values: list[bytes]) -> frozenset[bytes]:
    """The (lower-case, non-empty) tokens of ``Connection`` field values."""
    tokens = {t.strip().lower() for value in values for t in value.split(b",")}
    tokens.discard(b"")
    return frozenset(tokens)


def _named(values: list[bytes], kinds: _Kinds) -> set[bytes] | None:
    """The names ``Connection`` lists that ``kinds`` keeps as plain fields (none when it
    drops them all, as the usual ``keep-alive``); None when one has a role of its
    own (``Host``, ``Via``, ...): that takes another pass with the names dropped."""
    kept: set[bytes] = set()
    for value in values:
        for token in value.split(b","):
            name = token.strip().lower()
            kind = kinds.get(name)
            if kind is None:
                if name:
                    kept.add(name)
            elif kind not in _GONE:
                return None
    return kept


def has_token(headers: Iterable[tuple[bytes, bytes]], name: bytes, token: bytes) -> bool:
    """Whether comma-list header ``name`` (lower case) holds ``token`` (lower case)."""
    size = len(name)
    for field_name, value in headers:
        # The length first: most fields are not ``name``, and len() is cheaper than lower().
        if len(field_name) == size and field_name.lower() == name:
            lower = value.lower()
            # A token is a piece of the value: without the bytes, no need to split.
            if token in lower and any(t.strip() == token for t in lower.split(b",")):
                return True
    return False


def _head_end(raw_head: bytes) -> tuple[int, int]:
    """The LF that ends the head's last line, and the end of the empty line after it.

    ``(-1, -1)`` without an empty line. What the regex ``\\r?\\n\\r?\\n``
    finds, with two ``bytes.find`` calls instead of a regex search, which
    steps through the head byte by byte (it cannot skip ahead to a fixed
    first byte): the first LF followed by LF or CRLF.
    """
    crlf = raw_head.find(b"\n\r\n")
    # Only an ``LF LF`` before that one can come first.
    lf = raw_head.find(b"\n\n", 0, crlf + 1) if crlf >= 0 else raw_head.find(b"\n\n")
    if lf >= 0:
        return lf, lf + 2
    if crlf >= 0:
        return crlf, crlf + 3
    return -1, -1


def find_head_problem(raw_head: bytes) -> str | None:
    """Framing ambiguities in the raw bytes of a request head that h11 smooths over.

    ``raw_head`` is the bytes received from the start of the request; only
    the part up to the first empty line is looked at. h11 unfolds obs-fold
    and merges identical ``Content-Length`` lines (and lists such as
    ``3, 3`` in one line); both are classic
    request-smuggling vectors between two parsers, so relay refuses them.
    """
    last, _ = _head_end(raw_head)
    # Through the LF of the last line (the regex's match began at its CR, if
    # any: no pattern below can tell, a line ends at either).
    head = raw_head[: last + 1] if last >= 0 else raw_head
    if _OBS_FOLD.search(head):
        return "obsolete line folding in request head"
    lengths = _CONTENT_LENGTH_LINE.findall(head)
    # ``Content-Length: 3, 3`` is a list of lengths in one line: h11 merges
    # it like two lines, relay refuses it like two lines.
    if lengths and (len(lengths) > 1 or b"," in lengths[0]):
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


def head_ended(received: bytes | bytearray, new: int) -> bool:
    """Whether ``received``, a head's bytes so far whose last ``new`` just came,
    now holds the empty line that ends it (what :func:`_head_end` finds).

    Only the new bytes and the two before them (an ``LF`` or ``LF CR`` that
    the new bytes may complete) are searched: the bytes before came with a
    call that found no end.
    """
    start = max(0, len(received) - new - 2)
    return received.find(b"\n\n", start) >= 0 or received.find(b"\n\r\n", start) >= 0


def head_length(raw_head: bytes) -> int:
    """Length of the head at the start of ``raw_head`` (through its empty line)."""
    _, end = _head_end(raw_head)
    return end if end >= 0 else len(raw_head)


def check_request_headers(headers: Sequence[tuple[bytes, bytes]]) -> None:
    """Refuse framing that two parsers could read two ways (RFC 9112 §6.3).

    ``headers`` are the request's fields (names in any case).
    Raises :class:`RequestHeadProblem`.
    """
    values = []
    saw_length = saw_encoding = False
    for name, value in headers:
        values.append(value)
        size = len(name)  # the length first: most names are neither
        if size == 14 and name.lower() == b"content-length":
            saw_length = True
        elif size == 17 and name.lower() == b"transfer-encoding":
            saw_encoding = True
    # One match over all values (HTAB, which joins them, is valid): a regex
    # call costs more than the bytes it reads. The failing field is looked for
    # only when there is one.
    if _FIELD_VALUE.fullmatch(b"\t".join(values)) is None:
        for name, value in headers:
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
    kinds = _REQUEST_KINDS_NO_CREDENTIALS if strip_credentials or upstream_key else _REQUEST_KINDS
    out, lists, connection, has_host = _request_pass(raw_headers, kinds)
    if connection:
        named = _named(connection, kinds)
        if named:
            out = [pair for pair in out if pair[0].lower() not in named]
        elif named is None:
            kinds = {**kinds, **dict.fromkeys(_tokens(connection), _DROP)}
            out, lists, _, has_host = _request_pass(raw_headers, kinds)
    if not has_host:
        out.insert(0, (b"host", upstream_authority.encode("ascii")))
    added = (
        (b"x-forwarded-for", client_host.encode("ascii")),
        (b"x-forwarded-proto", scheme.encode("ascii")),
        _VIA_FIELD,
    )
    if lists is None:  # the common case: nobody in front of relay added to these
        out += added
    else:
        for name, item in added:
            earlier = lists.get(name)
            out.append((name, b", ".join([*earlier, item]) if earlier else item))
    if upstream_key:
        out.append((b"authorization", b"Bearer " + upstream_key.encode("latin-1")))
    return out


def _request_pass(
    raw_headers: list[tuple[bytes, bytes]], kinds: _Kinds
) -> tuple[HeaderList, dict[bytes, list[bytes]] | None, list[bytes], bool]:
    """The kept fields, the list fields relay adds to (None if none came), the
    ``Connection`` values, and whether a ``Host`` came."""
    out: HeaderList = []
    lists: dict[bytes, list[bytes]] | None = None
    connection: list[bytes] = []
    has_host = False
    for pair in raw_headers:
        kind = kinds.get(pair[0].lower())
        if kind is None:
            out.append(pair)
        elif kind == _DROP:
            continue
        elif kind == _HOST:
            has_host = True
            out.append(pair)
        elif kind == _LIST:
            if lists is None:
                lists = {}
            lists.setdefault(pair[0].lower(), []).append(pair[1])
        elif kind == _CONNECTION:
            connection.append(pair[1])
    return out, lists, connection, has_host


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
    if keep_framing:
        kinds = _KEEP_FRAMING_AND_TRAILER if keep_trailer else _KEEP_FRAMING
    else:
        kinds = _KEEP_TRAILER if keep_trailer else _KEEP_NEITHER
    out, vias, connection, event_stream, accel = _response_pass(raw_headers, kinds)
    if connection:
        named = _named(connection, kinds)
        if named:
            out = [pair for pair in out if pair[0].lower() not in named]
        elif named is None:
            kinds = {**kinds, **dict.fromkeys(_tokens(connection), _DROP)}
            out, vias, _, event_stream, accel = _response_pass(raw_headers, kinds)
    if event_stream and not accel:
        out.append(_ACCEL_FIELD)
    if vias:
        vias.append(VIA)
        out.append((b"via", b", ".join(vias)))
    else:
        out.append(_VIA_FIELD)
    return out


def _response_pass(
    raw_headers: list[tuple[bytes, bytes]], kinds: _Kinds
) -> tuple[HeaderList, list[bytes], list[bytes], bool, bool]:
    """The kept fields, the ``Via`` values, the ``Connection`` values, whether the
    body is an event stream, and whether ``X-Accel-Buffering`` came."""
    out: HeaderList = []
    vias: list[bytes] = []
    connection: list[bytes] = []
    accel = event_stream = False
    for pair in raw_headers:
        kind = kinds.get(pair[0].lower())
        if kind is None:
            out.append(pair)
        elif kind == _DROP:
            continue
        elif kind == _CONTENT_TYPE:
            if not event_stream:
                media = pair[1].split(b";", 1)[0].strip().lower()
                event_stream = media == b"text/event-stream"
            out.append(pair)
        elif kind == _VIA:
            vias.append(pair[1])
        elif kind == _ACCEL:
            accel = True
            out.append(pair)
        elif kind == _CONNECTION:
            connection.append(pair[1])
    return out, vias, connection, event_stream, accel


def request_head(method: bytes, target: bytes, headers: Iterable[tuple[bytes, bytes]]) -> bytes:
    """Serialize an HTTP/1.1 request head from fields relay already validated.

    The method and target come from h11's parse of the client's request, the
    fields from :func:`request_headers_for_upstream` (the client's fields,
    which h11 validated, and relay's own): nothing here needs checking again.
    """
    return b"\r\n".join([b"%b %b HTTP/1.1" % (method, target), *map(_FIELD_LINE, headers), b"\r\n"])


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
    status_line = b"HTTP/%b %d %b" % (http_version, status, reason)
    return b"\r\n".join([status_line, *map(_FIELD_LINE, headers), b"\r\n"])
