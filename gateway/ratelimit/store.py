"""Window counters and credit balances in Redis: the only module that knows their layout.

Layout, every name under `redis.prefix` (P):
  P rl:<key id>:<scope>:<window seconds>:<window index>   requests granted in that window (a string
      counter; expires a second after its window ends). Window index = floor(Redis time / window),
      so every replica's windows start and end together, on Redis's clock.
  P credits:<pool>   hash {remaining, refilled_at (ms, Redis time)}: a key's credit balance

One script, `_TAKE`, decides everything a request needs from Redis, atomically: for each of its
limits it grants `need` (0 or 1) plus up to `extra` (a lease for the replica to spend locally), or
grants nothing to any of them when one cannot give `need`; then it takes the request's `cost` from
the credit balance, or nothing when too few are left (the limits' grants are then not made either).
A lease is never more than the window has left, so the grants of every replica together never
exceed the limit, and never more than `share` of the limit divided among the live replicas plus
one (the sorted set P replicas of coherence/replicas.py; the one more is a replica serving outside
that set: starting, or resubscribing), so what all replicas hold unspent is at most that share of
the limit. `_RELEASE` gives back what a replica did not spend.

Calls are batched: every take submitted during one turn of the event loop goes to Redis in one
EVALSHA (up to BATCH ops; more in one pipeline), bounded by `timeout`. A batch that fails or times
out fails each of its ops with `StoreFailed` (the op may or may not have run: the limiter then
answers as each limit's `on_store_error` says).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any, Final, cast

from redis.asyncio import Redis
from redis.exceptions import RedisError

BATCH: Final = 256  # ops in one script call
ALLOW: Final = 1  # an op's verdict: every limit granted its need and the credits paid
LIMITED: Final = 0  # a limit could not give its need: nothing granted, nothing paid
EXHAUSTED: Final = -1  # too few credits: nothing granted, nothing paid

# ARGV: the live-replica set, the lease share, the number of ops, then each op: its number of limits,
# five values a limit (counter base, limit, window seconds, need, extra), and four for credits (the
# balance's key or '', cost, refill amount or 0, refill interval in seconds or 0).
# Reply, an array an op: verdict, credits left (-1 without credits), ms until the next refill (-1:
# none), then five values a limit: granted, left after, ms until the window ends, window index, cap.
_TAKE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local live = redis.call('ZCOUNT', ARGV[1], now, '+inf')
if live < 1 then live = 1 end
local share = tonumber(ARGV[2])
local i = 4
local out = {}
for op = 1, tonumber(ARGV[3]) do
  local n = tonumber(ARGV[i])
  i = i + 1
  local limits = {}
  local verdict = 1
  for j = 1, n do
    local limit, w = tonumber(ARGV[i + 1]), tonumber(ARGV[i + 2]) * 1000
    local index = math.floor(now / w)
    local key = ARGV[i] .. ':' .. index
    local left = limit - tonumber(redis.call('GET', key) or '0')
    if left < 0 then left = 0 end
    local need = tonumber(ARGV[i + 3])
    if need > left then verdict = 0 end
    limits[j] = {key, limit, need, tonumber(ARGV[i + 4]), left, (index + 1) * w - now, index}
    i = i + 5
  end
  local ckey, cost = ARGV[i], tonumber(ARGV[i + 1])
  local amount, interval = tonumber(ARGV[i + 2]), tonumber(ARGV[i + 3]) * 1000
  i = i + 4
  local credits, refill_in = -1, -1
  if ckey ~= '' then
    local c = redis.call('HMGET', ckey, 'remaining', 'refilled_at')
    credits = tonumber(c[1] or '0')
    if amount > 0 and interval > 0 then
      local at = tonumber(c[2] or tostring(now))
      if now - at >= interval then
        at = at + math.floor((now - at) / interval) * interval
        credits = amount
        redis.call('HSET', ckey, 'remaining', credits, 'refilled_at', at)
      end
      refill_in = at + interval - now
    end
    if verdict == 1 then
      if credits < cost then
        verdict = -1
      elseif cost > 0 then
        credits = credits - cost
        redis.call('HSET', ckey, 'remaining', credits)
      end
    end
  end
  local row = {verdict, credits, refill_in}
  for j = 1, n do
    local l = limits[j]
    local granted = 0
    local cap = math.floor(l[2] * share / (live + 1))
    if verdict == 1 then
      local extra = math.min(l[4], cap, l[5] - l[3])
      if extra < 0 then extra = 0 end
      granted = l[3] + extra
      if granted > 0 then
        redis.call('INCRBY', l[1], granted)
        redis.call('PEXPIRE', l[1], l[6] + 1000)
      end
    end
    row[#row + 1] = granted
    row[#row + 1] = l[5] - granted
    row[#row + 1] = l[6]
    row[#row + 1] = l[7]
    row[#row + 1] = cap
  end
  out[op] = row
end
return out
"""

# KEYS: window counters (with their index); ARGV: how many of each to give back (never below 0).
_RELEASE = """
for k = 1, #KEYS do
  local used = tonumber(redis.call('GET', KEYS[k]) or '0')
  local give = math.min(used, tonumber(ARGV[k]))
  if give > 0 then redis.call('DECRBY', KEYS[k], give) end
end
return #KEYS
"""

