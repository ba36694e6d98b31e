"""The request-side decisions and the outgoing request, without sockets."""

from __future__ import annotations

import pytest

from relay.http.framing import LAST_CHUNK
from relay.http.outgoing import OutgoingRequest
from relay.http.requestplan import plan_request

JSON = [(b"content-type", b"application/json")]
LENGTH = [(b"content-length", b"12")]
CHUNKED = [(b"transfer-encoding", b"chunked")]
NONE: list[tuple[bytes, bytes]] = []
TEXT = [*LENGTH, (b"content-type", b"text/plain")]

PLAIN = {"rewrites_models": False, "pins_model": False, "routes_by_model": False}
ALIASES = {"rewrites_models": True, "pins_model": False, "routes_by_model": False}
PINNED = {"rewrites_models": True, "pins_model": True, "routes_by_model": False}
ROUTED = {"rewrites_models": False, "pins_model": False, "routes_by_model": True}


@pytest.mark.parametrize(
    ("method", "path", "fields", "config", "more", "expected"),
    [
        # (expects_body, chunked, inspect, must_read, route_by_body, lists_models)
        (b"POST", b"/v1/chat/completions", LENGTH + JSON, PLAIN, False, (1, 0, 0, 0, 0, 0)),
        (b"POST", b"/v1/chat/completions", CHUNKED, PLAIN, False, (1, 1, 0, 0, 0, 0)),
        (b"POST", b"/v1/chat/completions", LENGTH + JSON, ALIASES, True, (1, 0, 1, 0, 0, 0)),
        (
            b"POST",
            b"/x",
            TEXT,
            ALIASES,
            True,
            (1, 0, 0, 0, 0, 0),
        ),
        (
            b"POST",
            b"/x",
            TEXT,
            PINNED,
            True,
            (1, 0, 1, 1, 0, 0),
        ),
        (b"POST", b"/x", LENGTH, ROUTED, True, (1, 0, 1, 1, 1, 0)),
        (b"POST", b"/x", [(b"content-length", b"0")], ROUTED, True, (0, 0, 0, 1, 0, 0)),
        (b"PUT", b"/x", LENGTH + JSON, PINNED, True, (1, 0, 0, 1, 0, 0)),
        (b"GET", b"/v1/models", NONE, ALIASES, True, (0, 0, 0, 0, 0, 1)),
        (b"GET", b"/models?x=1", NONE, ALIASES, True, (0, 0, 0, 0, 0, 1)),
        (b"GET", b"/v1/models", NONE, PLAIN, False, (0, 0, 0, 0, 0, 0)),
        (b"GET", b"/v1/models", LENGTH, ALIASES, True, (1, 0, 0, 0, 0, 0)),
        (b"HEAD", b"/v1/models", NONE, ALIASES, True, (0, 0, 0, 0, 0, 0)),
    ],
)
def test_plan_request_table(method, path, fields, config, more, expected):
    """Each request head gets the framing, inspection and answering the table says."""
    plan = plan_request(method, path, fields, knows_more_models=more, **config)
    got = (
        plan.expects_body,
        plan.chunked,
        plan.inspect,
        plan.must_read_model,
        plan.route_by_body,
        plan.lists_models,
    )
    assert got == tuple(bool(x) for x in expected)


def test_connection_close_is_seen_in_any_case_and_list_position():
    """Connection: close is found whatever its case and place in the list."""
    fields = [(b"connection", b"keep-alive, Close")]
    assert plan_request(b"GET", b"/", fields, knows_more_models=False, **PLAIN).client_closes
    assert not plan_request(b"GET", b"/", NONE, knows_more_models=False, **PLAIN).client_closes


def test_a_sized_body_goes_out_as_it_came_and_a_chunked_one_as_chunks():
    """The head carries the body so far; later pieces are framed by the body's kind."""
    sized = OutgoingRequest(
        b"POST", b"/p", [(b"host", b"h"), (b"content-length", b"5")], chunked=False
    )
    assert sized.remember(b"ab")
    assert b"".join(sized.head(ends=False)) == (
        b"POST /p HTTP/1.1\r\nhost: h\r\ncontent-length: 5\r\n\r\nab"
    )
    assert sized.frames([b"cde"]) == [b"cde"]
    assert sized.end() == [] and sized.complete
    chunked = OutgoingRequest(b"POST", b"/p", [(b"host", b"h")], chunked=True)
    parts = chunked.head(b"xyz", ends=True)
    assert b"".join(parts).endswith(b"\r\n\r\n3\r\nxyz\r\n" + LAST_CHUNK)
    assert chunked.frames([b"", b"a"]) == [b"1\r\n", b"a", b"\r\n"]  # empty pieces never end it


def test_the_replay_stops_at_its_limit_and_a_retry_starts_from_the_head():
    """Past the limit nothing is kept (no replay); a retry sends the head again."""
    out = OutgoingRequest(b"POST", b"/", [], chunked=False, replay_limit=4)
    assert out.remember(b"abc")
    assert not out.remember(b"de")
    assert out.replay is None and not out.remember(b"f")
    out.head(ends=True)
    out.retry()
    assert not out.head_sent and not out.complete


def test_an_inspected_body_replaces_the_framing_with_its_length():
    """A held (rewritten) body goes with a Content-Length and no Transfer-Encoding."""
    out = OutgoingRequest(b"POST", b"/", [(b"transfer-encoding", b"chunked")], chunked=True)
    out.replace_body([b"ab", b"c"], 3)
    assert out.headers == [(b"content-length", b"3")] and not out.chunked
    assert b"".join(out.head(ends=True)).endswith(b"\r\n\r\nabc")
