"""The delivery queue in Redis: its layout and its atomic steps (one Lua script each).

Layout, every name under `redis.prefix` (P), per endpoint E (its configured name):
  P wh:due:E          sorted set: message id -> when its next attempt is due (ms, Redis time)
  P wh:job:E:<msg>    hash: type, at (ms: when the event happened), body, attempt (attempts
                      claimed so far), token (the claim in force, while an attempt is in flight)
  P wh:expiry         sorted set: key id -> its expires_at (ms), for key.expiring_soon
  P wh:seeded         "done" once the expiry index holds the keys that predate it

Steps:
- `enqueue`: under a guard (the audit entry's XACK still pending for the group, or the expiry
  index still holding the key at that expiry), each endpoint's job is added unless it exists or its
  queue holds `max_queue` jobs. The guard makes intake exactly-once per entry: whoever acks the
  entry enqueues it, in the same script, and a replica that crashed before that leaves the entry
  pending for another to claim (source.py).
- `claim`: due jobs are moved `visibility` into the future, their attempt counter raised and a
  claim token set, all in one script: two replicas never claim the same attempt; an attempt whose
  replica died becomes due again once the visibility timeout passes.
- `finish`: done (delete), retry (due at a given time) or drop, only while the caller's token is
  the one in force (a replica that was reclaimed from changes nothing).

Times are Redis's (TIME inside the scripts), so replicas' clocks need not agree.

May import: keytable.store (reply decoding).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final, Literal, cast

from redis.asyncio import Redis

from gateway.keytable.store import as_text

_NOW: Final = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"""

# ARGV: prefix, guard ('ack' | 'expiry' | 'none'), g1, g2, g3, max_queue, n (expiry entries), then n
# pairs (key id, expires_at ms or '' to forget), then jobs of five (endpoint, msg id, type, at ms, body).
# Returns one number a job: 1 queued, 0 there already, -1 its endpoint's queue was full; nothing at
# all when the guard failed (someone else handled the entry).
_ENQUEUE: Final = (
    _NOW
    + """
local p = ARGV[1]
if ARGV[2] == 'ack' then
  if redis.call('XACK', ARGV[3], ARGV[4], ARGV[5]) == 0 then return false end
elseif ARGV[2] == 'expiry' then
  local score = redis.call('ZSCORE', p .. 'wh:expiry', ARGV[3])
  if not score or tonumber(score) ~= tonumber(ARGV[4]) then return false end
  redis.call('ZREM', p .. 'wh:expiry', ARGV[3])
end
local most = tonumber(ARGV[6])
local n = tonumber(ARGV[7])
local i = 8
for _ = 1, n do
  if ARGV[i + 1] == '' then
    redis.call('ZREM', p .. 'wh:expiry', ARGV[i])
  else
    redis.call('ZADD', p .. 'wh:expiry', ARGV[i + 1], ARGV[i])
  end
  i = i + 2
end
local out = {}
while i <= #ARGV do
  local ep, msg = ARGV[i], ARGV[i + 1]
  local job = p .. 'wh:job:' .. ep .. ':' .. msg
  local due = p .. 'wh:due:' .. ep
  if redis.call('EXISTS', job) == 1 then
    out[#out + 1] = 0
  elseif redis.call('ZCARD', due) >= most then
    out[#out + 1] = -1
  else
    redis.call('HSET', job, 'type', ARGV[i + 2], 'at', ARGV[i + 3], 'body', ARGV[i + 4], 'attempt', 0)
    redis.call('ZADD', due, now, msg)
    out[#out + 1] = 1
  end
  i = i + 5
end
return out
"""
)

# ARGV: prefix, endpoint, most jobs, visibility ms, token. Returns {now, next due or -1, jobs queued,
# then five a job: msg id, attempt, type, at, body}.
_CLAIM: Final = (
    _NOW
    + """
local p, ep = ARGV[1], ARGV[2]
local due = p .. 'wh:due:' .. ep
local ids = redis.call('ZRANGEBYSCORE', due, '-inf', now, 'LIMIT', 0, tonumber(ARGV[3]))
local out = {now, -1, 0}
for _, msg in ipairs(ids) do
  local job = p .. 'wh:job:' .. ep .. ':' .. msg
  if redis.call('EXISTS', job) == 0 then
    redis.call('ZREM', due, msg)
  else
    redis.call('ZADD', due, now + tonumber(ARGV[4]), msg)
    local attempt = redis.call('HINCRBY', job, 'attempt', 1)
    redis.call('HSET', job, 'token', ARGV[5])
    local f = redis.call('HMGET', job, 'type', 'at', 'body')
    out[#out + 1] = msg
    out[#out + 1] = attempt
    out[#out + 1] = f[1]
    out[#out + 1] = f[2]
    out[#out + 1] = f[3]
  end
end
local first = redis.call('ZRANGE', due, 0, 0, 'WITHSCORES')
if first[2] then out[2] = tonumber(first[2]) end
out[3] = redis.call('ZCARD', due)
return out
"""
)

