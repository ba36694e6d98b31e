"""An SGLang-like upstream on SGLang's own stack: Starlette served by uvicorn (h11).

It speaks the byte shapes of SGLang's OpenAI-compatible server: SSE chunks
``data: {json}\\n\\n``, a final chunk with ``finish_reason`` (and ``usage``
when ``stream_options.include_usage`` is set), then ``data: [DONE]\\n\\n``;
``/generate`` with cumulative ``text``; non-streaming JSON; ``/health`` and
``/v1/models``. Each request controls its own pace with body fields
``max_tokens``, ``test_ttft_ms``, ``test_gap_ms``, ``test_die_after`` (the
server process "crashes" the connection after that many tokens).
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections.abc import AsyncIterator
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

START_TIMEOUT = 10.0


class UpstreamCrash(Exception):
    """Raised inside a streaming body to make uvicorn drop the connection mid-body."""


class SGLangLike:
    """The app plus what it observed; run it with :class:`SGLangServer`."""

    def __init__(self, model: str = "test-model") -> None:
        self.model = model
        self.requests: list[dict[str, Any]] = []
        self.disconnects: list[float] = []
        self.disconnected = threading.Event()
        self.die_after: int | None = None  # every stream crashes after this many tokens
        self.app = Starlette(
            routes=[
                Route("/v1/chat/completions", self.chat, methods=["POST"]),
                Route("/v1/completions", self.completions, methods=["POST"]),
                Route("/generate", self.generate, methods=["POST"]),
                Route("/health", self.health, methods=["GET"]),
                Route("/v1/models", self.models, methods=["GET"]),
            ]
        )

    async def _read(self, request: Request) -> dict[str, Any]:
        raw = await request.body()
        self.requests.append(
            {"path": request.url.path, "headers": request.headers.raw, "body": raw}
        )
        try:
            body = json.loads(raw)
        except ValueError:
            body = {}
        return body if isinstance(body, dict) else {}

    async def health(self, request: Request) -> Response:
        return Response(status_code=200)

    async def models(self, request: Request) -> Response:
        return JSONResponse(
            {
                "object": "list",
                "data": [{"id": self.model, "object": "model", "owned_by": "sglang"}],
            }
        )

    def _tokens(self, body: dict[str, Any]) -> list[str]:
        return [f" tok{i}" for i in range(int(body.get("max_tokens", 8)))]

    async def _paced(
        self, request: Request, body: dict[str, Any]
    ) -> AsyncIterator[tuple[int, str]]:
        """Yield (index, token) at the requested pace; record a client disconnect at once."""
        ttft = float(body.get("test_ttft_ms", 0)) / 1000
        gap = float(body.get("test_gap_ms", 0)) / 1000
        die_after = body.get("test_die_after", self.die_after)
        watcher = asyncio.ensure_future(self._watch_disconnect(request))
        try:
            if ttft:
                await asyncio.sleep(ttft)
            for index, token in enumerate(self._tokens(body)):
                if die_after is not None and index >= int(die_after):
                    raise UpstreamCrash("test_die_after")
                if index and gap:
                    await asyncio.sleep(gap)
                yield index, token
        finally:
            watcher.cancel()

    async def _watch_disconnect(self, request: Request) -> None:
        # uvicorn delivers http.disconnect as soon as the socket closes.
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                self.disconnects.append(time.monotonic())
                self.disconnected.set()
                return

    def _chunk(
        self,
        body: dict[str, Any],
        kind: str,
        index: int,
        token: str | None,
        finish: str | None = None,
    ) -> str:
        choice: dict[str, Any] = {"index": 0, "finish_reason": finish}
        if kind == "chat":
            delta: dict[str, Any] = {}
            if index == 0 and token is not None:
                delta["role"] = "assistant"
            if token is not None:
                delta["content"] = token
            choice["delta"] = delta
            obj = "chat.completion.chunk"
        else:
            choice["text"] = token or ""
            obj = "text_completion"
        document = {
            "id": "cmpl-test",
            "object": obj,
            "created": 1,
            "model": body.get("model", self.model),
            "choices": [choice],
        }
        return f"data: {json.dumps(document)}\n\n"

    async def _openai(self, request: Request, kind: str) -> Response:
        body = await self._read(request)
        if "test_status" in body:
            status = int(body["test_status"])
            error = {"message": "test error", "type": "invalid_request_error", "code": status}
            return JSONResponse({"error": error}, status_code=status)
        tokens = self._tokens(body)
        usage = {
            "prompt_tokens": 3,
            "completion_tokens": len(tokens),
            "total_tokens": 3 + len(tokens),
        }
        if not body.get("stream"):
            async for _ in self._paced(request, body):
                pass
            text = "".join(tokens)
            choice: dict[str, Any] = {"index": 0, "finish_reason": "length"}
            if kind == "chat":
                choice["message"] = {"role": "assistant", "content": text}
            else:
                choice["text"] = text
            return JSONResponse(
                {
                    "id": "cmpl-test",
                    "object": "chat.completion",
                    "created": 1,
                    "model": body.get("model", self.model),
                    "choices": [choice],
                    "usage": usage,
                }
            )

        async def events() -> AsyncIterator[str]:
            async for index, token in self._paced(request, body):
                yield self._chunk(body, kind, index, token)
            yield self._chunk(body, kind, len(tokens), None, finish="length")
            if (body.get("stream_options") or {}).get("include_usage"):
                document = {
                    "id": "cmpl-test",
                    "object": "chat.completion.chunk",
                    "created": 1,
                    "model": body.get("model", self.model),
                    "choices": [],
                    "usage": usage,
                }
                yield f"data: {json.dumps(document)}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    async def chat(self, request: Request) -> Response:
        return await self._openai(request, "chat")

    async def completions(self, request: Request) -> Response:
        return await self._openai(request, "completions")

    async def generate(self, request: Request) -> Response:
        body = await self._read(request)
        if not body.get("stream"):
            text = "".join(self._tokens(body))
            return JSONResponse({"text": text, "meta_info": {"completion_tokens": len(text)}})

        async def events() -> AsyncIterator[str]:
            text = ""
            async for index, token in self._paced(request, body):
                text += token
                meta = {"completion_tokens": index + 1}
                yield f"data: {json.dumps({'text': text, 'meta_info': meta})}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")


class SGLangServer:
    """uvicorn serving :class:`SGLangLike` in a background thread on 127.0.0.1."""

    def __init__(
        self,
        app: SGLangLike | None = None,
        *,
        certfile: str | None = None,
        keyfile: str | None = None,
        ca_certs: str | None = None,
        port: int = 0,
    ) -> None:
        self.sglang = app or SGLangLike()
        tls: dict[str, Any] = {}
        if certfile:
            tls = {"ssl_certfile": certfile, "ssl_keyfile": keyfile}
            if ca_certs:  # require client certificates (mTLS toward the upstream)
                import ssl

                tls.update(ssl_ca_certs=ca_certs, ssl_cert_reqs=ssl.CERT_REQUIRED)
        self.scheme = "https" if certfile else "http"
        config = uvicorn.Config(
            self.sglang.app,
            host="127.0.0.1",
            port=0,
            http="h11",
            loop="asyncio",
            log_level="critical",
            lifespan="off",
            **tls,
        )
        self.server = uvicorn.Server(config)
        # Bound and listening before uvicorn runs: connections made before it
        # accepts wait in the backlog, so no readiness polling is needed.
        self.sock = socket.create_server(("127.0.0.1", port))
        self._thread = threading.Thread(
            target=self.server.run,
            kwargs={"sockets": [self.sock]},
            name="sglang-like",
            daemon=True,
        )

    def start(self) -> SGLangServer:
        self._thread.start()
        return self

    @property
    def port(self) -> int:
        return self.sock.getsockname()[1]

    @property
    def url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.server.should_exit = True
        self._thread.join(START_TIMEOUT)
