"""Limits shared through a real redis-server (--limits-store): across relays in one
process (both event loops), across relay processes and workers, through a relay killed
with SIGKILL, through a store killed and restarted, and at start with a bad store."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from redisfixture import Link, RedisServer, need_redis_server
from relayfixture import RelayThread, eventually
from relayprocess import RelayProcess as Relay
from sglang_app import SGLangServer

from relay.config import StoreAddress

pytestmark = pytest.mark.timeout(120)

LIMIT = 20.0
CHAT: dict[str, Any] = {"model": "test-model", "messages": [{"role": "user", "content": "hi"}]}
KEY = "sk-team"


@pytest.fixture(scope="module")
def sglang() -> Iterator[SGLangServer]:
    server = SGLangServer().start()
    yield server
    server.stop()


def store_of(redis: RedisServer) -> StoreAddress:
    return StoreAddress("127.0.0.1", redis.port)


def open_stream(port: int, key: str = KEY, **body: Any) -> socket.socket:
    """A raw client that sent a streaming request (its answer is read by the caller)."""
    payload = json.dumps({**CHAT, "stream": True, **body}).encode()
    sock = socket.create_connection(("127.0.0.1", port), timeout=LIMIT)
    sock.sendall(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: t\r\nConnection: close\r\n"
        b"Authorization: Bearer %b\r\n"
        b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%b"
        % (key.encode(), len(payload), payload)
    )
    return sock


def status_of(sock: socket.socket) -> int:
    head = b""
    while b"\r\n" not in head:
        data = sock.recv(4096)
        assert data, "closed before a status line"
        head += data
    return int(head.split(b" ", 2)[1])


def read_all(sock: socket.socket) -> bytes:
    chunks = []
    while data := sock.recv(65536):
        chunks.append(data)
    return b"".join(chunks)


def post(port: int, key: str = KEY, **body: Any) -> httpx.Response:
    return httpx.post(
        f"http://127.0.0.1:{port}/v1/chat/completions",
        json={**CHAT, **body},
        headers={"authorization": f"Bearer {key}"},
        timeout=LIMIT,
    )


# -- in one process: two relays, one store, both loops --------------------------------


def test_two_relays_share_a_concurrency_slot_under_both_loops(sglang, redis_server, loop_kind):
    """concurrent=1 per client address: a stream through one relay makes the other
    answer 429, and the slot is back for it once the stream ends (redis.asyncio runs
    on uvloop as on asyncio)."""
    store = store_of(redis_server)
    common: dict[str, Any] = {"loop_kind": loop_kind, "limits_store": store}
    with (
        RelayThread(sglang.url, key_max_concurrent=1, **common) as one,
        RelayThread(sglang.url, key_max_concurrent=1, **common) as two,
    ):
        busy = open_stream(one.port, max_tokens=30, test_gap_ms=20)
        assert status_of(busy) == 200
        refused = post(two.port, max_tokens=1)
        assert refused.status_code == 429, refused.text
        assert refused.headers["retry-after"] == "1"
        assert refused.json()["error"]["code"] == "rate_limit_exceeded"
        assert b"[DONE]" in read_all(busy)
        busy.close()
        eventually(lambda: post(two.port, max_tokens=1).status_code == 200, LIMIT)
        assert two.metrics().key_requests["anonymous", "concurrent"] >= 1
        assert one.metrics().limits_store_errors == 0


def test_max_inflight_is_shared_and_a_waiter_gets_the_slot_when_it_frees(
    sglang, redis_server, loop_kind
):
    """--max-inflight 1 on both relays: a request through the second waits while the
    first relay's stream holds the upstream's one slot, then goes through."""
    common: dict[str, Any] = {
        "loop_kind": loop_kind,
        "limits_store": store_of(redis_server),
        "max_inflight": 1,
    }
    with RelayThread(sglang.url, **common) as one, RelayThread(sglang.url, **common) as two:
        busy = open_stream(one.port, max_tokens=25, test_gap_ms=20)
        assert status_of(busy) == 200
        started = time.monotonic()
        seen_before = len(sglang.sglang.requests)
        waiter = post(two.port, max_tokens=1)
        waited = time.monotonic() - started
        assert waiter.status_code == 200, waiter.text
        assert b"[DONE]" in read_all(busy)
        busy.close()
        # It reached the upstream only after the stream (~0.5 s) had freed the slot.
        assert waited > 0.3, waited
        assert len(sglang.sglang.requests) == seen_before + 1


def test_a_shared_slot_not_freed_within_the_queue_timeout_is_a_503(sglang, redis_server):
    """--max-inflight 1 shared, --queue-timeout 0.5 s: while the first relay's stream
    holds the upstream's slot, a request through the second gets 503 queue_timeout."""
    common: dict[str, Any] = {
        "limits_store": store_of(redis_server),
        "max_inflight": 1,
        "queue_timeout": 0.5,
    }
    with RelayThread(sglang.url, **common) as one, RelayThread(sglang.url, **common) as two:
        busy = open_stream(one.port, max_tokens=100, test_gap_ms=30)
        assert status_of(busy) == 200
        started = time.monotonic()
        answer = post(two.port, max_tokens=1)
        assert answer.status_code == 503, answer.text
        assert answer.json()["error"]["code"] == "queue_timeout"
        assert answer.headers["retry-after"] == "1"
        assert 0.5 <= time.monotonic() - started < 5
        assert two.metrics().key_requests["anonymous", "queue_timeout"] == 1
        busy.close()


