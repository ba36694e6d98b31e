"""Configuration: the frozen :class:`Config` and the parsing of its values.

Sans-IO: nothing here opens a socket. Defaults live in exactly one place, the
dataclass fields; the CLI reads them from there (``Config.default(name)``).
Every parse function raises :class:`ConfigError` naming the flag, so the CLI
can print one line and exit 2.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import re
from dataclasses import dataclass, field
from typing import Any

from .http.auth import NamedKey
from .http.rewrite import ModelMap

__all__ = [
    "Config",
    "ConfigError",
    "ListenAddress",
    "StoreAddress",
    "UpstreamAddress",
    "parse_duration",
    "parse_limits_store",
    "parse_listen",
    "parse_size",
    "parse_upstream",
]


class ConfigError(ValueError):
    """A configuration value is invalid; ``flag`` names the option at fault."""

    def __init__(self, flag: str, message: str) -> None:
        super().__init__(f"{flag}: {message}")
        self.flag = flag
        self.message = message


@dataclass(frozen=True)
class ListenAddress:
    """Where relay accepts connections. ``host`` ``None`` means all interfaces."""

    host: str | None
    port: int

    def __str__(self) -> str:
        host = self.host
        if host is None:
            return f":{self.port}"
        return f"[{host}]:{self.port}" if ":" in host else f"{host}:{self.port}"


@dataclass(frozen=True)
class UpstreamAddress:
    """An upstream server, reached over ``http`` or ``https``."""

    host: str
    port: int
    scheme: str = "http"

    @property
    def authority(self) -> str:
        """``host:port`` as it goes into a ``Host`` header."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    def __str__(self) -> str:
        return f"{self.scheme}://{self.authority}"


@dataclass(frozen=True)
class StoreAddress:
    """The shared limit store: a Redis (or Valkey) server, its database and user.

    The password is never part of it: it comes from a file or the environment.
    """

    host: str
    port: int = 6379
    db: int = 0
    tls: bool = False
    username: str | None = None

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        user = f"{self.username}@" if self.username else ""
        return f"{'rediss' if self.tls else 'redis'}://{user}{host}:{self.port}/{self.db}"


def _limits(*, help: str, flag: str, kind: str = "", least: int = 1) -> Any:
    # Metadata the CLI turns into flags; the default stays on the field.
    return {"help": help, "flag": flag, "kind": kind, "least": least}


