"""Confirmed eviction: a key change answers only once every live replica dropped the key.

The admin handler opens an announcement (a nonce, registered for acks), the
store publishes the announcement's message inside the change's transaction
and reads the Redis time there too, each replica's subscriber evicts and
acks, and `confirmed()` waits, bounded by admin.propagation_timeout_seconds,
until every live replica has acked or has cleared its cache since the write.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from gateway.cache import KeyCache
from gateway.channel import Ack, Codec
from gateway.metrics import Metrics
from gateway.replicas import Registry


@dataclass(frozen=True, slots=True)
class Propagation:
    replicas: int
    confirmed: int
    ms: float

    def public(self) -> dict[str, float | int]:
        return {"replicas": self.replicas, "confirmed": self.confirmed, "ms": round(self.ms, 3)}


class Announcement:
    """One change's eviction: its message for the store's transaction, then the wait for acks."""

    def __init__(self, owner: Propagator, nonce: str) -> None:
        self._owner = owner
        self.nonce = nonce
        self.written_at_us: int | None = None
        self.hashes: list[str] = []
        self.acked: set[str] = set()
        self.arrived = asyncio.Event()

    def message(self, keys: list[tuple[str, int]]) -> bytes:
        """The evict message the store publishes inside the change's transaction."""
        self.hashes.extend(h for h, _ in keys)
        return self._owner.codec.evict(self.nonce, self._owner.registry.replica_id, keys)

    def written(self, at_us: int) -> None:
        self.written_at_us = at_us

    async def confirmed(self) -> Propagation:
        return await self._owner._wait(self)


class Propagator:
    """Waits, bounded, until every live replica has evicted the announced keys."""

    def __init__(
        self,
        *,
        codec: Codec,
        registry: Registry,
        cache: KeyCache,
        metrics: Metrics,
        timeout_seconds: float,
    ) -> None:
        self.metrics = metrics
        self.codec = codec
        self.registry = registry
        self.cache = cache
        self.timeout = timeout_seconds
        self._pending: dict[str, Announcement] = {}

    def on_ack(self, ack: Ack) -> None:
        announcement = self._pending.get(ack.nonce)
        if announcement is not None:
            announcement.acked.add(ack.replica)
            announcement.arrived.set()

    @contextlib.asynccontextmanager
    async def announce(self) -> AsyncIterator[Announcement]:
        announcement = Announcement(self, secrets.token_hex(8))
        self._pending[announcement.nonce] = announcement
        try:
            yield announcement
        finally:
            del self._pending[announcement.nonce]

    async def _wait(self, a: Announcement) -> Propagation:
        started = time.perf_counter()
        assert a.written_at_us is not None, "confirmed() before the change was written"
        written = a.written_at_us
        for key_hash in a.hashes:  # this process at once, whatever its subscriber's state
            self.cache.evict(key_hash)
        deadline = started + self.timeout
        _, live = await self.registry.live()
        refreshed = time.perf_counter()
        while True:
            # A replica whose cache was cleared after the write holds nothing stale.
            done = {r for r, epoch in live.items() if r in a.acked or epoch > written}
            now = time.perf_counter()
            if len(done) == len(live) or now >= deadline:
                self.metrics.live_replicas.set(len(live))
                self.metrics.propagation_seconds.observe(now - started)
                if len(done) < len(live):
                    self.metrics.unconfirmed.inc()
                return Propagation(len(live), len(done), (now - started) * 1000)
            a.arrived.clear()
            # Acks wake us at once; the live set is re-read now and then for
            # replicas that dropped out or resubscribed (and so cleared their cache).
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(a.arrived.wait(), min(deadline - now, 0.02))
            if time.perf_counter() - refreshed >= 0.02:
                _, live = await self.registry.live()
                refreshed = time.perf_counter()
