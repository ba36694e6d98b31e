"""Sans-IO API key checks: which requests may pass relay at all, and as whom.

Keys come from a file or the environment. A key file is either a JSON object
(``{"team-a": "sk-...", "team-b": {"key": "sk-...", "rpm": 60}}``) or lines
(``#`` comments and blank lines ignored) holding ``KEY`` alone, or
``NAME KEY`` followed by optional limits ``concurrent=N rpm=N tpm=N``. The
name, never the key, is what logs and metrics show; a key given without a
name is shown as ``key-`` and the first 8 hex digits of its SHA-256.

A request carries its key as ``Authorization: Bearer KEY`` or
``x-api-key: KEY`` (what Anthropic-style clients send). Every configured
key is compared with ``hmac.compare_digest``, and all of them are compared on
every request, so the time taken says nothing about which bytes matched.
"""

from __future__ import annotations

import difflib
import hashlib
import hmac
import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from .limits import KeyLimits

__all__ = [
    "KeyFileError",
    "KeyListError",
    "KeyRing",
    "NamedKey",
    "key_name",
    "named",
    "parse_key_file",
    "parse_key_list",
    "parse_named_keys",
]

#: Key names are label values and log fields: short, and safe in both.
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_LIMIT_NAMES = ("concurrent", "rpm", "tpm")


class KeyFileError(ValueError):
    """A key file (or ``RELAY_API_KEYS``) that cannot be read as keys; never quotes a key."""


def key_name(key: str) -> str:
    """The name shown for a key given without one (a digest prefix, not the key)."""
    return "key-" + hashlib.sha256(key.encode()).hexdigest()[:8]


@dataclass(frozen=True)
class NamedKey:
    """A key, the name it is shown as, and its own limits (unset ones take the defaults)."""

    name: str
    key: str = field(repr=False)
    limits: KeyLimits = field(default_factory=KeyLimits)

    @classmethod
    def plain(cls, key: str) -> NamedKey:
        return cls(key_name(key), key)


def _limit(where: str, name: str, value: Any) -> int:
    if isinstance(value, str) and value.isdigit():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        shown = repr(value) if len(repr(value)) <= 12 else "a value too long to show"
        raise KeyFileError(f"{where}: {name} must be a whole number (0: no limit), got {shown}")
    return value


def _check(keys: list[NamedKey]) -> list[NamedKey]:
    names: set[str] = set()
    secrets: set[str] = set()
    for entry in keys:
        if entry.name in names:
            raise KeyFileError(f"key name {entry.name!r} is used twice; names must be unique")
        if entry.key in secrets:
            raise KeyFileError(f"the key named {entry.name!r} is listed twice")
        names.add(entry.name)
        secrets.add(entry.key)
    return keys


def _from_json(content: str) -> list[NamedKey]:
    try:
        document = json.loads(content)
    except ValueError as exc:
        raise KeyFileError(f"not valid JSON (line {getattr(exc, 'lineno', '?')})") from None
    if not isinstance(document, dict):
        raise KeyFileError('expected a JSON object {"name": "key", ...}')
    keys = []
    for name, value in document.items():
        if not _NAME_RE.fullmatch(name):
            raise KeyFileError(f"invalid key name {name!r} (letters, digits, . _ -; up to 64)")
        where = f"key {name!r}"
        limits = KeyLimits()
        if isinstance(value, dict):
            unknown = set(value) - {"key", *_LIMIT_NAMES}
            if unknown:
                raise KeyFileError(f"{where}: unknown field {sorted(unknown)[0]!r}")
            found = {k: _limit(where, k, value[k]) for k in _LIMIT_NAMES if k in value}
            limits = KeyLimits(**found)
            value = value.get("key")
        if not isinstance(value, str) or not value.strip() or value != value.strip():
            raise KeyFileError(f"{where}: the key must be a non-empty string without spaces")
        keys.append(NamedKey(name, value, limits))
    return _check(keys)


