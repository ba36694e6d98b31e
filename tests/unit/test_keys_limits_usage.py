"""Named keys, per-key limits, the fair queue and usage reading, without sockets."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relay.config import Config
from relay.core.admission import Admission, Ticket
from relay.core.metrics import Metrics
from relay.http.auth import (
    KeyFileError,
    KeyRing,
    NamedKey,
    key_name,
    parse_key_file,
    parse_key_list,
    parse_named_keys,
)
from relay.http.limits import Budget, FairQueue, KeyLimits
from relay.http.usage import (
    MIN_EVENT_READ_BYTES,
    TAIL_READS,
    StreamTail,
    _carries_text,
    _count_text_events,
    _data_lines,
    usage_from_json,
    usage_from_json_tail,
    usage_from_stream,
)

BOUND = Config.max_usage_bytes

SECRET = "sk-SECRET-abc123"


# -- key files ---------------------------------------------------------------
def test_a_json_object_names_keys_and_may_give_each_its_limits():
    """{"name": "key"} and {"name": {"key", "rpm", ...}} both name keys."""
    keys = parse_named_keys(
        json.dumps({"team-a": "sk-a", "team-b": {"key": "sk-b", "rpm": 60, "tpm": 1000}})
    )
    assert keys == [
        NamedKey("team-a", "sk-a"),
        NamedKey("team-b", "sk-b", KeyLimits(rpm=60, tpm=1000)),
    ]


def test_name_key_lines_and_plain_lines_mix():
    """`name key [limits]` lines name a key; a line with the key alone still works."""
    text = "# teams\nteam-a sk-a concurrent=2 rpm=10\n\n  sk-plain  \nteam-b sk-b\n"
    keys = parse_named_keys(text)
    assert [(k.name, k.key, k.limits) for k in keys] == [
        ("team-a", "sk-a", KeyLimits(concurrent=2, rpm=10)),
        (key_name("sk-plain"), "sk-plain", KeyLimits()),
        ("team-b", "sk-b", KeyLimits()),
    ]
    assert parse_key_file(text) == ["sk-a", "sk-plain", "sk-b"]


def test_a_key_without_a_name_is_shown_by_a_digest_never_by_itself():
    """The generated name is stable and holds no part of the key."""
    name = key_name(SECRET)
    assert name == key_name(SECRET) and name.startswith("key-") and len(name) == 12
    assert SECRET not in name and "abc123" not in name


@pytest.mark.parametrize(
    "text",
    [
        "team-a sk-1\nteam-a sk-2\n",
        '{"team-a": "sk-1", "team-b": "sk-1"}',
        "team-a " + SECRET + " rpm=ten\n",
        "team-a " + SECRET + " burst=3\n",
        "bad/name " + SECRET + "\n",
        "team-a " + SECRET + " " + SECRET + "2\n",  # two keys on one line
        "team-a " + SECRET + " " + SECRET + "=3\n",
        '{"team-a": 3}',
        '{"team-a": {"key": "' + SECRET + '", "rpm": -1}}',
        '{"team-a": {"key": "' + SECRET + '", "color": 1}}',
        '["' + SECRET + '"]',
        '{"team-a": "' + SECRET,
    ],
)
def test_a_bad_key_file_is_one_line_that_never_quotes_a_key(text):
    """Duplicate names or keys, bad limits, bad names, bad JSON: one line, no secret."""
    with pytest.raises(KeyFileError) as caught:
        parse_named_keys(text)
    message = str(caught.value)
    assert "\n" not in message and SECRET not in message and "sk-1" not in message


def test_relay_api_keys_takes_a_json_object_too():
    """RELAY_API_KEYS='{"team-a": "sk-a"}' names its key; plain lists are unchanged."""
    assert parse_key_list('{"team-a": "sk-a"}') == [NamedKey("team-a", "sk-a")]
    assert parse_key_list("a, b") == ["a", "b"]


def test_the_key_ring_says_which_key_matched():
    """match() returns the name of the key presented, by Bearer or x-api-key."""
    ring = KeyRing([NamedKey("team-a", "sk-a"), "sk-plain"])
    assert ring.match([(b"authorization", b"Bearer sk-a")]) == "team-a"
    assert ring.match([(b"x-api-key", b"sk-plain")]) == key_name("sk-plain")
    assert ring.match([(b"authorization", b"Bearer sk-nope")]) is None
    assert ring.allows([(b"x-api-key", b"sk-a")])


@pytest.mark.parametrize(
    ("content", "env", "where"),
    [
        ("team-a sk-1\nteam-a sk-2\n", None, "argument --api-key-file"),
        ('{"team-a": ', None, "argument --api-key-file"),
        (None, '{"team-a": 5}', "argument RELAY_API_KEYS"),
    ],
)
def test_a_bad_key_file_stops_startup_with_one_line_naming_the_flag(tmp_path, content, env, where):
    """relay exits 2 with `relay: error: <flag or variable>: ...` and no traceback."""
    argv = [sys.executable, "-m", "relay", "--upstream", "127.0.0.1:9", "--listen", "127.0.0.1:0"]
    environ = {"PATH": "/usr/bin:/bin"}
    if content is not None:
        path = tmp_path / "keys"
        path.write_text(content)
        argv += ["--api-key-file", str(path)]
    if env is not None:
        environ["RELAY_API_KEYS"] = env
    done = subprocess.run(argv, capture_output=True, text=True, timeout=30, env=environ)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"relay: error: {where}"), done.stderr
    assert "sk-1" not in done.stderr


# -- limits ------------------------------------------------------------------
def test_concurrency_is_refused_at_the_limit_and_released_at_the_end():
    budget = Budget(KeyLimits(concurrent=2), now=0.0)
    assert budget.admit(0.0) is None and budget.admit(0.0) is None
    refusal = budget.admit(0.0)
    assert refusal is not None and refusal.limit == "concurrent" and refusal.retry_after == 1
    budget.release(0, 0.0)
    assert budget.admit(0.0) is None


def test_requests_per_minute_refill_evenly_and_say_when_to_retry():
    """rpm=2: two at once, the third waits 30 s (one request every 30 s)."""
    budget = Budget(KeyLimits(rpm=2), now=100.0)
    assert budget.admit(100.0) is None
    budget.release(0, 100.0)
    assert budget.admit(100.0) is None
    budget.release(0, 100.0)
    refusal = budget.admit(100.0)
    assert refusal is not None and refusal.limit == "rpm" and refusal.retry_after == 30
    assert budget.admit(129.0) is not None
    assert budget.admit(130.0) is None


def test_tokens_per_minute_are_debited_at_the_end_and_may_go_below_zero():
    """tpm=600 (10/s): a request using 700 leaves -100; the bucket is at zero after
    10 s and above it (a request may go) after 11, the Retry-After given."""
    budget = Budget(KeyLimits(tpm=600), now=0.0)
    assert budget.admit(0.0) is None
    budget.release(700, 0.0)
    refusal = budget.admit(0.0)
    assert refusal is not None and refusal.limit == "tpm" and refusal.retry_after == 11
    assert budget.check(10.0) is not None
    assert budget.admit(11.0) is None


def test_a_request_refused_after_admission_gives_its_request_back_never_above_the_limit():
    """rpm=2: a request admitted locally and then refused (by the shared store) leaves
    the bucket as it was; giving back never fills it past its limit."""
    budget = Budget(KeyLimits(rpm=2), now=0.0)
    assert budget.admit(0.0) is None
    budget.refused(0.0)
    budget.release(0, 0.0)
    assert budget.admit(0.0) is None and budget.admit(0.0) is None
    assert budget.admit(0.0) is not None  # two, not one, were left
    budget.refused(60.0)  # full again by then: stays at two
    assert budget.admit(60.0) is None and budget.admit(60.0) is None
    assert budget.admit(60.0) is not None


def test_key_limits_fall_back_to_the_defaults_and_zero_means_none():
    defaults = KeyLimits(concurrent=4, rpm=60, tpm=0)
    assert KeyLimits(rpm=0).over(defaults) == KeyLimits(concurrent=4, rpm=0, tpm=0)
    assert KeyLimits().over(defaults) == defaults


def test_an_idle_budget_can_be_forgotten():
    budget = Budget(KeyLimits(rpm=60), now=0.0)
    budget.admit(0.0)
    assert not budget.idle(0.0)
    budget.release(0, 0.0)
    assert not budget.idle(0.5) and budget.idle(1.0)


def test_the_queue_serves_keys_in_turn_not_in_arrival_order():
    """A greedy key's backlog delays another key's request by one slot at most."""
    queue: FairQueue[str] = FairQueue(limit=10)
    for i in range(4):
        assert queue.push("greedy", f"g{i}")
    assert queue.push("polite", "p0")
    assert [queue.pop() for _ in range(5)] == ["g0", "p0", "g1", "g2", "g3"]
    assert queue.pop() is None and len(queue) == 0


def test_the_queue_is_bounded_and_a_waiter_can_leave():
    queue: FairQueue[str] = FairQueue(limit=2)
    assert queue.push("a", "a0") and queue.push("b", "b0")
    assert not queue.push("a", "a1")
    assert queue.remove("a", "a0") and not queue.remove("a", "a0")
    assert len(queue) == 1 and queue.lengths() == {"b": 1}
    assert queue.pop() == "b0"


# -- usage -------------------------------------------------------------------
def sse(document: object) -> bytes:
    return b"data: " + json.dumps(document).encode() + b"\n\n"


def chunk(payload: bytes) -> bytes:
    return b"%x\r\n%b\r\n" % (len(payload), payload)


USAGE = {"prompt_tokens": 12, "completion_tokens": 34, "total_tokens": 46}
TOKEN = {"model": "m", "choices": [{"index": 0, "delta": {"content": " tok"}}], "usage": None}
FINAL = {"model": "m", "choices": [], "usage": USAGE}


def stream_body(n: int, *, usage: bool, chunked: bool) -> list[bytes]:
    events = [sse(TOKEN) for _ in range(n)]
    if usage:
        events.append(sse(FINAL))
    events.append(b"data: [DONE]\n\n")
    if chunked:
        return [chunk(e) for e in events] + [b"0\r\n\r\n"]
    return events


@pytest.mark.parametrize("chunked", [True, False])
def test_a_streams_final_usage_event_is_read_from_its_last_reads(chunked):
    reads = stream_body(40, usage=True, chunked=chunked)
    total = sum(map(len, reads))
    usage = usage_from_stream(reads[-8:], total, max_bytes=BOUND)
    assert (usage.prompt, usage.completion, usage.source, usage.model) == (12, 34, "reported", "m")


def test_the_usage_is_found_whatever_way_the_tail_is_split_into_reads():
    """At every split point of the last bytes, the usage event is still read."""
    body = b"".join(stream_body(3, usage=True, chunked=True))
    for cut in range(1, len(body)):
        usage = usage_from_stream([body[:cut], body[cut:]], len(body), max_bytes=BOUND)
        assert usage.source == "reported" and usage.total == 46, cut


def test_a_stream_without_usage_gets_an_estimate_marked_as_such():
    """40 token events (+ [DONE]), of which only the last 8 reads were kept: about 40."""
    reads = stream_body(40, usage=False, chunked=True)
    usage = usage_from_stream(reads[-8:], sum(map(len, reads)), max_bytes=BOUND)
    assert usage.source == "estimated" and usage.prompt == 0
    assert 36 <= usage.completion <= 44


def test_sglang_generate_meta_info_counts_as_reported():
    event = sse({"text": "abc", "meta_info": {"prompt_tokens": 5, "completion_tokens": 3}})
    usage = usage_from_stream([event, b"data: [DONE]\n\n"], 100, max_bytes=BOUND)
    assert (usage.prompt, usage.completion, usage.source) == (5, 3, "reported")


@pytest.mark.parametrize("chunked", [True, False])
def test_a_json_body_is_read_whole_and_a_too_big_one_from_its_tail(chunked):
    body = json.dumps({"model": "m", "choices": [], "usage": USAGE}).encode()
    raw = chunk(body) + b"0\r\n\r\n" if chunked else body
    reads = [raw[:7], raw[7:]]
    assert usage_from_json(reads, chunked=chunked, max_bytes=BOUND).total == 46
    big = json.dumps({"pad": "x" * (2 * BOUND), "usage": USAGE}).encode()
    assert usage_from_json([big], chunked=False, max_bytes=BOUND).source == "none"
    pieces = [big[i : i + 65536] for i in range(0, len(big), 65536)]
    tail = usage_from_json_tail(pieces[-64:], max_bytes=BOUND)
    assert (tail.prompt, tail.completion, tail.source) == (12, 34, "reported")


def logprobs_stream(size: int, reads_of: int) -> list[bytes]:
    """An SGLang-style stream whose final event (usage with logprobs) is ``size`` bytes,
    cut into reads of ``reads_of`` bytes, as a socket delivers it."""
    final = dict(FINAL, logprobs="x" * size)
    body = b"".join([*(sse(TOKEN) for _ in range(20)), sse(final), b"data: [DONE]\n\n"])
    return [body[i : i + reads_of] for i in range(0, len(body), reads_of)]


def kept_by_a_ticket(
    reads: list[bytes], head: list[tuple[bytes, bytes]], max_usage_bytes: int = BOUND
) -> Ticket:
    ticket = Admission(Config(max_usage_bytes=max_usage_bytes), Metrics()).admit(None, "client")
    assert isinstance(ticket, Ticket)
    hooks = ticket.response_started(200, head)
    for read in reads:
        hooks.feed(read)
    return ticket


def kept_reads(ticket: Ticket) -> list[bytes]:
    """The reads a ticket holds references to, in order (before it settles)."""
    kept = ticket._reads
    assert kept is not None
    return kept.reads() if isinstance(kept, StreamTail) else list(kept)


SSE_HEAD = [(b"content-type", b"text/event-stream")]
CHUNKED_SSE_HEAD = [*SSE_HEAD, (b"transfer-encoding", b"chunked")]


@pytest.mark.parametrize("size", [100 * 1024, 1024 * 1024, 3 * 1024 * 1024])
def test_a_final_usage_event_far_bigger_than_64_kib_is_read(size):
    """A stream's final event of up to --max-usage-bytes is read from the reads kept,
    in reads as big as a socket delivers a big write in."""
    reads = logprobs_stream(size, 16 * 1024)
    ticket = kept_by_a_ticket(reads, SSE_HEAD)
    usage = ticket.settle(sum(map(len, reads)), None, None)
    assert (usage.prompt, usage.completion, usage.source) == (12, 34, "reported")


def test_a_usage_event_bigger_than_the_bound_is_charged_an_estimate_never_zero():
    reads = logprobs_stream(BOUND + 1024, 64 * 1024)
    ticket = kept_by_a_ticket(reads, SSE_HEAD)
    usage = ticket.settle(sum(map(len, reads)), None, None)
    assert usage.source == "estimated" and usage.completion > 0


@pytest.mark.parametrize("chunked", [True, False])
@pytest.mark.parametrize(("size", "reads_of"), [(1024 * 1024, 1024), (100 * 1024, 100)])
def test_a_final_usage_event_cut_into_many_small_reads_is_read_exactly(size, reads_of, chunked):
    """However many reads the final event came in (here thousands, far more than a
    stream keeps of whole events), it is kept from its start and read exactly."""
    reads = logprobs_stream(size, reads_of)
    head = SSE_HEAD
    if chunked:
        # One chunk for the whole body, cut where the socket cut it.
        body = chunk(b"".join(reads)) + b"0\r\n\r\n"
        reads = [body[i : i + reads_of] for i in range(0, len(body), reads_of)]
        head = CHUNKED_SSE_HEAD
    assert len(reads) > 16 * TAIL_READS
    ticket = kept_by_a_ticket(reads, head)
    usage = ticket.settle(sum(map(len, reads)), None, None)
    assert (usage.prompt, usage.completion, usage.source) == (12, 34, "reported")


@pytest.mark.parametrize("chunked", [True, False])
def test_a_stream_of_whole_events_keeps_references_to_its_last_few_reads_only(chunked):
    """A long stream whose reads each end an event holds at most TAIL_READS reads, the
    last ones; an event cut across reads early on is not held to the end."""
    events = [sse(dict(TOKEN, n=i)) for i in range(1000)]
    events[10:11] = [events[10][:7], events[10][7:30], events[10][30:]]  # one event, 3 reads
    reads = [chunk(e) for e in events] + [b"0\r\n\r\n"] if chunked else events
    ticket = kept_by_a_ticket(reads, CHUNKED_SSE_HEAD if chunked else SSE_HEAD)
    kept = ticket._reads
    assert kept is not None and kept.maxlen == TAIL_READS
    held = kept_reads(ticket)
    assert len(held) <= TAIL_READS
    assert all(a is b for a, b in zip(held, reads[-len(held) :], strict=True))


@pytest.mark.parametrize("reads_of", [64 * 1024, 32 * 1024])
def test_a_usage_event_over_the_bound_is_estimated_and_holds_no_more_than_the_bound(reads_of):
    """An event twice the bound, in reads of any size: charged an estimate, never 0,
    marked as one; what the stream held for it never much exceeded the bound."""
    reads = logprobs_stream(2 * BOUND, reads_of)
    ticket = kept_by_a_ticket(reads, SSE_HEAD)
    held = sum(map(len, kept_reads(ticket)))
    assert held <= BOUND + TAIL_READS * reads_of
    usage = ticket.settle(sum(map(len, reads)), None, None)
    assert usage.source == "estimated" and usage.prompt == 0 and usage.completion > 0


def test_an_event_trickled_in_tiny_reads_is_held_up_to_a_count_of_reads_no_more():
    """Reads of a few bytes each: the stream keeps up to --max-usage-bytes / 64 of
    them, so their references never cost many times the bound."""
    bound = 64 * 1024
    reads = logprobs_stream(4 * bound, 16)
    ticket = kept_by_a_ticket(reads, SSE_HEAD, max_usage_bytes=bound)
    held = kept_reads(ticket)
    limit = bound // MIN_EVENT_READ_BYTES
    assert limit <= len(held) <= limit + TAIL_READS
    assert held[-1] is reads[-1]
    usage = ticket.settle(sum(map(len, reads)), None, None)
    assert usage.source == "estimated" and usage.completion > 0


@pytest.mark.parametrize("length", [True, False], ids=["content-length", "chunked"])
def test_a_json_body_bigger_than_the_bound_is_charged_from_its_tail(length):
    body = json.dumps({"model": "m", "choices": [{"logprobs": "x" * (2 * BOUND)}], "usage": USAGE})
    raw = body.encode()
    if length:
        head = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(raw))]
    else:
        head = [(b"content-type", b"application/json"), (b"transfer-encoding", b"chunked")]
    reads = [raw[i : i + 65536] for i in range(0, len(raw), 65536)]
    if not length:
        reads = [chunk(r) for r in reads] + [b"0\r\n\r\n"]
    ticket = kept_by_a_ticket(reads, head)
    usage = ticket.settle(sum(map(len, reads)), None, None)
    assert (usage.prompt, usage.completion, usage.source) == (12, 34, "reported")


def test_a_json_body_whose_usage_cannot_be_read_is_charged_an_estimate_never_zero():
    raw = b"\x1f\x8b" + bytes(range(256)) * 8  # compressed (gzip)
    head = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(raw))]
    usage = kept_by_a_ticket([raw], head).settle(len(raw), None, None)
    assert usage.source == "estimated" and usage.completion >= 1


def chat_stream_like_sglang(tokens: int) -> list[bytes]:
    """The role chunk (empty content), one chunk a token, the final chunk with
    ``finish_reason`` and an empty delta, [DONE]: what SGLang and OpenAI send."""

    def event(delta: dict[str, str], finish: str | None) -> bytes:
        choice = {"index": 0, "delta": delta, "finish_reason": finish}
        return sse({"id": "c", "object": "chat.completion.chunk", "choices": [choice]})

    events = [event({"role": "assistant", "content": ""}, None)]
    events += [event({"content": f" t{i}"}, None) for i in range(tokens)]
    events += [event({}, "stop"), b"data: [DONE]\n\n"]
    return events


@pytest.mark.parametrize("tokens", [1, 5, 7])
def test_an_estimate_counts_only_the_events_that_carry_text(tokens):
    """Neither the role chunk, the final chunk, a usage-less usage chunk nor [DONE]."""
    reads = chat_stream_like_sglang(tokens)
    usage = usage_from_stream(reads, sum(map(len, reads)), max_bytes=BOUND)
    assert (usage.completion, usage.source) == (tokens, "estimated")
    completions = [
        sse({"choices": [{"index": 0, "text": f" t{i}", "finish_reason": None}]})
        for i in range(tokens)
    ]
    completions.append(sse({"choices": [{"index": 0, "text": "", "finish_reason": "length"}]}))
    usage = usage_from_stream(completions, sum(map(len, completions)), max_bytes=BOUND)
    assert usage.completion == tokens


def test_labelled_counters_survive_a_workers_snapshot():
    """Three-label counters (tokens) round-trip through the JSON a worker sends its parent."""
    metrics = Metrics()
    metrics.tokens["team-a", "other", "prompt"] += 3
    metrics.requests["relay", 429] += 1
    back = Metrics.from_snapshot(json.loads(json.dumps(metrics.snapshot())))
    assert back.tokens == metrics.tokens and back.requests == metrics.requests
    text = back.render()
    assert 'relay_tokens_total{key="team-a",model="other",kind="prompt"} 3' in text


@pytest.mark.parametrize(
    ("line", "named"),
    [
        ("a sk-1 concurent=16", "line 1: unknown limit 'concurent' (did you mean concurrent?)"),
        ("team-a sk-1 rpm=60 tmp=5", "line 1: unknown limit 'tmp' (did you mean tpm?)"),
        ("team-a sk-1 rpm=ten", "line 1: rpm must be a whole number (0: no limit), got 'ten'"),
        ("team-a sk-1 sk-2", "line 1: word 3 is not a limit"),
        ("team-a sk-1 rpm=1 sk-2=x", "line 1: word 4 is not a limit"),
        ("sk/1+2 team-a", "line 1: the first word is not a key name"),
    ],
)
def test_a_key_file_error_names_the_bad_word(line, named):
    """The error says which word is wrong: the mistyped limit by name (with the one
    meant), a bad value, or a word's place where the word may be a key."""
    with pytest.raises(KeyFileError) as caught:
        parse_named_keys(line + "\n")
    assert str(caught.value).startswith(named), caught.value


