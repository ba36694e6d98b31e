"""A burst of new requests takes a bounded share of each loop turn; open streams' tokens go first.

Everything runs on one loop with relay (asyncio or uvloop) over loopback
sockets. The burst's heads and the open streams' tokens are sent with plain
non-blocking ``socket.send`` calls in one stretch of the test's code, so they
are all in relay's sockets before its next poll, heads first: the poll then
returns them in that order, as a real burst of new streams arriving beside
flowing ones would.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import ssl
from collections.abc import AsyncIterator
from typing import Any

import pytest
import trustme
from harness import CHUNKED_HEAD, WAIT, run, sse_chunk, until

from relay.config import Config, parse_listen, parse_upstream
from relay.core import downstream, exchange
from relay.core.server import RelayServer

pytestmark = pytest.mark.timeout(90)

OK = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"


class RawUpstream:
    """An upstream on plain sockets: its token writes are ``send`` calls, at once.

    ``/stream`` answers a chunked head and keeps the socket in ``streams`` for
    the test to write tokens to; any other path answers ``ok`` (keep-alive),
    after reading a ``Content-Length`` body.
    """

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(512)
        self.sock.setblocking(False)
        self.port = self.sock.getsockname()[1]
        self.streams: list[socket.socket] = []
        self.served: list[bytes] = []  # request targets, in the order answered
        self.conns: list[socket.socket] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self._accept = asyncio.get_running_loop().create_task(self._accept_forever())

    async def _accept_forever(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            conn, _ = await loop.sock_accept(self.sock)
            conn.setblocking(False)
            self.conns.append(conn)
            task = loop.create_task(self._serve(conn))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _serve(self, conn: socket.socket) -> None:
        with contextlib.suppress(OSError):  # relay cuts the upstream of a client gone
            await self._requests(conn)

    async def _requests(self, conn: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        buffered = b""
        while True:
            while b"\r\n\r\n" not in buffered:
                data = await loop.sock_recv(conn, 65536)
                if not data:
                    return
                buffered += data
            head, _, buffered = buffered.partition(b"\r\n\r\n")
            lines = head.split(b"\r\n")
            target = lines[0].split(b" ")[1]
            length = 0
            for line in lines[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            while len(buffered) < length:
                data = await loop.sock_recv(conn, 65536)
                if not data:
                    return
                buffered += data
            body, buffered = buffered[:length], buffered[length:]
            self.served.append(target + b" " + body)
            if target == b"/stream":
                await loop.sock_sendall(conn, CHUNKED_HEAD)
                self.streams.append(conn)
                return  # the test writes the tokens
            await loop.sock_sendall(conn, OK)

    def close(self) -> None:
        self._accept.cancel()
        for task in list(self._tasks):
            task.cancel()
        for conn in self.conns:
            conn.close()
        self.sock.close()


@contextlib.asynccontextmanager
async def relay_and_upstream(**limits: Any) -> AsyncIterator[tuple[RawUpstream, RelayServer]]:
    upstream = RawUpstream()
    config = Config(
        listen=parse_listen("127.0.0.1:0"),
        upstream=parse_upstream(f"127.0.0.1:{upstream.port}"),
        **limits,
    )
    relay = await RelayServer.start(config)
    try:
        yield upstream, relay
    finally:
        await relay.close()
        upstream.close()


async def raw_client(relay: RelayServer, context: ssl.SSLContext | None = None) -> Any:
    """A connected client: a plain non-blocking socket, or an ``ssl.SSLSocket``
    whose handshake is done (its sends then go out at once, too)."""
    loop = asyncio.get_running_loop()
    sock = socket.socket()
    sock.setblocking(False)
    await asyncio.wait_for(loop.sock_connect(sock, ("127.0.0.1", relay.port)), WAIT)
    if context is None:
        return sock
    tls = context.wrap_socket(sock, server_hostname="127.0.0.1", do_handshake_on_connect=False)
    async with asyncio.timeout(WAIT):
        while True:
            try:
                tls.do_handshake()
                return tls
            except ssl.SSLWantReadError:
                await wait_readable(tls)
            except ssl.SSLWantWriteError:
                await asyncio.sleep(0.001)


async def wait_readable(sock: socket.socket) -> None:
    loop = asyncio.get_running_loop()
    ready = loop.create_future()
    loop.add_reader(sock.fileno(), lambda: ready.done() or ready.set_result(None))
    try:
        await asyncio.wait_for(ready, WAIT)
    finally:
        loop.remove_reader(sock.fileno())


async def read_until(sock: socket.socket, done: Any) -> bytes:
    """Read from ``sock`` until ``done(data)`` or EOF, bounded by ``WAIT``."""
    data = b""
    async with asyncio.timeout(WAIT):
        while not done(data):
            try:
                chunk = sock.recv(65536)
            except (BlockingIOError, ssl.SSLWantReadError):
                await wait_readable(sock)
                continue
            if not chunk:
                break
            data += chunk
    return data


def get(path: str, extra: bytes = b"") -> bytes:
    return b"GET %b HTTP/1.1\r\nHost: test\r\n%b\r\n" % (path.encode(), extra)


def post(path: str, body: bytes) -> bytes:
    return b"POST %b HTTP/1.1\r\nHost: test\r\nContent-Length: %d\r\n\r\n%b" % (
        path.encode(),
        len(body),
        body,
    )


def record_order(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Record, in relay, each request started (its target) and each upstream read ("token")."""
    events: list[str] = []
    on_request = downstream.ClientConnection._on_request
    upstream_data = exchange.Exchange.upstream_data

    def recorded_request(self: Any, request: Any) -> None:
        events.append(request.target.decode())
        on_request(self, request)

    def recorded_data(self: Any, data: bytes) -> None:
        events.append("token")
        upstream_data(self, data)

    monkeypatch.setattr(downstream.ClientConnection, "_on_request", recorded_request)
    monkeypatch.setattr(exchange.Exchange, "upstream_data", recorded_data)
    return events


