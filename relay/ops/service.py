"""The service loop: start a relay, serve until told to stop, drain, exit.

Signals (SIGTERM/SIGINT drain, a second one exits, SIGHUP reloads), systemd
(READY, STOPPING, WATCHDOG from the event loop itself), the admin listener,
and, for a worker of ``--workers N``, the channel to its parent.
"""

from __future__ import annotations

import asyncio
import importlib.util
import ipaddress
import logging
import os
import signal
import socket
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

from ..config import Config, ConfigError, ListenAddress
from ..core.server import RelayServer
from ..core.state import ServerState
from ..core.tls import TLSError
from ..http.auth import NamedKey
from ..http.limits import KeyLimits
from . import systemd
from .admin import AdminConnection, StateSource
from .process import freeze_startup, raise_nofile_limit

__all__ = ["ParentChannel", "describe_start", "open_to_anyone", "preflight", "serve"]

#: A worker's link to its parent: given the state and a ``drain(reason)``
#: callback, it runs for the worker's life (reports, pings, drain orders).
ParentChannel = Callable[[ServerState, Callable[[str], None]], Coroutine[Any, Any, None]]

log = logging.getLogger("relay.events")


def admin_protocol(state: ServerState) -> asyncio.Protocol:
    """The admin listener's protocol for one connection."""
    return AdminConnection(StateSource(state))


def preflight(config: Config, *, bind: bool = True) -> None:
    """Load every file the config names (keys, TLS, upstream TLS), and with ``bind``
    try the admin port, so that a bad one fails at start with its flag.

    ``relay --check`` and ``--print-config`` run it without ``bind``."""
    ServerState(config)
    if config.otel and (missing := _missing_otel()) is not None:
        raise ConfigError("--otel", f"needs {missing}: pip install 'relay[otel]'")
    if config.limits_store is not None:
        from ..core.limitstore import check_store

        check_store(config)
    if bind and config.admin_listen is not None:
        _try_bind(config.admin_listen.host, config.admin_listen.port, "--admin-listen", config)


def _missing_otel() -> str | None:
    """The OpenTelemetry package ``--otel`` needs and is not installed, or None."""
    for module in ("opentelemetry.sdk", "opentelemetry.exporter.otlp.proto.http"):
        try:
            if importlib.util.find_spec(module) is None:
                return module
        except ModuleNotFoundError:  # its parent package is missing
            return module
    return None


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


def _address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _size(value: int) -> str:
    for unit, scale in (("g", 1 << 30), ("m", 1 << 20), ("k", 1 << 10)):
        if value >= scale and value % scale == 0:
            return f"{value // scale}{unit}"
    return str(value)


def _limits_in_force(config: Config, keys_with_limits: int) -> str:
    """The admission limits a client can meet, off ones left out."""
    parts = [
        f"max-connections {config.max_connections}",
        f"max-body-bytes {_size(config.max_body_bytes)}",
    ]
    if config.max_inflight:
        parts.append(
            f"max-inflight {config.max_inflight} per upstream "
            f"(queue {config.queue_size}, {config.queue_timeout:g}s)"
        )
    per_key = [
        f"{name} {value}"
        for name, value in (
            ("concurrent", config.key_max_concurrent),
            ("rpm", config.key_rpm),
            ("tpm", config.key_tpm),
        )
        if value
    ]
    if per_key:
        parts.append("per key " + " ".join(per_key))
    if keys_with_limits:
        parts.append(
            "1 key with its own limits"
            if keys_with_limits == 1
            else f"{keys_with_limits} keys with their own limits"
        )
    return ", ".join(parts)


def describe_start(
    config: Config,
    listening: Sequence[tuple[str, int]],
    admin: str | None,
    keys: Sequence[NamedKey],
    how: str,
) -> str:
    """The one start-up line: listeners, admin address, upstreams, keys, limits, and
    ``how`` it runs (the loop, the workers)."""
    tls = " (TLS)" if config.tls_cert else ""
    upstreams = ", ".join(str(u) for u in config.upstreams)
    if len(config.upstreams) > 1:
        upstreams += f" ({config.balance})"
    if config.routes:
        upstreams += f", {len(config.routes)} model routes"
    with_limits = sum(1 for k in keys if k.limits != KeyLimits())
    count = f"{len(keys)} API key{'s' if len(keys) != 1 else ''}" if keys else "no API keys"
    return (
        f"relay listening on {', '.join(_address(h, p) for h, p in listening)}{tls}, "
        f"admin {admin or 'off'}, forwarding to {upstreams}, {count}, "
        f"limits: {_limits_in_force(config, with_limits)} ({how})"
    )


def open_to_anyone(listening: Sequence[tuple[str, int]], keys: Sequence[NamedKey]) -> str | None:
    """The warning for a relay that serves beyond loopback without API keys, else None."""
    if keys:
        return None
    wide = []
    for host, port in listening:
        try:
            loopback = ipaddress.ip_address(host.split("%")[0]).is_loopback
        except ValueError:
            loopback = False
        if not loopback:
            wide.append(_address(host, port))
    if not wide:
        return None
    return (
        f"listening on {', '.join(wide)} with no API keys: anyone who can reach the port "
        "can use the GPU (--api-key-file)"
    )


def _describe_loop() -> str:
    loop = asyncio.get_running_loop()
    return "uvloop" if type(loop).__module__.startswith("uvloop") else "asyncio"


async def serve(
    config: Config,
    *,
    sockets: Sequence[socket.socket] = (),
    reuse_port: bool = False,
    parent: ParentChannel | None = None,
) -> int:
    """Run until SIGTERM/SIGINT, then drain; a second signal exits at once.

    ``parent`` makes this process a worker of ``--workers N``: it reports
    to its parent over that socket (ready, metrics, pings) instead of to the
    service manager, and drains when the parent says so or goes away.
    """
    raise_nofile_limit(config.max_connections)
    activated = list(sockets) or systemd.listen_sockets()
    try:
        server = await RelayServer.start(
            config, sockets=activated, reuse_port=reuse_port, admin=admin_protocol
        )
    except (TLSError, ConfigError) as exc:
        log.error("%s", exc)
        return 2
    except OSError as exc:
        log.error("cannot listen on %s: %s", config.listen, exc.strerror or exc)
        return 1
    listening = ", ".join(_address(h, p) for h, p in server.addresses)
    if config.limits_store is not None:
        log.info(
            "limits shared through %s (while it is away: %s)",
            config.limits_store,
            "this process's own limits" if config.limits_store_failure == "open" else "503",
        )
    if config.upstream.scheme == "https" and not config.upstream_tls_verify:
        log.warning("upstream TLS certificates are NOT verified (--upstream-insecure-skip-verify)")
    keys = server.state.keys.entries
    admin = ", ".join(
        _address(*sock.getsockname()[:2]) for a in server.admin_servers for sock in a.sockets
    )
    how = _describe_loop() if parent is None else f"{_describe_loop()}, worker {os.getpid()}"
    if parent is None and (warning := open_to_anyone(server.addresses, keys)):
        log.warning("%s", warning)
    log.info(
        "%s",
        describe_start(
            config, server.addresses, admin if parent is None else "in the parent", keys, how
        ),
    )
    freeze_startup()
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
    if parent is not None:
        channel = loop.create_task(parent(server.state, drain))
    else:
        interval = systemd.watchdog_interval()
        if interval:
            watchdog.append(loop.call_later(interval, _watchdog, loop, interval, watchdog))
        systemd.notify(f"READY=1\nSTATUS=listening on {listening}")
    try:
        await stop
        if parent is None:
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
