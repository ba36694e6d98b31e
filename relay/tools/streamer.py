"""A fast SGLang-like token streamer: relay's demo upstream and the bench's.

Pure asyncio (no web framework) so that it is never the bottleneck when relay
is measured: h11 parses each request head; the response is written directly,
one SSE event per chunk (``burst`` events per write), scheduled with
``loop.call_at`` per stream. Every token event carries ``"relay_sent_ns"``,
``time.monotonic_ns()`` taken just before its write: CLOCK_MONOTONIC is shared
by all processes of one machine, so a client can compute the latency added
on the way as its own arrival time minus that stamp.

The events come from :mod:`relay.http.streamevents`, which relay's own
``--test-stream`` uses too. Endpoints: ``POST /v1/chat/completions`` and
``/v1/completions`` (streaming or not), ``GET /v1/models``, ``GET /health``.
Per-request overrides in the JSON body: ``max_tokens``, ``relay_ttft_ms``,
``relay_gap_ms``, ``relay_burst``.
"""

from __future__ import annotations

import asyncio
import json
import signal
import sys
import time
from collections.abc import Sequence
from typing import cast

import h11

from ..cliparse import OneLineParser
from ..http.streamevents import (
    EventBuilder,
    StreamerSettings,
    completion_document,
    overrides,
)

__all__ = ["Streamer", "StreamerSettings", "main", "start_streamer"]

MAX_REQUEST_BYTES = 1024 * 1024


def _head(status: int, content_type: bytes, length: int | None) -> bytes:
    reason = {200: b"OK", 400: b"Bad Request", 404: b"Not Found"}.get(status, b"")
    framing = b"transfer-encoding: chunked" if length is None else b"content-length: %d" % length
    return b"HTTP/1.1 %d %b\r\ncontent-type: %b\r\n%b\r\nserver: relay-streamer\r\n\r\n" % (
        status,
        reason,
        content_type,
        framing,
    )


def _json_response(status: int, document: object) -> bytes:
    body = json.dumps(document, separators=(",", ":")).encode()
    return _head(status, b"application/json", len(body)) + body


class _Stream:
    """One streaming response in progress, paced by ``loop.call_at``."""

    def __init__(
        self,
        conn: _StreamerConnection,
        settings: StreamerSettings,
        chat: bool,
        model: str,
        include_usage: bool,
    ) -> None:
        self.conn = conn
        self.settings = settings
        self.events = EventBuilder(settings, chat=chat, model=model, include_usage=include_usage)
        self.handle: asyncio.TimerHandle | None = None

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self.next_at = loop.time() + self.settings.ttft
        self.handle = loop.call_at(self.next_at, self.tick)

    def tick(self) -> None:
        self.handle = None
        conn = self.conn
        if conn.closed:
            return
        events = self.events
        payload = events.next_events()
        last = events.done
        # The stamp goes in last, just before the write.
        payload = events.stamp(payload, time.monotonic_ns())
        chunk = b"%x\r\n%b\r\n" % (len(payload), payload)
        if last:
            chunk += b"0\r\n\r\n"
        conn.transport.write(chunk)
        if last:
            conn.stream_finished()
            return
        loop = conn.loop
        self.next_at = max(self.next_at + self.settings.gap, loop.time())
        self.handle = loop.call_at(self.next_at, self.tick)

    def cancel(self) -> None:
        if self.handle is not None:
            self.handle.cancel()
            self.handle = None