@dataclass(frozen=True)
class Config:
    """Everything a relay process needs; immutable once built.

    Timeouts are seconds; sizes are bytes. The defaults suit LLM work:
    generations run for minutes and queues can hold a request for minutes
    before the first byte, so upstream waits are long (nginx's 60 s read
    timeout is the classic trap), while client-side waits that protect
    relay itself (slowloris, idle keep-alive) are short.
    """

    listen: ListenAddress = ListenAddress(None, 4000)
    upstream: UpstreamAddress = UpstreamAddress("127.0.0.1", 30000)
    # Several upstreams: the first is ``upstream``, the rest follow.
    more_upstreams: tuple[UpstreamAddress, ...] = ()
    balance: str = "least-requests"
    routes: tuple[tuple[str, tuple[UpstreamAddress, ...]], ...] = ()
    strict_models: bool = False
    health_check: str | None = None
    health_interval: float = 5.0

    max_header_bytes: int = field(
        default=64 * 1024,
        metadata=_limits(
            flag="--max-header-bytes",
            kind="size",
            help="largest request head (request line and headers) accepted; 431 beyond",
        ),
    )
    max_body_bytes: int = field(
        default=64 * 1024 * 1024,
        metadata=_limits(
            flag="--max-body-bytes",
            kind="size",
            help="largest request body accepted; 413 beyond (long prompts and images are big)",
        ),
    )
    max_inspect_bytes: int = field(
        default=256 * 1024 * 1024,
        metadata=_limits(
            flag="--max-inspect-bytes",
            kind="size",
            help="request bytes all requests together may hold while relay reads their "
            "model (aliasing, --model, --route); 503 beyond",
        ),
    )
    max_connections: int = field(
        default=4096,
        metadata=_limits(
            flag="--max-connections",
            kind="count",
            help="client connections served at once; more are answered 503 and closed",
        ),
    )
    client_head_timeout: float = field(
        default=15.0,
        metadata=_limits(
            flag="--client-head-timeout",
            kind="duration",
            help="time a client has to send a whole request head (slowloris guard); 408",
        ),
    )
    client_body_timeout: float = field(
        default=60.0,
        metadata=_limits(
            flag="--client-body-timeout",
            kind="duration",
            help="longest pause between request body bytes from the client; 408",
        ),
    )
    client_keepalive_timeout: float = field(
        default=75.0,
        metadata=_limits(
            flag="--client-keepalive-timeout",
            kind="duration",
            help="how long an idle client connection is kept open between requests",
        ),
    )
    client_send_timeout: float = field(
        default=120.0,
        metadata=_limits(
            flag="--client-send-timeout",
            kind="duration",
            help="longest time a client may leave relay's writes unread before it is dropped",
        ),
    )
    upstream_connect_timeout: float = field(
        default=5.0,
        metadata=_limits(
            flag="--upstream-connect-timeout",
            kind="duration",
            help="time to open a TCP connection to the upstream; 504",
        ),
    )
    upstream_head_timeout: float = field(
        default=900.0,
        metadata=_limits(
            flag="--upstream-head-timeout",
            kind="duration",
            help="time from sending a request to the upstream's response head "
            "(queued long prompts take minutes); 504",
        ),
    )
    upstream_idle_timeout: float = field(
        default=600.0,
        metadata=_limits(
            flag="--upstream-idle-timeout",
            kind="duration",
            help="longest silence between upstream body bytes before the stream is cut",
        ),
    )
    upstream_keepalive_timeout: float = field(
        default=4.0,
        metadata=_limits(
            flag="--upstream-keepalive-timeout",
            kind="duration",
            help="how long an idle pooled upstream connection is kept; keep it below the "
            "upstream's own (uvicorn under SGLang closes after 5 s)",
        ),
    )
    upstream_keepalive: int = field(
        default=128,
        metadata=_limits(
            flag="--upstream-keepalive",
            kind="count",
            help="idle upstream connections kept for reuse (0 disables pooling)",
        ),
    )
    model_map: ModelMap = field(default_factory=ModelMap)

    # Operations.
    admin_listen: ListenAddress | None = None
    drain_timeout: float = field(
        default=30.0,
        metadata=_limits(
            flag="--drain-timeout",
            kind="duration",
            help="on SIGTERM, how long in-flight streams may finish before they are closed",
        ),
    )
    workers: int = 1
    log_format: str = "text"

    # TLS and keys: paths are loaded (and checked) when the server starts.
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_client_ca: str | None = None
    upstream_ca: str | None = None
    upstream_cert: str | None = None
    upstream_key: str | None = None
    upstream_tls_verify: bool = True
    api_key_file: str | None = None
    api_keys: tuple[str | NamedKey, ...] = field(default=(), repr=False)
    upstream_api_key: str | None = field(default=None, repr=False)
    # Keys, limits and the upstream queue; 0 means no limit. The key
    # limits are defaults a key file may override per key; without keys they
    # apply to each client address. All of them are per relay process.
    key_max_concurrent: int = field(
        default=0,
        metadata=_limits(
            flag="--key-max-concurrent",
            kind="count",
            least=0,
            help="requests one key may have in flight; 429 beyond (0: no limit)",
        ),
    )
    key_rpm: int = field(
        default=0,
        metadata=_limits(
            flag="--key-rpm",
            kind="count",
            least=0,
            help="requests one key may start per minute; 429 beyond (0: no limit)",
        ),
    )
    key_tpm: int = field(
        default=0,
        metadata=_limits(
            flag="--key-tpm",
            kind="count",
            least=0,
            help="prompt + completion tokens one key may use per minute, as the upstream "
            "reports them when a request ends; 429 beyond (0: no limit)",
        ),
    )
    max_usage_bytes: int = field(
        default=4 * 1024 * 1024,
        metadata=_limits(
            flag="--max-usage-bytes",
            kind="size",
            help="bytes at the end of a response where its usage (a stream's final event, "
            "a JSON body's usage member) is looked for; a usage event or body bigger than "
            "this is charged an estimate",
        ),
    )
    max_inflight: int = field(
        default=0,
        metadata=_limits(
            flag="--max-inflight",
            kind="count",
            least=0,
            help="requests each upstream gets at once; more wait in a queue served fairly "
            "across keys (0: no limit)",
        ),
    )
    queue_size: int = field(
        default=256,
        metadata=_limits(
            flag="--queue-size",
            kind="count",
            least=0,
            help="requests that may wait for each upstream under --max-inflight; 503 beyond",
        ),
    )
    queue_timeout: float = field(
        default=30.0,
        metadata=_limits(
            flag="--queue-timeout",
            kind="duration",
            help="longest wait in the --max-inflight queue; 503 after it",
        ),
    )
    # The shared limit store: with it, the key limits and --max-inflight hold
    # across every process and replica pointed at the same store.
    limits_store: StoreAddress | None = None
    limits_store_password: str | None = field(default=None, repr=False)
    limits_store_failure: str = "open"  # or "closed": 503 while the store is away
    limits_store_timeout: float = field(
        default=0.1,
        metadata=_limits(
            flag="--limits-store-timeout",
            kind="duration",
            help="longest wait for one call to the --limits-store; past it the store "
            "counts as away",
        ),
    )
    limits_store_lease: float = field(
        default=30.0,
        metadata=_limits(
            flag="--limits-store-lease",
            kind="duration",
            help="how long a slot in the --limits-store outlives a relay that died holding "
            "it (renewed every third of it while the request lives)",
        ),
    )
    loop: str = "auto"
    log_level: str = "info"
    # Stream fidelity; the metrics are always on, these are opt-in.
    body_digest: bool = False  # SHA-256 of the forwarded body in the access line
    sse_keepalive: float | None = None  # seconds of upstream silence before ": keep-alive"
    test_stream: str | None = None  # path on the public listener serving a paced stream
    # OpenTelemetry traces (relay[otel]); the exporter reads the OTEL_* variables.
    otel: bool = False

    def __post_init__(self) -> None:
        for spec in dataclasses.fields(self):
            flag = spec.metadata.get("flag")
            if flag is None:
                continue
            value = getattr(self, spec.name)
            kind = spec.metadata["kind"]
            if kind == "duration" and not value > 0:
                raise ConfigError(flag, f"must be a positive duration, got {value!r}")
            least = 0 if spec.name == "upstream_keepalive" else spec.metadata["least"]
            if kind in ("size", "count") and value < least:
                raise ConfigError(flag, f"must be a positive number, got {value!r}")
        if self.tls_key is not None and self.tls_cert is None:
            raise ConfigError("--tls-key", "needs --tls-cert")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise ConfigError("--tls-client-ca", "needs --tls-cert (client certificates need TLS)")
        if self.upstream_key is not None and self.upstream_cert is None:
            raise ConfigError("--upstream-key", "needs --upstream-cert")
        https = self.upstream.scheme == "https"
        for flag, value in (
            ("--upstream-ca", self.upstream_ca),
            ("--upstream-cert", self.upstream_cert),
        ):
            if value is not None and not https:
                raise ConfigError(flag, "needs an https:// --upstream")
        if self.balance not in BALANCE_POLICIES:
            choices = ", ".join(BALANCE_POLICIES)
            raise ConfigError("--balance", f"must be one of {choices}, got {self.balance!r}")
        if self.health_check is not None and not self.health_check.startswith("/"):
            raise ConfigError("--health-check", "must be a path such as /health")
        if not self.health_interval > 0:
            raise ConfigError("--health-interval", "must be a positive duration")
        if self.strict_models and not self.routes:
            raise ConfigError("--strict-models", "needs at least one --route")
        if len({u.scheme for u in self.all_upstreams}) > 1:
            raise ConfigError("--upstream", "mixing http and https upstreams is not supported")
        if self.workers < 1:
            raise ConfigError("--workers", f"must be at least 1, got {self.workers}")
        if self.log_format not in ("text", "json"):
            raise ConfigError("--log-format", f"must be text or json, got {self.log_format!r}")
        # Port 0 twice is two free ports, not one address.
        if (
            self.admin_listen is not None
            and self.admin_listen == self.listen
            and self.listen.port != 0
        ):
            raise ConfigError("--admin-listen", "must differ from --listen")
        if self.loop not in ("auto", "uvloop", "asyncio"):
            raise ConfigError("--loop", f"must be auto, uvloop or asyncio, got {self.loop!r}")
        if self.log_level not in ("debug", "info", "warning", "error"):
            raise ConfigError(
                "--log-level", f"must be debug, info, warning or error, got {self.log_level!r}"
            )

        if self.limits_store_failure not in LIMITS_STORE_FAILURE:
            raise ConfigError(
                "--limits-store-failure",
                f"must be open or closed, got {self.limits_store_failure!r}",
            )
        # Renewal runs every third of a lease; each call may take the timeout.
        if self.limits_store_lease < max(1.0, 3 * self.limits_store_timeout):
            raise ConfigError(
                "--limits-store-lease",
                "must be at least 1s and three times --limits-store-timeout",
            )

        # Stream fidelity.
        if self.sse_keepalive is not None and not self.sse_keepalive > 0:
            raise ConfigError("--sse-keepalive", "must be a positive duration")
        if self.test_stream is not None and (
            not self.test_stream.startswith("/")
            or self.test_stream.rstrip("/") in ("", "/v1")
            or any(c in self.test_stream for c in "?# ")
        ):
            raise ConfigError(
                "--test-stream", "must be a path of its own such as /relay-test-stream"
            )

    @property
    def upstreams(self) -> tuple[UpstreamAddress, ...]:
        """The default set: every ``--upstream``, in order."""
        return (self.upstream, *self.more_upstreams)

    @property
    def all_upstreams(self) -> tuple[UpstreamAddress, ...]:
        """Every upstream relay may talk to: the default set and the routes' ones."""
        seen = dict.fromkeys(self.upstreams)
        for _, targets in self.routes:
            seen.update(dict.fromkeys(targets))
        return tuple(seen)

    @classmethod
    def default(cls, name: str) -> Any:
        """The default of field ``name`` (so the CLI never repeats a default)."""
        return next(f.default for f in dataclasses.fields(cls) if f.name == name)


