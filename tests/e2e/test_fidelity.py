"""Stream fidelity on live traffic, over real sockets under asyncio and uvloop.

Coalesced reads, endings counted as the access line names them, the timing
of a departed client's cancellation, the body digest, SSE keep-alive
comments and relay's own test stream.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import json
import logging
import shutil
import socket
import subprocess

import aiohttp
import openai
import pytest
from harness import (
    CHUNKED_HEAD,
    WAIT,
    ScriptUpstream,
    connect,
    read_head,
    read_request,
    read_to_eof,
    relay_for,
    request_bytes,
    run,
    setup,
    sse_chunk,
    until,
)
from relayfixture import RelayThread
from sglang_app import SGLangServer

from relay.core.metrics import Metrics
from relay.http.fidelity import ENDINGS, KEEPALIVE_COMMENT
from relay.http.framing import LAST_CHUNK, ChunkedFramer
from relay.tools.probe import probe

pytestmark = pytest.mark.timeout(60)


class AccessLines(logging.Handler):
    """Collects the fields of every relay.access record."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[dict] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(dict(record.fields))  # type: ignore[attr-defined]


@pytest.fixture
def access():
    logger = logging.getLogger("relay.access")
    handler = AccessLines()
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield handler
    logger.removeHandler(handler)
    logger.setLevel(level)


def dechunk(body: bytes) -> list[bytes]:
    """The chunk payloads of a complete chunked body, one item per chunk."""
    framer = ChunkedFramer(dechunk=True)
    chunks: list[bytes] = []
    for i in range(len(body)):  # byte by byte: each chunk's payload lands whole
        framer.feed(body[i : i + 1])
        assert framer.payload is not None
        if framer.payload and framer.between_chunks:
            chunks.append(b"".join(framer.payload))
            framer.payload.clear()
    assert framer.complete
    return chunks


def split_response(raw: bytes) -> tuple[bytes, bytes]:
    head, _, body = raw.partition(b"\r\n\r\n")
    return head, body


# -- coalescing ---------------------------------------------------------------------
def test_reads_that_queue_behind_unsent_bytes_are_counted_as_coalesced(loop_kind, access):
    """A client that does not read makes later upstream reads wait behind earlier bytes:
    each such read is counted per upstream, in the backlog histogram and on the access line."""
    event = b"data: " + b"x" * 2000 + b"\n\n"

    async def upstream(reader, writer, up):
        await read_request(reader, up)
        writer.write(CHUNKED_HEAD)
        for _ in range(1500):  # 3 MB: more than the kernel buffers on the way hold
            writer.write(b"%x\r\n%b\r\n" % (len(event), event))
            await writer.drain()
            await asyncio.sleep(0)
        writer.write(LAST_CHUNK)
        await writer.drain()

    async def main():
        async with setup(upstream) as (up, relay):
            loop = asyncio.get_running_loop()
            with socket.socket() as sock:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
                sock.setblocking(False)
                await asyncio.wait_for(loop.sock_connect(sock, ("127.0.0.1", relay.port)), WAIT)
                await loop.sock_sendall(sock, request_bytes())
                # The client reads nothing until relay has had to queue bytes for it.
                await until(lambda: relay.state.metrics.coalesced_reads.total() > 0)
                raw = bytearray()
                while not raw.endswith(LAST_CHUNK):
                    data = await asyncio.wait_for(loop.sock_recv(sock, 65536), WAIT)
                    assert data
                    raw += data
            await until(lambda: relay.state.metrics.active_exchanges == 0)
            metrics = relay.state.metrics
            label = f"http://127.0.0.1:{up.port}"
            coalesced = metrics.coalesced_reads[(label,)]
            assert coalesced > 0
            assert metrics.coalesced_backlog.count == coalesced
            assert access.lines[-1]["coalesced"] == coalesced
            text = metrics.render()
            assert f'relay_coalesced_reads_total{{upstream="{label}"}} {coalesced}' in text
            assert f"relay_coalesced_backlog_bytes_count {coalesced}" in text

    run(loop_kind, main)


