"""Counters and histograms relay keeps about itself, and their Prometheus text.

Recording must cost the hot path next to nothing: plain integer attributes,
and histograms with a fixed bucket list where one observation is a
``bisect`` and two additions. Rendering happens only when ``/metrics`` is
scraped, on the admin listener.
"""

from __future__ import annotations

from bisect import bisect_left
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

from ..http.fidelity import ENDINGS

__all__ = ["Gauges", "Histogram", "Metrics", "merge_gauges"]

#: Point-in-time values: name -> [(labels, value)].
Gauges = dict[str, list[tuple[str, float]]]

# Seconds. Time to head and TTFT span queueing (minutes); gaps are tokens (ms).
SLOW_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
GAP_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.02, 0.03, 0.05, 0.1, 0.25, 0.5, 1, 5, 30)
# Bytes a coalesced read found still queued for the client; seconds to stop a
# departed client's upstream (relay closes it in the same callback: microseconds).
BACKLOG_BUCKETS = (256, 1024, 4096, 16384, 65536, 262144)
CANCEL_BUCKETS = (0.0001, 0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5)
# Seconds the loop ran its deadline tick late: every stream waits that on top
# of its own work, so the buckets start below a token gap.
LAG_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)


class Histogram:
    """A Prometheus histogram with fixed upper bounds (seconds)."""

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(self.bounds) + 1)
        self.total = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.total += value

    @property
    def count(self) -> int:
        return sum(self.counts)

    def render(self, name: str, labels: str = "") -> list[str]:
        lines = []
        cumulative = 0
        sep = "," if labels else ""
        for bound, count in zip(self.bounds, self.counts, strict=False):
            cumulative += count
            lines.append(f'{name}_bucket{{{labels}{sep}le="{bound:g}"}} {cumulative}')
        cumulative += self.counts[-1]
        lines.append(f'{name}_bucket{{{labels}{sep}le="+Inf"}} {cumulative}')
        suffix = f"{{{labels}}}" if labels else ""
        lines.append(f"{name}_sum{suffix} {self.total:.6f}")
        lines.append(f"{name}_count{suffix} {cumulative}")
        return lines


