"""Sans-IO Content-Encoding removal for the probe: any split, bounded pieces, clear errors."""

from __future__ import annotations

import gzip
import zlib

import pytest

from relay.http.sse import DECODED_CHUNK, ContentDecoder, ContentDecodingError

EVENTS = [b'data: {"choices":[{"delta":{"content":"%d"}}]}\n\n' % i for i in range(20)]
PLAIN = b"".join(EVENTS)


def deflate(data: bytes, wbits: int = zlib.MAX_WBITS) -> bytes:
    compressor = zlib.compressobj(wbits=wbits)
    return compressor.compress(data) + compressor.flush()


ENCODED = {
    "gzip": gzip.compress(PLAIN),
    "x-gzip": gzip.compress(PLAIN),
    "deflate": deflate(PLAIN),
    "identity": PLAIN,
    "": PLAIN,
    "GZIP": gzip.compress(PLAIN),
    # Applied in order: gzip first, then deflate; undone in reverse.
    "gzip, deflate": deflate(gzip.compress(PLAIN)),
}


def decode(coding: str, data: bytes, cuts: list[int]) -> bytes:
    decoder = ContentDecoder(coding)
    out = b""
    last = 0
    for cut in [*cuts, len(data)]:
        out += b"".join(decoder.feed(data[last:cut]))
        last = cut
    decoder.finish()
    return out


@pytest.mark.parametrize("coding", list(ENCODED))
def test_every_split_point_decodes_to_the_same_bytes(coding):
    """gzip, x-gzip, deflate, identity and stacked codings decode whatever the read sizes."""
    data = ENCODED[coding]
    for i in range(len(data) + 1):
        assert decode(coding, data, [i]) == PLAIN, i
    assert decode(coding, data, list(range(1, len(data)))) == PLAIN


def test_raw_deflate_without_the_zlib_wrapper_is_accepted():
    """Some servers send raw deflate for `deflate`; it decodes like httpx decodes it."""
    data = deflate(PLAIN, -zlib.MAX_WBITS)
    for i in range(len(data) + 1):
        assert decode("deflate", data, [i]) == PLAIN, i


def test_concatenated_gzip_members_all_decode():
    """A gzip body of several members (one per flush by some servers) decodes whole."""
    data = gzip.compress(PLAIN[:100]) + gzip.compress(PLAIN[100:])
    for i in range(0, len(data) + 1, 7):
        assert decode("gzip", data, [i]) == PLAIN, i


def test_each_sync_flushed_event_is_readable_as_soon_as_its_bytes_arrive():
    """A streaming compressor's output decodes event by event: no waiting for later bytes."""
    compressor = zlib.compressobj(wbits=16 + zlib.MAX_WBITS)
    decoder = ContentDecoder("gzip")
    for event in EVENTS:
        sent = compressor.compress(event) + compressor.flush(zlib.Z_SYNC_FLUSH)
        assert b"".join(decoder.feed(sent)) == event
    assert b"".join(decoder.feed(compressor.flush())) == b""
    decoder.finish()


def test_a_small_body_cannot_become_one_huge_buffer():
    """8 MiB of zeros compressed to a few KiB come out in pieces of at most 64 KiB."""
    size = 8 * 1024 * 1024
    pieces = list(ContentDecoder("gzip").feed(gzip.compress(bytes(size))))
    assert max(len(p) for p in pieces) <= DECODED_CHUNK
    assert sum(len(p) for p in pieces) == size


@pytest.mark.parametrize(
    ("coding", "data", "message"),
    [
        ("br", b"", "unsupported content-encoding 'br'"),
        ("gzip, zstd", b"", "unsupported content-encoding 'zstd'"),
        ("gzip", b"not gzip at all", "invalid gzip data"),
        ("deflate", b"\x78\x9c\xff\xff\xff\xff", "invalid deflate data"),
        ("gzip", gzip.compress(PLAIN)[:-6], "gzip data cut short"),
        ("deflate", b"\x78", "deflate data cut short"),
    ],
)
def test_unknown_codings_and_bad_or_cut_data_are_clear_errors(coding, data, message):
    """br/zstd, corrupt data and a compressed stream cut short raise ContentDecodingError."""
    with pytest.raises(ContentDecodingError, match=message):
        decode(coding, data, [])


def test_the_coding_is_named_for_a_person():
    """The report says which coding the body had: identity when none."""
    assert ContentDecoder("").name == "identity"
    assert ContentDecoder("Identity").name == "identity"
    assert ContentDecoder("gzip").name == "gzip"
    assert ContentDecoder("gzip,deflate").name == "gzip, deflate"
