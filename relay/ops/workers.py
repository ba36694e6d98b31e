"""``--workers N``: a parent process and N workers accepting on one listening socket.

The parent binds the listening sockets (or takes the ones systemd passed) and
starts each worker as a fresh ``python -m relay`` process that inherits them
plus one end of a private socketpair, its *channel*. Workers are exec'd, not
bare forks: the parent runs an event loop, and a forked child would inherit
that loop, its signal wakeup fd and the other workers' channels.

The parent is the process the service manager sees (``NotifyAccess=main``):

- READY=1 once every worker said it listens; WATCHDOG=1 only while every
  ready worker answers a ping on its channel (a stuck worker loop stops the
  pings, as a stuck loop does with one process); STOPPING=1 when it drains.
- It owns the admin listener. ``/metrics`` asks every worker for its numbers
  and adds them up, so each scrape shows the whole relay; a worker's last
  numbers are kept when it exits, so counters never go down (what it counted
  after the last scrape is lost). ``/ready`` is 503 "draining" during a drain,
  otherwise ready when some worker is.
- SIGTERM/SIGINT: it closes its copy of the listening sockets (with the
  workers closing theirs, new connections are refused at once, as with one
  process) and tells each worker to drain over its channel, not with a
  signal: under systemd or a terminal the workers may get the signal itself
  too, and a second signal means "exit now". A second signal makes the
  workers exit at once. SIGHUP is passed on as "reload".
- Start-up is all or nothing: a worker that cannot be started, or that exits
  before it said it listens, or workers not all ready within
  ``START_TIMEOUT``, stop the relay with one error line and exit code 1, so
  that the service manager restarts it or reports it. (Retrying a worker
  that can never start would leave the port open to clients nobody serves.)
- A worker that dies once the service is up is restarted: at once if it ran
  for ``RESTART_BACKOFF``, otherwise after a delay that doubles with each
  restart in a row that never got ready, up to ``RESTART_BACKOFF_MAX``.

A worker leaves with its parent: ``PR_SET_PDEATHSIG`` sends it SIGTERM
(Linux), and on any platform its channel reaching end of file drains it.

The channel carries one JSON object per line. Worker to parent:
``{"event": "ready"}`` and answers ``{"id": N, "result": {...}}``. Parent to
worker: ``{"id": N, "op": "metrics" | "ready" | "ping"}`` (answered) and
``{"op": "reload" | "drain" | "exit"}``.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import dataclasses
import itertools
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Coroutine, Sequence
from typing import TYPE_CHECKING, Any

from ..config import Config, ConfigError
from ..core.metrics import Gauges, Metrics, merge_gauges
from ..core.server import run
from ..core.state import load_keys
from ..http.auth import NamedKey
from . import systemd
from .admin import AdminConnection, check_ready
from .service import describe_start, open_to_anyone, serve

if TYPE_CHECKING:
    from ..core.state import ServerState

__all__ = [
    "WorkerSpec",
    "restart_delay",
    "run_worker",
    "run_workers",
    "worker_channel",
    "worker_spec",
]

log = logging.getLogger("relay.events")

#: A worker that dies right after it started is restarted no faster than this.
RESTART_BACKOFF = 1.0
#: The longest wait before restarting a worker that keeps failing to get ready.
RESTART_BACKOFF_MAX = 30.0
#: Every worker must say it listens within this long after the relay started.
START_TIMEOUT = 60.0
#: How a worker is started; the relay's arguments follow.
WORKER_COMMAND = (sys.executable, "-m", "relay", "serve")
#: Longest channel message (a metrics snapshot grows with upstreams and statuses).
CHANNEL_LIMIT = 4 * 1024 * 1024
#: How long a worker's channel may take to close once relay closes it (seconds).
CHANNEL_CLOSE_TIMEOUT = 1.0
#: How long a scrape waits for a worker before using its last numbers.
SCRAPE_TIMEOUT = 2.0
#: After the drain deadline (or a second signal), workers get this long before SIGKILL.
KILL_GRACE = 5.0
#: Set in a worker's environment: "PARENT_PID:CHANNEL_FD:LISTEN_FD,LISTEN_FD...".
WORKER_ENV = "_RELAY_WORKER"
#: Variables for the parent only: workers must not talk to the service manager.
PARENT_ONLY_ENV = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "LISTEN_PID", "LISTEN_FDS")

PR_SET_PDEATHSIG = 1


# -- the worker's side ---------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class WorkerSpec:
    """What a worker inherits from its parent."""

    parent: int
    channel: int
    listen: tuple[int, ...]


def worker_spec() -> WorkerSpec | None:
    """This process's :class:`WorkerSpec` if it is a worker (read once, then removed)."""
    text = os.environ.pop(WORKER_ENV, None)
    if not text:
        return None
    parent, channel, listen = text.split(":")
    return WorkerSpec(int(parent), int(channel), tuple(int(fd) for fd in listen.split(",")))


