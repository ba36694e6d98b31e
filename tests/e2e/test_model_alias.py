"""Model aliasing end to end: the upstream sees the target, the client sees its stream."""

from __future__ import annotations

import asyncio
import json

import openai
import pytest
from harness import WAIT, connect, read_head, read_request, run, setup
from relayfixture import RelayThread
from sglang_app import SGLangServer

from relay.http.rewrite import ModelMap

pytestmark = pytest.mark.timeout(60)

MAP = ModelMap({"gpt-4o": "GLM-5.1-FP8"})


@pytest.fixture
def sglang():
    server = SGLangServer().start()
    yield server
    server.stop()


def test_openai_sdk_alias_reaches_the_upstream_as_the_target(sglang):
    """The SDK asks for gpt-4o; SGLang gets GLM-5.1-FP8; the stream comes back intact."""
    with RelayThread(sglang.url, model_map=MAP) as relay:
        client = openai.OpenAI(base_url=f"{relay.url}/v1", api_key="x", max_retries=0, timeout=20)
        stream = client.chat.completions.create(
            model="gpt-4o",
            messages=[{"role": "user", "content": "hi", "name": "gpt-4o"}],
            stream=True,
            max_tokens=5,
        )
        text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
        models = [m.id for m in client.models.list()]
        client.close()
    assert text == " tok0 tok1 tok2 tok3 tok4"
    received = json.loads(sglang.sglang.requests[0]["body"])
    assert received["model"] == "GLM-5.1-FP8"
    assert received["messages"][0]["name"] == "gpt-4o"
    assert models == ["test-model", "gpt-4o"]


def test_everything_maps_to_one_model_with_model_flag(sglang):
    """--model TARGET replaces any model name, leaving the rest of the body alone."""
    body = b'{"model" :  "anything",\n "max_tokens":2, "stream":false}'
    with RelayThread(sglang.url, model_map=ModelMap({}, default="served")) as relay:
        import httpx

        response = httpx.post(
            f"{relay.url}/v1/completions",
            content=body,
            headers={"content-type": "application/json"},
            timeout=20,
        )
    assert response.status_code == 200
    assert (
        sglang.sglang.requests[0]["body"]
        == b'{"model" :  "served",\n "max_tokens":2, "stream":false}'
    )


async def echo(reader, writer, up):
    while True:
        raw = await read_request(reader, up)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
        up.last = raw


def test_chunked_body_is_collected_and_sent_with_content_length(loop_kind):
    """A chunked JSON body is rewritten and forwarded with a recomputed Content-Length."""

    async def main():
        async with setup(echo, model_map=MAP) as (up, relay):
            reader, writer = await connect(relay)
            writer.write(
                b"POST /v1/chat/completions HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n"
                b'\r\n6\r\n{"mode\r\n11\r\nl":"gpt-4o","a":1\r\n1\r\n}\r\n0\r\n\r\n'
            )
            await read_head(reader)
            raw = up.last
            head, _, body = raw.partition(b"\r\n\r\n")
            assert body == b'{"model":"GLM-5.1-FP8","a":1}'
            assert b"content-length: 29" in head.lower()
            assert b"transfer-encoding" not in head.lower()
            writer.close()

    run(loop_kind, main)


def test_non_json_bodies_pass_unchanged_and_unmapped_bodies_stream(loop_kind):
    """Non-JSON content types are not collected; without a mapping the body streams."""

    async def main():
        async with setup(echo, model_map=MAP) as (up, relay):
            reader, writer = await connect(relay)
            writer.write(
                b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Type: text/plain\r\nContent-Length: 18"
                b'\r\n\r\n{"model":"gpt-4o"}'
            )
            await read_head(reader)
            assert up.last.endswith(b'{"model":"gpt-4o"}')
            writer.close()

        async def slow_reader(reader, writer, up):
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), WAIT)
            first = await asyncio.wait_for(reader.read(100), WAIT)
            up.first = head + first
            up.first_seen.set()
            await asyncio.sleep(1)

        async with setup(slow_reader) as (up, relay):
            up.first_seen = asyncio.Event()
            reader, writer = await connect(relay)
            writer.write(
                b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 20\r\n\r\n" + b'{"model":"gpt'
            )
            # The upstream gets the head and the first bytes before the body is complete.
            await asyncio.wait_for(up.first_seen.wait(), WAIT)
            assert up.first.endswith(b'{"model":"gpt')
            writer.close()

    run(loop_kind, main)