STREAMS = 4
BURST = 120


@pytest.mark.parametrize("budget", [0.0, None])
def test_tokens_of_open_streams_go_before_a_burst_of_new_heads(loop_kind, budget, monkeypatch):
    """When a poll brings many new request heads and, after them, tokens of open
    streams, relay starts only one turn's budget of the new requests before it
    relays those tokens (with a budget of 0, none); the rest start in later
    turns, oldest first, and every one of them is answered."""
    events = record_order(monkeypatch)

    async def main() -> None:
        async with relay_and_upstream() as (upstream, relay):
            pacer = relay.state.head_pacer
            loop = asyncio.get_running_loop()
            streams = [await raw_client(relay) for _ in range(STREAMS)]
            for sock in streams:
                sock.send(post("/stream", b"{}"))
            for sock in streams:
                head = await read_until(sock, lambda d: b"\r\n\r\n" in d)
                assert head.startswith(b"HTTP/1.1 200"), head
            await until(lambda: len(upstream.streams) == STREAMS)
            burst = [await raw_client(relay) for _ in range(BURST)]
            await until(lambda: len(relay.state.connections) == STREAMS + BURST)
            if budget is not None:
                pacer.budget = budget
            events.clear()
            # One stretch, no await: the heads, then the tokens, are all in
            # relay's sockets before its next poll.
            for index, sock in enumerate(burst):
                sock.send(get(f"/quick/{index}"))
            for up_sock in upstream.streams:
                up_sock.send(sse_chunk("token"))
            answers = await asyncio.gather(
                *(read_until(sock, lambda d: d.endswith(b"ok")) for sock in burst)
            )
            assert all(a.startswith(b"HTTP/1.1 200") for a in answers), answers
            for sock in streams:
                data = await read_until(sock, lambda d: b"token" in d)
                assert b"data: token" in data, data
            heads = [e for e in events if e != "token"]
            # First come, first served: the requests started in the order they arrived.
            assert heads == [f"/quick/{i}" for i in range(BURST)], heads
            heads_first = events.index("token")
            if budget == 0.0:
                assert heads_first == 0, events[:20]
            else:
                # A head costs far more than 2 ms / BURST: the budget ends the run early.
                assert heads_first < BURST // 2, (heads_first, events[:20])
            assert relay.metrics.starts_deferred > 0
            # Operators see the same count in /metrics.
            assert (
                f"relay_request_starts_deferred_total {relay.metrics.starts_deferred}\n"
                in relay.metrics.render()
            )
            await until(lambda: len(pacer) == 0)
            for sock in streams + burst:
                sock.close()
            await until(lambda: not relay.state.connections)
            assert relay.metrics.active_exchanges == 0
            del loop

    run(loop_kind, main, limit=60)


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, ssl.SSLContext]:
    ca = trustme.CA()
    path = tmp_path_factory.mktemp("tls") / "server.pem"
    ca.issue_cert("127.0.0.1").private_key_and_cert_chain_pem.write_to_path(str(path))
    context = ssl.create_default_context()
    ca.configure_trust(context)
    return str(path), context


