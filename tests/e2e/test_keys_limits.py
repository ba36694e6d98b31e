"""Named keys, per-key limits, the --max-inflight queue and usage, with real clients.

The openai SDK (retries off, so a 429 or 503 is seen as it is) talks to a
real relay in front of the SGLang-like upstream (uvicorn + Starlette).
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
from collections.abc import Callable
from typing import Any

import httpx
import openai
import pytest
from relayfixture import RelayThread, eventually
from sglang_app import SGLangServer

from relay.http.auth import NamedKey

pytestmark = pytest.mark.timeout(60)

LIMIT = 10.0
KEYS = (NamedKey("team-a", "sk-team-a"), NamedKey("team-b", "sk-team-b"))
CHAT: dict[str, Any] = {"model": "test-model", "messages": [{"role": "user", "content": "hi"}]}


@pytest.fixture
def sglang():
    server = SGLangServer().start()
    yield server
    server.stop()


def client(relay: RelayThread, key: str = "sk-team-a") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{relay.url}/v1", api_key=key, max_retries=0, timeout=LIMIT)


def state(relay: RelayThread, read: Callable[[Any], Any]) -> Any:
    """``read(ServerState)`` on the relay's loop."""
    assert relay.server is not None
    server = relay.server
    return relay.call(lambda: read(server.state))


def nothing_held(relay: RelayThread) -> bool:
    """No exchange, no key concurrency, no upstream slot, no waiter left anywhere."""

    def check(st: Any) -> bool:
        admission = st.admission
        gates = admission._gates.values()
        return (
            st.metrics.active_exchanges == 0
            and all(n == 0 for n in admission.in_flight.values())
            and all(b.in_flight == 0 for b in admission._budgets.values())
            and all(g.in_flight == 0 and len(g.queue) == 0 for g in gates)
        )

    return state(relay, check)


def open_stream(relay: RelayThread, key: str, **body: Any) -> socket.socket:
    """A raw client whose stream has started (its response head arrived)."""
    payload = json.dumps({**CHAT, "stream": True, **body}).encode()
    sock = socket.create_connection(("127.0.0.1", relay.port), timeout=LIMIT)
    sock.sendall(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer %b\r\n"
        b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%b"
        % (key.encode(), len(payload), payload)
    )
    return sock


def test_concurrency_limit_answers_429_with_retry_after_and_is_released(sglang):
    """team-a at its one stream gets 429 rate_limit_exceeded; team-b is unaffected; then free."""
    keys = (NamedKey("team-a", "sk-team-a"), NamedKey("team-b", "sk-team-b"))
    with RelayThread(sglang.url, api_keys=keys, key_max_concurrent=1) as relay:
        busy = open_stream(relay, "sk-team-a", max_tokens=200, test_gap_ms=20)
        assert busy.recv(12).startswith(b"HTTP/1.1 200")
        with pytest.raises(openai.RateLimitError) as caught:
            client(relay).chat.completions.create(**CHAT, max_tokens=2)
        response = caught.value.response
        assert response.headers["retry-after"] == "1"
        error = response.json()["error"]
        assert error["code"] == "rate_limit_exceeded" and "in flight" in error["message"]
        requests_seen = len(sglang.sglang.requests)
        assert requests_seen == 1  # the refused request never reached the upstream
        other = client(relay, "sk-team-b").chat.completions.create(**CHAT, max_tokens=2)
        assert other.usage is not None
        busy.close()
        eventually(lambda: nothing_held(relay))
        done = client(relay).chat.completions.create(**CHAT, max_tokens=2)
        assert done.choices[0].message.content == " tok0 tok1"
        metrics = relay.metrics()
        assert metrics.key_requests["team-a", "concurrent"] == 1
        assert metrics.requests["relay", 429] == 1


