"""The processes under test: the token streamer, relay, nginx; and /proc accounting."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

START_LIMIT = 15.0
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """utime + stime of one process, from /proc/PID/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def rss_mb(pid: int) -> float:
    """VmRSS (resident set now) of one process, in MB; 0 once it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def peak_rss_mb(pid: int) -> float:
    """VmHWM (peak resident set) of one process, in MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(x) for x in path.read_text().split()] if path.exists() else []


@dataclass
class Peer:
    """One running process (and its children, for nginx's workers)."""

    name: str
    port: int
    process: subprocess.Popen[str]
    workdir: tempfile.TemporaryDirectory[str] | None = None
    pids: list[int] = field(default_factory=list)
    #: What the load client sends as ``Authorization: Bearer`` (a keyed relay).
    api_key: str | None = None

    def all_pids(self) -> list[int]:
        return [self.process.pid, *children(self.process.pid)]

    def cpu(self) -> float:
        return sum(cpu_seconds(pid) for pid in self.all_pids())

    def peak_rss_mb(self) -> float:
        return max(peak_rss_mb(pid) for pid in self.all_pids())

    def rss_mb(self) -> float:
        """Resident set of the process and its children now (nginx: master and worker)."""
        return sum(rss_mb(pid) for pid in self.all_pids())

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(START_LIMIT)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(START_LIMIT)
        if self.workdir is not None:
            self.workdir.cleanup()


def _pin(cpus: set[int] | None):
    if not cpus:
        return None
    return lambda: os.sched_setaffinity(0, cpus)


def _wait_line(process: subprocess.Popen[str], pattern: str, stream: str) -> re.Match[str]:
    pipe = process.stdout if stream == "stdout" else process.stderr
    assert pipe is not None
    deadline = time.monotonic() + START_LIMIT
    while time.monotonic() < deadline:
        line = pipe.readline()
        if not line:
            break
        match = re.search(pattern, line)
        if match:
            return match
    process.kill()
    raise RuntimeError(f"{process.args!r} did not start")


def start_streamer(cpus: set[int] | None = None) -> Peer:
    process = subprocess.Popen(
        [sys.executable, "-m", "relay.tools.streamer", "--listen", "127.0.0.1:0"],
        stdout=subprocess.PIPE,
        text=True,
        preexec_fn=_pin(cpus),
    )
    match = _wait_line(process, r"listening on http://127\.0\.0\.1:(\d+)", "stdout")
    return Peer("streamer", int(match.group(1)), process)


def start_relay(
    upstream_port: int, cpus: set[int] | None = None, *extra: str, log_to_file: bool = False
) -> Peer:
    """relay in front of ``upstream_port``. ``log_to_file``: its log goes to a file, as
    to journald, not to a pipe this process drains (thousands of access lines at
    once would fill a pipe and block relay on its writes, a bench artefact)."""
    if log_to_file:
        return _start_relay_logging_to_file(upstream_port, cpus, *extra)
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "relay",
            "--listen",
            "127.0.0.1:0",
            "--upstream",
            f"127.0.0.1:{upstream_port}",
            "--log-level",
            "info",
            *extra,
        ],
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=_pin(cpus),
    )
    match = _wait_line(process, r"listening on 127\.0\.0\.1:(\d+)", "stderr")
    assert process.stderr is not None
    # Keep draining stderr so relay can never block on a full pipe.
    import threading

    stderr = process.stderr
    threading.Thread(target=lambda: [None for _ in stderr], daemon=True).start()
    return Peer("relay", int(match.group(1)), process)


def _start_relay_logging_to_file(upstream_port: int, cpus: set[int] | None, *extra: str) -> Peer:
    workdir = tempfile.TemporaryDirectory(prefix="relay-bench-relay-")
    log = Path(workdir.name) / "relay.log"
    with log.open("w") as sink:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "relay",
                "--listen",
                "127.0.0.1:0",
                "--upstream",
                f"127.0.0.1:{upstream_port}",
                "--log-level",
                "info",
                *extra,
            ],
            stderr=sink,
            text=True,
            preexec_fn=_pin(cpus),
        )
    deadline = time.monotonic() + START_LIMIT
    while time.monotonic() < deadline:
        match = re.search(r"listening on 127\.0\.0\.1:(\d+)", log.read_text())
        if match:
            return Peer("relay", int(match.group(1)), process, workdir)
        if process.poll() is not None:
            break
        time.sleep(0.05)
    process.kill()
    workdir.cleanup()
    raise RuntimeError(f"{process.args!r} did not start")


#: What both nginx configurations share: one worker, no daemon, no access log.
_NGINX_PREAMBLE = """\
worker_processes 1;
worker_rlimit_nofile {nofile};
daemon off;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections {connections}; }}
http {{
  access_log off;
"""

