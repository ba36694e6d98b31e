"""`relay probe` flags and request head, without sockets."""

from __future__ import annotations

import pytest

from relay.tools.probe import DEFAULT_ACCEPT_ENCODING, build_parser, main, request_headers


def test_every_probe_flag_has_help_that_states_its_default():
    """--help explains each flag and says what happens without it."""
    parser = build_parser()
    flags = [a for a in parser._actions if a.option_strings and a.dest != "help"]
    assert {f.option_strings[0] for f in flags} >= {
        "--api-key",
        "--completions",
        "--max-tokens",
        "--prompt",
        "--repeat",
        "--timeout",
        "--accept-encoding",
        "--cacert",
        "--insecure",
    }
    for flag in flags:
        assert flag.help and "(default: " in flag.help, flag.option_strings[0]
    text = parser.format_help()
    assert "'gzip, deflate'" in text and "Count from 1 to 50" in text


def test_accept_encoding_is_sent_as_given_and_left_out_when_empty():
    """Default gzip, deflate as the openai SDK sends it; identity verbatim; '' sends none."""
    assert DEFAULT_ACCEPT_ENCODING == "gzip, deflate"
    names = dict(request_headers("h:1", "k", b"{}", DEFAULT_ACCEPT_ENCODING))
    assert names["accept-encoding"] == "gzip, deflate"
    assert names["accept"] == "application/json"
    assert names["content-type"] == "application/json"
    assert names["authorization"] == "Bearer k"
    assert names["content-length"] == "2"
    assert dict(request_headers("h:1", None, None, "identity"))["accept-encoding"] == "identity"
    assert "accept-encoding" not in dict(request_headers("h:1", None, None, ""))


@pytest.mark.parametrize(
    ("argv", "flag"),
    [
        (["http://x", "--accept-encoding", "gzip\r\nx-evil: 1"], "--accept-encoding"),
        (["http://x", "--cacert", "/nonexistent/ca.pem"], "--cacert"),
        (["http://x", "--timeout", "0"], "--timeout"),
    ],
)
def test_bad_flags_are_one_line_naming_the_flag(argv, flag, capsys):
    """A header value with CR LF or an unreadable CA file: exit 2, one line naming the flag."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"argument {flag}:" in err
