"""The shipped Prometheus rules and Grafana dashboard, checked by the real tools.

The rules go through ``promtool`` (``check rules`` and the unit tests in
``deploy/prometheus/relay.rules.test.yml``). The dashboard's queries run on a
real Prometheus (the distribution's package) that scrapes a relay carrying
traffic (and a second relay whose limits live in a real redis-server): every
query must parse and return data, so a renamed metric or a typo in a panel
fails here, not on an operator's screen.
"""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from redisfixture import RedisServer
from relayfixture import RelayThread, eventually
from sglang_app import SGLangLike, SGLangServer

from relay.config import StoreAddress, parse_listen

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "deploy" / "prometheus" / "relay.rules.yml"
RULE_TESTS = ROOT / "deploy" / "prometheus" / "relay.rules.test.yml"
DASHBOARD = ROOT / "deploy" / "grafana" / "relay.json"
RENDER = ROOT / "deploy" / "grafana" / "render.py"
PROMTOOL = shutil.which("promtool")
PROMETHEUS = shutil.which("prometheus")
# Grafana's variables, as a dashboard user with everything selected has them.
VARIABLES = {"$__rate_interval": "10s", "$job": ".+", "$instance": ".+"}
WAIT = 30.0
# Panels whose series are per relay: which relays each must show (the others, any).
PER_INSTANCE = {
    "Event loop lag": "every relay",
    "Limits store up": "the relay with a store",
    "Limits store errors and refusals": "the relay with a store",
}

needs_promtool = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool not installed (Debian: apt-get install prometheus)"
)
needs_prometheus = pytest.mark.skipif(
    PROMETHEUS is None, reason="prometheus not installed (Debian: apt-get install prometheus)"
)


