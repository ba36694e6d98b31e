"""The client side of the wire: one ``asyncio.Protocol`` per accepted connection.

h11 (as SERVER) parses request heads, and chunked request bodies. Each
request/response cycle gets a fresh ``h11.Connection``: relay writes the
response body itself, byte for byte, so h11's own writer state would never
reach DONE; the bytes h11 holds beyond the request (pipelined requests) are
carried over with ``trailing_data``, and requests are answered strictly in
order. A body of known length (``Content-Length``, or none at all) is counted
off by relay itself once h11 has parsed its head: h11's events for it cost
more than the rest of the body's way, and there is nothing in
such a body to parse.

While an exchange is in flight relay keeps reading from the client, so that a
client that goes away is noticed at once (and the upstream generation is
stopped), but what it buffers from a pipelining client is bounded: past
``max_header_bytes`` it stops reading.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, cast

import h11

from ..http.errors import RelayError, error_response, protocol_error_message
from ..http.fidelity import ending_for_status
from ..http.headers import (
    RequestHeadProblem,
    check_request_headers,
    find_head_problem,
    head_ended,
    head_length,
)
from .accesslog import log_exchange
from .exchange import Ending, Exchange, ModelListAnswer, Phase, request_plan
from .teststream import serve_test_stream
from .upstream import set_nodelay

if TYPE_CHECKING:
    from .state import ServerState

__all__ = ["ClientConnection"]

log = logging.getLogger("relay.events")

#: Write buffer water marks: the client's transport pauses the upstream's
#: reads above HIGH and resumes them below LOW (websockets and uvicorn use
#: the same asyncio defaults); memory per stream is bounded by HIGH + one read.
WRITE_HIGH = 64 * 1024
WRITE_LOW = 16 * 1024

#: How long an answered client may go on sending a request body that relay
#: drops (nginx's lingering_time is 30 s; a body that long is not worth it).
LINGER_TIME = 5.0


class ClientConnection(asyncio.Protocol):
    """One client connection, carrying requests one after another."""

    transport: asyncio.Transport

    def __init__(self, state: ServerState) -> None:
        self.state = state
        self.config = state.config
        self.client_host = "unknown"
        self.scheme = "https" if state.server_tls is not None else "http"
        self.checks_keys = bool(state.keys)
        self.http_version = b"1.1"
        self.exchange: Exchange | None = None
        self._h11 = self._new_h11()
        self._head_bytes = bytearray()  # raw bytes of the current request head
        self._reading_head = True
        self._unprocessed = 0  # bytes fed to h11 while events were not pulled
        self.writing_paused = False  # the client's write buffer is above its high mark
        self._paused_for_buffer = False
        self._paused_for_upstream = False
        # Waiting in the head pacer's queue for a loop turn with budget to
        # start the request its buffered bytes begin (reading paused meanwhile).
        self._deferred = False
        self._pacer = state.head_pacer
        self._starting = False  # inside _start_timed: a request's start is under way
        self._closed = False
        # A body of known length read without h11 (see the module docstring):
        # the bytes still to come, and what came and was not taken yet (body
        # the exchange cannot take now, then the next request's bytes).
        self._own_body = False
        self._body_left = 0
        self._pending = bytearray()
        self._pending_eof = False  # h11 had seen the end of the input
        self._cycle_started = time.monotonic()
        self._idle = True
        # The deadline of the current wait (keep-alive or head), checked by the
        # server's ticker; 0 while an exchange owns the deadlines.
        self._deadline = 0.0
        self._linger: asyncio.TimerHandle | None = None

    def _new_h11(self) -> h11.Connection:
        return h11.Connection(h11.SERVER, max_incomplete_event_size=self.config.max_header_bytes)

    # -- asyncio.Protocol -----------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = transport = cast(asyncio.Transport, transport)
        set_nodelay(transport)
        transport.set_write_buffer_limits(high=WRITE_HIGH, low=WRITE_LOW)
        peer = transport.get_extra_info("peername")
        if isinstance(peer, tuple) and peer:
            self.client_host = str(peer[0])
        state = self.state
        state.metrics.connections_accepted += 1
        if state.draining or len(state.connections) >= self.config.max_connections:
            state.metrics.connections_rejected += 1
            reason = "relay is shutting down" if state.draining else "too many connections"
            log.warning("rejecting connection from %s: %s", self.client_host, reason)
            transport.write(error_response(RelayError(503, reason, "unavailable")))
            self._closed = True
            transport.close()
            return
        state.connections.add(self)
        self._deadline = time.monotonic() + self.config.client_keepalive_timeout
        state.ticker.schedule(self, self._deadline)

    def data_received(self, data: bytes) -> None:
        if self._closed:
            return
        if self._idle:
            self._idle = False
            self._cycle_started = time.monotonic()
            self._deadline = self._cycle_started + self.config.client_head_timeout
            self.state.ticker.schedule(self, self._deadline)  # may be before the keep-alive's
        if self._own_body:
            self._body_data(data)
            return
        self._h11.receive_data(data)
        self._unprocessed += len(data)
        if not self._reading_head:
            self._process()  # a chunked body or a pipelined request: never deferred
            return
        self._head_bytes += data
        if not self._deferred:
            self._start_or_defer(len(data))
        # else: it waits in h11's buffer for the connection's turn (reading is paused)

    def eof_received(self) -> bool | None:
        exchange = self.exchange
        if exchange is not None and exchange.phase is not Phase.DONE:
            # Like nginx, a client that half-closes mid-exchange is gone:
            # stop the generation instead of computing tokens for no one.
            exchange.abort(Ending.CLIENT_GONE)
            self.exchange = None
        return None  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        self.state.connections.discard(self)
        self._leave_pacer(Ending.CLIENT_GONE)
        self._cancel_timer()
        self._cancel_linger()
        exchange, self.exchange = self.exchange, None
        if exchange is not None and exchange.phase is not Phase.DONE:
            exchange.abort(Ending.CLIENT_GONE)
        self.state.exchange_settled()

    def pause_writing(self) -> None:
        self.writing_paused = True
        if self.exchange is not None:
            self.exchange.client_pause_writing()

    def resume_writing(self) -> None:
        self.writing_paused = False
        if self.exchange is not None:
            self.exchange.client_resume_writing()

    # -- starting a request: a share of each loop turn --------------------------------
    def _start_or_defer(self, new: int) -> None:
        """Parse the buffered head and start its request now, or in a later turn.

        When this loop turn's budget for new requests is spent (a burst of
        heads arrived in one poll; see ``core/headpacer.py``), the connection
        stops reading and waits in the pacer's FIFO, so the token reads of
        streams already open go first. The head deadline keeps running from
        when the head began to arrive. Only a whole head waits: a piece of one
        (its last ``new`` bytes just came) starts nothing and is taken at once,
        so a head that comes in pieces waits once, not at the back of the
        queue once per piece.
        """
        pacer = self._pacer
        if pacer.may_start() and not self._starting:
            self._start_timed()
            return
        if not head_ended(self._head_bytes, new):
            self._process()  # h11 needs more (or refuses what it has)
            return
        self._deferred = True
        self.state.metrics.starts_deferred += 1
        self._update_reading()  # pause: nothing more is read until its turn
        pacer.defer(self)

    def start_request(self) -> None:
        """The pacer's turn came: start the request the buffered bytes begin."""
        if not self._deferred or self._closed:
            return
        self._deferred = False
        try:
            self._start_timed()
        except Exception:
            # As a transport does when data_received raises: the connection is
            # in no known state (the head may be taken, with no exchange and no
            # deadline), so it goes; connection_lost cleans up. The pacer logs.
            self.transport.abort()
            raise
        self._update_reading()  # read again, unless something else holds it

    def _start_timed(self) -> None:
        clock = self._pacer.clock
        started = clock()
        # A request relay answers at once ends inside its own start, and the
        # next pipelined one must not start from there: a frame deeper per
        # request, with none of it counted until the outermost start returns.
        self._starting = True
        try:
            self._process()
        finally:
            self._starting = False
        self._pacer.spent(clock() - started)

    def _leave_pacer(self, ending: Ending | None = None) -> None:
        """Leave the queue; with ``ending``, the connection ends and so does the
        request that waited in it (``None``: that request is answered otherwise)."""
        if not self._deferred:
            return
        self._deferred = False
        self._pacer.discard(self)
        if ending is None:
            return
        # relay read this request whole: like every request, it gets one
        # access line and one count in the endings, though it never started.
        try:
            event = self._h11.next_event()
        except h11.RemoteProtocolError as exc:
            exc.__traceback__ = None  # see _process
            event = None
        request = event if isinstance(event, h11.Request) else None
        self._log_unstarted(request, None, ending.value)

    def _log_unstarted(
        self, request: h11.Request | None, status: int | None, ending: str, key: str | None = None
    ) -> None:
        """The access line and the endings count of a request that had no exchange."""
        self.state.metrics.endings[ending, "false"] += 1
        log_exchange(
            client=self.client_host,
            method=b"-" if request is None else request.method,
            target=b"-" if request is None else request.target,
            status=status,
            upstream="-",
            requested_model=None,
            forwarded_model=None,
            bytes_in=0,
            bytes_out=0,
            head_s=None,
            ttft_s=None,
            total_s=time.monotonic() - self._cycle_started,
            ending=ending,
            key=key,
        )

    # -- request processing ------------------------------------------------
    def _process(self) -> None:
        conn = self._h11
        while not self._closed:
            exchange = self.exchange
            if exchange is not None and not exchange.ready_for_body:
                break  # hold the body in h11's buffer until the upstream is there
            try:
                event = conn.next_event()
            except h11.RemoteProtocolError as exc:
                # h11 re-raises from a frame that holds the exception: without
                # its traceback, no cycle is left for the collector.
                exc.__traceback__ = None
                self._protocol_error(exc)
                return
            if event is h11.NEED_DATA:
                self._unprocessed = 0
                break
            if event is h11.PAUSED:
                break
            if isinstance(event, h11.Request):
                self._on_request(event)
                if self._own_body:
                    data, self._pending_eof = conn.trailing_data
                    no_body = not self._body_left
                    self._take_body(data)
                    if no_body:  # the request ends with its head
                        self._body_done()
                    return
            elif isinstance(event, h11.Data):
                self._on_body(event.data)
            elif isinstance(event, h11.EndOfMessage):
                if self.exchange is not None:
                    self.exchange.request_end()
            elif isinstance(event, h11.ConnectionClosed):
                self.close()
                return
        self._bound_buffer()

    # -- a body of known length, without h11 -----------------------------------------
    def _body_data(self, data: bytes) -> None:
        if self._pending or not self._body_wanted():
            self._pending += data  # in order, after what already waits
            self._unprocessed = len(self._pending)
            self._bound_buffer()
            return
        self._take_body(data)

    def _body_wanted(self) -> bool:
        """Whether the exchange takes body bytes now (false: they wait, bounded)."""
        exchange = self.exchange
        return self._body_left > 0 and (exchange is None or exchange.ready_for_body)

    def _take_body(self, data: bytes) -> None:
        """``data`` continues the input: the body's part goes on; the rest waits,
        for the exchange (not ready for body yet) or for the next cycle."""
        left = self._body_left
        body = b""
        if left and self._body_wanted():
            body = data if len(data) <= left else data[:left]
            self._body_left = left = left - len(body)
            data = data[len(body) :] if len(body) < len(data) else b""
        if data:
            self._pending += data
        self._unprocessed = len(self._pending)
        self._bound_buffer()
        if body:
            self._on_body(body)
            if not left:
                self._body_done()

    def _body_done(self) -> None:
        if not self._closed and self.exchange is not None:
            self.exchange.request_end()

    def _body_unread(self) -> bool:
        """Whether the client may still be sending this request's body."""
        if self._own_body:
            return self._body_left > 0
        return self._h11.their_state is h11.SEND_BODY

    def _bound_buffer(self) -> None:
        """Stop reading while h11 holds more unprocessed bytes than a head may be."""
        over = self._unprocessed > self.config.max_header_bytes
        if over != self._paused_for_buffer:
            self._paused_for_buffer = over
            self._update_reading()

    def hold_reading(self, paused: bool) -> None:
        """Backpressure from the upstream: its write buffer is full (or drained)."""
        self._paused_for_upstream = paused
        self._update_reading()

    def _update_reading(self) -> None:
        if self._closed:
            return
        if self._paused_for_buffer or self._paused_for_upstream or self._deferred:
            self.transport.pause_reading()
        else:
            self.transport.resume_reading()

    def _on_request(self, request: h11.Request) -> None:
        self._reading_head = False
        raw_head = bytes(self._head_bytes)
        self._head_bytes.clear()
        cfg = self.config
        self._deadline = 0.0  # the exchange owns the deadlines from here
        if request.http_version not in (b"1.0", b"1.1"):
            # h11 reads any HTTP/d.d; relay serves HTTP/1.0 and 1.1 only, and
            # must not forward an HTTP/2.0 or 0.9 request as if it were 1.1.
            self._refuse(request, RelayError(505, "only HTTP/1.0 and HTTP/1.1 are supported"))
            return
        self.http_version = request.http_version
        if head_length(raw_head) > cfg.max_header_bytes:
            # h11 bounds only heads still incomplete; one that arrived whole
            # in a single read is measured here.
            self._refuse(
                request,
                RelayError(431, "request head too large", "request_header_fields_too_large"),
            )
            return
        problem = find_head_problem(raw_head)
        if problem is not None:
            self._refuse(request, RelayError(400, problem))
            return
        fields = list(request.headers)  # (lower-case name, value), read once
        try:
            check_request_headers(fields)
        except RequestHeadProblem as exc:
            self._refuse(request, RelayError(exc.status, str(exc)))
            return
        if self.state.draining:
            self._refuse(request, RelayError(503, "relay is shutting down", "unavailable"))
            return
        key = self.state.keys.match(fields) if self.checks_keys else None  # the key's name
        if self.checks_keys and key is None:
            self._refuse(
                request,
                RelayError(
                    401,
                    "missing or invalid API key",
                    "invalid_api_key",
                    ((b"www-authenticate", b"Bearer"),),
                ),
            )
            return
        if request.method == b"CONNECT":
            self._refuse(request, RelayError(405, "CONNECT is not supported", "method_not_allowed"))
            return
        for name, value in fields:
            if (
                len(name) == 14
                and name.lower() == b"content-length"
                and int(value) > cfg.max_body_bytes
            ):
                self._refuse(
                    request, RelayError(413, "request body too large", "request_too_large"), key
                )
                return
        # Per-key limits (core/admission.py): 429 before the upstream sees anything.
        # relay's own paced stream (--test-stream): behind the key check, not the limits.
        if cfg.test_stream is not None and serve_test_stream(self, request, self._h11):
            return
        ticket = self.state.admission.admit(key, self.client_host)
        if isinstance(ticket, RelayError):
            self._refuse(request, ticket, key)
            return
        router = self.state.router
        plan = request_plan(request, fields, cfg, router)
        # relay answers the merged model list itself; everything else is relayed.
        kind = ModelListAnswer if plan.lists_models else Exchange
        exchange = kind(
            self,
            request,
            plan,
            config=cfg,
            router=router,
            metrics=self.state.metrics,
            waiting_for_continue=self._h11.they_are_waiting_for_100_continue,
            inspect_budget=self.state.inspect_budget,
            ticker=self.state.ticker,
            ticket=ticket,  # limits, queue slot and usage of this exchange
            tracing=self.state.tracing,
        )
        self.exchange = exchange
        # Not chunked: relay counts the body off itself (none at all is length 0).
        self._own_body = not plan.chunked
        self._body_left = int(plan.length) if plan.length is not None else 0
        exchange.start()

    def _refuse(
        self, request: h11.Request | None, error: RelayError, key: str | None = None
    ) -> None:
        """Answer a request relay refuses itself, before any exchange: like every
        request, it gets one access line and one count in the endings (method and
        path ``-`` for a head relay could not read, as nginx logs one)."""
        self._log_unstarted(request, error.status, ending_for_status(error.status, error.code), key)
        self.send_error(error)

    def _on_body(self, data: bytes) -> None:
        exchange = self.exchange
        if exchange is None or exchange.phase is Phase.DONE:
            return
        if exchange.request_bytes + len(data) > self.config.max_body_bytes:
            if exchange.phase is Phase.BODY:
                exchange.abort(Ending.LIMIT)  # fidelity: a limit, not an error
                self.close()
            else:
                exchange.abort(Ending.LIMIT)  # fidelity: a limit, not an error
                self.send_error(RelayError(413, "request body too large", "request_too_large"))
            return
        exchange.request_data(data)

    def _protocol_error(self, exc: h11.RemoteProtocolError) -> None:
        status = exc.error_status_hint
        exchange = self.exchange
        if exchange is not None and exchange.phase is Phase.BODY:
            # The response already started: nothing to answer, just stop.
            exchange.abort(Ending.ERROR)
            self.close()
            return
        # h11's text quotes the offending line (it may hold an API key): it
        # is neither logged nor sent; a fixed message names the problem.
        error = RelayError(status, protocol_error_message(status, str(exc)))
        if exchange is not None:
            exchange.abort(Ending.ERROR)  # its access line is written there
            self.send_error(error)
        else:
            self._refuse(None, error)

    # -- called by the exchange ----------------------------------------------
    def exchange_ready_for_body(self) -> None:
        if self._closed:
            return
        if not self._own_body:
            self._process()
        elif self._pending and self._body_left:
            data = bytes(self._pending)
            self._pending.clear()
            self._take_body(data)

    def exchange_finished(self, *, keep_alive: bool) -> None:
        self.exchange = None
        self.state.exchange_settled()
        if self._closed:
            return
        if self._paused_for_upstream:
            # A hold set by that exchange's upstream ends with it: the next
            # request is read whatever state that connection was left in.
            self._paused_for_upstream = False
            self._update_reading()
        if not keep_alive or self.state.draining:
            self._close_after_answer()
            return
        # Next cycle: a fresh h11 connection, seeded with what is buffered.
        if self._own_body:
            data, closed = bytes(self._pending), self._pending_eof
            self._own_body = False
            self._body_left = 0
            self._pending.clear()
        else:
            data, closed = self._h11.trailing_data
        self._h11 = self._new_h11()
        self._reading_head = True
        self._head_bytes = bytearray(data)
        self._unprocessed = len(data)
        if data:
            self._h11.receive_data(data)
            self._idle = False
            self._cycle_started = time.monotonic()
            self._deadline = self._cycle_started + self.config.client_head_timeout
        else:
            self._idle = True
            self._deadline = time.monotonic() + self.config.client_keepalive_timeout
        self.state.ticker.schedule(self, self._deadline)
        if closed:
            self._h11.receive_data(b"")
        if data:
            self._start_or_defer(len(data))  # a pipelined request starts like any other
        else:
            self._process()  # nothing buffered: h11 has nothing to parse (or only the end)

    def send_error(self, error: RelayError) -> None:
        """Answer ``error`` (no response byte was sent yet) and close."""
        self.state.metrics.requests["relay", error.status] += 1
        log.info("%s %s -> %d %s", self.client_host, error.code, error.status, error.message)
        if not self._closed:
            self.transport.write(error_response(error, http_version=self.http_version))
        self._close_after_answer()

    def _close_after_answer(self) -> None:
        """Close after an answer, even one sent before the request body was all read.

        Closing a socket with unread bytes makes the kernel send a reset,
        which can destroy the answer before the client reads it (a client
        still uploading would see ECONNRESET instead of the 413 or 504). So,
        as nginx's lingering close does, relay shuts down its sending side
        and reads and drops what still comes, for a bounded time.
        """
        if self._closed or not self._body_unread():
            self.close()
            return
        if not self.transport.can_write_eof():
            self.close()  # TLS: no half-close
            return
        self._stop()
        self.transport.write_eof()
        self.transport.resume_reading()  # data_received drops it while closed
        self._linger = asyncio.get_running_loop().call_later(LINGER_TIME, self.transport.abort)

    def close_truncated(self) -> None:
        """Close after flushing what was written, without ending the message."""
        self.close()

    def drop(self) -> None:
        """Close at once, discarding unsent bytes: the client stopped reading."""
        self.close()
        self.transport.abort()

    def _stop(self, ending: Ending = Ending.ERROR) -> None:
        """No more requests: deadlines off, an exchange in flight aborted."""
        self._closed = True
        self._cancel_timer()
        self._leave_pacer(ending)
        exchange, self.exchange = self.exchange, None
        if exchange is not None and exchange.phase is not Phase.DONE:
            exchange.abort(ending)

    def close(self, ending: Ending = Ending.ERROR) -> None:
        """Close (flushing what was written); an exchange in flight ends as ``ending``."""
        if self._closed:
            return
        self._stop(ending)
        # close() flushes the write buffer first: what was relayed arrives. A
        # client that never reads it must not hold the socket (and its
        # --max-connections slot) forever, so the flush has a deadline.
        self.transport.close()
        if self.transport.get_write_buffer_size():
            self._linger = asyncio.get_running_loop().call_later(
                self.config.client_send_timeout, self.transport.abort
            )

    # -- deadlines --------------------------------------------------------------
    def _cancel_timer(self) -> None:
        self._deadline = 0.0
        self.state.ticker.unwatch(self)

    def _cancel_linger(self) -> None:
        if self._linger is not None:
            self._linger.cancel()
            self._linger = None

    def on_tick(self, now: float) -> float:
        if self._closed or self.exchange is not None or not self._deadline:
            return 0.0  # filed again when the exchange finishes
        if now < self._deadline:
            return self._deadline
        if self._idle:
            self.close()  # keep-alive expired: close quietly, as nginx does
            return 0.0
        self.state.metrics.timeouts += 1
        self._leave_pacer()  # its 408 is its access line
        self._refuse(None, RelayError(408, "request head not received in time", "timeout"))
        return 0.0