def _open_sockets() -> int:
    """Socket descriptors of this process (the loop's own pipes and rings aside)."""
    count = 0
    for name in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            count += os.readlink(f"/proc/self/fd/{name}").startswith("socket:")
    return count


@pytest.mark.parametrize("tls", [False, True], ids=["plain", "tls"])
def test_requests_that_wait_for_their_turn_are_served_in_order_and_end_once(
    loop_kind, tls, tls_files, caplog
):
    """With no budget at all (every request waits for a later turn): plain
    requests, bodies sent with and after the head, pipelined requests, a client
    that goes away while its request waits, and one that sends half a head are
    each handled as without waiting: answered in order, one access line per
    request, and connections, exchanges, the queue and descriptors back to
    where they were."""
    caplog.set_level(logging.INFO, logger="relay.access")
    cert, client_context = tls_files
    limits: dict[str, Any] = {"tls_cert": cert} if tls else {}
    context = client_context if tls else None

    async def main() -> None:
        fds = _open_sockets()
        async with relay_and_upstream(**limits) as (upstream, relay):
            pacer = relay.state.head_pacer
            pacer.budget = 0.0
            simple = [await raw_client(relay, context) for _ in range(20)]
            with_body = await raw_client(relay, context)
            body_later = await raw_client(relay, context)
            pipelined = await raw_client(relay, context)
            gone = [await raw_client(relay, context) for _ in range(5)]
            half = await raw_client(relay, context)
            everyone = [*simple, with_body, body_later, pipelined, *gone, half]
            await until(lambda: len(relay.state.connections) == len(everyone))
            for index, sock in enumerate(simple):
                sock.send(get(f"/simple/{index}"))
            with_body.send(post("/with-body", b'{"a":1}'))
            body_later.send(post("/body-later", b'{"b":2}')[:-7])
            pipelined.send(get("/pipe/1") + post("/pipe/2", b"xy") + get("/pipe/3"))
            for sock in gone:
                sock.send(get("/gone"))
            half.send(b"GET /half HTTP/1.1\r\nHost: te")
            # The gone clients close before relay's next poll: their requests
            # wait in the queue, and relay finds them closed in their turn or
            # when it reads again.
            for sock in gone:
                sock.close()
            await until(lambda: relay.metrics.starts_deferred > 0)
            body_later.send(b'{"b":2}')
            answers = await asyncio.gather(
                *(read_until(s, lambda d: d.endswith(b"ok")) for s in [*simple, with_body])
            )
            assert all(a.startswith(b"HTTP/1.1 200") for a in answers), answers
            assert (await read_until(body_later, lambda d: d.endswith(b"ok"))).startswith(
                b"HTTP/1.1 200"
            )
            three = await read_until(pipelined, lambda d: d.count(b"ok") == 3)
            assert three.count(b"HTTP/1.1 200") == 3, three
            served = upstream.served
            assert b'/with-body {"a":1}' in served
            assert b'/body-later {"b":2}' in served
            pipes = [t for t in served if t.startswith(b"/pipe/")]
            assert pipes == [b"/pipe/1 ", b"/pipe/2 xy", b"/pipe/3 "], pipes
            simples = sorted(t for t in served if t.startswith(b"/simple/"))
            assert simples == sorted(b"/simple/%d " % i for i in range(20)), simples
            half.send(b"st\r\n\r\n")
            assert (await read_until(half, lambda d: d.endswith(b"ok"))).startswith(b"HTTP/1.1 200")
            assert relay.metrics.starts_deferred >= len(everyone) - len(gone)
            for sock in everyone:
                sock.close()
            await until(lambda: not relay.state.connections)
            await until(lambda: relay.metrics.active_exchanges == 0)
            assert len(pacer) == 0
            started = len([t for t in served if not t.startswith(b"/gone")])
            lines = [r for r in caplog.records if r.name == "relay.access"]
            gone_lines = [r for r in lines if "/gone" in r.getMessage()]
            # A request that waited is logged once: when it started (and, if its
            # client had gone, ended then), or when its connection ended first.
            assert len(lines) == started + len(gone_lines), [r.getMessage() for r in lines]
            assert len(gone_lines) == len(gone), [r.getMessage() for r in gone_lines]
            endings = sum(relay.metrics.endings.values())
            assert endings == len(lines), (endings, len(lines))
        await until(lambda: _open_sockets() <= fds)

    run(loop_kind, main, limit=60)