def test_a_client_that_keeps_up_has_no_coalesced_reads(loop_kind, access):
    """Paced events to a reading client each go out on their own: nothing is counted."""

    async def upstream(reader, writer, up):
        await read_request(reader, up)
        writer.write(CHUNKED_HEAD)
        for i in range(5):
            writer.write(sse_chunk(f"tok{i}"))
            await writer.drain()
            await asyncio.sleep(0.02)
        writer.write(LAST_CHUNK)

    async def main():
        async with setup(upstream) as (_, relay):
            reader, writer = await connect(relay)
            writer.write(request_bytes(extra=b"Connection: close\r\n"))
            raw = await read_to_eof(reader)
            assert raw.endswith(LAST_CHUNK)
            await until(lambda: relay.state.metrics.active_exchanges == 0)
            assert relay.state.metrics.coalesced_reads.total() == 0
            assert "coalesced" not in access.lines[-1]

    run(loop_kind, main)


# -- endings -----------------------------------------------------------------------
def test_ending_counters_equal_the_access_lines_after_a_mix_of_endings(loop_kind, access):
    """complete (stream and JSON), upstream cut, client gone, timeout and limit: the
    endings counter, by kind, is exactly what the access lines say."""

    async def upstream(reader, writer, up):
        while True:  # a pooled connection carries the next request
            raw = await read_request(reader, up)
            path = raw.split(b" ", 2)[1]
            if path == b"/stream":
                writer.write(CHUNKED_HEAD + sse_chunk("a") + LAST_CHUNK)
            elif path == b"/json":
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                             b"content-length: 2\r\n\r\n{}")  # fmt: skip
            elif path == b"/cut":
                writer.write(CHUNKED_HEAD + sse_chunk("a"))
                await writer.drain()
                return  # closed mid-body
            else:  # /gone streams one event, /slow nothing; both wait for relay to close
                if path == b"/gone":
                    writer.write(CHUNKED_HEAD + sse_chunk("a"))
                await reader.read()
                return
            await writer.drain()

    async def exchange(relay, raw: bytes, *, leave_after: bytes | None = None) -> bytes:
        reader, writer = await connect(relay)
        writer.write(raw)
        if leave_after is not None:
            await asyncio.wait_for(reader.readuntil(leave_after), WAIT)
            writer.close()
            return b""
        data = await read_to_eof(reader)
        writer.close()
        return data

    async def main():
        limits = {"upstream_head_timeout": 0.3, "max_body_bytes": 1024}
        async with setup(upstream, **limits) as (_, relay):
            close = b"Connection: close\r\n"
            await exchange(relay, request_bytes("/stream", extra=close))
            await exchange(relay, request_bytes("/json", extra=close))
            await exchange(relay, request_bytes("/cut"))
            await exchange(relay, request_bytes("/gone"), leave_after=b"data: a\n\n")
            assert b" 504 " in await exchange(relay, request_bytes("/slow"))
            too_big = (
                b"POST /limit HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
                b"800\r\n" + b"x" * 0x800 + b"\r\n0\r\n\r\n"
            )
            assert b" 413 " in await exchange(relay, too_big)
            metrics = relay.state.metrics
            await until(lambda: metrics.active_exchanges == 0)
            logged = collections.Counter(line["ending"] for line in access.lines)
            counted = collections.Counter()
            for (ending, _stream), n in metrics.endings.items():
                counted[ending] += n
            assert +counted == logged
            assert logged == {
                "complete": 2,
                "upstream_cut": 1,
                "client_gone": 1,
                "timeout": 1,
                "limit": 1,
            }
            assert metrics.endings["complete", "true"] == 1
            assert metrics.endings["complete", "false"] == 1
            text = metrics.render()
            for ending in ENDINGS:
                for stream in ("true", "false"):
                    n = metrics.endings[ending, stream]
                    assert (
                        f'relay_stream_endings_total{{ending="{ending}",stream="{stream}"}} {n}'
                        in text
                    )
            # The counters survive a worker's snapshot (JSON) and add up.
            copy = Metrics.from_snapshot(metrics.snapshot())
            assert copy.endings == metrics.endings

    run(loop_kind, main)


