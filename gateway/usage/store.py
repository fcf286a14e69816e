"""Usage in Redis: the flush's write and every read of it (names and buckets in layout.py)."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, cast

import orjson
from redis.asyncio import Redis

from gateway.config import Policy
from gateway.keytable.record import rfc3339
from gateway.keytable.store import as_text
from gateway.usage import layout
from gateway.usage.counter import Batch
from gateway.usage.layout import HOUR, MINUTE, SPANS, WINDOWS, Names, Span, Window

# Keys one script call writes. Redis runs a script alone: at about 60 us of Redis time a key (Redis 7,
# this machine), 50 keys keep each call near 3 ms, so lookups from other clients interleave.
CHUNK = 50


@dataclass(frozen=True, slots=True)
class LastUse:
    at: float
    ip: str | None
    route: str | None


def last_use_fields(last: LastUse | None) -> dict[str, Any]:
    """What the key record shows of its last use (null for a key never used, or not since counting began)."""
    if last is None:
        return {"last_used_at": None, "last_used_ip": None}
    return {"last_used_at": rfc3339(last.at), "last_used_ip": last.ip}


class UsageStore:
    def __init__(self, redis: Redis, prefix: str) -> None:
        self.redis = redis
        self.names = Names(prefix)

    # the flush -----------------------------------------------------------------

    async def write(self, batches: Sequence[Batch]) -> int:
        """Every batch, in one pipeline: one script call per CHUNK keys. Returns the keys written."""
        items: list[list[Any]] = []
        for batch in batches:
            for key_id, t in batch.tallies.items():
                items.append([key_id, batch.minute, t.outcomes, t.last_at, t.last_ip, t.last_route, list(t.addresses)])
        if not items:
            return 0
        async with self.redis.pipeline(transaction=False) as pipe:
            for i in range(0, len(items), CHUNK):
                pipe.eval(layout.FLUSH, 0, self.names.prefix, orjson.dumps(items[i : i + CHUNK]))
            await pipe.execute()
        return len(items)

    # last use ------------------------------------------------------------------

    async def last_use(self, key_ids: Sequence[str]) -> dict[str, LastUse]:
        """The last use of each key that has one (two reads, pipelined)."""
        if not key_ids:
            return {}
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.zmscore(self.names.seen, list(key_ids))
            pipe.hmget(self.names.last, list(key_ids))
            scores, lasts = await pipe.execute()
        out: dict[str, LastUse] = {}
        for key_id, score, raw in zip(key_ids, scores, lasts, strict=True):
            if score is None:
                continue
            ip = route = None
            if raw is not None:
                try:
                    ip, route = orjson.loads(raw)
                except (orjson.JSONDecodeError, ValueError, TypeError):
                    pass
            out[key_id] = LastUse(
                float(score), ip if isinstance(ip, str) else None, route if isinstance(route, str) else None
            )
        return out

    async def used_since(self, key_ids: Sequence[str], since: float) -> list[bool]:
        """For each key, whether it was used at or after `since` (epoch seconds)."""
        if not key_ids:
            return []
        scores: list[float | None] = await self.redis.zmscore(self.names.seen, list(key_ids))
        return [score is not None and score >= since for score in scores]

    # windows -------------------------------------------------------------------

    async def window(self, key_id: str, window: Window, now: float | None = None) -> dict[str, Any]:
        """Counts per bucket by outcome over a window (1h: per minute, 24h: per hour, 30d: per day),
        the totals, and the distinct client addresses over the whole window."""
        now = time.time() if now is None else now
        span = SPANS[window]
        buckets = span.buckets(now)
        counts, distinct = await self._figures([key_id], span, buckets, addresses=True)
        per_bucket = counts[0]
        series = []
        totals: dict[str, int] = {}
        for b in buckets:
            outcomes = per_bucket.get(b, {})
            for outcome, n in outcomes.items():
                totals[outcome] = totals.get(outcome, 0) + n
            series.append({"start": rfc3339(b * span.unit), "requests": sum(outcomes.values()), "outcomes": outcomes})
        return {
            "key_id": key_id,
            "window": window,
            "bucket_seconds": span.unit,
            "from": rfc3339(buckets[0] * span.unit),
            "to": rfc3339((buckets[-1] + 1) * span.unit),
            "totals": {"requests": sum(totals.values()), "outcomes": totals},
            "distinct_addresses": distinct[0],
            "buckets": series,
        }

    async def usage(self, key_id: str, window: str) -> dict[str, Any]:
        """`window` as the console names it (gateway/console: UsageReader): 1h, 24h or 30d."""
        chosen = next((w for w in WINDOWS if w == window), None)
        if chosen is None:
            raise ValueError(f"window: must be one of {', '.join(WINDOWS)}")
        return await self.window(key_id, chosen)

    async def measure(self, key_ids: Sequence[str], policy: Policy, now: float) -> list[int]:
        """Each key's value of a policy's rule over its window, summed over every replica's flushes."""
        span = layout.span_of(policy.window_seconds)
        buckets = span.buckets(now)
        want_addresses = policy.rule == "distinct_addresses"
        counts, distinct = await self._figures(key_ids, span, buckets, addresses=want_addresses)
        if want_addresses:
            return distinct
        values = []
        for per_bucket in counts:
            total = 0
            for outcomes in per_bucket.values():
                if policy.rule == "refusals":
                    total += outcomes.get(policy.code or "", 0)
                else:
                    total += sum(outcomes.values())
            values.append(total)
        return values

    async def _figures(
        self, key_ids: Sequence[str], span: Span, buckets: range, *, addresses: bool
    ) -> tuple[list[dict[int, dict[str, int]]], list[int]]:
        """For each key: bucket -> outcome -> count over `buckets`, and (when asked) the distinct
        addresses of those buckets (one PFCOUNT over their HyperLogLogs). One pipeline."""
        names = self.names
        unit = span.unit
        # The hashes holding the buckets: one per 20 minutes (minutes), a day (hours), 32 days (days).
        per = {MINUTE: layout.BLOCK_MINUTES, HOUR: 24}.get(unit, layout.BLOCK_DAYS)
        containers = sorted({b // per for b in buckets})
        name: Callable[[str, int], str] = {MINUTE: names.minutes, HOUR: names.hours}.get(unit, names.days)
        hll = {MINUTE: names.minute_addresses, HOUR: names.hour_addresses}.get(unit, names.day_addresses)
        async with self.redis.pipeline(transaction=False) as pipe:
            for key_id in key_ids:
                for c in containers:
                    pipe.hgetall(name(key_id, c))
                if addresses:
                    pipe.pfcount(*[hll(key_id, b) for b in buckets])
            replies = await pipe.execute()
        counts: list[dict[int, dict[str, int]]] = []
        distinct: list[int] = []
        i = 0
        low, high = buckets[0], buckets[-1]
        for _key_id in key_ids:
            per_bucket: dict[int, dict[str, int]] = {}
            for c in containers:
                for field, value in cast(dict[bytes | str, bytes | str], replies[i]).items():
                    offset, _, outcome = as_text(field).partition(":")
                    try:
                        bucket, n = c * per + int(offset), int(value)
                    except ValueError:
                        continue
                    if low <= bucket <= high:
                        per_bucket.setdefault(bucket, {})[outcome] = n
                i += 1
            counts.append(per_bucket)
            if addresses:
                distinct.append(int(replies[i]))
                i += 1
            else:
                distinct.append(0)
        return counts, distinct

    # policy holds (policies.py) ----------------------------------------------

    async def claim(self, policy: str, key_id: str, ms: int) -> bool:
        """Take a policy's hold on a key unless another replica (or an earlier match) holds it."""
        return bool(await self.redis.set(self.names.claim(policy, key_id), b"1", nx=True, px=ms))

    async def hold(self, policy: str, key_id: str, ms: int) -> None:
        await self.redis.set(self.names.claim(policy, key_id), b"1", px=ms)

    async def release(self, policy: str, key_id: str) -> None:
        await self.redis.delete(self.names.claim(policy, key_id))