def test_the_head_deadline_runs_while_a_request_waits_for_its_turn(loop_kind, monkeypatch, caplog):
    """A request held in the queue is still bound by the head deadline, counted
    from its first byte: the client gets a 408 and the queue lets it go."""

    caplog.set_level(logging.INFO, logger="relay.access")

    async def main() -> None:
        async with relay_and_upstream(client_head_timeout=0.4) as (_upstream, relay):
            pacer = relay.state.head_pacer
            pacer.budget = 0.0
            monkeypatch.setattr(pacer, "_turn", lambda: None)  # its turn never comes
            sock = await raw_client(relay)
            loop = asyncio.get_running_loop()
            sent = loop.time()
            sock.send(get("/held"))
            await until(lambda: len(pacer) == 1)
            answer = await read_until(sock, lambda d: b"}" in d)
            waited = loop.time() - sent
            assert answer.startswith(b"HTTP/1.1 408"), answer
            assert 0.35 <= waited < WAIT, waited
            assert len(pacer) == 0
            sock.close()
            await until(lambda: not relay.state.connections)
            # One access line, the 408's.
            lines = [r.getMessage() for r in caplog.records if r.name == "relay.access"]
            assert len(lines) == 1 and "status=408" in lines[0], lines

    run(loop_kind, main, limit=30)


def test_a_drain_answers_a_request_still_waiting_for_its_turn(loop_kind, monkeypatch):
    """A request that arrived before the drain began, but waits for its turn to
    start, is answered 503 (closing) when its turn comes, not cut unanswered."""

    async def main() -> None:
        upstream = RawUpstream()
        config = Config(
            listen=parse_listen("127.0.0.1:0"),
            upstream=parse_upstream(f"127.0.0.1:{upstream.port}"),
        )
        relay = await RelayServer.start(config)
        try:
            pacer = relay.state.head_pacer
            pacer.budget = 0.0
            # Hold the queue still until the drain has begun.
            monkeypatch.setattr(pacer, "_turn", lambda: None)
            sock = await raw_client(relay)
            sock.send(get("/waiting"))
            await until(lambda: len(pacer) == 1)
            closing = asyncio.create_task(relay.close(drain_timeout=WAIT))
            await until(lambda: relay.state.draining)
            monkeypatch.undo()
            pacer._handle = None
            pacer.spent(0.0)  # the next turn comes
            answer = await read_until(sock, lambda d: d.endswith(b"}"))
            assert answer.startswith(b"HTTP/1.1 503"), answer
            assert b"shutting down" in answer
            await asyncio.wait_for(closing, WAIT)
            assert len(pacer) == 0
            assert upstream.served == []
            sock.close()
        finally:
            await relay.close()
            upstream.close()

    run(loop_kind, main, limit=30)