def test_a_request_that_moves_to_another_upstream_gives_the_first_slot_back(
    sglang, redis_server, tmp_path
):
    """--max-inflight 1 on two upstreams, the first refusing connections: the request
    takes the first's shared slot, fails over to the second, and leaves no slot held
    on either once it is done."""
    from relay.config import parse_upstream

    dead = parse_upstream(f"127.0.0.1:{RedisServer(tmp_path).port}")  # nothing listens
    common: dict[str, Any] = {
        "limits_store": store_of(redis_server),
        "max_inflight": 1,
        "balance": "round-robin",
    }
    with RelayThread(f"127.0.0.1:{dead.port}", more_upstreams=(parse_upstream(sglang.url),),
                     **common) as relay:  # fmt: skip
        for _ in range(2):  # round-robin: one of them starts on the dead upstream
            assert post(relay.port, max_tokens=1).status_code == 200
        assert relay.metrics().upstream_connect_errors >= 1
        up = f"relay:{{relay}}:up:{dead}:leases"
        held = f"relay:{{relay}}:up:{parse_upstream(sglang.url)}:leases"

        def nothing_held() -> bool:
            return all(redis_server.command("ZCARD", key) == b":0\r\n" for key in (up, held))

        eventually(nothing_held, LIMIT)


def test_tokens_spent_through_one_relay_count_at_the_other(sglang, redis_server, loop_kind):
    """tpm=20 shared: two requests of 3 + 8 tokens through one relay spend 22, so the
    next one through the other relay gets 429 (the debit lands just after each ends)."""
    from relay.http.auth import NamedKey

    common: dict[str, Any] = {
        "loop_kind": loop_kind,
        "limits_store": store_of(redis_server),
        "api_keys": (NamedKey("team", KEY),),
        "key_tpm": 20,
    }
    with RelayThread(sglang.url, **common) as one, RelayThread(sglang.url, **common) as two:
        assert post(one.port, max_tokens=8).status_code == 200
        assert post(one.port, max_tokens=8).status_code == 200
        assert one.server is not None
        store = one.server.state.admission.store
        assert store is not None
        eventually(lambda: one.call(lambda: store.quiet() and not store.live), LIMIT)
        answer = post(two.port, max_tokens=8)  # its first: its own limit would let it in
        assert answer.status_code == 429
        assert "tokens per minute" in answer.json()["error"]["message"]


def test_a_request_the_store_refuses_costs_nothing_of_the_local_rpm_budget(sglang, redis_server):
    """concurrent=1, rpm=3 per key: while one relay's stream holds the key's slot, three
    requests through the other are refused by the store (which takes nothing for them);
    once the stream ends, the other relay still has its three requests a minute."""
    from relay.http.auth import NamedKey

    common: dict[str, Any] = {
        "limits_store": store_of(redis_server),
        "api_keys": (NamedKey("team", KEY),),
        "key_max_concurrent": 1,
        "key_rpm": 3,
    }
    with RelayThread(sglang.url, **common) as one, RelayThread(sglang.url, **common) as two:
        busy = open_stream(one.port, max_tokens=30, test_gap_ms=20)
        assert status_of(busy) == 200
        for _ in range(3):
            refused = post(two.port, max_tokens=1)
            assert refused.status_code == 429, refused.text
            assert "in flight" in refused.json()["error"]["message"]
        assert b"[DONE]" in read_all(busy)
        busy.close()
        leases = "relay:{relay}:key:team:leases"
        eventually(lambda: redis_server.command("ZCARD", leases) == b":0\r\n", LIMIT)
        # The store's bucket has 2 left (one taken by the stream): two more pass there;
        # locally they pass only if the refusals took nothing.
        answers = [post(two.port, max_tokens=1) for _ in range(2)]
        assert [a.status_code for a in answers] == [200, 200], answers[-1].text


