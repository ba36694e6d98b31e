"""A real redis-server for tests: a free loopback port, its own directory, no persistence.

It can be killed and started again on the same port (a store that restarts
and has lost its data), and given a password.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import ssl
import struct
import subprocess
import threading
import time
from pathlib import Path

import pytest

START_TIMEOUT = 10.0
REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def need_redis_server() -> None:
    """Skip (one clear line) where redis-server is not installed."""
    if not Path(REDIS_SERVER).exists():
        pytest.skip("redis-server is not installed (apt-get install redis-server)")


class RedisServer:
    """redis-server on 127.0.0.1:``port`` in ``directory``; :meth:`kill` and :meth:`start`."""

    def __init__(
        self, directory: Path, *, password: str | None = None, tls: Path | None = None
    ) -> None:
        self.directory = directory
        self.password = password
        self.tls = tls  # a folder with ca.pem, cert.pem, key.pem: TLS only
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"{'rediss' if self.tls else 'redis'}://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        tls = self.tls
        ports = ["--port", str(self.port)]
        if tls is not None:
            ports = [
                "--port", "0", "--tls-port", str(self.port),
                "--tls-cert-file", str(tls / "cert.pem"), "--tls-key-file", str(tls / "key.pem"),
                "--tls-ca-cert-file", str(tls / "ca.pem"), "--tls-auth-clients", "no",
            ]  # fmt: skip
        args = [
            REDIS_SERVER,
            *ports,
            "--bind", "127.0.0.1",
            "--dir", str(self.directory),
            "--save", "",
            "--appendonly", "no",
            "--daemonize", "no",
            "--loglevel", "warning",
        ]  # fmt: skip
        if self.password is not None:
            args += ["--requirepass", self.password]
        self.process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1.0) as raw:
                    sock = raw
                    if tls is not None:
                        context = ssl.create_default_context(cafile=str(tls / "ca.pem"))
                        sock = context.wrap_socket(raw, server_hostname="127.0.0.1")
                    sock.sendall(b"PING\r\n")
                    answer = sock.recv(64)
                    if answer.startswith((b"+PONG", b"-NOAUTH")):
                        return self
            except OSError:
                pass
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"redis-server did not start on port {self.port}")
            time.sleep(0.05)

    def kill(self) -> None:
        """SIGKILL: the store vanishes with all its data."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(START_TIMEOUT)
        self.process = None

    def command(self, *args: str) -> bytes:
        """One command over a raw socket (RESP inline), its first reply line."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=5.0) as sock:
            parts = [*(["AUTH", self.password] if self.password else []), *args]
            words = [p.encode() for p in parts]
            if self.password:
                sock.sendall(_resp(words[:2]))
                sock.recv(64)
                words = words[2:]
            sock.sendall(_resp(words))
            return sock.recv(65536)


def _resp(words: list[bytes]) -> bytes:
    out = [b"*%d\r\n" % len(words)]
    for word in words:
        out.append(b"$%d\r\n%s\r\n" % (len(word), word))
    return b"".join(out)


class Link:
    """A TCP forwarder to ``port`` on loopback that can be cut and mended: while cut,
    its connections are reset and new ones are closed at once, so the store behind it
    is unreachable yet keeps its data."""

    def __init__(self, port: int) -> None:
        self.target = port
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._lock = threading.Lock()
        self._open: list[socket.socket] = []
        self._cut = False
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return  # closed
            with self._lock:
                if self._cut:
                    _reset(client)
                    continue
                try:
                    server = socket.create_connection(("127.0.0.1", self.target), timeout=5.0)
                except OSError:
                    _reset(client)
                    continue
                self._open += [client, server]
            for one, other in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(one, other), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        for sock in (source, sink):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def cut(self) -> None:
        with self._lock:
            self._cut = True
            for sock in self._open:
                _reset(sock)
            self._open = []

    def mend(self) -> None:
        with self._lock:
            self._cut = False

    def close(self) -> None:
        self.cut()
        self._listener.close()


def _reset(sock: socket.socket) -> None:
    """Close with a reset (SO_LINGER 0), as a peer that went away does."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()