def test_requests_per_minute_limit_is_per_key_with_per_key_overrides(sglang):
    """--key-rpm 2 for team-a; team-b's own rpm=0 in its entry lifts the limit."""
    keys = (NamedKey("team-a", "sk-team-a"), NamedKey("team-b", "sk-team-b", _no_rpm()))
    with RelayThread(sglang.url, api_keys=keys, key_rpm=2) as relay:
        a = client(relay)
        a.chat.completions.create(**CHAT, max_tokens=1)
        a.chat.completions.create(**CHAT, max_tokens=1)
        with pytest.raises(openai.RateLimitError) as caught:
            a.chat.completions.create(**CHAT, max_tokens=1)
        assert int(caught.value.response.headers["retry-after"]) in (29, 30)
        b = client(relay, "sk-team-b")
        for _ in range(4):
            b.chat.completions.create(**CHAT, max_tokens=1)
        assert len(sglang.sglang.requests) == 6


def _no_rpm() -> Any:
    from relay.http.limits import KeyLimits

    return KeyLimits(rpm=0)


def test_tokens_per_minute_counts_reported_usage_then_refuses(sglang):
    """--key-tpm 20: two requests of 3+8 tokens spend 22, the third waits (429)."""
    with RelayThread(sglang.url, api_keys=KEYS, key_tpm=20) as relay:
        a = client(relay)
        for _ in range(2):
            a.chat.completions.create(**CHAT, max_tokens=8)
        with pytest.raises(openai.RateLimitError) as caught:
            a.chat.completions.create(**CHAT, max_tokens=8)
        assert "tokens per minute" in caught.value.response.json()["error"]["message"]
        assert int(caught.value.response.headers["retry-after"]) >= 1
        client(relay, "sk-team-b").chat.completions.create(**CHAT, max_tokens=8)


def test_without_keys_limits_apply_to_each_client_address(sglang):
    """No keys: --key-max-concurrent counts per client address, labelled anonymous."""
    with RelayThread(sglang.url, key_max_concurrent=1) as relay:
        busy = open_stream(relay, "unused", max_tokens=200, test_gap_ms=20)
        assert busy.recv(12).startswith(b"HTTP/1.1 200")
        with pytest.raises(openai.RateLimitError):
            client(relay).chat.completions.create(**CHAT, max_tokens=1)
        busy.close()
        eventually(lambda: nothing_held(relay))
        client(relay).chat.completions.create(**CHAT, max_tokens=1)
        assert relay.metrics().key_requests["anonymous", "concurrent"] == 1


async def _chat(relay: RelayThread, key: str, tag: str, **body: Any) -> int:
    async with httpx.AsyncClient(timeout=LIMIT) as http:
        response = await http.post(
            f"{relay.url}/v1/chat/completions",
            headers={"authorization": f"Bearer {key}"},
            json={**CHAT, "user": tag, **body},
        )
        return response.status_code


def test_the_queue_serves_keys_in_turn_one_greedy_one_polite(sglang):
    """--max-inflight 1: team-a queues 4, then team-b 1; team-b goes second, not last."""
    with RelayThread(sglang.url, api_keys=KEYS, max_inflight=1) as relay:

        def queued() -> int:
            return state(relay, lambda st: sum(len(g.queue) for g in st.admission._gates.values()))

        # a0 holds the one slot until the test lets it go, not for a fixed time: a
        # slow machine queueing the others past a timed hold would reorder them.
        holder = open_stream(relay, "sk-team-a", max_tokens=10000, test_gap_ms=20, user="a0")
        assert holder.recv(12).startswith(b"HTTP/1.1 200")

        async def main() -> list[int]:
            short = {"max_tokens": 2}
            tasks = []
            for i in range(1, 4):
                tasks.append(asyncio.ensure_future(_chat(relay, "sk-team-a", f"a{i}", **short)))
                await asyncio.to_thread(eventually, lambda i=i: queued() == i)
            tasks.append(asyncio.ensure_future(_chat(relay, "sk-team-b", "b0", **short)))
            await asyncio.to_thread(eventually, lambda: queued() == 4)
            holder.close()
            return await asyncio.gather(*tasks)

        assert asyncio.run(main()) == [200] * 4
        order = [json.loads(r["body"])["user"] for r in sglang.sglang.requests]
        assert order == ["a0", "a1", "b0", "a2", "a3"]
        assert relay.metrics().queue_wait.count == 4
        eventually(lambda: nothing_held(relay))