def test_closed_answers_503_while_the_store_is_away_and_open_uses_own_limits(
    sglang, tmp_path, loop_kind
):
    """A store that is not there: closed gives 503 + Retry-After + JSON error at once,
    open admits on the process's own limits; both count the errors."""
    need_redis_server()
    dead = StoreAddress("127.0.0.1", RedisServer(tmp_path).port)  # nothing listens
    common: dict[str, Any] = {"loop_kind": loop_kind, "limits_store": dead, "key_rpm": 100}
    with RelayThread(sglang.url, limits_store_failure="closed", **common) as closed:
        answer = post(closed.port, max_tokens=1)
        assert answer.status_code == 503
        assert answer.headers["retry-after"] == "1"
        assert answer.json()["error"]["type"] == "server_error"
        assert "limits store" in answer.json()["error"]["message"]
        assert closed.metrics().limits_store_errors >= 1
        assert closed.server is not None
        state = closed.server.state
        text = closed.call(lambda: state.metrics.render(gauges=state.gauges))
        assert re.search(r"^relay_limits_store_errors_total [1-9]", text, re.M), text
        assert "\nrelay_limits_store_up 0" in text
        # The refusal is the request's one result by key, not `admitted`.
        assert re.search(
            r'^relay_key_requests_total\{[^}]*result="store_unavailable"\} 1', text, re.M
        )
        assert 'result="admitted"' not in text, text
    with RelayThread(sglang.url, **common) as opened:
        assert post(opened.port, max_tokens=1).status_code == 200
        assert opened.metrics().limits_store_errors >= 1


# -- several processes -------------------------------------------------------------------


@pytest.fixture
def relays(sglang, redis_server, tmp_path) -> Iterator[Any]:
    """A factory of relay processes sharing ``redis_server``; all stopped at the end."""
    started: list[Relay] = []
    keys = tmp_path / "keys"

    def start(limits: str, *extra: str, env: dict[str, str] | None = None) -> Relay:
        keys.write_text(f"team {KEY} {limits}\n")
        relay = Relay(
            "--upstream",
            f"127.0.0.1:{sglang.port}",
            "--api-key-file",
            str(keys),
            "--limits-store",
            redis_server.url,
            *extra,
            env=env,
        )
        started.append(relay)
        return relay

    yield start
    for relay in started:
        relay.stop()


def test_concurrent_2_gives_exactly_two_streams_across_two_relays_and_workers(relays):
    """A key with concurrent=2: of eight streams started at once through a relay and a
    relay with two workers, exactly two get 200; the other six get 429."""
    one = relays("concurrent=2")
    two = relays("concurrent=2", "--workers", "2")
    socks = [open_stream((one, two)[i % 2].port, max_tokens=60, test_gap_ms=50) for i in range(8)]
    statuses = sorted(status_of(sock) for sock in socks)
    assert statuses == [200, 200] + [429] * 6, statuses
    for sock in socks:
        sock.close()


