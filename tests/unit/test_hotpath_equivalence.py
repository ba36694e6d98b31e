"""The per-request fast paths give what the plain versions they replaced gave.

The hot-path work made relay's per-request functions cheaper: one pass over a head's
fields, ``Connection`` parsed only when one came, a regex call only where a
bytes method cannot do. ``hotpath_reference`` keeps the plain versions; every
function here is run over a corpus (and Hypothesis' examples) against its
reference: same output bytes, same errors.
"""

from __future__ import annotations

import dataclasses

import hotpath_reference as ref
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from relay.core.upstream import Balancer
from relay.http import headers
from relay.http.outgoing import OutgoingRequest
from relay.http.requestplan import plan_request
from relay.http.usage import usage_from_json

# Names with a role somewhere in the header policy, plus plain ones and names
# that only ever appear as Connection tokens.
NAMES = [
    b"host",
    b"connection",
    b"keep-alive",
    b"proxy-connection",
    b"proxy-authorization",
    b"te",
    b"trailer",
    b"upgrade",
    b"expect",
    b"content-length",
    b"transfer-encoding",
    b"content-type",
    b"via",
    b"x-forwarded-for",
    b"x-forwarded-proto",
    b"x-accel-buffering",
    b"authorization",
    b"x-api-key",
    b"set-cookie",
    b"x-a",
    b"close",
]
VALUES = [
    b"",
    b"1",
    b"close",
    b"keep-alive",
    b"Keep-Alive, X-A",
    b" close ,, upgrade",
    b"text/event-stream",
    b"Text/Event-Stream; charset=utf-8",
    b"application/json",
    b"1.0 front",
    b"chunked",
]


def _cased(name: bytes, mask: int) -> bytes:
    return bytes(
        c - 32 if 97 <= c <= 122 and mask >> (i % 16) & 1 else c for i, c in enumerate(name)
    )


names = st.builds(_cased, st.sampled_from(NAMES), st.integers(0, 0xFFFF))
values = st.one_of(
    st.sampled_from(VALUES),
    st.lists(st.sampled_from([*NAMES, b" ", b",", b"", b"X-Other"])).map(b",".join),
)
fields = st.lists(st.tuples(names, values), max_size=12)

# Hand-picked cases, each a path of its own: Connection naming nothing,
# fields dropped already, plain fields, fields with a role (Host, Via, lists,
# Content-Type), several Connection lines, and list fields from a proxy in front.
CORPUS: list[list[tuple[bytes, bytes]]] = [
    [],
    [(b"Host", b"a"), (b"Content-Length", b"73"), (b"Content-Type", b"application/json")],
    [(b"Host", b"a"), (b"Connection", b"keep-alive")],
    [(b"Host", b"a"), (b"Connection", b"close")],
    [(b"Host", b"a"), (b"Connection", b"close, X-A"), (b"X-A", b"1"), (b"x-b", b"2")],
    [(b"Connection", b"host"), (b"Host", b"a")],
    [(b"Connection", b"Via, X-Forwarded-For"), (b"Via", b"1.0 a"), (b"X-Forwarded-For", b"1")],
    [(b"Connection", b"content-type"), (b"Content-Type", b"text/event-stream")],
    [(b"Connection", b"x-accel-buffering"), (b"X-Accel-Buffering", b"yes")],
    [(b"connection", b"x-a"), (b"Connection", b"x-b"), (b"X-A", b"1"), (b"X-B", b"2")],
    [(b"Connection", b",,"), (b"Connection", b"")],
    [(b"X-Forwarded-For", b"1"), (b"x-forwarded-for", b"2"), (b"Via", b"a"), (b"VIA", b"b")],
    [(b"Content-Type", b"text/plain"), (b"content-type", b"text/event-stream")],
    [(b"Content-Type", b"text/event-stream"), (b"X-Accel-Buffering", b"yes")],
    [(b"Trailer", b"x"), (b"Transfer-Encoding", b"chunked"), (b"Content-Length", b"1")],
    [(b"Authorization", b"Bearer c"), (b"X-Api-Key", b"k"), (b"Connection", b"authorization")],
    [(b"Server", b"nginx"), (b"Date", b"x"), (b"Connection", b"keep-alive")],
]