def parse_named_keys(content: str) -> list[NamedKey]:
    """Keys, names and limits from a key file's text (JSON object or lines).

    Raises :class:`KeyFileError` with a one-line reason (a line number, a
    name; never a key).
    """
    if content.lstrip()[:1] in ("{", "["):  # JSON (an array is refused by name)
        return _from_json(content)
    keys = []
    for number, line in enumerate(content.splitlines(), 1):
        words = line.split()
        if not words or words[0].startswith("#"):
            continue
        if len(words) == 1:
            keys.append(NamedKey.plain(words[0]))
            continue
        name, key, *options = words
        if not _NAME_RE.fullmatch(name):
            # Not quoted: with the words swapped, the first one is the key.
            raise KeyFileError(
                f"line {number}: the first word is not a key name (letters, digits, . _ -; "
                "up to 64); a line with a key alone needs no name"
            )
        found = {}
        for position, option in enumerate(options, 3):
            limit, sep, value = option.partition("=")
            if not sep:
                # Not quoted: a word without '=' after the key may be a key itself.
                raise KeyFileError(
                    f"line {number}: word {position} is not a limit (a second key on the "
                    "line?); expected NAME KEY [concurrent=N] [rpm=N] [tpm=N]"
                )
            if limit not in _LIMIT_NAMES:
                # Quoted only when it is close to a limit's name: then it is a typo
                # of one, not a key that happens to hold '='.
                close = difflib.get_close_matches(limit, _LIMIT_NAMES, n=1)
                what = (
                    f"unknown limit {limit!r} (did you mean {close[0]}?)"
                    if close
                    else f"word {position} is not a limit"
                )
                raise KeyFileError(
                    f"line {number}: {what}; expected NAME KEY [concurrent=N] [rpm=N] [tpm=N]"
                )
            found[limit] = _limit(f"line {number}", limit, value)
        keys.append(NamedKey(name, key, KeyLimits(**found)))
    return _check(keys)


def parse_key_file(content: str) -> list[str]:
    """Keys alone from a key file's text (the upstream key file)."""
    return [entry.key for entry in parse_named_keys(content)]


class KeyListError(ValueError):
    """A key list that is set but names no key."""


def parse_key_list(value: str) -> list[str | NamedKey]:
    """Keys from a comma- or whitespace-separated environment value, or a JSON object.

    A value starting with ``{`` is read as a key file's JSON object (names,
    keys, limits); :class:`KeyFileError` says what is wrong with it.

    An empty value means no keys. A value made only of separators
    (``",, "``) raises :class:`KeyListError`: it reads as "keys were meant
    here", and silently serving without authentication would be the worst
    reading of it (an empty key file is refused for the same reason).
    """
    if value.lstrip().startswith("{"):
        return list(parse_named_keys(value))
    keys: list[str | NamedKey] = [key for key in value.replace(",", " ").split() if key]
    if value and not keys:
        raise KeyListError("is set but holds no keys (only separators)")
    return keys


def _presented(headers: Iterable[tuple[bytes, bytes]]) -> list[bytes]:
    found = []
    for name, value in headers:
        size = len(name)  # the length first: most names are neither
        if size == 13 and name.lower() == b"authorization":
            scheme, _, credential = value.strip().partition(b" ")
            if scheme.lower() == b"bearer" and credential.strip():
                found.append(credential.strip())
        elif size == 9 and name.lower() == b"x-api-key" and value.strip():
            found.append(value.strip())
    return found


def named(keys: Sequence[str | NamedKey]) -> list[NamedKey]:
    """Every key as a :class:`NamedKey` (plain strings get their digest name)."""
    return [k if isinstance(k, NamedKey) else NamedKey.plain(k) for k in keys]


class KeyRing:
    """The set of keys that let a request through; empty means no check."""

    def __init__(self, keys: Sequence[str | NamedKey] = ()) -> None:
        self.replace(keys)

    def __bool__(self) -> bool:
        return bool(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def replace(self, keys: Sequence[str | NamedKey]) -> None:
        """Swap in a new set of keys (SIGHUP reload)."""
        self.entries = named(keys)
        self._keys = [(entry.key.encode(), entry.name) for entry in self.entries]

    def match(self, headers: Iterable[tuple[bytes, bytes]]) -> str | None:
        """The name of the configured key ``headers`` carry (names in any case), or None."""
        found = None
        for credential in _presented(headers):
            for key, name in self._keys:
                # No early exit: compare against every key, whatever matches.
                if hmac.compare_digest(credential, key) and found is None:
                    found = name
        return found

    def allows(self, headers: Iterable[tuple[bytes, bytes]]) -> bool:
        """Whether ``headers`` (names in any case) carry a configured key."""
        return self.match(headers) is not None
