"""What every connection of one relay shares, below the modules that read it.

:class:`ServerState` holds the configuration, the metrics, the TLS contexts,
the API keys, the upstream pools and router, and the set of client
connections; the client connections, the exchanges, the server and the admin
listener all read it, and it imports none of them.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

from ..config import Config, ConfigError
from ..http.auth import KeyFileError, KeyRing, NamedKey, named, parse_named_keys
from ..http.rewrite import InspectBudget
from .admission import Admission
from .headpacer import HeadPacer
from .metrics import Metrics
from .ticker import Ticker, tick_interval
from .tls import TLSError, server_context, upstream_context
from .upstream import Balancer, Router, UpstreamPool

if TYPE_CHECKING:
    from .tracing import Tracing


class ClientSide(Protocol):
    """What the shared state needs of a client connection (``downstream`` has them)."""

    exchange: Any  # the exchange in flight, or None

    def close(self) -> None: ...


__all__ = ["ServerState", "load_keys"]

log = logging.getLogger("relay.events")


def load_keys(config: Config) -> list[NamedKey]:
    """The proxy API keys: the key file's plus any given directly (environment).

    Names must be unique across both; a bad file is a :class:`ConfigError`.
    """
    keys = named(config.api_keys)
    if config.api_key_file:
        try:
            with open(config.api_key_file, encoding="utf-8") as file:
                keys += parse_named_keys(file.read())
        except OSError as exc:
            reason = f"cannot read {config.api_key_file}: {exc.strerror}"
            raise ConfigError("--api-key-file", reason) from None
        except KeyFileError as exc:
            raise ConfigError("--api-key-file", f"{config.api_key_file}: {exc}") from None
        except UnicodeDecodeError:  # its text would quote the file's bytes
            raise ConfigError("--api-key-file", f"{config.api_key_file}: not UTF-8") from None
        if len({key.name for key in keys}) != len(keys):
            raise ConfigError("--api-key-file", "a key name is used twice; names must be unique")
        if not keys:
            raise ConfigError("--api-key-file", "holds no keys")
    return keys


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
        # One periodic check for every deadline of this server.
        self.ticker = Ticker(tick_interval(config), lag=self.metrics.loop_lag)
        # Request bodies held to read their model, all together.
        self.inspect_budget = InspectBudget(config.max_inspect_bytes)
        # Per-key limits, the --max-inflight queues, usage.
        self.admission = Admission(config, self.metrics, self.keys.entries)
        if config.limits_store is not None:
            # Imported only when asked for: the default install has no redis client.
            from .limitstore import LimitStore

            self.admission.store = LimitStore(config, self.metrics)
        pools = {
            address: UpstreamPool(
                address,
                connect_timeout=config.upstream_connect_timeout,
                keepalive_timeout=config.upstream_keepalive_timeout,
                max_idle=config.upstream_keepalive,
                metrics=self.metrics,
                ticker=self.ticker,
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
        self.connections: set[ClientSide] = set()
        # TLS connections accepted whose handshake is not done yet: they hold
        # a socket too, so they count against --max-connections.
        self.handshakes: set[asyncio.Task[None]] = set()
        self.draining = False
        # New requests' share of each loop turn; connections waiting for one.
        self.head_pacer = HeadPacer(settled=self.exchange_settled)
        # Set by the server when --otel is on (never by a preflight's state).
        self.tracing: Tracing | None = None
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
            **self.admission.gauges(),
        }

    def busy(self) -> bool:
        """Whether an exchange is in flight, or a request waits for its turn to start
        (while draining it is answered 503 then, rather than cut unanswered)."""
        return bool(self.head_pacer) or any(conn.exchange is not None for conn in self.connections)

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
        self.admission.set_keys(self.keys.entries)
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
            # Drained in the very turn the time ran out: the timeout cancelled
            # this task, not the waiter, which holds its result. Say what is.
            return not self.busy()
        finally:
            self._drain_waiter = None
        return True
