"""OpenTelemetry traces (``--otel``): one span per exchange, joined to the client's trace.

Imported only when tracing is on, so a relay without ``--otel`` loads nothing
of OpenTelemetry (``relay[otel]`` is an optional extra). The exporter is the
SDK's OTLP/HTTP one behind a ``BatchSpanProcessor``: spans are queued on the
loop and sent from the SDK's own thread, never on the event loop, and the
standard ``OTEL_*`` variables (endpoint, headers, service name, sampler, batch
sizes) configure it.

An exchange touches its span three times, never per read: at its start
(the client's W3C ``traceparent`` is read, relay's span replaces it in the
upstream request head so the inference server's spans join the trace), at
the first body byte (an event), and at its end (attributes, status). The
attributes follow the OpenTelemetry HTTP and GenAI semantic conventions where
they fit; relay's own facts are under ``relay.*``. ``server.address`` and
``server.port`` name the upstream the exchange went to, as on a gateway's
client side. The key's name is recorded, never the key.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import SERVICE_NAME, SERVICE_VERSION, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.trace import SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from .. import __version__

if TYPE_CHECKING:
    from ..http.headers import HeaderList
    from ..http.usage import Usage

__all__ = ["ExchangeSpan", "Tracing"]

log = logging.getLogger("relay.events")

#: The request fields W3C Trace Context uses; relay's span replaces them upstream.
_TRACE_FIELDS = (b"traceparent", b"tracestate")
#: Endings that are a failure of the exchange (a client leaving is not).
_FAILED = frozenset({"upstream_cut", "timeout", "error"})
#: GenAI operation names of the OpenAI-compatible paths.
_OPERATIONS = {
    "/v1/chat/completions": "chat",
    "/v1/completions": "text_completion",
    "/v1/embeddings": "embeddings",
    "/generate": "generate_content",
}
_SHUTDOWN_MS = 5000


class Tracing:
    """One tracer provider per relay process, with its batch exporter."""

    def __init__(self) -> None:
        resource = Resource.create({SERVICE_VERSION: __version__})
        if str(resource.attributes.get(SERVICE_NAME, "")).startswith("unknown_service"):
            # OTEL_SERVICE_NAME / OTEL_RESOURCE_ATTRIBUTES win when set.
            resource = resource.merge(Resource({SERVICE_NAME: "relay"}))
        # The sampler comes from OTEL_TRACES_SAMPLER (default: parent-based, always on).
        self.provider = TracerProvider(resource=resource)
        self.provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
        self.tracer = self.provider.get_tracer("relay", __version__)
        self._propagator = TraceContextTextMapPropagator()
        log.info(
            "tracing on: OTLP/HTTP to %s",
            os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
            or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
            or "http://localhost:4318 (default)",
        )

    def start(
        self,
        method: bytes,
        path: bytes,
        fields: Iterable[tuple[bytes, bytes]],
        client_host: str,
        started: float,
    ) -> ExchangeSpan:
        """A span for an exchange that began at ``started`` (monotonic), child of the
        client's ``traceparent`` when it sent one. ``fields``: lower-case names."""
        carrier: dict[str, str] = {}
        for name, value in fields:
            if name in _TRACE_FIELDS:
                carrier[name.decode("latin-1")] = value.decode("latin-1")
        parent = self._propagator.extract(carrier) if carrier else None
        route = path.split(b"?", 1)[0].decode("latin-1")
        verb = method.decode("latin-1")
        attributes: dict[str, Any] = {
            "http.request.method": verb,
            "url.path": route,
            "client.address": client_host,
        }
        operation = _OPERATIONS.get(route)
        if operation is not None:
            attributes["gen_ai.operation.name"] = operation
        # Span times are wall-clock nanoseconds; relay keeps monotonic seconds.
        offset = time.time_ns() - int(time.monotonic() * 1e9)
        span = self.tracer.start_span(
            f"{verb} {route}" if operation is not None else verb,
            context=parent,
            kind=SpanKind.SERVER,
            attributes=attributes,
            start_time=offset + int(started * 1e9),
        )
        return ExchangeSpan(span, offset, self._propagator)

    def shutdown(self) -> None:
        """Export what is queued (bounded), then stop the exporter's thread."""
        self.provider.force_flush(_SHUTDOWN_MS)
        self.provider.shutdown()


class ExchangeSpan:
    """The span of one exchange; every method runs at most once per exchange."""

    __slots__ = ("_offset", "_propagator", "span")

    def __init__(
        self, span: trace.Span, offset: int, propagator: TraceContextTextMapPropagator
    ) -> None:
        self.span = span
        self._offset = offset
        self._propagator = propagator

    def inject(self, headers: HeaderList) -> None:
        """Make relay's span the parent in the upstream request's ``headers`` (in place)."""
        headers[:] = [(n, v) for n, v in headers if n.lower() not in _TRACE_FIELDS]
        carrier: dict[str, str] = {}
        self._propagator.inject(carrier, context=trace.set_span_in_context(self.span))
        headers.extend((k.encode("latin-1"), v.encode("latin-1")) for k, v in carrier.items())

    def first_byte(self, now: float) -> None:
        """The first response body byte (the first token of a stream) at ``now`` (monotonic)."""
        self.span.add_event("gen_ai.first_token", timestamp=self._offset + int(now * 1e9))

    def end(
        self,
        *,
        now: float,
        status: int | None,
        ending: str,
        upstream: Any,
        upstream_name: str | None,
        ttft_s: float | None,
        head_s: float | None,
        coalesced: int,
        key: str | None,
        usage: Usage,
        requested_model: str | None,
        forwarded_model: str | None,
        bytes_in: int,
        bytes_out: int,
    ) -> None:
        """Set what the exchange came to and end the span at ``now`` (monotonic)."""
        span = self.span
        attributes: dict[str, Any] = {
            "relay.ending": ending,
            "relay.reads_coalesced": coalesced,
            "relay.bytes_in": bytes_in,
            "relay.bytes_out": bytes_out,
            "relay.usage_source": usage.source,
        }
        if status is not None:
            attributes["http.response.status_code"] = status
        if upstream is not None:
            attributes["server.address"] = upstream.host
            attributes["server.port"] = upstream.port
            attributes["relay.upstream"] = upstream_name
        if ttft_s is not None:
            attributes["relay.ttft_s"] = ttft_s
        if head_s is not None:
            attributes["relay.time_to_head_s"] = head_s
        if key is not None:
            attributes["relay.key"] = key
        if requested_model is not None:
            attributes["gen_ai.request.model"] = requested_model
        if forwarded_model is not None and forwarded_model != requested_model:
            attributes["relay.forwarded_model"] = forwarded_model
        if usage.model is not None:
            attributes["gen_ai.response.model"] = usage.model
        if usage.source != "none":
            attributes["gen_ai.usage.input_tokens"] = usage.prompt
            attributes["gen_ai.usage.output_tokens"] = usage.completion
        span.set_attributes(attributes)
        if ending in _FAILED or (status is not None and status >= 500):
            span.set_status(Status(StatusCode.ERROR, ending))
        span.end(end_time=self._offset + int(now * 1e9))
