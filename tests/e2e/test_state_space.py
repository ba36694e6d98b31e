"""The lifecycle state space, case by case, with its invariants.

Every case is one exchange: a client behaviour (fast, slow, paused, leaves)
against an upstream behaviour (fast, slow, cuts, answers early), both landing
in one phase (the head, the request body, the response body, the body's last
read), for a streaming (chunked SSE) or non-streaming (Content-Length)
response, under asyncio and uvloop. Every socket has small kernel buffers, so
a few hundred kilobytes are enough to make backpressure real in both
directions, and short timeouts keep each case well under a second.

After each case, once the relay has settled (a bounded poll, not a sleep):

(a) every exchange ended exactly once;
(b) the gauges are back to zero (active exchanges, pool outstanding and active);
(c) the pool holds only idle connections that are open and reading, and a
    follow-up request through the pool is answered promptly;
(d) every client connection relay holds is open and reading (or gone);
(e) once the test's sockets and the pool are closed, the process's file
    descriptors are back to the baseline taken before the case.

Besides the invariants, each case checks what the client saw (complete,
truncated, an error status) where the behaviours decide it, that every body
byte it got is the upstream's byte, that a keep-alive connection serves its
next request, and that a fresh client is served afterwards.
"""

from __future__ import annotations

import asyncio
import os
import socket
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from harness import CHUNKED_HEAD, ScriptUpstream, relay_for, reset, run, sse_chunk

from relay.core.downstream import ClientConnection
from relay.core.exchange import Exchange
from relay.core.server import RelayServer
from relay.core.upstream import State, UpstreamConnection
from relay.http.framing import LAST_CHUNK

pytestmark = pytest.mark.timeout(60)

CLIENTS = ("fast", "slow", "paused", "leaves")
UPSTREAMS = ("fast", "slow", "cuts", "early")
PHASES = ("head", "request-body", "response-body", "last-read")
MODES = ("stream", "plain")
LOOPS = ("asyncio", "uvloop")

# Limits: every relay timeout a case may legitimately reach is short; the
# upstream ones (1 s) are longer than any stall a "slow" peer makes, so they
# fire only when relay is stuck.
LIMITS: dict[str, Any] = {
    "client_head_timeout": 1.0,
    "client_body_timeout": 0.25,
    "client_send_timeout": 0.25,
    "client_keepalive_timeout": 3.0,
    "upstream_connect_timeout": 1.0,
    "upstream_head_timeout": 1.0,
    "upstream_idle_timeout": 1.0,
    "upstream_keepalive_timeout": 5.0,
}
#: A slow upstream's stall: longer than the client-side timeouts (relay must
#: not blame the client for its own pause), shorter than the upstream ones.
STALL = 0.35

REQUEST_SIZE = 256 * 1024
RESPONSE_SIZE = 512 * 1024
PLAIN_PIECE = 64 * 1024
SSE_PAYLOAD = 8 * 1024
#: Where a slow or paused client's "last read" behaviour begins: this many
#: body bytes before the end (more than the kernel buffers hold).
LAST_ZONE = 96 * 1024
#: Kernel buffers on every socket of a case (Linux doubles the value).
SOCKET_BUFFER = 16 * 1024
#: An early answer waits this long, so relay has pushed what it can of the body.
EARLY_DELAY = 0.05
#: How long one read or write of a peer may wait before the case gives up.
IO_WAIT = 3.0
#: The bound on settling; the longest legitimate case takes about 1 s.
SETTLE = 1.5
#: A follow-up must be answered well within the upstream head timeout, so a
#: pooled connection that is still paused (it would wait for it) is caught.
FOLLOW_UP_WAIT = 0.6

OK = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\nok"


@dataclass(frozen=True)
class Case:
    client: str
    upstream: str
    phase: str
    mode: str
    loop: str

    @property
    def id(self) -> str:
        phase = "any" if self.trivial else self.phase
        return f"{self.client}-client/{self.upstream}/{phase}/{self.mode}/{self.loop}"

    @property
    def trivial(self) -> bool:
        """A fast client and a fast upstream do nothing phase-specific."""
        return self.client == "fast" and self.upstream == "fast"


