"""Key lookup on the request path: the cache first, then Redis.

Redis failures are translated here, once, into AuthUnavailable: the request
path answers 503 auth_unavailable and never forwards.
"""

from __future__ import annotations

from redis.exceptions import RedisError

from .cache import MISS, KeyCache
from .keys import KeyRecord
from .store import KeyStore


class AuthUnavailable(Exception):
    """The key table could not be read and the answer is not in the cache."""


class KeyLookup:
    def __init__(self, store: KeyStore, cache: KeyCache) -> None:
        self.store = store
        self.cache = cache

    async def find(self, key_hash: str) -> KeyRecord | None:
        cached = self.cache.get(key_hash)
        if cached is not MISS:
            return cached  # type: ignore[return-value]
        generation = self.cache.generation
        try:
            record = await self.store.get_by_hash(key_hash)
        except (TimeoutError, RedisError, OSError):
            raise AuthUnavailable from None
        self.cache.put(key_hash, record, generation)
        return record