@dataclass
class Metrics:
    """Process-wide counters; one instance per server."""

    connections_accepted: int = 0
    connections_rejected: int = 0
    tls_handshake_failures: int = 0
    # Responses by (upstream, status); "relay" when relay answered itself.
    requests: Counter[tuple[str, int]] = field(default_factory=Counter)
    upstream_connects: int = 0
    upstream_connect_errors: int = 0
    upstream_reused: int = 0
    upstream_retries: int = 0
    truncated_streams: int = 0
    client_disconnects: int = 0
    timeouts: int = 0
    bytes_from_clients: int = 0
    bytes_to_clients: int = 0
    active_exchanges: int = 0
    # Stream fidelity: coalesced reads by (upstream,), endings by
    # (ending, stream), what a departed client's upstream sent, keep-alives.
    coalesced_reads: Counter[tuple[str, ...]] = field(default_factory=Counter)
    endings: Counter[tuple[str, ...]] = field(default_factory=Counter)
    cancel_upstream_bytes: int = 0
    sse_keepalives: int = 0
    coalesced_backlog: Histogram = field(default_factory=lambda: Histogram(BACKLOG_BUCKETS))
    cancel_time: Histogram = field(default_factory=lambda: Histogram(CANCEL_BUCKETS))
    time_to_head: Histogram = field(default_factory=lambda: Histogram(SLOW_BUCKETS))
    time_to_first_byte: Histogram = field(default_factory=lambda: Histogram(SLOW_BUCKETS))
    upstream_read_gap: Histogram = field(default_factory=lambda: Histogram(GAP_BUCKETS))
    loop_lag: Histogram = field(default_factory=lambda: Histogram(LAG_BUCKETS))
    # Keys, limits and usage. Labels are bounded: key names (or
    # "anonymous"), configured model names (others are "other"), fixed words.
    tokens: Counter[tuple[str, str, str]] = field(default_factory=Counter)  # key, model, kind
    key_requests: Counter[tuple[str, str]] = field(default_factory=Counter)  # key, result
    usage: Counter[tuple[str, str]] = field(default_factory=Counter)  # key, source
    queue_wait: Histogram = field(default_factory=lambda: Histogram(SLOW_BUCKETS))
    # Calls to the --limits-store that failed or timed out.
    limits_store_errors: int = 0
    # Request starts that waited for a later loop turn (core/headpacer.py).
    starts_deferred: int = 0

    def snapshot(self) -> dict[str, Any]:
        """Every value as JSON-able data (what a worker sends its parent)."""
        out: dict[str, Any] = {}
        for spec in fields(self):
            value = getattr(self, spec.name)
            if isinstance(value, Histogram):
                out[spec.name] = {"counts": value.counts, "total": value.total}
            elif isinstance(value, Counter):
                out[spec.name] = [[*key, n] for key, n in value.items()]
            else:
                out[spec.name] = value
        return out

    @classmethod
    def from_snapshot(cls, data: dict[str, Any]) -> Metrics:
        """The inverse of :meth:`snapshot`; unknown names are ignored."""
        metrics = cls()
        for spec in fields(metrics):
            if spec.name not in data:
                continue
            value, current = data[spec.name], getattr(metrics, spec.name)
            if isinstance(current, Histogram):
                if len(value["counts"]) == len(current.counts):
                    current.counts = [int(n) for n in value["counts"]]
                    current.total = float(value["total"])
            elif isinstance(current, Counter):
                # JSON keeps each key part's type (upstream str, status int).
                for *key, n in value:
                    current[tuple(key)] += int(n)
            else:
                setattr(metrics, spec.name, int(value))
        return metrics

    def add(self, other: Metrics) -> None:
        """Add ``other``'s counts to these (the whole relay over its workers)."""
        for spec in fields(self):
            mine, theirs = getattr(self, spec.name), getattr(other, spec.name)
            if isinstance(mine, Histogram):
                mine.counts = [a + b for a, b in zip(mine.counts, theirs.counts, strict=True)]
                mine.total += theirs.total
            elif isinstance(mine, Counter):
                mine.update(theirs)
            else:
                setattr(self, spec.name, mine + theirs)

    def render(self, *, gauges: Callable[[], Gauges] | None = None) -> str:
        """The Prometheus text exposition (format 0.0.4)."""
        out: list[str] = []

        def metric(name: str, kind: str, text: str, samples: list[str]) -> None:
            out.append(f"# HELP {name} {text}")
            out.append(f"# TYPE {name} {kind}")
            out.extend(samples)

        by_status = sorted(self.requests.items()) or [(("relay", 200), 0)]
        metric(
            "relay_requests_total",
            "counter",
            "Responses sent to clients, by upstream (relay: answered by relay) and status.",
            [
                f'relay_requests_total{{upstream="{up}",status="{status}"}} {n}'
                for (up, status), n in by_status
            ],
        )
        for name, attribute, text in _COUNTERS:
            metric(name, "counter", text, [f"{name} {getattr(self, attribute)}"])
        gauge_values = {"relay_active_exchanges": [("", float(self.active_exchanges))]}
        if gauges is not None:
            gauge_values.update(gauges())
        for name, samples in gauge_values.items():
            lines = [
                f"{name}{{{labels}}} {value:g}" if labels else f"{name} {value:g}"
                for labels, value in samples
            ]
            metric(name, "gauge", _GAUGE_HELP.get(name, name), lines)
        # Stream fidelity.
        for name, (_, text) in _FIDELITY_COUNTERS.items():
            metric(name, "counter", text, _fidelity_samples(self, name))
        for name, attribute, text in _FIDELITY_HISTOGRAMS:
            metric(name, "histogram", text, getattr(self, attribute).render(name))
        for name, attribute, text in _HISTOGRAMS:
            metric(name, "histogram", text, getattr(self, attribute).render(name))
        # Keys, limits and usage.
        for name, attribute, labels, text in _LABELLED:
            samples = [
                name
                + "{"
                + ",".join(f'{k}="{v}"' for k, v in zip(labels, values, strict=True))
                + f"}} {n}"
                for values, n in sorted(getattr(self, attribute).items())
            ]
            metric(name, "counter", text, samples)
        metric(
            "relay_queue_wait_seconds",
            "histogram",
            "Time requests waited for a --max-inflight slot (granted or not).",
            self.queue_wait.render("relay_queue_wait_seconds"),
        )
        return "\n".join(out) + "\n"


def merge_gauges(parts: Sequence[Gauges]) -> Gauges:
    """One relay's gauges from its workers': summed, but flags take any/every worker."""
    merged: dict[str, dict[str, float]] = {}
    for part in parts:
        for name, samples in part.items():
            combine = _GAUGE_COMBINE.get(name, _sum)
            series = merged.setdefault(name, {})
            for labels, value in samples:
                old = series.get(labels)
                series[labels] = float(value) if old is None else combine(old, float(value))
    return {name: list(series.items()) for name, series in merged.items()}


def _sum(a: float, b: float) -> float:
    return a + b


# Draining if any worker drains; an upstream is available only if every worker
# may use it (one that ejected it is a problem worth an alert).
_GAUGE_COMBINE: dict[str, Callable[[float, float], float]] = {
    "relay_draining": max,
    "relay_limits_store_up": min,  # a worker that cannot reach the store is worth an alert
    "relay_upstream_available": min,
}

