"""Sans-IO model rewrite: change only the top-level ``model`` value of a JSON body.

The body is never re-serialized. The value's span is found with the standard
library's own JSON decoder (``JSONDecoder.raw_decode`` over each top-level
member) and only that span is replaced, so whitespace, key order, escapes,
number formatting and nested ``model`` keys (inside ``messages``, say) stay
byte for byte as the client sent them.

Duplicate top-level ``model`` keys: Python's ``json`` (and so SGLang) keeps
the last one, so the last one is what is looked up and rewritten; earlier
ones are left alone, and the upstream ignores them as it would directly.

A body that is not UTF-8 JSON, not an object, or has no top-level string
``model`` is returned unchanged.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

__all__ = [
    "ModelMap",
    "ModelMapError",
    "Rewrite",
    "add_aliases_to_model_list",
    "load_model_map_file",
    "parse_model_map_item",
    "rewrite_model",
]

_WS = re.compile(r"[ \t\n\r]*")
_DECODER = json.JSONDecoder()


class ModelMapError(ValueError):
    """A mapping entry or file is invalid."""


@dataclass(frozen=True)
class ModelMap:
    """Which model names the upstream gets instead of what clients ask for.

    ``aliases`` maps a requested name to the forwarded name; ``default``,
    when set, replaces every model name (the single-model sidecar case),
    after aliases are consulted.
    """

    aliases: Mapping[str, str] = field(default_factory=dict)
    default: str | None = None

    def __bool__(self) -> bool:
        return bool(self.aliases) or self.default is not None

    def target(self, requested: str) -> str | None:
        """The forwarded name for ``requested``, or ``None`` to leave it."""
        forwarded = self.aliases.get(requested, self.default)
        return None if forwarded is None or forwarded == requested else forwarded


@dataclass(frozen=True)
class Rewrite:
    """What :func:`rewrite_model` did: the body to send and the names involved."""

    body: bytes
    requested: str | None = None
    forwarded: str | None = None

    @property
    def changed(self) -> bool:
        return self.forwarded is not None and self.forwarded != self.requested


def _skip_ws(text: str, pos: int) -> int:
    match = _WS.match(text, pos)
    assert match is not None  # the pattern matches the empty string
    return match.end()


def find_model(text: str) -> tuple[int, int, object] | None:
    """Span ``(start, end)`` and value of the last top-level ``model`` member.

    Raises ``ValueError`` if ``text`` is not one JSON value; returns ``None``
    when it is not an object or has no ``model`` member.
    """
    pos = _skip_ws(text, 0)
    if text[pos : pos + 1] != "{":
        _, end = _DECODER.raw_decode(text, pos)  # validates a non-object body
        if _skip_ws(text, end) != len(text):
            raise ValueError("extra data after the JSON value")
        return None
    found: tuple[int, int, object] | None = None
    pos = _skip_ws(text, pos + 1)
    if text[pos : pos + 1] == "}":
        pos += 1
    else:
        while True:
            if text[pos : pos + 1] != '"':
                raise ValueError("expected a member name")
            key, pos = _DECODER.raw_decode(text, pos)
            pos = _skip_ws(text, pos)
            if text[pos : pos + 1] != ":":
                raise ValueError("expected ':'")
            start = _skip_ws(text, pos + 1)
            value, end = _DECODER.raw_decode(text, start)
            if key == "model":
                found = (start, end, value)
            pos = _skip_ws(text, end)
            separator = text[pos : pos + 1]
            if separator == ",":
                pos = _skip_ws(text, pos + 1)
            elif separator == "}":
                pos += 1
                break
            else:
                raise ValueError("expected ',' or '}'")
    if _skip_ws(text, pos) != len(text):
        raise ValueError("extra data after the JSON object")
    return found


def rewrite_model(body: bytes, model_map: ModelMap) -> Rewrite:
    """Rewrite the top-level ``model`` of ``body`` per ``model_map`` (see module doc)."""
    try:
        text = body.decode("utf-8")
        found = find_model(text)
    except (UnicodeDecodeError, ValueError, RecursionError):
        return Rewrite(body)
    if found is None or not isinstance(found[2], str):
        return Rewrite(body)
    start, end, requested = found
    forwarded = model_map.target(requested)
    if forwarded is None:
        return Rewrite(body, requested, requested)
    new_text = text[:start] + json.dumps(forwarded, ensure_ascii=False) + text[end:]
    return Rewrite(new_text.encode("utf-8"), requested, forwarded)


def add_aliases_to_model_list(body: bytes, model_map: ModelMap) -> bytes:
    """An OpenAI ``/v1/models`` list with the aliases appended as models.

    Clients that check the list before calling find their alias. Each alias
    entry says what it maps to in ``root`` (the field vLLM and SGLang use for
    a served model's origin). Anything that is not such a list is returned
    unchanged.
    """
    try:
        document = json.loads(body)
    except ValueError:
        return body
    if not isinstance(document, dict) or not isinstance(document.get("data"), list):
        return body
    known = {entry.get("id") for entry in document["data"] if isinstance(entry, dict)}
    for alias, target in model_map.aliases.items():
        if alias not in known:
            document["data"].append(
                {"id": alias, "object": "model", "created": 0, "owned_by": "relay", "root": target}
            )
    return json.dumps(document, ensure_ascii=False).encode("utf-8")


def parse_model_map_item(text: str) -> tuple[str, str]:
    """``ALIAS=TARGET`` → ``(alias, target)``; both non-empty."""
    alias, sep, target = text.partition("=")
    alias, target = alias.strip(), target.strip()
    if not sep or not alias or not target:
        raise ModelMapError(f"expected ALIAS=TARGET, got {text!r}")
    return alias, target


def load_model_map_file(content: str) -> dict[str, str]:
    """A JSON object ``{"alias": "target", ...}`` from a mapping file's ``content``."""
    try:
        document = json.loads(content)
    except ValueError as exc:
        raise ModelMapError(f"not valid JSON: {exc}") from None
    if not isinstance(document, dict):
        raise ModelMapError('expected a JSON object {"alias": "target", ...}')
    aliases: dict[str, str] = {}
    for alias, target in document.items():
        if not isinstance(target, str) or not alias or not target:
            raise ModelMapError(f"alias {alias!r} must map to a non-empty string")
        aliases[alias] = target
    return aliases
