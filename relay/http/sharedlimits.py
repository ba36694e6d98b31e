"""Sans-IO part of the shared limit store: key names, the Lua scripts, their answers.

With ``--limits-store`` the per-key limits and ``--max-inflight`` are kept
in Redis (or Valkey) so that every relay process pointed at it enforces the
same numbers. What runs there is three small Lua scripts, all of whose keys
share one hash tag (``{relay}``), so each is one atomic step on one shard,
standalone or Redis Cluster alike:

* :data:`ACQUIRE` checks every limit that applies to a request (the key's
  concurrency, its requests-per-minute bucket, its tokens-per-minute bucket
  above zero, the upstream's in-flight count) and, only if all pass, takes a
  lease in each concurrency set and one request from the RPM bucket.
* :data:`RELEASE` gives the leases back and debits the tokens the request
  used (the upstream reports them only at the end), at most once per lease:
  a release sent again (its answer was lost) finds the lease's
  :func:`debited_key` marker and debits nothing more.
* :data:`RENEW` pushes the expiry of a process's live leases forward. A
  lease is a member of a sorted set scored by its expiry (milliseconds, the
  store's own clock): every script first drops expired members, so a slot
  held by a relay that died comes back once its lease runs out.

A store that lost its data (restarted, flushed) has no buckets (full) and no
leases: nothing stays stuck. Each relay process also keeps a marker key that
lives two lease times; when :data:`RENEW` finds it gone, the store forgot
this process, and the process's live leases are added back instead of only
extended, so the counts are exact again after recovery.

The buckets are the token buckets of :mod:`relay.http.limits`, computed on
the store's clock (``TIME``), so relays whose clocks differ agree.
"""

from __future__ import annotations

from typing import NamedTuple

__all__ = [
    "ACQUIRE",
    "FULL",
    "OK",
    "RELEASE",
    "RENEW",
    "Answer",
    "bucket_key",
    "debited_key",
    "leases_key",
    "marker_key",
    "read_answer",
]

#: Every key relay writes starts with this; its hash tag puts them in one slot.
PREFIX = "relay:{relay}:"

#: What :data:`ACQUIRE` answers (the first element of its reply).
OK = 0
CONCURRENT = 1
RPM = 2
TPM = 3
FULL = 4  # the upstream's --max-inflight slots are all taken elsewhere

_REFUSED = {CONCURRENT: "concurrent", RPM: "rpm", TPM: "tpm"}


def leases_key(owner: str) -> str:
    """The sorted set of leases of ``owner``: ``key:NAME``, ``addr:HOST`` or ``up:URL``."""
    return f"{PREFIX}{owner}:leases"


def bucket_key(owner: str) -> str:
    """The hash holding ``owner``'s RPM and TPM bucket levels."""
    return f"{PREFIX}{owner}:bucket"


def debited_key(lease: str) -> str:
    """The key that says lease ``lease``'s tokens were debited (it lives a while)."""
    return f"{PREFIX}debited:{lease}"


def marker_key(process: str) -> str:
    """The key that says the store still knows process ``process``'s leases."""
    return f"{PREFIX}process:{process}"


class Answer(NamedTuple):
    """:data:`ACQUIRE`'s verdict: ``limit`` is ``""`` when admitted, ``"upstream"``
    when only the upstream's slots are full, else the key limit refused."""

    limit: str
    retry_after: int  # whole seconds, at least 1, for a refusal