def test_a_queued_client_that_leaves_leaves_the_queue_at_once(sglang, caplog):
    """The waiter is gone as soon as its client closes; the upstream never sees it."""
    with RelayThread(sglang.url, api_keys=KEYS, max_inflight=1) as relay:
        busy = open_stream(relay, "sk-team-a", max_tokens=200, test_gap_ms=20)
        assert busy.recv(12).startswith(b"HTTP/1.1 200")
        waiting = open_stream(relay, "sk-team-b", max_tokens=2)
        eventually(lambda: state(relay, lambda st: st.gauges()["relay_queue_length"][0][1]) == 1)
        waiting.close()
        eventually(lambda: state(relay, lambda st: st.gauges()["relay_queue_length"][0][1]) == 0)
        assert len(sglang.sglang.requests) == 1
        busy.close()
        eventually(lambda: nothing_held(relay))


def test_a_full_queue_and_a_wait_that_runs_out_get_503(sglang):
    """--queue-size 1 --queue-timeout 1.5s: one waits and times out, one more is refused."""
    # The second request must arrive while the first still waits: the timeout is
    # the test's window to see the first queued and send the second (a loaded
    # machine took longer than 0.3 s), and shorter than the holder's 4 s stream.
    with RelayThread(
        sglang.url, api_keys=KEYS, max_inflight=1, queue_size=1, queue_timeout=1.5
    ) as relay:
        busy = open_stream(relay, "sk-team-a", max_tokens=200, test_gap_ms=20)
        assert busy.recv(12).startswith(b"HTTP/1.1 200")

        async def main() -> list[httpx.Response]:
            async with httpx.AsyncClient(timeout=LIMIT) as http:
                url = f"{relay.url}/v1/chat/completions"
                first = asyncio.ensure_future(
                    http.post(url, headers={"x-api-key": "sk-team-b"}, json=CHAT)
                )
                await asyncio.to_thread(
                    eventually,
                    lambda: state(relay, lambda st: st.gauges()["relay_queue_length"][0][1]) == 1,
                )
                second = await http.post(url, headers={"x-api-key": "sk-team-b"}, json=CHAT)
                return [await first, second]

        timed_out, full = asyncio.run(main())
        assert timed_out.status_code == 503 and full.status_code == 503
        assert timed_out.json()["error"]["code"] == "queue_timeout"
        assert full.json()["error"]["code"] == "queue_full"
        assert full.headers["retry-after"] == "1"
        busy.close()
        eventually(lambda: nothing_held(relay))
        text = relay.call(lambda: relay.server.state.metrics.render())  # type: ignore[union-attr]
        assert 'relay_key_requests_total{key="team-b",result="queue_full"} 1' in text
        # One result per request, and they add up: the two refused by the queue
        # are not also counted as admitted.
        results = relay.metrics().key_requests
        assert results["team-b", "queue_full"] == results["team-b", "queue_timeout"] == 1
        assert results["team-b", "admitted"] == 0
        assert results["team-a", "admitted"] == 1


