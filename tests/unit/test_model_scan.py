"""The incremental model scanner reads what ``json.loads`` reads, at every split point."""

from __future__ import annotations

import codecs
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relay.http.rewrite import (
    MAX_MODEL_VALUE_BYTES,
    InspectBudget,
    ModelMap,
    ModelScanner,
    ScanStatus,
    rewrite_pieces,
    scan_body,
)

FOUND, ABSENT, INVALID, UNREADABLE = (
    ScanStatus.FOUND,
    ScanStatus.ABSENT,
    ScanStatus.INVALID,
    ScanStatus.UNREADABLE,
)

# (body, status, model value when FOUND)
CORPUS: list[tuple[bytes, ScanStatus, object]] = [
    (b'{"model":"a"}', FOUND, "a"),
    (b' \n{ "model" : "a" , "x" : 1 }\r\n', FOUND, "a"),
    (b'{"mod\\u0065l":"a"}', FOUND, "a"),
    (b'{"\\u006d\\u006f\\u0064\\u0065\\u006c":"a"}', FOUND, "a"),
    (b'{"model":"a","model":"b"}', FOUND, "b"),
    (b'{"model":"a","mod\\u0065l":"b","x":{"model":"c"}}', FOUND, "b"),
    (b'{"model":"g\\"p\\\\t\\u00e9\\ud83d\\ude00"}', FOUND, 'g"p\\t\u00e9\U0001f600'),
    (b'{"x":"}{][\\"","model":"a"}', FOUND, "a"),
    (b'{"m":[1,[2,{"model":"no"}],"]"],"model":"yes"}', FOUND, "yes"),
    (b'{"model":42}', FOUND, 42),
    (b'{"model":null }', FOUND, None),
    (b'{"model":{"a":[1,"}"]}}', FOUND, {"a": [1, "}"]}),
    (b'{"model":-1.5e3,"z":true}', FOUND, -1500.0),
    ('{"model":"ünï"}'.encode(), FOUND, "ünï"),
    (codecs.BOM_UTF8 + b'{"model":"a"}', FOUND, "a"),
    (b'{"modelx":"a","Model":"b"}', ABSENT, None),
    (b"{}", ABSENT, None),
    (b'["model","a"]', ABSENT, None),
    (b'"model"', ABSENT, None),
    (b"", INVALID, None),
    (b"   ", INVALID, None),
    (b'{"model":"a"', INVALID, None),
    (b'{"model":"a"} x', INVALID, None),
    (b'{"model":"a",}', INVALID, None),
    (b'{"model" "a"}', INVALID, None),
    (b'{"model":}', INVALID, None),
    (b'{model:"a"}', INVALID, None),
    ('{"model":"a"}'.encode("utf-16"), UNREADABLE, None),
    ('{"model":"a"}'.encode("utf-16-le"), UNREADABLE, None),
    ('{"model":"a"}'.encode("utf-16-be"), UNREADABLE, None),
    ('{"model":"a"}'.encode("utf-32"), UNREADABLE, None),
    ('{"model":"a"}'.encode("utf-32-le"), UNREADABLE, None),
    (b'{"model":"' + b"x" * MAX_MODEL_VALUE_BYTES + b'"}', UNREADABLE, None),
    (b'{"model":"a","x":' + b"[" * 1001 + b"]" * 1001 + b"}", UNREADABLE, None),
]


def scan_in_pieces(pieces: list[bytes]):
    scanner = ModelScanner()
    for piece in pieces:
        scanner.feed(piece)
    return scanner.finish()


