"""The live-replica set in Redis: who must confirm an eviction.

A replica joins while its invalidation subscription is live: a sorted set
member whose score is its expiry (Redis server time, so replica clocks do not
matter), refreshed by a heartbeat, and an epoch: a Redis time (microseconds)
read after it resubscribed and before it cleared its cache. A replica whose
epoch is later than the moment a change was written cannot hold a stale entry
for it, so it counts as confirmed without an ack. A replica that dies or loses its subscription drops
out: it leaves, or its heartbeat expires.

A change's answer does not wait for a replica outside the live set, so a
replica trusts its cache only while its membership cannot have expired: until
the send time of its last successful join or heartbeat plus ttl, less margins
(subscriber.membership_trusted_until). Redis starts the TTL when it runs the
command, after that send; only a step of the Redis host's wall clock (TIME)
could end the membership sooner, which the margins do not cover.
"""

from __future__ import annotations

from typing import Any, cast

from redis.asyncio import Redis

from gateway.keytable.store import as_text

_JOIN = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
if ARGV[3] ~= '' then redis.call('HSET', KEYS[2], ARGV[1], ARGV[3]) end
return now
"""

_LIVE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local gone = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now)
if #gone > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
  redis.call('HDEL', KEYS[2], unpack(gone))
end
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], now, '+inf')
local out = {now}
for _, id in ipairs(ids) do
  table.insert(out, id)
  table.insert(out, redis.call('HGET', KEYS[2], id) or '0')
end
return out
"""

# Microseconds since the epoch fit a Lua double exactly (< 2^53); returned as a string.
_NOW_US = """
local t = redis.call('TIME')
return t[1] .. string.format('%06d', tonumber(t[2]))
"""


class Registry:
    def __init__(self, redis: Redis, prefix: str, replica_id: str, ttl_ms: int) -> None:
        self.redis = redis
        self.replica_id = replica_id
        self.ttl_ms = ttl_ms
        self._keys = [prefix + "replicas", prefix + "replica-epochs"]
        self._join = redis.register_script(_JOIN)
        self._live = redis.register_script(_LIVE)
        self._now = redis.register_script(_NOW_US)

    async def join(self, epoch_us: int) -> None:
        """Enter the live set with the epoch read (by now_us) before the cache was cleared."""
        await self._join(keys=self._keys, args=[self.replica_id, self.ttl_ms, str(epoch_us)])

    async def heartbeat(self) -> None:
        await self._join(keys=self._keys, args=[self.replica_id, self.ttl_ms, ""])

    async def leave(self) -> None:
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.zrem(self._keys[0], self.replica_id)
            pipe.hdel(self._keys[1], self.replica_id)
            await pipe.execute()

    async def live(self) -> tuple[int, dict[str, int]]:
        """(Redis time in ms, {replica id: epoch in microseconds}) for every unexpired replica."""
        raw = cast(list[Any], await self._live(keys=self._keys))
        now = int(raw[0])
        out: dict[str, int] = {}
        for i in range(1, len(raw), 2):
            out[as_text(raw[i])] = int(raw[i + 1])
        return now, out

    async def now_us(self) -> int:
        """Redis server time in microseconds."""
        raw = await self._now()
        return int(as_text(raw))
