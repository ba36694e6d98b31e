"""Several upstreams: balancing, failover, health checks and routing by model."""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter

import aiohttp
import httpx
import pytest
from relayfixture import RelayThread
from sglang_app import SGLangServer

from relay.config import parse_route, parse_upstream

pytestmark = pytest.mark.timeout(90)

LIMIT = 20
CHAT = {"messages": [{"role": "user", "content": "hi"}]}


@pytest.fixture
def fleet():
    servers = [SGLangServer().start() for _ in range(3)]
    yield servers
    for server in servers:
        server.stop()


def relay_for(servers, **kwargs) -> RelayThread:
    rest = tuple(parse_upstream(s.url) for s in servers[1:])
    return RelayThread(servers[0].url, more_upstreams=rest, **kwargs)


def served(server) -> int:
    return len(server.sglang.requests)


async def stream_all(url: str, bodies: list[dict]) -> list[str]:
    """Run the streams concurrently; return per stream 'ok' or the error class name."""
    timeout = aiohttp.ClientTimeout(total=LIMIT)
    async with aiohttp.ClientSession(timeout=timeout) as session:

        async def one(body: dict) -> str:
            try:
                async with session.post(f"{url}/v1/chat/completions", json=body) as response:
                    text = await response.text()
                    return (
                        "ok" if text.endswith("data: [DONE]\n\n") else f"status {response.status}"
                    )
            except aiohttp.ClientPayloadError:
                return "truncated"

        return await asyncio.gather(*(one(body) for body in bodies))


def test_least_requests_spreads_long_streams_evenly(fleet):
    """30 concurrent streams of different lengths land 10/10/10 under least-requests."""
    with relay_for(fleet) as relay:
        bodies = [
            {**CHAT, "model": "m", "stream": True, "max_tokens": 5 + i % 7, "test_gap_ms": 30}
            for i in range(30)
        ]
        assert asyncio.run(stream_all(relay.url, bodies)) == ["ok"] * 30
    counts = sorted(served(server) for server in fleet)
    assert counts[-1] - counts[0] <= 2, counts
    assert sum(counts) == 30


@pytest.mark.parametrize("policy", ["round-robin", "random-two"])
def test_other_policies_use_every_upstream(fleet, policy):
    """round-robin and random-two also reach every upstream."""
    with relay_for(fleet, balance=policy) as relay:
        with httpx.Client(timeout=LIMIT) as client:
            for _ in range(30):
                response = client.post(
                    f"{relay.url}/v1/chat/completions", json={**CHAT, "model": "m", "max_tokens": 1}
                )
                assert response.status_code == 200
    assert all(served(server) > 0 for server in fleet)


def test_dead_upstream_is_ejected_without_client_errors_and_readmitted(fleet):
    """Killing one upstream costs no client request; it comes back after it recovers."""
    with relay_for(fleet, health_check="/health", health_interval=0.2) as relay:
        url = f"{relay.url}/v1/chat/completions"
        body = {**CHAT, "model": "m", "max_tokens": 1}
        with httpx.Client(timeout=LIMIT) as client:
            for _ in range(6):
                assert client.post(url, json=body).status_code == 200
            dead = fleet[1]
            port = dead.port
            dead.stop()
            for _ in range(30):
                assert client.post(url, json=body).status_code == 200
            assert relay.server is not None
            pools = relay.server.state.router.pools
            dead_pool = pools[parse_upstream(f"127.0.0.1:{port}")]
            assert not relay.call(lambda: dead_pool.available(time.monotonic()))
            revived = SGLangServer(port=port).start()
            fleet[1] = revived
            deadline = time.monotonic() + LIMIT
            while not relay.call(lambda: dead_pool.available(time.monotonic())):
                assert time.monotonic() < deadline, "never readmitted"
                time.sleep(0.05)
            for _ in range(9):
                assert client.post(url, json=body).status_code == 200
            assert served(revived) > 0