def _die_with_parent() -> None:
    """Ask Linux for SIGTERM when the parent dies; elsewhere the channel's EOF does it."""
    if not sys.platform.startswith("linux"):
        return
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


def run_worker(config: Config, spec: WorkerSpec) -> int:
    """Serve as one worker until told to stop; the parent owns the admin listener."""
    _die_with_parent()
    if os.getppid() != spec.parent:
        return 1  # the parent died before PDEATHSIG was armed
    channel = socket.socket(fileno=spec.channel)
    sockets = [socket.socket(fileno=fd) for fd in spec.listen]
    own = dataclasses.replace(config, admin_listen=None)

    def parent(state: ServerState, drain: Callable[[str], None]) -> Coroutine[Any, Any, None]:
        return worker_channel(channel, state, drain)

    return run(serve(own, sockets=sockets, parent=parent), config.loop)


async def worker_channel(
    sock: socket.socket, state: ServerState, drain: Callable[[str], None]
) -> None:
    """Report ready, answer the parent, and drain when it says so or is gone."""
    reader, writer = await asyncio.open_connection(sock=sock, limit=CHANNEL_LIMIT)
    _send(writer, {"event": "ready"})
    try:
        while line := await reader.readline():
            message = json.loads(line)
            op = message.get("op")
            result: dict[str, Any]
            if op == "metrics":
                result = {"metrics": state.metrics.snapshot(), "gauges": state.gauges()}
            elif op == "ready":
                ready, reason = await check_ready(state)
                result = {"ready": ready, "reason": reason}
            elif op == "ping":
                result = {}
            elif op == "reload":
                state.reload()
                continue
            elif op == "drain":
                drain(f"{message.get('why', 'parent')} (from the parent)")
                continue
            elif op == "exit":
                log.warning("told to exit now")
                os._exit(0)
            else:
                continue
            _send(writer, {"id": message.get("id"), "result": result})
    except (OSError, ValueError):
        pass  # a broken channel is a gone parent
    finally:
        await _close_channel(writer)
    drain("parent process gone")


async def _close_channel(writer: asyncio.StreamWriter) -> None:
    """Close a channel and read how it closed (a reset when the other side was
    killed): left unread, asyncio logs "Future exception was never retrieved",
    with a traceback, when the stream is collected."""
    writer.close()
    with contextlib.suppress(Exception):
        async with asyncio.timeout(CHANNEL_CLOSE_TIMEOUT):
            await writer.wait_closed()


def _send(writer: asyncio.StreamWriter, message: dict[str, Any]) -> None:
    if not writer.is_closing():
        writer.write(json.dumps(message).encode() + b"\n")


# -- the parent's side ----------------------------------------------------------


class _Worker:
    """The parent's view of one worker process and its channel."""

    def __init__(self, process: subprocess.Popen[bytes]) -> None:
        self.process = process
        self.pid = process.pid
        self.started = time.monotonic()
        self.writer: asyncio.StreamWriter | None = None
        self.ready = False
        self.was_ready = False  # said it listens at least once
        self.open = True  # until its channel reaches EOF
        self.snapshot: dict[str, Any] | None = None  # its last /metrics answer
        self.waiting: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self.task: asyncio.Task[None] | None = None