def read_answer(reply: object) -> Answer:
    """Decode :data:`ACQUIRE`'s reply ``[code, milliseconds]``; ValueError if malformed."""
    if not isinstance(reply, list | tuple) or len(reply) != 2:
        raise ValueError(f"unexpected reply {reply!r}")
    code, wait_ms = int(reply[0]), int(reply[1])
    if code == OK:
        return Answer("", 0)
    if code == FULL:
        return Answer("upstream", 1)
    if code not in _REFUSED:
        raise ValueError(f"unexpected code {code}")
    return Answer(_REFUSED[code], max(1, -(-wait_ms // 1000)))


# A bucket holds levels r/t and the times rt/tt (ms) they were computed at; a
# missing field is a full bucket. Refilled levels never exceed the limit.
_COMMON = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local function refill(level, at, per_minute)
  if not level then return per_minute end
  local value = tonumber(level) + (now - tonumber(at)) * per_minute / 60000
  if value > per_minute then return per_minute end
  return value
end
-- Milliseconds until a bucket at level is full again (it may then be forgotten).
local function full_in(level, per_minute)
  return math.ceil((per_minute - level) * 60000 / per_minute) + 1000
end
-- Expiry pushed forward, never pulled in (another relay may use longer leases).
local function keep(key, ms)
  local left = redis.call('PTTL', key)
  if ms > left then redis.call('PEXPIRE', key, ms) end
end
"""

#: KEYS: the key's lease set, the key's bucket, the upstream's lease set.
#: ARGV: lease id, lease ms, concurrent, rpm, tpm, max in flight (0: not checked).
ACQUIRE = (
    _COMMON
    + """
local lease, ttl = ARGV[1], tonumber(ARGV[2])
local concurrent, rpm, tpm = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
local inflight = tonumber(ARGV[6])
if concurrent > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
  if redis.call('ZCARD', KEYS[1]) >= concurrent then return {1, 1000} end
end
local r, tk
if rpm > 0 or tpm > 0 then
  local b = redis.call('HMGET', KEYS[2], 'r', 'rt', 't', 'tt')
  if rpm > 0 then
    r = refill(b[1], b[2], rpm)
    if r < 1 then return {2, math.ceil((1 - r) * 60000 / rpm)} end
  end
  if tpm > 0 then
    tk = refill(b[3], b[4], tpm)
    if tk <= 0 then return {3, math.ceil((0.001 - tk) * 60000 / tpm)} end
  end
end
if inflight > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now)
  if redis.call('ZCARD', KEYS[3]) >= inflight then return {4, 0} end
  redis.call('ZADD', KEYS[3], now + ttl, lease)
  keep(KEYS[3], ttl)
end
if concurrent > 0 then
  redis.call('ZADD', KEYS[1], now + ttl, lease)
  keep(KEYS[1], ttl)
end
if rpm > 0 then
  r = r - 1
  redis.call('HSET', KEYS[2], 'r', r, 'rt', now)
  keep(KEYS[2], full_in(r, rpm))
end
return {0, 0}
"""
)

#: KEYS: the key's lease set, the key's bucket, the upstream's lease set, and
#: when tokens are debited the lease's :func:`debited_key`.
#: ARGV: lease id, tokens used, tpm (0: no token bucket), and when tokens are
#: debited how long the marker lives (ms).
#: Giving a lease back twice is harmless; the marker makes the debit happen
#: once, for a release run again within the marker's life.
RELEASE = (
    _COMMON
    + """
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('ZREM', KEYS[3], ARGV[1])
local tokens, tpm = tonumber(ARGV[2]), tonumber(ARGV[3])
if tpm > 0 and tokens > 0 and redis.call('SET', KEYS[4], '1', 'NX', 'PX', ARGV[4]) then
  local b = redis.call('HMGET', KEYS[2], 't', 'tt')
  local level = refill(b[1], b[2], tpm) - tokens
  redis.call('HSET', KEYS[2], 't', level, 'tt', now)
  keep(KEYS[2], full_in(level, tpm))
end
return 0
"""
)

#: KEYS: this process's marker, then one lease set per lease.
#: ARGV: lease ms, then the lease ids (one per lease set), then the number of
#: leading leases the store has not confirmed yet (taken while it was away).
#: Extends each lease; adds it back if the store forgot this process or never
#: had it. Answers how many were added.
RENEW = (
    _COMMON
    + """
local ttl = tonumber(ARGV[1])
local unconfirmed = tonumber(ARGV[#ARGV])
local forgotten = redis.call('SET', KEYS[1], '1', 'NX', 'PX', 2 * ttl)
if not forgotten then redis.call('PEXPIRE', KEYS[1], 2 * ttl) end
local added = 0
for i = 2, #KEYS do
  local set, lease = KEYS[i], ARGV[i]
  if forgotten or i - 1 <= unconfirmed then
    added = added + redis.call('ZADD', set, now + ttl, lease)
  else
    redis.call('ZADD', set, 'XX', now + ttl, lease)
  end
  keep(set, ttl)
end
return added
"""
)
