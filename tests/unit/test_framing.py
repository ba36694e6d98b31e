"""Sans-IO body framers: the same answer at every split point of every input."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relay.http.framing import (
    LAST_CHUNK,
    ChunkedFramer,
    CloseFramer,
    FramingError,
    IncompleteBody,
    LengthFramer,
    encode_chunk,
)


def sse(text: str) -> bytes:
    return encode_chunk(b"data: " + text.encode() + b"\n\n")


# (body bytes, expected payload); each body is followed by NEXT in the tests.
VALID = [
    (sse("a") + sse("bb") + LAST_CHUNK, b"data: a\n\ndata: bb\n\n"),
    (b'5;ext=1;q="a b"\r\nhello\r\n0\r\n\r\n', b"hello"),
    (b"0005 \t;x\r\nhello\r\n0;end\r\n\r\n", b"hello"),
    (b"A\r\n0123456789\r\n0\r\nx-trailer: 1\r\nother:two\r\n\r\n", b"0123456789"),
    (b"a\r\n0123456789\r\n1\r\n\n\r\n0\r\n\r\n", b"0123456789\n"),
    (LAST_CHUNK, b""),
    # The fast path's canonical sizes, then what only the state machine takes.
    (
        b"fff\r\n" + b"x" * 4095 + b"\r\n1000\r\n" + b"y" * 4096 + b"\r\n0\r\n\r\n",
        b"x" * 4095 + b"y" * 4096,
    ),
    (sse("a") + b"01\r\nz\r\n" + sse("b") + b"0\r\n\r\n", b"data: a\n\nz" + b"data: b\n\n"),
]
NEXT = b"HTTP/1.1 200 OK\r\n"

INVALID = [
    b"zz\r\n",
    b"5\r\nhelloXY",
    b"5\nhello\r\n",
    b"5\r\nhello\n0\r\n\r\n",
    b"0\r\nx-trailer: 1\n\r\n",
    b"1" * 17 + b"\r\n",
    b"8000000000000000\r\n",
    b"5;\x00\r\nhello\r\n",
    b"5;\x7f\r\n",
    b"0\r\n folded: x\r\n\r\n",
    b"0\r\nno colon\r\n\r\n",
    b"-5\r\n",
    b"+5\r\n",
    b"5_0\r\n",
    b"\r\n",
    b"5" + b" " * 5000 + b"\r\n",
    b"0x5\r\nhello\r\n",
    b"0X5\r\nhello\r\n",
    sse("a") + b"5\r\nhelloXY",
    sse("a") + b"5\r\nhello\r\r",
    sse("a") + b"5\r\nhello\n\r\n",
    sse("a") + b"\r\n",
]


def feed_pieces(framer, pieces):
    """Feed pieces; return the consumed prefix and the payload (dechunked or raw)."""
    consumed = b""
    payload = b""
    for piece in pieces:
        if framer.complete:
            break
        taken = framer.feed(piece)
        assert 0 <= taken <= len(piece)
        consumed += piece[:taken]
        if getattr(framer, "payload", None) is not None:
            payload += b"".join(framer.payload)
            framer.payload.clear()
        if taken < len(piece):
            assert framer.complete
            break
    return consumed, payload


def splits(data: bytes):
    yield [data]
    for i in range(len(data) + 1):
        yield [data[:i], data[i:]]
    yield [data[i : i + 1] for i in range(len(data))]
    if len(data) <= 60:
        for i in range(len(data) + 1):
            for j in range(i, len(data) + 1):
                yield [data[:i], data[i:j], data[j:]]


@pytest.mark.parametrize(("body", "payload"), VALID)
@pytest.mark.parametrize("dechunk", [False, True])
def test_valid_chunked_bodies_end_exactly_at_every_split(body, payload, dechunk):
    """Consumed bytes are exactly the body; the next message's bytes are left alone."""
    for pieces in splits(body + NEXT):
        framer = ChunkedFramer(dechunk=dechunk)
        consumed, got = feed_pieces(framer, [p for p in pieces if p])
        assert framer.complete, pieces
        assert consumed == body, pieces
        if dechunk:
            assert got == payload


@pytest.mark.parametrize("bad", INVALID)
def test_invalid_chunk_framing_raises_at_every_split_and_never_completes(bad):
    """Malformed framing raises FramingError however it is split, never reporting complete."""
    for pieces in splits(bad):
        framer = ChunkedFramer(max_trailer_bytes=1024)
        with pytest.raises(FramingError):
            feed_pieces(framer, [p for p in pieces if p])
            framer.feed_eof()
        assert not framer.complete


def test_garbage_is_refused_before_its_line_ends():
    """An invalid size line fails on its first bad byte, not when a LF finally arrives."""
    framer = ChunkedFramer()
    with pytest.raises(FramingError):
        framer.feed(b"zz")
    framer = ChunkedFramer()
    framer.feed(b"1f;a=")
    with pytest.raises(FramingError):
        framer.feed(b"\x01")


def test_a_huge_trailer_section_is_refused():
    """The trailer section is bounded."""
    framer = ChunkedFramer(max_trailer_bytes=100)
    with pytest.raises(FramingError):
        framer.feed(b"0\r\n" + b"x-a: " + b"b" * 200 + b"\r\n\r\n")


@pytest.mark.parametrize(("body", "payload"), VALID)
def test_truncation_at_every_offset_is_incomplete(body, payload):
    """EOF anywhere before the last byte of the body raises IncompleteBody."""
    for cut in range(len(body)):
        framer = ChunkedFramer()
        framer.feed(body[:cut])
        assert not framer.complete
        with pytest.raises(IncompleteBody):
            framer.feed_eof()