def _same(fast, slow, *args, **kwargs):
    """Both give the same value, or both raise the same error."""
    try:
        expected = slow(*args, **kwargs)
    except Exception as exc:  # the very error is compared
        with pytest.raises(type(exc)) as raised:
            fast(*args, **kwargs)
        assert str(raised.value) == str(exc)
        assert getattr(raised.value, "status", None) == getattr(exc, "status", None)
        return
    assert fast(*args, **kwargs) == expected


def _check_fields(raw: list[tuple[bytes, bytes]]) -> None:
    for strip in (False, True):
        for key in (None, "up-key"):
            _same(
                headers.request_headers_for_upstream,
                ref.request_headers_for_upstream,
                raw,
                client_host="10.0.0.1",
                scheme="https",
                upstream_authority="up:8000",
                strip_credentials=strip,
                upstream_key=key,
            )
    for framing in (False, True):
        for trailer in (False, True):
            _same(
                headers.response_headers_for_client,
                ref.response_headers_for_client,
                raw,
                keep_framing=framing,
                keep_trailer=trailer,
            )
    for token in (b"close", b"keep-alive", b"x-a", b""):
        _same(headers.has_token, ref.has_token, raw, b"connection", token)
    lower = [(name.lower(), value) for name, value in raw]
    _same(headers.check_request_headers, ref.check_request_headers, lower)
    _same(headers.request_head, ref.request_head, b"POST", b"/v1/x?a=1", raw)
    for status, reason in ((200, b""), (200, b"Fine"), (599, b""), (103, b"")):
        _same(headers.response_head, ref.response_head, status, reason, raw)
    _same(headers.response_head, ref.response_head, 200, b"", raw, http_version=b"1.0")


@pytest.mark.parametrize("raw", CORPUS)
def test_field_functions_match_the_reference_on_the_corpus(raw):
    """Each hand-picked head gets the same fields, tokens, checks and bytes as before."""
    _check_fields(raw)


@settings(max_examples=400, deadline=None)
@given(fields)
def test_field_functions_match_the_reference_on_any_fields(raw):
    """Any mix of roles, cases and Connection lists gets what the plain versions gave."""
    _check_fields(raw)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(names, st.binary(max_size=6))))
def test_field_value_checks_match_the_reference(raw):
    """Control bytes are refused in the same field, with the same message, as before
    (for the lower-case names h11 gives; tests/unit/test_header_case.py has any case)."""
    lower = [(name.lower(), value) for name, value in raw]
    _same(headers.check_request_headers, ref.check_request_headers, lower)


HEAD_PIECES = [
    b"GET / HTTP/1.1",
    b"\r\n",
    b"\n",
    b"\r",
    b"\r\n\r\n",
    b"\n\n",
    b"\n\r\n",
    b" ",
    b"\t",
    b"Content-Length",
    b"content-length",
    b"CONTENT-length ",
    b":",
    b": 3",
    b"3, 3",
    b"X",
    b"body",
]
HEADS = [
    b"",
    b"GET / HTTP/1.1\r\nHost: a\r\n\r\n",
    b"GET / HTTP/1.1\nHost: a\n\nbody",
    b"GET / HTTP/1.1\r\nHost: a\r\n\nbody\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\n\r\nbody\n\n",
    b"GET / HTTP/1.1\r\nContent-Length: 3\r\n\r\n3\r\nContent-Length: 3\r\n\r\n",
    b"GET / HTTP/1.1\r\nContent-Length: 3, 3\r\n\r\n",
    b"GET / HTTP/1.1\r\nContent-Length : 3\r\ncontent-length: 3\r\n\r\n",
    b"GET / HTTP/1.1\r\nX: a\r\n b\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a",
    b"\r\n\r\n",
    b"\n\n",
    b"\r\n\n",
    b"\n\r\n",
]


@pytest.mark.parametrize("raw_head", HEADS)
def test_raw_head_functions_match_the_reference_on_the_corpus(raw_head):
    """Each hand-picked head ends where it did and has the problem it had."""
    assert headers.head_length(raw_head) == ref.head_length(raw_head)
    assert headers.find_head_problem(raw_head) == ref.find_head_problem(raw_head)


