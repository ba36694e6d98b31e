"""Command line: argv (and later the environment) to :class:`Config`, and subcommands.

``relay [serve] --listen :4000 --upstream sglang:30000`` runs the relay;
``relay probe URL`` measures a streaming endpoint; ``relay demo`` shows both
with a built-in upstream. Bad flags print one line naming the flag and exit 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import ipaddress
import logging
import os
import shlex
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, NamedTuple

from . import __version__
from .cliparse import EXIT_USAGE, OneLineParser
from .config import (
    BALANCE_POLICIES,
    LIMITS_STORE_FAILURE,
    LIMITS_STORE_PASSWORD_ENV,
    PARSERS,
    Config,
    ConfigError,
    UpstreamAddress,
    parse_count,
    parse_duration,
    parse_limits_store,
    parse_listen,
    parse_route,
    parse_upstream,
)
from .core.accesslog import setup_logging
from .core.server import BACKLOG
from .core.tls import TLSError
from .http.auth import KeyFileError, KeyListError, parse_key_file, parse_key_list
from .http.rewrite import ModelMap, ModelMapError, load_model_map_file, parse_model_map_item

__all__ = ["build_parser", "config_from_args", "main"]

SUBCOMMANDS = ("serve", "probe", "demo")
KEYS_ENV = "RELAY_API_KEYS"
UPSTREAM_KEY_ENV = "RELAY_UPSTREAM_API_KEY"
STORE_PASSWORD_ENV = LIMITS_STORE_PASSWORD_ENV
#: RELAY_* variables that are not flags: keys, the store's password, the probe's key.
OTHER_ENVS = (KEYS_ENV, UPSTREAM_KEY_ENV, STORE_PASSWORD_ENV, "RELAY_PROBE_API_KEY")
#: How long start-up waits for upstream host names to resolve before going on.
RESOLVE_TIMEOUT = 2.0

log = logging.getLogger("relay.events")

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
        help="keys clients must present (Authorization: Bearer or x-api-key): KEY or "
        "NAME KEY [concurrent=N] [rpm=N] [tpm=N] lines, or a JSON object "
        f'{{"NAME": "KEY"}}; also ${KEYS_ENV}; reloaded on SIGHUP',
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
    shared = parser.add_argument_group("limits shared across processes and replicas")
    shared.add_argument(
        "--limits-store",
        metavar="URL",
        help="redis://HOST:PORT/DB (rediss:// for TLS): enforce the key limits and "
        "--max-inflight across every relay pointed at this Redis or Valkey "
        "(needs pip install 'relay[redis]'; off by default: limits are per process)",
    )
    shared.add_argument(
        "--limits-store-password-file",
        metavar="PATH",
        help=f"file holding the store's password; also ${STORE_PASSWORD_ENV} "
        "(never a flag: ps would show it)",
    )
    shared.add_argument(
        "--limits-store-failure",
        choices=LIMITS_STORE_FAILURE,
        default=Config.default("limits_store_failure"),
        help="while the store is unreachable or slow: open (default) falls back to this "
        "process's own limits; closed answers 503 with Retry-After",
    )
    ops = parser.add_argument_group("operations")
    ops.add_argument(
        "--admin-listen",
        metavar="ADDR",
        help="serve /metrics, /health and /ready here (off by default; never the proxy port)",
    )
    ops.add_argument(
        "--workers",
        default=None,
        metavar="N",
        help=f"processes accepting on the same port (default {Config.default('workers')})",
    )
    ops.add_argument(
        "--log-format",
        choices=("text", "json"),
        default=Config.default("log_format"),
        help="log lines as text or JSON (default text); logs go to stderr",
    )
    ops.add_argument(
        "--check",
        action="store_true",
        help="check the configuration as start-up does (key, TLS and model map files, "
        "limits), bind nothing, and exit: 0 with one OK line, else 2 with the error",
    )
    ops.add_argument(
        "--print-config",
        action="store_true",
        help="check the configuration as --check does, print it (secrets masked) and exit",
    )
    # Stream fidelity: the metrics are always on; these add to them.
    fidelity = parser.add_argument_group("stream fidelity")
    fidelity.add_argument(
        "--body-digest",
        action="store_true",
        help="put the SHA-256 of each response body relay forwarded in the access line "
        "(body_sha256)",
    )
    fidelity.add_argument(
        "--sse-keepalive",
        metavar="DURATION",
        help="send an SSE comment (: keep-alive) after an event stream's upstream has been "
        "silent this long, at an event boundary (off by default; relay adds bytes)",
    )
    fidelity.add_argument(
        "--test-stream",
        metavar="PATH",
        help="serve relay's own paced SSE stream under PATH on the listener, for "
        "relay probe https://host/PATH (off by default; behind the API keys)",
    )
    tracing = parser.add_argument_group("tracing")
    tracing.add_argument(
        "--otel",
        action="store_true",
        help="OpenTelemetry traces: a span per exchange, joined to the client's traceparent, "
        "exported over OTLP/HTTP as the OTEL_* variables say (needs pip install 'relay[otel]')",
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
        "workers": parse_count(args.workers, "--workers")
        if args.workers is not None
        else Config.default("workers"),
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
    try:
        values["api_keys"] = tuple(parse_key_list(os.environ.get(KEYS_ENV, "")))
    except (KeyListError, KeyFileError) as exc:
        raise ConfigError(KEYS_ENV, str(exc)) from None
    values["upstream_api_key"] = _upstream_key(args)
    # Stream fidelity.
    values["body_digest"] = args.body_digest
    if args.sse_keepalive is not None:
        values["sse_keepalive"] = parse_duration(args.sse_keepalive, "--sse-keepalive")
    values["test_stream"] = args.test_stream
    values["otel"] = args.otel
    values.update(_limits_store(args))
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
            reason = f"cannot read {args.upstream_api_key_file}: {exc.strerror}"
            raise ConfigError("--upstream-api-key-file", reason) from None
        if len(keys) != 1:
            raise ConfigError("--upstream-api-key-file", "must hold exactly one key")
        return keys[0]
    return os.environ.get(UPSTREAM_KEY_ENV) or None


def _limits_store(args: argparse.Namespace) -> dict[str, Any]:
    values: dict[str, Any] = {"limits_store_failure": args.limits_store_failure}
    if args.limits_store is None:
        if args.limits_store_password_file:
            raise ConfigError("--limits-store-password-file", "needs --limits-store")
        return values
    values["limits_store"] = parse_limits_store(args.limits_store)
    password = os.environ.get(STORE_PASSWORD_ENV) or None
    path = args.limits_store_password_file
    if path:
        try:
            with open(path, encoding="utf-8") as file:
                password = file.read().strip("\r\n")
        except OSError as exc:
            reason = f"cannot read {path}: {exc.strerror}"
            raise ConfigError("--limits-store-password-file", reason) from None
        except UnicodeDecodeError:
            raise ConfigError("--limits-store-password-file", f"{path}: not UTF-8") from None
        if not password:
            raise ConfigError("--limits-store-password-file", f"{path} is empty")
    values["limits_store_password"] = password
    return values


def _model_map(args: argparse.Namespace) -> ModelMap:
    aliases: dict[str, str] = {}
    if args.model_map_file:
        try:
            with open(args.model_map_file, encoding="utf-8") as file:
                aliases.update(load_model_map_file(file.read()))
        except OSError as exc:
            reason = f"cannot read {args.model_map_file}: {exc.strerror}"
            raise ConfigError("--model-map-file", reason) from None
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
        from .tools import probe

        return probe.main(args_list)
    if command == "demo":
        from .tools import demo

        return demo.main(args_list)

    parser = build_parser()
    for warning in environment_warnings(parser, os.environ):
        sys.stderr.write(f"relay: warning: {warning}\n")
    from_env = apply_environment(parser, os.environ)
    args = parser.parse_args(args_list)

    def fail(exc: ConfigError | TLSError) -> int:
        # Name what the user wrote: the flag, or the variable it came from.
        origin = from_env.get(exc.flag)
        where = f"argument {exc.flag}"
        if origin is not None and getattr(args, origin.dest) is parser.get_default(origin.dest):
            where = f"{origin.name}={origin.value}"
        sys.stderr.write(f"relay: error: {where}: {exc.message}\n")
        return EXIT_USAGE

    try:
        config = config_from_args(args)
    except ConfigError as exc:
        return fail(exc)
    from .ops.service import preflight

    if args.check or args.print_config:
        # What start-up checks, short of binding: a port free now says nothing of later.
        try:
            preflight(config, bind=False)
        except (ConfigError, TLSError) as exc:
            return fail(exc)
        for host, reason in unresolved_hosts(u.host for u in config.all_upstreams):
            sys.stderr.write(f"relay: warning: upstream host {host} does not resolve ({reason})\n")
        print(describe_config(config) if args.print_config else "relay: configuration OK")
        return 0
    setup_logging(config.log_level, config.log_format)
    from .core.server import run
    from .ops.service import serve
    from .ops.workers import WORKER_ENV

    # A worker of --workers N was started by a parent that checked all this,
    # and that holds the admin port the check would try to bind.
    if not os.environ.get(WORKER_ENV):
        try:
            preflight(config)
        except (ConfigError, TLSError) as exc:
            return fail(exc)
        for host, reason in unresolved_hosts(u.host for u in config.all_upstreams):
            log.warning(
                "upstream host %s does not resolve (%s); starting anyway, "
                "its requests get 502 until it does",
                host,
                reason,
            )
        if config.workers > 1 and config.limits_store is None and _has_limits(config):
            log.info(
                "limits are per worker: each of the %d workers enforces the key limits and "
                "--max-inflight on its own (--limits-store shares them)",
                config.workers,
            )
    if config.workers == 1:
        try:
            return run(serve(config), config.loop)
        except KeyboardInterrupt:
            return 130
    return _serve_workers(config, args_list)


def _has_limits(config: Config) -> bool:
    """Whether any per-key limit or --max-inflight may apply."""
    per_key = any(not isinstance(key, str) for key in config.api_keys)
    return bool(
        config.key_max_concurrent
        or config.key_rpm
        or config.key_tpm
        or config.max_inflight
        or config.api_key_file
        or per_key
    )


def _serve_workers(config: Config, argv: Sequence[str]) -> int:
    """The parent of ``--workers N`` (binds, then supervises), or one of its workers."""
    from .ops.systemd import listen_sockets
    from .ops.workers import run_worker, run_workers, worker_spec

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
                backlog=BACKLOG,
            )
        except OSError as exc:
            sys.stderr.write(f"relay: error: argument --listen: {exc.strerror or exc}\n")
            return 1
        sockets = [sock]
    try:
        return run_workers(config, argv, sockets)
    except KeyboardInterrupt:
        return 130


class EnvOrigin(NamedTuple):
    """Where a flag's default came from: variable ``name`` holding ``value``."""

    name: str
    value: str
    dest: str


