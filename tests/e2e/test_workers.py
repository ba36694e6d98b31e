"""``--workers N`` as a service: sd_notify from the main pid, drain, whole-relay metrics,
worker pids in the log, and workers that do not outlive their parent."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from relayfixture import eventually
from relayprocess import RelayProcess as Relay
from sglang_app import SGLangServer

pytestmark = pytest.mark.timeout(90)

LIMIT = 20.0
CHAT = {"model": "test-model", "messages": [{"role": "user", "content": "hi"}]}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def sglang():
    server = SGLangServer().start()
    yield server
    server.stop()


def gone(pid: int) -> bool:
    """The process has exited (a zombie no one reaped counts as exited)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1].startswith("Z")
    except (FileNotFoundError, ProcessLookupError):
        return True


def test_sd_notify_ready_watchdog_and_stopping_come_from_the_main_pid(sglang, tmp_path):
    """With NotifyAccess=main only the parent may talk to systemd: READY=1 once the
    workers listen, WATCHDOG=1 while they answer, STOPPING=1 on SIGTERM, all from it."""
    path = str(tmp_path / "notify")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
    listener.bind(path)
    listener.settimeout(LIMIT)
    ucred = struct.calcsize("iII")

    def receive() -> tuple[int, bytes]:
        data, ancillary, _, _ = listener.recvmsg(4096, socket.CMSG_SPACE(ucred))
        pids = [
            struct.unpack("iII", payload[:ucred])[0]
            for level, kind, payload in ancillary
            if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS
        ]
        assert len(pids) == 1
        return pids[0], data

    relay = Relay(
        "--upstream",
        sglang.url,
        "--workers",
        "2",
        env={"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "400000"},
    )
    main = relay.process.pid
    try:
        senders: dict[bytes, set[int]] = {}
        while b"WATCHDOG=1" not in senders:
            pid, data = receive()
            senders.setdefault(data.split(b"\n")[0], set()).add(pid)
        assert set(senders) == {b"READY=1", b"WATCHDOG=1"}
        relay.wait_line(r"all 2 workers ready")
        relay.process.send_signal(signal.SIGTERM)
        while b"STOPPING=1" not in senders:
            pid, data = receive()
            senders.setdefault(data.split(b"\n")[0], set()).add(pid)
        assert relay.process.wait(LIMIT) == 0
        assert senders == {b"READY=1": {main}, b"WATCHDOG=1": {main}, b"STOPPING=1": {main}}
    finally:
        relay.stop()
        listener.close()


def test_workers_exit_when_the_parent_is_killed(sglang):
    """SIGKILL to the parent takes its workers down within seconds."""
    relay = Relay("--upstream", sglang.url, "--workers", "2")
    try:
        eventually(lambda: len(relay.workers()) == 2, limit=LIMIT)
        workers = relay.workers()
        relay.wait_line(r"all 2 workers ready")
        relay.process.kill()
        relay.process.wait(LIMIT)
        eventually(lambda: all(gone(pid) for pid in workers), limit=10)
    finally:
        for pid in relay.workers() if relay.process.poll() is None else []:
            os.kill(pid, signal.SIGKILL)


@pytest.mark.parametrize("workers", [1, 2])
def test_drain_refuses_new_connections_and_ready_says_draining(sglang, workers):
    """During the drain a new connection is refused at once and /ready answers 503
    "draining", with one process or several; the stream in flight completes."""
    admin = free_port()
    relay = Relay(
        "--upstream",
        sglang.url,
        "--workers",
        str(workers),
        "--admin-listen",
        f"127.0.0.1:{admin}",
        "--drain-timeout",
        "20s",
    )
    body = {**CHAT, "stream": True, "max_tokens": 40, "test_gap_ms": 100}
    try:
        if workers > 1:
            relay.wait_line(r"all 2 workers ready")
        assert httpx.get(f"http://127.0.0.1:{admin}/ready", timeout=LIMIT).status_code == 200
        with httpx.Client(timeout=LIMIT) as client:
            url = f"http://127.0.0.1:{relay.port}/v1/chat/completions"
            with client.stream("POST", url, json=body) as response:
                lines = response.iter_lines()
                next(lines)  # in flight
                relay.process.send_signal(signal.SIGTERM)

                def refused() -> bool:
                    try:
                        socket.create_connection(("127.0.0.1", relay.port), 1).close()
                    except ConnectionRefusedError:
                        return True
                    return False

                eventually(refused, limit=5)
                ready = httpx.get(f"http://127.0.0.1:{admin}/ready", timeout=LIMIT)
                assert ready.status_code == 503 and ready.json()["reason"] == "draining"
                assert "\n".join(lines).rstrip().endswith("data: [DONE]")
        assert relay.process.wait(LIMIT) == 0
    finally:
        relay.stop()


def test_metrics_cover_every_worker_and_never_go_down(sglang):
    """With --workers 2 every scrape counts every request, whichever worker served it,
    and counters never decrease, not even when a worker is killed and replaced; each
    worker's log lines carry its pid."""
    admin = free_port()
    relay = Relay(
        "--upstream", sglang.url, "--workers", "2", "--admin-listen", f"127.0.0.1:{admin}"
    )
    sent = 0
    previous: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}

    def scrape() -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        text = httpx.get(f"http://127.0.0.1:{admin}/metrics", timeout=LIMIT).text
        samples = {}
        for family in text_string_to_metric_families(text):
            if family.type in ("counter", "histogram"):
                for sample in family.samples:
                    samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
        return samples

    def check(samples: dict) -> None:
        requests = sum(v for (name, _), v in samples.items() if name == "relay_requests_total")
        assert requests == sent
        for key, value in previous.items():
            assert samples.get(key, 0.0) >= value, key
        previous.clear()
        previous.update(samples)

    def batch(n: int = 8) -> None:
        nonlocal sent
        for _ in range(n):
            # A new connection each time, so that both workers get some.
            response = httpx.post(
                f"http://127.0.0.1:{relay.port}/v1/chat/completions",
                json={**CHAT, "max_tokens": 2},
                headers={"connection": "close"},
                timeout=LIMIT,
            )
            assert response.status_code == 200
            sent += 1

    try:
        relay.wait_line(r"all 2 workers ready")
        workers = relay.workers()
        deadline = time.monotonic() + LIMIT
        served: set[int] = set()
        while served != set(workers):
            assert time.monotonic() < deadline, f"only {served} of {workers} served"
            batch()
            check(scrape())
            served = {
                int(m.group(1))
                for line in list(relay.lines)
                if (m := re.search(r"relay\.access\[(\d+)\]", line))
            }
        for _ in range(6):
            batch(2)
            check(scrape())
        os.kill(workers[0], signal.SIGKILL)
        relay.wait_line(rf"worker {workers[0]} exited")
        check(scrape())
        eventually(
            lambda: len(relay.workers()) == 2 and workers[0] not in relay.workers(), limit=LIMIT
        )
        for _ in range(6):
            batch(2)
            check(scrape())
    finally:
        assert relay.stop() == 0