#: Pieces of SSE text, where a data line may start, end, be cut or hold a sign
#: that it may carry no text.
_SSE_PIECES = [
    b"data:",
    b"data: ",
    b"\ndata: ",
    b"\r",
    b"\n",
    b"\r\n",
    b"\n\n",
    b'""',
    b"[]",
    b"[DONE]",
    b'"finish_reason"',
    b":null",
    b": null",
    b':"stop"',
    b" ",
    b"\x0b",
    b"x",
    b"d",
    b"ata:",
    b'{"choices":[{"delta":{"content":"a"},"finish_reason":null}]}',
    b'{"choices":[{"delta":{},"finish_reason":"length"}]}',
    b'{"text":""}',
    b"{",
    b"}",
    b'"',
    b"[",
    b"]",
]


@settings(max_examples=3000, deadline=None)
@given(st.lists(st.sampled_from(_SSE_PIECES), max_size=60).map(b"".join))
def test_an_estimate_counts_the_text_events_as_asking_each_line_would(window):
    """Counting from the signs found in the whole window gives the count of asking
    every data line alone, whatever the bytes."""
    lines = events = 0
    for payload in _data_lines(window):
        lines += 1
        if payload != b"[DONE]" and _carries_text(payload):
            events += 1
    assert _count_text_events(window) == (lines, events)
