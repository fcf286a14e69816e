"""Usage in Redis: the names, the buckets and how long each is kept (the only module that knows them).

Every name is under `redis.prefix` (P); `<id>` is a key's id, `<m>`, `<h>`, `<d>` are the minute,
hour and day numbers since the epoch (UTC), `<t>` a block of 20 minutes (`<m> // 20`), `<b>` a
block of 32 days (`<d> // 32`). A hash holds so few buckets that it stays a Redis listpack (at
most 128 fields: 20 minutes of up to 6 outcomes), a quarter of the memory of a hash table.

  P u:m:<id>:<t>    hash "<m % 20>:<outcome>" -> count: per minute, one hash 20 minutes   kept 1 day
  P u:h:<id>:<d>    hash "<h % 24>:<outcome>" -> count: per hour, one hash a day          kept 31 days
  P u:d:<id>:<b>    hash "<d % 32>:<outcome>" -> count: per day, one hash 32 days         kept 366 days
  P u:am:<id>:<m>   HyperLogLog of the client addresses of that minute                  kept 1 hour
  P u:ah:<id>:<h>   HyperLogLog of the client addresses of that hour                    kept 25 hours
  P u:ad:<id>:<d>   HyperLogLog of the client addresses of that day                     kept 31 days
  P u:seen          sorted set: key id -> last use (epoch seconds), for `unused_since`  never expires
  P u:last          hash: key id -> JSON [client address, route] of that last use       never expires
  P u:claim:<policy>:<id>  a policy's hold on a key (policies.py)                        the policy's window

"Kept" counts from the end of the bucket's period (EXPIREAT, set again at each write).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final, Literal

MINUTE: Final = 60
HOUR: Final = 3600
DAY: Final = 86400
BLOCK_DAYS: Final = 32
BLOCK_MINUTES: Final = 20

# How long past the end of its period each kind of bucket is kept (seconds).
KEEP_MINUTES: Final = DAY
KEEP_HOURS: Final = 31 * DAY
KEEP_DAYS: Final = 366 * DAY
KEEP_MINUTE_ADDRESSES: Final = HOUR
KEEP_HOUR_ADDRESSES: Final = 25 * HOUR
KEEP_DAY_ADDRESSES: Final = 31 * DAY

Window = Literal["1h", "24h", "30d"]
WINDOWS: Final[tuple[Window, ...]] = ("1h", "24h", "30d")


@dataclass(frozen=True, slots=True)
class Names:
    prefix: str

    def minutes(self, key_id: str, block: int) -> str:
        return f"{self.prefix}u:m:{key_id}:{block}"

    def hours(self, key_id: str, day: int) -> str:
        return f"{self.prefix}u:h:{key_id}:{day}"

    def days(self, key_id: str, block: int) -> str:
        return f"{self.prefix}u:d:{key_id}:{block}"

    def minute_addresses(self, key_id: str, minute: int) -> str:
        return f"{self.prefix}u:am:{key_id}:{minute}"

    def hour_addresses(self, key_id: str, hour: int) -> str:
        return f"{self.prefix}u:ah:{key_id}:{hour}"

    def day_addresses(self, key_id: str, day: int) -> str:
        return f"{self.prefix}u:ad:{key_id}:{day}"

    @property
    def seen(self) -> str:
        return self.prefix + "u:seen"

    @property
    def last(self) -> str:
        return self.prefix + "u:last"

    def claim(self, policy: str, key_id: str) -> str:
        return f"{self.prefix}u:claim:{policy}:{key_id}"


@dataclass(frozen=True, slots=True)
class Span:
    """The buckets a window reads: `count` buckets of `unit` seconds, the last one holding `now`."""

    unit: int  # MINUTE, HOUR or DAY
    count: int

    def buckets(self, now: float) -> range:
        """Bucket numbers (periods of `unit` since the epoch), oldest first."""
        last = int(now // self.unit)
        return range(last - self.count + 1, last + 1)


SPANS: Final[dict[Window, Span]] = {"1h": Span(MINUTE, 60), "24h": Span(HOUR, 24), "30d": Span(DAY, 30)}


def span_of(window_seconds: int) -> Span:
    """A policy's window (whole minutes up to an hour, or whole hours up to a day) as buckets."""
    if window_seconds <= HOUR:
        return Span(MINUTE, max(1, window_seconds // MINUTE))
    return Span(HOUR, window_seconds // HOUR)


# The flush, for one chunk of keys, atomic: ARGV[1] the prefix, ARGV[2] a JSON list of
# [id, minute, {outcome: count}, last_at, last_ip, last_route, [addresses]]. Keys are built here
# from the prefix (Redis Cluster is not supported: docs/deployment.md). The last use is replaced
# only by a later one, so replicas flushing in any order leave the latest.
FLUSH: Final = f"""
local p = ARGV[1]
local items = cjson.decode(ARGV[2])
for _, it in ipairs(items) do
  local id, minute, outcomes, at, ip, route, addrs = it[1], it[2], it[3], it[4], it[5], it[6], it[7]
  local hour = math.floor(minute / 60)
  local day = math.floor(minute / 1440)
  local block = math.floor(day / {BLOCK_DAYS})
  local mblock = math.floor(minute / {BLOCK_MINUTES})
  local km = p .. 'u:m:' .. id .. ':' .. mblock
  local kh = p .. 'u:h:' .. id .. ':' .. day
  local kd = p .. 'u:d:' .. id .. ':' .. block
  for outcome, n in pairs(outcomes) do
    redis.call('HINCRBY', km, (minute - mblock * {BLOCK_MINUTES}) .. ':' .. outcome, n)
    redis.call('HINCRBY', kh, (hour - day * 24) .. ':' .. outcome, n)
    redis.call('HINCRBY', kd, (day - block * {BLOCK_DAYS}) .. ':' .. outcome, n)
  end
  redis.call('EXPIREAT', km, (mblock + 1) * {BLOCK_MINUTES * MINUTE} + {KEEP_MINUTES})
  redis.call('EXPIREAT', kh, (day + 1) * {DAY} + {KEEP_HOURS})
  redis.call('EXPIREAT', kd, (block + 1) * {BLOCK_DAYS * DAY} + {KEEP_DAYS})
  if #addrs > 0 then
    local am = p .. 'u:am:' .. id .. ':' .. minute
    local ah = p .. 'u:ah:' .. id .. ':' .. hour
    local ad = p .. 'u:ad:' .. id .. ':' .. day
    for i = 1, #addrs, 500 do
      local part = {{unpack(addrs, i, math.min(i + 499, #addrs))}}
      redis.call('PFADD', am, unpack(part))
      redis.call('PFADD', ah, unpack(part))
      redis.call('PFADD', ad, unpack(part))
    end
    redis.call('EXPIREAT', am, (minute + 1) * {MINUTE} + {KEEP_MINUTE_ADDRESSES})
    redis.call('EXPIREAT', ah, (hour + 1) * {HOUR} + {KEEP_HOUR_ADDRESSES})
    redis.call('EXPIREAT', ad, (day + 1) * {DAY} + {KEEP_DAY_ADDRESSES})
  end
  local old = redis.call('ZSCORE', p .. 'u:seen', id)
  if (not old) or tonumber(old) < at then
    redis.call('ZADD', p .. 'u:seen', string.format('%.3f', at), id)
    redis.call('HSET', p .. 'u:last', id, cjson.encode({{ip, route}}))
  end
end
return #items
"""