BALANCE_POLICIES = ("least-requests", "round-robin", "random-two")
LIMITS_STORE_FAILURE = ("open", "closed")
#: The variable that may hold the store's password (never a flag: ps shows flags).
LIMITS_STORE_PASSWORD_ENV = "RELAY_LIMITS_STORE_PASSWORD"

_PORT_RE = re.compile(r"[0-9]{1,5}")
_HOST_RE = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9.\-_]*[A-Za-z0-9])?")


def _parse_port(flag: str, text: str, *, allow_zero: bool) -> int:
    if not _PORT_RE.fullmatch(text):
        raise ConfigError(flag, f"port must be a number, got {text!r}")
    port = int(text)
    if port > 65535 or (port == 0 and not allow_zero):
        raise ConfigError(flag, f"port out of range: {port}")
    return port


def _split_host_port(flag: str, text: str, *, allow_zero: bool) -> tuple[str, int]:
    if text.startswith("["):
        close = text.find("]")
        if close < 0 or text[close + 1 : close + 2] != ":":
            raise ConfigError(flag, f"expected [IPV6]:PORT, got {text!r}")
        host = text[1:close]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ConfigError(flag, f"invalid IPv6 address {host!r}") from None
        return host, _parse_port(flag, text[close + 2 :], allow_zero=allow_zero)
    host, sep, port = text.rpartition(":")
    if not sep:
        raise ConfigError(flag, f"expected HOST:PORT, got {text!r}")
    if ":" in host:
        raise ConfigError(flag, f"put an IPv6 address in brackets: [{host}]:{port}")
    if host and not _HOST_RE.fullmatch(host):
        raise ConfigError(flag, f"invalid host {host!r}")
    return host, _parse_port(flag, port, allow_zero=allow_zero)


