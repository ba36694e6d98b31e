"""TLS on both sides (trustme certificates) and API keys, with real clients.

Covers what must work (HTTPS clients, mTLS, https upstreams, SIGHUP reload)
and what must fail cleanly (untrusted CA, wrong host, expired certificate,
plain HTTP to the TLS port, missing or wrong keys), with relay serving the
next request normally after each failure.
"""

from __future__ import annotations

import datetime
import hmac
import itertools
import json
import shutil
import socket
import ssl
import subprocess
import time
import warnings

import httpx
import pytest
import trustme
from relayfixture import RelayThread
from sglang_app import SGLangServer

pytestmark = pytest.mark.timeout(60)

CHAT = {"model": "test-model", "messages": [{"role": "user", "content": "hi"}]}
LIMIT = 20


@pytest.fixture(scope="module")
def ca():
    return trustme.CA()


@pytest.fixture
def server_files(ca, tmp_path):
    cert = ca.issue_cert("127.0.0.1", "localhost")
    path = tmp_path / "server.pem"
    cert.private_key_and_cert_chain_pem.write_to_path(str(path))
    ca_path = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_path))
    return str(path), str(ca_path)


@pytest.fixture
def sglang():
    server = SGLangServer().start()
    yield server
    server.stop()


def test_https_client_streams_tokens_separately_over_tls(sglang, server_files):
    """httpx over TLS (ALPN http/1.1) gets separate tokens; X-Forwarded-Proto says https."""
    cert, ca_path = server_files
    body = {**CHAT, "stream": True, "max_tokens": 6, "test_gap_ms": 40}
    with RelayThread(sglang.url, tls_cert=cert) as relay:
        url = relay.url.replace("http://", "https://")
        times = []
        with httpx.Client(
            verify=ssl.create_default_context(cafile=ca_path), timeout=LIMIT
        ) as client:
            with client.stream("POST", f"{url}/v1/chat/completions", json=body) as response:
                assert response.status_code == 200
                for line in response.iter_lines():
                    if '"content"' in line:
                        times.append(time.monotonic())
        gaps = [b - a for a, b in itertools.pairwise(times)]
        assert len(times) == 6 and min(gaps) > 0.005, gaps
        headers = dict(sglang.sglang.requests[0]["headers"])
        assert headers[b"x-forwarded-proto"] == b"https"
        # ALPN and TCP_NODELAY on the TLS socket.
        context = ssl.create_default_context(cafile=ca_path)
        context.set_alpn_protocols(["http/1.1"])
        with socket.create_connection(("127.0.0.1", relay.port), LIMIT) as raw:
            with context.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
                assert tls.selected_alpn_protocol() == "http/1.1"
                assert tls.version() in ("TLSv1.2", "TLSv1.3")


def test_plain_http_to_the_tls_port_is_closed_and_relay_keeps_serving(sglang, server_files):
    """Plain HTTP sent to the TLS listener gets the connection closed; TLS clients still work."""
    cert, ca_path = server_files
    with RelayThread(sglang.url, tls_cert=cert) as relay:
        with socket.create_connection(("127.0.0.1", relay.port), LIMIT) as raw:
            raw.settimeout(LIMIT)
            raw.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            data = raw.recv(4096)
            assert not data.startswith(b"HTTP/1.1 200")
        response = httpx.get(
            relay.url.replace("http:", "https:") + "/health",
            verify=ssl.create_default_context(cafile=ca_path),
        )
        assert response.status_code == 200


def test_tls_old_protocols_are_refused(sglang, server_files):
    """TLS 1.1 and older are not offered."""
    cert, _ = server_files
    with RelayThread(sglang.url, tls_cert=cert) as relay:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                context.maximum_version = ssl.TLSVersion.TLSv1_1
                context.minimum_version = ssl.TLSVersion.TLSv1
        except ValueError:
            pytest.skip("this OpenSSL cannot even offer TLS 1.1")
        with socket.create_connection(("127.0.0.1", relay.port), LIMIT) as raw:
            with pytest.raises(ssl.SSLError):
                context.wrap_socket(raw, server_hostname="127.0.0.1")


def test_mtls_requires_a_client_certificate_from_the_ca(sglang, server_files, ca, tmp_path):
    """With --tls-client-ca, a client without a certificate is refused; one with it is served."""
    cert, ca_path = server_files
    client_cert = ca.issue_cert("client@example.test")
    client_path = tmp_path / "client.pem"
    client_cert.private_key_and_cert_chain_pem.write_to_path(str(client_path))
    with RelayThread(sglang.url, tls_cert=cert, tls_client_ca=ca_path) as relay:
        url = relay.url.replace("http:", "https:") + "/health"
        with pytest.raises(httpx.HTTPError):
            httpx.get(url, verify=ssl.create_default_context(cafile=ca_path), timeout=LIMIT)
        context = ssl.create_default_context(cafile=ca_path)
        context.load_cert_chain(str(client_path))
        assert httpx.get(url, verify=context, timeout=LIMIT).status_code == 200