# -- cancellation ----------------------------------------------------------------------
def test_refusals_queue_503s_and_a_drain_cut_each_get_one_access_line_and_ending(loop_kind, access):
    """A 429 and a 413 that relay answers itself, a full queue and a queue timeout
    (limits, all four), a head relay cannot read (error) and a stream cut by the
    drain (``drain``): one access line each, and the endings counter says the same."""

    async def upstream(reader, writer, up):
        await read_request(reader, up)
        writer.write(CHUNKED_HEAD + sse_chunk("a"))  # then holds the only slot
        await writer.drain()
        await reader.read()

    async def answer(relay, raw: bytes) -> bytes:
        reader, writer = await connect(relay)
        writer.write(raw)
        data = await asyncio.wait_for(read_to_eof(reader), WAIT)
        writer.close()
        return data

    async def main():
        limits = {
            "max_body_bytes": 1024,
            "key_rpm": 3,  # per client address: a burst of 3, then 429
            "max_inflight": 1,
            "queue_size": 1,
            "queue_timeout": 0.5,
        }
        async with setup(upstream, **limits) as (_, relay):
            metrics = relay.state.metrics
            held_reader, held = await connect(relay)
            held.write(request_bytes("/hold"))
            await asyncio.wait_for(held_reader.readuntil(b"data: a\n\n"), WAIT)
            queued = asyncio.ensure_future(answer(relay, request_bytes("/queued")))
            gates = relay.state.admission._gates.values()
            await until(lambda: sum(len(g.queue) for g in gates) == 1)
            assert b" 503 " in await answer(relay, request_bytes("/full"))
            assert b"queue_timeout" in await queued
            assert b" 429 " in await answer(relay, request_bytes("/rpm"))
            too_big = b"POST /big HTTP/1.1\r\nHost: a\r\nContent-Length: 2000\r\n\r\n"
            assert b" 413 " in await answer(relay, too_big)
            assert b" 400 " in await answer(relay, b"NOT HTTP AT ALL\r\n\r\n")
            assert metrics.active_exchanges == 1
        # Leaving the block closes relay with no drain time: /hold is cut.
        await until(lambda: len(access.lines) == 6)
        by_path = {line["path"]: (line["status"], line["ending"]) for line in access.lines}
        assert by_path == {
            "-": (400, "error"),  # a head relay could not read, logged as nginx does
            "/queued": (503, "limit"),
            "/full": (503, "limit"),
            "/rpm": (429, "limit"),
            "/big": (413, "limit"),
            "/hold": (200, "drain"),
        }
        counted = collections.Counter()
        for (ending, _stream), n in metrics.endings.items():
            counted[ending] += n
        assert +counted == collections.Counter(line["ending"] for line in access.lines)
        assert metrics.endings["drain", "true"] == 1

    run(loop_kind, main)


def test_a_departed_client_is_timed_and_the_upstream_bytes_dropped_are_counted(loop_kind, access):
    """When a client that stopped reading leaves, relay closes its upstream at once,
    records how long that took and how many bytes the upstream had sent unread."""
    upstream_closed: asyncio.Event | None = None

    async def upstream(reader, writer, up):
        await read_request(reader, up)
        writer.write(CHUNKED_HEAD)
        event = b"data: " + b"y" * 4000 + b"\n\n"
        try:
            for _ in range(2000):  # 8 MB: far more than any buffer on the way
                writer.write(b"%x\r\n%b\r\n" % (len(event), event))
                await writer.drain()
        except ConnectionError:
            pass
        assert upstream_closed is not None
        upstream_closed.set()

    async def main():
        nonlocal upstream_closed
        upstream_closed = asyncio.Event()
        async with setup(upstream) as (_, relay):
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.connect(("127.0.0.1", relay.port))
            sock.setblocking(False)
            reader, writer = await asyncio.open_connection(sock=sock)
            writer.write(request_bytes())
            await read_head(reader)
            # Relay stops reading the upstream once the client's buffer is full.
            await until(lambda: any(c.writing_paused for c in relay.state.connections))
            await asyncio.sleep(0.1)  # the upstream keeps filling relay's receive queue
            writer.close()
            await asyncio.wait_for(upstream_closed.wait(), WAIT)
            metrics = relay.state.metrics
            await until(lambda: metrics.active_exchanges == 0)
            line = access.lines[-1]
            assert line["ending"] == "client_gone"
            assert 0 <= line["cancel_ms"] < 1000
            assert line["cancel_bytes"] > 0
            assert metrics.cancel_time.count == 1
            assert metrics.cancel_upstream_bytes == line["cancel_bytes"]
            assert "relay_cancel_seconds_count 1" in metrics.render()

    run(loop_kind, main)


