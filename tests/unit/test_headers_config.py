"""Sans-IO header policy, configuration parsing, CLI errors and the import graph."""

from __future__ import annotations

import pytest

from relay import cli
from relay.config import (
    Config,
    ConfigError,
    parse_duration,
    parse_listen,
    parse_size,
    parse_upstream,
)
from relay.http.errors import RelayError, error_response
from relay.http.headers import (
    RequestHeadProblem,
    check_request_headers,
    find_head_problem,
    head_ended,
    head_length,
    request_headers_for_upstream,
    response_head,
    response_headers_for_client,
)

UP = {"client_host": "10.1.1.1", "scheme": "http", "upstream_authority": "up:30000"}


def names(headers):
    return [name.lower() for name, _ in headers]


def test_hop_by_hop_fields_never_reach_the_upstream():
    """Connection and what it names, Keep-Alive, Proxy-*, TE, Trailer, Upgrade, Expect stop."""
    raw = [
        (b"Host", b"a"),
        (b"Connection", b"keep-alive, X-Hop"),
        (b"connection", b"x-other"),
        (b"X-Hop", b"1"),
        (b"X-Other", b"2"),
        (b"Keep-Alive", b"5"),
        (b"Proxy-Authorization", b"p"),
        (b"Proxy-Connection", b"x"),
        (b"TE", b"trailers"),
        (b"Trailer", b"x"),
        (b"Upgrade", b"h2c"),
        (b"Expect", b"100-continue"),
        (b"Content-Length", b"5"),
        (b"Transfer-Encoding", b"chunked"),
        (b"Set-Cookie", b"a"),
        (b"set-cookie", b"b"),
    ]
    out = request_headers_for_upstream(raw, **UP)
    assert names(out) == [
        b"host",
        b"set-cookie",
        b"set-cookie",
        b"x-forwarded-for",
        b"x-forwarded-proto",
        b"via",
    ]
    assert out[1:3] == [(b"Set-Cookie", b"a"), (b"set-cookie", b"b")]


def test_forwarding_headers_are_appended_and_host_added_only_when_missing():
    """X-Forwarded-* and Via append to what a proxy in front said; Host is added for HTTP/1.0."""
    raw = [
        (b"X-Forwarded-For", b"1.1.1.1"),
        (b"x-forwarded-for", b"2.2.2.2"),
        (b"X-Forwarded-Proto", b"https"),
        (b"Via", b"1.0 front"),
    ]
    out = dict((k.lower(), v) for k, v in request_headers_for_upstream(raw, **UP))
    assert out[b"host"] == b"up:30000"
    assert out[b"x-forwarded-for"] == b"1.1.1.1, 2.2.2.2, 10.1.1.1"
    assert out[b"x-forwarded-proto"] == b"https, http"
    assert out[b"via"] == b"1.0 front, 1.1 relay"


def test_credentials_are_replaced_toward_the_upstream():
    """With keys, the client's credentials are dropped and the upstream key added."""
    raw = [(b"Host", b"a"), (b"Authorization", b"Bearer client"), (b"X-Api-Key", b"k")]
    out = request_headers_for_upstream(raw, **UP, strip_credentials=True, upstream_key="up")
    assert (b"authorization", b"Bearer up") in out
    assert b"x-api-key" not in names(out) and (b"Authorization", b"Bearer client") not in out
    kept = request_headers_for_upstream(raw, **UP)
    assert (b"Authorization", b"Bearer client") in kept


def test_response_headers_for_clients():
    """Hop-by-hop fields go; framing stays when asked; SSE gets X-Accel-Buffering once."""
    raw = [
        (b"Content-Type", b"Text/Event-Stream; charset=utf-8"),
        (b"Connection", b"close, x-a"),
        (b"X-A", b"1"),
        (b"Transfer-Encoding", b"chunked"),
        (b"Trailer", b"x-t"),
    ]
    out = response_headers_for_client(raw, keep_framing=True, keep_trailer=True)
    assert names(out) == [
        b"content-type",
        b"transfer-encoding",
        b"trailer",
        b"x-accel-buffering",
        b"via",
    ]
    out = response_headers_for_client(raw, keep_framing=False, keep_trailer=False)
    assert names(out) == [b"content-type", b"x-accel-buffering", b"via"]
    given = [(b"content-type", b"text/event-stream"), (b"X-Accel-Buffering", b"yes")]
    assert (
        names(response_headers_for_client(given, keep_framing=True, keep_trailer=True)).count(
            b"x-accel-buffering"
        )
        == 1
    )
    plain = [(b"content-type", b"application/json")]
    assert b"x-accel-buffering" not in names(
        response_headers_for_client(plain, keep_framing=True, keep_trailer=True)
    )