@pytest.mark.parametrize("budget", [0.0, None], ids=["waits", "at-once"])
def test_a_request_whose_start_fails_closes_its_connection_only(
    loop_kind, budget, monkeypatch, caplog
):
    """When starting a request raises (a defect relay did not foresee), its
    connection is closed, whether the request waited for its turn or not, as a
    transport closes a connection whose data_received raised: it is not left
    open with no request, no exchange and no deadline. The other connections'
    requests are served, and connections, exchanges and the queue go back to
    zero."""
    caplog.set_level(logging.CRITICAL, logger="relay.events")  # the expected traceback
    check_request_headers = downstream.check_request_headers

    def failing(fields: list[tuple[bytes, bytes]]) -> None:
        if any(name == b"x-fail" for name, _ in fields):
            raise RuntimeError("a defect in starting a request")
        check_request_headers(fields)

    monkeypatch.setattr(downstream, "check_request_headers", failing)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        loop.set_exception_handler(lambda _loop, _context: None)  # the transport's report
        fds = _open_sockets()
        async with relay_and_upstream() as (_upstream, relay):
            pacer = relay.state.head_pacer
            if budget is not None:
                pacer.budget = budget
            broken = await raw_client(relay)
            others = [await raw_client(relay) for _ in range(5)]
            await until(lambda: len(relay.state.connections) == 1 + len(others))
            broken.send(get("/fails", b"x-fail: 1\r\n"))
            for index, sock in enumerate(others):
                sock.send(get(f"/fine/{index}"))
            answers = await asyncio.gather(
                *(read_until(sock, lambda d: d.endswith(b"ok")) for sock in others)
            )
            assert all(a.startswith(b"HTTP/1.1 200") for a in answers), answers
            # Read until relay closes it (bounded by WAIT): no answer, and no hang.
            assert await read_until(broken, lambda _d: False) == b""
            for sock in [broken, *others]:
                sock.close()
            await until(lambda: not relay.state.connections)
            await until(lambda: relay.metrics.active_exchanges == 0)
            assert len(pacer) == 0
        await until(lambda: _open_sockets() <= fds)

    run(loop_kind, main, limit=30)


@pytest.mark.parametrize("tls", [False, True], ids=["plain", "tls"])
def test_a_head_that_arrives_in_pieces_waits_for_a_turn_once(loop_kind, tls, tls_files):
    """With no budget at all, a request head that arrives in pieces (a slow
    client, a head longer than a segment) waits for a turn once, when it is
    whole, not once per piece: each piece's wait sent it to the back of the
    queue again and counted as one more deferred start. The pieces before the
    last are read as they come; the requests are answered; the queue empties."""
    cert, client_context = tls_files
    limits: dict[str, Any] = {"tls_cert": cert} if tls else {}
    context = client_context if tls else None
    # Split everywhere a head can be, the blank line that ends it included,
    # and a second request on the same connection, pipelined in pieces: each
    # piece with how much of a head relay holds once it has read it.
    head = get("/pieces", b"X-Long: " + b"a" * 300 + b"\r\n")
    second = get("/second")
    cuts = [5, 40, len(head) - 3, len(head) - 1]
    first = [(head[a:b], b) for a, b in zip([0, *cuts[:-1]], cuts, strict=True)]
    pipelined = [(head[-1:] + head + second[:-2], len(second) - 2)]

    async def main() -> None:
        async with relay_and_upstream(**limits) as (upstream, relay):
            pacer = relay.state.head_pacer
            pacer.budget = 0.0
            sock = await raw_client(relay, context)
            await until(lambda: len(relay.state.connections) == 1)
            (conn,) = relay.state.connections
            for piece, held in [*first, *pipelined]:
                sock.send(piece)
                await until(lambda held=held: len(conn._head_bytes) == held)
            sock.send(second[-2:])
            answer = await read_until(sock, lambda d: d.count(b"ok") == 3)
            assert answer.count(b"HTTP/1.1 200") == 3, answer
            assert upstream.served == [b"/pieces ", b"/pieces ", b"/second "]
            assert relay.metrics.starts_deferred == 3, relay.metrics.starts_deferred
            assert len(pacer) == 0
            sock.close()
            await until(lambda: not relay.state.connections)

    run(loop_kind, main, limit=30)