# -- body digest --------------------------------------------------------------------
@pytest.mark.parametrize("flag", [True, False])
def test_body_digest_is_the_sha256_of_the_body_bytes_the_client_received(loop_kind, access, flag):
    """--body-digest puts the SHA-256 of the forwarded body (as curl --raw sees it)
    on the access line; without the flag there is none."""

    async def upstream(reader, writer, up):
        await read_request(reader, up)
        writer.write(CHUNKED_HEAD)
        for i in range(20):
            writer.write(sse_chunk(f"token {i} ünïcode"))
            await writer.drain()
        writer.write(LAST_CHUNK)

    async def main():
        async with setup(upstream, body_digest=flag) as (_, relay):
            reader, writer = await connect(relay)
            writer.write(request_bytes(extra=b"Connection: close\r\n"))
            _, body = split_response(await read_to_eof(reader))
            await until(lambda: relay.state.metrics.active_exchanges == 0)
            line = access.lines[-1]
            if flag:
                assert line["body_sha256"] == hashlib.sha256(body).hexdigest()
            else:
                assert "body_sha256" not in line

    run(loop_kind, main)


# -- SSE keep-alive comments --------------------------------------------------------------
def test_keepalive_comments_go_out_as_chunks_of_their_own_only_at_event_boundaries(
    loop_kind, access
):
    """With --sse-keepalive, a silent upstream gets ": keep-alive" chunks after a whole
    event, none while an event is half sent, and the upstream's chunks stay intact."""
    first, second = b"data: one\n\n", b"data: two\n\n"

    async def upstream(reader, writer, up):
        await read_request(reader, up)
        writer.write(CHUNKED_HEAD + b"%x\r\n%b\r\n" % (len(first), first))
        await writer.drain()
        await asyncio.sleep(0.45)  # thinking: keep-alives due
        whole = b"%x\r\n%b\r\n" % (len(second), second)
        writer.write(whole[:8])
        await writer.drain()
        await asyncio.sleep(0.45)  # silent mid-event: nothing may be inserted
        writer.write(whole[8:] + LAST_CHUNK)

    async def main():
        async with setup(upstream, sse_keepalive=0.1) as (_, relay):
            reader, writer = await connect(relay)
            writer.write(request_bytes(extra=b"Connection: close\r\n"))
            head, body = split_response(await read_to_eof(reader))
            assert b" 200 " in head
            chunks = dechunk(body)
            assert chunks[0] == first and chunks[-1] == second
            middle = chunks[1:-1]
            assert middle and set(middle) == {KEEPALIVE_COMMENT}
            await until(lambda: relay.state.metrics.active_exchanges == 0)
            assert access.lines[-1]["keepalives"] == len(middle)
            assert relay.state.metrics.sse_keepalives == len(middle)
            assert access.lines[-1]["bytes_out"] == len(body) - len(middle) * 19

    run(loop_kind, main)