# -- rules --------------------------------------------------------------------------
@needs_promtool
def test_the_rules_file_is_valid_and_its_alerts_fire_only_on_the_series_that_should():
    """promtool accepts relay.rules.yml, and every unit test in relay.rules.test.yml passes:
    each alert fires on the series meant to fire it and stays quiet on the others."""
    assert PROMTOOL is not None
    check = subprocess.run(
        [PROMTOOL, "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60
    )
    assert check.returncode == 0, check.stdout + check.stderr
    unit = subprocess.run(
        [PROMTOOL, "test", "rules", RULE_TESTS.name],
        cwd=RULE_TESTS.parent,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert unit.returncode == 0, unit.stdout + unit.stderr
    assert "SUCCESS" in unit.stdout


def test_every_alert_in_the_rules_file_has_a_unit_test():
    """No alert ships untested: each alert name appears in an alert_rule_test."""
    alerts = set(re.findall(r"^\s*- alert: (\w+)", RULES.read_text(), re.M))
    tested = set(re.findall(r"^\s*alertname: (\w+)", RULE_TESTS.read_text(), re.M))
    assert alerts, "no alerts found"
    assert alerts <= tested, f"alerts without a test: {sorted(alerts - tested)}"


# -- dashboard ----------------------------------------------------------------------
def dashboard_queries() -> list[tuple[str, str]]:
    """(panel title, PromQL) for every target of every panel, variables filled in."""
    dashboard = json.loads(DASHBOARD.read_text())
    queries = []
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            expr = target["expr"]
            for name, value in VARIABLES.items():
                expr = expr.replace(name, value)
            assert "$" not in expr, f"{panel['title']}: unknown variable in {expr}"
            queries.append((panel["title"], expr))
    return queries


def test_the_dashboard_is_importable_as_is():
    """The JSON has what Grafana's import needs, every panel uses the datasource variable,
    and the panels the operators asked for are there."""
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] and dashboard["title"] and dashboard["schemaVersion"] >= 36
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dashboard["panels"]:
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${datasource}"
    titles = {panel["title"] for panel in dashboard["panels"]}
    assert {
        "Streams in flight",
        "Time to first token (TTFT)",
        "Inter-token gap",
        "Coalesced reads",
        "Endings by kind",
        "Tokens per key and model",
        "Queue length",
        "Queue wait",
        "Per-upstream errors",
        *PER_INSTANCE,
    } <= titles
    heatmaps = [p for p in dashboard["panels"] if p["type"] == "heatmap"]
    assert {p["title"] for p in heatmaps} == {"Time to first token (TTFT)", "Inter-token gap"}
    assert all(t["format"] == "heatmap" for p in heatmaps for t in p["targets"])


def test_the_dashboard_panels_fit_the_grid_without_overlapping():
    """Every panel lies within Grafana's 24 columns, and no two panels share a cell."""
    taken: dict[tuple[int, int], str] = {}
    for panel in json.loads(DASHBOARD.read_text())["panels"]:
        pos = panel["gridPos"]
        assert pos["x"] >= 0 and pos["y"] >= 0 and pos["w"] > 0 and pos["h"] > 0, panel["title"]
        assert pos["x"] + pos["w"] <= 24, panel["title"]
        for x in range(pos["x"], pos["x"] + pos["w"]):
            for y in range(pos["y"], pos["y"] + pos["h"]):
                assert (x, y) not in taken, f"{panel['title']} overlaps {taken[x, y]}"
                taken[x, y] = panel["title"]


class Upstream(SGLangLike):
    """SGLang-like, with tokens as large as a request asks (to fill a slow client's buffers)."""

    def _tokens(self, body: dict[str, Any]) -> list[str]:
        size = int(body.get("test_token_bytes", 0))
        if not size:
            return super()._tokens(body)
        return [" " + "x" * size for _ in range(int(body.get("max_tokens", 8)))]


def free_port() -> int:
    # Prometheus cannot report a port it picked itself, so one is chosen here.
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Prometheus:
    """A real Prometheus in a temporary directory, scraping its targets every 500 ms."""

    def __init__(self, workdir: Path, targets: list[str], *, rules: Path | None = None) -> None:
        assert PROMETHEUS is not None
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = {
            "global": {
                "scrape_interval": "500ms",
                "scrape_timeout": "400ms",
                "evaluation_interval": "1s",
            },
            "rule_files": [str(rules)] if rules else [],
            "scrape_configs": [{"job_name": "relay", "static_configs": [{"targets": targets}]}],
        }
        (workdir / "prometheus.yml").write_text(json.dumps(config))  # JSON is YAML
        self.log = open(workdir / "prometheus.log", "wb")  # noqa: SIM115 (closed in stop)
        self.process = subprocess.Popen(
            [
                PROMETHEUS,
                f"--config.file={workdir / 'prometheus.yml'}",
                f"--storage.tsdb.path={workdir / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                "--log.level=warn",
            ],
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )

    def wait_ready(self) -> None:
        deadline = time.monotonic() + WAIT
        while time.monotonic() < deadline:
            assert self.process.poll() is None, "prometheus exited at start"
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as answer:
                    if answer.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.1)
        raise AssertionError("prometheus did not become ready")

    def api(self, path: str, **params: str) -> Any:
        url = f"{self.url}/api/v1/{path}?{urllib.parse.urlencode(params)}"
        try:
            with urllib.request.urlopen(url, timeout=5) as answer:
                return json.load(answer)
        except urllib.error.HTTPError as exc:  # 400: the query did not parse
            return json.load(exc)

    def query(self, expr: str) -> Any:
        return self.api("query", query=expr)

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)
        self.log.close()


def admin_port(relay: RelayThread) -> int:
    assert relay.server is not None
    return int(relay.server.admin_servers[0].sockets[0].getsockname()[1])


def stream_request(**fields: Any) -> dict[str, Any]:
    return {
        "model": "test-model",
        "messages": [{"role": "user", "content": "hi"}],
        "stream": True,
        "stream_options": {"include_usage": True},
        "max_tokens": 16,
        "test_gap_ms": 5,
        **fields,
    }


