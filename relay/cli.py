"""Command line: argv (and later the environment) to :class:`Config`, and subcommands.

``relay [serve] --listen :4000 --upstream sglang:30000`` runs the relay;
``relay probe URL`` measures a streaming endpoint; ``relay demo`` shows both
with a built-in upstream. Bad flags print one line naming the flag and exit 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import socket
import sys
from collections.abc import Mapping, Sequence
from typing import Any

from . import __version__
from .accesslog import setup_logging
from .auth import parse_key_file, parse_key_list
from .cliparse import EXIT_USAGE, OneLineParser
from .config import (
    BALANCE_POLICIES,
    PARSERS,
    Config,
    ConfigError,
    ListenAddress,
    UpstreamAddress,
    parse_duration,
    parse_listen,
    parse_route,
    parse_upstream,
)
from .rewrite import ModelMap, ModelMapError, load_model_map_file, parse_model_map_item
from .tls import TLSError

__all__ = ["build_parser", "config_from_args", "main"]

SUBCOMMANDS = ("serve", "probe", "demo")
KEYS_ENV = "RELAY_API_KEYS"
UPSTREAM_KEY_ENV = "RELAY_UPSTREAM_API_KEY"

_EPILOG = """\
subcommands:
  relay probe URL     measure TTFT and token gaps of a streaming endpoint; catch buffering
  relay demo          run a built-in SGLang-like upstream with relay in front, and probe both