SUPERVISE = """
import json, logging, socket, sys
from relay.config import Config, ListenAddress
from relay.ops import workers
workers.START_TIMEOUT = float(sys.argv[2])
logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
sock = socket.create_server(("127.0.0.1", 0))
config = Config(listen=ListenAddress("127.0.0.1", 0), workers=2, drain_timeout=1.0)
sys.exit(workers.run_workers(config, [], [sock], command=json.loads(sys.argv[1])))
"""


def supervise(command: list[str], start_timeout: float = 60.0) -> tuple[int, list[str], float]:
    """The parent of two workers started with ``command``: exit code, log lines, seconds."""
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-c", SUPERVISE, json.dumps(command), str(start_timeout)],
        capture_output=True,
        text=True,
        timeout=LIMIT * 2,
    )
    return result.returncode, result.stderr.splitlines(), time.monotonic() - started


def test_a_worker_that_cannot_be_started_stops_the_relay(tmp_path):
    """An interpreter the parent may not run: one error line naming it, exit 1, no retries,
    and never 'started 2 workers:' with nobody in it."""
    interpreter = tmp_path / "python"
    interpreter.write_text("#!/bin/sh\n")
    interpreter.chmod(0o644)  # not executable, even for root
    code, lines, took = supervise([str(interpreter)])
    assert code == 1, lines
    errors = [line for line in lines if line.startswith("ERROR")]
    assert len(errors) == 1, lines
    assert str(interpreter) in errors[0] and "Permission denied" in errors[0], errors
    assert "cannot start its 2 workers" in errors[0]
    assert not any("started 2 workers" in line for line in lines), lines
    assert took < LIMIT


def test_workers_that_exit_during_start_up_stop_the_relay(tmp_path):
    """A worker that exits before it said it listens stops the relay (exit 1, one error
    line) instead of being restarted without end while clients wait."""
    attempts = tmp_path / "attempts"
    code, lines, _ = supervise(
        [sys.executable, "-c", f"open({str(attempts)!r}, 'a').write('x'); raise SystemExit(3)"]
    )
    assert code == 1, lines
    errors = [line for line in lines if line.startswith("ERROR")]
    assert len(errors) == 1 and "exited (3) before it was ready" in errors[0], lines
    assert len(attempts.read_text()) <= 2  # each worker tried once, never restarted


def test_workers_that_never_get_ready_stop_the_relay():
    """Workers still not ready when the start-up deadline passes stop the relay, and the
    parent does not wait for their drain deadline to end them."""
    code, lines, took = supervise([sys.executable, "-c", "import time; time.sleep(60)"], 1.0)
    assert code == 1, lines
    errors = [line for line in lines if line.startswith("ERROR")]
    assert len(errors) == 1 and "0 of 2 workers ready after 1 s" in errors[0], lines
    assert took < 5.0  # not the 1 s drain plus the 5 s kill grace


def test_restarts_of_a_worker_that_never_gets_ready_back_off_to_a_bound():
    """A worker that keeps dying before it is ready is restarted ever later, at most every
    RESTART_BACKOFF_MAX; one that was ready is restarted within RESTART_BACKOFF."""
    from relay.ops.workers import RESTART_BACKOFF, RESTART_BACKOFF_MAX, restart_delay

    delays = [restart_delay(n) for n in range(40)]
    assert delays[0] == RESTART_BACKOFF
    assert delays == sorted(delays) and delays[1] > delays[0]
    assert delays[-1] == RESTART_BACKOFF_MAX
