"""systemd integration without libsystemd: sd_notify and socket activation.

Both are small, stable protocols: ``NOTIFY_SOCKET`` names a datagram socket
that takes ``READY=1``, ``STOPPING=1``, ``WATCHDOG=1`` lines; ``LISTEN_PID``
and ``LISTEN_FDS`` hand over listening sockets starting at file descriptor 3.
"""

from __future__ import annotations

import os
import socket

__all__ = ["listen_sockets", "notify", "watchdog_interval"]

SD_LISTEN_FDS_START = 3


def notify(message: str) -> bool:
    """Send ``message`` to the service manager; false when not run under one."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]  # abstract namespace
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto(message.encode(), address)
    except OSError:
        return False
    return True


def watchdog_interval() -> float | None:
    """Seconds between WATCHDOG=1 pings (half of WatchdogSec), or None if unset."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    try:
        return int(usec) / 2e6
    except ValueError:
        return None


def listen_sockets() -> list[socket.socket]:
    """Listening sockets passed by systemd (socket activation), if they are ours."""
    if os.environ.get("LISTEN_PID") != str(os.getpid()):
        return []
    try:
        count = int(os.environ.get("LISTEN_FDS", "0"))
    except ValueError:
        return []
    sockets = []
    for fd in range(SD_LISTEN_FDS_START, SD_LISTEN_FDS_START + count):
        os.set_inheritable(fd, False)
        sockets.append(socket.socket(fileno=fd))
    for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(name, None)  # not for our children
    return sockets
