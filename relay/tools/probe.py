"""``relay probe URL``: is this endpoint streaming, or buffering?

Sends one streaming chat completion (or completion) to an OpenAI-compatible
base URL and times every token as it arrives: TTFT, inter-token gaps, and
how many tokens arrived within 1 ms of the previous one. Most tokens arriving
together means something on the way buffers (the verdict ``BUFFERED``).

It asks the way real clients ask, so it sees what they see: the openai SDK and
httpx send ``Accept-Encoding: gzip, deflate``, and an intermediary that
compresses event streams (nginx ``gzip_types text/event-stream``) may hold
every token until the end for them while streaming to a client that asks for
no compression. A compressed body is decoded incrementally and each token is
timed when its decoded event becomes readable, as a client experiences it.

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

from .. import __version__
from ..cliparse import OneLineParser
from ..http.sse import (
    ContentDecoder,
    ContentDecodingError,
    SSEError,
    SSEParser,
    StreamStats,
    tokens_in_event,
)

__all__ = [
    "ProbeError",
    "ProbeResult",
    "client_tls_context",
    "format_table",
    "main",
    "probe",
    "request_headers",
]

EXIT_STREAMING, EXIT_BUFFERED, EXIT_USAGE, EXIT_ERROR = 0, 1, 2, 3
MAX_ERROR_BODY = 64 * 1024
API_KEY_ENVS = ("RELAY_PROBE_API_KEY", "OPENAI_API_KEY")
DEFAULT_PROMPT = "Count from 1 to 50, one number per line."
#: What the openai SDK (over httpx) and httpx itself send; aiohttp sends "gzip, deflate" too.
DEFAULT_ACCEPT_ENCODING = "gzip, deflate"
#: The SDK's style (``OpenAI/Python 1.x``, ``python-httpx/0.x``), naming the probe honestly.
USER_AGENT = f"relay-probe/{__version__}"


class ProbeError(Exception):
    """The probe could not measure a stream; the message is one line for a person."""


@dataclass
class ProbeResult:
    url: str
    model: str
    stats: StreamStats
    content_encoding: str = "identity"

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
            "content_encoding": self.content_encoding,
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


def client_tls_context(cacert: str | None = None, insecure: bool = False) -> ssl.SSLContext:
    """The context for https URLs: the system store, or only ``cacert``; ``insecure``
    skips verification. Raises ``OSError`` or ``ssl.SSLError`` if ``cacert`` is unusable."""
    context = ssl.create_default_context(cafile=cacert)
    context.set_alpn_protocols(["http/1.1"])
    if insecure:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


#: How long the plain-HTTP question after a failed TLS handshake may take.
PLAIN_HTTP_CHECK_TIMEOUT = 3.0


async def _speaks_plain_http(target: _Target) -> bool:
    """Whether the port answers a plain HTTP request with an HTTP status line."""
    writer: asyncio.StreamWriter | None = None
    try:
        async with asyncio.timeout(PLAIN_HTTP_CHECK_TIMEOUT):
            reader, writer = await asyncio.open_connection(target.host, target.port)
            host = target.authority.encode("ascii", "replace")
            writer.write(b"HEAD / HTTP/1.1\r\nHost: " + host + b"\r\nConnection: close\r\n\r\n")
            return (await reader.read(16)).startswith(b"HTTP/1.")
    except (OSError, TimeoutError):
        return False
    finally:
        if writer is not None:
            writer.close()


async def _open(
    target: _Target, tls: ssl.SSLContext | None
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    context = (tls or client_tls_context()) if target.scheme == "https" else None
    try:
        reader, writer = await asyncio.open_connection(
            target.host, target.port, ssl=context, server_hostname=target.host if context else None
        )
    except ssl.SSLCertVerificationError as exc:
        reason = f"certificate verify failed: {exc.verify_message}"
        hint = "--cacert FILE trusts a private CA; --insecure skips the check"
        raise ProbeError(f"TLS error with {target.authority}: {reason} ({hint})") from None
    except (ssl.SSLError, ConnectionResetError) as exc:
        # A ClientHello sent to a plain-HTTP port fails in ways that name TLS's
        # records (WRONG_VERSION_NUMBER, a reset, an EOF); asking the port in
        # plain HTTP says what is actually wrong.
        if context is not None and await _speaks_plain_http(target):
            raise ProbeError(
                f"{target.authority} speaks plain HTTP, not TLS: use http://{target.authority}"
            ) from None
        reason = (exc.reason if isinstance(exc, ssl.SSLError) else None) or exc.strerror or exc
        raise ProbeError(f"TLS error with {target.authority}: {reason}") from None
    except OSError as exc:
        reason = exc.strerror or str(exc) or type(exc).__name__
        raise ProbeError(f"cannot connect to {target.authority}: {reason}") from None
    sock = writer.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return reader, writer


def request_headers(
    authority: str, api_key: str | None, body: bytes | None, accept_encoding: str
) -> list[tuple[str, str]]:
    """The request head the openai SDK sends (names, values and order; without its
    ``x-stainless-*`` telemetry, which describes the SDK build): ``Accept: application/json``
    even for streams, ``Accept-Encoding`` unless ``accept_encoding`` is empty."""
    headers = [("host", authority)]
    if accept_encoding:
        headers.append(("accept-encoding", accept_encoding))
    if api_key:
        headers.append(("authorization", f"Bearer {api_key}"))
    headers.append(("accept", "application/json"))
    if body is not None:
        headers.append(("content-type", "application/json"))
    headers.append(("user-agent", USER_AGENT))
    if body is not None:
        headers.append(("content-length", str(len(body))))
    return headers


def _decoder_for(response: h11.Response) -> ContentDecoder:
    codings = b", ".join(v for k, v in response.headers if k.lower() == b"content-encoding")
    try:
        return ContentDecoder(codings.decode("latin-1"))
    except ContentDecodingError as exc:
        raise ProbeError(str(exc)) from None


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


async def _read_body(
    conn: h11.Connection, reader: asyncio.StreamReader, decoder: ContentDecoder
) -> bytes:
    """The decoded body, or its first ``MAX_ERROR_BODY`` bytes (a compressed body may be
    cut, or corrupt: what was decoded so far is enough for an error message)."""
    body = b""
    try:
        while len(body) < MAX_ERROR_BODY:
            event = await _next(conn, reader)
            if not isinstance(event, h11.Data):
                break
            for piece in decoder.feed(event.data):
                body += piece
                if len(body) >= MAX_ERROR_BODY:
                    break
    except ContentDecodingError:
        pass
    return body[:MAX_ERROR_BODY]


async def _first_model(
    target: _Target, api_key: str | None, accept_encoding: str, tls: ssl.SSLContext | None
) -> str:
    reader, writer = await _open(target, tls)
    try:
        conn = h11.Connection(h11.CLIENT)
        headers = request_headers(target.authority, api_key, None, accept_encoding)
        request = h11.Request(method="GET", target=f"{target.base}/models", headers=headers)
        writer.write(conn.send(request) + (conn.send(h11.EndOfMessage()) or b""))
        response = await _next(conn, reader)
        if isinstance(response, h11.Response) and response.status_code == 200:
            body = await _read_body(conn, reader, _decoder_for(response))
            document = json.loads(body)
            return str(document["data"][0]["id"])
    except (ValueError, KeyError, IndexError, TypeError, h11.ProtocolError, ProbeError):
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
    accept_encoding: str,
    tls: ssl.SSLContext | None,
) -> tuple[StreamStats, str]:
    document: dict[str, Any] = {"model": model, "stream": True, "max_tokens": max_tokens}
    if completions:
        document["prompt"] = prompt
        path = f"{target.base}/completions"
    else:
        document["messages"] = [{"role": "user", "content": prompt}]
        path = f"{target.base}/chat/completions"
    body = json.dumps(document).encode()
    reader, writer = await _open(target, tls)
    try:
        conn = h11.Connection(h11.CLIENT)
        headers = request_headers(target.authority, api_key, body, accept_encoding)
        request = h11.Request(method="POST", target=path, headers=headers)
        stats = StreamStats(started=time.monotonic())
        writer.write(
            conn.send(request)
            + (conn.send(h11.Data(data=body)) or b"")
            + (conn.send(h11.EndOfMessage()) or b"")
        )
        response = await _next(conn, reader)
        if not isinstance(response, h11.Response):
            raise ProbeError("connection closed before a response")
        decoder = _decoder_for(response)
        if response.status_code != 200:
            body = await _read_body(conn, reader, decoder)
            raise ProbeError(_error_message(response.status_code, body))
        content_type = next(
            (v for k, v in response.headers if k.lower() == b"content-type"), b""
        ).decode("latin-1")
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
                # A token counts from the read that made its event readable after
                # decoding: compressed bytes that decode to nothing yet are not tokens
                # to a client, however early they came.
                for piece in decoder.feed(event.data):
                    for data_text in parser.feed(piece):
                        info = tokens_in_event(data_text)
                        if info.error:
                            raise ProbeError(f"error in stream: {info.error}")
                        if info.tokens:
                            stats.token(arrived, info.tokens)
            elif isinstance(event, h11.EndOfMessage):
                decoder.finish()
                return stats, decoder.name
            else:
                raise ProbeError("stream ended unexpectedly")
    except h11.RemoteProtocolError as exc:
        raise ProbeError(f"stream cut or malformed: {exc}") from None
    except SSEError as exc:
        raise ProbeError(f"malformed event stream: {exc}") from None
    except ContentDecodingError as exc:
        raise ProbeError(f"cannot decode the stream: {exc}") from None
    finally:
        writer.close()


async def probe(
    url: str,
    *,
    model: str | None = None,
    prompt: str = DEFAULT_PROMPT,
    api_key: str | None = None,
    max_tokens: int = 32,
    timeout: float = 60.0,
    completions: bool = False,
    accept_encoding: str = DEFAULT_ACCEPT_ENCODING,
    tls: ssl.SSLContext | None = None,
) -> ProbeResult:
    """Measure one streaming request to the OpenAI-compatible base ``url``.

    ``accept_encoding`` is sent as is (``""`` sends no header); ``tls`` verifies
    https URLs (default: :func:`client_tls_context`, the system store)."""
    target = _Target.parse(url)
    try:
        async with asyncio.timeout(timeout):
            chosen = model or await _first_model(target, api_key, accept_encoding, tls)
            stats, coding = await _stream(
                target, chosen, prompt, api_key, max_tokens, completions, accept_encoding, tls
            )
    except TimeoutError:
        raise ProbeError(f"timed out after {timeout:g} s") from None
    if stats.count == 0:
        raise ProbeError("the stream carried no tokens")
    return ProbeResult(url, chosen, stats, coding)


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
    add("encoding", [result.content_encoding for _, result in results])
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
        "and say whether it streams or buffers, asking the way the openai SDK asks.",
        epilog="Exit codes: 0 streaming, 1 BUFFERED, 2 bad flags, 3 error.",
    )
    parser.add_argument("url", help="base URL, e.g. http://127.0.0.1:30000 or .../v1")
    parser.add_argument("--model", help="model name (default: the first from /v1/models)")
    parser.add_argument(
        "--prompt",
        default=DEFAULT_PROMPT,
        help="the user message (with --completions, the prompt) (default: %(default)r)",
    )
    parser.add_argument(
        "--api-key",
        help=f"bearer key (default: ${API_KEY_ENVS[0]}, else ${API_KEY_ENVS[1]}, else none)",
    )
    parser.add_argument(
        "--max-tokens", type=int, default=32, help="tokens to ask for (default: %(default)s)"
    )
    parser.add_argument(
        "--completions",
        action="store_true",
        help="use /v1/completions (default: /v1/chat/completions)",
    )
    parser.add_argument(
        "--accept-encoding",
        metavar="VALUE",
        default=DEFAULT_ACCEPT_ENCODING,
        help="Accept-Encoding to send, as the openai SDK and httpx do (default: %(default)r); "
        "'identity' asks for no compression, '' sends no header",
    )
    parser.add_argument(
        "--cacert",
        metavar="FILE",
        help="verify https against the CA certificates in this PEM file "
        "(default: the system store)",
    )
    parser.add_argument(
        "--insecure",
        action="store_true",
        help="DANGEROUS: do not verify the https certificate (default: verify)",
    )
    parser.add_argument(
        "--compare", metavar="URL2", help="probe a second endpoint side by side (default: none)"
    )
    parser.add_argument(
        "--json", action="store_true", help="machine-readable output (default: a table)"
    )
    parser.add_argument(
        "--repeat",
        type=int,
        default=1,
        metavar="N",
        help="probe N times; BUFFERED if any run is (default: %(default)s)",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=60.0,
        metavar="SECONDS",
        help="limit for each probe, /v1/models included (default: %(default)g)",
    )
    return parser


def _print(text: str) -> None:
    """Print and flush; a reader that went away (``| head``) is not an error.

    As the Python docs on SIGPIPE advise: on ``BrokenPipeError`` point stdout at
    devnull, so nothing more (not even the flush at exit) can fail, and go on:
    the exit code still tells the verdict.
    """
    try:
        print(text, flush=True)
    except BrokenPipeError:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)


async def _run(args: Any, api_key: str | None, tls: ssl.SSLContext | None) -> int:
    urls = [args.url] + ([args.compare] if args.compare else [])
    names = ["endpoint"] if len(urls) == 1 else ["first", "second"]
    if args.compare:
        names = [args.url, args.compare]
    buffered = False
    compressed = False
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
                accept_encoding=args.accept_encoding,
                tls=tls,
            )
            buffered = buffered or result.stats.buffered
            compressed = compressed or (
                result.stats.buffered and result.content_encoding != "identity"
            )
            results.append((name, result))
            documents.append(result.as_dict())
        if not args.json:
            if args.repeat > 1:
                _print(f"run {attempt + 1}/{args.repeat}")
            _print(format_table(results))
    if args.json:
        _print(json.dumps(documents if len(documents) > 1 else documents[0], indent=2))
    elif buffered:
        _print("BUFFERED: most tokens arrived together; something on the way holds the stream")
        if compressed:
            _print(
                "the buffered stream came compressed: something on the way compresses event "
                "streams (nginx: gzip_types text/event-stream); compare --accept-encoding identity"
            )
    return EXIT_BUFFERED if buffered else EXIT_STREAMING


def main(argv: Sequence[str]) -> int:
    parser = build_parser()
    args = parser.parse_args(list(argv))
    for flag, value in (("--max-tokens", args.max_tokens), ("--repeat", args.repeat)):
        if value < 1:
            parser.error(f"argument {flag}: must be at least 1")
    if not args.timeout > 0:
        parser.error("argument --timeout: must be positive")
    try:
        h11.Request(
            method="GET", target="/", headers=request_headers("x", None, None, args.accept_encoding)
        )
    except h11.LocalProtocolError:
        parser.error("argument --accept-encoding: not a valid header value")
    try:
        tls = client_tls_context(args.cacert, args.insecure)
    except OSError as exc:  # ssl.SSLError is one too
        reason = (exc.reason if isinstance(exc, ssl.SSLError) else exc.strerror) or str(exc)
        parser.error(f"argument --cacert: cannot load {args.cacert}: {reason}")
    api_key = args.api_key or next((os.environ[e] for e in API_KEY_ENVS if os.environ.get(e)), None)
    try:
        return asyncio.run(_run(args, api_key, tls))
    except ProbeError as exc:
        sys.stderr.write(f"relay probe: error: {exc}\n")
        return EXIT_ERROR
