"""Adding workers' metrics into one relay's: counters and histograms sum, flags combine."""

from __future__ import annotations

import json

from relay.core.metrics import Metrics, merge_gauges


def test_a_snapshot_survives_json_and_adds_up() -> None:
    """snapshot → JSON → from_snapshot keeps every value; add sums counters and buckets."""
    a, b = Metrics(), Metrics()
    a.connections_accepted, b.connections_accepted = 2, 3
    a.requests[("up:1", 200)] += 4
    b.requests[("up:1", 200)] += 1
    b.requests[("relay", 503)] += 1
    a.time_to_head.observe(0.02)
    b.time_to_head.observe(7.0)
    total = Metrics()
    for part in (a, b):
        total.add(Metrics.from_snapshot(json.loads(json.dumps(part.snapshot()))))
    assert total.connections_accepted == 5
    assert total.requests == {("up:1", 200): 5, ("relay", 503): 1}
    assert total.time_to_head.count == 2 and abs(total.time_to_head.total - 7.02) < 1e-9
    assert 'relay_requests_total{upstream="up:1",status="200"} 5' in total.render()


def test_gauges_sum_but_draining_is_any_and_available_is_every() -> None:
    """Connections add up; draining if any worker drains; available only if all agree."""
    one = {
        "relay_client_connections": [("", 2.0)],
        "relay_draining": [("", 0.0)],
        "relay_upstream_available": [('upstream="a"', 1.0)],
    }
    two = {
        "relay_client_connections": [("", 3.0)],
        "relay_draining": [("", 1.0)],
        "relay_upstream_available": [('upstream="a"', 0.0)],
    }
    merged = merge_gauges([one, json.loads(json.dumps(two))])
    assert merged["relay_client_connections"] == [("", 5.0)]
    assert merged["relay_draining"] == [("", 1.0)]
    assert merged["relay_upstream_available"] == [('upstream="a"', 0.0)]