class _StreamerConnection(asyncio.Protocol):
    def __init__(self, streamer: Streamer) -> None:
        self.streamer = streamer
        self.loop = asyncio.get_running_loop()
        self.h11 = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_REQUEST_BYTES)
        self.closed = False
        self.stream: _Stream | None = None
        self.request: h11.Request | None = None
        self.body = bytearray()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.streamer.connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.streamer.connections.discard(self)
        if self.stream is not None:
            self.stream.cancel()

    def data_received(self, data: bytes) -> None:
        self.h11.receive_data(data)
        self._process()

    def _process(self) -> None:
        while not self.closed and self.stream is None:
            try:
                event = self.h11.next_event()
            except h11.RemoteProtocolError:
                self.transport.write(_json_response(400, {"error": {"message": "bad request"}}))
                self.transport.close()
                return
            if event is h11.NEED_DATA or event is h11.PAUSED:
                return
            if isinstance(event, h11.Request):
                self.request = event
                self.body.clear()
            elif isinstance(event, h11.Data):
                if len(self.body) + len(event.data) > MAX_REQUEST_BYTES:
                    self.transport.close()
                    return
                self.body += event.data
            elif isinstance(event, h11.EndOfMessage):
                self._respond()
            elif isinstance(event, h11.ConnectionClosed):
                self.transport.close()
                return

    def _respond(self) -> None:
        request = self.request
        assert request is not None
        path = request.target.split(b"?", 1)[0]
        defaults = self.streamer.settings
        if request.method == b"GET" and path == b"/health":
            self._finish(_head(200, b"text/plain", 0))
        elif request.method == b"GET" and path == b"/v1/models":
            document = {
                "object": "list",
                "data": [{"id": defaults.model, "object": "model", "owned_by": "relay-demo"}],
            }
            self._finish(_json_response(200, document))
        elif request.method == b"POST" and path in (b"/v1/chat/completions", b"/v1/completions"):
            try:
                body = json.loads(self.body or b"{}")
                if not isinstance(body, dict):
                    raise ValueError("not an object")
                settings = overrides(defaults, body)
            except (ValueError, TypeError) as exc:
                message = f"invalid request body: {exc}"
                error = {"message": message, "type": "invalid_request_error", "code": 400}
                self._finish(_json_response(400, {"error": error}))
                return
            chat = path == b"/v1/chat/completions"
            model = str(body.get("model") or defaults.model)
            if body.get("stream"):
                options = body.get("stream_options") or {}
                include_usage = bool(isinstance(options, dict) and options.get("include_usage"))
                self.transport.write(_head(200, b"text/event-stream", None))
                self.stream = _Stream(self, settings, chat, model, include_usage)
                self.stream.start(self.loop)
            else:
                self.loop.call_later(
                    settings.ttft + settings.gap * max(settings.tokens - 1, 0),
                    self._complete_nonstreaming,
                    settings,
                    chat,
                    model,
                )
                self.stream = _Stream(self, settings, chat, model, False)  # marks busy
        else:
            error = {"message": "not found", "type": "invalid_request_error", "code": 404}
            self._finish(_json_response(404, {"error": error}))

    def _complete_nonstreaming(self, settings: StreamerSettings, chat: bool, model: str) -> None:
        if self.closed:
            return
        self._finish(_json_response(200, completion_document(settings, chat=chat, model=model)))

    def _finish(self, data: bytes) -> None:
        self.transport.write(data)
        self.stream_finished()

    def stream_finished(self) -> None:
        self.stream = None
        # The response went out without h11, so the next request gets a fresh
        # parser seeded with whatever is buffered (as relay does).
        leftover, closed = self.h11.trailing_data
        self.h11 = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_REQUEST_BYTES)
        if leftover:
            self.h11.receive_data(leftover)
        if closed:
            self.h11.receive_data(b"")
        self._process()


class Streamer:
    """A running streamer; :meth:`close` stops it and its streams."""

    def __init__(self, server: asyncio.Server, settings: StreamerSettings) -> None:
        self.server = server
        self.settings = settings
        self.connections: set[_StreamerConnection] = set()

    @property
    def port(self) -> int:
        return int(self.server.sockets[0].getsockname()[1])

    @property
    def url(self) -> str:
        host = self.server.sockets[0].getsockname()[0]
        host = f"[{host}]" if ":" in host else host
        return f"http://{host}:{self.port}"

    async def close(self) -> None:
        self.server.close()
        for conn in list(self.connections):
            conn.transport.close()
        await asyncio.wait_for(self.server.wait_closed(), 5)


