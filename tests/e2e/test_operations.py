"""Operations: admin endpoints, access log, drain, sd_notify, socket activation, workers,
environment configuration and the unit files."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from relayfixture import RelayThread
from sglang_app import SGLangServer

from relay.config import parse_listen

pytestmark = pytest.mark.timeout(90)

ROOT = Path(__file__).resolve().parents[2]
LIMIT = 20
CHAT = {"model": "test-model", "messages": [{"role": "user", "content": "hi"}]}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def sglang():
    server = SGLangServer().start()
    yield server
    server.stop()


def start_relay(
    *args: str, env: dict | None = None, lines: list[str] | None = None, **popen
) -> tuple[subprocess.Popen, int]:
    """relay as a subprocess; returns it and its port once it logged that it listens.

    ``lines``, if given, receives what relay logged up to then."""
    process = subprocess.Popen(
        [sys.executable, "-m", "relay", "--listen", "127.0.0.1:0", *args],
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **(env or {})},
        **popen,
    )
    assert process.stderr is not None
    deadline = time.monotonic() + LIMIT
    lines = [] if lines is None else lines
    while time.monotonic() < deadline:
        line = process.stderr.readline()
        lines.append(line)
        match = re.search(r"listening on 127\.0\.0\.1:(\d+)", line)
        if match:
            threading.Thread(target=process.stderr.read, daemon=True).start()
            return process, int(match.group(1))
        if not line and process.poll() is not None:
            break
    process.kill()
    raise AssertionError("relay did not start: " + "".join(lines))


def until_refused(port: int) -> None:
    """Wait (bounded) until relay refuses new connections: its drain has begun."""
    deadline = time.monotonic() + LIMIT
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), LIMIT).close()
        except ConnectionRefusedError:
            return
        assert time.monotonic() < deadline, "relay still accepts connections"
        time.sleep(0.02)


def test_metrics_parse_with_prometheus_client_and_count_what_happened(sglang):
    """/metrics is valid Prometheus text and counts requests, streams and histograms."""
    parser = pytest.importorskip("prometheus_client.parser")
    admin = free_port()
    with RelayThread(sglang.url, admin_listen=parse_listen(f"127.0.0.1:{admin}")) as relay:
        body = {**CHAT, "stream": True, "max_tokens": 4, "test_gap_ms": 20}
        assert httpx.post(f"{relay.url}/v1/chat/completions", json=body).status_code == 200
        assert httpx.post(f"{relay.url}/nope", json=body).status_code == 404
        text = httpx.get(f"http://127.0.0.1:{admin}/metrics").text
        # SGLang's own /metrics still passes through the proxy port untouched.
        assert httpx.get(f"{relay.url}/metrics").status_code == 404
    families = {f.name: f for f in parser.text_string_to_metric_families(text)}
    statuses = {s.labels["status"]: s.value for s in families["relay_requests"].samples}
    assert statuses == {"200": 1.0, "404": 1.0}
    gaps = families["relay_upstream_read_gap_seconds"]
    count = next(s.value for s in gaps.samples if s.name.endswith("_count"))
    assert count >= 1
    for name in (
        "relay_first_byte_seconds",
        "relay_upstream_head_seconds",
        "relay_truncated_streams",
        "relay_client_disconnects",
        "relay_upstream_connect_errors",
        "relay_upstream_pool_idle",
        "relay_active_exchanges",
        "relay_sent_bytes",
        "relay_received_bytes",
    ):
        assert name in families, name


def test_health_and_ready_follow_the_upstream(sglang):
    """/health is 200 while the process lives; /ready is 503 when no upstream answers."""
    admin = free_port()
    dead = f"127.0.0.1:{free_port()}"
    with RelayThread(dead, admin_listen=parse_listen(f"127.0.0.1:{admin}")):
        assert httpx.get(f"http://127.0.0.1:{admin}/health").status_code == 200
        ready = httpx.get(f"http://127.0.0.1:{admin}/ready")
        assert ready.status_code == 503 and "no upstream" in ready.json()["reason"]
    with RelayThread(sglang.url, admin_listen=parse_listen(f"127.0.0.1:{admin}")):
        assert httpx.get(f"http://127.0.0.1:{admin}/ready").status_code == 200


def test_access_log_fields(sglang, caplog):
    """The access record carries requested and forwarded model, bytes, TTFT and ending."""
    from relay.http.rewrite import ModelMap

    caplog.set_level("INFO", logger="relay.access")
    with RelayThread(sglang.url, model_map=ModelMap({"alias": "test-model"})) as relay:
        body = {**CHAT, "model": "alias", "stream": True, "max_tokens": 3}
        httpx.post(f"{relay.url}/v1/chat/completions", json=body, timeout=LIMIT)
    records = [r for r in caplog.records if r.name == "relay.access"]
    assert len(records) == 1
    fields = records[0].fields
    assert fields["status"] == 200 and fields["ending"] == "complete"
    assert fields["model"] == "alias" and fields["forwarded_model"] == "test-model"
    assert fields["bytes_out"] > 0 and fields["ttft_ms"] is not None
    assert "model=alias" in records[0].getMessage()


def test_sigterm_lets_20_streams_finish_then_exits_0(sglang):
    """SIGTERM with 20 streams in flight: all complete, new requests get 503, exit 0."""
    process, port = start_relay("--upstream", sglang.url, "--drain-timeout", "20s")
    url = f"http://127.0.0.1:{port}/v1/chat/completions"
    body = {**CHAT, "stream": True, "max_tokens": 20, "test_gap_ms": 50}
    results: list[str] = []
    started = threading.Barrier(21, timeout=LIMIT)

    def stream() -> None:
        with httpx.Client(timeout=LIMIT) as client:
            with client.stream("POST", url, json=body) as response:
                lines = response.iter_lines()
                next(lines)  # first event: the stream is in flight
                started.wait()
                results.append("\n".join(lines))

    threads = [threading.Thread(target=stream) for _ in range(20)]
    for thread in threads:
        thread.start()
    kept = httpx.Client(timeout=LIMIT)
    assert kept.get(f"http://127.0.0.1:{port}/health").status_code == 200  # keep-alive open
    started.wait()
    process.send_signal(signal.SIGTERM)
    until_refused(port)  # the drain has begun; the kept connection sat idle meanwhile
    late = kept.get(f"http://127.0.0.1:{port}/health")
    assert late.status_code == 503 and late.headers["connection"] == "close"
    for thread in threads:
        thread.join(LIMIT)
    assert process.wait(LIMIT) == 0
    assert len(results) == 20 and all(r.rstrip().endswith("data: [DONE]") for r in results)
    kept.close()


def test_a_second_sigterm_exits_at_once(sglang):
    """During a drain a second SIGTERM ends the process without waiting for streams."""
    process, port = start_relay("--upstream", sglang.url, "--drain-timeout", "60s")
    body = {**CHAT, "stream": True, "max_tokens": 1000, "test_gap_ms": 100}
    with httpx.Client(timeout=LIMIT) as client:
        with client.stream(
            "POST", f"http://127.0.0.1:{port}/v1/chat/completions", json=body
        ) as response:
            lines = response.iter_lines()  # kept: dropping it would close the stream
            next(lines)
            process.send_signal(signal.SIGTERM)
            # Sent before the first is handled, the second would merge with it.
            until_refused(port)
            assert process.poll() is None  # draining: the stream keeps it alive
            process.send_signal(signal.SIGTERM)
            assert process.wait(5) == 0


def test_sd_notify_ready_and_stopping(sglang, tmp_path):
    """Under a service manager relay sends READY=1 once listening and STOPPING=1 on drain."""
    path = str(tmp_path / "notify")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(path)
    listener.settimeout(LIMIT)
    process, _ = start_relay(
        "--upstream", sglang.url, env={"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "200000"}
    )
    try:
        assert listener.recv(4096).startswith(b"READY=1")
        assert listener.recv(4096) == b"WATCHDOG=1"
        process.send_signal(signal.SIGTERM)
        while listener.recv(4096) != b"STOPPING=1":
            pass  # watchdog pings until then; recv is bounded by the socket timeout
        assert process.wait(LIMIT) == 0
    finally:
        process.kill()
        listener.close()


@pytest.mark.skipif(
    shutil.which("systemd-socket-activate") is None,
    reason="systemd-socket-activate is not installed",
)
def test_socket_activation_serves_on_the_passed_socket(sglang):
    """relay serves on the socket systemd passes in LISTEN_FDS."""
    port = free_port()
    process = subprocess.Popen(
        [
            "systemd-socket-activate",
            "-l",
            f"127.0.0.1:{port}",
            sys.executable,
            "-m",
            "relay",
            "--upstream",
            sglang.url,
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + LIMIT
        while True:
            try:
                response = httpx.post(
                    f"http://127.0.0.1:{port}/v1/chat/completions",
                    json={**CHAT, "max_tokens": 2},
                    timeout=LIMIT,
                )
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline
                time.sleep(0.05)
        assert response.status_code == 200
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(LIMIT)


def test_workers_share_the_port_and_a_dead_worker_is_replaced(sglang):
    """--workers 2 runs two processes; killing one brings up a new one."""
    process, port = start_relay("--upstream", sglang.url, "--workers", "2")
    try:
        children_path = Path(f"/proc/{process.pid}/task/{process.pid}/children")
        deadline = time.monotonic() + LIMIT
        while len(children_path.read_text().split()) < 2:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        workers = [int(p) for p in children_path.read_text().split()]
        for _ in range(4):
            response = httpx.post(
                f"http://127.0.0.1:{port}/v1/chat/completions",
                json={**CHAT, "max_tokens": 2},
                timeout=LIMIT,
            )
            assert response.status_code == 200
        os.kill(workers[0], signal.SIGKILL)
        while True:
            now = [int(p) for p in children_path.read_text().split()]
            if len(now) == 2 and workers[0] not in now:
                break
            assert time.monotonic() < deadline + LIMIT
            time.sleep(0.05)
        response = httpx.post(
            f"http://127.0.0.1:{port}/v1/chat/completions",
            json={**CHAT, "max_tokens": 2},
            timeout=LIMIT,
        )
        assert response.status_code == 200
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(LIMIT) == 0


def test_environment_configures_every_flag_and_print_config_masks_secrets():
    """RELAY_* variables set flags; --print-config shows them with keys masked."""
    env = {
        **os.environ,
        "RELAY_UPSTREAM": "sglang:30000",
        "RELAY_MAX_BODY_BYTES": "1m",
        "RELAY_API_KEYS": "sk-very-secret",
        "RELAY_MODEL_MAP": "a=b,c=d",
        "RELAY_UPSTREAM_INSECURE_SKIP_VERIFY": "false",
        "RELAY_WORKERS": "3",
    }
    result = subprocess.run(
        [sys.executable, "-m", "relay", "--print-config", "--workers", "2"],
        capture_output=True,
        text=True,
        env=env,
        timeout=LIMIT,
    )
    assert result.returncode == 0, result.stderr
    out = result.stdout
    lines = out.splitlines()
    assert "--upstream sglang:30000" in lines
    assert "--max-body-bytes 1m" in lines
    assert "--workers 2" in lines  # the command line wins
    assert "--model-map a=b" in lines and "--model-map c=d" in lines
    assert "sk-very-secret" not in out and "# RELAY_API_KEYS: 1 key (masked)" in lines
    bad = subprocess.run(
        [sys.executable, "-m", "relay"],
        capture_output=True,
        text=True,
        env={**env, "RELAY_MAX_BODY_BYTES": "lots"},
        timeout=LIMIT,
    )
    assert bad.returncode == 2 and "RELAY_MAX_BODY_BYTES=lots:" in bad.stderr


def test_an_unresolvable_upstream_host_is_a_warning_and_relay_still_serves(sglang):
    """An --upstream name that does not resolve is one warning line at start; relay serves."""
    logged: list[str] = []
    process, port = start_relay(
        "--upstream", sglang.url, "--upstream", "relay-test.invalid:30000", lines=logged
    )
    try:
        # The start-up line names it too, among the upstreams.
        warnings = [line for line in logged if "relay-test.invalid" in line and "WARNING" in line]
        assert len(warnings) == 1, logged
        assert "does not resolve" in warnings[0]
        response = httpx.post(
            f"http://127.0.0.1:{port}/v1/chat/completions", json=CHAT, timeout=LIMIT
        )
        assert response.status_code == 200
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(LIMIT) == 0


@pytest.mark.skipif(
    shutil.which("systemd-analyze") is None,
    reason="systemd-analyze not installed (apt-get install systemd): unit files not verified",
)
def test_unit_files_verify_as_shipped(tmp_path):
    """systemd-analyze verify accepts the units exactly as shipped, installed as documented.

    The units go into a scratch root (``--root``) where the documented
    install left ``/opt/relay/bin/relay`` (a stub here) and README.md; every
    other command the units name is taken from this machine.
    """
    root = tmp_path / "root"
    units = root / "etc" / "systemd" / "system"
    units.mkdir(parents=True)
    for name in ("relay.service", "relay.socket"):
        shutil.copy(ROOT / "deploy" / name, units / name)
    service = (units / "relay.service").read_text()
    execs = re.findall(r"^Exec\w+=[-@:+!]*(/\S+)", service, re.MULTILINE)
    assert execs[0] == "/opt/relay/bin/relay", execs
    for command in execs:
        target = root / command.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        if command == "/opt/relay/bin/relay":
            target.write_text("#!/bin/sh\n")  # stands in for the venv's console script
            target.chmod(0o755)
        else:
            shutil.copy(command, target)
    docs = re.findall(r"^Documentation=file:(/\S+)", service, re.MULTILINE)
    assert docs == ["/opt/relay/README.md"]
    assert "install -m 644 README.md /opt/relay/README.md" in service
    assert "python3 -m venv /opt/relay" in service and "/opt/relay/bin/pip install ." in service
    system = root / "usr" / "lib" / "systemd" / "system"
    system.mkdir(parents=True)
    for target in Path("/usr/lib/systemd/system").glob("*.target"):
        shutil.copy(target, system / target.name)  # sysinit.target and friends
    result = subprocess.run(
        [
            "systemd-analyze",
            "verify",
            "--man=no",
            f"--root={root}",
            "/etc/systemd/system/relay.service",
            "/etc/systemd/system/relay.socket",
        ],
        capture_output=True,
        text=True,
        timeout=LIMIT,
    )
    assert result.returncode == 0 and not result.stderr.strip(), result.stderr
    assert "Type=notify" in service and "DynamicUser=yes" in service


def test_normal_operation_is_not_logged_as_an_error():
    """Start-up lines are INFO under relay.events, never under an 'error' logger."""
    lines: list[str] = []
    process, _port = start_relay("--upstream", "127.0.0.1:9", lines=lines)
    try:
        listening = next(line for line in lines if "listening on" in line)
        assert " INFO relay.events: " in listening, listening
        assert not any("relay.error" in line for line in lines), lines
    finally:
        process.terminate()
        process.wait(LIMIT)