class Supervisor:
    """The parent: starts and restarts workers, speaks for them to systemd and scrapers."""

    def __init__(
        self,
        config: Config,
        argv: Sequence[str],
        sockets: list[socket.socket],
        command: Sequence[str] = WORKER_COMMAND,
    ) -> None:
        self.config = config
        self.argv = list(argv)
        self.command = list(command)
        self.sockets = sockets
        self.processes: list[_Worker] = []  # not reaped yet
        self.channels: list[_Worker] = []  # channel still open: their numbers are live
        self.retired = Metrics()  # what exited workers had counted
        self.stopping = False
        self.announced = False
        self.signals = 0
        self.worst = 0
        self.failed_starts = 0  # restarts in a row whose worker never got ready
        self.start_failed = False
        self._ids = itertools.count()
        self._timers: list[asyncio.TimerHandle] = []
        self._done: asyncio.Event | None = None
        self.admin: asyncio.Server | None = None

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        self._done = asyncio.Event()
        admin: asyncio.Server | None = None
        if self.config.admin_listen is not None:
            address = self.config.admin_listen
            try:
                admin = await loop.create_server(
                    lambda: AdminConnection(self),
                    host=address.host,
                    port=address.port,
                    reuse_address=True,
                )
            except OSError as exc:
                log.error("cannot listen on %s (--admin-listen): %s", address, exc.strerror)
                return 1
            self.admin = admin
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self._on_signal, signum)
        loop.add_signal_handler(signal.SIGHUP, self._broadcast, {"op": "reload"})
        loop.add_signal_handler(signal.SIGCHLD, self._reap)
        watchdog: asyncio.Task[None] | None = None
        interval = systemd.watchdog_interval()
        if interval:
            watchdog = loop.create_task(self._watchdog(interval))
        try:
            for _ in range(self.config.workers):
                self._spawn()
            if not self.stopping:
                log.info(
                    "started %d workers: %s",
                    self.config.workers,
                    ", ".join(str(w.pid) for w in self.processes),
                )
                self._timers.append(loop.call_later(START_TIMEOUT, self._start_timeout))
            await self._done.wait()
        finally:
            for handle in self._timers:
                handle.cancel()
            if watchdog is not None:
                watchdog.cancel()
            for worker in self.channels:
                if worker.task is not None:
                    worker.task.cancel()
            for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD):
                loop.remove_signal_handler(signum)
            if admin is not None:
                admin.close()
            for sock in self.sockets:
                sock.close()
        return 1 if self.start_failed else self.worst

    # -- workers ---------------------------------------------------------------
    def _spawn(self) -> None:
        if self.stopping:
            return
        mine, theirs = socket.socketpair()
        listen = [sock.fileno() for sock in self.sockets]
        env = {k: v for k, v in os.environ.items() if k not in PARENT_ONLY_ENV}
        env[WORKER_ENV] = f"{os.getpid()}:{theirs.fileno()}:{','.join(map(str, listen))}"
        try:
            process = subprocess.Popen(
                [*self.command, *self.argv],
                env=env,
                pass_fds=[theirs.fileno(), *listen],
            )
        except OSError as exc:
            mine.close()
            if not self.announced:
                self._fail_start(f"cannot start a worker: {self.command[0]}: {exc.strerror or exc}")
                return
            self.failed_starts += 1
            delay = restart_delay(self.failed_starts)
            log.error("cannot start a worker: %s; retrying in %g s", exc.strerror or exc, delay)
            self._timers.append(asyncio.get_running_loop().call_later(delay, self._spawn))
            return
        finally:
            theirs.close()
        worker = _Worker(process)
        self.processes.append(worker)
        self.channels.append(worker)
        worker.task = asyncio.get_running_loop().create_task(self._listen(worker, mine))

    async def _listen(self, worker: _Worker, sock: socket.socket) -> None:
        """Read the worker's channel until EOF; then its last numbers become retired."""
        writer: asyncio.StreamWriter | None = None
        try:
            reader, writer = await asyncio.open_connection(sock=sock, limit=CHANNEL_LIMIT)
            worker.writer = writer
            if self.stopping:
                _send(writer, {"op": "drain", "why": "stopping"})
            while line := await reader.readline():
                message = json.loads(line)
                if message.get("event") == "ready":
                    worker.ready = worker.was_ready = True
                    self.failed_starts = 0
                    self._maybe_announce()
                    continue
                result = message.get("result")
                if isinstance(result, dict) and "metrics" in result:
                    worker.snapshot = result
                future = worker.waiting.pop(message.get("id"), None)
                if future is not None and not future.done():
                    future.set_result(result)
        except (OSError, ValueError):
            pass
        finally:
            worker.open = False
            worker.ready = False
            if worker in self.channels:
                self.channels.remove(worker)
            if worker.snapshot is not None:
                final = Metrics.from_snapshot(worker.snapshot["metrics"])
                final.active_exchanges = 0  # a gauge: gone with the worker
                self.retired.add(final)
            for future in worker.waiting.values():
                if not future.done():
                    future.set_exception(ConnectionError("worker gone"))
            if writer is not None:
                await _close_channel(writer)
            else:
                sock.close()

    def _reap(self) -> None:
        for worker in list(self.processes):
            code = worker.process.poll()
            if code is None or worker not in self.processes:
                continue  # running, or reaped already by a nested call (a failed start)
            self.processes.remove(worker)
            if self.stopping:
                self.worst = max(self.worst, code if code > 0 else 0)
            elif not self.announced:
                self._fail_start(f"worker {worker.pid} exited ({code}) before it was ready")
            else:
                if not worker.was_ready:
                    self.failed_starts += 1
                delay = restart_delay(self.failed_starts) - (time.monotonic() - worker.started)
                log.error(
                    "worker %d exited (%d); restarting it%s",
                    worker.pid,
                    code,
                    f" in {delay:.1f} s" if delay > 0 else "",
                )
                loop = asyncio.get_running_loop()
                if delay > 0:
                    self._timers.append(loop.call_later(delay, self._spawn))
                else:
                    self._spawn()
        if self.stopping and not self.processes and self._done is not None:
            self._done.set()

    def _fail_start(self, why: str) -> None:
        """Start-up failed: one error line, stop every worker, exit 1."""
        if self.stopping:
            return
        log.error("%s; relay cannot start its %d workers: exiting", why, self.config.workers)
        self.start_failed = True
        for worker in self.processes:
            if not worker.was_ready:  # nothing to drain: it never served
                with contextlib.suppress(ProcessLookupError):
                    worker.process.terminate()
        self._stop("start-up failed")

    def _start_timeout(self) -> None:
        if not self.announced:
            ready = sum(w.ready for w in self.channels)
            wanted = self.config.workers
            self._fail_start(f"{ready} of {wanted} workers ready after {START_TIMEOUT:g} s")

    def _stop(self, why: str) -> None:
        """Refuse new connections, tell every worker to drain, and kill any left at the deadline."""
        self.stopping = True
        for handle in self._timers:
            handle.cancel()  # no restarts now
        for sock in self.sockets:
            sock.close()  # with the workers' copies closed, new connections are refused
        self._broadcast({"op": "drain", "why": why})
        deadline = self.config.drain_timeout + KILL_GRACE
        self._timers.append(asyncio.get_running_loop().call_later(deadline, self._kill))
        self._reap()

    def _maybe_announce(self) -> None:
        if self.announced or self.stopping:
            return
        ready = [w for w in self.channels if w.ready]
        if len(ready) < self.config.workers:
            return
        self.announced = True
        listening = ", ".join(_name(sock) for sock in self.sockets)
        log.info("all %d workers ready", len(ready))
        addresses = [(str(h), int(p)) for h, p in (s.getsockname()[:2] for s in self.sockets)]
        admin = ", ".join(_name(sock) for sock in self.admin.sockets) if self.admin else None
        how = f"{len(ready)} workers"
        try:
            keys: list[NamedKey] = load_keys(self.config)
        except ConfigError as exc:  # changed since the start-up checks; the workers read theirs
            log.warning("cannot count the API keys for the start-up line: %s", exc)
        else:
            if warning := open_to_anyone(addresses, keys):
                log.warning("%s", warning)
            log.info("%s", describe_start(self.config, addresses, admin, keys, how))
        systemd.notify(f"READY=1\nSTATUS=listening on {listening} with {len(ready)} workers")

    def _broadcast(self, message: dict[str, Any]) -> None:
        for worker in self.channels:
            if worker.writer is not None:
                _send(worker.writer, message)

    def _on_signal(self, signum: int) -> None:
        self.signals += 1
        name = signal.Signals(signum).name
        loop = asyncio.get_running_loop()
        if self.signals == 1:
            log.info("%s: draining %d workers", name, len(self.processes))
            systemd.notify("STOPPING=1")
            self._stop(name)
        else:
            log.warning("second signal: workers exit now")
            self._broadcast({"op": "exit"})
            self._timers.append(loop.call_later(KILL_GRACE, self._kill))

    def _kill(self) -> None:
        for worker in self.processes:
            log.warning("worker %d did not exit in time: killing it", worker.pid)
            with contextlib.suppress(ProcessLookupError):
                worker.process.kill()

    async def _ask(self, worker: _Worker, op: str, timeout: float) -> dict[str, Any] | None:
        """Send ``op`` and wait (bounded) for the answer; None if none came."""
        if worker.writer is None or not worker.open:
            return None
        ident = next(self._ids)
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        worker.waiting[ident] = future
        _send(worker.writer, {"id": ident, "op": op})
        try:
            async with asyncio.timeout(timeout):
                return await future
        except TimeoutError:
            # The answer came in the turn the time ran out: the timeout then
            # cancelled this task, not the future, which holds the answer.
            if future.done() and not future.cancelled() and future.exception() is None:
                return future.result()
            return None
        except ConnectionError:
            return None
        finally:
            worker.waiting.pop(ident, None)

    async def _watchdog(self, interval: float) -> None:
        """WATCHDOG=1 every ``interval``, once READY=1 went out, while every ready worker
        answers a ping (a worker restarting is not waited for; none at all stops them)."""
        loop = asyncio.get_running_loop()
        while True:
            started = loop.time()
            live = [w for w in self.channels if w.ready]
            answers = await asyncio.gather(*(self._ask(w, "ping", interval / 2) for w in live))
            silent = [w.pid for w, answer in zip(live, answers, strict=True) if answer is None]
            if self.announced and live and not silent:
                systemd.notify("WATCHDOG=1")
            elif silent:
                log.warning("workers %s did not answer: withholding the watchdog ping", silent)
            await asyncio.sleep(max(0.0, interval - (loop.time() - started)))

    # -- AdminSource -------------------------------------------------------------
    async def metrics_text(self) -> str:
        """The whole relay: retired counts plus every live worker's latest answer."""
        live = [w for w in self.channels if w.ready]
        await asyncio.gather(*(self._ask(w, "metrics", SCRAPE_TIMEOUT) for w in live))
        total = Metrics()
        total.add(self.retired)
        parts: list[Gauges] = []
        for worker in self.channels:  # as they are now: exits during the gather are retired
            if worker.snapshot is not None:
                total.add(Metrics.from_snapshot(worker.snapshot["metrics"]))
                parts.append(worker.snapshot["gauges"])
        gauges = merge_gauges(parts)
        gauges["relay_workers"] = [("", float(sum(w.ready for w in self.channels)))]
        if self.stopping:
            gauges["relay_draining"] = [("", 1.0)]
        return total.render(gauges=lambda: gauges)

    async def ready(self) -> tuple[bool, str]:
        if self.stopping:
            return False, "draining"
        live = [w for w in self.channels if w.ready]
        answers = await asyncio.gather(*(self._ask(w, "ready", SCRAPE_TIMEOUT) for w in live))
        for answer in answers:
            if answer is not None and answer.get("ready"):
                return True, str(answer.get("reason"))
        reasons = [str(a.get("reason")) for a in answers if a is not None]
        return False, reasons[0] if reasons else "no worker ready"


def _name(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"


def restart_delay(failed_starts: int) -> float:
    """How long after its start a worker is restarted, after ``failed_starts`` restarts in
    a row that never got ready: ``RESTART_BACKOFF``, doubling, at most ``RESTART_BACKOFF_MAX``."""
    return min(RESTART_BACKOFF * 2 ** min(failed_starts, 16), RESTART_BACKOFF_MAX)


def run_workers(
    config: Config,
    argv: Sequence[str],
    sockets: list[socket.socket],
    command: Sequence[str] = WORKER_COMMAND,
) -> int:
    """Run the parent of ``config.workers`` workers on ``sockets``; its exit code
    (1 if the workers could not all be started)."""
    with asyncio.Runner() as runner:
        return runner.run(Supervisor(config, argv, sockets, command).run())
