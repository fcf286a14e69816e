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
live replica knows it), and a full build finds every key written before
(KeyStore.hash_prefixes: the id index when it is known complete, else a SCAN
of the table). Only when that scan has finished, in the same subscription session,
does the set refuse anything. Any break of the subscription stops it refusing
until a new session has rebuilt it. Keys are never deleted from the table
(revoked keys stay), so nothing is ever removed from the set.

At scale (issue 15, docs/scale.md): each hash is held as its first 64 bits in a
sorted numpy array (8 bytes a key), searched by bisection within the run of
values sharing the hash's top bits (~0.9 us where a set took ~0.5, and only on a
cache miss), plus a small set of the hashes announced since the array was last
sorted (~70 bytes each), merged into the array once it holds more than 1/64 of
it. The rebuild takes the full build's numpy batches (KeyStore.hash_prefixes)
and sorts once.
A resubscription need not scan again: the filter remembers where the change log
(the global audit stream, appended to in every key change's transaction) stood
when it was last complete (`checkpoint`, read once the subscription is live and
before the scan), and the next session adds the keys the log names since then
(Subscriber._rebuild_known). Another Redis process (restart, failover), a log
with entries removed, or too long an absence falls back to the full scan.
A false "maybe" (two keys sharing 64 bits: about n / 2^64 per lookup) only costs
the Redis read that every lookup used to cost; there are no false "absent"s.

May import: numpy and the standard library only.
"""

from __future__ import annotations

import bisect
import logging
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import numpy.typing as npt

log = logging.getLogger("gateway.known")

Prefixes = npt.NDArray[np.uint64]  # first 64 bits of SHA-256 digests, as numbers
_DELTA_MIN = 1024  # announced hashes held in the set before it is merged into the sorted array
_DELTA_SHARE = 64  # ... or 1/64 of the array, whichever is larger (a merge sorts the whole array)


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """How far the change log (the global audit stream) went when a filter was complete: the
    Redis process (`run_id`: a restart or a failover changes it), the stream's last entry id,
    and how many entries it had ever been given (XINFO STREAM entries-added, Redis >= 7)."""

    server: str
    entry: str
    added: int


class ChangeLog(Protocol):
    """Where keys were written, for a catch-up instead of a scan (KeyStore implements it)."""

    async def checkpoint(self) -> Checkpoint | None:
        """Where the log stands now; None when it cannot say."""

    async def hashes_since(self, since: Checkpoint, until: Checkpoint) -> list[str] | None:
        """Every key hash written between the two; None when the log cannot tell."""


async def each(hashes: Iterable[str]) -> AsyncIterator[str]:
    """A list of hashes as `rebuild` takes them."""
    for key_hash in hashes:
        yield key_hash


def _short(key_hash: str) -> int:
    return int(key_hash[:16], 16)


def _sorted_unique(parts: list[Prefixes]) -> Prefixes:
    merged = np.concatenate(parts) if parts else np.empty(0, np.uint64)
    merged.sort(kind="stable")  # radix sort for integers
    if len(merged) > 1:
        keep = np.empty(len(merged), dtype=bool)
        keep[0] = True
        np.not_equal(merged[1:], merged[:-1], out=keep[1:])
        merged = merged[keep]
    return np.ascontiguousarray(merged, dtype=np.uint64)


class KnownKeys:
    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self.ready = False  # complete for the current subscription session: may refuse
        self._sorted: Prefixes = np.empty(0, np.uint64)
        self._view = memoryview(b"").cast("Q")  # the array's numbers as Python ints, for bisect
        self._shift = 63
        self._starts = memoryview(b"").cast("q")
        self._delta: set[int] = set()  # announced since the array was sorted (none of them in it)
        self._install(self._sorted)
        self._session = 0
        # Where the change log stood when the filter was last complete (None: never, or unknown):
        # a later session catches up from it instead of scanning the table (KeyStore.hashes_since).
        self.checkpoint: Checkpoint | None = None
        self.refused = 0  # lookups answered "not in the table" without Redis (read by /metrics)

    def __len__(self) -> int:
        return len(self._view) + len(self._delta)

    @property
    def nbytes(self) -> int:
        """Memory held for the hashes (the array, and the delta set roughly): for sizing."""
        return self._sorted.nbytes + self._starts.nbytes + 72 * len(self._delta)

    def _holds(self, short: int) -> bool:
        if short in self._delta:
            return True
        # The array's slice whose top bits are short's (about 16 values), bisected.
        top = short >> self._shift
        lo, hi = self._starts[top], self._starts[top + 1]
        i = bisect.bisect_left(self._view, short, lo, hi)
        return i < hi and self._view[i] == short

    def absent(self, key_hash: str) -> bool:
        """True only when the key is certainly not in the table."""
        if self.ready and not self._holds(_short(key_hash)):
            self.refused += 1
            return True
        return False

    def add(self, key_hash: str) -> None:
        """A hash announced on the channel (a key created, imported or rotated in; or changed)."""
        if not self.enabled:
            return
        short = _short(key_hash)
        if self._holds(short):
            return
        self._delta.add(short)
        if len(self._delta) > max(_DELTA_MIN, len(self._view) // _DELTA_SHARE):
            self._install(_sorted_unique([self._sorted, np.fromiter(self._delta, np.uint64, len(self._delta))]))

    def _install(self, array: Prefixes) -> None:
        """The new sorted array, which holds every hash of the old one and of the delta."""
        # Where each run of values sharing their top `bits` bits starts (about 16 values a run):
        # a lookup bisects one run, not the whole array (~1 us instead of ~2 at 1M keys).
        bits = max(1, min(20, (len(array) // 16).bit_length()))
        self._shift = 64 - bits
        starts = np.searchsorted(array >> np.uint64(self._shift), np.arange(2**bits + 1, dtype=np.uint64))
        self._starts = np.ascontiguousarray(starts, dtype=np.int64).data.cast("B").cast("q")
        self._sorted = array
        self._view = array.data.cast("B").cast("Q") if len(array) else memoryview(b"").cast("Q")
        self._delta = set()

    def lost(self) -> None:
        """The subscription broke: announcements may be missed, so refuse nothing until rebuilt."""
        self.ready = False
        self._session += 1

    @property
    def session(self) -> int:
        """Changes at every `lost`: a rebuild begun in an older session never makes the set ready."""
        return self._session

    async def rebuild(
        self, hashes: AsyncIterator[str | Prefixes], checkpoint: Checkpoint | None = None, *, session: int | None = None
    ) -> bool:
        """Scan the table into the set (called once the subscription is live); True when it became ready.

        `hashes` yields hex digests or batches of prefixes (KeyStore.hash_prefixes). What
        the scan finds is added to what announcements have added meanwhile (and to what the
        set held); a break during the scan (`lost`) leaves the set not ready. `checkpoint`:
        where the change log stood before the scan began (read with the subscription live),
        kept once the set is ready. `session`: the one the caller began in (default: now)."""
        if not self.enabled:
            return False
        session = self._session if session is None else session
        found: list[Prefixes] = []
        singles: list[int] = []
        async for item in hashes:
            if isinstance(item, str):
                singles.append(_short(item))
            else:
                found.append(item)
            if session != self._session:
                return False
        if session != self._session:
            return False
        # From here to the install nothing awaits: no announcement can come in between.
        found += [self._sorted, np.array(singles, np.uint64), np.fromiter(self._delta, np.uint64, len(self._delta))]
        self._install(_sorted_unique(found))
        self.checkpoint = checkpoint
        self.ready = True
        log.info("key filter ready: %d key(s) known", len(self))
        return True
