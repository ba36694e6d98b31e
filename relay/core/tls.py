"""SSL contexts for both sides, built from the standard ``ssl`` module.

Listening: TLS 1.2 or later, ALPN ``http/1.1``, optional client certificates
(mTLS). A SIGHUP reload builds a *new* context and the listener hands it to
new handshakes only once it loaded completely: loading into the live context
would leave it half-updated (a new certificate with the old key) when the
files are caught mid-rotation. Connections already open keep their context.

Upstream: verified against the system store or a given CA, with SNI and
hostname checking; an optional client certificate. Turning verification off
takes an explicit flag and is logged as a warning at start.
"""

from __future__ import annotations

import ssl

__all__ = ["TLSError", "describe_handshake_failure", "server_context", "upstream_context"]


class TLSError(ValueError):
    """A certificate, key or CA file could not be used; ``flag`` names the option."""

    def __init__(self, flag: str, message: str) -> None:
        super().__init__(f"{flag}: {message}")
        self.flag = flag
        self.message = message


def _describe(exc: Exception) -> str:
    if isinstance(exc, ssl.SSLError):
        return exc.reason or str(exc)
    if isinstance(exc, OSError):
        return exc.strerror or str(exc)
    return str(exc)


#: The flag that names the private key for each certificate flag.
_KEY_FLAG = {"--tls-cert": "--tls-key", "--upstream-cert": "--upstream-key"}


def _read_pem(path: str, flag: str) -> bytes:
    try:
        with open(path, "rb") as file:
            return file.read()
    except OSError as exc:
        raise TLSError(flag, f"cannot read {path}: {_describe(exc)}") from None


def _load_chain(context: ssl.SSLContext, cert: str, key: str | None, flag: str) -> None:
    """Load ``cert`` (and ``key``); an error names the flag and file at fault.

    OpenSSL reports a missing key file or a bad key as a failure of the
    chain ("PEM lib"), so each file is read first and, when loading fails,
    the PEM markers tell which file is wrong.
    """
    key_flag = _KEY_FLAG.get(flag, flag)
    cert_pem = _read_pem(cert, flag)
    key_pem = _read_pem(key, key_flag) if key is not None else cert_pem
    key_file = key if key is not None else cert
    try:
        context.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as exc:
        if isinstance(exc, ssl.SSLError) and exc.reason == "KEY_VALUES_MISMATCH":
            raise TLSError(
                key_flag, f"the key in {key_file} does not match the certificate in {cert}"
            ) from None
        if b"-----BEGIN CERTIFICATE-----" not in cert_pem:
            raise TLSError(flag, f"{cert} holds no PEM certificate") from None
        if b"PRIVATE KEY-----" not in key_pem:
            hint = "" if key is not None else f" (give {key_flag})"
            raise TLSError(key_flag, f"{key_file} holds no PEM private key{hint}") from None
        reason = _describe(exc)
        raise TLSError(flag, f"cannot load {cert} with key {key_file}: {reason}") from None


def server_context(cert: str, key: str | None, client_ca: str | None = None) -> ssl.SSLContext:
    """A new listening-side context; ``client_ca`` requires and verifies client certs.

    Raises :class:`TLSError` and leaves nothing half-loaded: call it again to
    reload, and swap the result in only when it returns.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_alpn_protocols(["http/1.1"])
    _load_chain(context, cert, key, "--tls-cert")
    if client_ca is not None:
        try:
            context.load_verify_locations(cafile=client_ca)
        except (OSError, ssl.SSLError) as exc:
            reason = f"cannot load {client_ca}: {_describe(exc)}"
            raise TLSError("--tls-client-ca", reason) from None
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def describe_handshake_failure(exc: BaseException) -> tuple[bool, str]:
    """Why a client's TLS handshake failed: ``(worth_info, text)`` for the log line.

    A plain HTTP request on the TLS port and certificate or protocol
    mismatches are client misconfigurations an operator wants to see; resets
    and clients that never finish (scanners, slow lorises) are noise for debug.
    """
    if isinstance(exc, ssl.SSLError):
        if exc.reason == "HTTP_REQUEST":
            return True, "http request on https port"
        return True, (exc.reason or str(exc)).replace("_", " ").lower()
    if isinstance(exc, ConnectionAbortedError | TimeoutError):
        return False, "no handshake in time"
    if isinstance(exc, ConnectionError):
        return False, "connection closed"
    return False, _describe(exc) if isinstance(exc, Exception) else type(exc).__name__


def upstream_context(
    ca: str | None = None,
    cert: str | None = None,
    key: str | None = None,
    *,
    verify: bool = True,
) -> ssl.SSLContext:
    """The context for ``https`` upstreams."""
    try:
        context = ssl.create_default_context(cafile=ca)
    except (OSError, ssl.SSLError) as exc:
        raise TLSError("--upstream-ca", f"cannot load {ca}: {_describe(exc)}") from None
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_alpn_protocols(["http/1.1"])
    if cert is not None:
        _load_chain(context, cert, key, "--upstream-cert")
    if not verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context
