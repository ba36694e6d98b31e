"""One request and its response: the place where the two connections meet.

An :class:`Exchange` is created by the client connection for each request
head. One coroutine (owned by the exchange, cancelled by :meth:`abort`) does
the only waiting there is: getting an upstream connection. From then on
everything is callbacks, and the hot path is :meth:`Exchange.upstream_data`:

    upstream read -> framer finds the body's end -> client ``transport.write``

with no await, no logging and no timer re-arming on it, so the read that
arrived is on the client's wire before relay looks at anything else.

Teardown rules (DESIGN.md §3):

* the response is completed for the client only when the upstream completed
  it; a cut upstream leaves the client connection closed mid-body;
* a client that goes away closes the upstream connection at once, so the
  inference server stops generating, and that connection is never pooled;
* a pooled connection that closes before any response byte is replaced by a
  fresh one, once, if the request bytes sent so far can be replayed.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import time
import weakref
from typing import TYPE_CHECKING, Protocol

import h11

from ..http.errors import RelayError
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
    is_json_or_untyped,
    origin_form,
    request_headers_for_upstream,
    response_head,
)
from ..http.headers import response_headers_for_client as client_headers
from ..http.modellist import MAX_MODEL_LIST_BYTES, merge_model_lists, parse_model_list
from ..http.rewrite import (
    MAX_DEPTH,
    MAX_MODEL_VALUE_BYTES,
    InspectBudget,
    InspectHold,
    ModelScanner,
    ScanStatus,
    rewrite_pieces,
)
from .accesslog import log_exchange
from .admission import Ticket
from .upstream import (
    ConnectError,
    ConnectTimeout,
    Router,
    UpstreamConnection,
    UpstreamPool,
    fetch,
)

if TYPE_CHECKING:
    from ..config import Config
    from .metrics import Metrics

__all__ = ["Exchange", "Phase"]

log = logging.getLogger("relay.error")

#: Request bytes kept for replaying on a fresh connection when a pooled one
#: turns out to be closed (Envoy's retry buffer has the same role). LLM
#: requests are small JSON; a bigger body is streamed without a safety net.
REPLAY_LIMIT = 1024 * 1024

_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"

#: How long relay waits for each upstream's model list.
MODEL_LIST_TIMEOUT = 5.0


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
    CONNECTING = "connecting"  # waiting for an upstream connection
    WAITING = "waiting"  # request sent (or being sent), no response head yet
    BODY = "body"  # response head forwarded, body streaming
    DONE = "done"


class Ending(enum.Enum):
    COMPLETE = "complete"
    CLIENT_GONE = "client_gone"
    UPSTREAM_CUT = "upstream_cut"
    TIMEOUT = "timeout"
    ERROR = "error"


class Exchange:
    """One request/response pair between a client connection and an upstream."""

    def __init__(
        self,
        client: ClientSide,
        request: h11.Request,
        *,
        config: Config,
        router: Router,
        metrics: Metrics,
        waiting_for_continue: bool,
        inspect_budget: InspectBudget | None = None,
    ) -> None:
        self.client = client
        self.request = request
        self.config = config
        self.router = router
        self.pool: UpstreamPool | None = None  # chosen when connecting
        self._candidates: list[UpstreamPool] = router.default
        self.metrics = metrics
        self.phase = Phase.CONNECTING
        self.ending: Ending | None = None
        self.started = time.monotonic()
        self.status: int | None = None
        self.bytes_to_client = 0

        self._loop = asyncio.get_running_loop()
        self._waiting_for_continue = waiting_for_continue
        self._head_request = request.method == b"HEAD"
        self._upstream: UpstreamConnection | None = None
        self._h11: h11.Connection | None = None
        self._task: asyncio.Task[None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._framer: BodyFramer = CloseFramer()
        self._write_body = client.transport.write
        self._upstream_reusable = False
        self._eof_seen = False
        self._got_upstream_bytes = False
        self._retried = False
        self._attached_reused = False
        self._keep_client = False
        self._rechunked = False
        self._head_bytes_in = 0  # upstream bytes fed to h11 while waiting for the head

        # Request side: the client's body arrives as h11 Data events.
        self.request_complete = False
        self.request_bytes = 0
        self._last_client_byte = self.started
        self._upstream_full_since: float | None = None  # upstream not taking the body
        self._sent_at = self.started
        self._replay: list[bytes] | None = []  # body pieces sent so far, for a retry
        self._replay_size = 0

        # Response side.
        self._last_upstream_byte = self.started
        self._client_paused_since: float | None = None
        self._head_at: float | None = None
        self._first_byte_at: float | None = None
        self._observe_gap = metrics.upstream_read_gap.observe
        metrics.active_exchanges += 1
        # Issue #14 (core/admission.py): limits, queue slot and usage; the client
        # connection sets the admitted ticket; _tail keeps references to body reads.
        self.ticket = Ticket(metrics)
        self._tail = self.ticket.response_started(0, ())

        headers = request_headers_for_upstream(
            request.headers.raw_items(),
            client_host=client.client_host,
            scheme=client.scheme,
            upstream_authority=router.default[0].address.authority,
            strip_credentials=client.checks_keys,
            upstream_key=config.upstream_api_key,
        )
        self._expects_body = False
        for name, value in request.headers:
            if name == b"content-length":
                headers.append((b"content-length", value))
                self._expects_body = value != b"0"
            elif name == b"transfer-encoding":
                headers.append((b"transfer-encoding", b"chunked"))
                self._expects_body = True
        self._upstream_headers = headers
        # Model aliasing needs the whole JSON body (bounded by max_body_bytes
        # each and max_inspect_bytes together), scanned chunk by chunk as it
        # arrives; without a mapping, request bodies stream through untouched.
        self._collected: list[bytes] | None = None
        self._scanner: ModelScanner | None = None
        self._hold: InspectHold | None = None
        self._route_by_body = False
        # Pinning (--model) and routing must know the model: a body whose
        # model relay cannot read is refused, never passed on for an upstream
        # that might read it. Aliases alone may let such a body pass.
        self._must_read_model = config.model_map.default is not None or router.routes_by_model
        # relay answers the model list itself when it knows names (aliases,
        # routes) or upstreams (several) that one upstream's list would miss.
        self._lists_models = (
            request.method == b"GET"
            and not self._expects_body
            and origin_form(request.target).split(b"?", 1)[0] in (b"/v1/models", b"/models")
            and bool(config.model_map.aliases or router.routes or len(router.pools) > 1)
        )
        self.requested_model: str | None = None
        self.forwarded_model: str | None = None
        if (
            (config.model_map or router.routes_by_model)
            and request.method == b"POST"
            and self._expects_body
            # FastAPI reads a body as JSON whatever its Content-Type on some
            # routes: when the model must be known, every POST body is read.
            and (self._must_read_model or is_json_or_untyped(request.headers))
        ):
            self._collected = []
            self._scanner = ModelScanner()
            budget = inspect_budget or InspectBudget(config.max_inspect_bytes)
            self._hold = hold = budget.hold()
            # Whatever way the exchange ends, its share of the budget comes back.
            weakref.finalize(self, hold.release)
            # The upstream depends on the model the body names.
            self._route_by_body = router.routes_by_model

    # -- lifecycle ----------------------------------------------------------
    def start(self) -> None:
        if self._lists_models:
            self._task = self._loop.create_task(self._answer_model_list())
        elif self._route_by_body:
            # relay reads the whole (JSON) body before choosing an upstream,
            # so it invites the body itself, as nginx does.
            if self._waiting_for_continue:
                self._waiting_for_continue = False
                self.client.transport.write(_CONTINUE)
        else:
            self._task = self._loop.create_task(self._connect(fresh=False))
        self._rearm()

    @property
    def ready_for_body(self) -> bool:
        """Whether request body bytes can be taken right now."""
        if self._collected is not None or self._lists_models:
            return True  # collected in memory (bounded by max_body_bytes), or none
        return self.phase is not Phase.CONNECTING and self._upstream is not None

    def _assign(self, pool: UpstreamPool | None) -> None:
        if self.pool is not None:
            self.pool.outstanding -= 1
        self.pool = pool
        if pool is not None:
            pool.outstanding += 1

    async def _connect(self, *, fresh: bool) -> None:
        """Get a connection: a fresh one on the same pool (retry), or the balancer's pick.

        A connect failure ejects that upstream for a while and the next
        candidate is tried, each at most once: nothing was sent yet.
        """
        tried: set[UpstreamPool] = set()
        error: RelayError | None = None
        try:
            while True:
                pool = self.pool if fresh else self.router.balancer.choose(self._candidates, tried)
                if pool is None:
                    break
                self._assign(pool)
                # Issue #14: wait for a --max-inflight slot on this upstream (or a 503).
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
                    self._attach(upstream)
                    return
                if fresh:
                    break
                tried.add(pool)
        finally:
            self._task = None
        self._fail(error or RelayError(502, "no upstream available", "upstream_unreachable"))

    def _attach(self, upstream: UpstreamConnection) -> None:
        self._upstream = upstream
        if self.client.writing_paused:
            # A pipelined response is still unread: hold this one back too.
            self.client_pause_writing()
        self._attached_reused = upstream.reused
        conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=self.config.max_header_bytes)
        self._h11 = conn
        self.phase = Phase.WAITING
        self._got_upstream_bytes = False
        self._eof_seen = False
        self._sent_at = time.monotonic()
        self._head_bytes_in = 0
        # Reading the body resumes now; the client is not to blame for the wait.
        self._last_client_byte = self._sent_at
        self._rearm()
        if not self._expects_body or self._replay or self.request_complete:
            self._send_head()
        # Otherwise the head waits for the first body bytes: until h11 has
        # parsed them, a malformed chunked body must not reach the upstream.
        if self._waiting_for_continue:
            self._waiting_for_continue = False
            self.client.transport.write(_CONTINUE)
        self.client.exchange_ready_for_body()

    def _send_head(self, unreplayed: bytes = b"") -> None:
        """Send the request head with the body received so far, in one write."""
        conn = self._h11
        assert conn is not None
        request = h11.Request(
            method=self.request.method,
            target=origin_form(self.request.target),
            headers=self._upstream_headers,
        )
        parts: list[bytes | bytearray | None] = [conn.send(request)]
        # The body so far: on a retry, everything sent the first time. The
        # pieces pass through h11 uncopied and go out with one writelines: a
        # big collected body is never joined into one buffer on the loop.
        for piece in self._replay or ():
            parts.extend(conn.send_with_data_passthrough(h11.Data(data=piece)) or ())
        if unreplayed:
            parts.extend(conn.send_with_data_passthrough(h11.Data(data=unreplayed)) or ())
        if self.request_complete and conn.our_state is h11.SEND_BODY:
            parts.append(conn.send(h11.EndOfMessage()))
        if self._upstream is not None:
            self._upstream.transport.writelines([part for part in parts if part])

    def _send_upstream(self, data: bytes | None) -> None:
        if data and self._upstream is not None:
            self._upstream.transport.write(data)

    # -- request body (called by the client connection) -------------------
    def request_data(self, data: bytes) -> None:
        self.request_bytes += len(data)
        self._last_client_byte = time.monotonic()
        if self._collected is not None:
            hold = self._hold
            assert hold is not None and self._scanner is not None
            if not hold.add(len(data)):
                alone_too_big = hold.size + len(data) > hold.limit
                hold.release()
                self._collected = None
                if alone_too_big:
                    self._fail(
                        RelayError(413, "request body too large for relay to read its model")
                    )
                else:
                    self._fail(
                        RelayError(
                            503,
                            "relay is reading too many request bodies at once; retry shortly",
                            headers=((b"retry-after", b"1"),),
                        )
                    )
                return
            self._collected.append(data)
            # Scanned as it arrives: the work per read is proportional to the
            # read, so one huge body never stalls the other streams.
            self._scanner.feed(data)
            return
        if self._replay is not None:
            self._replay_size += len(data)
            if self._replay_size <= REPLAY_LIMIT:
                self._replay.append(data)
            else:
                self._replay = None
        conn = self._h11
        if self.phase is Phase.DONE or conn is None:
            return
        if conn.our_state is h11.IDLE:
            # The head waited for these first bytes; they go out together.
            self._send_head(unreplayed=data if self._replay is None else b"")
        elif conn.our_state is h11.SEND_BODY:
            self._send_upstream(conn.send(h11.Data(data=data)))

    def request_end(self) -> None:
        self.request_complete = True
        if self._collected is not None:
            pieces, self._collected = self._collected, None
            self._rewrite_body(pieces)
            if self.phase is Phase.DONE:
                return
            if self._route_by_body:
                self._route_by_body = False
                self._route()
                return
        if self.phase is Phase.DONE or self._h11 is None:
            return
        if self._h11.our_state is h11.IDLE:
            self._send_head()
        else:
            self._finish_request()

    def _route(self) -> None:
        """The body is in: pick the upstreams its model routes to, then connect."""
        if self.phase is Phase.DONE:
            return
        candidates = self.router.candidates(self.forwarded_model)
        if candidates is None:
            model = self.forwarded_model or "(none)"
            self._fail(RelayError(404, f"model {model!r} is not served here", "model_not_found"))
            return
        self._candidates = candidates
        self._task = self._loop.create_task(self._connect(fresh=False))

    async def _answer_model_list(self) -> None:
        """Ask every upstream for its models at once; answer with the merged list."""
        router = self.router
        pools = list(router.pools.values())
        target = origin_form(self.request.target).split(b"?", 1)[0]
        headers = [(n, v) for n, v in self._upstream_headers if n.lower() != b"host"]
        try:
            answers = await asyncio.gather(
                *(
                    fetch(
                        pool,
                        target,
                        [(b"host", pool.address.authority.encode("ascii")), *headers],
                        timeout=MODEL_LIST_TIMEOUT,
                        limit=MAX_MODEL_LIST_BYTES,
                    )
                    for pool in pools
                ),
                return_exceptions=True,
            )
        finally:
            self._task = None
        lists = []
        for pool, answer in zip(pools, answers, strict=True):
            entries = None
            if isinstance(answer, tuple) and answer[0] == 200:
                entries = parse_model_list(answer[1])
            if entries is None:
                problem = answer if isinstance(answer, BaseException) else "no model list"
                log.warning("upstream %s: %s for %s", pool.address, problem, self._target)
            else:
                lists.append(entries)
        if not lists:
            self._fail(RelayError(502, "no upstream returned its model list", "bad_gateway"))
            return
        body = merge_model_lists(
            lists, model_map=self.config.model_map, routed=router.routes, strict=router.strict
        )
        self.status = 200
        self.metrics.requests["relay", 200] += 1
        keep = (
            self.request_complete
            and self.client.http_version == b"1.1"
            and not has_token(self.request.headers, b"connection", b"close")
        )
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", b"%d" % len(body)),
        ]
        if not keep:
            headers.append((b"connection", b"close"))
        head = response_head(200, b"", headers, http_version=self.client.http_version)
        self.bytes_to_client = len(body)
        self.client.transport.write(head + body)
        self._end(Ending.COMPLETE)
        self.client.exchange_finished(keep_alive=keep)

    def _rewrite_body(self, pieces: list[bytes]) -> None:
        scanner, self._scanner = self._scanner, None
        hold = self._hold
        assert scanner is not None and hold is not None
        scan = scanner.finish()
        if scan.status is ScanStatus.UNREADABLE and self._must_read_model:
            hold.release()
            self._fail(
                RelayError(
                    400,
                    "relay could not read the model of this request body: it must be UTF-8 "
                    f"JSON, with a model value under {MAX_MODEL_VALUE_BYTES // 1024} KiB and "
                    f"nesting under {MAX_DEPTH} levels",
                )
            )
            return
        result = rewrite_pieces(pieces, scan, self.config.model_map)
        self.requested_model = result.requested
        self.forwarded_model = result.forwarded
        headers = [
            (name, value)
            for name, value in self._upstream_headers
            if name not in (b"content-length", b"transfer-encoding")
        ]
        headers.append((b"content-length", b"%d" % result.length))
        self._upstream_headers = headers
        # The (possibly rewritten) body goes out from the replay list, which
        # also serves a retry; it is bounded by max_body_bytes. It is the held
        # pieces with only the model span replaced: nothing is joined here.
        self._replay = result.pieces
        # Inspection is over; the pieces now wait only for the upstream write.
        hold.release()

    def _finish_request(self) -> None:
        assert self._h11 is not None
        if self._h11.our_state is h11.SEND_BODY:
            self._send_upstream(self._h11.send(h11.EndOfMessage()))

    def upstream_pause_writing(self) -> None:
        # relay stops reading the client's body: the upstream is not taking it.
        # That pause is relay's doing, so the client's body deadline waits too.
        self._upstream_full_since = time.monotonic()
        self.client.hold_reading(True)
        if self.phase is not Phase.DONE:
            self._rearm()

    def upstream_resume_writing(self) -> None:
        self._upstream_full_since = None
        self._last_client_byte = time.monotonic()
        self.client.hold_reading(False)

    # -- response (called by the upstream connection) ---------------------
    def upstream_data(self, data: bytes) -> None:
        if self.phase is Phase.BODY:
            # The hot path. Keep it short.
            now = time.monotonic()
            if self._first_byte_at is not None:
                self._observe_gap(now - self._last_upstream_byte)
            else:
                self._first_byte_at = now
                self.metrics.time_to_first_byte.observe(now - self._sent_at)
            self._last_upstream_byte = now
            framer = self._framer
            try:
                taken = framer.feed(data)
            except FramingError as exc:
                self._cut(f"upstream sent invalid body framing: {exc}")
                return
            if taken:
                self.bytes_to_client += taken
                self._write_body(data if taken == len(data) else data[:taken])
                self._tail(data)  # issue #14: a reference for the usage, parsed at the end
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
                self._bad_gateway(f"upstream sent an invalid response head: {exc}")
                return
            if event is h11.NEED_DATA:
                return
            if isinstance(event, h11.InformationalResponse):
                self._forward_informational(event)
            elif isinstance(event, h11.Response):
                self._start_body(event)
            else:  # ConnectionClosed before a head: upstream_eof/lost handle it
                return

    def _forward_informational(self, event: h11.InformationalResponse) -> None:
        # relay already told the client 100 Continue itself; 101 cannot happen
        # because Upgrade never reaches the upstream. Others (103) go through.
        if event.status_code in (100, 101) or self.client.http_version != b"1.1":
            return
        headers = client_headers(event.headers.raw_items(), keep_framing=False, keep_trailer=False)
        self.client.transport.write(response_head(event.status_code, event.reason, headers))

    def _start_body(self, event: h11.Response) -> None:
        conn = self._h11
        assert conn is not None
        status = event.status_code
        chunked = False
        length: int | None = None
        for name, value in event.headers:  # h11 lower-cases names
            if name == b"transfer-encoding":
                chunked = True
            elif name == b"content-length":
                length = int(value)
        if chunked and length is not None:
            # RFC 9112 §6.3: a sign of smuggling or a broken upstream.
            self._bad_gateway("upstream sent both Content-Length and Transfer-Encoding")
            return
        leftover, _closed = conn.trailing_data
        if self._head_bytes_in - len(leftover) > self.config.max_header_bytes:
            # h11 bounds only heads still incomplete; one that came whole is measured here.
            self._bad_gateway("upstream response head too large")
            return
        self.status = status
        assert self.pool is not None
        self.metrics.requests[str(self.pool.address), status] += 1
        self._head_at = time.monotonic()
        self.metrics.time_to_head.observe(self._head_at - self._sent_at)
        plan = plan_response(
            status=status,
            head_request=self._head_request,
            chunked=chunked,
            length=length,
            client_http_version=self.client.http_version,
            client_may_stay=self.request_complete
            and not has_token(self.request.headers, b"connection", b"close"),
        )
        framing = plan.client_framing
        write = self.client.transport.write
        if plan.body == BodyKind.NONE:
            self._framer = LengthFramer(0)
        elif framing == ClientFraming.DECHUNK:
            framer = ChunkedFramer(dechunk=True, max_trailer_bytes=self.config.max_header_bytes)
            self._framer = framer
            write = self._dechunked_writer(framer)
        elif plan.body == BodyKind.CHUNKED:
            self._framer = ChunkedFramer(max_trailer_bytes=self.config.max_header_bytes)
        elif plan.body == BodyKind.LENGTH:
            assert length is not None
            self._framer = LengthFramer(length)
        else:
            self._framer = CloseFramer()
            if framing == ClientFraming.RECHUNK:
                write = self._rechunk_writer()
        self._write_body = write
        self._tail = self.ticket.response_started(status, event.headers)  # issue #14: usage
        self._rechunked = framing == ClientFraming.RECHUNK
        self._upstream_reusable = (
            self._framer.reusable
            and conn.their_http_version == b"1.1"
            and not has_token(event.headers, b"connection", b"close")
        )
        # Framing fields come from the plan alone, never from the upstream's
        # head: hop-by-hop filtering may have removed the ones it announced.
        headers = client_headers(
            event.headers.raw_items(), keep_framing=False, keep_trailer=plan.keep_trailer
        )
        headers.extend(plan.framing_headers)
        self._keep_client = plan.keep_client
        if not plan.keep_client:
            headers.append((b"connection", b"close"))
        self.client.transport.write(
            response_head(status, event.reason, headers, http_version=self.client.http_version)
        )
        self.phase = Phase.BODY
        self._rearm()
        if leftover:
            self.upstream_data(leftover)
        elif self._framer.complete:
            self._complete()

    def _dechunked_writer(self, framer: ChunkedFramer):  # noqa: ANN202
        transport = self.client.transport
        payload = framer.payload
        assert payload is not None

        def write(_data: bytes) -> None:
            if payload:
                transport.writelines(payload)
                payload.clear()

        return write

    def _rechunk_writer(self):  # noqa: ANN202
        transport = self.client.transport

        def write(data: bytes) -> None:
            transport.write(encode_chunk(data))

        return write

    def upstream_eof(self) -> None:
        self._eof_seen = True

    def upstream_lost(self, exc: Exception | None) -> None:
        self._upstream = None
        if self.phase is Phase.DONE:
            return
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
            return
        if self.phase is Phase.WAITING:
            if self._retry_allowed():
                self.metrics.upstream_retries += 1
                self._retried = True
                self.phase = Phase.CONNECTING
                self._h11 = None
                self._task = self._loop.create_task(self._connect(fresh=True))
                return
            self._bad_gateway("upstream closed the connection before sending a response")

    def _retry_allowed(self) -> bool:
        return (
            not self._retried
            and not self._got_upstream_bytes
            and self._replay is not None
            and self._attached_reused
        )

    # -- endings --------------------------------------------------------------
    def _complete(self) -> None:
        if self.phase is Phase.DONE:
            return
        upstream = self._upstream
        reusable = (
            self._upstream_reusable and self._h11 is not None and self._h11.our_state is h11.DONE
        )
        keep_alive = self._keep_client and self.request_complete
        self._end(Ending.COMPLETE)
        if upstream is not None and self.pool is not None:
            self.pool.release(upstream, reusable=reusable)
        self.client.exchange_finished(keep_alive=keep_alive)

    def _cut(self, reason: str) -> None:
        """The upstream broke mid-body: close the client without completing."""
        if self.phase is Phase.DONE:
            return
        self.metrics.truncated_streams += 1
        log.warning("stream truncated: %s (%s %s)", reason, self._method, self._target)
        self._close_upstream()
        self._end(Ending.UPSTREAM_CUT)
        self.client.close_truncated()

    def _bad_gateway(self, reason: str) -> None:
        log.warning("%s (%s %s)", reason, self._method, self._target)
        self._fail(RelayError(502, reason, "bad_gateway"))

    def _fail(self, error: RelayError) -> None:
        """Answer with ``error`` if nothing was sent yet, else cut the stream."""
        if self.phase is Phase.DONE:
            return
        if self.phase is Phase.BODY:
            self._cut(error.message)
            return
        self.status = error.status
        self._close_upstream()
        self._end(Ending.ERROR if error.status != 504 else Ending.TIMEOUT)
        self.client.send_error(error)

    def abort(self, ending: Ending = Ending.CLIENT_GONE) -> None:
        """The client is gone: stop everything now, never pool the upstream."""
        if self.phase is Phase.DONE:
            return
        if ending is Ending.CLIENT_GONE:
            self.metrics.client_disconnects += 1
        self._close_upstream()
        self._end(ending)

    def _close_upstream(self) -> None:
        upstream, self._upstream = self._upstream, None
        if upstream is not None and self.pool is not None:
            self.pool.discard(upstream)

    def _end(self, ending: Ending) -> None:
        self.phase = Phase.DONE
        self.ending = ending
        if self.pool is not None:
            self.pool.outstanding -= 1
        metrics = self.metrics
        metrics.active_exchanges -= 1
        metrics.bytes_from_clients += self.request_bytes
        metrics.bytes_to_clients += self.bytes_to_client
        now = time.monotonic()
        # Issue #14: usage from the kept reads; budgets, concurrency and queue slot released.
        usage = self.ticket.settle(self.bytes_to_client, self.requested_model, self.forwarded_model)
        log_exchange(
            client=self.client.client_host,
            method=self.request.method,
            target=self.request.target,
            status=self.status,
            upstream=str(self.pool.address) if self.pool is not None else "-",
            requested_model=self.requested_model,
            forwarded_model=self.forwarded_model,
            bytes_in=self.request_bytes,
            bytes_out=self.bytes_to_client,
            head_s=None if self._head_at is None else self._head_at - self._sent_at,
            ttft_s=None if self._first_byte_at is None else self._first_byte_at - self._sent_at,
            total_s=now - self.started,
            ending=ending.value,
            key=self.ticket.label if self.client.checks_keys else None,  # issue #14
            usage=usage,  # issue #14
        )
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        task, self._task = self._task, None
        if task is not None:
            task.cancel()

    # -- flow control from the client side ----------------------------------
    def client_pause_writing(self) -> None:
        self._client_paused_since = time.monotonic()
        if self._upstream is not None:
            self._upstream.pause_reading()
        if self.phase is not Phase.DONE:
            self._rearm()

    def client_resume_writing(self) -> None:
        self._client_paused_since = None
        if self._upstream is not None:
            self._upstream.resume_reading()

    # -- deadlines ------------------------------------------------------------
    def _arm(self, when: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        # time.monotonic() and loop.time() share a clock on every loop relay uses.
        self._timer = self._loop.call_at(when, self._on_timer)

    def _rearm(self) -> None:
        self._arm(self._next_deadline())

    def _next_deadline(self) -> float:
        cfg = self.config
        deadlines = []
        if self.request_complete:
            pass
        elif self._upstream_full_since is not None:
            deadlines.append(self._upstream_full_since + cfg.upstream_idle_timeout)
        else:
            deadlines.append(self._last_client_byte + cfg.client_body_timeout)
        if self.phase is Phase.WAITING:
            deadlines.append(self._sent_at + cfg.upstream_head_timeout)
        elif self.phase is Phase.BODY:
            if self._client_paused_since is not None:
                deadlines.append(self._client_paused_since + cfg.client_send_timeout)
            else:
                deadlines.append(self._last_upstream_byte + cfg.upstream_idle_timeout)
        elif self.phase is Phase.CONNECTING:
            deadlines.append(time.monotonic() + cfg.upstream_connect_timeout + 1.0)
        return min(deadlines)

    def _on_timer(self) -> None:
        self._timer = None
        if self.phase is Phase.DONE:
            return
        now = time.monotonic()
        cfg = self.config
        if not self.request_complete:
            full = self._upstream_full_since
            if full is not None and now - full >= cfg.upstream_idle_timeout:
                self.metrics.timeouts += 1
                message = "upstream stopped reading the request body"
                self._fail(RelayError(504, message, "upstream_timeout"))
                return
            if full is None and now - self._last_client_byte >= cfg.client_body_timeout:
                self.metrics.timeouts += 1
                self._fail(RelayError(408, "client sent the request body too slowly", "timeout"))
                return
        if self.phase is Phase.WAITING and now - self._sent_at >= cfg.upstream_head_timeout:
            self.metrics.timeouts += 1
            self._fail(RelayError(504, "upstream did not answer in time", "upstream_timeout"))
            return
        if self.phase is Phase.BODY:
            paused = self._client_paused_since
            if paused is not None and now - paused >= cfg.client_send_timeout:
                self.metrics.timeouts += 1
                log.warning("client stopped reading for %.0f s; dropping it", now - paused)
                self.abort(Ending.TIMEOUT)
                self.client.drop()  # it reads nothing: a graceful close would never end
                return
            if paused is None and now - self._last_upstream_byte >= cfg.upstream_idle_timeout:
                self.metrics.timeouts += 1
                self._cut("upstream idle timeout mid-body")
                return
        self._rearm()

    @property
    def _method(self) -> str:
        return self.request.method.decode("ascii", "replace")

    @property
    def _target(self) -> str:
        return self.request.target.decode("ascii", "replace")
