"""Sans-IO SSE parsing and token statistics: every split point gives the same events."""

from __future__ import annotations

import json

import pytest

from relay.http.sse import SSEParser, StreamStats, tokens_in_event

STREAMS = [
    b'data: {"a":1}\n\ndata: {"b":2}\n\n',
    b'data: {"a":1}\r\n\r\ndata:{"b":2}\r\n\r\n',
    b": comment\ndata: one\ndata: two\n\nevent: x\ndata: three\n\n",
    b"data: cr\r\rdata: [DONE]\n\n",
]
EXPECTED = [
    ['{"a":1}', '{"b":2}'],
    ['{"a":1}', '{"b":2}'],
    ["one\ntwo", "three"],
    ["cr", "[DONE]"],
]


def feed_split(data: bytes, cuts: list[int]) -> list[str]:
    parser = SSEParser()
    events: list[str] = []
    last = 0
    for cut in [*cuts, len(data)]:
        events += parser.feed(data[last:cut])
        last = cut
    return events


@pytest.mark.parametrize(("stream", "expected"), list(zip(STREAMS, EXPECTED, strict=True)))
def test_every_split_point_gives_the_same_events(stream, expected):
    """Events do not depend on how the bytes were split into reads."""
    assert feed_split(stream, []) == expected
    for i in range(len(stream) + 1):
        assert feed_split(stream, [i]) == expected, i
    for i in range(len(stream) + 1):
        for j in range(i, len(stream) + 1, 3):
            assert feed_split(stream, [i, j]) == expected, (i, j)


def test_an_oversized_event_is_an_error_not_a_growing_buffer():
    """A stream that never ends its event cannot make the parser buffer without bound."""
    parser = SSEParser(max_event_bytes=100)
    with pytest.raises(ValueError):
        for _ in range(10):
            parser.feed(b"data: " + b"x" * 50 + b"\n")


def chunk(**delta) -> str:
    return json.dumps({"choices": [{"index": 0, "delta": delta}]})


def test_tokens_are_counted_from_content_reasoning_and_text():
    """content and reasoning_content deltas and completion text are tokens; role-only is not."""
    assert tokens_in_event(chunk(content="hi")).tokens == 1
    assert tokens_in_event(chunk(reasoning_content="hmm")).tokens == 1
    assert tokens_in_event(chunk(role="assistant")).tokens == 0
    assert tokens_in_event(json.dumps({"choices": [{"text": "x"}]})).tokens == 1
    assert tokens_in_event("[DONE]").done
    assert tokens_in_event(json.dumps({"error": {"message": "boom"}})).error == "boom"
    assert tokens_in_event("not json").tokens == 0


def test_stats_and_verdicts():
    """Gaps, coalesced tokens and the verdict follow from the arrival times."""
    paced = StreamStats(started=0.0, arrivals=[0.25, 0.274, 0.298, 0.322])
    assert paced.ttft == pytest.approx(0.25)
    assert paced.coalesced == 0
    assert paced.verdict == "streaming"
    summary = paced.gap_summary()
    assert summary is not None and summary["avg"] == pytest.approx(0.024)
    burst = StreamStats(started=0.0, arrivals=[1.74] * 49)
    assert burst.coalesced == 48
    assert burst.verdict == "BUFFERED"
    half = StreamStats(started=0.0, arrivals=[0.1, 0.1, 0.2, 0.3])
    assert half.verdict == "streaming"  # one pair together out of three gaps
