"""Sans-IO: the ``/v1/models`` list relay answers when it knows more than one upstream does.

relay answers ``GET /v1/models`` itself when aliases, routes or several
upstreams are configured: it asks every upstream for its list, and this
module merges the answers (the union of the models, each listed once, in
the order the upstreams named them), adds the routed models and the
aliases, and, under ``--strict-models``, keeps only the names a request
could actually be served under.
"""

from __future__ import annotations

import json
from collections.abc import Collection, Sequence
from typing import Any

from .rewrite import ModelMap

__all__ = ["MAX_MODEL_LIST_BYTES", "merge_model_lists", "parse_model_list"]

#: Largest model list relay reads from one upstream.
MAX_MODEL_LIST_BYTES = 1024 * 1024


def parse_model_list(body: bytes) -> list[dict[str, Any]] | None:
    """The ``data`` entries of an OpenAI model list, or ``None`` if ``body`` is not one."""
    try:
        document = json.loads(body)
    except (ValueError, RecursionError):
        return None
    if not isinstance(document, dict) or not isinstance(document.get("data"), list):
        return None
    return [
        entry
        for entry in document["data"]
        if isinstance(entry, dict) and isinstance(entry.get("id"), str)
    ]


def merge_model_lists(
    lists: Sequence[Sequence[dict[str, Any]]],
    *,
    model_map: ModelMap,
    routed: Collection[str],
    strict: bool,
) -> bytes:
    """One model list: every upstream's models, the routed models and the aliases.

    An alias entry says what it maps to in ``root`` (the field vLLM and
    SGLang use for a served model's origin). With ``strict``, a name is
    listed only when a request naming it would be routed (after aliasing).
    """
    entries: dict[str, dict[str, Any]] = {}
    for entries_of_one in lists:
        for entry in entries_of_one:
            entries.setdefault(entry["id"], entry)
    for model in routed:
        entries.setdefault(model, _entry(model))
    for alias, target in model_map.aliases.items():
        entries.setdefault(alias, _entry(alias, root=target))
    if strict:
        entries = {
            name: entry
            for name, entry in entries.items()
            if (model_map.target(name) or name) in routed
        }
    document = {"object": "list", "data": list(entries.values())}
    return json.dumps(document, ensure_ascii=False).encode("utf-8")


def _entry(name: str, *, root: str | None = None) -> dict[str, Any]:
    entry: dict[str, Any] = {"id": name, "object": "model", "created": 0, "owned_by": "relay"}
    if root is not None:
        entry["root"] = root
    return entry
