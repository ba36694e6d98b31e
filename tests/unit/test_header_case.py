"""Every header relay reads, from a client or an upstream, is found whatever the case
of its name: a table of each reader, run with the name in lower case, in capitals
and in mixed case.

h11 lower-cases the names it hands out by iteration, but relay also reads names as
they were written (``raw_items()``: the upstream's head keeps its case), and a reader
must not depend on which of the two it was given.
"""

from __future__ import annotations

import gzip
from collections.abc import Callable

import h11
import pytest

from relay.config import Config
from relay.core.admission import NO_HOOKS, Ticket
from relay.core.fidelity import StreamWatch
from relay.core.metrics import Metrics
from relay.http import fidelity, headers
from relay.http.auth import KeyRing
from relay.http.framing import BodyKind, ClientFraming
from relay.http.requestplan import plan_request
from relay.tools.probe import _decoder_for

Fields = list[tuple[bytes, bytes]]


def spell(name: bytes, case: str) -> bytes:
    if case == "lower":
        return name.lower()
    if case == "upper":
        return name.upper()
    return b"-".join(part.capitalize() for part in name.split(b"-"))


def sse_watch(fields: Fields) -> bool:
    watch = StreamWatch(Config(), Metrics())
    watch.head(200, fields, BodyKind.CHUNKED, ClientFraming.SAME, None)
    return watch.sse


def usage_kept(fields: Fields) -> bool:
    return Ticket(Metrics()).response_started(200, fields) is not NO_HOOKS


def framing_refused(fields: Fields) -> bool:
    try:
        headers.check_request_headers(fields)
    except headers.RequestHeadProblem:
        return True
    return False


def plan(fields: Fields) -> tuple[bool, bool, bytes | None, bool]:
    p = plan_request(
        b"POST",
        b"/v1/completions",
        fields,
        rewrites_models=False,
        pins_model=False,
        routes_by_model=False,
        knows_more_models=False,
    )
    return p.expects_body, p.chunked, p.length, p.client_closes


def names(fields: Fields) -> set[bytes]:
    return {name.lower() for name, _ in fields}


def to_upstream(fields: Fields) -> set[bytes]:
    return names(
        headers.request_headers_for_upstream(
            fields,
            client_host="127.0.0.1",
            scheme="http",
            upstream_authority="u:1",
            strip_credentials=True,
        )
    )


def to_client(fields: Fields) -> set[bytes]:
    return names(
        headers.response_headers_for_client(fields, keep_framing=False, keep_trailer=False)
    )


def decoded(fields: Fields) -> bytes:
    response = h11.Response(status_code=200, headers=fields)
    decoder = _decoder_for(response)
    out = b"".join(decoder.feed(gzip.compress(b"hello")))
    decoder.finish()
    return out


KEYS = KeyRing(["sk-1"])  # a plain key is named by its digest

#: (what is read, the fields with a placeholder name, the reader, what it must find)
TABLE: list[tuple[str, list[tuple[bytes, bytes]], Callable[[Fields], object], object]] = [
    (
        "event stream (keep-alive, stream label)",
        [(b"content-type", b"text/event-stream")],
        fidelity.is_event_stream,
        True,
    ),
    (
        "event stream (headers)",
        [(b"content-type", b"text/event-stream")],
        headers.is_event_stream,
        True,
    ),
    ("event stream (StreamWatch.head)", [(b"content-type", b"text/event-stream")], sse_watch, True),
    (
        "content type for usage (stream)",
        [(b"content-type", b"text/event-stream")],
        usage_kept,
        True,
    ),
    (
        "content type for usage (JSON)",
        [(b"content-type", b"application/json"), (b"content-length", b"2")],
        usage_kept,
        True,
    ),
    (
        "JSON request body (model rewrite)",
        [(b"content-type", b"text/plain")],
        headers.is_json_or_untyped,
        False,
    ),
    (
        "framing conflict (CL + TE)",
        [(b"content-length", b"3"), (b"transfer-encoding", b"chunked")],
        framing_refused,
        True,
    ),
    ("request length", [(b"content-length", b"7")], plan, (True, False, b"7", False)),
    ("request chunked", [(b"transfer-encoding", b"chunked")], plan, (True, True, None, False)),
    ("request Connection: close", [(b"connection", b"close")], plan, (False, False, None, True)),
    (
        "Connection token",
        [(b"connection", b"keep-alive, close")],
        lambda f: headers.has_token(f, b"connection", b"close"),
        True,
    ),
    ("Authorization", [(b"authorization", b"Bearer sk-1")], KEYS.match, "key-0f2c10bf"),
    ("x-api-key", [(b"x-api-key", b"sk-1")], KEYS.match, "key-0f2c10bf"),
    (
        "hop-by-hop to upstream (Connection, TE, Upgrade, Keep-Alive, credentials)",
        [
            (b"connection", b"x-private"),
            (b"x-private", b"1"),
            (b"te", b"trailers"),
            (b"upgrade", b"h2c"),
            (b"keep-alive", b"timeout=5"),
            (b"authorization", b"Bearer sk-1"),
            (b"x-api-key", b"sk-1"),
            (b"trailer", b"x-t"),
            (b"expect", b"100-continue"),
            (b"accept", b"*/*"),
        ],
        to_upstream,
        {b"accept", b"host", b"x-forwarded-for", b"x-forwarded-proto", b"via"},
    ),
    (
        "hop-by-hop to client (Connection, Keep-Alive, Trailer, framing)",
        [
            (b"connection", b"x-private"),
            (b"x-private", b"1"),
            (b"keep-alive", b"timeout=5"),
            (b"trailer", b"x-t"),
            (b"transfer-encoding", b"chunked"),
            (b"content-length", b"5"),
            (b"content-type", b"application/json"),
        ],
        to_client,
        {b"content-type", b"via"},
    ),
    ("content encoding (probe)", [(b"content-encoding", b"gzip")], decoded, b"hello"),
]


@pytest.mark.parametrize("case", ["lower", "upper", "mixed"])
@pytest.mark.parametrize(
    ("fields", "reader", "expected"),
    [pytest.param(f, r, e, id=what) for what, f, r, e in TABLE],
)
def test_each_header_reader_ignores_the_case_of_the_name(case, fields, reader, expected):
    spelled = [(spell(name, case), value) for name, value in fields]
    assert reader(spelled) == expected
