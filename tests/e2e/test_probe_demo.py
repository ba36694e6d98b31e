"""`relay probe` and `relay demo`, run as a user runs them (subprocesses, real sockets).

The probe must call a buffering intermediary BUFFERED (exit 1) and relay in
front of the SGLang-like upstream streaming (exit 0).
"""

from __future__ import annotations

import contextlib
import json
import re
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator

import pytest
from relayfixture import RelayThread
from sglang_app import SGLangServer

pytestmark = pytest.mark.timeout(60)

LIMIT = 30


class BufferingProxy:
    """The bug in miniature: read the whole upstream response, then send it at once."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.settimeout(LIMIT)
        self.port = self.sock.getsockname()[1]
        self.thread = threading.Thread(target=self._serve, daemon=True)

    def _serve(self) -> None:
        while True:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            with client:
                client.settimeout(LIMIT)
                request = b""
                while b"\r\n\r\n" not in request:
                    request += client.recv(65536)
                head, _, body = request.partition(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":")[1])
                while len(body) < length:
                    body += client.recv(65536)
                with socket.create_connection(("127.0.0.1", self.upstream_port), LIMIT) as up:
                    up.sendall(head + b"\r\n\r\n" + body)
                    response = b""
                    while not response.endswith(b"\r\n0\r\n\r\n"):
                        chunk = up.recv(65536)
                        if not chunk:
                            break
                        response += chunk
                client.sendall(response)

    def __enter__(self) -> BufferingProxy:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.sock.close()
        self.thread.join(5)


def relay_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "relay", *args], capture_output=True, text=True, timeout=LIMIT
    )


@pytest.fixture
def sglang():
    server = SGLangServer().start()
    yield server
    server.stop()


PACE = ["--max-tokens", "8", "--model", "demo-model"]


@contextlib.contextmanager
def streamer_process(ttft: str, gap: str) -> Iterator[str]:
    """`python -m relay.streamer` in a subprocess; yields its URL."""
    process = subprocess.Popen(
        [sys.executable, "-m", "relay.tools.streamer", "--ttft", ttft, "--gap", gap],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        yield process.stdout.readline().strip().rsplit(" ", 1)[-1]
    finally:
        process.terminate()
        process.wait(LIMIT)


def test_probe_says_streaming_through_relay_and_buffered_through_a_buffering_proxy():
    """Against the paced streamer: relay → streaming (0); a buffering proxy → BUFFERED (1)."""
    with streamer_process("50ms", "20ms") as url:
        port = int(url.rsplit(":", 1)[1])
        with RelayThread(url) as relay:
            result = relay_cli("probe", relay.url, *PACE)
            assert result.returncode == 0, result.stdout + result.stderr
            assert "streaming" in result.stdout
        with BufferingProxy(port) as proxy:
            result = relay_cli("probe", f"http://127.0.0.1:{proxy.port}/v1", *PACE)
            assert result.returncode == 1, result.stdout + result.stderr
            assert "BUFFERED" in result.stdout
            compare = relay_cli(
                "probe", url, "--compare", f"http://127.0.0.1:{proxy.port}", *PACE, "--json"
            )
            assert compare.returncode == 1
            verdicts = [d["verdict"] for d in json.loads(compare.stdout)]
            assert verdicts == ["streaming", "BUFFERED"]


def test_probe_errors_are_one_line_with_exit_3(sglang):
    """Refused connections, non-200 answers and non-SSE responses are clear one-line errors."""
    free = socket.socket()
    free.bind(("127.0.0.1", 0))
    port = free.getsockname()[1]
    free.close()
    refused = relay_cli("probe", f"http://127.0.0.1:{port}")
    assert refused.returncode == 3
    assert refused.stderr.count("\n") == 1 and "cannot connect" in refused.stderr
    with RelayThread(sglang.url) as relay:
        missing = relay_cli("probe", relay.url + "/nope")
        assert missing.returncode == 3 and "HTTP 404" in missing.stderr
    bad_flag = relay_cli("probe", "http://x", "--max-tokens", "0")
    assert bad_flag.returncode == 2 and bad_flag.stderr.count("\n") == 1


def test_demo_runs_and_prints_the_side_by_side_table():
    """`relay demo` starts its upstream and relay, probes both and exits 0."""
    result = relay_cli("demo", "--tokens", "6", "--ttft", "50ms", "--gap", "15ms")
    assert result.returncode == 0, result.stderr
    assert "through relay" in result.stdout
    assert result.stdout.count("streaming") == 2


def test_probe_completions_json_and_tls_error():
    """--completions measures /v1/completions; https to a plain port is a one-line TLS error."""
    with streamer_process("0.02", "0.01") as url:
        result = relay_cli("probe", url, "--completions", "--json", *PACE)
        assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout)["tokens"] == 8
        tls = relay_cli("probe", url.replace("http://", "https://"), *PACE)
        assert tls.returncode == 3
        assert tls.stderr.count("\n") == 1 and "TLS" in tls.stderr


def test_probe_https_against_a_plain_http_port_says_it_speaks_plain_http():
    """relay probe https://... against a plain-HTTP port says so, with the URL to use,
    instead of a TLS record error."""
    with streamer_process("50ms", "20ms") as url:
        port = int(url.rsplit(":", 1)[1])
        with RelayThread(url) as relay:
            for target in (port, relay.port):
                result = relay_cli("probe", f"https://127.0.0.1:{target}", *PACE)
                assert result.returncode == 3, result.stderr
                assert result.stderr == (
                    f"relay probe: error: 127.0.0.1:{target} speaks plain HTTP, not TLS: "
                    f"use http://127.0.0.1:{target}\n"
                )


def test_the_streamer_takes_durations_as_relay_does_and_shows_its_defaults():
    """--ttft 250ms and --gap 0.5s parse like relay's flags; --help gives every default;
    a bad duration is one line naming the flag."""
    streamer = [sys.executable, "-m", "relay.tools.streamer"]
    shown = subprocess.run([*streamer, "--help"], capture_output=True, text=True, timeout=LIMIT)
    assert shown.returncode == 0
    for default in ("(default 250ms)", "(default 24ms)", "(default 64)", "(default 1)"):
        assert default in shown.stdout, shown.stdout
    bad = subprocess.run(
        [*streamer, "--ttft", "soon"], capture_output=True, text=True, timeout=LIMIT
    )
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1
    assert "argument --ttft: expected a duration" in bad.stderr
    with streamer_process("250ms", "0.01s") as url:
        result = relay_cli("probe", url, *PACE)
    assert result.returncode == 0, result.stderr
    ttft = float(re.search(r"TTFT ms\s+([0-9.]+)", result.stdout).group(1))
    assert 240 <= ttft < 2000, result.stdout
