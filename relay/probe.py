"""``relay probe URL``: is this endpoint streaming, or buffering?

Sends one streaming chat completion (or completion) to an OpenAI-compatible
base URL and times every token as it arrives: TTFT, inter-token gaps, and
how many tokens arrived within 1 ms of the previous one. Most tokens arriving
together means something on the way buffers (the verdict ``BUFFERED``).

Exit codes: 0 streaming, 1 BUFFERED, 2 bad flags, 3 error (refused, timeout,
TLS, a non-200 answer, or not an event stream). Only relay's runtime
dependencies are used: asyncio and h11.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import ssl
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import h11

from .cliparse import OneLineParser
from .sse import SSEError, SSEParser, StreamStats, tokens_in_event

__all__ = ["ProbeError", "ProbeResult", "format_table", "main", "probe"]

EXIT_STREAMING, EXIT_BUFFERED, EXIT_USAGE, EXIT_ERROR = 0, 1, 2, 3
MAX_ERROR_BODY = 64 * 1024
API_KEY_ENVS = ("RELAY_PROBE_API_KEY", "OPENAI_API_KEY")


class ProbeError(Exception):
    """The probe could not measure a stream; the message is one line for a person."""


@dataclass
class ProbeResult:
    url: str
    model: str
    stats: StreamStats

    def as_dict(self) -> dict[str, Any]:
        stats = self.stats
        ttft = stats.ttft
        gaps = stats.gap_summary()
        return {
            "url": self.url,
            "model": self.model,
            "verdict": stats.verdict,
            "tokens": stats.count,
            "ttft_ms": None if ttft is None else round(ttft * 1000, 2),
            "gap_ms": None if gaps is None else {k: round(v * 1000, 2) for k, v in gaps.items()},
            "coalesced": stats.coalesced,
        }


@dataclass(frozen=True)
class _Target:
    scheme: str
    host: str
    port: int
    base: str  # path prefix ending in /v1

    @classmethod
    def parse(cls, url: str) -> _Target:
        parts = urlsplit(url if "://" in url else f"http://{url}")
        if parts.scheme not in ("http", "https"):
            raise ProbeError(f"unsupported URL scheme {parts.scheme!r} in {url}")
        if not parts.hostname:
            raise ProbeError(f"no host in URL {url}")
        try:
            port = parts.port or (443 if parts.scheme == "https" else 80)
        except ValueError:
            raise ProbeError(f"invalid port in URL {url}") from None
        base = parts.path.rstrip("/")
        if not base.endswith("/v1"):
            base += "/v1"
        return cls(parts.scheme, parts.hostname, port, base)

    @property
    def authority(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


async def _open(target: _Target) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    context = ssl.create_default_context() if target.scheme == "https" else None
    try:
        reader, writer = await asyncio.open_connection(
            target.host, target.port, ssl=context, server_hostname=target.host if context else None
        )
    except ssl.SSLError as exc:
        raise ProbeError(f"TLS error with {target.authority}: {exc.reason or exc}") from None
    except OSError as exc:
        reason = exc.strerror or str(exc) or type(exc).__name__
        raise ProbeError(f"cannot connect to {target.authority}: {reason}") from None
    sock = writer.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return reader, writer


def _headers(target: _Target, api_key: str | None, body: bytes | None) -> list[tuple[str, str]]:
    headers = [("host", target.authority), ("accept", "text/event-stream, application/json")]
    if api_key:
        headers.append(("authorization", f"Bearer {api_key}"))
    if body is not None:
        headers += [("content-type", "application/json"), ("content-length", str(len(body)))]
    return headers


async def _next(conn: h11.Connection, reader: asyncio.StreamReader) -> Any:
    while True:
        event = conn.next_event()
        if event is not h11.NEED_DATA:
            return event
        data = await reader.read(65536)
        conn.receive_data(data)


def _error_message(status: int, body: bytes) -> str:
    try:
        document = json.loads(body)
        error = document.get("error", document) if isinstance(document, dict) else document
        message = error.get("message") if isinstance(error, dict) else None
        if message:
            return f"HTTP {status}: {message}"
    except ValueError:
        pass
    text = body.decode("utf-8", "replace").strip().splitlines()
    return f"HTTP {status}: {text[0][:200]}" if text else f"HTTP {status}"


async def _read_body(conn: h11.Connection, reader: asyncio.StreamReader) -> bytes:
    body = b""
    while len(body) < MAX_ERROR_BODY:
        event = await _next(conn, reader)
        if isinstance(event, h11.Data):
            body += event.data
        else:
            break
    return body


async def _first_model(target: _Target, api_key: str | None) -> str:
    reader, writer = await _open(target)
    try:
        conn = h11.Connection(h11.CLIENT)
        request = h11.Request(
            method="GET", target=f"{target.base}/models", headers=_headers(target, api_key, None)
        )
        writer.write(conn.send(request) + (conn.send(h11.EndOfMessage()) or b""))
        response = await _next(conn, reader)
        body = await _read_body(conn, reader)
        if isinstance(response, h11.Response) and response.status_code == 200:
            document = json.loads(body)
            return str(document["data"][0]["id"])
    except (ValueError, KeyError, IndexError, TypeError, h11.ProtocolError):
        pass
    finally:
        writer.close()
    return "default"


async def _stream(
    target: _Target,
    model: str,
    prompt: str,
    api_key: str | None,
    max_tokens: int,
    completions: bool,
) -> StreamStats:
    document: dict[str, Any] = {"model": model, "stream": True, "max_tokens": max_tokens}
    if completions:
        document["prompt"] = prompt
        path = f"{target.base}/completions"
    else:
        document["messages"] = [{"role": "user", "content": prompt}]
        path = f"{target.base}/chat/completions"
    body = json.dumps(document).encode()
    reader, writer = await _open(target)
    try:
        conn = h11.Connection(h11.CLIENT)
        request = h11.Request(method="POST", target=path, headers=_headers(target, api_key, body))
        stats = StreamStats(started=time.monotonic())
        writer.write(
            conn.send(request)
            + (conn.send(h11.Data(data=body)) or b"")
            + (conn.send(h11.EndOfMessage()) or b"")
        )
        response = await _next(conn, reader)
        if not isinstance(response, h11.Response):
            raise ProbeError("connection closed before a response")
        if response.status_code != 200:
            raise ProbeError(_error_message(response.status_code, await _read_body(conn, reader)))
        content_type = dict(response.headers).get(b"content-type", b"").decode("latin-1")
        if not content_type.startswith("text/event-stream"):
            raise ProbeError(f"not an event stream (content-type {content_type or 'missing'})")
        parser = SSEParser()
        arrived = time.monotonic()  # body bytes read together with the head
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                data = await reader.read(65536)
                arrived = time.monotonic()
                conn.receive_data(data)
                continue
            if isinstance(event, h11.Data):
                for data_text in parser.feed(event.data):
                    info = tokens_in_event(data_text)
                    if info.error:
                        raise ProbeError(f"error in stream: {info.error}")
                    if info.tokens:
                        stats.token(arrived, info.tokens)
            elif isinstance(event, h11.EndOfMessage):
                return stats
            else:
                raise ProbeError("stream ended unexpectedly")
    except h11.RemoteProtocolError as exc:
        raise ProbeError(f"stream cut or malformed: {exc}") from None
    except SSEError as exc:
        raise ProbeError(f"malformed event stream: {exc}") from None
    finally:
        writer.close()


async def probe(
    url: str,
    *,
    model: str | None = None,
    prompt: str = "Count from 1 to 50, one number per line.",
    api_key: str | None = None,
    max_tokens: int = 32,
    timeout: float = 60.0,
    completions: bool = False,
) -> ProbeResult:
    """Measure one streaming request to the OpenAI-compatible base ``url``."""
    target = _Target.parse(url)
    try:
        async with asyncio.timeout(timeout):
            chosen = model or await _first_model(target, api_key)
            stats = await _stream(target, chosen, prompt, api_key, max_tokens, completions)
    except TimeoutError:
        raise ProbeError(f"timed out after {timeout:g} s") from None
    if stats.count == 0:
        raise ProbeError("the stream carried no tokens")
    return ProbeResult(url, chosen, stats)


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value * 1000:.1f}"


def format_table(results: list[tuple[str, ProbeResult]]) -> str:
    """A side-by-side table of probe results, one column per endpoint."""
    rows = [("", [name for name, _ in results])]

    def add(label: str, cells: list[str]) -> None:
        rows.append((label, cells))

    stats = [result.stats for _, result in results]
    add("TTFT ms", [_ms(s.ttft) for s in stats])
    add("tokens", [str(s.count) for s in stats])
    for key in ("avg", "p50", "p99", "max"):
        add(f"gap {key} ms", [_ms((s.gap_summary() or {}).get(key)) for s in stats])
    add("within 1 ms", [str(s.coalesced) for s in stats])
    add("verdict", [s.verdict for s in stats])
    label_width = max(len(label) for label, _ in rows)
    widths = [max(len(cells[i]) for _, cells in rows) for i in range(len(results))]
    lines = []
    for label, cells in rows:
        padded = "  ".join(cell.rjust(width) for cell, width in zip(cells, widths, strict=True))
        lines.append(f"{label.ljust(label_width)}  {padded}")
    return "\n".join(lines)


def build_parser() -> OneLineParser:
    parser = OneLineParser(
        prog="relay probe",
        description="Measure TTFT and token gaps of an OpenAI-compatible streaming endpoint "
        "and say whether it streams or buffers.",
        epilog="Exit codes: 0 streaming, 1 BUFFERED, 2 bad flags, 3 error.",
    )
    parser.add_argument("url", help="base URL, e.g. http://127.0.0.1:30000 or .../v1")
    parser.add_argument("--model", help="model name (default: the first from /v1/models)")
    parser.add_argument("--prompt", default="Count from 1 to 50, one number per line.")
    parser.add_argument(
        "--api-key", help=f"bearer key (default: ${API_KEY_ENVS[0]} or ${API_KEY_ENVS[1]})"
    )
    parser.add_argument("--max-tokens", type=int, default=32, help="tokens to ask for (32)")
    parser.add_argument("--compare", metavar="URL2", help="probe a second endpoint side by side")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    parser.add_argument("--repeat", type=int, default=1, metavar="N", help="probe N times")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds per request (60)")
    parser.add_argument(
        "--completions", action="store_true", help="use /v1/completions instead of chat"
    )
    return parser


async def _run(args: Any, api_key: str | None) -> int:
    urls = [args.url] + ([args.compare] if args.compare else [])
    names = ["endpoint"] if len(urls) == 1 else ["first", "second"]
    if args.compare:
        names = [args.url, args.compare]
    buffered = False
    documents = []
    for attempt in range(args.repeat):
        results = []
        for name, url in zip(names, urls, strict=True):
            result = await probe(
                url,
                model=args.model,
                prompt=args.prompt,
                api_key=api_key,
                max_tokens=args.max_tokens,
                timeout=args.timeout,
                completions=args.completions,
            )
            buffered = buffered or result.stats.buffered
            results.append((name, result))
            documents.append(result.as_dict())
        if not args.json:
            if args.repeat > 1:
                print(f"run {attempt + 1}/{args.repeat}")
            print(format_table(results))
    if args.json:
        print(json.dumps(documents if len(documents) > 1 else documents[0], indent=2))
    elif buffered:
        print("BUFFERED: most tokens arrived together; something on the way holds the stream")
    return EXIT_BUFFERED if buffered else EXIT_STREAMING


def main(argv: Sequence[str]) -> int:
    parser = build_parser()
    args = parser.parse_args(list(argv))
    for flag, value in (("--max-tokens", args.max_tokens), ("--repeat", args.repeat)):
        if value < 1:
            parser.error(f"argument {flag}: must be at least 1")
    if not args.timeout > 0:
        parser.error("argument --timeout: must be positive")
    api_key = args.api_key or next((os.environ[e] for e in API_KEY_ENVS if os.environ.get(e)), None)
    try:
        return asyncio.run(_run(args, api_key))
    except ProbeError as exc:
        sys.stderr.write(f"relay probe: error: {exc}\n")
        return EXIT_ERROR
