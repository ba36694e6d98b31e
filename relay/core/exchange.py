"""One request and its response: the place where the two connections meet.

An :class:`Exchange` is created by the client connection for each request
head. When the pool has an idle connection it is attached at once; only a new
connection (or a retry) is awaited, in a task the exchange owns and cancels.
From then on everything is callbacks, and the hot path is
:meth:`Exchange.upstream_data`:

    upstream read -> framer finds the body's end -> client ``transport.write``

with no await, no logging and no timer on it, so the read that arrived is on
the client's wire before relay looks at anything else. Deadlines are plain
timestamps checked by the server's :class:`~relay.core.ticker.Ticker`.

Teardown rules (relay/DESIGN.md, contracts):

* the response is completed for the client only when the upstream completed
  it; a cut upstream leaves the client connection closed mid-body;
* a client that goes away closes the upstream connection at once, so the
  inference server stops generating, and that connection is never pooled;
* a pooled connection that closes before any response byte is replaced by a
  fresh one, once, if the request bytes sent so far can be replayed;
* an exchange ends exactly once (:meth:`_end`), whatever ends it.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import enum
import logging
import math
import time
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

import h11

from ..http.errors import RelayError
from ..http.fidelity import ending_for_status
from ..http.framing import (
    LAST_CHUNK,
    BodyFramer,
    BodyKind,
    ChunkedFramer,
    ClientFraming,
    CloseFramer,
    FramingError,
    LengthFramer,
    encode_chunk,
    plan_response,
)
from ..http.headers import (
    has_token,
    origin_form,
    request_headers_for_upstream,
    response_head,
)
from ..http.headers import response_headers_for_client as client_headers
from ..http.inspection import BodyInspection
from ..http.modellist import merge_model_lists
from ..http.outgoing import OutgoingRequest
from ..http.requestplan import RequestPlan, plan_request
from ..http.rewrite import InspectBudget
from .accesslog import log_exchange, text_value
from .admission import NO_HOOKS, Ticket
from .fidelity import StreamWatch
from .upstream import (
    ConnectError,
    ConnectTimeout,
    Router,
    UpstreamConnection,
    UpstreamPool,
    fetch_model_lists,
)

if TYPE_CHECKING:
    from ..config import Config
    from .metrics import Metrics
    from .ticker import Ticker
    from .tracing import ExchangeSpan, Tracing

__all__ = ["Ending", "Exchange", "Phase"]

log = logging.getLogger("relay.events")

_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
_monotonic = time.monotonic
_perf_counter = time.perf_counter
#: Body inspection per loop turn: scan steps per call, and the time after
#: which the rest waits for the next turn (a step of bracket-dense JSON costs
#: about half a microsecond, so one call stays well under a millisecond).
INSPECT_STEPS = 1000
INSPECT_TURN = 0.002
_bisect_left = bisect.bisect_left
_NOT_TRIED: frozenset[UpstreamPool] = frozenset()
#: Lengths of the response field names relay reads: content-type, connection,
#: content-length, transfer-encoding.
_READ_NAME_SIZES = frozenset((12, 10, 14, 17))

# h11 parses the upstream's response head, and how it reads one depends on
# the request's method (a HEAD answer has no body), so it is shown a stand-in
# request with the right method; relay writes the real head itself, from
# fields that were validated when the client's request was parsed.
_STAND_IN = h11.Request(method=b"GET", target=b"/", headers=[(b"host", b"relay")])
_STAND_IN_HEAD = h11.Request(method=b"HEAD", target=b"/", headers=[(b"host", b"relay")])


class ClientSide(Protocol):
    """What an exchange needs from the client connection."""

    transport: asyncio.Transport
    client_host: str
    scheme: str
    http_version: bytes
    checks_keys: bool
    writing_paused: bool

    def exchange_ready_for_body(self) -> None: ...
    def hold_reading(self, paused: bool) -> None: ...
    def exchange_finished(self, *, keep_alive: bool) -> None: ...
    def send_error(self, error: RelayError) -> None: ...
    def close_truncated(self) -> None: ...
    def drop(self) -> None: ...


class Phase(enum.Enum):
    CONNECTING = "connecting"  # waiting for an upstream connection (or the whole body)
    WAITING = "waiting"  # request sent (or being sent), no response head yet
    BODY = "body"  # response head forwarded, body streaming
    DONE = "done"


_BODY = Phase.BODY  # a module global: one lookup on the hot path, not two


class Ending(enum.Enum):
    COMPLETE = "complete"
    CLIENT_GONE = "client_gone"
    UPSTREAM_CUT = "upstream_cut"
    TIMEOUT = "timeout"
    ERROR = "error"
    LIMIT = "limit"  # a size or rate limit, or the --max-inflight queue, ended it
    DRAIN = "drain"  # cut when the drain timeout ran out (shutdown)


def request_plan(
    request: h11.Request, fields: list[tuple[bytes, bytes]], config: Config, router: Router
) -> RequestPlan:
    """:func:`plan_request` for ``request`` with this relay's configuration."""
    model_map = config.model_map
    return plan_request(
        request.method,
        origin_form(request.target),
        fields,
        rewrites_models=bool(model_map),
        pins_model=model_map.default is not None,
        routes_by_model=router.routes_by_model,
        knows_more_models=bool(model_map.aliases or router.routes or len(router.pools) > 1),
    )


