"""The in-process key cache: positive and negative TTLs, bounded size, generations.

The generation counter closes the stale-refill race (spec 8): a lookup notes
the generation before it reads Redis and may only store its answer if no
eviction happened since. An eviction that lands while the read is in flight
bumps the generation, so the (possibly stale) answer is served once to the
request that asked before the eviction and never cached.
"""

from __future__ import annotations

import enum
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Final, Literal

from gateway.keytable.record import KeyRecord


class Miss(enum.Enum):
    """Not in the cache (or expired): distinct from None, a cached "unknown key"."""

    MISS = enum.auto()


MISS: Final = Miss.MISS
Cached = KeyRecord | None | Literal[Miss.MISS]  # what `get` and `peek_stale` answer
NEGATIVE_MAX: Final = 10_000  # unknown keys remembered at most (each costs ~200 bytes)


class KeyCache:
    def __init__(
        self,
        ttl_seconds: float,
        negative_ttl_seconds: float,
        max_entries: int,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._ttl = ttl_seconds
        self._negative_ttl = negative_ttl_seconds
        self._max = max_entries
        self._clock = clock
        self._entries: OrderedDict[str, tuple[float, KeyRecord | None]] = OrderedDict()
        # Unknown keys live apart, under their own bound: a flood of random keys
        # evicts other unknown keys, never the known ones that valid traffic uses.
        self._negative: OrderedDict[str, tuple[float, KeyRecord | None]] = OrderedDict()
        self._max_negative = max(1, min(max_entries, NEGATIVE_MAX))
        self.generation = 0
        # Plain counters, read by the metrics collector at scrape time (gateway.metrics).
        self.hits = self.negative_hits = self.misses = 0
        self.evicted_size = self.expired = self.invalidated = self.cleared = 0

    def __len__(self) -> int:
        return len(self._entries) + len(self._negative)

    def get(self, key_hash: str) -> Cached:
        """The cached record, None for a cached "unknown key", or `MISS`."""
        table = self._entries
        entry = table.get(key_hash)
        if entry is None:
            table = self._negative
            entry = table.get(key_hash)
            if entry is None:
                self.misses += 1
                return MISS
        expires, record = entry
        if self._clock() >= expires:
            del table[key_hash]
            self.expired += 1
            self.misses += 1
            return MISS
        table.move_to_end(key_hash)
        if record is None:
            self.negative_hits += 1
        else:
            self.hits += 1
        return record

    def peek_stale(self, key_hash: str, max_age: float) -> Cached:
        """An entry even past its TTL, if it expired less than `max_age` ago; else `MISS`.

        Only for serving through a Redis outage when the operator allowed it
        (cache.serve_stale_seconds); evicted entries are gone and never come back here.
        """
        entry = self._entries.get(key_hash) or self._negative.get(key_hash)
        if entry is None or self._clock() - entry[0] > max_age:
            return MISS
        return entry[1]

    def put(self, key_hash: str, record: KeyRecord | None, generation: int) -> bool:
        """Store an answer read at `generation`; refused if anything was evicted since."""
        if generation != self.generation:
            return False
        if record is not None:
            ttl, table, bound, other = self._ttl, self._entries, self._max, self._negative
        else:
            ttl, table, bound, other = self._negative_ttl, self._negative, self._max_negative, self._entries
        if ttl <= 0:
            return False
        other.pop(key_hash, None)
        table[key_hash] = (self._clock() + ttl, record)
        table.move_to_end(key_hash)
        while len(table) > bound:
            table.popitem(last=False)
            self.evicted_size += 1
        return True

    def evict(self, key_hash: str) -> None:
        self.generation += 1
        if self._entries.pop(key_hash, None) is not None or self._negative.pop(key_hash, None) is not None:
            self.invalidated += 1

    def clear(self) -> None:
        self.generation += 1
        self.cleared += len(self)
        self._entries.clear()
        self._negative.clear()