# Credits, written inside an admin change's MULTI (EVAL, not EVALSHA: see keytable/store.py).
# KEYS[1] the balance; ARGV[1] the amount. Set: the balance, and the refill clock starts now.
_SET_CREDITS = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('HSET', KEYS[1], 'remaining', ARGV[1], 'refilled_at', now)
return 1
"""
# Add (or take away, never below 0, never above ARGV[2]).
_ADD_CREDITS = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local r = tonumber(redis.call('HGET', KEYS[1], 'remaining') or '0') + tonumber(ARGV[1])
if r < 0 then r = 0 end
if r > tonumber(ARGV[2]) then r = tonumber(ARGV[2]) end
redis.call('HSET', KEYS[1], 'remaining', r)
redis.call('HSETNX', KEYS[1], 'refilled_at', now)
return r
"""


class StoreFailed(Exception):
    """Redis did not answer a batch in time, or failed it: its ops may or may not have run."""


class RateStore:
    def __init__(self, redis: Redis, prefix: str, *, timeout: float, share: float) -> None:
        self.redis = redis
        self.prefix = prefix
        self.timeout = timeout
        self.share = repr(share)
        self._replicas = prefix + "replicas"
        self._take = redis.register_script(_TAKE)
        self._release = redis.register_script(_RELEASE)
        self._queue: list[tuple[list[str | int], asyncio.Future[list[int]]]] = []
        self._sending: set[asyncio.Task[None]] = set()
        self.round_trips = 0  # batches sent (each one round trip), for the metrics and the benchmark
        self.ops = 0  # ops sent

    def counter(self, key_id: str, scope: str, window_seconds: int) -> str:
        """The base name of a limit's window counters (the window index is appended in Redis)."""
        return f"{self.prefix}rl:{key_id}:{scope}:{window_seconds}"

    def credits(self, pool: str) -> str:
        return f"{self.prefix}credits:{pool}"

    # the request path ---------------------------------------------------------------------------

    def submit(self, op: list[str | int]) -> asyncio.Future[list[int]]:
        """Queue one op (see _TAKE's ARGV) for this turn's batch; its future gets the op's reply row."""
        loop = asyncio.get_running_loop()
        if not self._queue:
            loop.call_soon(self._flush)
        future: asyncio.Future[list[int]] = loop.create_future()
        self._queue.append((op, future))
        return future

    def _flush(self) -> None:
        batch, self._queue = self._queue, []
        task = asyncio.get_running_loop().create_task(self._send(batch))
        self._sending.add(task)
        task.add_done_callback(self._sending.discard)

    async def _send(self, batch: list[tuple[list[str | int], asyncio.Future[list[int]]]]) -> None:
        chunks = [batch[i : i + BATCH] for i in range(0, len(batch), BATCH)]
        argvs = [[self._replicas, self.share, len(chunk), *(v for op, _ in chunk for v in op)] for chunk in chunks]
        self.round_trips += 1
        self.ops += len(batch)
        try:
            async with asyncio.timeout(self.timeout):
                if len(argvs) == 1:
                    replies = [await self._take(keys=[], args=argvs[0])]
                else:
                    async with self.redis.pipeline(transaction=False) as pipe:
                        for argv in argvs:
                            await self._take(keys=[], args=argv, client=pipe)
                        replies = await pipe.execute()
        except (TimeoutError, RedisError, OSError) as exc:
            failure = StoreFailed(type(exc).__name__)
            for _, future in batch:
                if not future.done():
                    future.set_exception(failure)
            return
        rows = [row for reply in replies for row in cast(list[list[int]], reply)]
        for (_, future), row in zip(batch, rows, strict=True):
            if not future.done():  # its request may have been cancelled meanwhile
                future.set_result([int(v) for v in row])

    async def release(self, counters: Sequence[tuple[str, int]]) -> None:
        """Give back unspent grants: (the window counter's full name, how many)."""
        if counters:
            async with asyncio.timeout(self.timeout):
                await self._release(keys=[c for c, _ in counters], args=[n for _, n in counters])

    # the admin API --------------------------------------------------------------------------------

    # Credit balances are written inside a key change's own script (keytable/store.py SideEffects,
    # passed in as `effects`): the key and its balance are written together or not at all.

    def queue_set_credits(self, effects: Any, pool: str, remaining: int) -> None:
        effects.hset_stamped(self.credits(pool), "remaining", remaining, "refilled_at")

    def queue_add_credits(self, effects: Any, pool: str, amount: int, most: int) -> None:
        """Add (or take away), never below 0, never above `most`."""
        effects.hadd_clamped(self.credits(pool), "remaining", amount, most, "refilled_at")

    def queue_drop_credits(self, effects: Any, pool: str) -> None:
        effects.delete(self.credits(pool))

    async def remaining(self, pools: Sequence[str]) -> list[int | None]:
        """The credit balances of these pools as stored now (None: no balance stored). A refill
        that is due is applied by the next request; the answer shows the stored balance."""
        if not pools:
            return []
        async with self.redis.pipeline(transaction=False) as pipe:
            for pool in pools:
                pipe.hget(self.credits(pool), "remaining")
            raw = await pipe.execute()
        return [None if v is None else int(v) for v in raw]