def test_sighup_reload_gives_new_handshakes_the_new_certificate(sglang, server_files, ca):
    """Reloading swaps the certificate for new handshakes; an open connection keeps working."""
    cert, ca_path = server_files

    def serial(port: int) -> int:
        context = ssl.create_default_context(cafile=ca_path)
        with socket.create_connection(("127.0.0.1", port), LIMIT) as raw:
            with context.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
                der = tls.getpeercert(binary_form=True)
        from cryptography import x509

        return x509.load_der_x509_certificate(der).serial_number

    with RelayThread(sglang.url, tls_cert=cert) as relay:
        with httpx.Client(verify=ssl.create_default_context(cafile=ca_path), timeout=LIMIT) as kept:
            base = relay.url.replace("http:", "https:")
            assert kept.get(base + "/health").status_code == 200
            before = serial(relay.port)
            ca.issue_cert("127.0.0.1").private_key_and_cert_chain_pem.write_to_path(cert)
            assert relay.server is not None
            relay.call(relay.server.state.reload)
            assert serial(relay.port) != before
            assert kept.get(base + "/health").status_code == 200


# -- relay → https upstream -------------------------------------------------------
@pytest.fixture
def tls_upstream(ca, tmp_path):
    cert = ca.issue_cert("127.0.0.1")
    path = tmp_path / "upstream.pem"
    cert.private_key_and_cert_chain_pem.write_to_path(str(path))
    server = SGLangServer(certfile=str(path)).start()
    yield server
    server.stop()


def test_https_upstream_verified_against_the_given_ca(tls_upstream, server_files):
    """relay speaks TLS to the upstream, checking its certificate and host name."""
    _, ca_path = server_files
    with RelayThread(tls_upstream.url, upstream_ca=ca_path) as relay:
        body = {**CHAT, "stream": True, "max_tokens": 3}
        response = httpx.post(f"{relay.url}/v1/chat/completions", json=body, timeout=LIMIT)
        assert response.status_code == 200 and response.text.endswith("data: [DONE]\n\n")


def test_one_tls_upstream_connection_carries_streamed_and_whole_answers_in_turn(
    tls_upstream, server_files, loop_kind
):
    """Over an https upstream, six requests in turn (streams and whole answers) all
    arrive complete on one kept-alive TLS connection: its reads go to each exchange
    in turn and back to the pool between them, under either loop."""
    _, ca_path = server_files
    with RelayThread(tls_upstream.url, upstream_ca=ca_path, loop_kind=loop_kind) as relay:
        with httpx.Client(timeout=LIMIT) as client:
            for i in range(6):
                stream = i % 2 == 0
                body = {**CHAT, "stream": stream, "max_tokens": 3 + i, "test_gap_ms": 5}
                response = client.post(f"{relay.url}/v1/chat/completions", json=body)
                assert response.status_code == 200, response.text
                if stream:
                    events = [e for e in response.text.split("\n\n") if e.startswith("data: {")]
                    assert len(events) >= 3 + i and response.text.endswith("data: [DONE]\n\n")
                else:
                    assert response.json()["usage"]["completion_tokens"] == 3 + i
        metrics = relay.metrics()
        assert metrics.upstream_connects == 1
        assert metrics.truncated_streams == 0


def test_untrusted_wrong_host_and_expired_upstream_certificates_are_502(tmp_path):
    """A failed upstream handshake is a 502 with a JSON error, and relay keeps serving."""
    trusted = trustme.CA()
    other = trustme.CA()
    ca_path = tmp_path / "ca.pem"
    trusted.cert_pem.write_to_path(str(ca_path))
    past = datetime.datetime(2020, 1, 1, tzinfo=datetime.UTC)
    cases = {
        "untrusted": other.issue_cert("127.0.0.1"),
        "wrong host": trusted.issue_cert("not-this-host.example"),
        "expired": trusted.issue_cert(
            "127.0.0.1", not_before=past, not_after=past + datetime.timedelta(days=1)
        ),
    }
    for name, cert in cases.items():
        path = tmp_path / f"{name}.pem"
        cert.private_key_and_cert_chain_pem.write_to_path(str(path))
        upstream = SGLangServer(certfile=str(path)).start()
        try:
            with RelayThread(upstream.url, upstream_ca=str(ca_path)) as relay:
                response = httpx.post(f"{relay.url}/v1/chat/completions", json=CHAT, timeout=LIMIT)
                assert response.status_code == 502, name
                assert response.json()["error"]["type"] == "server_error"
                assert relay.metrics().upstream_connect_errors == 1
        finally:
            upstream.stop()


