"""Listeners, the event loop, signals and graceful drain.

:class:`RelayServer` is what tests, the demo and the CLI start: it binds the
listening sockets, owns the upstream pool and the set of client connections,
and shuts down in order: stop accepting, let in-flight exchanges finish (up
to a deadline), close the rest.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import time
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

from . import systemd
from .admin import AdminConnection, StateSource
from .auth import KeyRing, parse_key_file
from .config import Config, ConfigError, ListenAddress
from .downstream import ClientConnection
from .metrics import Metrics
from .tls import TLSError, describe_handshake_failure, server_context, upstream_context
from .upstream import Balancer, Router, UpstreamPool

__all__ = ["RelayServer", "ServerState", "load_keys", "preflight", "run", "serve"]

log = logging.getLogger("relay.error")

#: Listen backlog: bursts of new streams must queue in the kernel, not fail.
BACKLOG = 2048
#: TLS listener: connections taken per wakeup, and the pause after accept fails (EMFILE).
ACCEPT_BATCH = 64
ACCEPT_BACKOFF = 1.0


def load_keys(config: Config) -> list[str]:
    """The proxy API keys: the key file's plus any given directly (environment)."""
    keys = list(config.api_keys)
    if config.api_key_file:
        try:
            with open(config.api_key_file, encoding="utf-8") as file:
                keys += parse_key_file(file.read())
        except OSError as exc:
            reason = f"cannot read {config.api_key_file}: {exc.strerror}"
            raise ConfigError("--api-key-file", reason) from None
        if not keys:
            raise ConfigError("--api-key-file", "holds no keys")
    return keys


def preflight(config: Config) -> None:
    """Load every file the config names, and try the admin port, so that a bad
    one fails at start with its flag."""
    ServerState(config)
    if config.admin_listen is not None:
        _try_bind(config.admin_listen.host, config.admin_listen.port, "--admin-listen", config)


def _try_bind(host: str | None, port: int, flag: str, config: Config) -> None:
    # Bind (and close) a socket as create_server will, so a busy port is
    # reported against the flag that names it rather than --listen.
    if port == 0:
        return
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except OSError as exc:
        raise ConfigError(flag, f"cannot resolve {host}: {exc.strerror or exc}") from None
    for family, kind, proto, _, address in infos:
        with socket.socket(family, kind, proto) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if config.workers > 1 and hasattr(socket, "SO_REUSEPORT"):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                sock.bind(address)
            except OSError as exc:
                where = ListenAddress(address[0], port)
                raise ConfigError(flag, f"cannot listen on {where}: {exc.strerror}") from None


class ServerState:
    """What every connection of one server shares."""

    def __init__(self, config: Config) -> None:
        """Build the shared state; raises ``TLSError`` or ``ConfigError`` on bad files."""
        self.config = config
        self.metrics = Metrics()
        self.server_tls = (
            server_context(config.tls_cert, config.tls_key, config.tls_client_ca)
            if config.tls_cert
            else None
        )
        upstream_tls = None
        if any(address.scheme == "https" for address in config.all_upstreams):
            upstream_tls = upstream_context(
                config.upstream_ca,
                config.upstream_cert,
                config.upstream_key,
                verify=config.upstream_tls_verify,
            )
        self.keys = KeyRing(load_keys(config))
        pools = {
            address: UpstreamPool(
                address,
                connect_timeout=config.upstream_connect_timeout,
                keepalive_timeout=config.upstream_keepalive_timeout,
                max_idle=config.upstream_keepalive,
                metrics=self.metrics,
                ssl_context=upstream_tls,
            )
            for address in config.all_upstreams
        }
        self.router = Router(
            pools,
            config.upstreams,
            config.routes,
            balancer=Balancer(config.balance),
            strict=config.strict_models,
        )
        self.connections: set[ClientConnection] = set()
        # TLS connections accepted whose handshake is not done yet: they hold
        # a socket too, so they count against --max-connections.
        self.handshakes: set[asyncio.Task[None]] = set()
        self.draining = False
        self._drain_waiter: asyncio.Future[None] | None = None

    @property
    def pool(self) -> UpstreamPool:
        """The first upstream's pool (the only one in a single-upstream setup)."""
        return self.router.default[0]

    def gauges(self) -> dict[str, list[tuple[str, float]]]:
        """Point-in-time values for /metrics: name → [(labels, value)]."""
        now = time.monotonic()
        pools = self.router.pools.values()

        def per_pool(value: Callable[[UpstreamPool], float]) -> list[tuple[str, float]]:
            return [(f'upstream="{pool.address}"', float(value(pool))) for pool in pools]

        return {
            "relay_client_connections": [("", float(len(self.connections)))],
            "relay_tls_handshakes": [("", float(len(self.handshakes)))],
            "relay_draining": [("", 1.0 if self.draining else 0.0)],
            "relay_upstream_pool_idle": per_pool(lambda p: p.idle_count),
            "relay_upstream_pool_active": per_pool(lambda p: p.active),
            "relay_upstream_outstanding": per_pool(lambda p: p.outstanding),
            "relay_upstream_available": per_pool(lambda p: p.available(now)),
        }

    def busy(self) -> bool:
        return any(conn.exchange is not None for conn in self.connections)

    def reload(self) -> None:
        """SIGHUP: reload the certificate and the key file; keep serving on failure.

        Everything is loaded first and swapped in only if all of it loaded: a
        rotation caught half-way (new certificate, old key) changes nothing.
        New TLS handshakes get the new context; open connections keep theirs.
        """
        config = self.config
        try:
            tls = (
                server_context(config.tls_cert, config.tls_key, config.tls_client_ca)
                if self.server_tls is not None and config.tls_cert
                else None
            )
            keys = load_keys(config)
        except (TLSError, ConfigError) as exc:
            log.error("reload failed, keeping the previous files: %s", exc)
            return
        if tls is not None:
            self.server_tls = tls
        self.keys.replace(keys)
        done = ["the TLS certificate"] if tls is not None else []
        if config.api_key_file or keys:
            done.append(f"{len(keys)} API key" + ("" if len(keys) == 1 else "s"))
        log.info("reloaded %s", " and ".join(done) if done else "(nothing to reload)")

    def over_limit(self) -> str | None:
        """Why a new connection must be refused now, or None."""
        if self.draining:
            return "relay is shutting down"
        if len(self.connections) + len(self.handshakes) >= self.config.max_connections:
            return "too many connections"
        return None

    def exchange_settled(self) -> None:
        """A connection finished an exchange or closed: maybe the drain is over."""
        waiter = self._drain_waiter
        if waiter is not None and not waiter.done() and not self.busy():
            waiter.set_result(None)

    async def wait_drained(self, limit: float) -> bool:
        """Wait (bounded) until no exchange is in flight; true if none is."""
        if not self.busy():
            return True
        self._drain_waiter = asyncio.get_running_loop().create_future()
        try:
            async with asyncio.timeout(limit):
                await self._drain_waiter
        except TimeoutError:
            return False
        finally:
            self._drain_waiter = None
        return True


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
                reader, writer = await asyncio.open_connection(
                    pool.address.host,
                    pool.address.port,
                    ssl=pool.ssl_context,
                    server_hostname=pool.address.host if pool.ssl_context else None,
                )
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
    ) -> RelayServer:
        """Bind ``config.listen`` and start accepting (raises ``OSError`` on bind failure)."""
        loop = asyncio.get_running_loop()
        state = ServerState(config)

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
        if config.admin_listen is not None:
            admin = await loop.create_server(
                lambda: AdminConnection(StateSource(state)),
                host=config.admin_listen.host,
                port=config.admin_listen.port,
                reuse_address=True,
            )
            relay.admin_servers.append(admin)
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
            conn.close()
        for task in self.health_tasks:
            task.cancel()
        state.router.close()
        for server in self.admin_servers:
            server.close()
        for server in self.admin_servers + [
            s for s in self.servers if not isinstance(s, TLSListener)
        ]:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(server.wait_closed(), 1.0)


