"""One replica's invalidation subscriber and its coherence state (spec 8).

The cache is trusted only while the subscription is known to be live. Any
doubt (a connection error, a reconnect, a subscribe confirmation we did not
ask for, Redis silent past the health-check interval) makes the replica
incoherent at once: lookups bypass the cache and go to Redis, and the replica
leaves the live set so nobody waits for its ack. Once subscribed again (both
confirmations seen) it reads an epoch, rejoins the live set, clears the cache,
and only then trusts it.

Trust is also a lease, so that a link that goes silent without closing (a
half-open connection through a relay) cannot keep it alive until the health
check notices: a probe PUBLISHed at monotonic time t by this replica's command
client (the connections changes are written and published on) to a channel of
its own, and heard on the subscription connection, extends the trust to t +
redis.lease_seconds (from the send, not the arrival). Redis delivers what it
publishes to a subscriber in the order it ran the PUBLISHes, whatever their
channel, so every change published before the probe ran was handled before the
probe is heard. Probes go out every quarter of the lease, each with its own
random payload, so an arrival is matched to its own send time and a healthy
link keeps the lease alive without a gap. A probe, not a PING on the
subscription connection: a subscription left on another server than the one
the commands reach (a demoted master that still answers, after a failover the
sentinels told the command pool about) answers PINGs, but hears none of the
probes, so its trust lapses instead of outliving the changes it never hears.
The SUBSCRIBE that opened the session counts as the first lease. Why this lets a disable's answer stop
waiting for a replica that never acked is argued in gateway/coherence/propagation.py.

Trust also ends before the replica's live-set membership can have expired:
at the send time of its last successful join or heartbeat plus the member TTL,
less the clock-rate and in-flight margins. A replica that dropped out of the
live set (nobody waits for its ack any more) therefore no longer answers from
its cache.

redis-py's PubSub reconnects and resubscribes on its own; this module never
relies on that: it uses a client with retries off, and treats any error or
unexpected subscribe message as a break and starts a fresh PubSub.
"""

from __future__ import annotations

import asyncio
import logging
import math
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from redis.asyncio import Redis

from gateway.coherence.channel import Ack, Codec, Evict, Rejected
from gateway.coherence.replicas import Registry
from gateway.keytable.cache import KeyCache
from gateway.keytable.keyfilter import ChangeLog, KnownKeys, Prefixes, each
from gateway.keytable.lease import Coherence, membership_trusted_until
from gateway.keytable.store import as_bytes
from gateway.metrics import Metrics

log = logging.getLogger("gateway.subscriber")


class Break(Exception):
    """The subscription can no longer be trusted."""


