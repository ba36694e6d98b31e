"""Run a real relay in a background thread, on its own event loop, for e2e tests.

Tests talk to it over real sockets from the main thread (httpx, aiohttp,
the openai SDK, curl, raw sockets); anything that must touch the relay's
objects (metrics, connections) goes through :meth:`RelayThread.call`, which
runs on the relay's loop.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

from relay.config import Config, parse_listen, parse_upstream
from relay.core.server import RelayServer, loop_factory
from relay.ops.service import admin_protocol

T = TypeVar("T")

START_TIMEOUT = 10.0


class RelayThread:
    """A started relay; use as a context manager or call :meth:`stop`."""

    def __init__(
        self,
        upstream: str,
        *,
        loop_kind: str = "uvloop",
        listen: str = "127.0.0.1:0",
        **limits: Any,
    ) -> None:
        self.config = Config(
            listen=parse_listen(listen), upstream=parse_upstream(upstream), **limits
        )
        self.loop_kind = loop_kind
        self.loop: asyncio.AbstractEventLoop | None = None
        self.server: RelayServer | None = None
        self._ready = threading.Event()
        self._stopped: asyncio.Event | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="relay", daemon=True)

    def __enter__(self) -> RelayThread:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> RelayThread:
        self._thread.start()
        if not self._ready.wait(START_TIMEOUT):
            raise TimeoutError("relay did not start")
        if self._error is not None:
            raise self._error
        return self

    def _run(self) -> None:
        factory = loop_factory(self.loop_kind)
        with asyncio.Runner(loop_factory=factory) as runner:
            runner.run(self._main())

    async def _main(self) -> None:
        self.loop = asyncio.get_running_loop()
        self._stopped = asyncio.Event()
        try:
            self.server = await RelayServer.start(self.config, admin=admin_protocol)
        except BaseException as exc:  # reported to the starting thread
            self._error = exc
            self._ready.set()
            return
        self._ready.set()
        await self._stopped.wait()
        await self.server.close()

    @property
    def port(self) -> int:
        assert self.server is not None
        return self.server.port

    @property
    def url(self) -> str:
        assert self.server is not None
        return self.server.url()

    def call(self, fn: Callable[[], T], timeout: float = 5.0) -> T:
        """Run ``fn`` on the relay's loop and return its result."""
        assert self.loop is not None
        future: concurrent.futures.Future[T] = concurrent.futures.Future()

        def run() -> None:
            try:
                future.set_result(fn())
            except BaseException as exc:
                future.set_exception(exc)

        self.loop.call_soon_threadsafe(run)
        return future.result(timeout)

    def metrics(self) -> Any:
        """A snapshot copy of the relay's counters."""
        import copy

        assert self.server is not None
        server = self.server
        return self.call(lambda: copy.deepcopy(server.metrics))

    def stop(self) -> None:
        if self.loop is not None and self._stopped is not None and self._thread.is_alive():
            self.loop.call_soon_threadsafe(self._stopped.set)
        self._thread.join(START_TIMEOUT)
        if self._thread.is_alive():
            raise TimeoutError("relay did not stop")


def eventually(check: Callable[[], bool], limit: float = 10.0) -> None:
    """Wait (bounded by ``limit``) from a test thread until ``check()`` holds."""
    deadline = time.monotonic() + limit
    while not check():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.01)