def test_rpm_10_admits_exactly_ten_across_two_relays(relays):
    """rpm=10 shared: thirty quick requests through both relays, ten get 200."""
    one = relays("rpm=10")
    two = relays("rpm=10", "--workers", "2")
    results: list[int] = []

    def go(port: int) -> None:
        for _ in range(5):
            results.append(post(port, max_tokens=1).status_code)

    threads = [threading.Thread(target=go, args=((one, two)[i % 2].port,)) for i in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(LIMIT)
    assert len(results) == 30
    assert results.count(200) == 10, results
    assert results.count(429) == 20


def test_the_slots_of_a_killed_relay_come_back_within_the_lease(relays):
    """A relay holding both slots of concurrent=2 keeps them past the lease time (it
    renews them); SIGKILLed, the other relay answers 429 until the leases (2 s) run out,
    then admits again, within the lease time."""
    lease = 2.0
    one = relays("concurrent=2", "--limits-store-lease", "2s")
    two = relays("concurrent=2", "--limits-store-lease", "2s")
    held = [open_stream(one.port, max_tokens=400, test_gap_ms=50) for _ in range(2)]
    assert [status_of(sock) for sock in held] == [200, 200]
    # While it lives, relay one renews its leases: past a lease time they still count.
    time.sleep(lease * 1.5)
    assert post(two.port, max_tokens=1).status_code == 429
    one.kill()
    killed = time.monotonic()
    assert post(two.port, max_tokens=1).status_code == 429
    while (answer := post(two.port, max_tokens=1)).status_code == 429:
        assert time.monotonic() - killed < lease + 2.0, "slots did not come back"
        time.sleep(0.1)
    assert answer.status_code == 200
    # Renewed leases were at most one lease old when the relay died.
    assert time.monotonic() - killed <= lease + 1.0
    for sock in held:
        sock.close()


@pytest.mark.parametrize("failure", ["open", "closed"])
def test_a_restarted_store_costs_no_stream_and_limits_are_exact_after(
    relays, redis_server, failure
):
    """Kill redis-server under a flowing stream: the stream completes; meanwhile closed
    answers 503 and open admits on the process's own limits; one line each way; after
    the empty store is back, concurrent=2 counts the streams still running again."""
    extra = ("--limits-store-lease", "2s", "--limits-store-failure", failure)
    one = relays("concurrent=2", *extra)
    two = relays("concurrent=2", *extra)
    flowing = open_stream(one.port, max_tokens=120, test_gap_ms=50)  # about 6 s
    assert status_of(flowing) == 200
    redis_server.kill()
    during = open_stream(one.port, max_tokens=120, test_gap_ms=50)
    if failure == "closed":
        refused = read_all(during)
        assert refused.startswith(b"HTTP/1.1 503 "), refused
        assert b"\r\nretry-after: 1\r\n" in refused.lower()
        assert b'"code":"unavailable"' in refused.replace(b" ", b"")
        during.close()
    else:
        assert status_of(during) == 200  # this process's own limit (2) let it in
    one.wait_line(r"limits store .* unreachable")
    redis_server.start()
    one.wait_line(r"limits store .* reachable again")
    # The store is empty; relay one adds back the streams it still runs.
    running = 1 if failure == "closed" else 2
    answers = []
    for _ in range(3 - running):
        sock = open_stream(two.port, max_tokens=120, test_gap_ms=50)
        answers.append((sock, status_of(sock)))
    assert [status for _, status in answers] == [200] * (2 - running) + [429]
    assert b"data: [DONE]" in read_all(flowing)  # never touched by the store's fault
    if failure == "open":
        assert b"data: [DONE]" in read_all(during)
    assert one.count(r"limits store .* unreachable") == 1
    assert one.count(r"limits store .* reachable again") == 1
    for sock, _ in answers:
        sock.close()
    flowing.close()


def test_a_store_that_hangs_costs_one_timeout_and_its_streams_count_after(relays, redis_server):
    """redis-server stopped (SIGSTOP: connections hang, nothing answers): a request
    waits no longer than about the 100 ms timeout and is admitted on the process's
    own limits; once the store answers again, concurrent=2 counts both streams."""
    one = relays("concurrent=2")
    two = relays("concurrent=2")
    first = open_stream(one.port, max_tokens=120, test_gap_ms=50)
    assert status_of(first) == 200
    assert redis_server.process is not None
    redis_server.process.send_signal(signal.SIGSTOP)
    try:
        started = time.monotonic()
        second = open_stream(one.port, max_tokens=120, test_gap_ms=50)
        assert status_of(second) == 200
        assert time.monotonic() - started < 1.0  # one timeout, not a hang
        one.wait_line(r"limits store .* unreachable \(timed out\)")
    finally:
        redis_server.process.send_signal(signal.SIGCONT)
    one.wait_line(r"limits store .* reachable again")
    refused = post(two.port, max_tokens=1)
    assert refused.status_code == 429, refused.text
    for sock in (first, second):
        assert b"data: [DONE]" in read_all(sock)
        sock.close()
    assert one.count(r"limits store .* unreachable") == 1


@pytest.mark.parametrize("ended", ["as the store goes away", "after it was found away"])
def test_a_release_lost_while_the_store_is_unreachable_is_sent_once_it_is_back(
    sglang, redis_server, ended
):
    """concurrent=1 per key, 30 s leases: a stream that ends while the store cannot be
    reached (its link cut; the store keeps its data) cannot give its slot back then;
    once the link is back the release is sent, and the other relay admits the key's
    next request within a few seconds, not after the lease time."""
    from relay.http.auth import NamedKey

    link = Link(redis_server.port)
    keys = (NamedKey("team", KEY), NamedKey("other", "sk-other"))
    common: dict[str, Any] = {"api_keys": keys, "key_max_concurrent": 1,
                              "limits_store_lease": 30.0}  # fmt: skip
    try:
        with (
            RelayThread(
                sglang.url, limits_store=StoreAddress("127.0.0.1", link.port), **common
            ) as one,  # fmt: skip
            RelayThread(sglang.url, limits_store=store_of(redis_server), **common) as two,
        ):
            assert one.server is not None
            store = one.server.state.admission.store
            assert store is not None
            busy = open_stream(one.port, max_tokens=20, test_gap_ms=50)
            assert status_of(busy) == 200
            link.cut()
            if ended != "as the store goes away":
                # Another key's request finds the store away (admitted on local limits).
                assert post(one.port, "sk-other", max_tokens=1).status_code == 200
                assert not one.call(lambda: store.up)
            assert b"[DONE]" in read_all(busy)
            busy.close()
            eventually(lambda: one.call(lambda: not store.up and store.quiet()), LIMIT)
            assert post(two.port, max_tokens=1).status_code == 429  # the slot is held
            link.mend()
            eventually(lambda: one.call(lambda: store.up), LIMIT)
            back = time.monotonic()
            eventually(lambda: post(two.port, max_tokens=1).status_code == 200, LIMIT)
            assert time.monotonic() - back < 5.0
    finally:
        link.close()


def test_a_lease_whose_answer_was_lost_is_given_back_when_the_store_answers(sglang, redis_server):
    """closed, concurrent=1 per key, 30 s leases: redis-server stopped (SIGSTOP) after a
    request's acquire was written, so the request gets 503, yet the store takes the lease
    when it runs again; relay gives it back then, and the other relay admits the key
    within a few seconds, not after the lease time."""
    common: dict[str, Any] = {
        "limits_store": store_of(redis_server),
        "key_max_concurrent": 1,
        "limits_store_lease": 30.0,
    }
    with (
        RelayThread(sglang.url, limits_store_failure="closed", **common) as one,
        RelayThread(sglang.url, **common) as two,
    ):
        assert one.server is not None
        store = one.server.state.admission.store
        assert store is not None and redis_server.process is not None
        assert post(one.port, max_tokens=1).status_code == 200  # its connection is open
        leases = "relay:{relay}:addr:127.0.0.1:leases"
        eventually(lambda: redis_server.command("ZCARD", leases) == b":0\r\n", LIMIT)
        redis_server.process.send_signal(signal.SIGSTOP)
        try:
            assert post(one.port, max_tokens=1).status_code == 503
        finally:
            redis_server.process.send_signal(signal.SIGCONT)
        eventually(lambda: one.call(lambda: store.up), LIMIT)
        back = time.monotonic()
        eventually(lambda: post(two.port, max_tokens=1).status_code == 200, LIMIT)
        assert time.monotonic() - back < 5.0


def test_a_client_that_leaves_while_the_store_is_asked_leaves_no_slot_taken(sglang, redis_server):
    """concurrent=1 per client address, 30 s leases, 3 s store timeout: redis-server
    stopped (SIGSTOP) after a request's acquire was written; its client leaves; once the
    store runs again (and takes the lease), relay gives it back, so the other relay
    admits the next request within a few seconds, not after the lease time."""
    common: dict[str, Any] = {
        "limits_store": store_of(redis_server),
        "key_max_concurrent": 1,
        "limits_store_lease": 30.0,
        "limits_store_timeout": 3.0,
    }
    with RelayThread(sglang.url, **common) as one, RelayThread(sglang.url, **common) as two:
        assert one.server is not None and redis_server.process is not None
        store = one.server.state.admission.store
        assert store is not None
        assert post(one.port, max_tokens=1).status_code == 200  # its connection is open
        leases = "relay:{relay}:addr:127.0.0.1:leases"
        eventually(lambda: redis_server.command("ZCARD", leases) == b":0\r\n", LIMIT)
        redis_server.process.send_signal(signal.SIGSTOP)
        try:
            leaving = open_stream(one.port, max_tokens=1)
            eventually(lambda: one.call(lambda: not store.quiet() or store._pipelines > 0), LIMIT)
            leaving.close()
            eventually(lambda: one.metrics().key_requests["anonymous", "queue_left"] == 1, LIMIT)
        finally:
            redis_server.process.send_signal(signal.SIGCONT)
        back = time.monotonic()
        eventually(lambda: post(two.port, max_tokens=1).status_code == 200, LIMIT)
        assert time.monotonic() - back < 5.0
        assert one.call(lambda: store.up)


def test_a_store_restarted_between_requests_costs_no_fault(relays, redis_server):
    """redis-server killed and started again while nothing asks it: the next request
    reconnects at once and is served by the store (closed answers no 503, no line says
    it was away), and the emptied store's scripts are loaded again."""
    # A long lease: no renewal (every 20 s) can fall into the restart.
    one = relays("concurrent=1", "--limits-store-lease", "60s", "--limits-store-failure", "closed")
    assert post(one.port, max_tokens=1).status_code == 200  # its connections are open now
    leases = "relay:{relay}:key:team:leases"
    eventually(lambda: redis_server.command("ZCARD", leases) == b":0\r\n", LIMIT)  # released
    redis_server.kill()
    redis_server.start()
    held = open_stream(one.port, max_tokens=40, test_gap_ms=50)
    assert status_of(held) == 200, "".join(one.lines)
    refused = post(one.port, max_tokens=1)
    assert refused.status_code == 429, refused.text  # counted by the store, not refused
    assert b"[DONE]" in read_all(held)
    held.close()
    assert one.count(r"limits store .* unreachable") == 0


def test_a_store_found_away_is_pinged_at_once_not_at_the_next_renewal(relays, redis_server):
    """With the default 30 s lease (renewal every 10 s), a store found away is pinged
    every half second: once it is back, relay says so within a few seconds."""
    one = relays("concurrent=5")
    assert post(one.port, max_tokens=1).status_code == 200
    leases = "relay:{relay}:key:team:leases"
    eventually(lambda: redis_server.command("ZCARD", leases) == b":0\r\n", LIMIT)
    redis_server.kill()
    assert post(one.port, max_tokens=1).status_code == 200  # open: its own limits
    one.wait_line(r"limits store .* unreachable")
    redis_server.start()
    back = time.monotonic()
    one.wait_line(r"limits store .* reachable again", limit=4.0)
    assert time.monotonic() - back < 4.0


def test_rediss_shares_limits_over_tls_and_a_certificate_it_cannot_verify_stops_the_start(
    sglang, tmp_path
):
    """rediss:// with the store's CA trusted (SSL_CERT_FILE): limits are shared over TLS;
    without it, the start stops with one line saying the certificate failed."""
    need_redis_server()
    import trustme

    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    folder = tmp_path / "tls"
    folder.mkdir()
    ca.cert_pem.write_to_path(str(folder / "ca.pem"))
    cert.private_key_pem.write_to_path(str(folder / "key.pem"))
    cert.cert_chain_pems[0].write_to_path(str(folder / "cert.pem"))
    server = RedisServer(tmp_path, tls=folder).start()
    keys = tmp_path / "keys"
    keys.write_text(f"team {KEY} concurrent=1\n")
    trusted = {"SSL_CERT_FILE": str(folder / "ca.pem")}
    args = ["--upstream", f"127.0.0.1:{sglang.port}", "--api-key-file", str(keys)]
    started = []
    try:
        for _ in range(2):
            started.append(Relay(*args, "--limits-store", server.url, env=trusted))
        one, two = started
        busy = open_stream(one.port, max_tokens=40, test_gap_ms=50)
        assert status_of(busy) == 200
        assert post(two.port, max_tokens=1).status_code == 429
        busy.close()
        line = start_fails("--limits-store", server.url)
        assert "argument --limits-store" in line and "certificate" in line.lower(), line
    finally:
        for relay in started:
            relay.stop()
        server.kill()


# -- start-up ----------------------------------------------------------------------------


def start_fails(*args: str, env: dict[str, str] | None = None) -> str:
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "relay",
            "--listen",
            "127.0.0.1:0",
            "--upstream",
            "127.0.0.1:9",
            *list(args),
        ],
        capture_output=True,
        text=True,
        timeout=LIMIT,
        env={**os.environ, **(env or {})},
    )
    assert done.returncode == 2, done
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    return lines[0]


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("http://127.0.0.1:6379", "expected redis://"),
        ("redis://user:secret@127.0.0.1:6379/0", "must not hold a password"),
        ("redis://127.0.0.1:6379/x", "database must be a number"),
    ],
)
def test_a_bad_store_url_is_one_line_at_start(url, says):
    """A URL relay cannot use is refused before anything starts, naming the flag."""
    line = start_fails("--limits-store", url)
    assert line.startswith("relay: error: argument --limits-store: ") and says in line, line