# ARGV: prefix, endpoint, msg id, token, 'done' | 'drop' | 'retry' | 'release', due ms (retry).
# 'release' (a clean stop) makes the job due now, its attempt counted. 1 when the token was in force.
_FINISH: Final = (
    _NOW
    + """
local p, ep, msg = ARGV[1], ARGV[2], ARGV[3]
local job = p .. 'wh:job:' .. ep .. ':' .. msg
local due = p .. 'wh:due:' .. ep
if redis.call('HGET', job, 'token') ~= ARGV[4] then return 0 end
if ARGV[5] == 'retry' or ARGV[5] == 'release' then
  redis.call('ZADD', due, ARGV[5] == 'retry' and ARGV[6] or now, msg)
  redis.call('HDEL', job, 'token')
else
  redis.call('DEL', job)
  redis.call('ZREM', due, msg)
end
return 1
"""
)

# ARGV: prefix, key id, expires_at ms: forgets the key only at that expiry. 1 when it did.
_FORGET_EXPIRY: Final = """
local score = redis.call('ZSCORE', ARGV[1] .. 'wh:expiry', ARGV[2])
if score and tonumber(score) == tonumber(ARGV[3]) then
  return redis.call('ZREM', ARGV[1] .. 'wh:expiry', ARGV[2])
end
return 0
"""


@dataclass(frozen=True, slots=True)
class Job:
    """One claimed attempt."""

    endpoint: str
    msg_id: str
    attempt: int  # 1 for the first attempt
    type: str
    at: float  # seconds: when the event happened
    body: bytes
    token: str
    claimed_ms: int  # Redis time of the claim


@dataclass(frozen=True, slots=True)
class Claimed:
    jobs: list[Job]
    now_ms: int  # Redis time of the claim
    next_due_ms: int | None  # the endpoint's earliest due job after the claim
    queued: int  # the endpoint's jobs, in flight included


@dataclass(frozen=True, slots=True)
class Guard:
    """What makes an enqueue happen once: an audit entry's ack, or the expiry index's entry."""

    kind: Literal["ack", "expiry", "none"]
    args: tuple[str, str, str] = ("", "", "")


NewJob = tuple[str, str, str, float, bytes]  # endpoint, msg id, type, at (s), body


class Queue:
    def __init__(self, redis: Redis, prefix: str) -> None:
        self.redis = redis
        self.prefix = prefix

    def _due(self, endpoint: str) -> str:
        return f"{self.prefix}wh:due:{endpoint}"

    async def enqueue(
        self, guard: Guard, jobs: Sequence[NewJob], max_queue: int, expiry: Sequence[tuple[str, int | None]] = ()
    ) -> list[int] | None:
        """Per job 1 (queued), 0 (there already) or -1 (queue full); None when the guard failed."""
        args: list[str | bytes | int] = [self.prefix, guard.kind, *guard.args, max_queue, len(expiry)]
        for key_id, expires_ms in expiry:
            args += [key_id, "" if expires_ms is None else expires_ms]
        for endpoint, msg_id, kind, at, body in jobs:
            args += [endpoint, msg_id, kind, int(at * 1000), body]
        reply = await self.redis.eval(_ENQUEUE, 0, *args)
        return None if reply is None else [int(x) for x in cast(list[Any], reply)]

    async def claim(self, endpoint: str, most: int, visibility_ms: int, token: str) -> Claimed:
        reply = cast(list[Any], await self.redis.eval(_CLAIM, 0, self.prefix, endpoint, most, visibility_ms, token))
        now_ms, next_due, queued = int(reply[0]), int(reply[1]), int(reply[2])
        jobs = [
            Job(endpoint, as_text(reply[i]), int(reply[i + 1]), as_text(reply[i + 2]), int(reply[i + 3]) / 1000,
                reply[i + 4] if isinstance(reply[i + 4], bytes) else str(reply[i + 4]).encode(), token, now_ms)
            for i in range(3, len(reply), 5)
        ]  # fmt: skip
        return Claimed(jobs, now_ms, None if next_due < 0 else next_due, queued)

    async def finish(self, job: Job, outcome: Literal["done", "drop", "retry", "release"], due_ms: int = 0) -> bool:
        reply = await self.redis.eval(_FINISH, 0, self.prefix, job.endpoint, job.msg_id, job.token, outcome, due_ms)
        return bool(reply)

    async def queued(self, endpoint: str) -> int:
        return int(await self.redis.zcard(self._due(endpoint)))

    # the expiry index ---------------------------------------------------------------

    async def expiring(self, until_ms: int, limit: int) -> list[tuple[str, int]]:
        """Keys whose indexed expiry is at or before `until_ms`, soonest first."""
        rows = cast(list[tuple[bytes, float]], await self.redis.zrangebyscore(
            self.prefix + "wh:expiry", "-inf", until_ms, start=0, num=limit, withscores=True))  # fmt: skip
        return [(as_text(key_id), int(score)) for key_id, score in rows]

    async def index_expiry(self, key_id: str, expires_ms: int, *, only_new: bool = False) -> None:
        await self.redis.zadd(self.prefix + "wh:expiry", {key_id: expires_ms}, nx=only_new)

    async def forget_expiry(self, key_id: str, expires_ms: int) -> None:
        await self.redis.eval(_FORGET_EXPIRY, 0, self.prefix, key_id, expires_ms)

    async def seeding(self, lease_seconds: int) -> bool:
        """True when this replica is to fill the expiry index from the table (once, ever; again
        after `lease_seconds` if the replica that took it never finished)."""
        return bool(await self.redis.set(self.prefix + "wh:seeded", "running", nx=True, ex=lease_seconds))

    async def seeded(self) -> None:
        await self.redis.set(self.prefix + "wh:seeded", "done")