def test_mtls_to_the_upstream(tmp_path):
    """relay presents --upstream-cert to an upstream that requires client certificates."""
    ca = trustme.CA()
    ca_path = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_path))
    server_path = tmp_path / "up.pem"
    ca.issue_cert("127.0.0.1").private_key_and_cert_chain_pem.write_to_path(str(server_path))
    client_path = tmp_path / "relay-client.pem"
    ca.issue_cert("relay").private_key_and_cert_chain_pem.write_to_path(str(client_path))
    upstream = SGLangServer(certfile=str(server_path), ca_certs=str(ca_path)).start()
    try:
        with RelayThread(upstream.url, upstream_ca=str(ca_path)) as relay:
            response = httpx.post(f"{relay.url}/v1/chat/completions", json=CHAT, timeout=LIMIT)
            assert response.status_code == 502  # no client certificate: refused
        with RelayThread(
            upstream.url, upstream_ca=str(ca_path), upstream_cert=str(client_path)
        ) as relay:
            response = httpx.post(f"{relay.url}/v1/chat/completions", json=CHAT, timeout=LIMIT)
            assert response.status_code == 200
    finally:
        upstream.stop()


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_curl_over_tls_streams(sglang, server_files):
    """curl --cacert over TLS through relay gets the whole stream."""
    cert, ca_path = server_files
    with RelayThread(sglang.url, tls_cert=cert) as relay:
        url = relay.url.replace("http:", "https:") + "/v1/chat/completions"
        result = subprocess.run(
            [
                "curl",
                "-sN",
                "--cacert",
                ca_path,
                url,
                "-H",
                "content-type: application/json",
                "-d",
                json.dumps({**CHAT, "stream": True, "max_tokens": 3}),
            ],
            capture_output=True,
            timeout=LIMIT,
        )
    assert result.returncode == 0 and result.stdout.endswith(b"data: [DONE]\n\n")


# -- API keys ----------------------------------------------------------------------
def test_api_keys_gate_the_proxy_and_the_upstream_sees_only_its_own_key(sglang, monkeypatch):
    """Missing, wrong or Basic credentials get 401 and reach nothing; good keys pass, replaced."""
    calls = []
    real = hmac.compare_digest

    def counting(a, b):
        calls.append(1)
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", counting)
    keys = ("sk-first", "sk-second")
    with RelayThread(sglang.url, api_keys=keys, upstream_api_key="upstream-secret") as relay:
        url = f"{relay.url}/v1/chat/completions"
        for headers in (
            {},
            {"authorization": "Bearer nope"},
            {"authorization": "Basic sk-first"},
            {"x-api-key": "sk-firs"},
        ):
            response = httpx.post(url, json=CHAT, headers=headers, timeout=LIMIT)
            assert response.status_code == 401, headers
            assert response.json()["error"]["code"] == "invalid_api_key"
            assert response.headers["www-authenticate"] == "Bearer"
            assert "sk-first" not in response.text
        assert sglang.sglang.requests == []
        for headers in ({"authorization": "Bearer sk-second"}, {"x-api-key": "sk-first"}):
            response = httpx.post(url, json=CHAT, headers=headers, timeout=LIMIT)
            assert response.status_code == 200
        assert calls  # the comparisons went through hmac.compare_digest
        for request in sglang.sglang.requests:
            headers = dict(request["headers"])
            assert headers[b"authorization"] == b"Bearer upstream-secret"
            assert b"x-api-key" not in headers


def test_key_file_is_reloaded_on_sighup(sglang, tmp_path):
    """Keys added to --api-key-file work after a reload; removed ones stop working."""
    key_file = tmp_path / "keys"
    key_file.write_text("# clients\nsk-old\n\n")
    with RelayThread(sglang.url, api_key_file=str(key_file)) as relay:
        url = f"{relay.url}/health"
        assert httpx.get(url, headers={"x-api-key": "sk-old"}).status_code == 200
        key_file.write_text("sk-new\n")
        assert relay.server is not None
        relay.call(relay.server.state.reload)
        assert httpx.get(url, headers={"x-api-key": "sk-old"}).status_code == 401
        assert httpx.get(url, headers={"x-api-key": "sk-new"}).status_code == 200


def test_keys_never_appear_in_logs_or_config_repr(sglang, caplog):
    """Neither the repr of the config nor relay's logs contain a key."""
    with RelayThread(sglang.url, api_keys=("sk-secret-1",), upstream_api_key="up-secret") as relay:
        httpx.post(
            f"{relay.url}/v1/chat/completions",
            json=CHAT,
            headers={"authorization": "Bearer wrong-secret"},
            timeout=LIMIT,
        )
        assert "secret" not in repr(relay.config)
    assert "secret" not in caplog.text


def test_asyncio_tls_listener_also_works(sglang, server_files):
    """The TLS listener works under the plain asyncio loop as well as uvloop."""
    cert, ca_path = server_files
    with RelayThread(sglang.url, tls_cert=cert, loop_kind="asyncio") as relay:
        url = relay.url.replace("http:", "https:") + "/health"
        assert (
            httpx.get(
                url, verify=ssl.create_default_context(cafile=ca_path), timeout=LIMIT
            ).status_code
            == 200
        )
