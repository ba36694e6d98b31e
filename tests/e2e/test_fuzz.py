"""Fuzzing a live relay as a hostile client and as a hostile upstream (hypothesis).

CI runs a short deterministic pass; ``RELAY_FUZZ_EXAMPLES=5000`` runs longer
with fresh randomness. Invariants: relay never crashes or hangs past its
timeouts, never lets a request it refused reach the upstream, never makes a
malformed upstream body look complete to the client, and leaks no
connection.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time

import h11
import pytest
from fuzz_corpus import REQUEST_SEEDS, RESPONSE_SEEDS
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from relayfixture import RelayThread
from sglang_app import SGLangServer

pytestmark = pytest.mark.timeout(300)

EXAMPLES = int(os.environ.get("RELAY_FUZZ_EXAMPLES", "60"))
FUZZ = settings(
    max_examples=EXAMPLES,
    derandomize="RELAY_FUZZ_EXAMPLES" not in os.environ,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
LIMIT = 5.0
FAST = {
    "client_head_timeout": 0.4,
    "client_body_timeout": 0.4,
    "client_keepalive_timeout": 0.4,
    "upstream_head_timeout": 0.5,
    "upstream_idle_timeout": 0.5,
    "max_header_bytes": 8192,
    "max_body_bytes": 65536,
}


@st.composite
def mutated(draw, seeds: list[bytes]) -> bytes:
    """A seed with a few byte-level edits, or plain random bytes."""
    if draw(st.integers(0, 9)) == 0:
        return draw(st.binary(max_size=300))
    data = bytearray(draw(st.sampled_from(seeds)))
    for _ in range(draw(st.integers(0, 4))):
        if not data:
            break
        at = draw(st.integers(0, len(data) - 1))
        action = draw(st.sampled_from(["flip", "insert", "delete", "cut", "crlf"]))
        if action == "flip":
            data[at] = draw(st.integers(0, 255))
        elif action == "insert":
            data[at:at] = draw(st.sampled_from([b"\r\n", b"\n", b" ", b"\x00", b";", b"0", b"ff"]))
        elif action == "delete":
            del data[at]
        elif action == "cut":
            del data[at:]
        else:
            data = bytearray(bytes(data).replace(b"\r\n", b"\n", 1))
    return bytes(data)


def exchange(port: int, payload: bytes) -> bytes:
    """Send ``payload``, read until relay closes; relay must close within LIMIT."""
    with socket.create_connection(("127.0.0.1", port), LIMIT) as sock:
        sock.settimeout(LIMIT)
        with contextlib.suppress(OSError):
            sock.sendall(payload)
        received = b""
        started = time.monotonic()
        while True:
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:
                break
            if not chunk:
                break
            received += chunk
            assert time.monotonic() - started < LIMIT, "relay did not close in time"
        return received


def wait_idle(relay: RelayThread) -> None:
    """No client connection and no exchange left in relay (nothing leaked)."""
    assert relay.server is not None
    state = relay.server.state
    deadline = time.monotonic() + LIMIT
    while relay.call(lambda: (len(state.connections), state.metrics.active_exchanges)) != (0, 0):
        assert time.monotonic() < deadline, "connections or exchanges leaked"
        time.sleep(0.02)


@pytest.fixture(scope="module")
def sglang():
    server = SGLangServer().start()
    yield server
    server.stop()


@FUZZ
@given(payload=mutated(REQUEST_SEEDS))
def test_fuzzed_clients_never_crash_hang_or_smuggle(sglang, payload):
    """Whatever a client sends, relay answers or closes in time, and refused bytes stay put."""
    with RelayThread(sglang.url, **FAST) as relay:
        before = len(sglang.sglang.requests)
        received = exchange(relay.port, payload)
        head = received.split(b"\r\n\r\n", 1)[0].lower()
        from_relay = received.startswith(b"HTTP/1.") and b"server: uvicorn" not in head
        if from_relay and received[9:12] in (b"400", b"408", b"413", b"431", b"501"):
            assert len(sglang.sglang.requests) == before, "a refused request reached upstream"
        wait_idle(relay)
        ok = exchange(relay.port, b"GET /health HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
        assert ok.startswith(b"HTTP/1.1 200")


class Responder:
    """An upstream that answers every request with ``payload`` and closes."""

    def __init__(self) -> None:
        self.payload = b""
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.running = True
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while self.running:
            try:
                conn, _ = self.sock.accept()
            except (TimeoutError, OSError):
                continue
            with conn:
                conn.settimeout(LIMIT)
                try:
                    head = b""
                    while b"\r\n\r\n" not in head:
                        chunk = conn.recv(65536)
                        if not chunk:
                            break
                        head += chunk
                    conn.sendall(self.payload)
                except OSError:
                    pass

    def stop(self) -> None:
        self.running = False
        self.thread.join(LIMIT)
        self.sock.close()


def parse_response(data: bytes) -> tuple[bool, int | None, bytes]:
    """(complete, status, body) as a strict HTTP/1.1 client (h11) sees ``data`` then EOF."""
    conn = h11.Connection(h11.CLIENT)
    conn.send(h11.Request(method="GET", target="/", headers=[("host", "a")]))
    conn.send(h11.EndOfMessage())
    conn.receive_data(data)
    conn.receive_data(b"")
    status = None
    body = b""
    try:
        while True:
            event = conn.next_event()
            if isinstance(event, h11.Response):
                status = event.status_code
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                return True, status, body
            elif event is h11.NEED_DATA or isinstance(event, h11.ConnectionClosed):
                return False, status, body
    except h11.RemoteProtocolError:
        return False, status, body


@pytest.fixture(scope="module")
def responder():
    server = Responder()
    yield server
    server.stop()


@FUZZ
@given(payload=mutated(RESPONSE_SEEDS))
def test_fuzzed_upstreams_never_look_complete_unless_they_were(responder, payload):
    """A response is complete for the client only if the upstream's was, with the same body."""
    responder.payload = payload
    with RelayThread(f"127.0.0.1:{responder.port}", **FAST) as relay:
        received = exchange(relay.port, b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
        complete, status, body = parse_response(received)
        forwarded = b"via: 1.1 relay" in received.split(b"\r\n\r\n", 1)[0].lower()
        if complete and forwarded:
            upstream_complete, upstream_status, upstream_body = parse_response(payload)
            assert upstream_complete, (payload, received)
            assert (status, body) == (upstream_status, upstream_body)
        elif complete:
            assert status in (502, 504), received  # relay's own answer, before any byte
        wait_idle(relay)