NGINX_CONF = (
    _NGINX_PREAMBLE
    + """\
  keepalive_requests 1000000;
{http_extra}
  client_body_temp_path {dir}/body; proxy_temp_path {dir}/proxy;
  fastcgi_temp_path {dir}/fcgi; uwsgi_temp_path {dir}/uwsgi; scgi_temp_path {dir}/scgi;
  upstream backend {{ server 127.0.0.1:{upstream}; keepalive 64; }}
  server {{
    listen 127.0.0.1:{port} backlog=4096;
    location / {{
      proxy_pass http://backend;
      proxy_buffering {buffering};
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_read_timeout 600s;
    }}
  }}
}}
"""
)


def nginx_path() -> str | None:
    return shutil.which("nginx") or next(
        (p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx") if os.path.exists(p)), None
    )


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


ORIGIN_CONF = (
    _NGINX_PREAMBLE
    + """\
  client_body_temp_path {dir}/body; proxy_temp_path {dir}/proxy;
  fastcgi_temp_path {dir}/fcgi; uwsgi_temp_path {dir}/uwsgi; scgi_temp_path {dir}/scgi;
  keepalive_requests 1000000;
  server {{
    listen 127.0.0.1:{port} backlog=4096;
    location / {{
      default_type application/json;
      return 200 '{{"id":"cmpl-1","object":"chat.completion","choices":[]}}';
    }}
  }}
}}
"""
)


def start_redis(cpus: set[int] | None = None) -> Peer | None:
    """A local redis-server (no persistence) for the shared-limits scenario; None
    when redis-server is not installed."""
    server = shutil.which("redis-server") or (
        "/usr/bin/redis-server" if os.path.exists("/usr/bin/redis-server") else None
    )
    if server is None:
        return None
    workdir = tempfile.TemporaryDirectory(prefix="relay-bench-redis-")
    port = free_port()
    process = subprocess.Popen(
        [server, "--port", str(port), "--bind", "127.0.0.1", "--dir", workdir.name,
         "--save", "", "--appendonly", "no", "--daemonize", "no"],
        stdout=subprocess.PIPE,
        text=True,
        preexec_fn=_pin(cpus),
    )  # fmt: skip
    _wait_line(process, r"Ready to accept connections", "stdout")
    assert process.stdout is not None
    stdout = process.stdout
    import threading

    threading.Thread(target=lambda: [None for _ in stdout], daemon=True).start()
    return Peer("redis", port, process, workdir=workdir)


def start_origin(cpus: set[int] | None = None) -> Peer | None:
    """An nginx that answers every request at once with a small JSON body (no proxying):
    the instant upstream of the per-request scenario. None when nginx is absent."""
    return _start_nginx_conf(ORIGIN_CONF, {}, cpus, "origin")


#: Directives that make nginx buffer a stream only for clients that accept gzip, as
#: reported by users: proxy buffering left at its default (on) and event streams
#: compressed. Without Accept-Encoding the same nginx streams.
GZIP_EVENT_STREAMS = "  gzip on; gzip_types text/event-stream;"


def start_nginx(
    upstream_port: int,
    cpus: set[int] | None = None,
    *,
    proxy_buffering: bool = False,
    http_extra: str = "",
    connections: int = 8192,
) -> Peer | None:
    """nginx in front of ``upstream_port`` (None when nginx is not installed or fails).

    ``http_extra`` goes into the ``http`` block (e.g. :data:`GZIP_EVENT_STREAMS`);
    ``connections`` is the worker's limit (a relayed stream takes two).
    """
    values = {
        "upstream": upstream_port,
        "buffering": "on" if proxy_buffering else "off",
        "http_extra": http_extra,
        "connections": connections,
        "nofile": connections + 64,
    }
    return _start_nginx_conf(NGINX_CONF, values, cpus, "nginx")


def _start_nginx_conf(
    template: str, values: dict[str, object], cpus: set[int] | None, name: str
) -> Peer | None:
    binary = nginx_path()
    if binary is None:
        return None
    workdir = tempfile.TemporaryDirectory(prefix="relay-bench-nginx-")
    port = free_port()
    conf = Path(workdir.name) / "nginx.conf"
    values = {"connections": 8192, "nofile": 8192 + 64, **values}
    conf.write_text(template.format(dir=workdir.name, port=port, **values))
    process = subprocess.Popen(
        [binary, "-c", str(conf), "-e", f"{workdir.name}/error.log"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        text=True,
        preexec_fn=_pin(cpus),
    )
    import socket

    deadline = time.monotonic() + START_LIMIT
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), 1).close()
            break
        except OSError:
            if process.poll() is not None:
                workdir.cleanup()
                return None
            time.sleep(0.05)
    return Peer(name, port, process, workdir)