@settings(max_examples=500, deadline=None)
@given(st.lists(st.sampled_from(HEAD_PIECES), max_size=24).map(b"".join))
def test_raw_head_functions_match_the_reference(raw_head):
    """Any mix of line ends, folds and Content-Length lines is read as before."""
    assert headers.head_length(raw_head) == ref.head_length(raw_head)
    assert headers.find_head_problem(raw_head) == ref.find_head_problem(raw_head)


_USAGE = b'"usage":{"prompt_tokens":9,"completion_tokens":1,"total_tokens":10}'
BODIES = [
    b"",
    b"{",
    b"{}",
    b"[]",
    b"null",
    b'{"model":"m",' + _USAGE + b"}",
    b'{"model":"m",' + _USAGE + b"}\n",
    b'{"model":"m",' + _USAGE + b"} \t\r\n ",
    b'{"model":"m",' + _USAGE + b"}\x0b",
    b'{"model":"m",' + _USAGE + b"} x",
    b'{"model":"m",' + _USAGE + b"}{}",
    b' {"model":"m",' + _USAGE + b"}",
    b'\xef\xbb\xbf{"model":"m",' + _USAGE + b"}",
    '{"model":"m",'.encode("utf-16-le")
    + _USAGE.decode().encode("utf-16-le")
    + "}".encode("utf-16-le"),
    '{"model":"m",'.encode("utf-32")
    + _USAGE.decode().encode("utf-32")[4:]
    + "}".encode("utf-32")[4:],
    b'{"model":"\xff",' + _USAGE + b"}",
    b'{"model":"\xed\xa0\x80",' + _USAGE + b"}",
    b'{"model":"\\ud800",' + _USAGE + b"}",
    b'{"model":"\xc3\xa9",' + _USAGE + b"}",
    b'{"meta_info":{"prompt_tokens":3,"completion_tokens":true}}',
    b'{"meta_info":{"prompt_tokens":3,"completion_tokens":4},"model":7}',
    b'{"usage":{"prompt_tokens":-1,"completion_tokens":4}}',
    b'{"usage":{"prompt_tokens":1.0,"completion_tokens":4}}',
    b'{"usage":null,"meta_info":{"prompt_tokens":1,"completion_tokens":2}}',
    b'{"a":NaN,' + _USAGE + b"}",
    b"{\x00\x00\x00",
    b"{\x00",
    b"x" * 57,
    b"[" + _USAGE + b"]",
    b'"usage"',
    b"123",
    b"\xa0{" + _USAGE + b"}",
    " {".encode("utf-16-le") + _USAGE.decode().encode("utf-16-le") + "}".encode("utf-16-le"),
    "{".encode("utf-16-be") + _USAGE.decode().encode("utf-16-be") + "}".encode("utf-16-be"),
    "\ufeff{".encode("utf-16-le") + _USAGE.decode().encode("utf-16-le") + "}".encode("utf-16-le"),
    b"\r\n\t {" + _USAGE + b"}",
]


def _chunked(body: bytes) -> list[bytes]:
    return [b"%x\r\n%b\r\n" % (len(body), body), b"0\r\n\r\n"] if body else [b"0\r\n\r\n"]


@pytest.mark.parametrize("body", BODIES)
def test_json_usage_matches_the_reference(body):
    """Each body, whole or chunked, in one read or several, gets the usage it got before."""
    for reads in ([body], [body[:5], body[5:]], _chunked(body)):
        chunked = reads[-1].endswith(b"0\r\n\r\n")
        got = usage_from_json(reads, chunked=chunked, max_bytes=ref.MAX_JSON_BYTES)
        expected = ref.usage_from_json(reads, chunked=chunked)
        assert (got, got.total, type(got)) == (expected, expected.total, type(expected))


@settings(max_examples=300, deadline=None)
@given(
    st.binary(max_size=40),
    st.sampled_from([b"{", b"", b" {", b'{"usage":{', b"[", b"x", b" \x00", b"\xef\xbb\xbf{"]),
)
def test_json_usage_matches_the_reference_on_any_bytes(tail, start):
    """Any bytes, JSON or not, get the usage (or none) they got before."""
    body = start + tail
    got = usage_from_json([body], chunked=False, max_bytes=ref.MAX_JSON_BYTES)
    assert got == ref.usage_from_json([body], chunked=False)