class Subscriber:
    def __init__(
        self,
        *,
        listen_client: Redis,
        redis: Redis,
        prefix: str,
        codec: Codec,
        cache: KeyCache,
        coherence: Coherence,
        registry: Registry,
        metrics: Metrics,
        on_ack: Callable[[Ack], None],
        health_check_seconds: float,
        known: KnownKeys | None = None,
        table: Callable[[], AsyncIterator[str | Prefixes]] | None = None,
        changes: ChangeLog | None = None,
    ) -> None:
        self.listen_client = listen_client  # retries off: errors must surface
        self.redis = redis
        self.events = prefix + "events"
        self.acks = prefix + "acks"
        self.probes = f"{prefix}probe:{registry.replica_id}"  # this replica's lease probes (above)
        self._probing: set[asyncio.Task[Any]] = set()  # probes being published
        self.codec = codec
        self.cache = cache
        self.coherence = coherence
        self.registry = registry
        self.metrics = metrics
        self.on_ack = on_ack
        self.interval = health_check_seconds
        self.known = known if known is not None else KnownKeys(enabled=False)
        self.table = table  # every key hash in the table, for rebuilding `known`
        self.changes = changes  # the change log `known` catches up from instead of a scan, when it can
        self.rebuilds = {"scan": 0, "catch_up": 0}  # how `known` became ready, each time
        self.sessions = 0  # how many times a subscription was (re)established
        self.clock = coherence.clock
        self.member_ttl = registry.ttl_ms / 1000
        # A quarter of the lease between pings: a reply may take most of a lease to come back
        # and the trust still has no gap. Never rarer than the silence check needs.
        self.ping_every = min(coherence.lease_seconds, health_check_seconds) / 4
        metrics.coherent.set_function(lambda: int(coherence.coherent))
        metrics.lease_remaining.set_function(coherence.remaining)

    async def run(self) -> None:
        backoff = 0.05
        while True:
            established = self.sessions
            try:
                await self._session()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # every failure is a break; the reason is logged by type only
                self.metrics.redis_errors.labels("subscription").inc()
                if self.sessions != established:  # _session's finally has already stopped trusting the cache
                    why = str(exc) if isinstance(exc, Break) else type(exc).__name__
                    log.warning(
                        "invalidation subscription lost (%s): reading every key from Redis until resubscribed", why
                    )
                try:  # best effort: if Redis is unreachable, the heartbeat expires instead
                    await asyncio.wait_for(self.registry.leave(), self.interval)
                except Exception:  # noqa: S110 - expiry covers it
                    pass
                await self._follow_master()
            backoff = 0.05 if self.sessions != established else min(backoff * 2, 1.0)
            await asyncio.sleep(backoff)

    async def _follow_master(self) -> None:
        """With Sentinel (runtime/connect.py): ask the sentinels where the master is now; redis-py's
        SentinelConnectionPool drops its idle connections when it moved, so after a failover no
        lookup reads the demoted master's stale table. A plain pool has nothing to ask (and closing
        its idle connections here would race the lookups taking them: 503s for nothing)."""
        where = getattr(self.redis.connection_pool, "get_master_address", None)
        if where is None:
            return
        try:  # best effort: if no sentinel answers, every new connection asks again anyway
            await asyncio.wait_for(where(), self.interval)
        except Exception:  # noqa: S110 - the next connection asks the sentinels itself
            pass

    async def _session(self) -> None:
        pubsub = self.listen_client.pubsub()
        rebuild: asyncio.Task[bool] | None = None
        try:
            subscribe_sent = self.clock()  # the session's first lease counts from this send
            await pubsub.subscribe(self.events, self.acks, self.probes)
            await self._await_confirmations(pubsub)
            # Subscribed: anything published from now on reaches us. What we
            # may have missed before is wiped with the cache. The epoch is read
            # before the clear, so "epoch later than a write" means "cleared after it".
            epoch = await self.registry.now_us()
            # Join before trusting the cache: from the moment it answers from the
            # cache, every change must wait for its ack (its epoch covers what came before).
            join_sent = self.clock()
            await self.registry.join(epoch)
            self.cache.clear()
            self.coherence.restored(subscribe_sent, membership_trusted_until(join_sent, self.member_ttl))
            self.sessions += 1
            log.info("invalidation subscription live; cache cleared")
            if self.known.enabled and self.table is not None:
                # Announcements reach us from now on; the scan finds every key written before.
                rebuild = asyncio.get_running_loop().create_task(self._rebuild_known(), name="key-filter-rebuild")
            await self._listen(pubsub, join_sent)
        finally:
            # Before anything else can run: from here on the cache (and the key filter) is not trusted.
            self.coherence.lost()
            self.known.lost()
            if rebuild is not None:
                rebuild.cancel()
            try:
                await pubsub.aclose()  # type: ignore[no-untyped-call]
            except Exception:  # noqa: S110 - the connection is being discarded anyway
                pass

    async def _rebuild_known(self) -> bool:
        """Until it succeeds in this session (the task is cancelled when the session ends): a scan
        that fails is tried again, so one Redis timeout does not leave the filter off for days."""
        backoff = 1.0
        while True:
            try:
                return await self._catch_up_or_scan()
            except Exception as exc:  # the filter stays off meanwhile; every lookup goes on as before
                log.warning("key filter not built (%s): unknown keys are looked up in Redis; retrying in %gs",
                            type(exc).__name__, backoff)  # fmt: skip
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 30.0)

    async def _catch_up_or_scan(self) -> bool:
        """The keys the change log names since the filter was last complete, or else a full scan.
        The checkpoint is read now, with the subscription live: every key written after it is
        announced to this session, every key written before it is in the scan (or the catch-up)."""
        assert self.table is not None
        session = self.known.session
        mark = await self.changes.checkpoint() if self.changes is not None else None
        since = self.known.checkpoint
        if self.changes is not None and mark is not None and since is not None:
            hashes = await self.changes.hashes_since(since, mark)
            if hashes is not None:
                done = await self.known.rebuild(each(hashes), mark, session=session)
                if done:
                    self.rebuilds["catch_up"] += 1
                    log.info("key filter caught up from the change log: %d key(s) changed meanwhile", len(hashes))
                return done
        done = await self.known.rebuild(self.table(), mark, session=session)
        self.rebuilds["scan"] += done
        return done

    async def _await_confirmations(self, pubsub: Any) -> None:
        wanted = {self.events.encode(), self.acks.encode(), self.probes.encode()}
        deadline = time.monotonic() + max(self.interval, 1.0) * 2
        while wanted:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise Break("no subscribe confirmation")
            message = await pubsub.get_message(timeout=remaining)
            if message is None:
                continue
            if message["type"] == "subscribe":
                wanted.discard(as_bytes(message["channel"]))
            elif message["type"] == "message":
                await self._handle(message)

    async def _listen(self, pubsub: Any, beat: float) -> None:
        """Messages, lease pings and heartbeats until a break. `beat`: when the join was sent."""
        clock = self.clock
        pings: dict[bytes, float] = {}  # payload -> send time of every probe not yet heard, oldest first
        next_ping = clock()
        probes = self.probes.encode()
        while True:
            now = clock()
            if now >= next_ping:
                payload = secrets.token_bytes(12)  # not guessable: only our own probe renews the lease
                pings[payload] = now  # taken before the send: Redis runs the PUBLISH later than this
                # Not awaited here (messages keep flowing meanwhile); a probe that fails is never
                # heard, and the silence check below ends the session.
                probe = asyncio.get_running_loop().create_task(self._probe(payload))
                self._probing.add(probe)  # held until done, past this session if need be
                probe.add_done_callback(_forget(self._probing))
                next_ping = now + self.ping_every
            if now - beat >= self.interval:
                # Bounded: a stalled link must not keep this loop from noticing the silence.
                sent = clock()
                await self._bounded(self.registry.heartbeat(), "heartbeat")
                self.coherence.membership(membership_trusted_until(sent, self.member_ttl))
                beat = sent
            oldest = next(iter(pings.values()), None)
            now = clock()
            if oldest is not None and now - oldest > self.interval:
                raise Break("silence past the health-check interval")
            wake = min(next_ping, beat + self.interval, math.inf if oldest is None else oldest + self.interval)
            message = await pubsub.get_message(timeout=max(0.0, min(wake - now, self.interval / 2)))
            if message is None:
                continue
            kind = message["type"]
            if kind == "message" and as_bytes(message["channel"]) == probes:
                sent_at = pings.get(as_bytes(message["data"]))
                if sent_at is not None:
                    # Probes are heard in the order Redis ran them: an older one is heard or never will be.
                    pings = {p: t for p, t in pings.items() if t > sent_at}
                    # Every message Redis published before it ran this probe was handled above.
                    self.coherence.renew(sent_at)
            elif kind == "message":
                await self._handle(message)
            elif kind in ("subscribe", "unsubscribe"):
                # A confirmation we did not ask for: the client reconnected behind our back.
                raise Break("unexpected " + kind)

    async def _handle(self, message: dict[str, Any]) -> None:
        decoded = self.codec.decode(message["data"])
        if isinstance(decoded, Rejected):
            self.metrics.invalidations.labels("ignored_" + decoded.reason).inc()
            return
        if isinstance(decoded, Ack):
            self.on_ack(decoded)
            return
        assert isinstance(decoded, Evict)
        for key_hash, _version in decoded.keys:
            self.known.add(key_hash)  # before the ack: a new key is known everywhere once its create returns
            self.cache.evict(key_hash)
        self.metrics.invalidations.labels("applied").inc()
        await self._bounded(
            self.redis.publish(self.acks, self.codec.ack(decoded.nonce, self.registry.replica_id)), "ack"
        )

    async def _probe(self, payload: bytes) -> None:
        await self.redis.publish(self.probes, payload)

    async def _bounded(self, call: Awaitable[Any], what: str) -> None:
        try:
            await asyncio.wait_for(call, self.interval / 2)
        except TimeoutError:
            raise Break(f"{what} took longer than half the health-check interval") from None


def _forget(tasks: set[asyncio.Task[Any]]) -> Callable[[asyncio.Task[Any]], None]:
    """A done callback: the probe's task leaves `tasks`, its error (the probe is then never heard)
    retrieved so that asyncio does not log it."""

    def done(task: asyncio.Task[Any]) -> None:
        tasks.discard(task)
        if not task.cancelled():
            task.exception()

    return done