def test_passive_ejection_after_a_refused_connect(fleet):
    """Without health checks, a refused connect ejects the upstream and retries elsewhere."""
    with relay_for(fleet) as relay:
        url = f"{relay.url}/v1/chat/completions"
        body = {**CHAT, "model": "m", "max_tokens": 1}
        dead = fleet[0]
        dead_url = dead.url
        dead.stop()
        with httpx.Client(timeout=LIMIT) as client:
            for _ in range(12):
                assert client.post(url, json=body).status_code == 200
        assert relay.server is not None
        pool = relay.server.state.router.pools[parse_upstream(dead_url)]
        # Refused once, then skipped while ejected (the back-off doubles per failure).
        errors = relay.metrics().upstream_connect_errors
        assert 1 <= errors <= 3
        assert relay.call(lambda: pool.failures) == errors
        assert served(fleet[1]) + served(fleet[2]) == 12


def test_all_upstreams_down_is_a_502(fleet):
    """With every upstream refusing, the client gets a 502 JSON error after trying each."""
    with relay_for(fleet) as relay:
        for server in fleet:
            server.stop()
        response = httpx.post(
            f"{relay.url}/v1/chat/completions", json={**CHAT, "model": "m"}, timeout=LIMIT
        )
        assert response.status_code == 502
        assert response.json()["error"]["code"] == "upstream_unreachable"
        assert relay.metrics().upstream_connect_errors == 3


def test_routing_by_model(fleet):
    """--route sends a model only to its upstreams; others use the default set or get 404."""
    a, b, c = fleet
    routes = (parse_route(f"alpha={a.url}"), parse_route(f"beta={b.url},{c.url}"))
    with RelayThread(a.url, routes=routes) as relay:
        with httpx.Client(timeout=LIMIT) as client:
            for _ in range(4):
                client.post(
                    f"{relay.url}/v1/chat/completions",
                    json={**CHAT, "model": "alpha", "max_tokens": 1},
                )
            assert (served(a), served(b), served(c)) == (4, 0, 0)
            for _ in range(4):
                client.post(
                    f"{relay.url}/v1/chat/completions",
                    json={**CHAT, "model": "beta", "max_tokens": 1, "stream": True},
                )
            assert served(a) == 4 and served(b) + served(c) == 4 and served(b) and served(c)
            other = client.post(
                f"{relay.url}/v1/chat/completions", json={**CHAT, "model": "gamma", "max_tokens": 1}
            )
            assert other.status_code == 200 and served(a) == 5  # the default set
    with RelayThread(a.url, routes=routes, strict_models=True) as relay:
        response = httpx.post(
            f"{relay.url}/v1/chat/completions", json={**CHAT, "model": "gamma"}, timeout=LIMIT
        )
        assert response.status_code == 404
        assert response.json()["error"]["code"] == "model_not_found"
        assert served(a) == 5  # nothing reached an upstream


def test_routing_uses_the_model_after_aliasing(fleet):
    """An alias is resolved before routing: the target's route wins."""
    from relay.http.rewrite import ModelMap

    a, b, _ = fleet
    with RelayThread(
        a.url, routes=(parse_route(f"target={b.url}"),), model_map=ModelMap({"alias": "target"})
    ) as relay:
        response = httpx.post(
            f"{relay.url}/v1/chat/completions",
            json={**CHAT, "model": "alias", "max_tokens": 1},
            timeout=LIMIT,
        )
        assert response.status_code == 200
    assert served(b) == 1 and json.loads(b.sglang.requests[0]["body"])["model"] == "target"


def test_one_upstream_dying_mid_stream_truncates_exactly_its_streams(fleet):
    """100 streams over 3 upstreams; one crashes mid-stream: its streams are cut, honestly."""
    fleet[2].sglang.die_after = 3
    with relay_for(fleet) as relay:
        bodies = [
            {**CHAT, "model": "m", "stream": True, "max_tokens": 8, "test_gap_ms": 20}
            for _ in range(100)
        ]
        outcomes = Counter(asyncio.run(stream_all(relay.url, bodies)))
        metrics = relay.metrics()
    dying = served(fleet[2])
    assert dying > 0
    assert outcomes == Counter({"ok": 100 - dying, "truncated": dying})
    assert metrics.truncated_streams == dying