def test_a_wrong_password_is_one_line_at_start(tmp_path):
    """A store that refuses the password: one line naming where the password came from."""
    need_redis_server()
    server = RedisServer(tmp_path, password="right").start()
    try:
        secret = tmp_path / "password"
        secret.write_text("wrong\n")
        line = start_fails(
            "--limits-store", server.url, "--limits-store-password-file", str(secret)
        )
        assert "--limits-store-password-file" in line and "refused the login" in line, line
        assert "wrong" not in line.replace("--", "")
        line = start_fails(
            "--limits-store", server.url, env={"RELAY_LIMITS_STORE_PASSWORD": "wrong"}
        )
        assert "refused the login" in line and "RELAY_LIMITS_STORE_PASSWORD" in line, line
        line = start_fails("--limits-store", server.url)
        assert "needs a password" in line, line
    finally:
        server.kill()


def test_a_port_that_is_not_redis_is_one_line_at_start(sglang):
    """A server that answers something else, and an HTTP server that waits for the rest
    of a request: one line each, saying it may not be Redis."""
    with socket.create_server(("127.0.0.1", 0)) as listener:

        def answer_like_a_web_server() -> None:
            conn, _ = listener.accept()
            with conn:
                conn.recv(4096)
                conn.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")

        threading.Thread(target=answer_like_a_web_server, daemon=True).start()
        port = listener.getsockname()[1]
        line = start_fails("--limits-store", f"redis://127.0.0.1:{port}/0")
    assert "argument --limits-store" in line and "not a Redis server" in line, line
    line = start_fails("--limits-store", f"redis://127.0.0.1:{sglang.port}/0")
    assert "argument --limits-store" in line and "is it a Redis server" in line, line


