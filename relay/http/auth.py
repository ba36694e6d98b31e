"""Sans-IO API key checks: which requests may pass relay at all.

Keys come from a file (one per line, ``#`` comments, blank lines ignored) or
the environment. A request carries its key as ``Authorization: Bearer KEY``
or ``x-api-key: KEY`` (what Anthropic-style clients send). Every configured
key is compared with ``hmac.compare_digest``, and all of them are compared on
every request, so the time taken says nothing about which bytes matched.
"""

from __future__ import annotations

import hmac
from collections.abc import Iterable, Sequence

__all__ = ["KeyListError", "KeyRing", "parse_key_file", "parse_key_list"]


def parse_key_file(content: str) -> list[str]:
    """Keys from a key file's text."""
    keys = []
    for line in content.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keys.append(line)
    return keys


class KeyListError(ValueError):
    """A key list that is set but names no key."""


def parse_key_list(value: str) -> list[str]:
    """Keys from a comma- or whitespace-separated environment value.

    An empty value means no keys. A value made only of separators
    (``",, "``) raises :class:`KeyListError`: it reads as "keys were meant
    here", and silently serving without authentication would be the worst
    reading of it (an empty key file is refused for the same reason).
    """
    keys = [key for key in value.replace(",", " ").split() if key]
    if value and not keys:
        raise KeyListError("is set but holds no keys (only separators)")
    return keys


def _presented(headers: Iterable[tuple[bytes, bytes]]) -> list[bytes]:
    found = []
    for name, value in headers:
        if name == b"authorization":
            scheme, _, credential = value.strip().partition(b" ")
            if scheme.lower() == b"bearer" and credential.strip():
                found.append(credential.strip())
        elif name == b"x-api-key" and value.strip():
            found.append(value.strip())
    return found


class KeyRing:
    """The set of keys that let a request through; empty means no check."""

    def __init__(self, keys: Sequence[str] = ()) -> None:
        self._keys = [key.encode() for key in keys]

    def __bool__(self) -> bool:
        return bool(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def replace(self, keys: Sequence[str]) -> None:
        """Swap in a new set of keys (SIGHUP reload)."""
        self._keys = [key.encode() for key in keys]

    def allows(self, headers: Iterable[tuple[bytes, bytes]]) -> bool:
        """Whether ``headers`` (h11's, lower-case names) carry a configured key."""
        allowed = False
        for credential in _presented(headers):
            for key in self._keys:
                # No early exit: compare against every key, whatever matches.
                allowed |= hmac.compare_digest(credential, key)
        return allowed
