"""``relay demo``: a built-in SGLang-like upstream, relay in front, the probe on both.

For a newcomer with no inference server at hand. The upstream is the same
token streamer the benchmarks use (:mod:`relay.tools.streamer`), paced like the bug
report that started relay (about 250 ms to the first token, then one every
24 ms). ``--serve`` keeps both running so curl or an OpenAI client can be
pointed at relay.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
from collections.abc import Sequence

from ..cliparse import OneLineParser
from ..config import Config, ConfigError, parse_duration, parse_listen, parse_upstream
from ..core.accesslog import setup_logging
from ..core.server import RelayServer, run
from .probe import format_table, probe
from .streamer import StreamerSettings, start_streamer

__all__ = ["main"]


def build_parser() -> OneLineParser:
    parser = OneLineParser(
        prog="relay demo",
        description="Start a built-in SGLang-like upstream and relay in front of it, "
        "then probe both and print the comparison.",
    )
    parser.add_argument("--tokens", type=int, default=32, help="tokens per stream (default 32)")
    parser.add_argument("--ttft", default="250ms", help="upstream time to first token (250ms)")
    parser.add_argument("--gap", default="24ms", help="upstream gap between tokens (24ms)")
    parser.add_argument(
        "--serve",
        action="store_true",
        help="keep the upstream and relay running and print their URLs",
    )
    parser.add_argument(
        "--listen",
        default="127.0.0.1:0",
        help="where relay listens in --serve mode (default a free loopback port)",
    )
    return parser


async def _demo(args_tokens: int, ttft: float, gap: float, listen: str, serve: bool) -> int:
    settings = StreamerSettings(tokens=args_tokens, ttft=ttft, gap=gap)
    streamer = await start_streamer("127.0.0.1", 0, settings)
    try:
        config = Config(
            listen=parse_listen(listen),
            upstream=parse_upstream(f"127.0.0.1:{streamer.port}"),
        )
        relay = await RelayServer.start(config)
        try:
            if serve:
                return await _serve(streamer.url, relay.url())
            direct = await probe(streamer.url, model=None, max_tokens=args_tokens, timeout=30.0)
            relayed = await probe(relay.url(), model=None, max_tokens=args_tokens, timeout=30.0)
            print(f"upstream (built-in SGLang-like streamer): {streamer.url}")
            print(f"relay:                                    {relay.url()}")
            print()
            print(format_table([("direct", direct), ("through relay", relayed)]))
            return 0
        finally:
            await relay.close()
    finally:
        await streamer.close()


async def _serve(upstream_url: str, relay_url: str) -> int:
    print(f"upstream: {upstream_url}")
    print(f"relay:    {relay_url}   (OpenAI base URL {relay_url}/v1)")
    print(
        f"try:      curl -N {relay_url}/v1/chat/completions -H 'content-type: application/json' "
        """-d '{"model":"demo-model","stream":true,"messages":[{"role":"user","content":"hi"}]}'"""
    )
    print("Ctrl-C stops.", flush=True)
    loop = asyncio.get_running_loop()
    stop = loop.create_future()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, lambda: stop.done() or stop.set_result(None))
    try:
        await stop
    finally:
        for signum in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(Exception):
                loop.remove_signal_handler(signum)
    return 0


def main(argv: Sequence[str]) -> int:
    parser = build_parser()
    args = parser.parse_args(list(argv))
    try:
        ttft = parse_duration(args.ttft, "--ttft")
        gap = parse_duration(args.gap, "--gap")
        parse_listen(args.listen)
    except ConfigError as exc:
        sys.stderr.write(f"relay demo: error: argument {exc.flag}: {exc.message}\n")
        return 2
    if args.tokens < 1:
        sys.stderr.write("relay demo: error: argument --tokens: must be at least 1\n")
        return 2
    setup_logging("warning")
    return run(_demo(args.tokens, ttft, gap, args.listen, args.serve))
