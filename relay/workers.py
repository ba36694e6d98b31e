"""``--workers N``: N processes accepting on one inherited listening socket.

The parent binds the socket (or takes the one systemd passed), forks the
workers, forwards SIGTERM/SIGINT/SIGHUP to them, restarts a worker that dies
while the service is up, and exits when they have all stopped. It runs no
event loop; it only waits for children.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import time
from collections.abc import Callable

__all__ = ["run_workers"]

log = logging.getLogger("relay.error")

#: A worker that dies right after it started is restarted no faster than this.
RESTART_BACKOFF = 1.0


def run_workers(count: int, sockets: list[socket.socket], serve: Callable[[], int]) -> int:
    """Fork ``count`` workers that run ``serve()`` on ``sockets``; supervise them."""
    children: dict[int, float] = {}
    stopping = False

    def spawn() -> None:
        pid = os.fork()
        if pid == 0:
            for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                signal.signal(signum, signal.SIG_DFL)
            code = 1
            try:
                code = serve()
            finally:
                os._exit(code)
        children[pid] = time.monotonic()

    def forward(signum: int, _frame: object) -> None:
        nonlocal stopping
        if signum in (signal.SIGTERM, signal.SIGINT):
            stopping = True
        for pid in list(children):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)

    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, forward)
    for _ in range(count):
        spawn()
    log.info("started %d workers: %s", count, ", ".join(map(str, children)))
    worst = 0
    while children:
        try:
            pid, status = os.wait()
        except ChildProcessError:
            break
        started = children.pop(pid, None)
        if started is None:
            continue
        code = os.waitstatus_to_exitcode(status)
        if stopping:
            worst = max(worst, code if code > 0 else 0)
            continue
        log.error("worker %d exited (%d); restarting it", pid, code)
        if time.monotonic() - started < RESTART_BACKOFF:
            time.sleep(RESTART_BACKOFF)
        if not stopping:
            spawn()
    for sock in sockets:
        sock.close()
    return worst