_COUNTERS = [
    ("relay_connections_accepted_total", "connections_accepted", "Client connections accepted."),
    ("relay_connections_rejected_total", "connections_rejected",
     "Client connections refused (limit or draining)."),
    ("relay_tls_handshake_failures_total", "tls_handshake_failures",
     "TLS handshakes that failed or timed out (plain HTTP on the TLS port included)."),
    ("relay_upstream_connects_total", "upstream_connects", "Upstream connections opened."),
    ("relay_upstream_connect_errors_total", "upstream_connect_errors",
     "Upstream connects that failed."),
    ("relay_upstream_reused_total", "upstream_reused",
     "Requests sent on a pooled upstream connection."),
    ("relay_upstream_retries_total", "upstream_retries",
     "Requests replayed after a stale pooled connection."),
    ("relay_truncated_streams_total", "truncated_streams",
     "Responses cut because the upstream broke mid-body."),
    ("relay_client_disconnects_total", "client_disconnects",
     "Clients gone before their response completed."),
    ("relay_timeouts_total", "timeouts", "Exchanges ended by a timeout."),
    ("relay_received_bytes_total", "bytes_from_clients", "Request body bytes from clients."),
    ("relay_sent_bytes_total", "bytes_to_clients", "Response body bytes sent to clients."),
    ("relay_limits_store_errors_total", "limits_store_errors",
     "Calls to the shared limits store that failed or timed out."),
    ("relay_request_starts_deferred_total", "starts_deferred",
     "Requests whose start waited for a later event-loop turn: new requests had used "
     "their share of the turn (streams opening faster than relay starts them)."),
]  # fmt: skip
_HISTOGRAMS = [
    ("relay_upstream_head_seconds", "time_to_head", "Request sent to upstream response head."),
    ("relay_first_byte_seconds", "time_to_first_byte",
     "Request sent to the first upstream body byte (TTFT as relay sees it)."),
    ("relay_upstream_read_gap_seconds", "upstream_read_gap",
     "Gap between consecutive upstream body reads (inter-token latency)."),
    ("relay_loop_lag_seconds", "loop_lag",
     "How late the event loop ran relay's deadline tick (sampled on every tick): "
     "what every stream waits on top of its own work."),
]  # fmt: skip
_FIDELITY_COUNTERS = {
    "relay_coalesced_reads_total": (
        "coalesced_reads",
        "Upstream reads that could not go out on their own: the client's transport "
        "still held earlier bytes (slow client or network, or relay behind).",
    ),
    "relay_stream_endings_total": (
        "endings",
        "Exchanges by ending (as the access line's ending field) and whether the "
        "response was an event stream.",
    ),
    "relay_cancel_upstream_bytes_total": (
        "cancel_upstream_bytes",
        "Bytes a departed client's upstream had sent that relay dropped unread when it "
        "closed that upstream connection.",
    ),
    "relay_sse_keepalives_total": (
        "sse_keepalives",
        "SSE keep-alive comments relay sent while the upstream was silent (--sse-keepalive).",
    ),
}
_FIDELITY_HISTOGRAMS = [
    ("relay_coalesced_backlog_bytes", "coalesced_backlog",
     "Bytes still queued for the client when a coalesced read arrived (how late it went out)."),
    ("relay_cancel_seconds", "cancel_time",
     "Time from relay noticing a client left mid-response to its upstream connection closed."),
]  # fmt: skip


def _fidelity_samples(metrics: Metrics, name: str) -> list[str]:
    """The samples of one fidelity counter; every ending kind appears, zero or not."""
    value = getattr(metrics, _FIDELITY_COUNTERS[name][0])
    if name == "relay_coalesced_reads_total":
        return [f'{name}{{upstream="{up}"}} {n}' for (up,), n in sorted(value.items())]
    if name == "relay_stream_endings_total":
        return [
            f'{name}{{ending="{ending}",stream="{stream}"}} {value[ending, stream]}'
            for ending in ENDINGS
            for stream in ("true", "false")
        ]
    return [f"{name} {value}"]


_LABELLED = [
    ("relay_tokens_total", "tokens", ("key", "model", "kind"),
     "Tokens used, as the upstream reported them (or estimated), by key, model and kind."),
    ("relay_key_requests_total", "key_requests", ("key", "result"),
     "Requests by key: admitted, or refused (concurrent, rpm, tpm, queue_full, queue_timeout)."),
    ("relay_usage_total", "usage", ("key", "source"),
     "Finished requests by where their token count came from: reported, estimated or none."),
]  # fmt: skip
_GAUGE_HELP = {
    "relay_active_exchanges": "Exchanges in flight.",
    "relay_client_connections": "Open client connections.",
    "relay_tls_handshakes": "Accepted TLS connections whose handshake is not done yet.",
    "relay_upstream_pool_idle": "Idle pooled upstream connections.",
    "relay_upstream_pool_active": "Upstream connections carrying an exchange.",
    "relay_draining": "1 while relay drains before exit.",
    "relay_limits_store_up": "1 while the shared limits store answers (--limits-store).",
    "relay_workers": "Worker processes up and serving (--workers).",
    "relay_upstream_outstanding": "Requests assigned to the upstream and not finished.",
    "relay_upstream_available": "1 unless ejected after failures or failing its health check.",
    "relay_queue_length": "Requests waiting for a --max-inflight slot, by upstream.",
    "relay_upstream_inflight": "--max-inflight slots in use, by upstream.",
    "relay_key_in_flight": "Requests in flight, by key.",
}
