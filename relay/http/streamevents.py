"""The SGLang-like token events of relay's built-in streamers, as bytes.

Sans-IO: settings in, SSE event bytes out. Two servers write these events:
the demo and bench upstream (:mod:`relay.tools.streamer`) and relay's own
test stream on its public listener (``--test-stream``), which lets
``relay probe`` measure the hops in front of relay without an inference
server. Pacing (when each event goes out) belongs to those servers.

Every token event carries ``"relay_sent_ns"``, a ``time.monotonic_ns()``
stamp the server puts in just before its write (:meth:`EventBuilder.stamp`).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, replace
from typing import Any

__all__ = ["EventBuilder", "StreamerSettings", "completion_document", "overrides"]

#: The placeholder :meth:`EventBuilder.stamp` replaces with the send time.
_STAMP = b"%d}\n\n"


@dataclass(frozen=True)
class StreamerSettings:
    """Server-wide defaults; each request may override them (:func:`overrides`)."""

    tokens: int = 64
    ttft: float = 0.25
    gap: float = 0.024
    burst: int = 1
    model: str = "demo-model"


def overrides(defaults: StreamerSettings, body: dict[str, Any]) -> StreamerSettings:
    """``defaults`` with a request body's ``max_tokens``, ``relay_ttft_ms``,
    ``relay_gap_ms`` and ``relay_burst``; raises ``ValueError``/``TypeError`` on
    values that are not numbers."""
    changes: dict[str, Any] = {}
    if "max_tokens" in body:
        changes["tokens"] = max(1, int(body["max_tokens"]))
    if "relay_ttft_ms" in body:
        changes["ttft"] = max(0.0, float(body["relay_ttft_ms"]) / 1000)
    if "relay_gap_ms" in body:
        changes["gap"] = max(0.0, float(body["relay_gap_ms"]) / 1000)
    if "relay_burst" in body:
        changes["burst"] = max(1, int(body["relay_burst"]))
    return replace(defaults, **changes) if changes else defaults


class EventBuilder:
    """The ``data:`` events of one streamed (chat) completion, in order."""

    def __init__(
        self, settings: StreamerSettings, *, chat: bool, model: str, include_usage: bool
    ) -> None:
        self.settings = settings
        self.chat = chat
        self.include_usage = include_usage
        self.index = 0
        created = int(time.time())
        model_json = json.dumps(model)
        kind = "chat.completion.chunk" if chat else "text_completion"
        self.prefix = (
            f'data: {{"id":"cmpl-relay-demo","object":"{kind}","created":{created},'
            f'"model":{model_json},"choices":[{{"index":0,'
        ).encode()
        tokens = settings.tokens
        self.usage = (
            f'data: {{"id":"cmpl-relay-demo","object":"{kind}","created":{created},'
            f'"model":{model_json},"choices":[],"usage":{{"prompt_tokens":8,'
            f'"completion_tokens":{tokens},"total_tokens":{tokens + 8}}}}}\n\n'
        ).encode()

    @property
    def done(self) -> bool:
        return self.index >= self.settings.tokens

    def _event(self, index: int) -> bytes:
        text = f" tok{index}"
        if self.chat:
            role = '"role":"assistant",' if index == 0 else ""
            body = f'"delta":{{{role}"content":"{text}"}},"logprobs":null,"finish_reason":null}}]'
        else:
            body = f'"text":"{text}","logprobs":null,"finish_reason":null}}]'
        return self.prefix + (body + ',"relay_sent_ns":%d}\n\n').encode()

    def next_events(self) -> bytes:
        """The next ``burst`` token events (after the last: finish, usage, ``[DONE]``),
        with a send-time placeholder that :meth:`stamp` fills in."""
        settings = self.settings
        count = min(settings.burst, settings.tokens - self.index)
        events = [self._event(self.index + i) for i in range(count)]
        self.index += count
        if self.done:
            finish = (
                self.prefix
                + (b'"delta":{},' if self.chat else b'"text":"",')
                + b'"logprobs":null,"finish_reason":"length"}]}\n\n'
            )
            events.append(finish)
            if self.include_usage:
                events.append(self.usage)
            events.append(b"data: [DONE]\n\n")
        return b"".join(events)

    @staticmethod
    def stamp(payload: bytes, now_ns: int) -> bytes:
        """``payload`` with its placeholders set to ``now_ns`` (taken just before the write)."""
        return payload.replace(_STAMP, b"%d}\n\n" % now_ns)


def completion_document(settings: StreamerSettings, *, chat: bool, model: str) -> dict[str, Any]:
    """The whole answer of a non-streaming request, as JSON-able data."""
    text = "".join(f" tok{i}" for i in range(settings.tokens))
    choice: dict[str, Any] = {"index": 0, "finish_reason": "length"}
    if chat:
        choice["message"] = {"role": "assistant", "content": text}
    else:
        choice["text"] = text
    return {
        "id": "cmpl-relay-demo",
        "object": "chat.completion" if chat else "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": [choice],
        "usage": {
            "prompt_tokens": 8,
            "completion_tokens": settings.tokens,
            "total_tokens": settings.tokens + 8,
        },
    }
