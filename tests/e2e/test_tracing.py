"""OpenTelemetry traces (``--otel``), checked against a real OTLP/HTTP receiver.

The receiver is a small HTTP server decoding the SDK's export requests with
``opentelemetry-proto`` (the protocol's own message classes), so what is
checked is what a collector would get: parentage from the client's
``traceparent`` through relay's span to the upstream, the attributes, the
first-token event, and the span of a stream the client cut.
"""

from __future__ import annotations

import gzip
import json
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from relayfixture import RelayThread, eventually
from sglang_app import SGLangServer

from relay.config import ModelMap
from relay.http.auth import NamedKey

trace_service = pytest.importorskip(
    "opentelemetry.proto.collector.trace.v1.trace_service_pb2",
    reason="opentelemetry-proto not installed (pip install 'relay[otel]' opentelemetry-proto)",
)

ROOT = Path(__file__).resolve().parents[2]
WAIT = 20.0
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
CLIENT_SPAN = "00f067aa0ba902b7"
KEY = NamedKey("team-a", "sk-secret-team-a")


class Receiver:
    """An OTLP/HTTP trace receiver on 127.0.0.1 (port 0); keeps every span it got."""

    def __init__(self) -> None:
        self.spans: list[tuple[Any, Any]] = []  # (resource, span)
        self.raw: list[bytes] = []
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                if self.headers.get("Content-Encoding") == "gzip":
                    body = gzip.decompress(body)
                request = trace_service.ExportTraceServiceRequest()
                request.ParseFromString(body)
                with receiver.lock:
                    receiver.raw.append(body)
                    for resource_spans in request.resource_spans:
                        for scope_spans in resource_spans.scope_spans:
                            for span in scope_spans.spans:
                                receiver.spans.append((resource_spans.resource, span))
                answer = trace_service.ExportTraceServiceResponse().SerializeToString()
                self.send_response(200 if self.path == "/v1/traces" else 404)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1/traces"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def span_count(self) -> int:
        with self.lock:
            return len(self.spans)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver(monkeypatch: pytest.MonkeyPatch) -> Iterator[Receiver]:
    receiver = Receiver()
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", receiver.url)
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "50")  # ms: the test need not wait 5 s
    monkeypatch.setenv("OTEL_SERVICE_NAME", "relay-under-test")
    try:
        yield receiver
    finally:
        receiver.close()