def all_cases() -> list[Any]:
    cases = []
    for loop in LOOPS:
        for mode in MODES:
            for client in CLIENTS:
                for upstream in UPSTREAMS:
                    for phase in PHASES:
                        case = Case(client, upstream, phase, mode, loop)
                        # Pruned: with neither peer doing anything phase-specific,
                        # the four phases are the same case by construction.
                        if case.trivial and phase != PHASES[0]:
                            continue
                        cases.append(pytest.param(case, id=case.id))
    return cases


# -- the response and request, byte for byte ----------------------------------------
def response_of(mode: str) -> tuple[bytes, list[bytes]]:
    """The upstream's response head and its body's pieces (one write each)."""
    if mode == "stream":
        count = RESPONSE_SIZE // SSE_PAYLOAD
        pieces = [sse_chunk(f"{i:06d}" + "t" * (SSE_PAYLOAD - 6)) for i in range(count)]
        return CHUNKED_HEAD, [*pieces, LAST_CHUNK]
    body = bytes(i % 251 for i in range(RESPONSE_SIZE))
    head = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n" % len(
        body
    )
    return head, [body[i : i + PLAIN_PIECE] for i in range(0, len(body), PLAIN_PIECE)]


def request_head(path: bytes, length: int, *, close: bool = False) -> bytes:
    extra = b"Connection: close\r\n" if close else b""
    return (
        b"POST %b HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n%b\r\n" % (path, length, extra)
    )


def request_body(size: int) -> bytes:
    return b'{"prompt":"' + b"p" * (size - 13) + b'"}'


# -- the scripted upstream -------------------------------------------------------------
@dataclass
class CaseState:
    head_seen: asyncio.Event = field(default_factory=asyncio.Event)
    connected: asyncio.Event = field(default_factory=asyncio.Event)


def leave(writer: asyncio.StreamWriter) -> None:
    """Reset the connection, unless it is already gone."""
    try:
        reset(writer)
    except (OSError, AttributeError, ValueError):  # no socket any more
        writer.transport.abort()


def small_send_buffer(sock: Any) -> None:
    # A receive buffer must be small from the handshake on (listening sockets
    # pass theirs on): shrunk later, the kernel drops data it already invited
    # and the sender waits for a retransmission.
    if sock is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SOCKET_BUFFER)


def small_receive_buffer(sock: Any) -> None:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SOCKET_BUFFER)