def _describe_loop() -> str:
    loop = asyncio.get_running_loop()
    return "uvloop" if type(loop).__module__.startswith("uvloop") else "asyncio"


async def serve(
    config: Config,
    *,
    sockets: Sequence[socket.socket] = (),
    reuse_port: bool = False,
    control: socket.socket | None = None,
) -> int:
    """Run until SIGTERM/SIGINT, then drain; a second signal exits at once.

    ``control`` makes this process a worker of ``--workers N``: it reports
    to its parent over that socket (ready, metrics, pings) instead of to the
    service manager, and drains when the parent says so or goes away.
    """
    activated = list(sockets) or systemd.listen_sockets()
    try:
        server = await RelayServer.start(config, sockets=activated, reuse_port=reuse_port)
    except (TLSError, ConfigError) as exc:
        log.error("%s", exc)
        return 2
    except OSError as exc:
        log.error("cannot listen on %s: %s", config.listen, exc.strerror or exc)
        return 1
    listening = ", ".join(f"[{h}]:{p}" if ":" in h else f"{h}:{p}" for h, p in server.addresses)
    if config.upstream.scheme == "https" and not config.upstream_tls_verify:
        log.warning("upstream TLS certificates are NOT verified (--upstream-insecure-skip-verify)")
    log.info(
        "relay listening on %s, forwarding to %s (%s)",
        listening,
        config.upstream,
        _describe_loop(),
    )
    loop = asyncio.get_running_loop()
    stop = loop.create_future()
    signals = 0

    def drain(why: str) -> None:
        if not stop.done():
            log.info("%s: draining (up to %g s)", why, config.drain_timeout)
            stop.set_result(None)

    def on_signal(signum: int) -> None:
        nonlocal signals
        signals += 1
        if signals == 1:
            drain(signal.Signals(signum).name)
        else:
            log.warning("second signal: exiting now")
            os._exit(0)

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal, signum)
    loop.add_signal_handler(signal.SIGHUP, server.state.reload)
    watchdog: list[asyncio.TimerHandle] = []
    channel: asyncio.Task[None] | None = None
    if control is not None:
        from .workers import worker_channel

        channel = loop.create_task(worker_channel(control, server.state, drain))
    else:
        interval = systemd.watchdog_interval()
        if interval:
            watchdog.append(loop.call_later(interval, _watchdog, loop, interval, watchdog))
        systemd.notify(f"READY=1\nSTATUS=listening on {listening}")
    try:
        await stop
        if control is None:
            systemd.notify("STOPPING=1")
        await server.close(config.drain_timeout)
    finally:
        for handle in watchdog:
            handle.cancel()
        if channel is not None:
            channel.cancel()
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(signum)
    return 0


def _watchdog(
    loop: asyncio.AbstractEventLoop, interval: float, handles: list[asyncio.TimerHandle]
) -> None:
    # Pinged from the event loop itself: a stuck loop stops the pings.
    systemd.notify("WATCHDOG=1")
    handles[:] = [loop.call_later(interval, _watchdog, loop, interval, handles)]


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
