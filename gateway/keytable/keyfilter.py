"""The hashes of every key in the table, held by this replica (unknown-key floods, issue 5).

A key whose hash is not in the set cannot be in the table, so the request is
answered 401 key_not_found without a Redis read: a flood of random keys costs
no round trip at all, where the negative cache would still pay one per distinct
key. The set says "maybe" for every hash it holds; the cache and Redis decide
those as before.

When the set may be trusted follows the cache's rule (spec 8), lease included:
gateway/keytable/lookup.py consults it only while `coherence.coherent`, so a replica
whose lease ran out (a silent subscription) refuses nothing from it. It is built
after the invalidation subscription is live: from then on every new key is
announced on the channel (its hash is added as the announcement is handled,
before the ack, so an admin call that creates a key returns only once every
live replica knows it), and a SCAN of the table finds every key written
before. Only when that scan has finished, in the same subscription session,
does the set refuse anything. Any break of the subscription stops it refusing
until a new session has rebuilt it. Keys are never deleted from the table
(revoked keys stay), so nothing is ever removed from the set.

Each hash is held as its first 64 bits (about 60 bytes a key in CPython): a
false "maybe" only costs the Redis read that every lookup used to cost.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

log = logging.getLogger("gateway.known")


def _short(key_hash: str) -> int:
    return int(key_hash[:16], 16)


class KnownKeys:
    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self.ready = False  # complete for the current subscription session: may refuse
        self._hashes: set[int] = set()
        self._session = 0
        self.refused = 0  # lookups answered "not in the table" without Redis (read by /metrics)

    def __len__(self) -> int:
        return len(self._hashes)

    def absent(self, key_hash: str) -> bool:
        """True only when the key is certainly not in the table."""
        if self.ready and _short(key_hash) not in self._hashes:
            self.refused += 1
            return True
        return False

    def add(self, key_hash: str) -> None:
        """A hash announced on the channel (a key created, imported or rotated in)."""
        if self.enabled:
            self._hashes.add(_short(key_hash))

    def lost(self) -> None:
        """The subscription broke: announcements may be missed, so refuse nothing until rebuilt."""
        self.ready = False
        self._session += 1

    async def rebuild(self, hashes: AsyncIterator[str]) -> bool:
        """Scan the table into the set (called once the subscription is live); True when it became ready.

        What the scan finds is added to what announcements have added meanwhile;
        a break during the scan (`lost`) leaves the set not ready."""
        if not self.enabled:
            return False
        session = self._session
        found: set[int] = set()
        async for key_hash in hashes:
            found.add(_short(key_hash))
            if session != self._session:
                return False
        if session != self._session:
            return False
        self._hashes |= found
        self.ready = True
        log.info("key filter ready: %d key(s) known", len(self._hashes))
        return True