@pytest.mark.parametrize(
    ("head", "problem"),
    [
        (b"GET / HTTP/1.1\r\nHost: a\r\nX: b\r\n c\r\n\r\n", "folding"),
        (b"GET / HTTP/1.1\r\nHost: a\r\nX: b\r\n\tc\r\n\r\n", "folding"),
        (b"GET / HTTP/1.1\r\nContent-Length: 1\r\ncontent-length : 1\r\n\r\nx", "Content-Length"),
        (b"GET / HTTP/1.1\r\nHost: a\r\n\r\nbody\r\n content-length: 1\r\ncontent-length: 1", None),
        (b"GET / HTTP/1.1\r\nHost: a\r\nX-Content-Length: 1\r\nContent-Length: 1\r\n\r\n", None),
    ],
)
def test_raw_head_problems(head, problem):
    """obs-fold and duplicate Content-Length are found in the head only, never in the body."""
    found = find_head_problem(head)
    assert (found is None) if problem is None else (problem in found)


def test_head_length_and_request_header_checks():
    """The head ends at its empty line; CL+TE and control bytes are refused."""
    assert head_length(b"GET / HTTP/1.1\r\nA: b\r\n\r\nbody") == 24
    with pytest.raises(RequestHeadProblem):
        check_request_headers([(b"content-length", b"1"), (b"transfer-encoding", b"chunked")])
    with pytest.raises(RequestHeadProblem):
        check_request_headers([(b"x", b"a\x01b")])
    check_request_headers([(b"x", b"a\tb \x80")])


def test_response_head_and_error_bytes():
    """Serialized heads and error responses are exact."""
    assert response_head(200, b"", [(b"a", b"b")]) == b"HTTP/1.1 200 OK\r\na: b\r\n\r\n"
    assert response_head(599, b"", []) == b"HTTP/1.1 599 \r\n\r\n"
    data = error_response(RelayError(502, "upstream unreachable", "upstream_unreachable"))
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 502 Bad Gateway\r\n")
    assert b"content-length: %d" % len(body) in head
    assert body == (
        b'{"error":{"message":"upstream unreachable","type":"server_error",'
        b'"code":"upstream_unreachable"}}\n'
    )


@pytest.mark.parametrize(
    ("text", "host", "port"),
    [
        (":4000", None, 4000),
        ("127.0.0.1:0", "127.0.0.1", 0),
        ("[::1]:80", "::1", 80),
        ("localhost:8080", "localhost", 8080),
    ],
)
def test_listen_addresses(text, host, port):
    address = parse_listen(text)
    assert (address.host, address.port) == (host, port)


@pytest.mark.parametrize(
    "bad", ["4000", "::1:80", "[::1]80", "[nothex]:80", "a:65536", "a:x", "a:-1", "a b:1", "[::1]:"]
)
def test_bad_listen_addresses_name_the_flag(bad):
    with pytest.raises(ConfigError) as info:
        parse_listen(bad)
    assert info.value.flag == "--listen"


def test_upstream_addresses():
    """HOST:PORT and http(s)://HOST:PORT[/]; paths, other schemes and port 0 are refused."""
    assert str(parse_upstream("sglang:30000")) == "http://sglang:30000"
    assert str(parse_upstream("http://sglang:30000/")) == "http://sglang:30000"
    assert parse_upstream("https://a:443").scheme == "https"
    assert parse_upstream("[::1]:1").authority == "[::1]:1"
    for bad in ("ftp://a:1", "a:1/v1", "a:0", "a", ":1", "http://u@a:1"):
        with pytest.raises(ConfigError):
            parse_upstream(bad)