def test_workers_without_a_store_say_that_limits_are_per_worker(sglang, tmp_path):
    """--workers 2 with a limit and no store: one start-up line says limits are per worker."""
    relay = Relay("--upstream", f"127.0.0.1:{sglang.port}", "--key-rpm", "5", "--workers", "2")
    try:
        assert "per worker" in relay.wait_line(r"limits are per worker")
        assert relay.count(r"limits are per worker") == 1
    finally:
        relay.stop()


# -- the store's own link, driven directly -----------------------------------------------


class _Gate:
    """An upstream's --max-inflight gate as a lease sees it."""

    def __init__(self, address: str, limit: int, timeout: float) -> None:
        self.address = address
        self.limit = limit
        self.timeout = timeout


def _store(redis: RedisServer, port: int | None = None, **settings: Any) -> Any:
    """A limit store link to ``redis`` (or to a forwarder to it on ``port``)."""
    from relay.config import Config, parse_listen, parse_upstream
    from relay.core.limitstore import LimitStore
    from relay.core.metrics import Metrics

    config = Config(
        listen=parse_listen("127.0.0.1:0"),
        upstream=parse_upstream("127.0.0.1:9"),
        limits_store=StoreAddress("127.0.0.1", port or redis.port),
        **settings,
    )
    return LimitStore(config, Metrics())


def _members(redis: RedisServer, key: str) -> bytes:
    return redis.command("ZRANGE", key, "0", "-1")


def _run(loop_kind: str, main: Any) -> Any:
    from relay.core.server import loop_factory

    with asyncio.Runner(loop_factory=loop_factory(loop_kind)) as runner:
        return runner.run(main)


