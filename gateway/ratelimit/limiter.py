"""The per-replica rate-limit and credit decision (spec 12), after the key decision.

Algorithm: fixed windows aligned to Redis time (window index = floor(Redis time / window)), one
counter per key, limit and window in Redis. Exact at the documented boundaries: within each window
[k*w, (k+1)*w) at most `limit` requests pass, across every replica. (A sliding window would smooth
the burst a client can make across a boundary, up to 2x the limit in a span of one window, but
could not be leased out in slices that sum exactly to the limit; the fixed window can, and its
accounting is what clients read in the headers: a quota that resets at a known time.)

Across replicas, without a Redis round trip per request where the limit allows it: a replica holds,
per (key, limit), a slice of the current window's budget leased from Redis (store._TAKE), and
spends it locally. A slice is never more than what the window has left (so the slices of all
replicas never add up to more than the limit) and never more than LEASE_SHARE of the limit divided
among the live replicas plus one (one more for a replica serving outside the live set: starting, or
resubscribing) (so what all replicas hold unspent is at most LEASE_SHARE of the limit,
which is why no request is refused before 1 - LEASE_SHARE of the limit was used). A replica tops
its slice up in the background when half of it is spent (one top-up in flight per slice), gives
back what it holds after IDLE_RETURN seconds without use, and drops it when its window ends.
A limit whose share is under 1 request (limit * LEASE_SHARE / (replicas + 1) < 1: under 500 a
window with 3 replicas) has no slices: each request asks Redis. Credits are always asked of Redis, so N
credits admit exactly N requests. Once Redis says a window is used up, the replica refuses
locally until the window ends (its slice empty), with no Redis call per refused request.

One request's limits are all or nothing: the slices it can spend from are debited locally first;
the limits without a slice, and the credits, go to Redis in one op that grants every one or none
(store._TAKE); a refusal gives the local debits back. A refused request consumes nothing.

When Redis fails or does not answer within the store's timeout, a request that needed it is
decided by `on_store_error` of the limits that needed it: any `deny` (and any credits: credits
never pass unchecked) refuses it 503 `ratelimit_unavailable`; otherwise it passes. Each such
decision is counted (gateway_ratelimit_store_error_decisions_total{route, decision}).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from gateway.config import RateLimit, Route
from gateway.errors import Denial
from gateway.metrics import Metrics
from gateway.ratelimit.policy import NO_REFILL_RETRY_AFTER, CreditPolicy, effective, refusal_headers, seconds_until
from gateway.ratelimit.store import ALLOW, EXHAUSTED, RateStore, StoreFailed

log = logging.getLogger("gateway.ratelimit")

LEASE_SHARE: Final = 0.008  # of a limit, what all replicas together may hold unspent (< the 1% the spec allows)
IDLE_RETURN: Final = 1.0  # seconds without use after which a replica gives its slice back
SWEEP_EVERY: Final = 0.5  # seconds between two looks for idle slices (on the request path, no task)
MAX_BUCKETS: Final = 100_000  # (key, limit) slices a replica keeps; the oldest go first past it
STORE_TIMEOUT: Final = 1.0  # seconds a request waits for Redis before on_store_error decides
_WANT_ALL: Final = 1_000_000_000  # "as large a slice as allowed": the script caps it
_UNAVAILABLE: Final = Denial("ratelimit_unavailable", headers={"Retry-After": "1"})


@dataclass(slots=True)
class _Bucket:
    """One replica's view of one (key, limit) counter in the current window."""

    counter: str  # the Redis counter's base name (store.counter)
    limit: RateLimit
    index: int = -1  # the window the slice belongs to (Redis's index); -1 before the first answer
    ends: float = 0.0  # monotonic time before which that window has certainly not ended (from a send time)
    resets: float = 0.0  # monotonic time by which it has certainly ended (from a reply): Retry-After's
    tokens: int = 0  # the slice: leased, unspent
    cap: int = 0  # the largest slice Redis grants now (0: every request asks Redis)
    exhausted: bool = False  # Redis said the window has nothing left
    refilling: bool = False  # a request for a larger slice is on its way
    used: float = 0.0  # monotonic time of last use