@pytest.mark.parametrize(
    "head",
    [
        b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n",
        b"HTTP/1.1 500 Oops\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked"
        b"\r\n\r\n",
    ],
    ids=["not-sse", "not-200"],
)
def test_no_keepalive_for_a_response_that_is_not_a_200_event_stream(loop_kind, head):
    """Keep-alive comments go only into 200 text/event-stream bodies."""

    async def upstream(reader, writer, up):
        await read_request(reader, up)
        writer.write(head + b"3\r\n{}\n\r\n")
        await writer.drain()
        await asyncio.sleep(0.3)
        writer.write(LAST_CHUNK)

    async def main():
        async with setup(upstream, sse_keepalive=0.05) as (_, relay):
            reader, writer = await connect(relay)
            writer.write(request_bytes(extra=b"Connection: close\r\n"))
            _, body = split_response(await read_to_eof(reader))
            assert dechunk(body) == [b"{}\n"]
            assert relay.state.metrics.sse_keepalives == 0

    run(loop_kind, main)


@pytest.mark.parametrize(
    ("content_type", "transfer_encoding"),
    [
        (b"content-type", b"transfer-encoding"),
        (b"CONTENT-TYPE", b"TRANSFER-ENCODING"),
        (b"Content-Type", b"Transfer-Encoding"),
    ],
    ids=["lower", "upper", "mixed"],
)
def test_an_event_stream_is_known_whatever_case_the_upstream_writes_its_fields_in(
    loop_kind, access, content_type, transfer_encoding
):
    """Go's net/http, llama.cpp and nginx write ``Content-Type``: the stream still gets
    keep-alive comments, the ``stream="true"`` ending and its usage read."""
    usage = b'data: {"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":2}}\n\n'
    head = b"HTTP/1.1 200 OK\r\n%b: text/event-stream\r\n%b: chunked\r\n\r\n" % (
        content_type,
        transfer_encoding,
    )

    async def upstream(reader, writer, up):
        await read_request(reader, up)
        writer.write(head + b"%x\r\n%b\r\n" % (len(usage), usage))
        await writer.drain()
        await asyncio.sleep(0.45)  # silent: keep-alives due
        writer.write(LAST_CHUNK)

    async def main():
        async with setup(upstream, sse_keepalive=0.1) as (_, relay):
            reader, writer = await connect(relay)
            writer.write(request_bytes(extra=b"Connection: close\r\n"))
            _, body = split_response(await read_to_eof(reader))
            assert KEEPALIVE_COMMENT in dechunk(body)
            await until(lambda: relay.state.metrics.active_exchanges == 0)
            line = access.lines[-1]
            assert line["keepalives"] >= 1
            assert (line["usage"], line["prompt_tokens"], line["completion_tokens"]) == (
                "reported",
                3,
                2,
            )
            assert relay.state.metrics.endings[("complete", "true")] == 1

    run(loop_kind, main)


# -- the test stream ----------------------------------------------------------------------
async def closed_port() -> int:
    """A loopback port nothing listens on (the test stream needs no upstream)."""
    up = await ScriptUpstream(lambda r, w, u: asyncio.sleep(0)).start()
    port = up.port
    await up.close()
    return port


def test_probe_measures_the_test_stream_without_any_upstream(loop_kind, access):
    """relay probe http://relay/PATH streams relay's own paced events: no upstream needed."""

    async def main():
        async with relay_for(await closed_port(), test_stream="/relay-test") as relay:
            result = await probe(f"{relay.url()}/relay-test", max_tokens=6, timeout=WAIT)
            assert result.stats.count == 6
            assert result.stats.verdict == "streaming"
            assert result.model == "relay-test-stream"
            await until(lambda: relay.state.metrics.active_exchanges == 0)
            assert [line["ending"] for line in access.lines] == ["complete", "complete"]
            assert relay.state.metrics.endings["complete", "true"] == 1

    run(loop_kind, main)