Sizes take k/m/g suffixes (64k, 1m); durations take ms/s/m/h (500ms, 30s, 10m).
"""


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="relay",
        description="Relay HTTP/1.1 token streams to an LLM inference server without buffering.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"relay {__version__}")
    parser.add_argument(
        "--listen",
        metavar="ADDR",
        default=None,
        help="where to accept clients: :PORT (all interfaces), HOST:PORT or [V6]:PORT "
        f"(default {Config.default('listen')})",
    )
    parser.add_argument(
        "--upstream",
        metavar="ADDR",
        action="append",
        default=[],
        help="the inference server: HOST:PORT, http://HOST:PORT or https://HOST:PORT "
        "(required; repeat for several)",
    )
    fleet = parser.add_argument_group("several upstreams")
    fleet.add_argument(
        "--balance",
        choices=BALANCE_POLICIES,
        default=Config.default("balance"),
        help="how requests are spread: least-requests (default: fewest streams in flight), "
        "round-robin, random-two (power of two choices)",
    )
    fleet.add_argument(
        "--route",
        metavar="MODEL=UPSTREAM[,UPSTREAM...]",
        action="append",
        default=[],
        help="requests whose JSON body names MODEL (after aliasing) go only to these upstreams "
        "(repeatable)",
    )
    fleet.add_argument(
        "--strict-models",
        action="store_true",
        help="answer 404 for models no --route names, instead of using the --upstream set",
    )
    fleet.add_argument(
        "--health-check",
        metavar="PATH",
        help="actively GET PATH on each upstream (SGLang: /health) to eject and readmit it",
    )
    fleet.add_argument(
        "--health-interval",
        metavar="DURATION",
        default=None,
        help=f"seconds between health checks (default {Config.default('health_interval'):g}s)",
    )
    models = parser.add_argument_group("model aliasing")
    models.add_argument(
        "--model-map",
        metavar="ALIAS=TARGET",
        action="append",
        default=[],
        help="requests naming ALIAS reach the upstream naming TARGET (repeatable)",
    )
    models.add_argument(
        "--model-map-file",
        metavar="PATH",
        help='the same from a JSON file: {"alias": "target", ...}',
    )
    models.add_argument(
        "--model",
        metavar="TARGET",
        help="every JSON request body with a model gets TARGET (after --model-map)",
    )
    tls = parser.add_argument_group("TLS and API keys")
    tls.add_argument("--tls-cert", metavar="PATH", help="serve TLS with this PEM certificate chain")
    tls.add_argument("--tls-key", metavar="PATH", help="its private key (if not in --tls-cert)")
    tls.add_argument(
        "--tls-client-ca", metavar="PATH", help="require client certificates signed by this CA"
    )
    tls.add_argument(
        "--upstream-ca", metavar="PATH", help="verify an https upstream against this CA"
    )
    tls.add_argument("--upstream-cert", metavar="PATH", help="client certificate for the upstream")
    tls.add_argument("--upstream-key", metavar="PATH", help="its private key")
    tls.add_argument(
        "--upstream-insecure-skip-verify",
        action="store_true",
        help="DANGEROUS: do not verify the https upstream's certificate",
    )
    tls.add_argument(
        "--api-key-file",
        metavar="PATH",
        help="keys clients must present (Authorization: Bearer or x-api-key), one per line; "
        f"also ${KEYS_ENV}; reloaded on SIGHUP",
    )
    tls.add_argument(
        "--upstream-api-key-file",
        metavar="PATH",
        help=f"key relay sends to the upstream instead of the client's; also ${UPSTREAM_KEY_ENV}",
    )
    limits = parser.add_argument_group("limits and timeouts")
    for spec in dataclasses.fields(Config):
        meta = spec.metadata
        if "flag" not in meta:
            continue
        limits.add_argument(
            meta["flag"],
            dest=spec.name,
            metavar=meta["kind"].upper(),
            default=None,
            help=f"{meta['help']} (default {_show_default(spec.default, meta['kind'])})",
        )
    ops = parser.add_argument_group("operations")
    ops.add_argument(
        "--admin-listen",
        metavar="ADDR",
        help="serve /metrics, /health and /ready here (off by default; never the proxy port)",
    )
    ops.add_argument(
        "--workers",
        type=int,
        default=Config.default("workers"),
        metavar="N",
        help="processes accepting on the same port (default 1)",
    )
    ops.add_argument(
        "--log-format",
        choices=("text", "json"),
        default=Config.default("log_format"),
        help="log lines as text or JSON (default text); logs go to stderr",
    )
    ops.add_argument(
        "--print-config",
        action="store_true",
        help="print the effective configuration (secrets masked) and exit",
    )
    parser.add_argument(
        "--loop",
        choices=("auto", "uvloop", "asyncio"),
        default=Config.default("loop"),
        help="event loop (default auto: uvloop when installed)",
    )
    parser.add_argument(
        "--log-level",
        choices=("debug", "info", "warning", "error"),
        default=Config.default("log_level"),
        help="log verbosity (default info)",
    )
    return parser


def _show_default(value: object, kind: str) -> str:
    if kind == "duration":
        return f"{value:g}s"
    if kind == "size" and isinstance(value, int) and value % 1024 == 0:
        return f"{value // 1024}k" if value < 1024 * 1024 else f"{value // (1024 * 1024)}m"
    return str(value)


def config_from_args(args: argparse.Namespace) -> Config:
    """Build the :class:`Config`; raises :class:`ConfigError` naming the flag."""
    if not args.upstream:
        raise ConfigError("--upstream", "is required (HOST:PORT of the inference server)")
    upstreams = [parse_upstream(text) for text in args.upstream]
    values: dict[str, Any] = {
        "listen": parse_listen(args.listen) if args.listen else Config.default("listen"),
        "upstream": upstreams[0],
        "more_upstreams": tuple(u for u in dict.fromkeys(upstreams[1:]) if u != upstreams[0]),
        "balance": args.balance,
        "routes": tuple(parse_route(text) for text in args.route),
        "strict_models": args.strict_models,
        "health_check": args.health_check,
        "loop": args.loop,
        "log_level": args.log_level,
        "log_format": args.log_format,
        "workers": args.workers,
        "admin_listen": parse_listen(args.admin_listen, "--admin-listen")
        if args.admin_listen
        else None,
    }
    values["model_map"] = _model_map(args)
    for name in (
        "tls_cert",
        "tls_key",
        "tls_client_ca",
        "upstream_ca",
        "upstream_cert",
        "upstream_key",
        "api_key_file",
    ):
        values[name] = getattr(args, name)
    if args.health_interval is not None:
        values["health_interval"] = parse_duration(args.health_interval, "--health-interval")
    values["upstream_tls_verify"] = not args.upstream_insecure_skip_verify
    values["api_keys"] = tuple(parse_key_list(os.environ.get(KEYS_ENV, "")))
    values["upstream_api_key"] = _upstream_key(args)
    for spec in dataclasses.fields(Config):
        meta = spec.metadata
        text = getattr(args, spec.name, None) if "flag" in meta else None
        if text is not None:
            values[spec.name] = PARSERS[meta["kind"]](text, meta["flag"])
    return Config(**values)


def _upstream_key(args: argparse.Namespace) -> str | None:
    if args.upstream_api_key_file:
        try:
            with open(args.upstream_api_key_file, encoding="utf-8") as file:
                keys = parse_key_file(file.read())
        except OSError as exc:
            raise ConfigError("--upstream-api-key-file", f"cannot read: {exc.strerror}") from None
        if len(keys) != 1:
            raise ConfigError("--upstream-api-key-file", "must hold exactly one key")
        return keys[0]
    return os.environ.get(UPSTREAM_KEY_ENV) or None


def _model_map(args: argparse.Namespace) -> ModelMap:
    aliases: dict[str, str] = {}
    if args.model_map_file:
        try:
            with open(args.model_map_file, encoding="utf-8") as file:
                aliases.update(load_model_map_file(file.read()))
        except OSError as exc:
            raise ConfigError("--model-map-file", f"cannot read: {exc.strerror}") from None
        except ModelMapError as exc:
            raise ConfigError("--model-map-file", f"{args.model_map_file}: {exc}") from None
    for item in args.model_map:
        try:
            alias, target = parse_model_map_item(item)
        except ModelMapError as exc:
            raise ConfigError("--model-map", str(exc)) from None
        aliases[alias] = target
    default = args.model.strip() if args.model is not None else None
    if args.model is not None and not default:
        raise ConfigError("--model", "must not be empty")
    return ModelMap(aliases, default)


def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    if args_list and args_list[0] in SUBCOMMANDS:
        command, args_list = args_list[0], args_list[1:]
    else:
        command = "serve"
    if command == "probe":
        from . import probe

        return probe.main(args_list)
    if command == "demo":
        from . import demo

        return demo.main(args_list)

    parser = build_parser()
    apply_environment(parser, os.environ)
    args = parser.parse_args(args_list)
    try:
        config = config_from_args(args)
    except ConfigError as exc:
        sys.stderr.write(f"relay: error: argument {exc.flag}: {exc.message}\n")
        return EXIT_USAGE
    if args.print_config:
        print(describe_config(config))
        return 0
    setup_logging(config.log_level, config.log_format)
    from .server import preflight, run, serve

    try:
        preflight(config)
    except (ConfigError, TLSError) as exc:
        sys.stderr.write(f"relay: error: argument {exc.flag}: {exc.message}\n")
        return EXIT_USAGE
    if config.workers == 1:
        try:
            return run(serve(config), config.loop)
        except KeyboardInterrupt:
            return 130
    return _serve_workers(config, args_list)


def _serve_workers(config: Config, argv: Sequence[str]) -> int:
    """The parent of ``--workers N`` (binds, then supervises), or one of its workers."""
    from .systemd import listen_sockets
    from .workers import run_worker, run_workers, worker_spec

    setup_logging(config.log_level, config.log_format, pid=True)
    spec = worker_spec()
    if spec is not None:
        return run_worker(config, spec)
    sockets = listen_sockets()
    if not sockets:
        host = config.listen.host
        try:
            sock = socket.create_server(
                (host or "", config.listen.port),
                family=socket.AF_INET6 if host and ":" in host else socket.AF_INET,
                backlog=2048,
            )
        except OSError as exc:
            sys.stderr.write(f"relay: error: argument --listen: {exc.strerror or exc}\n")
            return 1
        sockets = [sock]
    try:
        return run_workers(config, argv, sockets)
    except KeyboardInterrupt:
        return 130


def apply_environment(parser: argparse.ArgumentParser, environ: Mapping[str, str]) -> None:
    """Every ``--flag`` may come from ``RELAY_FLAG`` (flags on the command line win)."""
    for action in parser._actions:  # argparse has no public list of its actions
        longs = [o for o in action.option_strings if o.startswith("--")]
        if not longs or action.dest in ("help", "version"):
            continue
        name = "RELAY_" + longs[0][2:].upper().replace("-", "_")
        value = environ.get(name)
        if value is None:
            continue
        if action.nargs == 0:  # store_true flags
            parser.set_defaults(**{action.dest: value.strip().lower() in ("1", "true", "yes")})
        elif action.default == []:  # repeatable flags: comma-separated
            parser.set_defaults(**{action.dest: [v for v in value.split(",") if v.strip()]})
        else:
            parser.set_defaults(**{action.dest: value})
        action.required = False


def describe_config(config: Config) -> str:
    """The effective configuration, one ``name = value`` a line, secrets masked."""
    lines = []
    for spec in dataclasses.fields(config):
        value: Any = getattr(config, spec.name)
        if spec.name == "api_keys":
            value = f"<{len(value)} keys>" if value else "none"
        elif spec.name == "upstream_api_key":
            value = "<set>" if value else "none"
        elif spec.name == "model_map":
            value = dict(value.aliases) | ({"*": value.default} if value.default else {})
        elif isinstance(value, (ListenAddress, UpstreamAddress)):
            value = str(value)
        elif spec.name == "more_upstreams":
            value = ", ".join(map(str, value)) or "none"
        elif spec.name == "routes":
            value = "; ".join(f"{m}={','.join(map(str, t))}" for m, t in value) or "none"
        elif spec.name == "more_upstreams":
            value = ", ".join(map(str, value)) or "none"
        elif spec.name == "routes":
            value = "; ".join(f"{m}={','.join(map(str, t))}" for m, t in value) or "none"
        lines.append(f"{spec.name} = {value}")
    return "\n".join(lines)