def slow_reader(relay: RelayThread, headers: bytes = b"") -> None:
    """A client that reads nothing until relay had to queue its tokens: coalesced reads.

    10 MB, 8 kB a token, paced so each read is one token: more than the kernel
    buffers between relay and the client hold (4 MB), and each read less than the
    transport's high-water mark, so a read after the first that stays queued finds
    bytes ahead of it.
    """
    body = json.dumps(
        stream_request(max_tokens=1200, test_token_bytes=8000, test_gap_ms=1)
    ).encode()
    head = (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: relay\r\nConnection: close\r\n"
        b"Content-Type: application/json\r\nContent-Length: %d\r\n%b\r\n" % (len(body), headers)
    )
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.settimeout(WAIT)
        sock.connect(("127.0.0.1", relay.port))
        sock.sendall(head + body)
        server = relay.server
        assert server is not None
        eventually(lambda: relay.call(server.metrics.coalesced_reads.total) > 0, WAIT)
        while sock.recv(65536):
            pass


def traffic(relay: RelayThread) -> None:
    """One round of every kind of exchange the dashboard shows."""
    with httpx.Client(base_url=relay.url, timeout=WAIT) as client:

        def stream(**fields: Any) -> None:
            try:
                body = stream_request(**fields)
                with client.stream("POST", "/v1/chat/completions", json=body) as answer:
                    for _ in answer.iter_raw():
                        pass
            except httpx.RemoteProtocolError:
                pass  # the stream the upstream cut

        # More streams at once than --max-inflight: some wait in the queue.
        threads = [threading.Thread(target=stream, kwargs={"test_ttft_ms": 50}) for _ in range(6)]
        for thread in threads:
            thread.start()
        stream(test_die_after=3)  # cut by the upstream
        assert client.post("/v1/chat/completions", json={"test_status": 503}).status_code == 503
        assert client.get("/no-such-page").status_code == 404
        for thread in threads:
            thread.join(WAIT)
    # A client that leaves mid-stream.
    with socket.create_connection(("127.0.0.1", relay.port), timeout=WAIT) as sock:
        body = json.dumps(stream_request(max_tokens=200, test_gap_ms=10)).encode()
        sock.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: relay\r\n"
            b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%b" % (len(body), body)
        )
        sock.recv(4096)


def store_traffic(relay: RelayThread, redis: RedisServer) -> None:
    """Requests through the relay whose limits live in ``redis``: admitted while the store
    answers, refused (503 store_unavailable: closed) while it is away, admitted again
    once it is back."""
    assert relay.server is not None
    store = relay.server.state.admission.store
    assert store is not None
    with httpx.Client(base_url=relay.url, timeout=WAIT) as client:

        def status() -> int:
            body = {**stream_request(max_tokens=1), "stream": False}
            return client.post("/v1/chat/completions", json=body).status_code

        assert status() == 200
        redis.kill()
        assert status() == 503
        redis.start()  # empty, on the same port
        eventually(lambda: relay.call(lambda: store.up), WAIT)
        assert status() == 200


@pytest.fixture
def monitored(
    tmp_path: Path, redis_server: RedisServer
) -> Iterator[tuple[RelayThread, RelayThread, Prometheus]]:
    """A relay, a second one sharing its limits through ``redis_server``, one upstream,
    and a Prometheus scraping both relays' admin listeners."""
    upstream = SGLangServer(Upstream()).start()
    relays: list[RelayThread] = []
    prometheus: Prometheus | None = None
    try:
        relays.append(
            RelayThread(
                upstream.url, admin_listen=parse_listen(f"127.0.0.1:{free_port()}"), max_inflight=2
            ).start()
        )
        relays.append(
            RelayThread(
                upstream.url,
                admin_listen=parse_listen(f"127.0.0.1:{free_port()}"),
                max_inflight=4,  # a shared limit: every request asks the store
                limits_store=StoreAddress("127.0.0.1", redis_server.port),
                limits_store_failure="closed",
            ).start()
        )
        targets = [f"127.0.0.1:{admin_port(relay)}" for relay in relays]
        prometheus = Prometheus(tmp_path, targets, rules=RULES)
        prometheus.wait_ready()
        # Prometheus starts scraping a few seconds after it is ready.
        scraped = prometheus
        eventually(lambda: len(scraped.query("up")["data"]["result"]) == len(targets), WAIT)
        yield relays[0], relays[1], prometheus
    finally:
        if prometheus is not None:
            prometheus.stop()
        for relay in relays:
            relay.stop()
        upstream.stop()