def test_length_framer_splits_and_truncation():
    """A Content-Length body ends at its length at every split; short is incomplete."""
    body = b"x" * 10
    for pieces in splits(body + NEXT):
        framer = LengthFramer(10)
        consumed, _ = feed_pieces(framer, [p for p in pieces if p])
        assert consumed == body and framer.complete
    framer = LengthFramer(10)
    framer.feed(b"x" * 9)
    with pytest.raises(IncompleteBody):
        framer.feed_eof()
    assert LengthFramer(0).complete
    with pytest.raises(ValueError):
        LengthFramer(-1)


def test_close_framer_takes_everything_and_ends_at_eof():
    """A close-delimited body is every byte until EOF, and is never reusable."""
    framer = CloseFramer()
    assert framer.feed(b"abc") == 3 and not framer.complete
    framer.feed_eof()
    assert framer.complete and not framer.reusable


@settings(max_examples=300, deadline=None)
@given(
    chunks=st.lists(st.binary(min_size=1, max_size=40), max_size=8),
    extensions=st.lists(
        st.sampled_from([b"", b";a", b";a=b", b' ;q="x y"']), min_size=9, max_size=9
    ),
    trailers=st.lists(st.sampled_from([b"x-a: 1\r\n", b"x-b:\r\n", b"t: v v\r\n"]), max_size=3),
    cuts=st.lists(st.integers(min_value=0, max_value=400), max_size=6),
    leading_zeros=st.booleans(),
    lower=st.booleans(),
)
def test_generated_streams_round_trip(chunks, extensions, trailers, cuts, leading_zeros, lower):
    """Random chunks, extensions, trailers and read boundaries: payload and length round-trip."""
    encoded = b""
    for chunk, ext in zip(chunks, extensions, strict=False):
        size = (b"00" if leading_zeros else b"") + (b"%x" if lower else b"%X") % len(chunk)
        encoded += size + ext + b"\r\n" + chunk + b"\r\n"
    encoded += b"0" + extensions[-1] + b"\r\n" + b"".join(trailers) + b"\r\n"
    data = encoded + NEXT
    points = sorted({min(c, len(data)) for c in cuts})
    pieces = [data[a:b] for a, b in zip([0, *points], [*points, len(data)], strict=True)]
    framer = ChunkedFramer(dechunk=True)
    consumed, payload = feed_pieces(framer, [p for p in pieces if p])
    assert framer.complete
    assert consumed == encoded
    assert payload == b"".join(chunks)
    plain = ChunkedFramer()
    assert plain.feed(data) == len(encoded)


# Size lines the fast path takes, and neighbours it must leave to the state machine.
_SIZE_PIECES = [
    b"1\r\na\r\n",
    b"fff\r\n" + b"x" * 0xFFF + b"\r\n",
    b"1000\r\n" + b"y" * 0x1000 + b"\r\n",
    b"FFF\r\n" + b"x" * 0xFFF + b"\r\n",
    b"01\r\nz\r\n",
    b"a;e=1\r\n0123456789\r\n",
    b"a \r\n0123456789\r\n",
    b"3\r\n\r\n\r\n\r\n",
    b"5\r\nhello\r\r",
    b"5\r\nhello\n\r\n",
    b"5\r\nhelloXY",
    b"5\n hello\r\n",
    b"0x5\r\nhello\r\n",
    b"-1\r\n",
    b"\r\n",
    b"ffffffffffffffff\r\n",
]
_ENDS = [b"", LAST_CHUNK + NEXT, b"0\r\nt: v\r\n\r\n" + NEXT, b"0\r\n\r"]


def _outcome(data: bytes, cuts: list[int], *, fast: bool) -> tuple:
    framer = ChunkedFramer()
    bounds = [0, *cuts, len(data)]
    taken = []
    try:
        for start, stop in itertools.pairwise(bounds):
            if not fast:
                framer._fast = False  # the state machine alone judges this read
            taken.append(framer.feed(data[start:stop]))
            if framer.complete:
                break
    except FramingError as exc:
        return ("rejected", taken, type(exc))
    return ("accepted", taken, framer.complete)


@settings(max_examples=300, deadline=None)
@given(
    pieces=st.lists(st.sampled_from(_SIZE_PIECES), min_size=1, max_size=4),
    end=st.sampled_from(_ENDS),
    cuts=st.lists(st.integers(min_value=0, max_value=9000), max_size=3),
)
def test_the_fast_path_takes_and_refuses_what_the_state_machine_does(pieces, end, cuts):
    """Canonical size lines, their upper-case, zero-led, extended, big and broken
    neighbours, cut into reads anywhere: the fast path consumes the same bytes and
    accepts or rejects exactly as the strict state machine does."""
    data = b"".join(pieces) + end
    cuts = sorted({min(cut, len(data)) for cut in cuts})
    assert _outcome(data, cuts, fast=True) == _outcome(data, cuts, fast=False)


@pytest.mark.parametrize("piece", _SIZE_PIECES)
def test_every_single_split_of_a_size_piece_is_judged_as_the_state_machine_does(piece):
    """A size piece followed by the last chunk, split in two at every offset: the
    fast path and the state machine agree on every byte and every verdict."""
    data = piece + LAST_CHUNK + NEXT
    for cut in range(len(data) + 1):
        assert _outcome(data, [cut], fast=True) == _outcome(data, [cut], fast=False), cut
