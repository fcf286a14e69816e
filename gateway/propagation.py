"""Telling every replica's cache that a key changed, and reporting who confirmed.

A change is written to Redis and announced on the channel by the store; this
module makes sure caches drop the key before the admin call answers. On one
replica that is a local eviction; the cross-replica subscriber plugs in here.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Protocol

from .cache import KeyCache


@dataclass(frozen=True, slots=True)
class Propagation:
    replicas: int
    confirmed: int
    ms: float

    def public(self) -> dict[str, float | int]:
        return {"replicas": self.replicas, "confirmed": self.confirmed, "ms": round(self.ms, 3)}


class Propagator(Protocol):
    async def evict(self, key_hashes: list[str]) -> Propagation: ...


class LocalPropagator:
    """This process only: evicts from its own cache, one replica, confirmed."""

    def __init__(self, cache: KeyCache) -> None:
        self.cache = cache

    async def evict(self, key_hashes: list[str]) -> Propagation:
        started = time.perf_counter()
        for key_hash in key_hashes:
            self.cache.evict(key_hash)
        return Propagation(1, 1, (time.perf_counter() - started) * 1000)