class Limiter:
    def __init__(self, store: RateStore, metrics: Metrics, clock: Callable[[], float] = time.monotonic) -> None:
        self.store = store
        self.metrics = metrics
        self.clock = clock
        self._buckets: dict[tuple[str, str, int, int], _Bucket] = {}
        self._next_sweep = 0.0
        self._tasks: set[asyncio.Task[None]] = set()

    async def check(
        self, route: Route, key_id: str, key_limits: tuple[RateLimit, ...], credits: CreditPolicy | None
    ) -> Denial | None:
        """None when the request may pass (its share of every limit, and its cost, taken); else the
        refusal, with nothing taken."""
        pay = credits if credits is not None and route.cost > 0 else None
        if not key_limits and not route.ratelimits and pay is None:
            return None
        now = self.clock()
        if now >= self._next_sweep:
            self._sweep(now)
        taken: list[tuple[_Bucket, int]] = []
        asks: list[_Bucket] = []
        for applied in effective(key_limits, route):
            bucket = self._bucket(key_id, applied.scope, applied.limit, now)
            if bucket.tokens > 0:
                bucket.tokens -= 1
                taken.append((bucket, bucket.index))
            elif bucket.exhausted:
                self._refund(taken)
                return Denial(
                    "rate_limited", headers=refusal_headers([(bucket.limit, 0, (bucket.resets - now) * 1000)])
                )
            else:
                asks.append(bucket)
        if not asks and pay is None:
            for bucket, _ in taken:
                if bucket.tokens * 2 < bucket.cap and not bucket.refilling:
                    self._top_up(bucket, now)
            return None
        return await self._ask(route, asks, pay, taken, now)

    def _bucket(self, key_id: str, scope: str, limit: RateLimit, now: float) -> _Bucket:
        ident = (key_id, scope, limit.limit, limit.window_seconds)
        bucket = self._buckets.get(ident)
        if bucket is None:
            if len(self._buckets) >= MAX_BUCKETS:
                self._evict_oldest(now)
            bucket = self._buckets[ident] = _Bucket(self.store.counter(key_id, scope, limit.window_seconds), limit)
        elif now >= bucket.ends:  # its window is over: what it held is worth nothing now
            bucket.tokens = 0
            bucket.exhausted = False
        bucket.used = now
        return bucket

    async def _ask(
        self,
        route: Route,
        asks: list[_Bucket],
        pay: CreditPolicy | None,
        taken: list[tuple[_Bucket, int]],
        sent: float,
    ) -> Denial | None:
        op: list[str | int] = [len(asks)]
        wanted: list[bool] = []
        for bucket in asks:
            want = not bucket.refilling  # one larger slice in flight per bucket: the held total stays bounded
            bucket.refilling = bucket.refilling or want
            wanted.append(want)
            op += [bucket.counter, bucket.limit.limit, bucket.limit.window_seconds, 1, _WANT_ALL if want else 0]
        if pay is not None:
            op += [self.store.credits(pay.pool), route.cost, pay.refill_amount or 0, pay.refill_interval or 0]
        else:
            op += ["", 0, 0, 0]
        try:
            row = await self.store.submit(op)
        except StoreFailed:
            for bucket, want in zip(asks, wanted, strict=True):
                if want:
                    bucket.refilling = False
            return self._store_failed(route, asks, pay, taken)
        except BaseException:
            for bucket, want in zip(asks, wanted, strict=True):
                if want:
                    bucket.refilling = False
            self._refund(taken)
            raise
        verdict, _credits, refill_in = row[0], row[1], row[2]
        refused: list[tuple[RateLimit, int, float]] = []
        for n, (bucket, want) in enumerate(zip(asks, wanted, strict=True)):
            granted, left, reset_ms, index, cap = row[3 + 5 * n : 8 + 5 * n]
            if want:
                bucket.refilling = False
            self._apply(bucket, max(0, granted - 1), left, reset_ms, index, cap, sent)
            if verdict != ALLOW and left < 1:
                refused.append((bucket.limit, left, reset_ms))
        if verdict == ALLOW:
            return None
        self._refund(taken)
        if verdict == EXHAUSTED:
            retry = seconds_until(refill_in) if refill_in >= 0 else NO_REFILL_RETRY_AFTER
            return Denial("usage_exceeded", headers={"Retry-After": str(retry)})
        return Denial("rate_limited", headers=refusal_headers(refused))

    def _apply(self, bucket: _Bucket, extra: int, left: int, reset_ms: int, index: int, cap: int, sent: float) -> None:
        """Redis's answer for a bucket: `extra` granted beyond the request's own, `left` in the window."""
        if index > bucket.index:  # a new window: what was held belonged to the old one
            bucket.index = index
            bucket.tokens = 0
            bucket.ends = sent + reset_ms / 1000  # from the send: never later than Redis's own end
            bucket.resets = self.clock() + reset_ms / 1000  # from the reply: never earlier
        elif index < bucket.index:
            return  # an answer about a window that is over: its grant is worth nothing
        bucket.tokens += extra
        bucket.cap = cap
        bucket.exhausted = left <= 0

    def _top_up(self, bucket: _Bucket, now: float) -> None:
        """Ask, in the background, for the slice to be filled up again (need 0: nothing is refused)."""
        bucket.refilling = True
        op: list[str | int] = [1, bucket.counter, bucket.limit.limit, bucket.limit.window_seconds, 0,
                               bucket.cap - bucket.tokens, "", 0, 0, 0]  # fmt: skip
        future = self.store.submit(op)

        def done(f: asyncio.Future[list[int]]) -> None:
            bucket.refilling = False
            if f.cancelled() or f.exception() is not None:
                return
            granted, left, reset_ms, index, cap = f.result()[3:8]
            self._apply(bucket, granted, left, reset_ms, index, cap, now)

        future.add_done_callback(done)

    @staticmethod
    def _refund(taken: list[tuple[_Bucket, int]]) -> None:
        for bucket, index in taken:
            if bucket.index == index:  # still the window it was taken from
                bucket.tokens += 1

    def _store_failed(
        self, route: Route, asks: list[_Bucket], pay: CreditPolicy | None, taken: list[tuple[_Bucket, int]]
    ) -> Denial | None:
        self.metrics.redis_errors.labels("ratelimit").inc()
        deny = pay is not None or any(bucket.limit.on_store_error == "deny" for bucket in asks)
        self.metrics.ratelimit_store_error_decisions.labels(route.name, "denied" if deny else "allowed").inc()
        if deny:
            self._refund(taken)
            return _UNAVAILABLE
        return None

    # slices held: given back when idle, dropped when over ----------------------------------------

    def _sweep(self, now: float) -> None:
        self._next_sweep = now + SWEEP_EVERY
        idle = now - IDLE_RETURN
        back: list[tuple[str, int]] = []
        gone: list[tuple[str, str, int, int]] = []
        for ident, bucket in self._buckets.items():
            if bucket.used > idle:
                continue
            if now < bucket.ends and bucket.tokens > 0 and not bucket.refilling:
                back.append((f"{bucket.counter}:{bucket.index}", bucket.tokens))
                bucket.tokens = 0
            elif now >= bucket.ends and not bucket.refilling:
                gone.append(ident)
        for ident in gone:
            del self._buckets[ident]
        if back:
            self._spawn(back)

    def _evict_oldest(self, now: float) -> None:
        ident, bucket = next(iter(self._buckets.items()))
        del self._buckets[ident]
        if now < bucket.ends and bucket.tokens > 0:
            self._spawn([(f"{bucket.counter}:{bucket.index}", bucket.tokens)])

    def _spawn(self, back: list[tuple[str, int]]) -> None:
        task = asyncio.get_running_loop().create_task(self._give_back(back))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _give_back(self, back: list[tuple[str, int]]) -> None:
        try:
            await self.store.release(back)
        except (StoreFailed, TimeoutError, OSError, Exception) as exc:  # the grants lapse with their window
            log.debug("rate limit slices not given back: %s", type(exc).__name__)

    async def close(self) -> None:
        """Give back every slice held (shutdown), bounded by the store's timeout."""
        now = self.clock()
        back = [(f"{b.counter}:{b.index}", b.tokens) for b in self._buckets.values() if b.tokens > 0 and now < b.ends]
        self._buckets.clear()
        with contextlib.suppress(Exception):
            await self.store.release(back)
        for task in list(self._tasks):
            with contextlib.suppress(Exception):
                await task
