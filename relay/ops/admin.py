"""The admin listener: ``/metrics``, ``/health`` and ``/ready``, never on the proxy port.

It lives on its own address (``--admin-listen``) because SGLang has its own
``/health`` and ``/metrics`` that must pass through the proxy port untouched.
It is not behind the proxy's API keys. Each request is answered and the
connection closed: scrapers and probes do not need keep-alive.

What it reports comes from an :class:`AdminSource`: one process's state, or
with ``--workers N`` the parent, which asks every worker and answers for the
whole relay.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import TYPE_CHECKING, Protocol, cast

import h11

if TYPE_CHECKING:
    from ..core.state import ServerState

__all__ = ["AdminConnection", "AdminSource", "StateSource", "check_ready"]


class AdminSource(Protocol):
    """What the admin endpoints report."""

    async def metrics_text(self) -> str:
        """The Prometheus text for ``/metrics``."""
        ...

    async def ready(self) -> tuple[bool, str]:
        """``/ready``: whether to send traffic here, and why."""
        ...


class StateSource:
    """One process's :class:`ServerState`."""

    def __init__(self, state: ServerState) -> None:
        self.state = state

    async def metrics_text(self) -> str:
        return self.state.metrics.render(gauges=self.state.gauges)

    async def ready(self) -> tuple[bool, str]:
        return await check_ready(self.state)


async def check_ready(state: ServerState) -> tuple[bool, str]:
    """Not draining, and at least one upstream available and reachable."""
    if state.draining:
        return False, "draining"
    now = time.monotonic()
    pools = [pool for pool in state.router.pools.values() if pool.available(now)]
    for pool in pools:
        if pool.idle_count or pool.active:
            return True, f"upstream {pool.address} connected"
    for pool in pools:
        address = pool.address
        try:
            async with asyncio.timeout(READY_CONNECT_TIMEOUT):
                _, writer = await asyncio.open_connection(address.host, address.port)
        except (OSError, TimeoutError):
            continue
        writer.close()
        return True, f"upstream {address} reachable"
    return False, "no upstream available" if not pools else "no upstream reachable"


MAX_HEAD = 16 * 1024
READY_CONNECT_TIMEOUT = 1.0


class AdminConnection(asyncio.Protocol):
    def __init__(self, source: AdminSource) -> None:
        self.source = source
        self.h11 = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD)
        self.task: asyncio.Task[None] | None = None
        self._head_only = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        # Bounded: a client that never finishes its head is dropped.
        self.timer = asyncio.get_running_loop().call_later(10, self.transport.close)

    def connection_lost(self, exc: Exception | None) -> None:
        self.timer.cancel()
        if self.task is not None:
            self.task.cancel()

    def data_received(self, data: bytes) -> None:
        if self.task is not None:
            return
        self.h11.receive_data(data)
        try:
            event = self.h11.next_event()
        except h11.RemoteProtocolError:
            self._send(400, b"text/plain", b"bad request\n")
            return
        if isinstance(event, h11.Request):
            self.task = asyncio.get_running_loop().create_task(self._answer(event))

    async def _answer(self, request: h11.Request) -> None:
        self._head_only = request.method == b"HEAD"
        path = request.target.split(b"?", 1)[0]
        if request.method not in (b"GET", b"HEAD"):
            self._send(405, b"text/plain", b"method not allowed\n")
        elif path == b"/metrics":
            body = await self.source.metrics_text()
            self._send(200, b"text/plain; version=0.0.4; charset=utf-8", body.encode())
        elif path == b"/health":
            self._send(200, b"application/json", b'{"status":"ok"}\n')
        elif path == b"/ready":
            ready, reason = await self.source.ready()
            document = {"ready": ready, "reason": reason}
            self._send(
                200 if ready else 503, b"application/json", json.dumps(document).encode() + b"\n"
            )
        else:
            self._send(404, b"text/plain", b"not found\n")

    def _send(self, status: int, content_type: bytes, body: bytes) -> None:
        reason = {
            200: b"OK",
            400: b"Bad Request",
            404: b"Not Found",
            405: b"Method Not Allowed",
            503: b"Service Unavailable",
        }.get(status, b"")
        head = (
            b"HTTP/1.1 %d %b\r\ncontent-type: %b\r\ncontent-length: %d\r\n"
            b"cache-control: no-store\r\nconnection: close\r\n\r\n"
            % (status, reason, content_type, len(body))
        )
        self.transport.write(head if self._head_only else head + body)
        self.transport.close()
