"""Key lookup on the request path: the cache first (when it can be trusted), then Redis.

Redis failures are translated here, once, into AuthUnavailable: the request
path answers 503 auth_unavailable and never forwards. While the replica is
incoherent (its invalidation subscription may have missed a message) the cache
is not read: every key comes from Redis. Only if the operator set
cache.serve_stale_seconds, and only for that long after the break, may a
cached entry answer while Redis cannot.
"""

from __future__ import annotations

from redis.exceptions import RedisError

from gateway.cache import MISS, KeyCache
from gateway.keys import KeyRecord
from gateway.metrics import Metrics
from gateway.store import KeyStore
from gateway.subscriber import Coherence


class AuthUnavailable(Exception):
    """The key table could not be read and the answer is not in the cache."""


class KeyLookup:
    def __init__(
        self,
        store: KeyStore,
        cache: KeyCache,
        coherence: Coherence,
        serve_stale_seconds: float,
        metrics: Metrics | None = None,
    ) -> None:
        self.store = store
        self.cache = cache
        self.coherence = coherence
        self.serve_stale_seconds = serve_stale_seconds
        self.metrics = metrics

    async def find(self, key_hash: str) -> KeyRecord | None:
        if self.coherence.coherent:
            cached = self.cache.get(key_hash)
            if cached is not MISS:
                return cached  # type: ignore[return-value]
        generation = self.cache.generation
        try:
            record = await self.store.get_by_hash(key_hash)
        except (TimeoutError, RedisError, OSError):
            if self.metrics is not None:
                self.metrics.redis_errors.labels("lookup").inc()
            return self._stale_or_fail(key_hash)
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
                return stale  # type: ignore[return-value]
        raise AuthUnavailable from None
