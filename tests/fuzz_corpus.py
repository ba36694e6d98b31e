"""Seeds for the fuzzers: valid requests and SGLang-shaped responses, and framing edge cases."""

from __future__ import annotations

import json


def _sse(text: str) -> bytes:
    event = b"data: " + json.dumps({"choices": [{"delta": {"content": text}}]}).encode() + b"\n\n"
    return b"%x\r\n%b\r\n" % (len(event), event)


_BODY = json.dumps({"model": "m", "stream": True, "messages": [{"role": "user", "content": "hi"}]})

REQUEST_SEEDS: list[bytes] = [
    b"GET /health HTTP/1.1\r\nHost: a\r\n\r\n",
    b"POST /v1/chat/completions HTTP/1.1\r\nHost: a\r\nContent-Type: application/json\r\n"
    b"Content-Length: %d\r\n\r\n%b" % (len(_BODY), _BODY.encode()),
    b"POST /v1/completions HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
    b'5\r\n{"a":\r\n2\r\n1}\r\n0\r\n\r\n',
    b"POST /generate HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\n{}",
    b"GET / HTTP/1.0\r\n\r\n",
    b"HEAD /v1/models HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
    b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n"
    b"\r\n0\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\n\r\nGET /2 HTTP/1.1\r\nHost: a\r\n\r\n",
]

RESPONSE_SEEDS: list[bytes] = [
    b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
    + _sse("one")
    + _sse("two")
    + b"0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n"
    b'5;ext="v"\r\nhello\r\n0\r\nx-trailer: 1\r\n\r\n',
    b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello",
    b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\n\r\nuntil close",
    b"HTTP/1.1 204 No Content\r\n\r\n",
    b"HTTP/1.1 400 Bad Request\r\ncontent-length: 2\r\n\r\n{}",
    b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n" + b"F" * 20 + b"\r\n",
    b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\nhello\n0\n\n",
]
