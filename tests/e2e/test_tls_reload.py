"""The TLS listener under operations: certificate rotation on SIGHUP, handshakes that
never finish, and plain HTTP on the TLS port; under asyncio and uvloop.

The relay runs in a thread (RelayThread); clients are blocking sockets with a
timeout on every call.
"""

from __future__ import annotations

import gc
import logging
import os
import socket
import ssl
import time
from pathlib import Path

import pytest
import trustme
from prometheus_client.parser import text_string_to_metric_families
from relayfixture import RelayThread, eventually
from sglang_app import SGLangServer

pytestmark = pytest.mark.timeout(60)

LIMIT = 10.0


@pytest.fixture(scope="module")
def sglang():
    server = SGLangServer().start()
    yield server
    server.stop()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def der(cert: trustme.LeafCert) -> bytes:
    return ssl.PEM_cert_to_DER_cert(cert.cert_chain_pems[0].bytes().decode())


def handshake(port: int, ca: trustme.CA) -> ssl.SSLSocket:
    """A verified TLS connection to the relay (raises if the handshake fails)."""
    context = ssl.create_default_context()
    ca.configure_trust(context)
    raw = socket.create_connection(("127.0.0.1", port), LIMIT)
    raw.settimeout(LIMIT)
    return context.wrap_socket(raw, server_hostname="127.0.0.1")


def ask(tls: ssl.SSLSocket) -> bytes:
    """One keep-alive request on ``tls``; the response head."""
    tls.sendall(b"GET /health HTTP/1.1\r\nHost: relay\r\n\r\n")
    head = b""
    while b"\r\n\r\n" not in head:
        data = tls.recv(4096)
        assert data, head
        head += data
    return head


def gauges(relay: RelayThread) -> dict[str, float]:
    """Every gauge of one /metrics rendering: values read together, not one by one."""
    assert relay.server is not None
    state = relay.server.state
    text = relay.call(lambda: state.metrics.render(gauges=state.gauges))
    return {
        family.name: family.samples[0].value
        for family in text_string_to_metric_families(text)
        if family.type == "gauge" and family.samples
    }


def gauge(relay: RelayThread, name: str) -> float:
    values = gauges(relay)
    assert name in values, f"{name} not in /metrics"
    return values[name]


def nothing_open(relay: RelayThread) -> bool:
    """No client connection and no pending handshake, in the same snapshot."""
    values = gauges(relay)
    return values["relay_client_connections"] == 0 and values["relay_tls_handshakes"] == 0


def closed_by_peer(sock: socket.socket) -> bool:
    """Block (bounded) until the relay closes ``sock``; true if it did."""
    sock.settimeout(LIMIT)
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


def open_fds() -> int:
    """Descriptors open now, after closing those only the garbage collector still holds
    (an earlier test's, say), so that a count compared with a baseline sees leaks only."""
    gc.collect()
    return len(os.listdir("/proc/self/fd"))


