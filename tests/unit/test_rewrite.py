"""Model rewrite is surgical: only the top-level model value changes, byte for byte."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relay.http.rewrite import (
    ModelMap,
    ModelMapError,
    load_model_map_file,
    parse_model_map_item,
    rewrite_model,
)

ALIAS = ModelMap({"gpt-4o": "GLM-5.1-FP8", "ünï": 'tärget "q"'})
EVERYTHING = ModelMap({}, default="served")

# (body, mapping, expected body); None means "unchanged".
CORPUS: list[tuple[bytes, ModelMap, bytes | None]] = [
    (b'{"model":"gpt-4o"}', ALIAS, b'{"model":"GLM-5.1-FP8"}'),
    (b'{ "model" : "gpt-4o" , "x":1 }', ALIAS, b'{ "model" : "GLM-5.1-FP8" , "x":1 }'),
    (
        b'\n{\n\t"stream": true,\n\t"model":\n"gpt-4o"\n}\n',
        ALIAS,
        b'\n{\n\t"stream": true,\n\t"model":\n"GLM-5.1-FP8"\n}\n',
    ),
    # model inside messages is not the top-level member
    (
        b'{"messages":[{"model":"gpt-4o","content":"say \\"model\\""}],"model":"gpt-4o"}',
        ALIAS,
        b'{"messages":[{"model":"gpt-4o","content":"say \\"model\\""}],"model":"GLM-5.1-FP8"}',
    ),
    (b'{"messages":[{"model":"gpt-4o"}]}', ALIAS, None),
    # escaped key spelling still names "model", as Python's json reads it
    (b'{"mod\\u0065l":"gpt-4o"}', ALIAS, b'{"mod\\u0065l":"GLM-5.1-FP8"}'),
    # duplicate keys: the last one is what the upstream's json sees, and what changes
    (b'{"model":"a","model":"gpt-4o"}', ALIAS, b'{"model":"a","model":"GLM-5.1-FP8"}'),
    (b'{"model":"gpt-4o","model":"b"}', ALIAS, None),
    # unicode alias and a target that needs escaping
    ('{"model":"ünï","p":"é"}'.encode(), ALIAS, '{"model":"tärget \\"q\\"","p":"é"}'.encode()),
    (b'{"model":"gpt\\u002d4o"}', ALIAS, b'{"model":"GLM-5.1-FP8"}'),
    # numbers keep their spelling
    (
        b'{"temperature":1.0e0,"model":"x","n":-0}',
        EVERYTHING,
        b'{"temperature":1.0e0,"model":"served","n":-0}',
    ),
    # not rewritten: unknown name, non-string model, no model, not an object, not JSON
    (b'{"model":"other"}', ALIAS, None),
    (b'{"model":42}', EVERYTHING, None),
    (b'{"model":null}', EVERYTHING, None),
    (b'{"prompt":"x"}', EVERYTHING, None),
    (b'["model","gpt-4o"]', ALIAS, None),
    (b'{"model":"gpt-4o"', ALIAS, None),
    (b'{"model":"gpt-4o"} trailing', ALIAS, None),
    (b'{"model":"gpt-4o",}', ALIAS, None),
    (b"\xff\xfe{}", ALIAS, None),
    (b"", ALIAS, None),
    (b'{"model":"served"}', EVERYTHING, None),
]


@pytest.mark.parametrize(("body", "mapping", "expected"), CORPUS)
def test_corpus_byte_for_byte(body, mapping, expected):
    """Each body comes out exactly as expected, or unchanged."""
    result = rewrite_model(body, mapping)
    assert result.body == (body if expected is None else expected)
    assert result.changed == (expected is not None)


def test_huge_body_with_deep_messages_is_rewritten_in_place():
    """A multi-megabyte prompt changes only at the model value."""
    messages = [{"role": "user", "content": "x" * 1000, "model": "gpt-4o"}] * 3000
    body = json.dumps({"messages": messages, "model": "gpt-4o"}).encode()
    result = rewrite_model(body, ALIAS)
    assert result.body == body[: -len(b'"gpt-4o"}')] + b'"GLM-5.1-FP8"}'


def test_pathologically_deep_json_is_forwarded_unchanged():
    """Nesting deeper than Python's recursion limit is left for the upstream to judge."""
    body = b'{"model":"gpt-4o","x":' + b"[" * 100000 + b"]" * 100000 + b"}"
    assert rewrite_model(body, ALIAS).body == body


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=5), children, max_size=4)
    ),
    max_leaves=12,
)


@settings(max_examples=300, deadline=None)
@given(
    members=st.dictionaries(st.text(max_size=8), json_values, max_size=6),
    model=st.text(max_size=10),
    indent=st.sampled_from([None, 0, 2]),
    separators=st.sampled_from([(",", ":"), (", ", ": "), (" ,", " : ")]),
    ensure_ascii=st.booleans(),
)
def test_rewritten_body_parses_to_the_same_object_but_model(
    members, model, indent, separators, ensure_ascii
):
    """Whatever the JSON's formatting, only the top-level model differs after the rewrite."""
    document = {**members, "model": model}
    body = json.dumps(
        document, indent=indent, separators=separators, ensure_ascii=ensure_ascii
    ).encode()
    mapping = ModelMap({model: "target-model"})
    result = rewrite_model(body, mapping)
    rewritten = json.loads(result.body)
    assert rewritten == {**document, "model": "target-model"}
    if model != "target-model":
        assert result.requested == model and result.forwarded == "target-model"
        start = body.index(
            json.dumps(model, ensure_ascii=ensure_ascii).encode(), body.rindex(b'"model"')
        )
        assert result.body[:start] == body[:start]


def test_map_items_and_files_are_validated():
    """ALIAS=TARGET items and JSON map files give clear errors when malformed."""
    assert parse_model_map_item("a=b") == ("a", "b")
    assert parse_model_map_item(" a = b=c ") == ("a", "b=c")
    for bad in ("a", "=b", "a=", ""):
        with pytest.raises(ModelMapError):
            parse_model_map_item(bad)
    assert load_model_map_file('{"a": "b"}') == {"a": "b"}
    for bad in ("[1]", "{", '{"a": 1}', '{"a": ""}'):
        with pytest.raises(ModelMapError):
            load_model_map_file(bad)