async def start_streamer(
    host: str = "127.0.0.1", port: int = 0, settings: StreamerSettings | None = None
) -> Streamer:
    """Start serving on ``host:port`` (0 picks a free port)."""
    loop = asyncio.get_running_loop()
    holder: list[Streamer] = []

    def factory() -> _StreamerConnection:
        return _StreamerConnection(holder[0])

    server = await loop.create_server(factory, host, port, backlog=4096, reuse_address=True)
    streamer = Streamer(server, settings or StreamerSettings())
    holder.append(streamer)
    return streamer


async def _serve(host: str, port: int, settings: StreamerSettings) -> int:
    from ..ops.process import freeze_startup

    streamer = await start_streamer(host, port, settings)
    # As relay does: a full collection over thousands of streams would pause the
    # tokens, then send them in a burst that the proxy under test gets blamed for.
    freeze_startup()
    print(f"streamer listening on {streamer.url}", flush=True)
    loop = asyncio.get_running_loop()
    stop = loop.create_future()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, lambda: stop.done() or stop.set_result(None))
    await stop
    await streamer.close()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    from ..config import ConfigError, parse_count, parse_duration, parse_listen
    from ..core.server import run

    defaults = StreamerSettings()
    parser = OneLineParser(
        prog="python -m relay.tools.streamer",
        description="An SGLang-like token streamer: POST /v1/chat/completions and "
        "/v1/completions stream TOKENS tokens, the first after TTFT, then one every GAP.",
        epilog="Durations take ms/s/m (250ms, 0.25s, 0.25). A request body may override "
        "them: max_tokens, relay_ttft_ms, relay_gap_ms, relay_burst.",
    )
    parser.add_argument(
        "--listen",
        metavar="ADDR",
        default="127.0.0.1:0",
        help="HOST:PORT (default 127.0.0.1:0: a free port)",
    )
    parser.add_argument(
        "--tokens",
        metavar="N",
        default=str(defaults.tokens),
        help=f"tokens per stream (default {defaults.tokens})",
    )
    parser.add_argument(
        "--ttft",
        metavar="DURATION",
        default=f"{defaults.ttft * 1000:g}ms",
        help=f"time to the first token (default {defaults.ttft * 1000:g}ms)",
    )
    parser.add_argument(
        "--gap",
        metavar="DURATION",
        default=f"{defaults.gap * 1000:g}ms",
        help=f"time between tokens (default {defaults.gap * 1000:g}ms)",
    )
    parser.add_argument(
        "--burst",
        metavar="N",
        default=str(defaults.burst),
        help=f"token events per write (default {defaults.burst})",
    )
    parser.add_argument(
        "--model",
        default=defaults.model,
        help=f"model name it answers with (default {defaults.model})",
    )
    parser.add_argument(
        "--loop",
        choices=("auto", "uvloop", "asyncio"),
        default="auto",
        help="event loop (default auto: uvloop when installed)",
    )
    args = parser.parse_args(sys.argv[1:] if argv is None else list(argv))
    try:
        listen = parse_listen(args.listen)
        args.tokens = parse_count(args.tokens, "--tokens")
        args.burst = parse_count(args.burst, "--burst")
        args.ttft = parse_duration(args.ttft, "--ttft")
        args.gap = parse_duration(args.gap, "--gap")
        if args.burst < 1:
            raise ConfigError("--burst", "must be at least 1")
    except ConfigError as exc:
        parser.error(f"argument {exc}")
    settings = StreamerSettings(args.tokens, args.ttft, args.gap, args.burst, args.model)
    return run(_serve(listen.host or "0.0.0.0", listen.port, settings), args.loop)


if __name__ == "__main__":
    sys.exit(main())
