"""Key lookup on the request path: the cache first (when it can be trusted), then Redis.

Redis failures are translated here, once, into AuthUnavailable: the request
path answers 503 auth_unavailable and never forwards. While the replica is
incoherent (its invalidation subscription may have missed a message, or its
cache lease has run out: gateway/keytable/lease.py) the cache is not read: every
key comes from Redis. `coherence.coherent` is read once per lookup (a clock
read), before the cache; the answer's wait covers the time from that check to
the request's first byte upstream (coherence/propagation.py, IN_FLIGHT_MARGIN). While coherent, a key whose hash is
not in the replica's key filter (gateway/keytable/keyfilter.py) is unknown without a read. Only if the operator set
cache.serve_stale_seconds, and only for that long after the break, may a
cached entry answer while Redis cannot.
"""

from __future__ import annotations

import asyncio

from redis.exceptions import RedisError

from gateway.keytable.cache import MISS, KeyCache
from gateway.keytable.keyfilter import KnownKeys
from gateway.keytable.lease import Coherence
from gateway.keytable.record import KeyRecord
from gateway.keytable.store import KeyStore
from gateway.metrics import Metrics


class AuthUnavailable(Exception):
    """The key table could not be read and the answer is not in the cache."""


class _LeaderGone(Exception):
    """The request that was reading a key for everyone was cancelled."""


class _Failed(Exception):
    """The shared read failed; each waiter answers for itself (stale entry or 503)."""


class KeyLookup:
    def __init__(
        self,
        store: KeyStore,
        cache: KeyCache,
        coherence: Coherence,
        serve_stale_seconds: float,
        metrics: Metrics | None = None,
        known: KnownKeys | None = None,
    ) -> None:
        self.store = store
        self.known = known if known is not None else KnownKeys(enabled=False)
        self.cache = cache
        self.coherence = coherence
        self.serve_stale_seconds = serve_stale_seconds
        self.metrics = metrics
        # key hash -> (cache generation when the read began, its answer): one Redis read per key at a time.
        self._flights: dict[str, tuple[int, asyncio.Future[KeyRecord | None]]] = {}

    async def find(self, key_hash: str) -> KeyRecord | None:
        if self.coherence.coherent:
            cached = self.cache.get(key_hash)
            if cached is not MISS:
                return cached
            if self.known.absent(key_hash):  # not in the table: no Redis read (ready only while coherent)
                return None
        generation = self.cache.generation
        flight = self._flights.get(key_hash)
        if flight is not None and flight[0] == generation:
            # Single flight: a read of this key started since the last eviction is already on
            # its way; share its answer. One begun before an eviction is never joined.
            try:
                return await asyncio.shield(flight[1])
            except _LeaderGone:
                pass  # its request was cancelled: read for ourselves
            except _Failed:
                return self._stale_or_fail(key_hash)  # Redis failed for the shared read: as if for ours
        return await self._read(key_hash, generation)

    async def _read(self, key_hash: str, generation: int) -> KeyRecord | None:
        answer: asyncio.Future[KeyRecord | None] = asyncio.get_running_loop().create_future()
        self._flights[key_hash] = (generation, answer)
        try:
            record = await self.store.get_by_hash(key_hash)
        except (TimeoutError, RedisError, OSError) as exc:
            if self.metrics is not None:
                self.metrics.redis_errors.labels("lookup").inc()
            answer.set_exception(_Failed(exc))
            answer.exception()  # retrieved here; joiners see it too
            return self._stale_or_fail(key_hash)
        except BaseException:
            answer.set_exception(_LeaderGone())
            answer.exception()
            raise
        else:
            answer.set_result(record)
        finally:
            if self._flights.get(key_hash, (None, None))[1] is answer:
                del self._flights[key_hash]
        if self.coherence.coherent:
            # Only while trusted: what is cached during a break could outlive it
            # (resubscribing clears the cache) or be served stale from it.
            self.cache.put(key_hash, record, generation)
        return record

    def _stale_or_fail(self, key_hash: str) -> KeyRecord | None:
        window = self.serve_stale_seconds
        if window > 0 and self.coherence.broken_for() <= window:
            stale = self.cache.peek_stale(key_hash, window)
            if stale is not MISS:
                return stale
        raise AuthUnavailable from None