class Exchange:
    """One request/response pair between a client connection and an upstream."""

    def __init__(
        self,
        client: ClientSide,
        request: h11.Request,
        plan: RequestPlan,
        *,
        config: Config,
        router: Router,
        metrics: Metrics,
        ticker: Ticker,
        waiting_for_continue: bool,
        inspect_budget: InspectBudget,
        ticket: Ticket | None = None,
        tracing: Tracing | None = None,
    ) -> None:
        self.client = client
        self.request = request
        self.config = config
        self.router = router
        self.metrics = metrics
        self.pool: UpstreamPool | None = None  # chosen when connecting
        self._candidates = router.default
        self._ticker = ticker
        self._loop = asyncio.get_running_loop()
        self.phase = Phase.CONNECTING
        self.started = now = time.monotonic()
        self.status: int | None = None
        self.bytes_to_client = 0
        self.requested_model: str | None = None
        self.forwarded_model: str | None = None
        metrics.active_exchanges += 1

        self._waiting_for_continue = waiting_for_continue
        self._head_request = request.method == b"HEAD"
        self._upstream: UpstreamConnection | None = None
        self._h11: h11.Connection | None = None
        self._task: asyncio.Task[None] | None = None
        self._retried = self._attached_reused = self._got_upstream_bytes = False

        # Request side: the client's body arrives as h11 Data events.
        self.request_complete = False
        self.request_bytes = 0
        self._last_client_byte = self._sent_at = now
        self._upstream_full_since: float | None = None  # upstream not taking the body

        # Response side.
        self._framer: BodyFramer = CloseFramer()
        self._write_body: Callable[[bytes], object] = client.transport.write
        self._upstream_reusable = self._keep_client = self._rechunked = self._eof_seen = False
        self._head_bytes_in = 0  # upstream bytes fed to h11 while waiting for the head
        self._pending_head = b""  # a response head that goes out with the first body bytes
        self._head_held = False  # ... and has not gone out yet
        self._body_writer = self._write_body
        self._last_upstream_byte = now
        self._client_paused_since: float | None = None
        self._head_at: float | None = None
        self._first_byte_at: float | None = None
        self._gap = gap = metrics.upstream_read_gap
        self._gap_counts, self._gap_bounds = gap.counts, gap.bounds
        # Stream fidelity (core/fidelity.py): coalescing, endings, cancellation,
        # the opt-in body digest and SSE keep-alive comments.
        self._fid = StreamWatch(config, metrics)
        self._per_read = self._fid.per_read  # the digest or keep-alives see every read
        self._client_backlog = client.transport.get_write_buffer_size
        # Keys, limits and usage (core/admission.py): the ticket the client
        # connection was admitted with; _tail keeps references to the last
        # reads (the ticket's BodyHooks, unpacked for the hot path).
        self.ticket = ticket if ticket is not None else Ticket(metrics)
        self._tail, self._tail_mid_line = NO_HOOKS

        headers = request_headers_for_upstream(
            request.headers.raw_items(),
            client_host=client.client_host,
            scheme=client.scheme,
            upstream_authority=router.default[0].address.authority,
            strip_credentials=client.checks_keys,
            upstream_key=config.upstream_api_key,
        )
        path = origin_form(request.target)
        self._target = path
        # --otel: the exchange's span, None when tracing is off (the only check made).
        self._span: ExchangeSpan | None = None
        if tracing is not None:
            self._span = tracing.start(
                request.method, path, request.headers, client.client_host, now
            )
            self._span.inject(headers)  # the upstream's spans join relay's
        if plan.chunked:
            headers.append((b"transfer-encoding", b"chunked"))
        elif plan.length is not None:
            headers.append((b"content-length", plan.length))
        self._out = OutgoingRequest(request.method, path, headers, chunked=plan.chunked)
        self._expects_body = plan.expects_body
        self._client_closes = plan.client_closes
        self._route_by_body = plan.route_by_body
        self._inspection: BodyInspection | None = None
        self._scan_handle: asyncio.Handle | None = None  # the next scan turn
        self._scan_behind = self._body_ended = False
        if plan.inspect:
            self._inspection = inspection = BodyInspection(
                inspect_budget, config.model_map, must_read=plan.must_read_model
            )
            # Whatever way the exchange ends, its share of the budget comes back.
            weakref.finalize(self, inspection.release)

    # -- lifecycle ----------------------------------------------------------
    def start(self) -> None:
        self._rearm()  # the body deadline, while relay holds the body to read its model
        if self._route_by_body:
            # relay reads the whole (JSON) body before choosing an upstream,
            # so it invites the body itself, as nginx does.
            self._send_continue()
        else:
            self._connect_now()

    @property
    def ready_for_body(self) -> bool:
        """Whether request body bytes can be taken right now."""
        if self._inspection is not None:
            return True  # held in memory (bounded by the inspection budget)
        return self._upstream is not None

    def _send_continue(self) -> None:
        if self._waiting_for_continue:
            self._waiting_for_continue = False
            self.client.transport.write(_CONTINUE)

    def _assign(self, pool: UpstreamPool | None) -> None:
        if self.pool is not None:
            self.pool.outstanding -= 1
        self.pool = pool
        if pool is not None:
            pool.outstanding += 1

    def _connect_now(self) -> None:
        """Attach an idle pooled connection at once; only a new one is awaited."""
        pool = self.router.balancer.choose(self._candidates, _NOT_TRIED)
        if pool is not None:
            self._assign(pool)  # counted at once: least-requests sees it
            # A --max-inflight slot free now (or none needed) and an idle connection.
            if self.ticket.try_enter(pool):
                upstream = pool.acquire_idle(self)
                if upstream is not None:
                    self._attach(upstream, from_task=False)
                    return
        self._task = self._loop.create_task(self._connect(fresh=False, first=pool))

    async def _connect(self, *, fresh: bool, first: UpstreamPool | None = None) -> None:
        """Get a connection: a fresh one on the same pool (retry), or the balancer's pick.

        A connect failure ejects that upstream for a while and the next
        candidate is tried, each at most once: nothing was sent yet.
        """
        tried: set[UpstreamPool] = set()
        error: RelayError | None = None
        pool = self.pool if fresh else first
        try:
            while pool is not None:
                self._assign(pool)
                # Wait for a --max-inflight slot on this upstream (or a 503).
                if (error := await self.ticket.enter(pool)) is not None:
                    break
                try:
                    upstream = await pool.acquire(self, fresh=fresh)
                except ConnectTimeout as exc:
                    log.warning("%s", exc)
                    error = RelayError(504, "upstream connect timed out", "upstream_timeout")
                except ConnectError as exc:
                    log.warning("%s", exc)
                    error = RelayError(502, "upstream unreachable", "upstream_unreachable")
                else:
                    if self.phase is Phase.DONE:  # aborted while connecting
                        pool.discard(upstream)
                        return
                    self._attach(upstream, from_task=True)
                    return
                if fresh:
                    break
                tried.add(pool)
                pool = self.router.balancer.choose(self._candidates, tried)
        finally:
            self._task = None
        self._fail(error or RelayError(502, "no upstream available", "upstream_unreachable"))

    def _attach(self, upstream: UpstreamConnection, *, from_task: bool) -> None:
        self._upstream = upstream
        if self.client.writing_paused:
            # A pipelined response is still unread: hold this one back too.
            self.client_pause_writing()
        self._attached_reused = upstream.reused
        conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=self.config.max_header_bytes)
        conn.send(_STAND_IN_HEAD if self._head_request else _STAND_IN)
        self._h11 = conn
        self.phase = Phase.WAITING
        self._got_upstream_bytes = self._eof_seen = False
        self._head_bytes_in = 0
        # Reading the body resumes now; the client is not to blame for the wait.
        self._last_client_byte = self._sent_at = time.monotonic()
        self._rearm()  # the head deadline (and the body's) start now
        if not self._expects_body or self._out.replay or self.request_complete:
            self._send_head()
        # Otherwise the head waits for the first body bytes: until h11 has
        # parsed them, a malformed chunked body must not reach the upstream.
        self._send_continue()
        if from_task:  # else the client connection is already processing events
            self.client.exchange_ready_for_body()

    # -- request (head and body) to the upstream --------------------------
    def _send_head(self, first: bytes = b"") -> None:
        """Send the request head with the body received so far, in one write.

        The body pieces go out uncopied (``writelines``): a big held body is
        never joined into one buffer on the loop.
        """
        upstream = self._upstream
        assert upstream is not None
        upstream.transport.writelines(self._out.head(first, ends=self.request_complete))

    def request_data(self, data: bytes) -> None:
        """A piece of the client's request body (called by the client connection)."""
        self.request_bytes += len(data)
        self._last_client_byte = time.monotonic()
        inspection = self._inspection
        if inspection is not None:
            error = inspection.add(data)
            if error is not None:
                self._inspection = None
                self._fail(error)
            elif self._scan_handle is None:
                self._scan_turn()
            return
        out = self._out
        kept = out.remember(data)
        upstream = self._upstream
        if self.phase is Phase.DONE or upstream is None:
            return
        if not out.head_sent:
            # The head waited for these first bytes; they go out together.
            self._send_head(first=b"" if kept else data)
        elif not out.chunked:
            upstream.transport.write(data)
        else:
            upstream.transport.writelines(out.frames((data,)))

    def _scan_turn(self) -> None:
        """Scan the held body for one loop turn's budget; the rest on later turns.

        A body that needs more than a turn (bracket-dense JSON costs a step
        per bracket) must not hold every other stream. When a turn has used
        its budget the client's reading is paused until the next loop turn
        (the event loop would otherwise run many reads back to back in one
        turn), so at most one read waits; while scanning is behind, the
        client-body deadline does not run (relay is the late one).
        """
        self._scan_handle = None
        inspection = self._inspection
        if inspection is None or self.phase is Phase.DONE:
            return
        stop = _perf_counter() + INSPECT_TURN
        done = inspection.scan(INSPECT_STEPS)
        while not done and _perf_counter() < stop:
            done = inspection.scan(INSPECT_STEPS)
        if not done or _perf_counter() >= stop:
            if not self._scan_behind:
                self._scan_behind = True
                self.client.hold_reading(True)
            self._scan_handle = self._loop.call_soon(self._scan_turn)
            return
        if self._scan_behind:
            self._scan_behind = False
            self._last_client_byte = time.monotonic()
            self.client.hold_reading(False)
            self._rearm()  # the client-body deadline counts again
        if self._body_ended:
            self._body_ended = False
            self.request_end()

    def request_end(self) -> None:
        inspection = self._inspection
        if inspection is not None and not inspection.scanned:
            self._body_ended = True  # the last scan turn ends the request
            return
        self.request_complete = True
        self._inspection = None
        if inspection is not None:
            result = inspection.finish()
            if isinstance(result, RelayError):
                self._fail(result)
                return
            self.requested_model = result.requested
            self.forwarded_model = result.forwarded
            # The (possibly rewritten) pieces go out from the replay list,
            # which also serves a retry (bounded by --max-body-bytes).
            self._out.replace_body(result.pieces, result.length)
            if self._route_by_body:
                self._route()
                return
            if self.phase is Phase.CONNECTING and self._task is None:
                self._connect_now()
                return
        upstream = self._upstream
        if self.phase is Phase.DONE or upstream is None:
            return
        if not self._out.head_sent:
            self._send_head()
        elif not self._out.complete:
            upstream.transport.writelines(self._out.end())

    def _route(self) -> None:
        """The body is in: pick the upstreams its model routes to, then connect."""
        candidates = self.router.candidates(self.forwarded_model)
        if candidates is None:
            model = self.forwarded_model or "(none)"
            self._fail(RelayError(404, f"model {model!r} is not served here", "model_not_found"))
            return
        self._candidates = candidates
        self._connect_now()

    def _answer(self, body: bytes, content_type: bytes = b"application/json") -> None:
        """relay answers this request itself: 200 with ``body``."""
        client = self.client
        keep = self.request_complete and client.http_version == b"1.1" and not self._client_closes
        headers = [(b"content-type", content_type), (b"content-length", b"%d" % len(body))]
        if not keep:
            headers.append((b"connection", b"close"))
        self.status = 200
        self.metrics.requests["relay", 200] += 1
        self._head_at = time.monotonic()
        self.bytes_to_client = len(body)
        head = response_head(200, b"", headers, http_version=client.http_version)
        client.transport.write(head + body)
        self._end(Ending.COMPLETE)
        client.exchange_finished(keep_alive=keep)

    def upstream_pause_writing(self) -> None:
        # relay stops reading the client's body: the upstream is not taking it.
        # That pause is relay's doing, so the client's body deadline waits too.
        self._upstream_full_since = time.monotonic()
        self.client.hold_reading(True)
        self._rearm()

    def upstream_resume_writing(self) -> None:
        self._upstream_full_since = None
        self._last_client_byte = time.monotonic()
        self.client.hold_reading(False)
        self._rearm()  # the client-body deadline may be shorter than the upstream's

    # -- response (called by the upstream connection) ---------------------
    def upstream_data(self, data: bytes) -> None:
        if self.phase is _BODY:
            # The hot path: every line here runs for every token. Keep it short.
            now = _monotonic()
            if self._first_byte_at is not None:
                gap = now - self._last_upstream_byte  # the gap histogram, inlined
                self._gap_counts[_bisect_left(self._gap_bounds, gap)] += 1
                self._gap.total += gap
            else:
                self._first_byte_at = now
                self.metrics.time_to_first_byte.observe(now - self._sent_at)
                if self._span is not None:
                    self._span.first_byte(now)
            self._last_upstream_byte = now
            framer = self._framer
            try:
                taken = framer.feed(data)
            except FramingError as exc:
                self._cut(f"upstream sent invalid body framing: {exc}")
                return
            if taken:
                self.bytes_to_client += taken
                backlog = self._client_backlog()  # > 0: this read cannot go out on its own
                if backlog or self._per_read:
                    self._fid.read(data, taken, backlog, self.pool)
                self._write_body(data if taken == len(data) else data[:taken])
                # A reference for the usage, read at the end (BodyHooks.feed,
                # inlined): a read that ends inside a line, so inside an
                # event, is kept with the rest of its event.
                if data[-1] == 10:  # b"\n"
                    self._tail(data)
                else:
                    self._tail_mid_line(data)
            if framer.complete:
                if taken != len(data):
                    self._upstream_reusable = False  # bytes after the end: not HTTP
                self._complete()
            return
        if self.phase is Phase.WAITING:
            self._got_upstream_bytes = True
            self._head_bytes_in += len(data)
            self._last_upstream_byte = time.monotonic()
            assert self._h11 is not None
            self._h11.receive_data(data)
            self._read_head()

    def _read_head(self) -> None:
        conn = self._h11
        assert conn is not None
        while self.phase is Phase.WAITING:
            try:
                event = conn.next_event()
            except h11.RemoteProtocolError as exc:
                # h11's text quotes the upstream's bytes in Python reprs: the
                # client gets a fixed text, the log the detail (escaped).
                detail = str(exc)
                # h11 re-raises from a frame that holds the exception: without
                # its traceback, no cycle is left for the collector.
                exc.__traceback__ = None
                self._bad_gateway("upstream sent an invalid response head", detail)
                return
            if isinstance(event, h11.Response):
                self._start_body(event, conn)
            elif isinstance(event, h11.InformationalResponse):
                self._forward_informational(event)
            else:  # NEED_DATA, or closed before a head (upstream_lost handles it)
                return

    def _forward_informational(self, event: h11.InformationalResponse) -> None:
        # relay already told the client 100 Continue itself; 101 cannot happen
        # because Upgrade never reaches the upstream. Others (103) go through.
        if event.status_code in (100, 101) or self.client.http_version != b"1.1":
            return
        headers = client_headers(event.headers.raw_items(), keep_framing=False, keep_trailer=False)
        self.client.transport.write(response_head(event.status_code, event.reason, headers))

    def _start_body(self, event: h11.Response, conn: h11.Connection) -> None:
        status = event.status_code
        raw = event.headers.raw_items()
        chunked = False
        length: int | None = None
        # One pass for what relay reads in the head: framing (h11 validated
        # it), type (usage) and Connection. Names keep their case in ``raw``;
        # the length test first, as most fields are none of these.
        read: list[tuple[bytes, bytes]] = []
        closes = False
        for name, value in raw:
            if len(name) in _READ_NAME_SIZES:
                lower = name.lower()
                if lower == b"transfer-encoding":
                    chunked = True
                elif lower == b"content-length":
                    length = int(value)
                elif lower == b"connection":
                    closes = closes or has_token(((lower, value),), b"connection", b"close")
                    continue
                elif lower != b"content-type":
                    continue
                read.append((lower, value))
        if chunked and length is not None:
            # RFC 9112 §6.3: a sign of smuggling or a broken upstream.
            self._bad_gateway("upstream sent both Content-Length and Transfer-Encoding")
            return
        leftover = conn.trailing_data[0]
        if self._head_bytes_in - len(leftover) > self.config.max_header_bytes:
            # h11 bounds only heads still incomplete; one that came whole is measured here.
            self._bad_gateway("upstream response head too large")
            return
        self.status = status
        assert self.pool is not None
        metrics = self.metrics
        metrics.requests[self.pool.name, status] += 1
        self._head_at = time.monotonic()
        metrics.time_to_head.observe(self._head_at - self._sent_at)
        client = self.client
        plan = plan_response(
            status=status,
            head_request=self._head_request,
            chunked=chunked,
            length=length,
            client_http_version=client.http_version,
            client_may_stay=self.request_complete and not self._client_closes,
        )
        framing = plan.client_framing
        max_trailer = self.config.max_header_bytes
        if plan.body == BodyKind.NONE:
            self._framer = LengthFramer(0)
        elif framing == ClientFraming.DECHUNK:
            self._framer = framer = ChunkedFramer(dechunk=True, max_trailer_bytes=max_trailer)
            self._write_body = _dechunked_writer(client.transport, framer)
        elif plan.body == BodyKind.CHUNKED:
            self._framer = ChunkedFramer(max_trailer_bytes=max_trailer)
        elif plan.body == BodyKind.LENGTH:
            assert length is not None
            self._framer = LengthFramer(length)
        else:
            self._framer = CloseFramer()
            if framing == ClientFraming.RECHUNK:
                self._rechunked = True
                write = client.transport.write
                self._write_body = lambda data: write(encode_chunk(data))
        self._fid.head(status, raw, plan.body, framing, self._framer)
        self._tail, self._tail_mid_line = self.ticket.response_started(status, read)
        self._upstream_reusable = (
            self._framer.reusable and conn.their_http_version == b"1.1" and not closes
        )
        self._h11 = None  # the framer reads the body: h11's state is not kept per stream
        # Framing fields come from the plan alone, never from the upstream's
        # head: hop-by-hop filtering may have removed the ones it announced.
        headers = client_headers(raw, keep_framing=False, keep_trailer=plan.keep_trailer)
        headers += plan.framing_headers
        self._keep_client = plan.keep_client
        if not plan.keep_client:
            headers.append((b"connection", b"close"))
        head = response_head(status, event.reason, headers, http_version=client.http_version)
        self.phase = Phase.BODY
        self._rearm()  # the idle and keep-alive deadlines may be shorter than the head's
        if leftover and framing == ClientFraming.SAME and not self._framer.complete:
            # The head and the first body bytes go out in one write.
            self._pending_head = head
            self._head_held = True
            self._body_writer, self._write_body = self._write_body, self._write_with_head
        else:
            client.transport.write(head)
        if leftover:
            self.upstream_data(leftover)
        elif self._framer.complete:
            self._complete()

    def _write_with_head(self, data: bytes) -> None:
        self._write_body = self._body_writer
        self._head_held = False
        self.client.transport.writelines((self._pending_head, data))

    def upstream_eof(self) -> None:
        self._eof_seen = True

    def upstream_lost(self, exc: Exception | None) -> None:
        self._upstream = None
        if self.phase is Phase.BODY:
            self._upstream_reusable = False
            if self._eof_seen and exc is None:
                with contextlib.suppress(FramingError):
                    self._framer.feed_eof()
                if self._framer.complete:
                    if self._rechunked:
                        self.client.transport.write(LAST_CHUNK)
                    self._complete()
                    return
            self._cut("upstream closed the connection before the end of the body")
        elif self.phase is Phase.WAITING:
            if self._retry_allowed():
                self.metrics.upstream_retries += 1
                self._retried = True
                self.phase = Phase.CONNECTING
                self._h11 = None
                self._out.retry()
                self._task = self._loop.create_task(self._connect(fresh=True))
                return
            self._bad_gateway("upstream closed the connection before sending a response")

    def _retry_allowed(self) -> bool:
        return (
            not self._retried
            and not self._got_upstream_bytes
            and self._out.replay is not None
            and self._attached_reused
        )

    # -- endings --------------------------------------------------------------
    def _complete(self) -> None:
        if self.phase is Phase.DONE:
            return
        upstream = self._upstream
        reusable = self._upstream_reusable and self._out.complete
        keep_alive = self._keep_client and self.request_complete
        self._end(Ending.COMPLETE)
        if upstream is not None and self.pool is not None:
            self.pool.release(upstream, reusable=reusable)
        self.client.exchange_finished(keep_alive=keep_alive)

    def _cut(self, reason: str) -> None:
        """The upstream broke mid-body: close the client without completing."""
        if self.phase is Phase.DONE:
            return
        if self._head_held:  # the head was waiting for body bytes that never came
            self._head_held = False
            self.client.transport.write(self._pending_head)
        self.metrics.truncated_streams += 1
        log.warning("stream truncated: %s (%s)", reason, self._describe())
        self._close_upstream()
        self._end(Ending.UPSTREAM_CUT)
        self.client.close_truncated()

    def _bad_gateway(self, reason: str, detail: str | None = None) -> None:
        """502 with the fixed ``reason``; ``detail`` (the peer's words) is logged only."""
        if detail is None:
            log.warning("%s (%s)", reason, self._describe())
        else:
            log.warning("%s (%s): %s", reason, self._describe(), text_value(detail))
        self._fail(RelayError(502, reason, "bad_gateway"))

    def _fail(self, error: RelayError) -> None:
        """Answer ``error`` if nothing was sent yet, else cut the stream."""
        if self.phase is Phase.DONE:
            return
        if self.phase is Phase.BODY:
            self._cut(error.message)
            return
        self.status = error.status
        self._close_upstream()
        self._end(Ending(ending_for_status(error.status, error.code)))
        self.client.send_error(error)

    def abort(self, ending: Ending = Ending.CLIENT_GONE) -> None:
        """The client is gone: stop everything now, never pool the upstream."""
        if self.phase is Phase.DONE:
            return
        if ending is Ending.CLIENT_GONE:
            self.metrics.client_disconnects += 1
            self._fid.cancel(self._upstream, self._close_upstream)  # timed and counted
        self._close_upstream()
        self._end(ending)

    def _close_upstream(self) -> None:
        upstream, self._upstream = self._upstream, None
        if upstream is not None and self.pool is not None:
            self.pool.discard(upstream)

    def _end(self, ending: Ending) -> None:
        """The one place an exchange ends: gauges, the access line, owned tasks."""
        self.phase = Phase.DONE
        self._ticker.unwatch(self)
        pool = self.pool
        if pool is not None:
            pool.outstanding -= 1
        metrics = self.metrics
        metrics.active_exchanges -= 1
        metrics.bytes_from_clients += self.request_bytes
        metrics.bytes_to_clients += self.bytes_to_client
        sent = self._sent_at
        # Usage from the kept reads; budgets, concurrency and queue slot released.
        usage = self.ticket.settle(self.bytes_to_client, self.requested_model, self.forwarded_model)
        head_s = None if self._head_at is None else self._head_at - sent
        ttft_s = None if self._first_byte_at is None else self._first_byte_at - sent
        key = self.ticket.label if self.client.checks_keys else None
        now = time.monotonic()
        log_exchange(
            client=self.client.client_host,
            method=self.request.method,
            target=self.request.target,
            status=self.status,
            upstream=pool.name if pool is not None else "-",
            requested_model=self.requested_model,
            forwarded_model=self.forwarded_model,
            bytes_in=self.request_bytes,
            bytes_out=self.bytes_to_client,
            head_s=head_s,
            ttft_s=ttft_s,
            total_s=now - self.started,
            ending=ending.value,
            fidelity=self._fid.end(ending.value),  # counts the ending too
            key=key,
            usage=usage,
        )
        span, self._span = self._span, None
        if span is not None:
            span.end(
                now=now,
                status=self.status,
                ending=ending.value,
                upstream=pool.address if pool is not None else None,
                upstream_name=pool.name if pool is not None else None,
                ttft_s=ttft_s,
                head_s=head_s,
                coalesced=self._fid.coalesced,
                key=key,
                usage=usage,
                requested_model=self.requested_model,
                forwarded_model=self.forwarded_model,
                bytes_in=self.request_bytes,
                bytes_out=self.bytes_to_client,
            )
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
        scan, self._scan_handle = self._scan_handle, None
        if scan is not None:
            scan.cancel()

    # -- flow control from the client side ----------------------------------
    def client_pause_writing(self) -> None:
        self._client_paused_since = time.monotonic()
        if self._upstream is not None:
            self._upstream.pause_reading()
        self._rearm()

    def client_resume_writing(self) -> None:
        self._client_paused_since = None
        if self._upstream is not None:
            self._upstream.resume_reading()
        self._rearm()  # the idle deadline counts again, from the last upstream byte

    # -- deadlines (checked by the server's ticker) --------------------------
    def _rearm(self) -> None:
        """File this exchange with the ticker at its earliest deadline.

        Called where a deadline may move earlier (a new phase, a pause);
        deadlines that move later (every read) are found when the filed time
        comes and :meth:`on_tick` files the exchange again.
        """
        self._ticker.schedule(self, self._next_deadline())

    def _next_deadline(self) -> float:
        """The earliest time one of this exchange's deadlines falls due (0: none)."""
        phase = self.phase
        if phase is Phase.DONE:
            return 0.0
        cfg = self.config
        due = math.inf
        if not self.request_complete:
            full = self._upstream_full_since
            if full is not None:
                due = full + cfg.upstream_idle_timeout
            elif self._reading_body():
                due = self._last_client_byte + cfg.client_body_timeout
        if phase is Phase.WAITING:
            due = min(due, self._sent_at + cfg.upstream_head_timeout)
        elif phase is Phase.BODY:
            paused = self._client_paused_since
            if paused is not None:
                due = min(due, paused + cfg.client_send_timeout)
            else:
                last = self._last_upstream_byte
                due = min(due, last + cfg.upstream_idle_timeout)
                if self._fid.keepalive_on:
                    due = min(due, self._fid.keepalive_due(last))
        return 0.0 if due == math.inf else due

    def _reading_body(self) -> bool:
        """Whether relay reads the request body now. While it does not (waiting for
        a connection or a --max-inflight slot, or scanning behind), the client
        is not late."""
        if self._scan_behind:
            return False
        return self._upstream is not None or self._inspection is not None

    def on_tick(self, now: float) -> float:
        cfg = self.config
        phase = self.phase
        if not self.request_complete:
            full = self._upstream_full_since
            if full is not None and now - full >= cfg.upstream_idle_timeout:
                self.metrics.timeouts += 1
                message = "upstream stopped reading the request body"
                self._fail(RelayError(504, message, "upstream_timeout"))
                return 0.0
            if (
                full is None
                and self._reading_body()
                and now - self._last_client_byte >= cfg.client_body_timeout
            ):
                self.metrics.timeouts += 1
                self._fail(RelayError(408, "client sent the request body too slowly", "timeout"))
                return 0.0
        if phase is Phase.WAITING and now - self._sent_at >= cfg.upstream_head_timeout:
            self.metrics.timeouts += 1
            self._fail(RelayError(504, "upstream did not answer in time", "upstream_timeout"))
        elif phase is Phase.BODY:
            paused = self._client_paused_since
            if paused is not None:
                if now - paused >= cfg.client_send_timeout:
                    self.metrics.timeouts += 1
                    log.warning("client stopped reading for %.0f s; dropping it", now - paused)
                    self.abort(Ending.TIMEOUT)
                    self.client.drop()  # it reads nothing: a graceful close would never end
            elif now - self._last_upstream_byte >= cfg.upstream_idle_timeout:
                self.metrics.timeouts += 1
                self._cut("upstream idle timeout mid-body")
            elif self._fid.keepalive_on:  # an SSE keep-alive comment may be due
                self._fid.keepalive(self.client.transport.write, now, self._last_upstream_byte)
        return self._next_deadline()

    def _describe(self) -> str:
        return f"{self.request.method.decode('ascii', 'replace')} {self.request.target!r}"