@pytest.mark.parametrize(("body", "status", "value"), CORPUS)
def test_every_split_point_gives_the_same_answer(body, status, value):
    """Split anywhere (two pieces, and byte by byte), the scan finds the same span and value."""
    whole = scan_body(body)
    assert whole.status is status
    if status is FOUND:
        assert whole.value == value
        assert json.loads(body[whole.start : whole.end]) == value
        if isinstance(json.loads(body), dict):
            assert json.loads(body)["model"] == value
    if len(body) > 4096:  # the long ones: a few split points are enough
        points = [1, 2, 3, 9, 10, len(body) // 2, len(body) - 2, len(body) - 1]
    else:
        points = list(range(len(body) + 1))
    for point in points:
        assert scan_in_pieces([body[:point], body[point:]]) == whole, point
    if len(body) <= 4096:
        assert scan_in_pieces([body[i : i + 1] for i in range(len(body))]) == whole


@pytest.mark.parametrize(("body", "status", "value"), CORPUS)
@pytest.mark.parametrize("steps", [1, 2, 5])
def test_scanning_in_bounded_steps_gives_the_same_answer(body, status, value, steps):
    """Queued pieces scanned a few steps at a time (stopping anywhere inside a piece)
    give the answer of one whole scan."""
    whole = scan_body(body)
    scanner = ModelScanner()
    first = min(7, len(body))
    middle = max(first, len(body) // 2)
    for piece in (body[:first], body[first:middle], body[middle:]):
        scanner.add(piece)
        scanner.advance(steps)
    calls = 0
    while not scanner.advance(steps):
        calls += 1
        assert calls <= len(body) + 1, "no progress"
    assert not scanner.pending
    assert scanner.finish() == whole


def test_one_advance_of_bracket_dense_json_does_a_bounded_part_of_it():
    """``[[]],[[]],...`` costs a step per outer bracket: one call scans a few bytes
    per step, not the whole piece, and the piece queued is not copied."""
    body = b'{"model":"a","messages":[' + b"[[]]," * 200_000 + b'{}],"x":1}'
    scanner = ModelScanner()
    scanner.add(body)
    assert not scanner.advance(1000)
    assert scanner._queue[0][0] is body
    assert scanner._queue[0][1] < 1000 * 5
    while not scanner.advance(1000):
        pass
    result = scanner.finish()
    assert (result.status, result.value) == (FOUND, "a")


def test_innermost_pairs_are_crossed_in_one_step():
    """``[{},{},...]`` and ``[[1,2],[3,4],...]`` leave the depth as it was: a few
    steps per window cross a megabyte of them."""
    for pattern in (b"{},", b"[1,2],", b"[ ],{\n},"):
        body = b'{"messages":[' + pattern * 200_000 + b'{}],"model":"a"}'
        scanner = ModelScanner()
        scanner.add(body)
        assert scanner.advance(100), pattern  # about one step per 64 KB window
        result = scanner.finish()
        assert (result.status, result.value, json.loads(body)["model"]) == (FOUND, "a", "a")


def test_utf16_and_utf32_bodies_are_json_to_python_but_unreadable_to_relay():
    """The encodings json.loads auto-detects beyond UTF-8 are flagged, not read as no model."""
    for encoding in ("utf-16", "utf-16-le", "utf-16-be", "utf-32", "utf-32-le", "utf-32-be"):
        body = '{"model":"a"}'.encode(encoding)
        assert json.loads(body)["model"] == "a"
        assert scan_body(body).status is UNREADABLE, encoding


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=6), children, max_size=4)
    ),
    max_leaves=16,
)
key_spellings = st.sampled_from(
    ['"model"', '"mod\\u0065l"', '"\\u006dodel"', '"model "', '"Model"', '"x"', '"models"']
)


@settings(max_examples=400, deadline=None)
@given(
    members=st.lists(st.tuples(key_spellings | st.text(max_size=8).map(json.dumps), json_values)),
    ensure_ascii=st.booleans(),
    spacing=st.sampled_from(["", " ", "\n\t", "\r\n  "]),
    bom=st.booleans(),
    cut=st.integers(min_value=0),
)
def test_scanner_agrees_with_json_loads(members, ensure_ascii, spacing, bom, cut):
    """For every body json.loads reads as an object, the scanner finds json.loads's model."""
    s = spacing
    inner = f"{s},{s}".join(
        f"{key}{s}:{s}{json.dumps(value, ensure_ascii=ensure_ascii)}" for key, value in members
    )
    body = f"{s}{{{s}{inner}{s}}}{s}".encode()
    if bom:
        body = codecs.BOM_UTF8 + body
    document = json.loads(body)
    cut %= len(body) + 1
    scan = scan_in_pieces([body[:cut], body[cut:]])
    if "model" in document:
        assert scan.status is FOUND
        assert json.dumps(scan.value) == json.dumps(document["model"])
        assert json.loads(body[scan.start : scan.end]) == scan.value
    else:
        assert scan.status is ABSENT


@settings(max_examples=200, deadline=None)
@given(body=st.binary(max_size=40))
def test_scanner_never_claims_a_model_json_loads_would_not_read(body):
    """Random bytes: a FOUND scan is only ever what json.loads reads too."""
    scan = scan_body(body)
    if scan.status is FOUND:
        document = json.loads(body)
        assert json.dumps(document["model"]) == json.dumps(scan.value)


def test_rewrite_replaces_only_the_span_across_pieces():
    """The rewrite splices the held pieces; the untouched ones are the same objects."""
    pieces = [b'{"messages":[1,2],', b'"mo', b'del":"gp', b't-4o"', b',"x":1}']
    scan = scan_in_pieces(pieces)
    result = rewrite_pieces(pieces, scan, ModelMap({"gpt-4o": "GLM"}))
    assert result.body == b'{"messages":[1,2],"model":"GLM","x":1}'
    assert result.pieces[0] is pieces[0] and result.pieces[-1] is pieces[-1]
    assert result.length == len(result.body)
    assert (result.requested, result.forwarded) == ("gpt-4o", "GLM")
    unchanged = rewrite_pieces(pieces, scan, ModelMap({"other": "GLM"}))
    assert unchanged.pieces is pieces and not unchanged.changed


def test_inspect_budget_is_shared_and_given_back():
    """Holds draw on one budget; a hold over the limit takes nothing; release is idempotent."""
    budget = InspectBudget(100)
    first, second = budget.hold(), budget.hold()
    assert first.add(60) and not second.add(50) and second.add(40)
    assert budget.held == 100 and second.size == 40
    first.release()
    first.release()
    assert budget.held == 40
    second.release()
    assert budget.held == 0