def test_sizes_and_durations():
    assert parse_size("64k", "--x") == 65536
    assert parse_size("1MiB", "--x") == 1 << 20
    assert parse_size("12", "--x") == 12
    assert parse_duration("500ms", "--x") == 0.5
    assert parse_duration("2m", "--x") == 120
    assert parse_duration("1.5", "--x") == 1.5
    for bad in ("", "-1", "1x", "²", "1 k k"):
        with pytest.raises(ConfigError):
            parse_size(bad, "--x")
    for bad in ("0", "-1s", "abc", "1d"):
        with pytest.raises(ConfigError):
            parse_duration(bad, "--x")


def test_config_validation_names_the_flag():
    with pytest.raises(ConfigError, match="--upstream-idle-timeout"):
        Config(upstream_idle_timeout=0)
    with pytest.raises(ConfigError, match="--max-connections"):
        Config(max_connections=0)
    with pytest.raises(ConfigError, match="--tls-key"):
        Config(tls_key="k")


@pytest.mark.parametrize(
    "argv",
    [
        ["--upstream", "a"],
        ["--listen", "x", "--upstream", "a:1"],
        ["--upstream", "a:1", "--bogus"],
        ["--upstream", "a:1", "--max-body-bytes", "lots"],
        ["--upstream", "a:1", "--model-map", "x"],
        [],
    ],
)
def test_cli_errors_are_one_line_and_exit_2(argv, capsys):
    """Every bad flag gives exactly one stderr line naming it, and exit code 2."""
    try:
        code = cli.main(argv)
    except SystemExit as exit_:
        code = exit_.code
    assert code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("relay: error:")


def test_help_shows_every_limit_with_the_dataclass_default(capsys):
    """--help lists every limit flag with its default from Config (one source of truth)."""
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    out = " ".join(capsys.readouterr().out.split())
    import dataclasses

    for spec in dataclasses.fields(Config):
        if "flag" in spec.metadata:
            assert spec.metadata["flag"] in out
    assert "(default 900s)" in out and "(default 64k)" in out


def test_the_admin_listener_must_not_take_the_public_address_but_two_free_ports_may():
    """--admin-listen equal to --listen is refused; port 0 for both is two free ports."""
    from relay.config import Config, ConfigError, parse_listen, parse_upstream

    upstream = parse_upstream("127.0.0.1:9")
    with pytest.raises(ConfigError) as refused:
        Config(
            listen=parse_listen("127.0.0.1:4000"),
            admin_listen=parse_listen("127.0.0.1:4000"),
            upstream=upstream,
        )
    assert "--admin-listen" in str(refused.value)
    both_free = Config(
        listen=parse_listen("127.0.0.1:0"),
        admin_listen=parse_listen("127.0.0.1:0"),
        upstream=upstream,
    )
    assert both_free.admin_listen is not None and both_free.admin_listen.port == 0


@pytest.mark.parametrize(
    "head",
    [
        b"GET / HTTP/1.1\r\nHost: a\r\n\r\n",
        b"GET / HTTP/1.1\nHost: a\n\n",
        b"GET / HTTP/1.1\r\nHost: a\n\r\n",
        b"GET / HTTP/1.1\nHost: a\r\n\n",
    ],
)
def test_a_head_is_found_ended_once_its_empty_line_came_whatever_the_pieces(head):
    """Fed in two or three pieces cut anywhere, the head is found ended exactly
    when the piece that completes its empty line comes, as head_length sees it."""
    end = head_length(head)
    assert end == len(head)
    cuts = [(a, b) for a in range(1, len(head)) for b in range(a, len(head) + 1)]
    for first, second in cuts:
        received = bytearray()
        ended_at = None
        for piece in (head[:first], head[first:second], head[second:]):
            if not piece:
                continue
            received += piece
            if head_ended(received, len(piece)):
                ended_at = len(received)
                break
        assert ended_at is not None and ended_at >= end, (first, second, ended_at)
        assert head_length(bytes(received)) == end


def test_a_head_without_its_empty_line_is_not_ended():
    head = b"GET / HTTP/1.1\r\nHost: a\r\nX: \n\r"
    for cut in range(1, len(head)):
        received = bytearray(head[:cut])
        assert not head_ended(received, cut)
        received += head[cut:]
        assert not head_ended(received, len(head) - cut)