def test_usage_is_counted_for_streams_with_and_without_usage_and_for_json(sglang, caplog):
    """include_usage → reported; without → estimated; non-streaming → reported; logged too."""
    caplog.set_level(logging.INFO, logger="relay.access")
    with RelayThread(sglang.url, api_keys=KEYS) as relay:
        a = client(relay)
        stream = a.chat.completions.create(
            **CHAT, max_tokens=5, stream=True, stream_options={"include_usage": True}
        )
        usage = [c.usage for c in stream if c.usage is not None]
        assert usage[0].completion_tokens == 5
        plain = a.chat.completions.create(**CHAT, max_tokens=6, stream=True)
        assert sum(1 for c in plain if c.choices and c.choices[0].delta.content) == 6
        client(relay, "sk-team-b").chat.completions.create(**CHAT, max_tokens=7)
        eventually(lambda: nothing_held(relay))
        tokens = relay.metrics().tokens
        usage_by_source = relay.metrics().usage
    assert tokens["team-a", "other", "prompt"] == 3
    # The estimate counts the 6 events that carry text: not the final chunk
    # (finish_reason, empty delta) nor [DONE].
    assert tokens["team-a", "other", "completion"] == 5 + 6
    assert tokens["team-b", "other", "prompt"] == 3
    assert tokens["team-b", "other", "completion"] == 7
    assert usage_by_source["team-a", "reported"] == 1
    assert usage_by_source["team-a", "estimated"] == 1
    lines = [r.getMessage() for r in caplog.records if r.name == "relay.access"]
    assert any("key=team-b" in x and "prompt_tokens=3 completion_tokens=7" in x for x in lines)
    assert any("key=team-a" in x and "completion_tokens=6 usage=estimated" in x for x in lines), (
        lines
    )
    assert not any("sk-team" in x for x in lines)


def test_configured_models_are_labels_and_others_are_other(sglang):
    """With --model-map fast=test-model, tokens are labelled fast; unknown names are other."""
    from relay.http.rewrite import ModelMap

    with RelayThread(
        sglang.url, api_keys=KEYS, model_map=ModelMap({"fast": "test-model"})
    ) as relay:
        a = client(relay)
        a.chat.completions.create(**{**CHAT, "model": "fast"}, max_tokens=2)
        a.chat.completions.create(**{**CHAT, "model": "surprise"}, max_tokens=2)
        eventually(lambda: nothing_held(relay))
        tokens = relay.metrics().tokens
    assert tokens["team-a", "fast", "completion"] == 2
    assert tokens["team-a", "other", "completion"] == 2
    assert {labels[1] for labels in tokens} == {"fast", "other"}


def raw_stream(port: int, key: str) -> bytes:
    body = json.dumps(
        {**CHAT, "stream": True, "max_tokens": 40, "stream_options": {"include_usage": True}}
    ).encode()
    with socket.create_connection(("127.0.0.1", port), timeout=LIMIT) as sock:
        sock.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: t\r\nConnection: close\r\n"
            b"x-api-key: %b\r\nContent-Length: %d\r\n\r\n%b" % (key.encode(), len(body), body)
        )
        data = bytearray()
        while chunk := sock.recv(65536):
            data += chunk
    return bytes(data).split(b"\r\n\r\n", 1)[1]


@pytest.mark.parametrize("loop_kind", ["uvloop", "asyncio"])
def test_bytes_are_unchanged_with_keys_limits_and_accounting_on(sglang, loop_kind):
    """A chunked body through relay (keys, limits, queue on) is the upstream's, byte for byte."""
    direct = raw_stream(sglang.port, "unused")
    with RelayThread(
        sglang.url,
        loop_kind=loop_kind,
        api_keys=KEYS,
        key_max_concurrent=4,
        key_rpm=100,
        key_tpm=100000,
        max_inflight=2,
    ) as relay:
        through = raw_stream(relay.port, "sk-team-a")
        eventually(lambda: nothing_held(relay))
        assert relay.metrics().tokens["team-a", "other", "completion"] == 40
    assert through == direct and through.endswith(b"0\r\n\r\n")