def parse_listen(text: str, flag: str = "--listen") -> ListenAddress:
    """``:PORT`` (all interfaces), ``HOST:PORT`` or ``[V6]:PORT``; port 0 picks one."""
    host, port = _split_host_port(flag, text.strip(), allow_zero=True)
    return ListenAddress(host or None, port)


def parse_upstream(text: str, flag: str = "--upstream") -> UpstreamAddress:
    """``HOST:PORT``, ``http://HOST:PORT`` or ``https://HOST:PORT`` (a trailing ``/`` is fine)."""
    rest = text.strip()
    scheme, sep, after = rest.partition("://")
    if sep:
        scheme = scheme.lower()
        if scheme not in ("http", "https"):
            raise ConfigError(flag, f"unsupported scheme {scheme!r}; use http:// or https://")
        rest = after
    else:
        scheme = "http"
    if rest.endswith("/"):
        rest = rest[:-1]
    if "/" in rest or "?" in rest or "@" in rest:
        raise ConfigError(flag, f"expected HOST:PORT without a path, got {text!r}")
    host, port = _split_host_port(flag, rest, allow_zero=False)
    if not host:
        raise ConfigError(flag, f"missing host in {text!r}")
    return UpstreamAddress(host, port, scheme)


def parse_limits_store(text: str, flag: str = "--limits-store") -> StoreAddress:
    """``redis://[USER@]HOST[:PORT][/DB]`` or ``rediss://`` (TLS); no password in it."""
    rest = text.strip()
    scheme, sep, rest = rest.partition("://")
    if not sep or scheme.lower() not in ("redis", "rediss"):
        raise ConfigError(flag, f"expected redis://HOST:PORT/DB or rediss://..., got {text!r}")
    if "?" in rest or "#" in rest:
        raise ConfigError(flag, "takes no query; the password comes from a file or the environment")
    authority, _, path = rest.partition("/")
    username = None
    if "@" in authority:
        user, _, authority = authority.rpartition("@")
        if ":" in user:
            raise ConfigError(
                flag,
                "must not hold a password (ps shows it): use --limits-store-password-file "
                "or RELAY_LIMITS_STORE_PASSWORD",
            )
        username = user or None
    if (authority.startswith("[") and authority.endswith("]")) or ":" not in authority:
        authority += ":6379"
    host, port = _split_host_port(flag, authority, allow_zero=False)
    if not host:
        raise ConfigError(flag, f"missing host in {text!r}")
    path = path.strip("/")
    if path and not (path.isdigit() and int(path) < 1 << 16):
        raise ConfigError(flag, f"the database must be a number, got {path!r}")
    return StoreAddress(host, port, int(path or 0), scheme.lower() == "rediss", username)