@pytest.mark.parametrize("how", ["client-reset-tls", "server-close"])
def test_a_request_whose_connection_ends_while_it_waits_is_logged_once(
    loop_kind, how, tls_files, monkeypatch, caplog
):
    """A whole request that waits for its turn and whose connection ends first
    (a TLS client that resets it, which relay sees while reading is paused;
    relay closed without a drain) is logged once, with its method, path and
    ending, and counted in the endings, as it would be had it started: relay
    read it, so it does not vanish from the access log."""
    caplog.set_level(logging.INFO, logger="relay.access")
    cert, client_context = tls_files
    tls = how == "client-reset-tls"
    limits: dict[str, Any] = {"tls_cert": cert} if tls else {}
    context = client_context if tls else None
    ending = "client_gone" if tls else "drain"

    async def main() -> None:
        fds = _open_sockets()
        async with relay_and_upstream(**limits) as (upstream, relay):
            pacer = relay.state.head_pacer
            pacer.budget = 0.0
            monkeypatch.setattr(pacer, "_turn", lambda: None)  # their turn never comes
            socks = [await raw_client(relay, context) for _ in range(3)]
            await until(lambda: len(relay.state.connections) == len(socks))
            for index, sock in enumerate(socks):
                sock.send(get(f"/waits/{index}"))
            await until(lambda: len(pacer) == len(socks))
            if tls:
                for sock in socks:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\1\0\0\0\0\0\0\0")
                    sock.close()  # a reset
            else:
                await relay.close()
            await until(lambda: not relay.state.connections)
            assert len(pacer) == 0
            lines = [r.getMessage() for r in caplog.records if r.name == "relay.access"]
            assert len(lines) == len(socks), lines
            for index in range(len(socks)):
                (line,) = [line for line in lines if f"path=/waits/{index} " in line]
                assert "method=GET" in line and f"ending={ending}" in line, line
            assert dict(relay.metrics.endings) == {(ending, "false"): len(socks)}
            assert upstream.served == []
            for sock in socks:
                sock.close()
        await until(lambda: _open_sockets() <= fds)

    run(loop_kind, main, limit=30)


def test_pipelined_requests_relay_answers_itself_start_one_after_another_not_nested(
    loop_kind, caplog
):
    """Requests relay answers at once, without an upstream (the test stream's
    model list), pipelined by the hundred in one write, are all answered in
    order: each answer's end starts the next request from a later loop turn
    (within the pacer's budget), not from inside the one that just ended, so
    the starts do not nest a Python frame deeper per request until the
    recursion limit cuts the connection, and they take their share of a turn
    like any new request."""
    caplog.set_level(logging.INFO, logger="relay.access")
    count = 400
    errors: list[dict[str, Any]] = []

    async def main() -> None:
        asyncio.get_running_loop().set_exception_handler(lambda _loop, ctx: errors.append(ctx))
        async with relay_and_upstream(test_stream="/t") as (upstream, relay):
            sock = await raw_client(relay)
            sock.setblocking(True)
            sock.sendall(get("/t/v1/models") * count)
            sock.setblocking(False)
            answers = await read_until(sock, lambda d: d.count(b"relay-test-stream") == count)
            assert answers.count(b"HTTP/1.1 200") == count, (answers.count(b"HTTP/1.1 200"), errors)
            sock.close()
            await until(lambda: not relay.state.connections)
            assert relay.metrics.active_exchanges == 0
            assert len(relay.state.head_pacer) == 0
            assert upstream.served == []
        lines = [r for r in caplog.records if r.name == "relay.access"]
        assert len(lines) == count
        assert not errors, errors

    run(loop_kind, main, limit=60)
