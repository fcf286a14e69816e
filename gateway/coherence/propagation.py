"""Confirmed eviction: a key change answers only once no live replica can still serve the old state.

The admin handler opens an announcement (a nonce, registered for acks), the
store publishes the announcement's message inside the change's transaction
and reads the Redis time there too, each replica's subscriber evicts and
acks, and `confirmed()` waits until every live replica has acked or has
cleared its cache since the write (its epoch is later), or, for a live replica
that has done neither, until its cache lease has certainly lapsed: the answer
reports `fenced` for those.

Why a lapsed lease is enough (gateway/keytable/lease.py keeps the lease): a
replica trusts its cache until t + lease, where t is when it published a probe
(through its command client, to a channel of its own) that it has heard on its
subscription connection (coherence/subscriber.py). Redis runs the probe's
PUBLISH and the change's script (which holds the change's PUBLISH) one after
the other, and delivers to a subscriber in that order.

- If Redis ran the probe after the change, the evict message was written to
  that replica's subscription before the probe: the replica's loop, which
  handles messages in the order they arrive, evicted the key before it heard
  the probe that extends its lease. Any later lease is earned with the key
  already gone.
- If Redis ran the probe before the change, then t (taken before the send)
  came before the EXEC ran, which came before this process saw the EXEC's
  reply, where `written` takes its monotonic time. So that lease ends before
  written + lease on any clock that runs within CLOCK_RATE_MARGIN of ours; the
  answer waits until written + lease * (1 + CLOCK_RATE_MARGIN) +
  IN_FLIGHT_MARGIN, the last term for a request that passed its cache check
  just before the lease ended and has yet to send its first byte upstream.

A replica not in the live set is not waited for at all: its trust ends before
its membership can expire (and it leaves only after it stopped trusting).

admin.propagation_timeout_seconds is how long an answer waits for acks before
it settles for fencing; it never shortens the fence: with a live replica
unconfirmed, the answer comes at the later of the timeout and the lease's
certain lapse (by default 1.0 s and ~1.09 s after the write). A healthy change
answers as soon as every live replica has acked, in milliseconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import statistics
import time
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass

from gateway.coherence.channel import Ack, Codec
from gateway.coherence.replicas import Registry
from gateway.keytable.cache import KeyCache
from gateway.keytable.lease import lease_lapsed_by
from gateway.metrics import Metrics


@dataclass(frozen=True, slots=True)
class Propagation:
    replicas: int
    confirmed: int
    ms: float
    fenced: int = 0  # live, not confirmed, but its cache lease has certainly lapsed

    def public(self) -> dict[str, float | int]:
        return {"replicas": self.replicas, "confirmed": self.confirmed, "fenced": self.fenced, "ms": round(self.ms, 3)}


RECENT = 200  # changes /v1/status sums up


class Announcement:
    """One change's eviction: its message for the store's transaction, then the wait for acks."""

    def __init__(self, owner: Propagator, nonce: str) -> None:
        self._owner = owner
        self.nonce = nonce
        self.written_at_us: int | None = None
        self.written_at: float | None = None  # this process's monotonic clock, after the EXEC returned
        self.live: dict[str, int] | None = None  # the live set as the change's own script read it
        self.hashes: list[str] = []
        self.acked: set[str] = set()
        self.arrived = asyncio.Event()

    def message(self, keys: list[tuple[str, int]]) -> bytes:
        """The evict message the store publishes inside the change's transaction."""
        self.hashes.extend(h for h, _ in keys)
        return self._owner.codec.evict(self.nonce, self._owner.registry.replica_id, keys)

    def written(self, at_us: int, live: dict[str, int] | None = None) -> None:
        self.written_at = time.monotonic()  # called once the transaction's reply is in
        self.written_at_us = at_us
        self.live = live

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
        lease_seconds: float,
    ) -> None:
        self.metrics = metrics
        self.codec = codec
        self.registry = registry
        self.cache = cache
        self.timeout = timeout_seconds
        self.lease = lease_seconds
        self._pending: dict[str, Announcement] = {}
        self.recent: deque[Propagation] = deque(maxlen=RECENT)  # this replica's latest changes, for /v1/status

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
        started = time.monotonic()
        assert a.written_at_us is not None and a.written_at is not None, "confirmed() before the change was written"
        written = a.written_at_us
        for key_hash in a.hashes:  # this process at once, whatever its subscriber's state
            self.cache.evict(key_hash)
        # With a live replica unconfirmed, the answer comes no earlier than `fenced_at`.
        fenced_at = lease_lapsed_by(a.written_at, self.lease)
        deadline = max(started + self.timeout, fenced_at)
        # Read by the change's own script (one round trip: spec 13), or now.
        live = a.live if a.live is not None else (await self.registry.live())[1]
        refreshed = time.monotonic()
        while True:
            # A replica whose cache was cleared after the write holds nothing stale.
            done = {r for r, epoch in live.items() if r in a.acked or epoch > written}
            now = time.monotonic()
            if len(done) == len(live) or now >= deadline:
                self.metrics.live_replicas.set(len(live))
                self.metrics.propagation_seconds.observe(now - started)
                fenced = len(live) - len(done)
                if fenced:  # only past the deadline, so past `fenced_at`
                    self.metrics.unconfirmed.inc()
                    self.metrics.fenced.inc(fenced)
                outcome = Propagation(len(live), len(done), (now - started) * 1000, fenced)
                self.recent.append(outcome)
                return outcome
            a.arrived.clear()
            # Acks wake us at once; the live set is re-read now and then for
            # replicas that dropped out or resubscribed (and so cleared their cache).
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(a.arrived.wait(), min(deadline - now, 0.02))
            if time.monotonic() - refreshed >= 0.02:
                _, live = await self.registry.live()
                refreshed = time.monotonic()

    def figures(self) -> dict[str, float | int | None]:
        """The latest changes this replica made (up to RECENT): how long their confirmation took
        (propagation.ms: p50, p99, max) and how many fenced a replica instead of hearing its ack."""
        ms = sorted(p.ms for p in self.recent)
        if not ms:
            return {"changes": 0, "p50_ms": None, "p99_ms": None, "max_ms": None, "fenced": 0}
        p99 = ms[min(len(ms) - 1, round(0.99 * (len(ms) - 1)))]
        return {
            "changes": len(ms),
            "p50_ms": round(statistics.median(ms), 3),
            "p99_ms": round(p99, 3),
            "max_ms": round(ms[-1], 3),
            "fenced": sum(p.fenced > 0 for p in self.recent),
        }
