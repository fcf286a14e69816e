"""The replica's usage task: every `usage.flush_seconds` it takes what the counter holds and writes
it to Redis in one pipeline, then judges the keys it wrote against the policies; when the replica
stops (SIGTERM, after the drain) it writes once more, so a replica that stops loses no counts.

With policies configured the interval is at most `POLICY_FLUSH_SECONDS`: a policy acts within one
interval (and one evaluation) of its threshold being crossed, and the contract says 10 s.

A write that fails (Redis down) keeps its batches in the counter for the next one (bounded there:
counter.py). The request path never waits for any of this.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass, field

from prometheus_client import Counter as PromCounter
from prometheus_client import Gauge
from redis.exceptions import RedisError

from gateway.metrics import Metrics
from gateway.usage.counter import Batch, Counter
from gateway.usage.policies import PolicyEngine
from gateway.usage.store import UsageStore

log = logging.getLogger("gateway.usage")
POLICY_FLUSH_SECONDS = 5.0
_FINAL_FLUSH_SECONDS = 3.0  # how long the write at shutdown may take


@dataclass
class Flusher:
    counter: Counter
    store: UsageStore
    engine: PolicyEngine
    metrics: Metrics
    flush_seconds: float = 10.0
    _task: asyncio.Task[None] | None = field(default=None, init=False)
    _stopping: asyncio.Event = field(default_factory=asyncio.Event, init=False)
    _lock: asyncio.Lock = field(default_factory=asyncio.Lock, init=False)
    _unjudged: list[Batch] = field(default_factory=list, init=False)  # written, their evaluation failed

    def __post_init__(self) -> None:
        registry = self.metrics.registry
        self.flushes = PromCounter(
            "gateway_usage_flushes", "Usage writes to Redis, by outcome: ok, failed (kept for the next)",
            ["outcome"], registry=registry,
        )  # fmt: skip
        self.flushed_keys = PromCounter(
            "gateway_usage_flushed_keys", "Per-key usage records written to Redis", registry=registry
        )
        self.untracked = PromCounter(
            "gateway_usage_untracked_requests",
            "Requests not counted per key: more keys than usage.max_keys were used in one flush interval",
            registry=registry,
        )
        self.addresses_dropped = PromCounter(
            "gateway_usage_addresses_dropped",
            "Client addresses left out of a key's distinct-address count: more than usage.max_addresses "
            "for one key in one flush interval",
            registry=registry,
        )
        self.batches_dropped = PromCounter(
            "gateway_usage_batches_dropped",
            "Minutes of usage counts dropped because Redis could not take them for two hours",
            registry=registry,
        )
        self.tracked = Gauge("gateway_usage_tracked_keys", "Keys counted in the current interval", registry=registry)
        self.tracked.set_function(self.counter.tracked)

    @property
    def interval(self) -> float:
        if self.engine.policies:
            return min(self.flush_seconds, POLICY_FLUSH_SECONDS)
        return self.flush_seconds

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="usage-flusher")

    async def stop(self) -> None:
        """End the schedule (a write in progress finishes: cancelling it could lose what it took),
        then write what is left; both bounded by _FINAL_FLUSH_SECONDS."""
        self._stopping.set()
        try:
            if self._task is not None:
                await asyncio.wait_for(asyncio.shield(self._task), _FINAL_FLUSH_SECONDS)
            await asyncio.wait_for(self.flush(), _FINAL_FLUSH_SECONDS)
        except TimeoutError:
            log.warning("usage: the final write did not finish in %gs; its counts are lost", _FINAL_FLUSH_SECONDS)
        except Exception:  # the shutdown goes on
            log.exception("usage: the final write failed")
        finally:
            if self._task is not None and not self._task.done():
                self._task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._task
            self._task = None

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        next_at = loop.time() + self.interval
        while not self._stopping.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), max(0.0, next_at - loop.time()))
            if self._stopping.is_set():
                return  # stop() writes what is left
            next_at = max(next_at + self.interval, loop.time())
            try:
                await self.flush()
            except Exception:  # the schedule goes on: one bad round must not end counting
                log.exception("usage: flush failed")

    async def flush(self) -> int:
        """One write of everything counted so far, then the policies on the keys written.
        Returns the keys written (0 when the write failed: its batches wait for the next)."""
        async with self._lock:
            c = self.counter
            batches = c.take()
            for counter, attr in ((self.untracked, "untracked"), (self.addresses_dropped, "addresses_dropped"),
                                  (self.batches_dropped, "batches_dropped")):  # fmt: skip
                n = getattr(c, attr)
                if n:
                    counter.inc(n)
                    setattr(c, attr, 0)
                    if attr == "untracked":
                        log.warning("usage: %d request(s) not counted per key: more than %d keys in one interval",
                                    n, c.max_keys)  # fmt: skip
            if not batches:
                return 0
            started = time.perf_counter()
            try:
                written = await self.store.write(batches)
            except (RedisError, OSError, TimeoutError) as exc:
                c.put_back(batches)
                self.flushes.labels("failed").inc()
                log.warning("usage: write failed (%s); kept for the next one", type(exc).__name__)
                return 0
            self.flushes.labels("ok").inc()
            self.flushed_keys.inc(written)
            log.debug("usage: wrote %d key(s) in %.1f ms", written, (time.perf_counter() - started) * 1000)
            judged, self._unjudged = self._unjudged + batches, []
            try:
                await self.engine.evaluate(judged)
            except (RedisError, OSError, TimeoutError) as exc:
                self._unjudged = judged[-200:]  # judged again with the next flush (bounded)
                log.warning("usage: policy evaluation failed (%s); the next flush judges again", type(exc).__name__)
            return written