def _dechunked_writer(
    transport: asyncio.Transport, framer: ChunkedFramer
) -> Callable[[bytes], None]:
    """HTTP/1.0 clients get the chunk payloads only (the framer collects them)."""
    payload = framer.payload
    assert payload is not None

    def write(_data: bytes) -> None:
        if payload:
            transport.writelines(payload)
            payload.clear()

    return write


class ModelListAnswer(Exchange):
    """``GET /v1/models`` when relay knows more models than one upstream lists
    (aliases, routes, several upstreams): relay asks every upstream at once and
    answers the merged list itself."""

    def start(self) -> None:
        self._task = self._loop.create_task(self._answer_model_list())

    @property
    def ready_for_body(self) -> bool:
        return True  # a GET without a body: its end of message is read at once

    async def _answer_model_list(self) -> None:
        """Ask every upstream for its models at once; answer with the merged list."""
        router = self.router
        headers = [(n, v) for n, v in self._out.headers if n.lower() != b"host"]
        try:
            lists = await fetch_model_lists(
                router.pools.values(), self._target.split(b"?", 1)[0], headers
            )
        finally:
            self._task = None
        if not lists:
            self._fail(RelayError(502, "no upstream returned its model list", "bad_gateway"))
            return
        self._answer(
            merge_model_lists(
                lists, model_map=self.config.model_map, routed=router.routes, strict=router.strict
            )
        )
