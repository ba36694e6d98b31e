"""Listeners, the upstream health checks, and graceful drain.

:class:`RelayServer` is what tests, the demo and the service loop start: it
binds the listening sockets, owns the shared state, and shuts down in order:
stop accepting, let in-flight exchanges finish (up to a deadline), close the
rest. Signals, systemd and workers are the service loop's (``relay.ops``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

from ..config import Config
from .downstream import ClientConnection
from .exchange import Ending
from .metrics import Metrics
from .state import ServerState
from .tls import describe_handshake_failure
from .upstream import UpstreamPool

__all__ = ["RelayServer", "loop_factory", "run"]

log = logging.getLogger("relay.events")

#: Listen backlog: bursts of new streams must queue in the kernel, not fail
#: (thousands of held streams reconnect at once after a restart). The kernel
#: caps it at net.core.somaxconn (4096 on current Linux), as for nginx.
BACKLOG = 4096
#: TLS listener: connections taken per wakeup, and the pause after accept fails (EMFILE).
ACCEPT_BATCH = 64
ACCEPT_BACKOFF = 1.0
#: Seconds relay waits at exit for its last spans to be exported (--otel).
TRACE_FLUSH_TIMEOUT = 5.0


class TLSListener:
    """A TLS listening socket: relay accepts plain TCP and runs each handshake itself.

    ``create_server(ssl=...)`` hides a connection until its handshake is
    done, so slow or silent clients would hold sockets nobody counts. Here
    every pending handshake is a task in ``state.handshakes``: it counts
    against ``--max-connections`` (over the limit the socket is closed at
    once, as there is no TLS yet to say 503 with), shows in
    ``relay_tls_handshakes``, is bounded by ``--client-head-timeout``, and
    gets the context current at accept time, so a SIGHUP reload reaches new
    handshakes while open connections keep theirs. ``connect_accepted_socket``
    calls the ClientConnection's ``connection_made`` once the handshake is
    done, under asyncio and uvloop alike.
    """

    def __init__(self, state: ServerState, sock: socket.socket) -> None:
        self.state = state
        self.sock = sock
        sock.setblocking(False)
        self._task = asyncio.get_running_loop().create_task(self._accept_forever())

    @property
    def sockets(self) -> list[socket.socket]:
        return [] if self.sock.fileno() < 0 else [self.sock]

    async def close(self) -> None:
        """Stop accepting and close the socket: new connections are refused at once."""
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        self.sock.close()

    async def _accept_forever(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                conn, peer = await loop.sock_accept(self.sock)
            except OSError as exc:
                # Out of descriptors or memory: back off like asyncio's own
                # server does, instead of spinning on a ready socket.
                log.error("accept failed on %s: %s", self.sock.getsockname(), exc)
                await asyncio.sleep(ACCEPT_BACKOFF)
                continue
            self._admit(conn, peer)
            # Take the rest of the backlog without a trip through the loop.
            for _ in range(ACCEPT_BATCH):
                try:
                    conn, peer = self.sock.accept()
                except OSError:
                    break
                self._admit(conn, peer)

    def _admit(self, conn: socket.socket, peer: Any) -> None:
        state = self.state
        host = str(peer[0]) if isinstance(peer, tuple) and peer else "unknown"
        reason = state.over_limit()
        if reason is not None:
            state.metrics.connections_accepted += 1
            state.metrics.connections_rejected += 1
            log.warning("rejecting connection from %s: %s", host, reason)
            conn.close()
            return
        conn.setblocking(False)
        task = asyncio.get_running_loop().create_task(self._handshake(conn, host))
        state.handshakes.add(task)
        task.add_done_callback(state.handshakes.discard)

    async def _handshake(self, conn: socket.socket, host: str) -> None:
        state = self.state
        context = state.server_tls
        assert context is not None
        try:
            await asyncio.get_running_loop().connect_accepted_socket(
                lambda: ClientConnection(state),
                conn,
                ssl=context,
                ssl_handshake_timeout=state.config.client_head_timeout,
            )
        except OSError as exc:  # ssl.SSLError and ConnectionError included
            state.metrics.tls_handshake_failures += 1
            worth_info, why = describe_handshake_failure(exc)
            if worth_info or log.isEnabledFor(logging.DEBUG):
                level = logging.INFO if worth_info else logging.DEBUG
                log.log(level, "TLS handshake failed from %s: %s", host, why)
            # The transport owns ``conn`` now and has closed it (uvloop
            # detaches it first): closing it here could hit a reused fd.


async def bind(host: str | None, port: int, reuse_port: bool = False) -> list[socket.socket]:
    """Listening sockets for ``host`` (None: every interface), as ``create_server`` binds them."""
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    sockets: list[socket.socket] = []
    try:
        for family, kind, proto, _, address in dict.fromkeys(infos):
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if reuse_port:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if family == socket.AF_INET6:
                # One socket per family, as asyncio does: [::] must not take IPv4 too.
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(address)
            sock.listen(BACKLOG)
    except OSError:
        for sock in sockets:
            sock.close()
        raise
    return sockets


async def health_check(pool: UpstreamPool, path: str, interval: float) -> None:
    """Every ``interval``, GET ``path`` on the upstream: 200 admits it, anything else ejects."""
    request = (
        f"GET {path} HTTP/1.1\r\nHost: {pool.address.authority}\r\n"
        "Connection: close\r\nUser-Agent: relay-health\r\n\r\n"
    ).encode()
    while True:
        healthy = False
        try:
            async with asyncio.timeout(min(interval, 5.0)):
                reader, writer = await pool.open_stream()
                try:
                    writer.write(request)
                    status_line = await reader.readline()
                    healthy = status_line.split(b" ", 2)[1:2] == [b"200"]
                finally:
                    writer.close()
        except (OSError, TimeoutError, ValueError):
            healthy = False
        if healthy != pool.healthy:
            level = logging.INFO if healthy else logging.WARNING
            verdict = "passes" if healthy else "fails"
            log.log(level, "upstream %s %s its health check %s", pool.address, verdict, path)
            pool.healthy = healthy
        await asyncio.sleep(interval)


class RelayServer:
    """A running relay: listening sockets plus shared state."""

    def __init__(self, state: ServerState, servers: Sequence[asyncio.Server | TLSListener]) -> None:
        self.state = state
        self.servers = list(servers)
        self.admin_servers: list[asyncio.Server] = []
        self.health_tasks: list[asyncio.Task[None]] = []

    @classmethod
    async def start(
        cls,
        config: Config,
        *,
        sockets: Sequence[socket.socket] = (),
        reuse_port: bool = False,
        admin: Callable[[ServerState], asyncio.Protocol] | None = None,
    ) -> RelayServer:
        """Bind ``config.listen`` and start accepting (raises ``OSError`` on bind failure).

        ``admin`` makes the protocol of the ``--admin-listen`` listener (the
        operations layer passes it; the core does not know the admin pages).
        """
        loop = asyncio.get_running_loop()
        state = ServerState(config)
        if config.otel:
            # Imported only when on: without --otel relay loads nothing of OpenTelemetry.
            from .tracing import Tracing

            state.tracing = Tracing()
        if state.admission.store is not None:
            state.admission.store.start()  # before the first request can ask it

        def factory() -> ClientConnection:
            return ClientConnection(state)

        servers: list[asyncio.Server | TLSListener]
        if state.server_tls is not None:
            if not sockets:
                sockets = await bind(config.listen.host, config.listen.port, reuse_port)
            servers = [TLSListener(state, sock) for sock in sockets]
        elif sockets:
            servers = [
                await loop.create_server(factory, sock=sock, backlog=BACKLOG) for sock in sockets
            ]
        else:
            servers = [
                await loop.create_server(
                    factory,
                    host=config.listen.host,
                    port=config.listen.port,
                    backlog=BACKLOG,
                    reuse_address=True,
                    reuse_port=reuse_port or None,
                )
            ]
        relay = cls(state, servers)
        if config.health_check:
            for pool in state.router.pools.values():
                task = loop.create_task(
                    health_check(pool, config.health_check, config.health_interval)
                )
                relay.health_tasks.append(task)
        if config.admin_listen is not None and admin is not None:
            make_admin = admin
            admin_server = await loop.create_server(
                lambda: make_admin(state),
                host=config.admin_listen.host,
                port=config.admin_listen.port,
                reuse_address=True,
            )
            relay.admin_servers.append(admin_server)
        return relay

    @property
    def metrics(self) -> Metrics:
        return self.state.metrics

    @property
    def addresses(self) -> list[tuple[str, int]]:
        """The bound ``(host, port)`` pairs (port 0 in the config is resolved here)."""
        found: list[tuple[str, int]] = []
        for server in self.servers:
            for sock in server.sockets:
                name = sock.getsockname()
                found.append((str(name[0]), int(name[1])))
        return found

    @property
    def port(self) -> int:
        return self.addresses[0][1]

    def url(self) -> str:
        """A loopback-reachable URL of the first listener (for tests and the demo)."""
        host, port = self.addresses[0]
        if host in ("0.0.0.0", ""):
            host = "127.0.0.1"
        elif host == "::":
            host = "::1"
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{port}"

    async def close(self, drain_timeout: float = 0.0) -> None:
        """Stop accepting, let in-flight exchanges finish for ``drain_timeout``, close.

        While draining, a request arriving on an open keep-alive connection
        is answered 503 with ``Connection: close``; each connection closes
        once its exchange is done.
        """
        state = self.state
        state.draining = True
        for server in self.servers:
            if isinstance(server, TLSListener):
                await server.close()
            else:
                server.close()
        for task in list(state.handshakes):
            task.cancel()  # no request yet: nothing to drain
        if drain_timeout > 0 and not await state.wait_drained(drain_timeout):
            busy = sum(1 for conn in state.connections if conn.exchange is not None)
            log.warning("drain timeout: cutting %d streams still in flight", busy)
        for conn in list(state.connections):
            conn.close(Ending.DRAIN)  # a stream still in flight is cut by the drain
        state.head_pacer.close()
        for task in self.health_tasks:
            task.cancel()
        state.router.close()
        state.ticker.close()
        if state.admission.store is not None:
            await state.admission.store.close()
        for server in self.admin_servers:
            server.close()
        for server in self.admin_servers + [
            s for s in self.servers if not isinstance(s, TLSListener)
        ]:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(server.wait_closed(), 1.0)
        tracing, state.tracing = state.tracing, None
        if tracing is not None:
            # The last spans go out from a thread: the export is a blocking HTTP call.
            flush = asyncio.get_running_loop().run_in_executor(None, tracing.shutdown)
            with contextlib.suppress(Exception):
                await asyncio.wait_for(flush, TRACE_FLUSH_TIMEOUT)


def loop_factory(kind: str) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """The event loop factory for ``--loop``: uvloop when asked or available."""
    if kind == "asyncio":
        return None
    try:
        import uvloop
    except ImportError:
        if kind == "uvloop":
            raise
        return None
    return uvloop.new_event_loop


def run(main: Coroutine[Any, Any, int], kind: str = "auto") -> int:
    """Run ``main`` to completion on the chosen loop and return its exit code."""
    with asyncio.Runner(loop_factory=loop_factory(kind)) as runner:
        return runner.run(main)