KEY_SET = "relay:{relay}:key:team:leases"
UP_SET = "relay:{relay}:up:up:leases"


async def _acquire_carrying_a_release(
    store: Any, gate: Any, limits: Any, stream: Any, tokens: int
) -> asyncio.Task[Any]:
    """``stream``'s release of ``tokens`` parked, then a new request of the same key
    whose acquire carries it out to the stopped store: that request's task."""
    stream.release(tokens)  # parked, to ride with the next acquire
    lease = store.lease("team", "key:team", limits)
    request = asyncio.create_task(lease.enter(gate))
    for _ in range(100):
        if store._pipelines:  # written to the stopped store
            break
        await asyncio.sleep(0.01)
    assert store._pipelines == 1 and not store._parked
    return request


def test_close_sends_the_releases_of_exchanges_cut_just_before_and_starts_nothing_after(
    redis_server, loop_kind
):
    """A stream's release parked, and a request's acquire carrying it out to a stopped
    store (SIGSTOP) when the relay closes and cuts that request: close waits (within the
    store timeout) for the release and the cut request's give-back, which reach the
    store once it runs again, and leaves no task, timer or lease behind."""
    from relay.http.limits import KeyLimits

    assert redis_server.process is not None
    limits = KeyLimits(5, 0, 0)
    gate = _Gate("up", 10, 5.0)

    async def main() -> None:
        store = _store(redis_server, limits_store_timeout=3.0, limits_store_lease=30.0)
        store.start()
        stream = store.lease("team", "key:team", limits)
        assert await stream.enter(gate) is None
        assert store.live
        redis_server.process.send_signal(signal.SIGSTOP)
        try:
            request = await _acquire_carrying_a_release(store, gate, limits, stream, 0)
            request.cancel()  # the relay closes: its exchanges are cut first
            loop = asyncio.get_running_loop()
            loop.call_later(0.3, redis_server.process.send_signal, signal.SIGCONT)
            started = time.monotonic()
            await store.close()
            assert time.monotonic() - started < 3.0 + 1.0
        finally:
            redis_server.process.send_signal(signal.SIGCONT)
        assert request.cancelled()
        assert store.quiet() and store._park_handle is None
        await asyncio.sleep(0.1)  # nothing starts after close
        others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        assert others == [] and store._runner is None and store._park_handle is None

    _run(loop_kind, main())
    assert _members(redis_server, KEY_SET) == b"*0\r\n"
    assert _members(redis_server, UP_SET) == b"*0\r\n"


def test_a_release_sent_again_after_its_pipeline_was_cut_debits_its_tokens_once(
    redis_server, loop_kind
):
    """tpm=6000: a stream's release of 1000 tokens rides in a request's acquire to a
    stopped store (SIGSTOP); the request's client leaves, so the release is sent again
    in the next pipeline. Once the store runs, it has run twice: the leases are back
    and the key's bucket is debited 1000 tokens, not 2000."""
    from relay.http.limits import KeyLimits

    assert redis_server.process is not None
    limits = KeyLimits(5, 0, 6000)
    gate = _Gate("up", 10, 5.0)

    async def main() -> None:
        store = _store(redis_server, limits_store_timeout=3.0, limits_store_lease=30.0)
        store.start()
        stream = store.lease("team", "key:team", limits)
        assert await stream.enter(gate) is None
        redis_server.process.send_signal(signal.SIGSTOP)
        try:
            request = await _acquire_carrying_a_release(store, gate, limits, stream, 1000)
            request.cancel()  # its client left
            for _ in range(100):
                if store._pipelines:  # the release again, and the give-back
                    break
                await asyncio.sleep(0.01)
            assert store._pipelines == 1
        finally:
            redis_server.process.send_signal(signal.SIGCONT)
        for _ in range(300):
            if store.quiet() and not store._pipelines:
                break
            await asyncio.sleep(0.01)
        assert store.quiet() and store.up
        await store.close()

    _run(loop_kind, main())
    assert _members(redis_server, KEY_SET) == b"*0\r\n"
    assert _members(redis_server, UP_SET) == b"*0\r\n"
    level = float(redis_server.command("HGET", "relay:{relay}:key:team:bucket", "t").split()[1])
    assert 4500 < level <= 6000, level