def attributes(span: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in span.attributes:
        value = item.value
        out[item.key] = getattr(value, value.WhichOneof("value"))
    return out


def chat(**fields: Any) -> dict[str, Any]:
    return {
        "model": "alias",
        "messages": [{"role": "user", "content": "hi"}],
        "stream": True,
        "stream_options": {"include_usage": True},
        "max_tokens": 5,
        **fields,
    }


def test_a_span_per_exchange_joins_the_clients_trace_and_parents_the_upstream_request(
    loop_kind: str, receiver: Receiver
) -> None:
    """relay's span is the child of the client's traceparent, the upstream request carries
    relay's span as its parent, and the span holds the HTTP and GenAI attributes, relay's
    own facts (ending, TTFT, reads coalesced, the key's name but never the key) and a
    first-token event; a stream the client cut has its span too, ended client_gone."""
    upstream = SGLangServer().start()
    upstream_port = upstream.port
    relay = RelayThread(
        upstream.url,
        loop_kind=loop_kind,
        otel=True,
        api_keys=(KEY,),
        model_map=ModelMap({"alias": "test-model"}),
    ).start()
    try:
        auth = {"authorization": f"Bearer {KEY.key}"}
        traceparent = f"00-{TRACE_ID}-{CLIENT_SPAN}-01"
        with httpx.Client(base_url=relay.url, timeout=WAIT) as client:
            with client.stream(
                "POST",
                "/v1/chat/completions",
                json=chat(test_gap_ms=5),
                headers={**auth, "traceparent": traceparent, "tracestate": "vendor=1"},
            ) as answer:
                assert answer.status_code == 200
                body = b"".join(answer.iter_raw())
            assert body.endswith(b"data: [DONE]\n\n")
            # No traceparent: a trace of its own.
            assert client.get("/v1/models", headers=auth).status_code == 200
        # A client that leaves after the first token of its stream.
        payload = json.dumps(chat(max_tokens=500, test_gap_ms=10)).encode()
        with socket.create_connection(("127.0.0.1", relay.port), timeout=WAIT) as sock:
            sock.sendall(
                b"POST /v1/chat/completions HTTP/1.1\r\nHost: relay\r\n"
                b"Authorization: Bearer %b\r\nContent-Type: application/json\r\n"
                b"Content-Length: %d\r\n\r\n%b" % (KEY.key.encode(), len(payload), payload)
            )
            seen = b""
            while b"data:" not in seen:  # the first token came: then the client leaves
                data = sock.recv(65536)
                assert data, seen
                seen += data
            assert seen.startswith(b"HTTP/1.1 200")
        eventually(lambda: receiver.span_count() >= 3, WAIT)
    finally:
        relay.stop()
        upstream.stop()

    spans = {attributes(span)["relay.ending"] + " " + span.name: span for _, span in receiver.spans}
    assert set(spans) == {
        "complete POST /v1/chat/completions",
        "complete GET",
        "client_gone POST /v1/chat/completions",
    }, list(spans)
    resource = {a.key: a.value.string_value for a in receiver.spans[0][0].attributes}
    assert resource["service.name"] == "relay-under-test"

    # Parentage: client -> relay -> upstream.
    streamed = spans["complete POST /v1/chat/completions"]
    assert streamed.trace_id.hex() == TRACE_ID
    assert streamed.parent_span_id.hex() == CLIENT_SPAN
    assert streamed.kind == streamed.SPAN_KIND_SERVER
    headers = [dict(r["headers"]) for r in upstream.sglang.requests]
    assert headers[0][b"traceparent"] == f"00-{TRACE_ID}-{streamed.span_id.hex()}-01".encode()
    assert headers[0][b"tracestate"] == b"vendor=1"
    assert sum(1 for h in headers[0] if h == b"traceparent") == 1

    seen = attributes(streamed)
    assert seen["http.request.method"] == "POST"
    assert seen["url.path"] == "/v1/chat/completions"
    assert seen["http.response.status_code"] == 200
    assert seen["server.address"] == "127.0.0.1"
    assert seen["server.port"] == upstream_port
    assert seen["gen_ai.operation.name"] == "chat"
    assert seen["gen_ai.request.model"] == "alias"
    assert seen["relay.forwarded_model"] == "test-model"
    assert seen["gen_ai.usage.input_tokens"] == 3
    assert seen["gen_ai.usage.output_tokens"] == 5
    assert seen["relay.key"] == "team-a"
    assert seen["relay.reads_coalesced"] == 0
    assert 0 < seen["relay.ttft_s"] < WAIT
    assert seen["relay.bytes_out"] > len(body)  # on the wire: chunk framing included
    assert streamed.status.code == streamed.status.STATUS_CODE_UNSET
    (event,) = streamed.events
    assert event.name == "gen_ai.first_token"
    assert streamed.start_time_unix_nano < event.time_unix_nano < streamed.end_time_unix_nano
    ttft_ns = event.time_unix_nano - streamed.start_time_unix_nano
    assert ttft_ns >= seen["relay.ttft_s"] * 1e9 - 1e6  # from the request, not before it

    # A request without traceparent starts a trace of its own.
    models = spans["complete GET"]
    assert models.trace_id.hex() != TRACE_ID
    assert not models.parent_span_id
    assert attributes(models)["http.response.status_code"] == 200

    # The stream the client cut.
    cut = spans["client_gone POST /v1/chat/completions"]
    cut_seen = attributes(cut)
    assert cut_seen["http.response.status_code"] == 200
    assert cut_seen["relay.key"] == "team-a"
    assert 0 < cut_seen["relay.ttft_s"] < WAIT
    assert cut.status.code == cut.status.STATUS_CODE_UNSET  # leaving is not a failure
    assert [e.name for e in cut.events] == ["gen_ai.first_token"]
    assert cut.trace_id != streamed.trace_id
    assert headers[-1][b"traceparent"].decode().split("-")[2] == cut.span_id.hex()

    # The key itself is nowhere in what relay exported.
    assert not any(KEY.key.encode() in raw for raw in receiver.raw)


def test_a_span_for_an_upstream_cut_stream_is_an_error(
    receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A stream the upstream broke mid-body ends its span upstream_cut, with an error
    status; the span still queued when relay stops is exported before it has stopped."""
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "600000")  # only the flush at close sends
    upstream = SGLangServer().start()
    relay = RelayThread(upstream.url, otel=True).start()
    try:
        with httpx.Client(base_url=relay.url, timeout=WAIT) as client:
            with pytest.raises(httpx.RemoteProtocolError):
                body = chat(test_die_after=2)
                with client.stream("POST", "/v1/chat/completions", json=body) as answer:
                    for _ in answer.iter_raw():
                        pass
        assert receiver.span_count() == 0  # queued, not sent yet
    finally:
        relay.stop()
        upstream.stop()
    ((_, span),) = receiver.spans
    seen = attributes(span)
    assert seen["relay.ending"] == "upstream_cut"
    assert "relay.key" not in seen  # no keys configured: no key name
    assert span.status.code == span.status.STATUS_CODE_ERROR


SCRIPT = """
import asyncio, sys
from relay.config import Config, parse_listen, parse_upstream
from relay.core.server import RelayServer
from relay.ops.service import admin_protocol

async def main():
    config = Config(listen=parse_listen("127.0.0.1:0"), upstream=parse_upstream("{upstream}"),
                    otel={otel})
    server = await RelayServer.start(config, admin=admin_protocol)
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(b"GET /v1/models HTTP/1.1\\r\\nHost: relay\\r\\nConnection: close\\r\\n\\r\\n")
    answer = await asyncio.wait_for(reader.read(), 10)
    assert answer.startswith(b"HTTP/1.1 200"), answer
    await server.close()
    print(sorted(name for name in sys.modules if name.startswith("opentelemetry")))

asyncio.run(main())
"""


@pytest.mark.parametrize("otel", [False, True])
def test_without_otel_relay_imports_nothing_of_opentelemetry(
    otel: bool, receiver: Receiver
) -> None:
    """A relay serving a request without --otel has no opentelemetry module loaded; with
    --otel it has (the check can fail)."""
    upstream = SGLangServer().start()
    try:
        script = SCRIPT.replace("{upstream}", upstream.url).replace("{otel}", str(otel))
        done = subprocess.run(
            [sys.executable, "-c", script],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
        )
    finally:
        upstream.stop()
    assert done.returncode == 0, done.stderr
    loaded = done.stdout.strip().splitlines()[-1]
    if otel:
        assert "opentelemetry.sdk.trace" in loaded
        assert receiver.span_count() == 1
    else:
        assert loaded == "[]"
        assert receiver.span_count() == 0


def test_otel_without_the_sdk_is_a_one_line_error_naming_the_flag() -> None:
    """--otel where the OpenTelemetry SDK is not installed: exit 2 and one line naming
    the flag and the extra to install, no traceback."""
    script = (
        "import sys; sys.modules['opentelemetry'] = None\n"
        "from relay.cli import main\n"
        "sys.exit(main(['--upstream', '127.0.0.1:9', '--listen', '127.0.0.1:0', '--otel']))\n"
    )
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert time.monotonic() - started < 60
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert "--otel" in lines[0] and "relay[otel]" in lines[0]


def test_each_worker_exports_its_own_spans(receiver: Receiver) -> None:
    """With --workers 2 every worker traces its exchanges and exports them; the parent,
    which serves no exchange, starts no tracer."""
    upstream = SGLangServer().start()
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "relay",
            "--listen",
            "127.0.0.1:0",
            "--upstream",
            upstream.url,
            "--workers",
            "2",
            "--otel",
        ],
        cwd=ROOT,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stderr is not None
        lines: list[str] = []
        while not any("listening on" in line for line in lines):
            line = process.stderr.readline()  # bounded: the workers start or exit
            assert line, "".join(lines)
            lines.append(line)
        port = int(lines[-1].split("listening on 127.0.0.1:")[1].split(",")[0])
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=WAIT) as client:
            for _ in range(6):
                answer = client.post("/v1/chat/completions", json=chat(stream=False))
                assert answer.status_code == 200
        eventually(lambda: receiver.span_count() == 6, WAIT)
    finally:
        process.terminate()
        _, rest = process.communicate(timeout=WAIT)
        upstream.stop()
    assert process.returncode == 0
    logged = lines + rest.splitlines()
    (started,) = [line for line in logged if "started 2 workers" in line]  # the parent's line
    parent = started.split("[")[1].split("]")[0]
    traced = [line for line in logged if "tracing on" in line]
    assert traced and not any(f"[{parent}]" in line for line in traced), traced