@needs_prometheus
@pytest.mark.slow
def test_every_dashboard_query_parses_and_returns_data_from_a_real_prometheus(
    monitored: tuple[RelayThread, RelayThread, Prometheus],
    redis_server: RedisServer,
    tmp_path: Path,
) -> None:
    """A real Prometheus scrapes a relay carrying streams (queued, cut, left, slow, failed)
    and one whose shared limits store went away and came back: every panel's query parses
    and returns data (the per-relay panels, for each relay they concern), and the rules
    file loads and evaluates."""
    relay, store_relay, prometheus = monitored
    slow_reader(relay)
    store_traffic(store_relay, redis_server)
    every = {f"127.0.0.1:{admin_port(r)}" for r in (relay, store_relay)}
    concerned = {
        "every relay": every,
        "the relay with a store": {f"127.0.0.1:{admin_port(store_relay)}"},
    }
    queries = dashboard_queries()
    missing: list[str] = []
    deadline = time.monotonic() + WAIT
    while True:
        traffic(relay)
        missing = []
        for title, expr in queries:
            answer = prometheus.query(expr)
            assert answer["status"] == "success", f"{title}: {expr}: {answer.get('error')}"
            result = answer["data"]["result"]
            if not result:
                missing.append(f"{title}: {expr}")
            elif title in PER_INSTANCE:
                shown = {series["metric"].get("instance") for series in result}
                if shown != concerned[PER_INSTANCE[title]]:
                    missing.append(f"{title}: {expr}: instances {sorted(map(str, shown))}")
        if not missing or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    detail = "\n".join(missing)
    assert not missing, f"queries without data (or not for the relays they concern):\n{detail}"
    # The rules file loads into a real Prometheus and every rule evaluates cleanly.
    text = RULES.read_text()
    assert len(prometheus_rules(prometheus)) == text.count("- record:") + text.count("- alert:")
    eventually(lambda: all(evaluated(rule) for rule in prometheus_rules(prometheus)), WAIT)
    for rule in prometheus_rules(prometheus):
        assert rule["health"] == "ok", rule
    up = prometheus.query('up{job="relay"}')["data"]["result"]
    assert [sample["value"][1] for sample in up] == ["1", "1"]
    render_check(prometheus, tmp_path)


def render_check(prometheus: Prometheus, tmp_path: Path) -> None:
    """deploy/grafana/render.py draws the dashboard from the same Prometheus."""
    if importlib.util.find_spec("matplotlib") is None:
        return  # the renderer is optional (relay[bench]); the queries are checked above
    spec = importlib.util.spec_from_file_location("render", RENDER)
    assert spec is not None and spec.loader is not None
    render = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(render)
    out = tmp_path / "dashboard.png"
    render.render(prometheus.url, out, minutes=0.5, rate_interval="10s")
    assert out.read_bytes().startswith(b"\x89PNG")


def evaluated(rule: dict[str, Any]) -> bool:
    # Never evaluated: Go's zero time, 0001-01-01.
    return not rule.get("lastEvaluation", "0001").startswith("0001")


def prometheus_rules(prometheus: Prometheus) -> list[dict[str, Any]]:
    groups = prometheus.api("rules")["data"]["groups"]
    return [rule for group in groups for rule in group["rules"]]