lower_fields = st.lists(
    st.tuples(
        st.sampled_from(NAMES),
        st.one_of(st.sampled_from([*VALUES, b"0", b"12", b"CLOSE", b"x-close"]), values),
    ),
    max_size=8,
)


@settings(max_examples=400, deadline=None)
@given(
    st.sampled_from([b"GET", b"POST", b"PUT", b"HEAD"]),
    st.sampled_from([b"/v1/models", b"/models?x=1", b"/v1/chat/completions", b"/"]),
    lower_fields,
    st.booleans(),
    st.booleans(),
    st.booleans(),
    st.booleans(),
)
@example(b"POST", b"/", [(b"connection", b"close"), (b"connection", b"x")], 0, 0, 0, 0)
@example(b"POST", b"/", [(b"connection", b"x, Close ,y"), (b"content-length", b"0")], 0, 0, 0, 0)
def test_request_plan_matches_the_reference(method, path, fields, rewrites, pins, routes, more):
    """Any request head (h11's lower-case names) gets the plan it got before, field for field."""
    flags = {
        "rewrites_models": rewrites,
        "pins_model": pins,
        "routes_by_model": routes,
        "knows_more_models": more,
    }
    got = plan_request(method, path, fields, **flags)
    expected = ref.plan_request(method, path, fields, **flags)
    assert got == expected
    assert dataclasses.asdict(got) == dataclasses.asdict(expected)


def _state(out):
    return (out.head_sent, out.complete, out.chunked, out.replay, out.headers)


@settings(max_examples=300, deadline=None)
@given(
    st.booleans(),
    st.lists(st.sampled_from([b"", b"a", b"bc", b"defgh"]), max_size=5),
    st.sampled_from([b"", b"xy"]),
    st.booleans(),
    st.integers(0, 12),
    st.lists(st.sampled_from([b"", b"tail"]), max_size=3),
)
def test_outgoing_request_matches_the_reference(chunked, early, first, ends, limit, late):
    """Pieces kept before the head, the head with them, the rest and a retry: same bytes."""
    fields = [(b"host", b"a"), (b"content-length", b"9")]
    fast = OutgoingRequest(b"POST", b"/x", list(fields), chunked=chunked, replay_limit=limit)
    slow = ref.OutgoingRequest(b"POST", b"/x", list(fields), chunked=chunked, replay_limit=limit)
    for piece in early:
        assert fast.remember(piece) == slow.remember(piece)
    assert fast.head(first, ends=ends) == slow.head(first, ends=ends)
    assert _state(fast) == _state(slow)
    for piece in late:
        assert fast.remember(piece) == slow.remember(piece)
        assert fast.frames((piece,)) == slow.frames((piece,))
    assert fast.end() == slow.end()
    fast.retry()
    slow.retry()
    assert fast.head(ends=True) == slow.head(ends=True)
    assert _state(fast) == _state(slow)


class _Pool:
    def __init__(self, name: int, outstanding: int, up: bool) -> None:
        self.name, self.outstanding, self.up = name, outstanding, up

    def available(self, now: float) -> bool:
        return self.up


@settings(max_examples=200, deadline=None)
@given(
    st.sampled_from(["least-requests", "random-two", "round-robin"]),
    st.lists(
        st.tuples(
            st.lists(st.tuples(st.integers(0, 3), st.booleans()), min_size=0, max_size=3),
            st.integers(0, 7),
        ),
        max_size=8,
    ),
)
def test_balancer_matches_the_reference(policy, rounds):
    """One candidate or several, excluded, ejected or busy: the same pool, turn after turn."""
    fast, slow = Balancer(policy), ref.ReferenceBalancer(policy)
    fast._random.seed(7)
    slow._random.seed(7)
    for specs, excluded in rounds:
        pools = [_Pool(i, n, up) for i, (n, up) in enumerate(specs)]
        exclude = {pool for pool in pools if excluded >> pool.name & 1}
        got, expected = fast.choose(pools, exclude), slow.choose(pools, exclude)
        assert (got and got.name) == (expected and expected.name)
        assert fast._turn == slow._turn
