"""relay's own paced SSE stream on the public listener (``--test-stream PATH``).

``relay probe https://public-name/PATH`` then measures every hop between a
user and relay (ingress, CDN, corporate proxy) without a GPU and without
touching the inference server. The events are the built-in streamer's
(:mod:`relay.http.streamevents`); the response head gets the same header
policy as a proxied event stream, so a hop in front treats it the same way.

A :class:`TestStream` is an :class:`~relay.core.exchange.Exchange` whose
"upstream" is a timer: it inherits the exchange's deadlines (a client that
stops reading is dropped after ``--client-send-timeout``), its endings, its
access line and the fidelity metrics, and it stops at once when the client
leaves. It sits behind the API key check like every other request.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl

import h11

from ..http.errors import RelayError
from ..http.fidelity import SelfRoute, route_test_stream
from ..http.framing import LAST_CHUNK, BodyKind, ClientFraming
from ..http.headers import origin_form, response_head
from ..http.headers import response_headers_for_client as client_headers
from ..http.requestplan import plan_request
from ..http.streamevents import EventBuilder, StreamerSettings, completion_document, overrides
from .exchange import ClientSide, Ending, Exchange, Phase

if TYPE_CHECKING:
    from .state import ServerState

__all__ = ["TEST_MODEL", "TestStream", "serve_test_stream"]

#: The model the test stream names (and lists at ``PATH/v1/models``).
TEST_MODEL = "relay-test-stream"
#: A test request's JSON body is a few overrides; more is refused (413).
MAX_TEST_BODY = 64 * 1024
#: Bounds on what a request may ask for: the stream is public (behind the keys).
MAX_TOKENS = 4096
MAX_TTFT = 900.0
MAX_GAP = 60.0
MAX_BURST = 64
#: Query parameters (for GET and curl) → the body fields they stand for.
_QUERY = {
    "tokens": "max_tokens",
    "ttft_ms": "relay_ttft_ms",
    "gap_ms": "relay_gap_ms",
    "burst": "relay_burst",
    "stream": "stream",
}


def serve_test_stream(client: Any, request: h11.Request, conn: h11.Connection) -> bool:
    """Answer ``request`` (parsed by ``conn``) with the test stream if it is under
    ``--test-stream``; returns whether it did (``client.exchange`` is then the stream).
    """
    state: ServerState = client.state
    prefix = state.config.test_stream
    if prefix is None:
        return False
    route, chat = route_test_stream(prefix, request.method, origin_form(request.target))
    if route is SelfRoute.NOT_OURS:
        return False
    waiting = conn.they_are_waiting_for_100_continue
    stream = TestStream(client, request, state=state, route=route, chat=chat, waiting=waiting)
    client.exchange = stream
    stream.start()
    return True


class TestStream(Exchange):
    """One request to the test stream, answered by relay itself."""

    __test__ = False  # not a pytest class, whatever its name

    def __init__(
        self,
        client: ClientSide,
        request: h11.Request,
        *,
        state: ServerState,
        route: SelfRoute,
        chat: bool,
        waiting: bool,
    ) -> None:
        relayed_nothing = plan_request(
            request.method,
            b"/",
            list(request.headers),
            rewrites_models=False,
            pins_model=False,
            routes_by_model=False,
            knows_more_models=False,
        )
        super().__init__(
            client,
            request,
            relayed_nothing,
            config=state.config,
            router=state.router,
            metrics=state.metrics,
            ticker=state.ticker,
            waiting_for_continue=waiting,
            inspect_budget=state.inspect_budget,
        )
        # relay answers itself: nothing to alias, route or hold.
        if self._inspection is not None:
            self._inspection.release()
        self._inspection = None
        self._route_by_body = self._lists_models = False
        self._route_kind = route
        self._chat = chat
        self._body = bytearray()
        self._events: EventBuilder | None = None
        self._tick_handle: asyncio.Handle | None = None
        self._next_at = 0.0
        self._stalled = False  # a tick found the client not reading: resume restarts
        self._chunked = client.http_version == b"1.1"

    # -- the request ------------------------------------------------------------
    def start(self) -> None:
        self._send_continue()

    @property
    def ready_for_body(self) -> bool:
        return True

    def request_data(self, data: bytes) -> None:
        self.request_bytes += len(data)
        self._last_client_byte = time.monotonic()
        if self.phase is Phase.DONE:
            return
        if len(self._body) + len(data) > MAX_TEST_BODY:
            self._fail(RelayError(413, "test stream request body too large"))
            return
        self._body += data

    def request_end(self) -> None:
        self.request_complete = True
        if self.phase is Phase.DONE:
            return
        self._sent_at = time.monotonic()
        if self._route_kind is SelfRoute.NOT_FOUND:
            self._fail(RelayError(404, "not found under the test stream path", "not_found"))
        elif self._route_kind is SelfRoute.MODELS:
            document = {
                "object": "list",
                "data": [{"id": TEST_MODEL, "object": "model", "owned_by": "relay"}],
            }
            self._answer_json(document)
        else:
            try:
                settings, stream = self._settings()
            except ValueError as exc:
                self._fail(RelayError(400, f"invalid test stream request: {exc}"))
                return
            if stream:
                self._start_stream(settings)
            else:
                self._answer_json(completion_document(settings, chat=self._chat, model=TEST_MODEL))

    def _settings(self) -> tuple[StreamerSettings, bool]:
        """The stream's settings from the JSON body and the query; ``ValueError`` if bad."""
        fields: dict[str, Any] = {}
        if self._body:
            try:
                document = json.loads(self._body)
            except ValueError:
                raise ValueError("the body is not JSON") from None
            if not isinstance(document, dict):
                raise ValueError("the body is not a JSON object")
            fields.update(document)
        query = origin_form(self.request.target).partition(b"?")[2].decode("latin-1")
        for name, value in parse_qsl(query):
            if name in _QUERY:
                fields[_QUERY[name]] = value.lower() in ("1", "true") if name == "stream" else value
        try:
            settings = overrides(StreamerSettings(model=TEST_MODEL), fields)
        except (TypeError, ValueError):
            message = "max_tokens, relay_ttft_ms, relay_gap_ms and relay_burst must be numbers"
            raise ValueError(message) from None
        if not (
            settings.tokens <= MAX_TOKENS
            and settings.ttft <= MAX_TTFT
            and settings.gap <= MAX_GAP
            and settings.burst <= MAX_BURST
        ):
            raise ValueError(
                f"at most {MAX_TOKENS} tokens, {MAX_TTFT:g} s to the first, "
                f"{MAX_GAP:g} s between tokens, {MAX_BURST} per write"
            )
        # A POST asks for a stream as the API does; a GET (curl) streams by default.
        stream = fields.get("stream", self.request.method == b"GET")
        return settings, bool(stream)

    # -- the answer ---------------------------------------------------------------
    def _keep_alive(self) -> bool:
        return (
            self.request_complete and self.client.http_version == b"1.1" and not self._client_closes
        )

    def _answer_json(self, document: object) -> None:
        self._answer(json.dumps(document, separators=(",", ":")).encode())

    def _start_stream(self, settings: StreamerSettings) -> None:
        self._keep_client = self._keep_alive()
        base = [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]
        # The header policy of a proxied event stream, so hops in front see the same.
        headers = client_headers(base, keep_framing=False, keep_trailer=False)
        if self._chunked:
            headers.append((b"transfer-encoding", b"chunked"))
        if not self._keep_client:
            headers.append((b"connection", b"close"))
        self.status = 200
        self.metrics.requests["relay", 200] += 1
        self.client.transport.write(
            response_head(200, b"", headers, http_version=self.client.http_version)
        )
        now = time.monotonic()
        self._head_at = self._last_upstream_byte = now
        framing = ClientFraming.SAME if self._chunked else ClientFraming.CLOSE
        body = BodyKind.CHUNKED if self._chunked else BodyKind.CLOSE
        self._fid.head(200, base, body, framing, None)  # whole events: always a boundary
        self._events = EventBuilder(settings, chat=self._chat, model=TEST_MODEL, include_usage=True)
        self.phase = Phase.BODY
        self._rearm()  # the client-send and keep-alive deadlines
        self._next_at = self._loop.time() + settings.ttft
        self._tick_handle = self._loop.call_at(self._next_at, self._tick)

    def _tick(self) -> None:
        self._tick_handle = None
        events = self._events
        if self.phase is not Phase.BODY or events is None:
            return
        if self.client.writing_paused:
            self._stalled = True  # resumed by client_resume_writing
            return
        payload = events.stamp(events.next_events(), time.monotonic_ns())
        data = b"%x\r\n%b\r\n" % (len(payload), payload) if self._chunked else payload
        now = time.monotonic()
        if self._first_byte_at is None:
            self._first_byte_at = now
        self._last_upstream_byte = now
        backlog = self._client_backlog()
        if backlog or self._fid.per_read:
            self._fid.read(data, len(data), backlog, None)
        self.bytes_to_client += len(data)
        self.client.transport.write(data)
        if events.done:
            if self._chunked:
                self.client.transport.write(LAST_CHUNK)
                self.bytes_to_client += len(LAST_CHUNK)
            self._end(Ending.COMPLETE)
            self.client.exchange_finished(keep_alive=self._keep_client)
            return
        self._next_at = max(self._next_at + events.settings.gap, self._loop.time())
        self._tick_handle = self._loop.call_at(self._next_at, self._tick)

    # -- flow control and the end ------------------------------------------------
    def client_resume_writing(self) -> None:
        super().client_resume_writing()
        if self._stalled and self.phase is Phase.BODY and self._tick_handle is None:
            self._stalled = False
            self._tick_handle = self._loop.call_soon(self._tick)

    def _end(self, ending: Ending) -> None:
        super()._end(ending)
        if self._tick_handle is not None:
            self._tick_handle.cancel()
            self._tick_handle = None
