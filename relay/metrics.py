"""Counters relay keeps about itself (plain integers: cheap on the hot path).

The Prometheus exposition and histograms come with the admin listener; the
counters exist from the start because every honest-ending and cancellation
event must be counted, and tests read them.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

__all__ = ["Metrics"]


@dataclass
class Metrics:
    """Process-wide counters; one instance per server."""

    connections_accepted: int = 0
    connections_rejected: int = 0
    requests: Counter[int] = field(default_factory=Counter)  # by status sent to the client
    upstream_connects: int = 0
    upstream_connect_errors: int = 0
    upstream_reused: int = 0
    upstream_retries: int = 0
    truncated_streams: int = 0
    client_disconnects: int = 0
    timeouts: int = 0
    bytes_from_upstream: int = 0