def test_a_waiter_asking_in_the_same_pipeline_as_a_release_of_its_slot_gets_it_at_once(
    redis_server, loop_kind
):
    """--max-inflight 1 shared: a request of this process waits for the upstream's one
    slot, held by a stream of the same process. Its next ask is queued behind a
    pipeline held up by a stopped store (SIGSTOP), and the stream's release is queued
    after it; once the store runs, the release goes first in their pipeline and the
    waiter is admitted at once, not after its back-off (up to 400 ms)."""
    assert redis_server.process is not None
    gate = _Gate("up", 1, 10.0)

    async def main() -> float:
        store = _store(redis_server, limits_store_timeout=3.0, limits_store_lease=30.0)
        store.start()
        stream = store.lease("anonymous", None, None)
        assert await stream.enter(gate) is None
        waiter = store.lease("anonymous", None, None)
        waiting = asyncio.create_task(waiter.enter(gate))
        await asyncio.sleep(0.5)  # its back-off has grown past 200 ms
        assert not waiting.done()
        redis_server.process.send_signal(signal.SIGSTOP)
        try:
            elsewhere = store.lease("anonymous", None, None)
            held_up = asyncio.create_task(elsewhere.enter(_Gate("other", 5, 10.0)))
            for _ in range(100):
                if store._queue:  # the waiter's next ask, behind the held-up one
                    break
                await asyncio.sleep(0.01)
            assert len(store._queue) == 1 and store._pipelines == 1
            stream.release(0)  # a waiter waits for its slot: queued, not parked
            assert len(store._releases) == 1 and not store._parked
        finally:
            redis_server.process.send_signal(signal.SIGCONT)
        resumed = time.monotonic()
        assert await asyncio.wait_for(waiting, 5.0) is None
        waited = time.monotonic() - resumed
        assert await held_up is None
        waiter.release(0)
        elsewhere.release(0)
        await store.close()
        return waited

    waited = _run(loop_kind, main())
    assert waited < 0.15, waited
    assert _members(redis_server, UP_SET) == b"*0\r\n"


def test_acquires_go_ahead_of_a_backlog_of_releases_sent_when_the_store_is_back(
    redis_server, loop_kind
):
    """3000 leases given back while the store's link is cut (it keeps its data): once
    it is back, their releases are sent (12 pipelines), and requests made meanwhile
    go ahead of them, within the store timeout: the store is not found away again
    for a backlog of relay's own, and its sets end holding exactly the live leases."""
    from relay.http.limits import KeyLimits

    link = Link(redis_server.port)
    limits = KeyLimits(10_000, 0, 0)
    gate = _Gate("up", 10_000, 10.0)

    async def main() -> None:
        store = _store(redis_server, link.port, limits_store_timeout=0.25, limits_store_lease=30.0)
        store.start()
        leases = []
        for _ in range(10):
            batch = [store.lease("team", "key:team", limits) for _ in range(300)]
            assert await asyncio.gather(*(lease.enter(gate) for lease in batch)) == [None] * 300
            leases += batch
        link.cut()
        cut = store.lease("team", "key:team", limits)
        assert await cut.enter(gate) is None  # finds the store away: its own limits
        assert not store.up
        for lease in [*leases, cut]:
            lease.release(0)
        assert len(store._unsent) == 3001
        errors = store.metrics.limits_store_errors
        link.mend()
        for _ in range(500):
            if store.up:
                break
            await asyncio.sleep(0.01)
        assert store.up
        started = time.monotonic()
        meanwhile = [store.lease("team", "key:team", limits) for _ in range(50)]
        assert await asyncio.gather(*(lease.enter(gate) for lease in meanwhile)) == [None] * 50
        assert time.monotonic() - started < 0.5
        for _ in range(500):
            if store.quiet() and not store._pipelines:
                break
            await asyncio.sleep(0.01)
        assert store.up and store.metrics.limits_store_errors == errors
        assert all(lease.confirmed for lease in meanwhile) and len(store.live) == 50
        await store.close()

    try:
        _run(loop_kind, main())
    finally:
        link.close()
    assert redis_server.command("ZCARD", KEY_SET) == b":50\r\n"


def test_an_acquire_given_back_after_its_client_left_wakes_a_waiter_for_that_upstream(
    redis_server, loop_kind
):
    """A request of this process waits for a slot of an upstream; another request's
    acquire for it goes out to a stopped store (SIGSTOP) and its client leaves. Once
    the store runs, the acquire's give-back goes without lingering and wakes the
    waiter (which asks again) at once, not after its back-off."""
    assert redis_server.process is not None
    gate = _Gate("up", 1, 10.0)

    async def main() -> float:
        store = _store(redis_server, limits_store_timeout=3.0, limits_store_lease=30.0)
        store.start()
        waiter = asyncio.create_task(store.wait_for_slot("up", 5.0))
        await asyncio.sleep(0)
        redis_server.process.send_signal(signal.SIGSTOP)
        try:
            left = store.lease("anonymous", None, None)
            request = asyncio.create_task(left.enter(gate))
            for _ in range(100):
                if store._pipelines:  # written to the stopped store
                    break
                await asyncio.sleep(0.01)
            assert store._pipelines == 1
            request.cancel()  # its client left
            await asyncio.wait([request])
            assert not store._parked  # a waiter waits for that upstream: no lingering
        finally:
            redis_server.process.send_signal(signal.SIGCONT)
        resumed = time.monotonic()
        await asyncio.wait_for(waiter, 6.0)
        woken = time.monotonic() - resumed
        for _ in range(300):
            if store.quiet() and not store._pipelines:
                break
            await asyncio.sleep(0.01)
        await store.close()
        return woken

    woken = _run(loop_kind, main())
    assert woken < 1.0, woken
    assert _members(redis_server, UP_SET) == b"*0\r\n"