def upstream_handler(case: Case, state: CaseState) -> Any:
    """Serve ``/case`` as the case's upstream behaviour says; anything else gets a small 200."""
    head, pieces = response_of(case.mode)
    half = len(pieces) // 2

    async def handler(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, up: ScriptUpstream
    ) -> None:
        small_send_buffer(writer.get_extra_info("socket"))
        state.connected.set()

        async def write(*parts: bytes) -> None:
            for part in parts:
                writer.write(part)
                await asyncio.wait_for(writer.drain(), IO_WAIT)

        async def read_body(size: int) -> None:
            if size:
                await asyncio.wait_for(reader.readexactly(size), IO_WAIT)

        async def serve_case(size: int) -> bool:
            """The case's behaviour; true if the connection stays open afterwards."""
            kind, phase = case.upstream, case.phase
            if kind == "fast":
                await read_body(size)
                await write(head, *pieces)
            elif kind == "slow":
                if phase == "head":
                    await read_body(size)
                    third = len(head) // 3
                    for part in (head[:third], head[third : 2 * third], head[2 * third :]):
                        await write(part)
                        await asyncio.sleep(STALL / 3)
                    await write(*pieces)
                elif phase == "request-body":
                    await read_body(size // 4)
                    await asyncio.sleep(STALL)
                    await read_body(size - size // 4)
                    await write(head, *pieces)
                elif phase == "response-body":
                    await read_body(size)
                    await write(head, *pieces[:half])
                    await asyncio.sleep(STALL)
                    await write(*pieces[half:])
                else:
                    await read_body(size)
                    await write(head, *pieces[:-1])
                    await asyncio.sleep(STALL)
                    await write(pieces[-1])
            elif kind == "cuts":
                if phase == "head":
                    await read_body(size)
                    await write(head[:20])
                elif phase == "request-body":
                    await read_body(size // 4)
                elif phase == "response-body":
                    await read_body(size)
                    await write(head, *pieces[:half])
                else:  # everything but the body's final bytes (for chunks: the last chunk)
                    await read_body(size)
                    await write(head, *pieces[:-1], pieces[-1][:-5])
                return False
            else:  # answers early: the response (up to the phase) before the request body
                # ... once relay has pushed what it can of that body its way.
                await asyncio.sleep(EARLY_DELAY)
                if phase == "head":
                    await write(head)
                    await read_body(size)
                    await write(*pieces)
                elif phase == "request-body":
                    await read_body(size // 2)
                    await write(head, *pieces)
                    await read_body(size - size // 2)
                elif phase == "response-body":
                    await write(head, *pieces[:half])
                    await read_body(size)
                    await write(*pieces[half:])
                else:
                    await write(head, *pieces)
                    await read_body(size)
            return True

        try:
            while True:
                request = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
                up.received[-1] += request
                size = 0
                for line in request.split(b"\r\n"):
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        size = int(value)
                if request.startswith(b"POST /case "):
                    state.head_seen.set()
                    if not await serve_case(size):
                        return
                else:
                    await read_body(size)
                    await write(OK)
        except (ConnectionError, asyncio.IncompleteReadError, TimeoutError):
            pass

    return handler


# -- the client --------------------------------------------------------------------------
@dataclass
class Seen:
    """What the case's client saw."""

    head: bytes = b""
    status: int | None = None
    body: bytearray = field(default_factory=bytearray)
    ended: bool = False  # EOF or reset seen
    reset: bool = False

    def outcome(self, wire: bytes) -> str:
        if self.status is None:
            return "nothing"
        if self.status != 200:
            return f"error {self.status}"
        if bytes(self.body) == wire:
            return "complete"
        return "truncated (reset)" if self.reset else "truncated"

    @property
    def closes(self) -> bool:
        return b"\r\nconnection: close\r\n" in self.head.lower()


async def open_client(relay: RelayServer) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SOCKET_BUFFER // 4)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SOCKET_BUFFER)
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    await asyncio.wait_for(loop.sock_connect(sock, ("127.0.0.1", relay.port)), IO_WAIT)
    # A small stream buffer too: the client's reading, not asyncio's, sets the pace.
    return await asyncio.open_connection(sock=sock, limit=SOCKET_BUFFER)


async def send_request(case: Case, writer: asyncio.StreamWriter, state: CaseState) -> None:
    body = request_body(REQUEST_SIZE)
    head = request_head(b"/case", len(body))
    kind, phase = case.client, case.phase

    async def drain() -> None:
        await asyncio.wait_for(writer.drain(), IO_WAIT)

    try:
        if kind == "slow" and phase == "head":
            step = len(head) // 4
            for start in range(0, len(head), step):
                writer.write(head[start : start + step])
                await drain()
                await asyncio.sleep(0.03)
            writer.write(body)
        elif kind == "slow" and phase == "request-body":
            writer.write(head)
            step = len(body) // 16
            for start in range(0, len(body), step):
                writer.write(body[start : start + step])
                await drain()
                await asyncio.sleep(0.01)
        elif kind == "paused" and phase == "request-body":
            writer.write(head + body[: len(body) // 2])  # then neither sends nor reads
        elif kind == "leaves" and phase == "head":
            # relay holds the head back until body bytes come: leave once it
            # has its upstream connection.
            writer.write(head)
            await asyncio.wait_for(state.connected.wait(), IO_WAIT)
            writer.close()
            return
        elif kind == "leaves" and phase == "request-body":
            writer.write(head + body[: len(body) // 2])
            await asyncio.wait_for(state.head_seen.wait(), IO_WAIT)
            await drain()
            leave(writer)
            return
        else:
            writer.write(head + body)
        await drain()
    except (ConnectionError, TimeoutError):
        pass  # relay closed the connection, or stopped reading: the invariants judge


async def receive_response(
    case: Case, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, wire: bytes
) -> Seen:
    seen = Seen()
    kind, phase = case.client, case.phase
    if kind in ("paused", "leaves") and phase in ("head", "request-body"):
        return seen  # paused: never reads; leaves: the sender leaves
    try:
        try:
            seen.head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), IO_WAIT)
        except asyncio.IncompleteReadError as exc:
            seen.head, seen.ended = exc.partial, True
            return seen
        seen.status = int(seen.head.split(b" ", 2)[1])
        if seen.status != 200:
            seen.body += await asyncio.wait_for(reader.read(), IO_WAIT)
            seen.ended = True
            return seen
        stop_at = len(wire)
        slow_from: int | None = None
        if kind == "slow":
            slow_from = 0 if phase == "response-body" else max(0, len(wire) - LAST_ZONE)
        elif kind in ("paused", "leaves") and phase == "response-body":
            stop_at = len(wire) // 2
        elif kind == "paused":
            stop_at = len(wire) - LAST_ZONE
        elif kind == "leaves":
            stop_at = len(wire) - 5
        fell_behind = False
        while len(seen.body) < stop_at:
            size = 65536
            if slow_from is not None and len(seen.body) >= slow_from:
                if slow_from and not fell_behind:
                    fell_behind = True
                    await asyncio.sleep(0.1)  # near the end, the client falls behind
                size = SOCKET_BUFFER
                await asyncio.sleep(0.004)
            want = min(size, stop_at - len(seen.body))
            data = await asyncio.wait_for(reader.read(want), IO_WAIT)
            if not data:
                seen.ended = True
                break
            seen.body += data
    except ConnectionError:
        seen.ended = seen.reset = True
        return seen
    if kind == "leaves" and not seen.ended:
        leave(writer)
    return seen


def expected_outcomes(case: Case) -> set[str] | None:
    """What a client that sends and reads everything must see; ``None``: not decided."""
    if case.client in ("paused", "leaves"):
        return None
    if case.upstream in ("fast", "slow"):
        return {"complete"}
    if case.upstream == "cuts":
        if case.phase in ("head", "request-body"):
            # The 502 may be lost to the reset of a connection closed with
            # request bytes unread; it must never look like a success.
            return {"error 502", "nothing"}
        return {"truncated"}
    return {"complete"}


# -- the invariants ------------------------------------------------------------------------
@dataclass
class Ledger:
    """Every exchange created, and how many times each one ended."""

    created: list[Exchange] = field(default_factory=list)
    ends: Counter[int] = field(default_factory=Counter)

    def unended(self) -> list[Exchange]:
        return [ex for ex in self.created if self.ends[id(ex)] == 0]

    def twice(self) -> list[Exchange]:
        return [ex for ex in self.created if self.ends[id(ex)] > 1]


def describe(ex: Exchange) -> str:
    return f"{ex.request.method.decode()} {ex.request.target.decode()} ({ex.phase.value})"


def fds() -> dict[int, str]:
    found = {}
    for name in os.listdir("/proc/self/fd"):
        try:
            found[int(name)] = os.readlink(f"/proc/self/fd/{name}")
        except OSError:
            continue  # the listing's own descriptor, already closed
    return found


def pools_of(relay: RelayServer) -> list[Any]:
    return list(relay.state.router.pools.values())


def client_problem(conn: ClientConnection) -> str | None:
    """Why a client connection relay still holds is neither reading nor gone."""
    transport = conn.transport
    if conn.exchange is not None:
        return f"exchange still in flight: {describe(conn.exchange)}"
    if transport.is_closing():
        return "closed by relay but still held (its transport waits to flush)"
    if not transport.is_reading():
        return "open but not reading"
    return None


def idle_problem(conn: UpstreamConnection) -> str | None:
    """Why a pooled connection is not a clean idle one."""
    if conn.state is not State.IDLE:
        return f"state {conn.state.value}"
    if conn.transport.is_closing():
        return "closing"
    if not conn.transport.is_reading():
        return "reading paused"
    if conn.transport.get_write_buffer_size():
        return f"{conn.transport.get_write_buffer_size()} request bytes still unsent"
    return None


def settled(relay: RelayServer, ledger: Ledger) -> bool:
    if relay.metrics.active_exchanges != 0 or ledger.unended():
        return False
    if any(pool.outstanding or pool.active for pool in pools_of(relay)):
        return False
    return all(client_problem(conn) is None for conn in relay.state.connections)


async def wait_for_condition(check: Callable[[], bool], limit: float) -> bool:
    """Poll ``check`` every 10 ms for at most ``limit`` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + limit
    while not check():
        if loop.time() >= deadline:
            return False
        await asyncio.sleep(0.01)
    return True


async def exchange_on(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, close: bool
) -> bytes:
    """One small request on an open connection; its whole response (bounded)."""
    writer.write(request_head(b"/next", 2, close=close) + b"{}")
    head = await reader.readuntil(b"\r\n\r\n")
    return head + await reader.readexactly(2)


async def checked(what: str, problems: list[str], step: Awaitable[bytes]) -> None:
    try:
        answer = await asyncio.wait_for(step, FOLLOW_UP_WAIT)
    except (TimeoutError, ConnectionError, asyncio.IncompleteReadError) as exc:
        problems.append(f"{what}: no answer within {FOLLOW_UP_WAIT} s ({type(exc).__name__})")
        return
    if not (answer.startswith(b"HTTP/1.1 200") and answer.endswith(b"ok")):
        problems.append(f"{what}: got {answer[:60]!r}")


async def empty_pool(relay: RelayServer, up: ScriptUpstream) -> bool:
    """Close every pooled connection and wait for the upstream's side of them to end."""
    relay.state.router.close()
    return await wait_for_condition(lambda: not up._tasks, SETTLE)


# -- one case ----------------------------------------------------------------------------------
async def play(case: Case, ledger: Ledger) -> list[str]:
    """Run ``case`` against a fresh relay; the list of broken promises."""
    state = CaseState()
    up = await ScriptUpstream(upstream_handler(case, state), limit=SOCKET_BUFFER).start()
    assert up.server is not None
    small_receive_buffer(up.server.sockets[0])  # accepted sockets inherit it
    problems: list[str] = []
    _, pieces = response_of(case.mode)
    wire = b"".join(pieces)
    try:
        async with relay_for(up.port, **LIMITS) as relay:
            for server in relay.servers:
                small_receive_buffer(server.sockets[0])
            # Warm-up, then the baseline: no pooled connection, nothing in flight.
            reader, writer = await open_client(relay)
            await checked("warm-up", problems, exchange_on(reader, writer, close=True))
            writer.close()
            await wait_for_condition(lambda: not relay.state.connections, SETTLE)
            await empty_pool(relay, up)
            assert not problems, problems
            baseline = fds()
            state.connected.clear()

            reader, writer = await open_client(relay)
            sender = asyncio.create_task(send_request(case, writer, state))
            seen = await receive_response(case, reader, writer, wire)
            await asyncio.wait_for(sender, IO_WAIT * 2)

            # What the client saw.
            if seen.status == 200 and bytes(seen.body) != wire[: len(seen.body)]:
                problems.append("fidelity: body bytes differ from the upstream's")
            allowed = expected_outcomes(case)
            outcome = seen.outcome(wire)
            if allowed is not None and outcome not in allowed:
                problems.append(f"outcome: {outcome}, expected {' or '.join(sorted(allowed))}")

            if not await wait_for_condition(lambda: settled(relay, ledger), SETTLE):
                problems.append(f"settle: relay did not settle within {SETTLE} s")
            problems.extend(invariants(relay, ledger))

            # (c) continued, and the keep-alive promise: follow-ups are served promptly.
            keeps = (
                case.client in ("fast", "slow")
                and outcome == "complete"
                and not seen.closes
                and not seen.ended
            )
            if keeps:
                await checked(
                    "keep-alive: next request on the same connection",
                    problems,
                    exchange_on(reader, writer, close=False),
                )
            idle = sum(pool.idle_count for pool in pools_of(relay))
            fresh_reader, fresh_writer = await open_client(relay)
            await checked(
                f"(c) pool: follow-up on a fresh connection ({idle} pooled)",
                problems,
                exchange_on(fresh_reader, fresh_writer, close=True),
            )

            # (e) Everything closed on the test's side: back to the baseline.
            for client in (writer, fresh_writer):
                leave(client)
            if not await wait_for_condition(lambda: not relay.state.connections, SETTLE):
                problems.append(
                    f"(d) clients: {len(relay.state.connections)} connection(s) outlive their peer"
                )
            if not await empty_pool(relay, up):
                problems.append("(e) fds: upstream connections outlive the pool's close")
            if not await wait_for_condition(lambda: len(fds()) == len(baseline), SETTLE):
                now = fds()
                extra = sorted(set(now.items()) - set(baseline.items()))
                problems.append(f"(e) fds: {len(now) - len(baseline):+d} against baseline {extra}")
            problems.extend(
                f"(a) ends: {describe(ex)} ended {ledger.ends[id(ex)]} times"
                for ex in ledger.twice()
            )
    finally:
        await up.close()
    return problems


def invariants(relay: RelayServer, ledger: Ledger) -> list[str]:
    problems = [f"(a) ends: {describe(ex)} never ended" for ex in ledger.unended()]
    problems += [
        f"(a) ends: {describe(ex)} ended {ledger.ends[id(ex)]} times" for ex in ledger.twice()
    ]
    metrics = relay.metrics
    if metrics.active_exchanges != 0:
        problems.append(f"(b) gauges: active exchanges {metrics.active_exchanges}")
    for pool in pools_of(relay):
        if pool.outstanding or pool.active:
            problems.append(f"(b) gauges: pool outstanding {pool.outstanding} active {pool.active}")
        for conn in pool._idle:
            problem = idle_problem(conn)
            if problem is not None:
                problems.append(f"(c) pool: idle connection {problem}")
    for conn in relay.state.connections:
        problem = client_problem(conn)
        if problem is not None:
            problems.append(f"(d) clients: {problem}")
    return problems


@pytest.fixture
def ledger(monkeypatch: pytest.MonkeyPatch) -> Ledger:
    return instrument(monkeypatch)


def instrument(monkeypatch: pytest.MonkeyPatch) -> Ledger:
    """Count exchanges and their endings; give every relay socket small kernel buffers."""
    book = Ledger()
    init, end = Exchange.__init__, Exchange._end
    client_made, upstream_made = (
        ClientConnection.connection_made,
        UpstreamConnection.connection_made,
    )

    def counted_init(self: Exchange, *args: Any, **kwargs: Any) -> None:
        init(self, *args, **kwargs)
        book.created.append(self)

    def counted_end(self: Exchange, ending: Any) -> None:
        book.ends[id(self)] += 1
        end(self, ending)

    def client_made_small(self: ClientConnection, transport: Any) -> None:
        small_send_buffer(transport.get_extra_info("socket"))
        client_made(self, transport)

    def upstream_made_small(self: UpstreamConnection, transport: Any) -> None:
        small_send_buffer(transport.get_extra_info("socket"))
        upstream_made(self, transport)

    monkeypatch.setattr(Exchange, "__init__", counted_init)
    monkeypatch.setattr(Exchange, "_end", counted_end)
    monkeypatch.setattr(ClientConnection, "connection_made", client_made_small)
    monkeypatch.setattr(UpstreamConnection, "connection_made", upstream_made_small)
    return book


@pytest.mark.parametrize("case", all_cases())
def test_every_exchange_ends_once_and_leaves_relay_clean(case: Case, ledger: Ledger) -> None:
    """Whatever the peers do and wherever they do it, relay ends the exchange once and is clean."""
    problems = run(case.loop, lambda: play(case, ledger), limit=40)
    assert not problems, "\n".join(problems)