def test_nothing_leaks_when_streams_are_cut_either_side(sglang):
    """A client that leaves and an upstream that dies both release every hold."""
    with RelayThread(
        sglang.url, api_keys=KEYS, key_max_concurrent=1, key_tpm=1000, max_inflight=1
    ) as relay:
        gone = open_stream(relay, "sk-team-a", max_tokens=200, test_gap_ms=10)
        seen = gone.recv(200)
        assert seen.startswith(b"HTTP/1.1 200")
        # Leave after the first event: a stream cut before any event has no
        # usage to estimate (counted "none"), which is not what this test is about.
        while b"data:" not in seen:
            more = gone.recv(4096)
            assert more, seen
            seen += more
        gone.close()
        assert sglang.sglang.disconnected.wait(LIMIT)
        eventually(lambda: nothing_held(relay))
        with pytest.raises(openai.APIError):
            for _ in client(relay).chat.completions.create(
                **CHAT, max_tokens=20, stream=True, extra_body={"test_die_after": 3}
            ):
                pass
        eventually(lambda: nothing_held(relay))
        assert relay.metrics().usage["team-a", "estimated"] == 2
        client(relay).chat.completions.create(**CHAT, max_tokens=1)


def test_a_final_usage_event_far_bigger_than_64_kib_is_charged_to_the_token_budget(loop_kind):
    """SGLang's /generate repeats the whole text in every event, so a long generation
    ends with an event of hundreds of KiB: its usage is read and debited (--key-tpm
    1000, 20 200 tokens), and the next request waits for the budget (429)."""
    from harness import CHUNKED_HEAD, read_request, request_bytes, run, setup

    from relay.http.framing import LAST_CHUNK, encode_chunk

    meta = {"prompt_tokens": 200, "completion_tokens": 20000}
    events = [f"data: {json.dumps({'text': 'x' * n, 'meta_info': meta})}\n\n" for n in (1, 2)]
    final = {"text": "word " * 80_000, "meta_info": meta}  # ~400 KiB
    events += [f"data: {json.dumps(final)}\n\n", "data: [DONE]\n\n"]
    body = b"".join(encode_chunk(e.encode()) for e in events) + LAST_CHUNK

    async def upstream(reader, writer, up):
        while True:
            await read_request(reader, up)
            writer.write(CHUNKED_HEAD + body)
            await writer.drain()

    async def exchange(relay) -> bytes:
        reader, writer = await asyncio.open_connection("127.0.0.1", relay.port)
        writer.write(request_bytes("/generate", extra=b"Connection: close\r\n"))
        data = await asyncio.wait_for(reader.read(), LIMIT)  # to EOF (Connection: close)
        writer.close()
        return data

    async def main():
        async with setup(upstream, key_tpm=1000) as (_, relay):
            first = await exchange(relay)
            assert first.startswith(b"HTTP/1.1 200") and first.endswith(LAST_CHUNK)
            metrics = relay.state.metrics
            assert metrics.tokens["anonymous", "other", "completion"] == 20000
            assert metrics.usage["anonymous", "reported"] == 1
            assert (await exchange(relay)).startswith(b"HTTP/1.1 429")

    run(loop_kind, main)


class Lockstep:
    """An upstream whose every write reaches relay's client before the next is made,
    so that each is a read of its own in relay (the client's bytes are the signal)."""

    def __init__(self) -> None:
        self.forwarded = 0  # body bytes the client has received
        self.moved = asyncio.Event()

    async def write(self, writer: asyncio.StreamWriter, pieces: list[bytes]) -> None:
        from harness import WAIT

        sent = 0
        for piece in pieces:
            writer.write(piece)
            sent += len(piece)
            async with asyncio.timeout(WAIT):
                while self.forwarded < sent:
                    self.moved.clear()
                    await self.moved.wait()

    async def read(self, reader: asyncio.StreamReader, pieces: list[bytes]) -> None:
        """Read the body relay forwards until ``pieces`` have come (after what came before)."""
        from harness import WAIT

        total = self.forwarded + sum(map(len, pieces))
        async with asyncio.timeout(WAIT):
            while self.forwarded < total:
                piece = await reader.read(65536)
                assert piece, "relay closed the stream early"
                self.forwarded += len(piece)
                self.moved.set()