def _env_flags(parser: argparse.ArgumentParser) -> Iterable[tuple[str, str, argparse.Action]]:
    """Each flag that the environment may set: (variable, flag, action)."""
    for action in parser._actions:  # argparse has no public list of its actions
        longs = [o for o in action.option_strings if o.startswith("--")]
        if not longs or action.dest in ("help", "version"):
            continue
        yield "RELAY_" + longs[0][2:].upper().replace("-", "_"), longs[0], action


def apply_environment(
    parser: argparse.ArgumentParser, environ: Mapping[str, str]
) -> dict[str, EnvOrigin]:
    """Every ``--flag`` may come from ``RELAY_FLAG`` (flags on the command line win).

    Returns, by flag, the variables that set a default, so an error in such
    a value can name the variable instead of a flag the user never typed.
    """
    origins: dict[str, EnvOrigin] = {}
    for name, flag, action in _env_flags(parser):
        value = environ.get(name)
        if value is None:
            continue
        origins[flag] = EnvOrigin(name, value, action.dest)
        if action.nargs == 0:  # store_true flags
            parser.set_defaults(**{action.dest: value.strip().lower() in ("1", "true", "yes")})
        elif action.default == []:  # repeatable flags: comma-separated
            parser.set_defaults(**{action.dest: [v for v in value.split(",") if v.strip()]})
        else:
            parser.set_defaults(**{action.dest: value})
        action.required = False
    return origins


