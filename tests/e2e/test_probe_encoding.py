"""`relay probe` sees what real clients see: Accept-Encoding, compressed streams, private
CAs, and a reader that goes away.

The case reported: an nginx with ``gzip_types text/event-stream`` held every token until
the end for the openai SDK, httpx and aiohttp (they send ``Accept-Encoding: gzip,
deflate``), yet streamed to a probe that asked for no compression.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import os
import subprocess
import sys
import zlib
from collections.abc import Iterator

import openai
import pytest
import trustme
from harness import ScriptUpstream, parse_request, read_request, run, setup
from relayfixture import RelayThread

from bench.peers import GZIP_EVENT_STREAMS, Peer, nginx_path, start_nginx, start_streamer
from relay.tools.probe import probe

pytestmark = pytest.mark.timeout(60)

LIMIT = 30
PACE = ["--max-tokens", "8", "--model", "demo-model"]


def relay_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "relay", *args], capture_output=True, text=True, timeout=LIMIT
    )


@pytest.fixture(scope="module")
def streamer() -> Iterator[Peer]:
    """The built-in streamer (TTFT 250 ms, a token every 24 ms, never compresses)."""
    peer = start_streamer()
    yield peer
    peer.stop()


def test_probe_calls_an_nginx_that_gzips_event_streams_buffered(streamer):
    """nginx gzip in front of the streamer: BUFFERED (exit 1) with the openai SDK's
    Accept-Encoding, gzip reported; with --accept-encoding identity the same nginx streams."""
    if nginx_path() is None:
        pytest.skip("nginx is not installed: cannot run nginx with gzip in front of the streamer")
    nginx = start_nginx(streamer.port, proxy_buffering=True, http_extra=GZIP_EVENT_STREAMS)
    assert nginx is not None, "nginx is installed but did not start"
    try:
        url = f"http://127.0.0.1:{nginx.port}"
        gzipped = relay_cli("probe", url, *PACE, "--json")
        assert gzipped.returncode == 1, gzipped.stdout + gzipped.stderr
        document = json.loads(gzipped.stdout)
        assert document["verdict"] == "BUFFERED"
        assert document["content_encoding"] == "gzip"
        assert document["tokens"] == 8
        table = relay_cli("probe", url, *PACE)
        assert table.returncode == 1, table.stdout + table.stderr
        assert "gzip" in table.stdout and "compare --accept-encoding identity" in table.stdout
        plain = relay_cli("probe", url, *PACE, "--json", "--accept-encoding", "identity")
        assert plain.returncode == 0, plain.stdout + plain.stderr
        document = json.loads(plain.stdout)
        assert document["verdict"] == "streaming"
        assert document["content_encoding"] == "identity"
    finally:
        nginx.stop()


def test_probe_through_relay_streams_uncompressed(streamer, loop_kind):
    """relay never compresses, and the streamer does not: streaming, encoding identity."""
    with RelayThread(f"127.0.0.1:{streamer.port}", loop_kind=loop_kind) as relay:
        result = relay_cli("probe", relay.url, *PACE, "--json")
    assert result.returncode == 0, result.stdout + result.stderr
    document = json.loads(result.stdout)
    assert (document["verdict"], document["content_encoding"]) == ("streaming", "identity")


EVENTS = [b'data: {"choices":[{"index":0,"delta":{"content":"%d"}}]}\n\n' % i for i in range(6)] + [
    b"data: [DONE]\n\n"
]
GZIP_HEAD = (
    b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncontent-encoding: gzip\r\n"
    b"transfer-encoding: chunked\r\n\r\n"
)


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%b\r\n" % (len(data), data) if data else b""


async def gzip_paced(reader, writer, upstream: ScriptUpstream) -> None:
    """A compressing upstream that streams: one sync-flushed gzip block per event."""
    await read_request(reader, upstream)
    compressor = zlib.compressobj(wbits=16 + zlib.MAX_WBITS)
    writer.write(GZIP_HEAD)
    for event in EVENTS:
        await asyncio.sleep(0.02)
        writer.write(chunk(compressor.compress(event) + compressor.flush(zlib.Z_SYNC_FLUSH)))
    writer.write(chunk(compressor.flush()) + b"0\r\n\r\n")
    await writer.drain()


CLUMP_DELAY = 0.3


async def gzip_clumped(reader, writer, upstream: ScriptUpstream) -> None:
    """A compressing upstream that sends the gzip header at once, then every event together
    after CLUMP_DELAY: compressed bytes come early, readable tokens late."""
    await read_request(reader, upstream)
    body = gzip.compress(b"".join(EVENTS))
    writer.write(GZIP_HEAD + chunk(body[:10]))
    await asyncio.sleep(CLUMP_DELAY)
    writer.write(chunk(body[10:]) + b"0\r\n\r\n")
    await writer.drain()


def test_gzip_streams_are_decoded_and_timed_by_readable_event_through_relay(loop_kind):
    """Through relay: Accept-Encoding reaches the upstream; a sync-flushed gzip stream is
    streaming; one whose events all decode at the end is BUFFERED with TTFT from then."""

    async def main() -> None:
        async with setup(gzip_paced) as (upstream, relay):
            result = await probe(relay.url(), model="m", timeout=10)
            assert result.content_encoding == "gzip"
            assert result.stats.count == 6
            assert result.stats.verdict == "streaming"
            head = parse_request(bytes(upstream.received[0]))
            assert (b"accept-encoding", b"gzip, deflate") in head.headers
        async with setup(gzip_clumped) as (upstream, relay):
            result = await probe(relay.url(), model="m", timeout=10)
            assert result.content_encoding == "gzip"
            assert result.stats.verdict == "BUFFERED"
            assert result.stats.ttft is not None and result.stats.ttft >= CLUMP_DELAY
            identity = await probe(relay.url(), model="m", timeout=10, accept_encoding="")
            head = parse_request(bytes(upstream.received[1]))
            assert not any(name == b"accept-encoding" for name, _ in head.headers)
            assert identity.content_encoding == "gzip"  # this upstream compresses regardless

    run(loop_kind, main)


async def answer_500(reader, writer, upstream: ScriptUpstream) -> None:
    await read_request(reader, upstream)
    writer.write(b"HTTP/1.1 500 Internal Server Error\r\ncontent-length: 0\r\n\r\n")
    await writer.drain()


def test_the_probe_asks_like_the_openai_sdk():
    """Accept-Encoding, Accept, Content-Type and Authorization equal the openai SDK's;
    User-Agent has its Name/version style."""

    async def main() -> None:
        upstream = await ScriptUpstream(answer_500).start()
        try:
            client = openai.AsyncOpenAI(
                base_url=f"http://127.0.0.1:{upstream.port}/v1", api_key="k", max_retries=0
            )
            with pytest.raises(openai.InternalServerError):
                await client.chat.completions.create(
                    model="m", messages=[{"role": "user", "content": "x"}], stream=True
                )
            await client.close()
            with pytest.raises(Exception, match="HTTP 500"):
                await probe(f"http://127.0.0.1:{upstream.port}", model="m", api_key="k")
        finally:
            await upstream.close()
        sdk, ours = (
            {k: v for k, v in parse_request(bytes(raw)).headers} for raw in upstream.received
        )
        for name in (b"accept-encoding", b"accept", b"content-type", b"authorization"):
            assert ours[name] == sdk[name], name
        assert ours[b"user-agent"].startswith(b"relay-probe/")

    run("asyncio", main)


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory) -> tuple[str, str, str]:
    """A trustme CA; a certificate for 127.0.0.1 and one for another host, both from it."""
    ca = trustme.CA()
    folder = tmp_path_factory.mktemp("probe-tls")
    paths = []
    for name, hosts in (("good", ("127.0.0.1", "localhost")), ("wrong", ("other.example",))):
        path = folder / f"{name}.pem"
        ca.issue_cert(*hosts).private_key_and_cert_chain_pem.write_to_path(str(path))
        paths.append(str(path))
    ca_path = folder / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_path))
    return paths[0], paths[1], str(ca_path)


def test_private_ca_with_cacert_and_insecure(streamer, tls_files):
    """https to a private CA: unverified is exit 3; --cacert streams; a wrong host is still
    refused with --cacert; --insecure skips verification."""
    good, wrong, ca = tls_files
    upstream = f"127.0.0.1:{streamer.port}"
    with RelayThread(upstream, tls_cert=good) as relay:
        url = relay.url.replace("http://", "https://")
        untrusted = relay_cli("probe", url, *PACE)
        assert untrusted.returncode == 3, untrusted.stdout + untrusted.stderr
        assert untrusted.stderr.count("\n") == 1 and "certificate verify failed" in untrusted.stderr
        trusted = relay_cli("probe", url, *PACE, "--cacert", ca)
        assert trusted.returncode == 0, trusted.stdout + trusted.stderr
        assert "streaming" in trusted.stdout
    with RelayThread(upstream, tls_cert=wrong) as relay:
        url = relay.url.replace("http://", "https://")
        mismatch = relay_cli("probe", url, *PACE, "--cacert", ca)
        assert mismatch.returncode == 3, mismatch.stdout + mismatch.stderr
        assert "mismatch, certificate is not valid" in mismatch.stderr
        insecure = relay_cli("probe", url, *PACE, "--insecure")
        assert insecure.returncode == 0, insecure.stdout + insecure.stderr
    missing = relay_cli("probe", url, "--cacert", os.path.join(os.path.dirname(ca), "none.pem"))
    assert missing.returncode == 2
    assert missing.stderr.startswith("relay probe: error: argument --cacert: cannot load")


@pytest.mark.parametrize("extra", [["--json"], [], ["--repeat", "2"]])
def test_a_reader_that_went_away_is_no_traceback(streamer, extra):
    """`relay probe ... | head -c 10`: stdout's reader is gone before the result is written;
    no traceback, and the exit code still says the verdict."""
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone before the probe writes anything
    command = [sys.executable, "-m", "relay", "probe", f"http://127.0.0.1:{streamer.port}"]
    try:
        process = subprocess.Popen(
            [*command, *PACE, *extra],
            stdout=write_end,
            stderr=subprocess.PIPE,
            text=True,
        )
    finally:
        os.close(write_end)
    _, stderr = process.communicate(timeout=LIMIT)
    assert stderr == ""
    assert process.returncode == 0