def test_a_half_rotated_certificate_is_refused_and_new_handshakes_keep_the_old_one(
    sglang: SGLangServer, loop_kind: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """SIGHUP between cert.pem and key.pem of a rotation fails the reload and changes
    nothing; once both are replaced new handshakes get the new certificate, and a
    connection opened before keeps working throughout."""
    caplog.set_level(logging.INFO, logger="relay.events")
    ca = trustme.CA()
    old, new = ca.issue_cert("127.0.0.1"), ca.issue_cert("127.0.0.1")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    old.cert_chain_pems[0].write_to_path(str(cert))
    old.private_key_pem.write_to_path(str(key))
    with RelayThread(
        sglang.url, loop_kind=loop_kind, tls_cert=str(cert), tls_key=str(key)
    ) as relay:
        assert relay.server is not None
        state = relay.server.state
        with handshake(relay.port, ca) as before:
            assert before.getpeercert(binary_form=True) == der(old)
            assert ask(before).startswith(b"HTTP/1.1 200")

            new.cert_chain_pems[0].write_to_path(str(cert))  # key.pem not yet
            relay.call(state.reload)
            assert "reload failed, keeping the previous files" in caplog.text
            with handshake(relay.port, ca) as during:
                assert during.getpeercert(binary_form=True) == der(old)
                assert ask(during).startswith(b"HTTP/1.1 200")

            new.private_key_pem.write_to_path(str(key))
            relay.call(state.reload)
            assert "reloaded the TLS certificate" in caplog.text
            with handshake(relay.port, ca) as after:
                assert after.getpeercert(binary_form=True) == der(new)
                assert ask(after).startswith(b"HTTP/1.1 200")
            assert ask(before).startswith(b"HTTP/1.1 200")


def test_the_reload_line_counts_api_keys_in_good_english(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """One key is "1 API key", two are "2 API keys"."""
    caplog.set_level(logging.INFO, logger="relay.events")
    keys = tmp_path / "keys"
    keys.write_text("sk-one\n")
    with RelayThread(f"127.0.0.1:{free_port()}", api_key_file=str(keys)) as relay:
        assert relay.server is not None
        relay.call(relay.server.state.reload)
        assert "reloaded 1 API key" in caplog.text and "1 API keys" not in caplog.text
        keys.write_text("sk-one\nsk-two\n")
        relay.call(relay.server.state.reload)
        assert "reloaded 2 API keys" in caplog.text


def test_pending_handshakes_are_counted_limited_and_timed_out(
    loop_kind: str, tmp_path: Path
) -> None:
    """TCP clients that never send a ClientHello show in relay_tls_handshakes, count
    against --max-connections (one more is closed at once), are dropped after the
    handshake timeout, and leave no file descriptor behind."""
    ca = trustme.CA()
    pem = tmp_path / "server.pem"
    ca.issue_cert("127.0.0.1").private_key_and_cert_chain_pem.write_to_path(str(pem))
    silent = 5
    with RelayThread(
        f"127.0.0.1:{free_port()}",
        loop_kind=loop_kind,
        tls_cert=str(pem),
        max_connections=silent,
        client_head_timeout=3.0,
    ) as relay:
        with handshake(relay.port, ca):
            pass  # uvloop opens a descriptor of its own on first use: not ours to count
        # The client's handshake ends before relay's: until relay's ends, the
        # connection is a pending handshake, not yet a client connection.
        eventually(lambda: nothing_open(relay))
        baseline = open_fds()
        # Taken before the connects: relay accepts (and starts the handshake
        # clock) after this, however slowly the machine gets to the checks below.
        opened = time.monotonic()
        clients = [socket.create_connection(("127.0.0.1", relay.port), LIMIT) for _ in range(5)]
        eventually(lambda: gauge(relay, "relay_tls_handshakes") == silent)
        started = time.monotonic()
        with socket.create_connection(("127.0.0.1", relay.port), LIMIT) as extra:
            assert closed_by_peer(extra)
        assert time.monotonic() - started < 1.5  # at once, not after the handshake timeout
        assert relay.metrics().connections_rejected == 1
        # Still all pending: the extra was closed before any handshake timed out.
        assert gauge(relay, "relay_tls_handshakes") == silent
        assert all(closed_by_peer(client) for client in clients)
        assert time.monotonic() - opened >= 2.5  # the timeout (3 s), not the limit, closed them
        eventually(lambda: gauge(relay, "relay_tls_handshakes") == 0)
        assert relay.metrics().tls_handshake_failures == silent
        for client in clients:
            client.close()
        # No more than the baseline (a thread an earlier test left may still close
        # one of its own meanwhile); a leak here would stay above it.
        eventually(lambda: open_fds() <= baseline)
        with handshake(relay.port, ca) as tls:
            assert ask(tls).startswith(b"HTTP/1.1 502")


def test_plain_http_on_the_tls_port_is_logged_as_a_failed_handshake(
    loop_kind: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Plain HTTP on the TLS port gets no HTTP reply and is logged as what it is."""
    caplog.set_level(logging.INFO)
    ca = trustme.CA()
    pem = tmp_path / "server.pem"
    ca.issue_cert("127.0.0.1").private_key_and_cert_chain_pem.write_to_path(str(pem))
    with RelayThread(f"127.0.0.1:{free_port()}", loop_kind=loop_kind, tls_cert=str(pem)) as relay:
        with socket.create_connection(("127.0.0.1", relay.port), LIMIT) as raw:
            raw.settimeout(LIMIT)
            raw.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            assert closed_by_peer(raw)  # no HTTP reply, not even a 400
        eventually(lambda: relay.metrics().tls_handshake_failures == 1)
    line = "TLS handshake failed from 127.0.0.1: http request on https port"
    records = [r for r in caplog.records if r.getMessage() == line]
    assert len(records) == 1 and records[0].levelno == logging.INFO
    assert not [r for r in caplog.records if r.name == "relay.access"]