def environment_warnings(parser: argparse.ArgumentParser, environ: Mapping[str, str]) -> list[str]:
    """One line for each ``RELAY_*`` variable that relay does not know (a typo is ignored)."""
    known = {name for name, _, _ in _env_flags(parser)} | set(OTHER_ENVS)
    warnings = []
    for name in sorted(environ):
        if not name.startswith("RELAY_") or name in known:
            continue
        close = difflib.get_close_matches(name, known, n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        warnings.append(f"ignoring unknown environment variable {name}{hint}")
    return warnings


def unresolved_hosts(
    hosts: Iterable[str],
    timeout: float = RESOLVE_TIMEOUT,
    resolve: Callable[[str], object] = lambda host: socket.getaddrinfo(
        host, None, type=socket.SOCK_STREAM
    ),
) -> list[tuple[str, str]]:
    """Host names that do not resolve now, with the reason; waits at most ``timeout``.

    Every name is looked up at once, each in a daemon thread: getaddrinfo
    cannot be cancelled, and a resolver that hangs must neither delay the
    start beyond ``timeout`` nor keep the process alive at exit. A name that
    fails is only reported: relay resolves again on every connect, so a DNS
    entry added later works.
    """
    names = [h for h in dict.fromkeys(hosts) if not _is_ip(h)]
    outcome: dict[str, str | None] = {}

    def look_up(host: str) -> None:
        try:
            resolve(host)
            outcome[host] = None
        except OSError as exc:
            outcome[host] = exc.strerror or str(exc)

    threads = [threading.Thread(target=look_up, args=(h,), daemon=True) for h in names]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + timeout
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    failed = []
    for host in names:
        if host not in outcome:
            failed.append((host, f"no answer within {timeout:g}s"))
        elif outcome[host] is not None:
            failed.append((host, str(outcome[host])))
    return failed


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def describe_config(config: Config) -> str:
    """The effective configuration as the flags that give it, one a line, secrets masked.

    Every line is ``--flag VALUE`` (shell-quoted) or a bare ``--flag``, so the
    output reads as a command line and parses back to the same configuration;
    unset options are left out, and secrets appear only as ``#`` comments.
    """
    lines: list[str] = []

    def add(flag: str, value: object = None) -> None:
        lines.append(flag if value is None else f"{flag} {shlex.quote(str(value))}")

    add("--listen", config.listen)
    for upstream in config.upstreams:
        add("--upstream", _show_upstream(upstream))
    add("--balance", config.balance)
    for model, targets in config.routes:
        add("--route", f"{model}={','.join(map(_show_upstream, targets))}")
    if config.strict_models:
        add("--strict-models")
    if config.health_check is not None:
        add("--health-check", config.health_check)
    add("--health-interval", _show_default(config.health_interval, "duration"))
    for alias, target in config.model_map.aliases.items():
        add("--model-map", f"{alias}={target}")
    if config.model_map.default is not None:
        add("--model", config.model_map.default)
    for flag, value in (
        ("--tls-cert", config.tls_cert),
        ("--tls-key", config.tls_key),
        ("--tls-client-ca", config.tls_client_ca),
        ("--upstream-ca", config.upstream_ca),
        ("--upstream-cert", config.upstream_cert),
        ("--upstream-key", config.upstream_key),
        ("--api-key-file", config.api_key_file),
        ("--admin-listen", config.admin_listen),
    ):
        if value is not None:
            add(flag, value)
    if not config.upstream_tls_verify:
        add("--upstream-insecure-skip-verify")
    for spec in dataclasses.fields(config):
        if "flag" in spec.metadata:
            value = getattr(config, spec.name)
            add(spec.metadata["flag"], _show_default(value, spec.metadata["kind"]))
    if config.limits_store is not None:
        add("--limits-store", config.limits_store)
        add("--limits-store-failure", config.limits_store_failure)
    add("--workers", config.workers)
    add("--log-format", config.log_format)
    add("--loop", config.loop)
    add("--log-level", config.log_level)
    # Stream fidelity.
    if config.body_digest:
        add("--body-digest")
    if config.sse_keepalive is not None:
        add("--sse-keepalive", _show_default(config.sse_keepalive, "duration"))
    if config.test_stream is not None:
        add("--test-stream", config.test_stream)
    if config.otel:
        add("--otel")
    if config.api_keys:
        count = len(config.api_keys)
        lines.append(f"# {KEYS_ENV}: {count} key{'s' if count != 1 else ''} (masked)")
    if config.upstream_api_key:
        lines.append("# upstream API key: set (masked)")
    if config.limits_store_password:
        lines.append("# limits store password: set (masked)")
    return "\n".join(lines)


def _show_upstream(upstream: UpstreamAddress) -> str:
    # Plain http is how users write it: HOST:PORT.
    return upstream.authority if upstream.scheme == "http" else str(upstream)
