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
import signal
import sys
from collections.abc import Callable, Coroutine
from typing import Any

from .auth import KeyRing, parse_key_file
from .config import Config, ConfigError
from .downstream import ClientConnection
from .metrics import Metrics
from .tls import TLSError, reload_server_context, server_context, upstream_context
from .upstream import UpstreamPool

__all__ = ["RelayServer", "ServerState", "load_keys", "preflight", "run", "serve"]

log = logging.getLogger("relay.error")

#: Listen backlog: bursts of new streams must queue in the kernel, not fail.
BACKLOG = 2048


def load_keys(config: Config) -> list[str]:
    """The proxy API keys: the key file's plus any given directly (environment)."""
    keys = list(config.api_keys)
    if config.api_key_file:
        try:
            with open(config.api_key_file, encoding="utf-8") as file:
                keys += parse_key_file(file.read())
        except OSError as exc:
            raise ConfigError("--api-key-file", f"cannot read: {exc.strerror}") from None
        if not keys:
            raise ConfigError("--api-key-file", "holds no keys")
    return keys


def preflight(config: Config) -> None:
    """Load every file the config names, so a bad one fails at start with its flag."""
    ServerState(config)


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
        if config.upstream.scheme == "https":
            upstream_tls = upstream_context(
                config.upstream_ca,
                config.upstream_cert,
                config.upstream_key,
                verify=config.upstream_tls_verify,
            )
        self.keys = KeyRing(load_keys(config))
        self.pool = UpstreamPool(
            config.upstream,
            connect_timeout=config.upstream_connect_timeout,
            keepalive_timeout=config.upstream_keepalive_timeout,
            max_idle=config.upstream_keepalive,
            metrics=self.metrics,
            ssl_context=upstream_tls,
        )
        self.connections: set[ClientConnection] = set()
        self.draining = False
        self._idle_waiter: asyncio.Future[None] | None = None

    def reload(self) -> None:
        """SIGHUP: reload the certificate and the key file; keep serving on failure."""
        config = self.config
        try:
            if self.server_tls is not None and config.tls_cert:
                reload_server_context(self.server_tls, config.tls_cert, config.tls_key)
            self.keys.replace(load_keys(config))
        except (TLSError, ConfigError) as exc:
            log.error("reload failed, keeping the previous files: %s", exc)
            return
        log.info("reloaded certificates and keys (%d API keys)", len(self.keys))

    def connection_closed(self, conn: ClientConnection) -> None:
        waiter = self._idle_waiter
        if not self.connections and waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def wait_all_closed(self, limit: float) -> bool:
        """Wait (bounded) until no client connection is left; true if none is."""
        if not self.connections:
            return True
        self._idle_waiter = asyncio.get_running_loop().create_future()
        try:
            async with asyncio.timeout(limit):
                await self._idle_waiter
        except TimeoutError:
            return False
        finally:
            self._idle_waiter = None
        return True


class RelayServer:
    """A running relay: listening sockets plus shared state."""

    def __init__(self, state: ServerState, servers: list[asyncio.Server]) -> None:
        self.state = state
        self.servers = servers

    @classmethod
    async def start(cls, config: Config) -> RelayServer:
        """Bind ``config.listen`` and start accepting (raises ``OSError`` on bind failure)."""
        loop = asyncio.get_running_loop()
        state = ServerState(config)

        def factory() -> ClientConnection:
            return ClientConnection(state)

        server = await loop.create_server(
            factory,
            host=config.listen.host,
            port=config.listen.port,
            backlog=BACKLOG,
            reuse_address=True,
            ssl=state.server_tls,
            ssl_handshake_timeout=config.client_head_timeout if state.server_tls else None,
        )
        return cls(state, [server])

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
        """Stop accepting, let in-flight exchanges finish for ``drain_timeout``, close."""
        state = self.state
        state.draining = True
        for server in self.servers:
            server.close()
        for conn in list(state.connections):
            if conn.exchange is None:
                conn.close()  # idle keep-alive or mid-head: nothing in flight
        if drain_timeout > 0 and not await state.wait_all_closed(drain_timeout):
            log.warning("drain timeout: closing %d connections", len(state.connections))
        for conn in list(state.connections):
            conn.close()
        state.pool.close()
        for server in self.servers:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(server.wait_closed(), 1.0)


def _describe_loop() -> str:
    loop = asyncio.get_running_loop()
    return "uvloop" if type(loop).__module__.startswith("uvloop") else "asyncio"


async def serve(config: Config, *, drain_timeout: float = 30.0) -> int:
    """Run until SIGTERM/SIGINT, then drain; a second signal exits at once."""
    try:
        server = await RelayServer.start(config)
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

    def on_signal(signum: int) -> None:
        nonlocal signals
        signals += 1
        if signals == 1:
            log.info("%s: draining (up to %.0f s)", signal.Signals(signum).name, drain_timeout)
            if not stop.done():
                stop.set_result(None)
        else:
            log.warning("second signal: exiting now")
            sys.exit(0)

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal, signum)
    loop.add_signal_handler(signal.SIGHUP, server.state.reload)
    try:
        await stop
        await server.close(drain_timeout)
    finally:
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(signum)
    return 0


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