def test_test_stream_sits_behind_the_api_keys_and_answers_bad_requests_clearly(loop_kind):
    """With keys set, the test stream needs one; unknown paths under it get 404, bad
    overrides 400, each with an OpenAI-style JSON error; other paths are proxied."""

    async def status(relay, raw: bytes) -> bytes:
        reader, writer = await connect(relay)
        writer.write(raw)
        data = await read_to_eof(reader)
        writer.close()
        return data

    def get(path: str, key: str | None = None) -> bytes:
        auth = b"" if key is None else b"Authorization: Bearer %b\r\n" % key.encode()
        return b"GET %b HTTP/1.1\r\nHost: a\r\nConnection: close\r\n%b\r\n" % (path.encode(), auth)

    async def main():
        port = await closed_port()
        config = {"test_stream": "/t", "api_keys": ("sk-good",)}
        async with relay_for(port, **config) as relay:
            assert b" 401 " in await status(relay, get("/t?tokens=2&ttft_ms=0&gap_ms=0"))
            ok = await status(relay, get("/t?tokens=2&ttft_ms=0&gap_ms=0", "sk-good"))
            assert b" 200 " in ok and b"text/event-stream" in ok and b"data: [DONE]" in ok
            missing = await status(relay, get("/t/v1/nothing", "sk-good"))
            assert b" 404 " in missing and b'"error"' in missing
            bad = await status(relay, get("/t?tokens=many", "sk-good"))
            assert b" 400 " in bad and b"must be numbers" in bad
            huge = await status(relay, get("/t?tokens=100000", "sk-good"))
            assert b" 400 " in huge
            proxied = await status(relay, get("/v1/models", "sk-good"))
            assert b" 502 " in proxied  # not the test stream: the (absent) upstream's

    run(loop_kind, main)


# -- real clients ignore the keep-alive comments ----------------------------------------------
KEEPALIVE_BODY = {
    "model": "test-model",
    "messages": [{"role": "user", "content": "hi"}],
    "stream": True,
    "max_tokens": 3,
    "test_ttft_ms": 400,
    "test_gap_ms": 250,
}
KEEPALIVE_TEXT = " tok0 tok1 tok2"


@pytest.fixture
def keepalive_relay():

    sglang = SGLangServer().start()
    try:
        with RelayThread(sglang.url, sse_keepalive=0.1) as relay:
            yield relay
    finally:
        sglang.stop()


def test_openai_aiohttp_and_curl_ignore_keepalive_comments(keepalive_relay):
    """The openai SDK, aiohttp (reading SSE lines) and curl get exactly the upstream's
    tokens from a stream that carried keep-alive comments."""

    relay = keepalive_relay

    async def with_openai() -> str:
        client = openai.AsyncOpenAI(
            base_url=f"{relay.url}/v1", api_key="unused", max_retries=0, timeout=20
        )
        text = ""
        stream = await client.chat.completions.create(
            model="test-model",
            messages=[{"role": "user", "content": "hi"}],
            stream=True,
            max_tokens=3,
            extra_body={"test_ttft_ms": 400, "test_gap_ms": 250},
        )
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                text += chunk.choices[0].delta.content
        await client.close()
        return text

    async def with_aiohttp() -> str:
        text = ""
        timeout = aiohttp.ClientTimeout(total=20)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            url = f"{relay.url}/v1/chat/completions"
            async with session.post(url, json=KEEPALIVE_BODY) as response:
                assert response.status == 200
                async for line in response.content:
                    if line.startswith(b"data: {"):
                        delta = json.loads(line[6:])["choices"][0]["delta"]
                        text += delta.get("content") or ""
        return text

    assert asyncio.run(with_openai()) == KEEPALIVE_TEXT
    first = relay.metrics().sse_keepalives
    assert first > 0
    assert asyncio.run(with_aiohttp()) == KEEPALIVE_TEXT
    second = relay.metrics().sse_keepalives
    assert second > first
    curl = shutil.which("curl")
    if curl is not None:
        result = subprocess.run(
            [curl, "-sS", "-N", "--max-time", "20", "-H", "Content-Type: application/json",
             "-d", json.dumps(KEEPALIVE_BODY), f"{relay.url}/v1/chat/completions"],
            capture_output=True, timeout=30, check=False,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        assert b": keep-alive\n\n" in result.stdout
        contents = [
            json.loads(line[6:])["choices"][0]["delta"].get("content") or ""
            for line in result.stdout.split(b"\n")
            if line.startswith(b"data: {")
        ]
        assert "".join(contents) == KEEPALIVE_TEXT
        assert relay.metrics().sse_keepalives > second