# A sign is accepted so that "-1k" gets "must be positive", not "expected a size".
_SIZE_RE = re.compile(r"(-?[0-9]+)\s*([kmg]i?b?|b)?", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "b": 1, "k": 1024, "m": 1024**2, "g": 1024**3}


def parse_size(text: str, flag: str) -> int:
    """Bytes: ``65536``, ``64k``, ``64KiB``, ``1m``, ``2g`` (binary units, as nginx)."""
    match = _SIZE_RE.fullmatch(text.strip())
    if match is None:
        raise ConfigError(flag, f"expected a size such as 65536, 64k or 1m, got {text!r}")
    if match.group(1).startswith("-"):
        raise ConfigError(flag, f"must be a positive size, got {text!r}")
    unit = (match.group(2) or "").lower()[:1]
    return int(match.group(1)) * _SIZE_UNITS[unit]


_DURATION_RE = re.compile(r"(-?[0-9]+(?:\.[0-9]*)?|-?\.[0-9]+)\s*(ms|s|m|h)?", re.IGNORECASE)
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(text: str, flag: str) -> float:
    """Seconds: ``30``, ``2.5``, ``500ms``, ``30s``, ``10m``, ``1h``."""
    match = _DURATION_RE.fullmatch(text.strip())
    if match is None:
        raise ConfigError(flag, f"expected a duration such as 30, 500ms, 30s or 10m, got {text!r}")
    seconds = float(match.group(1)) * _DURATION_UNITS[(match.group(2) or "").lower()]
    if seconds <= 0:
        raise ConfigError(flag, f"must be a positive duration, got {text!r}")
    return seconds


_COUNT_RE = re.compile(r"[0-9]{1,9}")


def parse_count(text: str, flag: str) -> int:
    """A whole number of things (connections, idle slots)."""
    if _COUNT_RE.fullmatch(text.strip().removeprefix("-")) and text.strip().startswith("-"):
        raise ConfigError(flag, f"must not be negative, got {text!r}")
    if not _COUNT_RE.fullmatch(text.strip()):
        raise ConfigError(flag, f"expected a whole number, got {text!r}")
    return int(text)


#: How each kind of limit field is parsed from text.
PARSERS = {"size": parse_size, "duration": parse_duration, "count": parse_count}


def parse_route(text: str, flag: str = "--route") -> tuple[str, tuple[UpstreamAddress, ...]]:
    """``MODEL=UPSTREAM[,UPSTREAM...]`` → the model and its upstreams."""
    model, sep, targets = text.partition("=")
    model = model.strip()
    if not sep or not model or not targets.strip():
        raise ConfigError(flag, f"expected MODEL=UPSTREAM[,UPSTREAM...], got {text!r}")
    return model, tuple(parse_upstream(t, flag) for t in targets.split(",") if t.strip())