def test_a_final_usage_event_that_came_in_hundreds_of_reads_is_read_exactly(loop_kind):
    """A 200 KiB final event that reaches relay 1 KiB per read (200 reads, far more than
    a stream keeps of whole events) is kept from its start and read exactly."""
    from harness import CHUNKED_HEAD, connect, read_head, read_request, request_bytes, run, setup

    from relay.http.framing import LAST_CHUNK, encode_chunk

    meta = {"prompt_tokens": 300, "completion_tokens": 4000}
    final = encode_chunk(
        f"data: {json.dumps({'text': 'word ' * 40_000, 'meta_info': meta})}\n\n".encode()
    )
    pieces = [encode_chunk(f"data: {json.dumps({'text': 'x'})}\n\n".encode())]
    pieces += [final[i : i + 1024] for i in range(0, len(final), 1024)]
    pieces += [encode_chunk(b"data: [DONE]\n\n"), LAST_CHUNK]
    step = Lockstep()

    async def upstream(reader, writer, up):
        await read_request(reader, up)
        writer.write(CHUNKED_HEAD)
        await step.write(writer, pieces)

    async def main():
        async with setup(upstream, max_usage_bytes=1024 * 1024) as (_, relay):
            reader, writer = await connect(relay)
            writer.write(request_bytes("/generate"))
            await read_head(reader)
            await step.read(reader, pieces)
            writer.close()
            metrics = relay.state.metrics
            await until_true(lambda: sum(metrics.usage.values()) == 1)  # settled
            assert metrics.usage["anonymous", "reported"] == 1
            assert metrics.tokens["anonymous", "other", "prompt"] == 300
            assert metrics.tokens["anonymous", "other", "completion"] == 4000

    run(loop_kind, main)


def test_a_held_stream_of_whole_events_keeps_only_its_last_few_reads(loop_kind):
    """400 token events, each a read of its own: mid-stream, the exchange holds
    references to at most TAIL_READS of them; its usage is still read at the end."""
    from harness import CHUNKED_HEAD, connect, read_head, read_request, request_bytes, run, setup

    from relay.http.framing import LAST_CHUNK, encode_chunk
    from relay.http.usage import TAIL_READS

    token = {"choices": [{"index": 0, "delta": {"content": " tok"}}]}
    usage = {"choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": 400}}
    tokens = [encode_chunk(f"data: {json.dumps(token)}\n\n".encode()) for _ in range(400)]
    end = [encode_chunk(f"data: {json.dumps(usage)}\n\n".encode()), LAST_CHUNK]
    step = Lockstep()
    looked = asyncio.Event()

    async def upstream(reader, writer, up):
        await read_request(reader, up)
        writer.write(CHUNKED_HEAD)
        await step.write(writer, tokens)
        await asyncio.wait_for(looked.wait(), LIMIT)
        writer.write(b"".join(end))

    async def main():
        async with setup(upstream) as (_, relay):
            reader, writer = await connect(relay)
            writer.write(request_bytes())
            await read_head(reader)
            await step.read(reader, tokens)
            (client,) = relay.state.connections
            kept = client.exchange.ticket._reads
            assert kept.maxlen == TAIL_READS and len(kept) == TAIL_READS
            assert all(isinstance(read, bytes) for read in kept)  # whole reads, no event open
            looked.set()
            await step.read(reader, end)
            writer.close()
            metrics = relay.state.metrics
            await until_true(lambda: sum(metrics.usage.values()) == 1)  # settled
            assert metrics.usage["anonymous", "reported"] == 1
            assert metrics.tokens["anonymous", "other", "completion"] == 400

    run(loop_kind, main)


async def until_true(condition: Callable[[], bool]) -> None:
    from harness import until

    await until(condition)
